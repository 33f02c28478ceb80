"""The claims of ``benchmarks/attribution_family.py``, checked cheaply.

In CI: the benchmark's own pieces at tiny sizes (its completeness curves fall with the
steps; its token-attribution memory with ``batch_size=1`` is several times below all steps
at once), and the committed full results say what they claim. With ``GRADTX_SLOW=1``: the
script itself, ``--quick`` into a temporary folder, as a user runs it.
"""

import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "attribution_family.py"


@pytest.fixture(scope="module")
def bench():
  sys.path.insert(0, str(SCRIPT.parent))
  try:
    spec = importlib.util.spec_from_file_location("attribution_family_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.path.remove(str(SCRIPT.parent))


class _Bar:
  def update(self, n=1):
    pass


def test_completeness_falls_with_steps(bench):
  params = bench.init_cnn(np.random.default_rng(0))
  x = np.random.default_rng(1).random((2, 8, 8, 1)).astype(np.float32)
  curves = bench.completeness(params, x, np.array([3, 7]), (4, 16), _Bar())
  assert curves["ig"][1] < 1e-6 < curves["ig"][0]    # Gauss–Legendre on a smooth CNN
  for method in ("guided_ig", "blur_ig"):
    assert curves[method][1] < curves[method][0], (method, curves[method])


def test_token_memory_is_one_pass(bench):
  (row,) = bench.token_memory((32,), _Bar())
  assert row["ratio"] > 8, row


def test_committed_results_support_the_docs():
  path = ROOT / "benchmarks" / "results" / "attribution_family.json"
  if not path.exists():
    pytest.skip("the full benchmark has not been run")
  data = json.loads(path.read_text())
  assert data["quick"] is False
  assert (ROOT / "benchmarks" / "results" / "attribution_family.png").exists()
  for row in data["speed"]:
    agree = row["agreement"]
    if agree["kind"] == "correlation":
      assert agree["value"] >= data["target"]["noise_correlation_min"], row
    else:
      assert agree["value"] <= data["target"]["agreement_rel"], row
    assert row["speedup"]["median"] > 1, row     # gradtx is never the slower one
    if "floor_ms" in row:   # IG costs about its gradients: one jax.grad at all the points
      assert row["unhoisted_over_floor"]["median"] < 1.3, row
      # hoisting the first convolution saves time, with the same attributions
      assert row["gradtx_over_floor"]["median"] < row["unhoisted_over_floor"]["median"], row
      assert row["unhoisted_agreement"]["value"] <= 1e-5, row
  assert all(r["ratio"] > 8 for r in data["token_memory"])
  ig = data["completeness"]["ig"]
  assert ig[-1] < 1e-10 and ig[0] > ig[-1]


@pytest.mark.slow
def test_quick_run_writes_its_results(tmp_path):
  subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], check=True,
                 cwd=ROOT, capture_output=True, timeout=900)
  data = json.loads((tmp_path / "attribution_family.json").read_text())
  assert data["quick"] is True and (tmp_path / "attribution_family.png").exists()
  for row in data["speed"]:
    if row["agreement"]["kind"] != "correlation":
      assert row["agreement"]["value"] <= data["target"]["agreement_rel"], row
