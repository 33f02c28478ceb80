"""Shared by the multi-device helper scripts (``tests/_sharded_*.py``).

A helper runs in a process of its own because
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before jax is imported.
It calls :func:`force_host_devices` first, then :func:`report` with its cases (or
:func:`run_on_mesh`, which does both on a one-axis mesh); each case prints one JSON line
``{"name", "ok", "error"}``, which the ``multidevice_records`` fixture of
``tests/conftest.py`` reads back on the pytest side, where the test module names its
``HELPER`` (:func:`helper_path`) and gets its tests from :func:`case_tests`.
"""

import ast
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


def helper_path(name: str) -> str:
  """The absolute path of the helper script ``name`` in ``tests/``."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def case_names(helper: str) -> tuple[str, ...]:
  """The ``<name>`` of every ``case_<name>`` function of a helper script, in order.

  Read from the source (the pytest side must not import a helper: it imports jax once
  its devices are forced).
  """
  with open(helper, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=helper)
  return tuple(node.name[len("case_"):] for node in tree.body
               if isinstance(node, ast.FunctionDef) and node.name.startswith("case_"))


def run_on_mesh(namespace: dict, axis_name: str, *, count: int = NUM_DEVICES) -> None:
  """A helper's ``main``: ``count`` CPU devices, a one-axis mesh ``(axis_name,)`` over
  them, and :func:`report` of every ``case_<name>(mesh)`` in ``namespace``."""
  force_host_devices(count)
  import jax

  assert jax.device_count() == count, jax.devices()
  report(cases_of(namespace), jax.make_mesh((count,), (axis_name,)))


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
