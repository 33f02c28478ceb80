"""Attributions of a batch sharded over 4 CPU devices equal the single-device ones.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is
imported, so the checks run in one subprocess (``tests/_sharded_attribution.py``), once
per module (the ``multidevice_records`` fixture of ``conftest.py``); each of its
cases is asserted here as a test of its own:

- ``integrated_gradients`` of a linen CNN under ``jax.jit`` with the batch and the
  per-example targets sharded over 'data', with and without ``batch_size`` chunking;
  the attributions and the delta stay sharded over 'data';
- the same inside ``jax.shard_map`` (each device attributes its own examples), with and
  without ``batch_size``;
- ``layer_integrated_gradients`` at a linen embedding with token ids sharded over 'data';
- ``expected_gradients`` under jit: same key, same result sharded or not;
- on a mesh of ``Explicit`` axes (``jax.make_mesh``'s default): a dense model, and a CNN.
"""

from _multidevice import case_names, case_tests, helper_path

HELPER = helper_path("_sharded_attribution.py")
CASES = case_names(HELPER)
test_helper_runs_every_case, test_case = case_tests(CASES)
