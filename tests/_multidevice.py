"""Shared by the multi-device helper scripts (``tests/_sharded_*.py``).

A helper runs in a process of its own because
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before jax is imported.
It calls :func:`force_host_devices` first, then :func:`report` with its cases; each case
prints one JSON line ``{"name", "ok", "error"}``, which the ``multidevice_records``
fixture of ``tests/conftest.py`` reads back on the pytest side.
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
