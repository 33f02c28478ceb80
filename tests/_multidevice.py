"""Shared by the multi-device helper scripts (``tests/_sharded_*.py``).

A helper runs in a process of its own because
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before jax is imported.
It calls :func:`force_host_devices` first, then :func:`report` with its cases; each case
prints one JSON line ``{"name", "ok", "error"}``, which the ``multidevice_records``
fixture of ``tests/conftest.py`` reads back on the pytest side, where the test module
gets its tests from :func:`case_tests`.
"""

import json
import os
import traceback

NUM_DEVICES = 4


def force_host_devices(count: int = NUM_DEVICES) -> None:
  """Asks XLA for ``count`` CPU devices (call before importing jax)."""
  flag = f"--xla_force_host_platform_device_count={count}"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def cases_of(namespace: dict) -> dict:
  """``{name: fn}`` for every ``case_<name>`` function of a module's globals."""
  return {name[len("case_"):]: fn for name, fn in namespace.items() if name.startswith("case_")}


def report(cases: dict, *args) -> None:
  """Runs every case with ``args`` and prints its JSON record (a failure does not stop)."""
  for name, case in cases.items():
    try:
      case(*args)
      record = {"name": name, "ok": True, "error": ""}
    except Exception:  # noqa: BLE001 - reported per case to the pytest side
      record = {"name": name, "ok": False, "error": traceback.format_exc()}
    print(json.dumps(record), flush=True)


def case_tests(cases: tuple[str, ...]):
  """The pytest side of a helper: ``(test_helper_runs_every_case, test_case)``.

  A test module with ``HELPER`` (the script) and ``CASES`` (its case names) binds them at
  module level: ``test_helper_runs_every_case, test_case = case_tests(CASES)``.
  """
  import pytest  # only the pytest side needs it

  def test_helper_runs_every_case(multidevice_records):
    records, log = multidevice_records
    assert sorted(records) == sorted(cases), log

  @pytest.mark.parametrize("name", cases)
  def test_case(name, multidevice_records):
    records, log = multidevice_records
    record = records.get(name, {"ok": False, "error": f"no result for {name}: {log}"})
    assert record["ok"], record["error"]

  return test_helper_runs_every_case, test_case
