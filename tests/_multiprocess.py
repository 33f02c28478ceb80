"""Real multi-process JAX on one machine: N local ``jax.distributed`` processes.

The launcher side (pytest) calls :func:`launch`: it starts ``num_processes`` copies of a
worker script, each with ``devices_per_process`` virtual CPU devices, joined by
``jax.distributed.initialize("127.0.0.1:PORT", num_processes=N, process_id=i)`` on a free
port with gloo CPU collectives, so that together they form one global mesh of
``N × devices_per_process`` devices and ``jit`` reduces across processes. The run is
bounded in time: when one process fails or the deadline passes, every process still
running is killed (by its own process group), and the outputs are returned.

The worker side calls :func:`init_worker` before anything imports jax, then
:func:`report` with its cases: each case prints one JSON line ``{"name", "ok", "error",
"value"}``, where ``value`` is what the case returned (JSON numbers and lists: e.g. a
global norm), so that the launcher can check that every process computed the same
thing. The fast-compile XLA flags of ``tests/conftest.py`` travel in the environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

_ENV_COORDINATOR = "GRADTX_MP_COORDINATOR"
_ENV_NUM_PROCESSES = "GRADTX_MP_NUM_PROCESSES"
_ENV_PROCESS_ID = "GRADTX_MP_PROCESS_ID"
_ENV_DEVICES = "GRADTX_MP_DEVICES"


@dataclasses.dataclass
class ProcessResult:
  """What one process of a :func:`launch` printed, and how it ended."""

  process_id: int
  returncode: int | None  # None: killed at the deadline, or after another process failed
  stdout: str
  stderr: str

  @property
  def records(self) -> dict[str, dict]:
    """The case records (JSON lines ``{"name", ...}`` of :func:`report`) by case name."""
    out = {}
    for line in self.stdout.splitlines():
      if line.startswith("{"):
        record = json.loads(line)
        out[record["name"]] = record
    return out

  def log(self, chars: int = 3000) -> str:
    return (f"process {self.process_id}: rc={self.returncode}\n{self.stdout[-chars:]}\n"
            f"{self.stderr[-chars:]}")


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(script: str, *, num_processes: int = 2, devices_per_process: int = 2,
           timeout: float = 300.0, args: tuple[str, ...] = (), grace: float = 15.0,
           env: dict | None = None) -> list[ProcessResult]:
  """Runs ``script`` as ``num_processes`` joined JAX processes; their results, by id.

  Args:
    script: a worker that calls :func:`init_worker` first (or reads the ``GRADTX_MP_*``
      variables itself).
    num_processes: the number of processes N.
    devices_per_process: virtual CPU devices in each process.
    timeout: seconds for the whole run; then every process still running is killed.
    args: extra command-line arguments of the script.
    grace: seconds the others get to finish once one process has failed (they may be
      blocked in a collective that will never complete); then they are killed.
    env: extra environment variables.
  """
  coordinator = f"127.0.0.1:{free_port()}"
  procs, files = [], []
  for i in range(num_processes):
    penv = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    penv.update({_ENV_COORDINATOR: coordinator, _ENV_NUM_PROCESSES: str(num_processes),
                 _ENV_PROCESS_ID: str(i), _ENV_DEVICES: str(devices_per_process)})
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    files.append((out, err))
    procs.append(subprocess.Popen([sys.executable, script, *args], stdout=out, stderr=err,
                                  env=penv, start_new_session=True))
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):
      deadline = min(deadline, time.monotonic() + grace)
    time.sleep(0.1)
  results = []
  for i, (p, (out, err)) in enumerate(zip(procs, files, strict=True)):
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)  # the process group this launch started
      p.wait()
      returncode = None
    else:
      returncode = p.returncode
    out.seek(0)
    err.seek(0)
    results.append(ProcessResult(i, returncode, out.read(), err.read()))
    out.close()
    err.close()
  return results


def init_worker():
  """In a worker launched by :func:`launch`: forces its CPU devices, imports jax and joins
  the others. Returns ``jax``. Call before anything else imports jax."""
  devices = int(os.environ[_ENV_DEVICES])
  flag = f"--xla_force_host_platform_device_count={devices}"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(os.environ[_ENV_COORDINATOR],
                             num_processes=int(os.environ[_ENV_NUM_PROCESSES]),
                             process_id=int(os.environ[_ENV_PROCESS_ID]),
                             initialization_timeout=120)
  return jax


def report(cases: dict, *args) -> None:
  """Runs every case with ``args``; prints ``{"name", "ok", "error", "value"}`` per case.

  A failing case does not stop the others; but every process must run the same cases in
  the same order (a case that fails on one process only may leave the others waiting in
  a collective, which :func:`launch`'s deadline ends).
  """
  for name, case in cases.items():
    start = time.perf_counter()
    try:
      value = case(*args)
      record = {"name": name, "ok": True, "error": "", "value": value}
    except Exception:  # noqa: BLE001 - reported per case to the pytest side
      record = {"name": name, "ok": False, "error": traceback.format_exc(), "value": None}
    record["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(record), flush=True)
