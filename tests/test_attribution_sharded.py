"""Attributions of a batch sharded over 4 CPU devices equal the single-device ones.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is
imported, so the checks run in one subprocess (``tests/_sharded_attribution.py``), once
per module; each of its cases is asserted here as a test of its own:

- ``integrated_gradients`` of a linen CNN under ``jax.jit`` with the batch and the
  per-example targets sharded over 'data', with and without ``batch_size`` chunking;
  the attributions and the delta stay sharded over 'data';
- the same inside ``jax.shard_map`` (each device attributes its own examples), with and
  without ``batch_size``;
- ``layer_integrated_gradients`` at a linen embedding with token ids sharded over 'data';
- ``expected_gradients`` under jit: same key, same result sharded or not;
- on a mesh of ``Explicit`` axes (``jax.make_mesh``'s default): a dense model, and a CNN.
"""

import json
import os
import subprocess
import sys

import pytest

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharded_attribution.py")
CASES = (
    "integrated_gradients_jit_sharded_inputs",
    "integrated_gradients_jit_sharded_chunked",
    "integrated_gradients_shard_map",
    "integrated_gradients_shard_map_chunked",
    "layer_integrated_gradients_jit_sharded_ids",
    "expected_gradients_jit_sharded",
    "integrated_gradients_explicit_mesh_dense",
    "integrated_gradients_explicit_mesh_conv",
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
