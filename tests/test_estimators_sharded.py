"""``es_gradient`` with its population split over 4 CPU devices equals one device.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is
imported, so the checks run in one subprocess (``tests/_sharded_estimators.py``), once
per module; each case is a test here: antithetic Gaussian, plain sampling with the f(θ)
baseline and Rademacher noise, centered-rank shaping (global ranks over devices), the
leave-one-out mean with chunks, lean evaluation per device, and the error for a
population that does not split evenly.
"""

import json
import os
import subprocess
import sys

import pytest

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharded_estimators.py")
CASES = (
    "antithetic_gaussian",
    "plain_f0_baseline_rademacher",
    "centered_rank_shaping_is_global",
    "leave_one_out_mean_and_chunks",
    "lean_per_device",
    "population_not_divisible",
)


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  try:
    proc = subprocess.run([sys.executable, HELPER], capture_output=True, text=True, env=env,
                          timeout=600)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{HELPER} timed out: {e}")
  records = {}
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      record = json.loads(line)
      records[record["name"]] = record
  return records, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def test_helper_runs_every_case(results):
  records, log = results
  assert sorted(records) == sorted(CASES), log


@pytest.mark.parametrize("name", CASES)
def test_case(name, results):
  records, log = results
  if name not in records:
    pytest.fail(f"no result for {name} from {HELPER}: {log}")
  assert records[name]["ok"], records[name]["error"]
