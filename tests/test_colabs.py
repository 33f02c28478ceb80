"""Runs every notebook in ``colabs/`` top to bottom, in fast mode, so none can rot.

Also checks how each is stored: its first code cell is the Colab install cell, pinned to
this release; it holds the outputs of one clean top-to-bottom run (the documentation
site renders them, ``docs/conf.py``); it forces no JAX platform (a GPU is used when the
runtime has one).

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
import tomllib

import ipykernel.kernelspec  # these three come with the [examples] extra, part of [dev]
import IPython.core.inputtransformer2
import nbclient
import nbformat
import pytest

import gradtx

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


def _version() -> str:
  with open(COLABS.parent / "pyproject.toml", "rb") as f:
    return tomllib.load(f)["project"]["version"]


def install_cell(version: str) -> str:
  """The first code cell of every notebook: installs gradtx in Colab, nothing elsewhere."""
  return INSTALL_CELL.format(version=version)


INSTALL_CELL = "\n".join([
    "# Installs gradtx when this notebook runs in Colab; does nothing elsewhere.",
    "import sys",
    "",
    'if "google.colab" in sys.modules:',
    '  %pip install -q "gradtx[examples]=={version}"',
])

# Forcing a platform would keep a notebook off Colab's GPU; JAX picks the GPU by itself.
_FORCED_PLATFORM = re.compile(r"JAX_PLATFORMS?|jax_platforms?|jax_platform_name")


def test_install_cell_pins_the_package_version() -> None:
  assert install_cell(_version()).endswith(f'"gradtx[examples]=={gradtx.__version__}"'), (
      "gradtx.__version__ differs from pyproject.toml's version: reinstall the package "
      "(pip install -e .)"
  )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_starts_with_the_colab_install_cell(path: pathlib.Path) -> None:
  nb = nbformat.read(path, as_version=4)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code, f"{path.name} has no code cell"
  expected = install_cell(_version())
  assert code[0].source.strip() == expected, (
      f"{path.name}: the first code cell must be exactly\n{expected}\n"
      f"(pinned to this release, {_version()}); found\n{code[0].source}"
  )
  # Well-formed: IPython turns the indented magic into a call, and the cell runs here
  # without installing anything (the test kernel is not Colab).
  transformed = IPython.core.inputtransformer2.TransformerManager().transform_cell(
      code[0].source)
  compile(transformed, f"{path.name}: install cell", "exec")
  assert "get_ipython().run_line_magic('pip'" in transformed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_with_the_outputs_of_a_clean_run(path: pathlib.Path) -> None:
  """The docs render the stored outputs: every cell ran, in order, without an error."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  counts = [cell.execution_count for cell in code]
  assert None not in counts, (
      f"{path.name}: code cells {[i for i, c in enumerate(counts) if c is None]} were not "
      "run; store the notebook with the outputs of a top-to-bottom run"
  )
  assert counts == sorted(counts) and len(set(counts)) == len(counts), (
      f"{path.name}: execution counts {counts} are not one top-to-bottom run"
  )
  for index, cell in enumerate(code):
    errors = [o for o in cell.outputs if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: code cell {index} has a stored error: {errors[0]}"
    if index > 0:
      for line in cell.source.splitlines():
        assert not line.lstrip().startswith(("%pip", "!pip")), (
            f"{path.name}: code cell {index} installs packages: {line!r} (only the first "
            "cell may, in Colab)"
        )
    assert not _FORCED_PLATFORM.search(cell.source), (
        f"{path.name}: code cell {index} forces a JAX platform; JAX uses a GPU when the "
        "runtime has one"
    )
