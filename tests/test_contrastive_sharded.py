"""``sharded_cached_value_and_grad`` on 4 CPU devices equals single-device autodiff.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is
imported, so the checks run in one subprocess (``tests/_sharded_contrastive.py``), once
per module (the ``multidevice_records`` fixture of ``conftest.py``); each of its
cases is asserted here as a test of its own:

- InfoNCE with two towers, a dropout encoder and a learnable temperature (no outer jit);
- NT-Xent, one tower and two views, a local batch not divisible by the chunk size;
- supervised contrastive with global labels, dropout, a temperature and ``has_aux``;
- each device encodes only its own rows, each row twice (pass 1 and pass 2);
- only (B, d) representations are all-gathered;
- clear errors: local batch not divisible by chunk_size with rng, batch not divisible
  by the devices, an unknown mesh axis.
"""

from _multidevice import case_names, case_tests, helper_path

HELPER = helper_path("_sharded_contrastive.py")
CASES = case_names(HELPER)
test_helper_runs_every_case, test_case = case_tests(CASES)
