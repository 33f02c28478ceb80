"""The release: one version, a wheel that installs and runs on its own, release metadata.

``test_wheel_installs_and_runs_in_a_fresh_venv`` does what a user's ``pip install`` does,
without the network: it copies the checkout (so the build leaves nothing in it), builds
the sdist and the wheel with ``python -m build --no-isolation`` (the installed setuptools;
``[dev]`` brings ``build``, ``twine`` and ``setuptools>=77``), checks them with
``twine check`` and reads the wheel's file list, then installs the wheel into a fresh
virtual environment that reuses this interpreter's packages (``--system-site-packages``,
``pip install --no-deps --no-index``), and from outside the checkout imports gradtx
(asserting it is the venv's copy), runs the README's example and
``python -m gradtx.tour --help``.
"""

from __future__ import annotations

import email
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import gradtx

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# What the checkout holds besides the package: none of it may reach the wheel.
NOT_IN_WHEEL = ("tests/", "benchmarks/", "colabs/", "docs/", ".ci/")


def _run(command: list[str], *, cwd: pathlib.Path, env: dict | None = None,
         timeout: int = 600) -> str:
  proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)
  if proc.returncode != 0:
    pytest.fail(f"{' '.join(command)} failed (rc={proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", pytrace=False)
  return proc.stdout


def test_version_is_single_sourced() -> None:
  import importlib.metadata

  assert importlib.metadata.version("gradtx") == VERSION, (
      "the installed metadata is stale: reinstall (pip install -e .)")
  assert gradtx.__version__ == VERSION
  init = (ROOT / "gradtx" / "__init__.py").read_text()
  assert not re.search(r"__version__\s*=\s*[\"']\d+\.", init), (
      "gradtx/__init__.py hard-codes a version")
  citation = (ROOT / "CITATION.cff").read_text()
  assert re.search(rf"^version: {re.escape(VERSION)}$", citation, flags=re.M)
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert "## [Unreleased]" in changelog
  assert re.search(rf"^## \[{re.escape(VERSION)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog,
                   flags=re.M), f"CHANGELOG.md has no dated section for {VERSION}"


def test_pyproject_metadata() -> None:
  project = PYPROJECT["project"]
  assert project["requires-python"] == ">=3.11"
  assert "Typing :: Typed" in project["classifiers"]
  assert "urls" not in project, "there is no public repository yet: no invented URLs"
  for requirement in project["dependencies"]:
    assert ">=" in requirement, f"{requirement}: every dependency has a tested lower bound"
  assert (ROOT / "gradtx" / "py.typed").exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """``dist/`` with the sdist and the wheel, built from a copy of the checkout."""
  src = tmp_path_factory.mktemp("src") / "gradtx"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".git", "_build", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
      ".ruff_cache", ".mypy_cache", ".hypothesis", "tour_report", "results"))
  _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", "dist", "."], cwd=src)
  return src / "dist"


def test_sdist_and_wheel_pass_twine_check(built: pathlib.Path) -> None:
  files = sorted(built.iterdir())
  names = [f.name for f in files]
  assert f"gradtx-{VERSION}.tar.gz" in names
  assert f"gradtx-{VERSION}-py3-none-any.whl" in names
  out = _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
             cwd=built)
  assert out.count("PASSED") == 2, out


def test_wheel_holds_the_package_and_nothing_else(built: pathlib.Path) -> None:
  wheel = built / f"gradtx-{VERSION}-py3-none-any.whl"
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    metadata = email.message_from_bytes(
        archive.read(f"gradtx-{VERSION}.dist-info/METADATA"))
  assert "gradtx/py.typed" in names
  assert "gradtx/tour/__main__.py" in names
  package = {n for n in names if not n.startswith(f"gradtx-{VERSION}.dist-info/")}
  checkout = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gradtx").rglob("*.py")}
  assert checkout <= package, f"modules missing from the wheel: {sorted(checkout - package)}"
  stray = [n for n in package if not n.startswith("gradtx/")
           or n.startswith(tuple(f"gradtx/{d}" for d in NOT_IN_WHEEL))]
  assert not stray, f"the wheel holds files outside the package: {stray}"
  assert metadata["Requires-Python"] == ">=3.11"
  assert metadata["License-Expression"] == "Apache-2.0"
  assert metadata["Version"] == VERSION


def test_wheel_installs_and_runs_in_a_fresh_venv(built: pathlib.Path,
                                                 tmp_path: pathlib.Path) -> None:
  venv = tmp_path / "venv"
  # No pip inside the venv (ensurepip is slow): this interpreter's pip installs into it.
  _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
       cwd=tmp_path)
  python = venv / "bin" / "python"
  wheel = built / f"gradtx-{VERSION}-py3-none-any.whl"
  _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
        "--no-index", "--quiet", str(wheel)], cwd=tmp_path)
  # Outside the checkout, with nothing of it on the path: only the venv's copy can load.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  readme = (ROOT / "README.md").read_text()
  example = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
  (tmp_path / "example.py").write_text(
      "import gradtx\nprint(gradtx.__file__)\nprint(gradtx.__version__)\n" + example)
  printed = _run([str(python), "example.py"], cwd=tmp_path, env=env).splitlines()
  assert pathlib.Path(printed[0]).is_relative_to(venv), f"imported {printed[0]}, not the venv's"
  assert printed[1] == VERSION
  assert "params/layers_0/kernel" in printed[2]  # the README example ran to its end
  assert float(printed[3]) > 0
  usage = _run([str(python), "-m", "gradtx.tour", "--help"], cwd=tmp_path, env=env)
  assert "usage:" in usage and "--quick" in usage
