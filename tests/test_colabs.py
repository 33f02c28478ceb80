"""Runs every notebook in ``colabs/`` top to bottom, in fast mode, so none can rot.

Each notebook is executed with nbclient in a fresh kernel, in a temporary working
directory, with ``GRADTX_SMOKE=1`` (the notebooks shrink their step counts and grids) and
``MPLBACKEND=Agg``; any cell error fails the test with the cell's traceback. New notebooks
are picked up automatically (``colabs/*.ipynb``).

The kernel is the interpreter running pytest: the test writes a ``python3`` kernel spec
that points at ``sys.executable`` into a temporary directory and puts it first on
``JUPYTER_PATH``. So ``pip install -e ".[dev]"`` (which brings ipykernel) is all it needs;
no ``python -m ipykernel install --user``, and a user-level ``python3`` kernel for some
other environment cannot be picked up by mistake.
"""

from __future__ import annotations

import os
import pathlib
import re

import ipykernel.kernelspec  # these three come with the [examples] extra, part of [dev]
import nbclient
import nbformat
import pytest

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
KERNEL_NAME = "python3"
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks
CELL_TIMEOUT_S = 600  # generous: CI machines are slow and shared; smoke runs take seconds


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """A JUPYTER_PATH entry holding a ``python3`` kernel spec for this interpreter."""
  root = tmp_path_factory.mktemp("jupyter")
  # argv[0] of the written spec is sys.executable, the interpreter running the tests.
  ipykernel.kernelspec.write_kernel_spec(root / "kernels" / KERNEL_NAME)
  return root


def _prepend_env(monkeypatch: pytest.MonkeyPatch, name: str, entry: str) -> None:
  monkeypatch.setenv(name, os.pathsep.join(filter(None, [entry, os.environ.get(name)])))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, kernel_dir: pathlib.Path,
                       tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
  # The kernel inherits this process's environment.
  monkeypatch.setenv("GRADTX_SMOKE", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # (The kernel also inherits conftest's fast-compile XLA_FLAGS: smoke runs are dominated
  # by XLA compiling a dozen small training loops.)
  _prepend_env(monkeypatch, "JUPYTER_PATH", str(kernel_dir))
  # The notebooks import the gradtx of this checkout, also from the temporary directory.
  _prepend_env(monkeypatch, "PYTHONPATH", str(path.parents[1]))
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb,
      kernel_name=KERNEL_NAME,
      timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
  )
  try:
    client.execute()
    return
  except nbclient.exceptions.CellExecutionError as err:  # the cell's source and traceback
    error = _ANSI_ESCAPE.sub("", str(err))
  pytest.fail(f"{path.name} failed (GRADTX_SMOKE=1):\n{error}", pytrace=False)


def test_found_the_notebooks() -> None:
  assert NOTEBOOKS, f"no notebooks found in {COLABS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_clean(path: pathlib.Path) -> None:
  """Committed without outputs, and the Colab install line is commented out."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for index, cell in enumerate(nb.cells):
    if cell.cell_type != "code":
      continue
    assert not cell.outputs and cell.execution_count is None, (
        f"{path.name}: cell {index} has stored outputs; clear them before committing"
    )
    for line in cell.source.splitlines():
      assert not line.lstrip().startswith(("%pip", "!pip")), (
          f"{path.name}: cell {index} installs packages when run: {line!r}; comment it out"
      )
