"""Shared test settings: XLA flags and hypothesis profile for CI's 2 cores; multi-device runs."""

import json
import os
import subprocess
import sys

# The suite is bound by XLA:CPU compiling thousands of small programs. Without LLVM's
# optimisations and with the legacy (non-MLIR) fusion emitters it compiles ~2.5x faster;
# the HLO (fusion decisions, buffer assignment, so the memory claims) is the same and the
# results change only by float rounding, which every test's tolerance allows. Set before
# jax creates its backend; inherited by the subprocesses (helpers, benchmarks, notebooks).
# GRADTX_SLOW=1 runs with XLA's defaults.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0",
                          "--xla_cpu_use_fusion_emitters=false")
if not os.environ.get("GRADTX_SLOW"):
  if "jax" in sys.modules:
    raise RuntimeError("tests/conftest.py must set XLA_FLAGS before jax is imported")
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE_XLA_FLAGS]).strip()

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The multi-device helper scripts import tests/_multidevice.py as a top-level module (their
# own directory is on sys.path when they run as scripts); so does pytest's doctest pass.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The underscore modules are helpers: multi-device and multi-process scripts (some set
# environment variables or need them at import) and shared test code. They hold no tests,
# and importing them into a pytest worker (the doctest pass) would run their set-up there.
collect_ignore_glob = ["_*.py"]

settings.register_profile("ci", max_examples=30, deadline=None)
settings.register_profile("full", max_examples=300, deadline=None)
settings.load_profile("full" if os.environ.get("GRADTX_SLOW") else "ci")


@pytest.fixture(scope="module")
def multidevice_records(request):
  """Runs the test module's ``HELPER`` script once; ``(records by case name, log)``.

  The helper (see ``tests/_multidevice.py``) forces several CPU devices before importing
  jax, so it needs a process of its own.
  """
  helper = request.module.HELPER
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  try:
    proc = subprocess.run([sys.executable, helper], capture_output=True, text=True, env=env,
                          timeout=600)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"{helper} timed out: {e}")
  records = {}
  for line in proc.stdout.splitlines():
    if line.startswith("{"):
      record = json.loads(line)
      records[record["name"]] = record
  return records, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"



# Modules whose tests share an expensive module-scoped fixture (a subprocess on several
# devices or processes, the quick tour, the docs build, a wheel): pytest-xdist keeps each
# on one worker (--dist loadgroup) so the fixture runs once. Every other test is handed
# out one by one, so two workers stay busy to the end (notebooks, contract checks).
_ONE_WORKER_MODULES = (
    "test_attribution_sharded", "test_contrastive_sharded", "test_contrastive_ring",
    "test_estimators_sharded", "test_tour", "test_benchmarks", "test_docs", "test_release",
    "test_multihost", "test_scanned", "test_attribution_family_benchmark",
    "test_contrastive_ring8", "test_curvature", "test_layerwise",
)


def pytest_collection_modifyitems(config, items):
  """Groups for pytest-xdist; tests marked ``slow`` run only with GRADTX_SLOW=1."""
  for item in items:
    module = item.path.stem  # doctest items have no .module
    if module in _ONE_WORKER_MODULES:
      item.add_marker(pytest.mark.xdist_group(module))
    elif module == "test_contract" and "sharded" in item.name:
      item.add_marker(pytest.mark.xdist_group("test_contract_sharded"))
  if os.environ.get("GRADTX_SLOW"):
    return
  skip = pytest.mark.skip(reason="slow variant: set GRADTX_SLOW=1 to run it")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
