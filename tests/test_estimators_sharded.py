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

import os

from _multidevice import case_tests

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharded_estimators.py")
CASES = (
    "antithetic_gaussian",
    "plain_f0_baseline_rademacher",
    "centered_rank_shaping_is_global",
    "leave_one_out_mean_and_chunks",
    "lean_per_device",
    "per_leaf_population_per_device",
    "population_not_divisible",
    "inputs_created_under_set_mesh",
    "inputs_created_under_set_mesh_lean_masked_low_rank",
    "inputs_created_outside_with_explicit_mesh",
    "closure_over_mesh_arrays_is_a_clear_error",
)

test_helper_runs_every_case, test_case = case_tests(CASES)
