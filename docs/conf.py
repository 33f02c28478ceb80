"""Sphinx configuration of the gradtx documentation site.

Build: ``pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html``.

Two pages are generated here at every build, so nothing can go stale:

- ``api.rst``: one autosummary entry for every name in ``gradtx.__all__``, grouped by the
  module that defines it (a new export appears by itself; tests/test_docs.py fails if a
  public name has no page).
- ``tutorials/*.ipynb``: copies of the notebooks in ``colabs/``, rendered by myst-nb with
  the outputs stored in them (they are not executed here: tests/test_colabs.py executes
  every notebook, and checks that each is stored with the outputs of a clean run).
"""

from __future__ import annotations

import inspect
import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the checkout's gradtx, installed or not

import gradtx  # noqa: E402

project = "gradtx"
author = "The gradtx authors"
copyright = "the gradtx authors"
release = gradtx.__version__
version = release

extensions = [
    "myst_nb",                      # markdown pages (MyST) and the notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",          # Google-style docstrings
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
html_static_path = ["_static"]
html_css_files = ["gradtx.css"]

html_theme = "sphinx_book_theme"
html_title = f"gradtx {release}"
html_theme_options = {
    "show_toc_level": 2,
    # The technique pages and guides are mostly wide tables: no right-hand page TOC there
    # (the page's sections stay in the left navigation), so the tables get the width.
    "secondary_sidebar_items": {"techniques/*": [], "guides/*": []},
    "home_page_in_toc": True,
    "use_download_button": True,
}

# MyST: $...$ and $$...$$ maths, ::: fences, heading anchors for cross-page links.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# The notebooks are rendered with their stored outputs (see the module docstring).
nb_execution_mode = "off"
nb_execution_raise_on_error = True
nb_merge_streams = True

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"       # types under Args, not a five-line signature
autodoc_typehints_description_target = "documented"  # not a NamedTuple's constructor
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True                # a state's "Attributes:" as a field list
napoleon_attr_annotations = False      # chex.Array would print as a four-type union

# The groups of the API page, in reading order: (section title, modules, blurb).
API_SECTIONS = (
    ("Paths and layer-wise rules", ("gradtx._paths", "gradtx.layerwise"),
     "Parameter paths, per-path multipliers, layer-wise learning-rate decay, "
     "per-path transformations."),
    ("Clipping", ("gradtx.clipping",),
     "Hard and soft clipping by global and per-leaf norm; AutoClip and ZClip thresholds."),
    ("Contrastive learning", ("gradtx.contrastive",),
     "Contrastive losses (dense and blockwise) and exact large-batch gradients."),
    ("Attribution", ("gradtx.attribution",),
     "Integrated Gradients, layer Integrated Gradients and expected gradients."),
    ("ChildTuning", ("gradtx.child_tuning",), "ChildTuning-F/D masks and Fisher information."),
    ("Exponentiated updates and step sizes", ("gradtx.exponentiated", "gradtx.step_size"),
     "Multiplicative updates and self-tuning step sizes."),
    ("Curvature", ("gradtx.curvature",), "Hutchinson's diagonal and diagonal Newton."),
    ("Estimators", ("gradtx.estimators",),
     "Zeroth-order and policy-gradient estimators of the gradient."),
)


def _section_of(name: str) -> str:
  """The API section of a public name: its defining module's group (else "Other")."""
  module = getattr(getattr(gradtx, name), "__module__", "") or ""
  for title, prefixes, _ in API_SECTIONS:
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return title
  return "Other"


def _is_state(name: str) -> bool:
  obj = getattr(gradtx, name)
  return inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def write_api_page() -> None:
  """Writes ``api.rst``: every name of ``gradtx.__all__``, grouped; states after factories."""
  groups: dict[str, list[str]] = {}
  for name in gradtx.__all__:
    groups.setdefault(_section_of(name), []).append(name)
  sections = [(t, b) for t, _, b in API_SECTIONS] + [("Other", "Everything else.")]
  lines = ["API reference", "=============", "",
           "Every public name of ``gradtx`` (``gradtx.__all__``), generated at each build. "
           "Import ``gradtx`` and use ``gradtx.<name>``.", "",
           ".. currentmodule:: gradtx", ""]
  for title, blurb in sections:
    names = groups.get(title)
    if not names:
      continue
    lines += [title, "-" * len(title), "", blurb, ""]
    for kind, members in (("Functions", [n for n in names if not _is_state(n)]),
                          ("States and result types", [n for n in names if _is_state(n)])):
      if members:
        lines += [f".. rubric:: {kind}", "", ".. autosummary::", "   :toctree: _autosummary",
                  "   :nosignatures:", ""] + [f"   {n}" for n in members] + [""]
  text = "\n".join(lines)
  path = DOCS / "api.rst"
  if not path.exists() or path.read_text() != text:  # keep mtimes: incremental builds
    path.write_text(text)


def copy_notebooks() -> None:
  """Copies ``colabs/*.ipynb`` to ``tutorials/`` (git-ignored), dropping stale copies."""
  target = DOCS / "tutorials"
  target.mkdir(exist_ok=True)
  sources = {p.name: p for p in sorted((ROOT / "colabs").glob("*.ipynb"))}
  for old in target.glob("*.ipynb"):
    if old.name not in sources:
      old.unlink()
  for name, source in sources.items():
    copy = target / name
    if not copy.exists() or copy.read_bytes() != source.read_bytes():
      shutil.copyfile(source, copy)


def _document_state_fields(app, what, name, obj, options, lines) -> None:
  """A state NamedTuple whose docstring has no Attributes section still lists its fields."""
  if what != "class" or not (inspect.isclass(obj) and hasattr(obj, "_fields")):
    return
  if obj._fields and not any(line.strip().startswith(":ivar") for line in lines):
    lines += ["", "A ``NamedTuple`` with the fields "
              + ", ".join(f"``{f}``" for f in obj._fields) + "."]
  elif not obj._fields:
    lines += ["", "A ``NamedTuple`` with no fields (the transformation keeps no state)."]


def setup(app):
  write_api_page()
  copy_notebooks()
  app.connect("autodoc-process-docstring", _document_state_fields)
