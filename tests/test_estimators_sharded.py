"""``es_gradient`` with its population split over 4 CPU devices equals one device.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is
imported, so the checks run in one subprocess (``tests/_sharded_estimators.py``), once
per module (the ``multidevice_records`` fixture of ``conftest.py``); each case is a
test here: antithetic Gaussian, plain sampling with the f(θ) baseline and Rademacher
noise, centered-rank shaping (global ranks over devices), the
leave-one-out mean with chunks, lean evaluation per device, the per-leaf (not flat)
population per device, and the error for a population that does not split evenly; keys
and params created under ``jax.set_mesh`` (Explicit axes: they enter the shard_map as
arguments) and outside it, and a clear error for an ``fn`` that closes over such arrays.
"""

from _multidevice import case_names, case_tests, helper_path

HELPER = helper_path("_sharded_estimators.py")
CASES = case_names(HELPER)
test_helper_runs_every_case, test_case = case_tests(CASES)
