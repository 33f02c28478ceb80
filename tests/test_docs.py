"""The documentation site (``docs/``): it builds, documents every public name, and its examples run.

- ``sphinx-build -W`` (warnings are errors) builds the site once per run, in a subprocess
  into a temporary directory; the notebooks are rendered with their stored outputs
  (``tests/test_colabs.py`` executes them and checks that the stored outputs are a clean
  run), so the build takes seconds, not minutes.
- Every name in ``gradtx.__all__`` has an API page; every state ``NamedTuple`` lists its
  fields; every notebook of ``colabs/`` and every benchmark figure a page shows is in the
  built site.
- Every fenced ``python`` block of every page runs (a page shows code that must not run,
  such as another library's API, as a ``{code-block} python`` directive instead). The
  technique examples are checked against independent references below; the home page's
  example is the README's, which ``tests/test_readme.py`` checks.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import gradtx

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)
TECHNIQUE_PAGES = ("layerwise", "clipping", "contrastive", "attribution", "child_tuning",
                   "exponentiated_and_step_sizes", "gradient_descent_and_em", "zeroth_order",
                   "siglip_and_ring", "attribution_family", "step_sizes_and_curvature",
                   "multihost", "zeroth_order_lm", "scanned_layers")
GUIDES = ("captum", "gradcache", "evosax", "optax_clipping", "child_tuning_adamw")
# (page, block index) whose examples a test below checks against a reference; the rest run
# in test_page_example_runs.
CHECKED = {("index.md", 0), ("techniques/contrastive.md", 0), ("techniques/attribution.md", 0),
           ("techniques/child_tuning.md", 0), ("techniques/gradient_descent_and_em.md", 0),
           ("techniques/zeroth_order.md", 0), ("guides/optax_clipping.md", 0)}


def _page(name: str) -> str:
  return (DOCS / name).read_text()


def _pages() -> list[str]:
  return sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")
                if not {"_build", "tutorials"} & set(p.relative_to(DOCS).parts))


def _blocks(name: str) -> list[str]:
  return _BLOCK.findall(_page(name))


def _run(name: str, index: int, namespace: dict) -> None:
  exec(compile(_blocks(name)[index], f"docs/{name}", "exec"), namespace)  # noqa: S102


EXAMPLES = [(name, i) for name in _pages() for i in range(len(_blocks(name)))
            if (name, i) not in CHECKED]


# ---------------------------------------------------------------------------- the build


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """Builds the site once (``sphinx-build -W``); the path of its HTML."""
  out = tmp_path_factory.mktemp("site")
  command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
             "-d", str(out / "doctrees"), str(DOCS), str(out / "html")]
  proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900,
                        env=dict(os.environ, PYTHONWARNINGS="ignore::DeprecationWarning"))
  if proc.returncode != 0:
    pytest.fail(f"sphinx-build -W failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-6000:]}", pytrace=False)
  return out / "html"


def test_every_public_name_has_an_api_page(site: pathlib.Path) -> None:
  api = (site / "api.html").read_text()
  missing = [name for name in gradtx.__all__
             if not (site / "_autosummary" / f"gradtx.{name}.html").exists()
             or f"_autosummary/gradtx.{name}.html" not in api]
  assert not missing, f"public names without an API page: {missing}"


def test_api_pages_render_docstrings_and_maths(site: pathlib.Path) -> None:
  page = (site / "_autosummary" / "gradtx.integrated_gradients.html").read_text()
  assert "Parameters" in page and "Returns" in page  # napoleon read the Google sections
  assert 'class="math' in page and "mathjax" in page.lower()  # the .. math:: block
  assert "Example" in page and "References" in page


def test_every_state_lists_its_fields(site: pathlib.Path) -> None:
  states = [name for name in gradtx.__all__
            if inspect.isclass(getattr(gradtx, name)) and hasattr(getattr(gradtx, name),
                                                                   "_fields")]
  assert states, "no state NamedTuple found in gradtx.__all__"
  for name in states:
    page = (site / "_autosummary" / f"gradtx.{name}.html").read_text()
    fields = getattr(gradtx, name)._fields
    missing = [f for f in fields if f not in page]
    assert not missing, f"{name}: fields {missing} are not documented on its page"


def test_every_notebook_is_rendered_with_its_figures(site: pathlib.Path) -> None:
  import nbformat

  for path in sorted((ROOT / "colabs").glob("*.ipynb")):
    html = site / "tutorials" / f"{path.stem}.html"
    assert html.exists(), f"{path.name} is not in the site"
    nb = nbformat.read(path, as_version=4)
    has_figures = any("image/png" in output.get("data", {})
                      for cell in nb.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    if has_figures:
      assert "<img" in html.read_text(), f"{path.name}: its stored figures are not shown"


def test_technique_pages_guides_and_figures_are_built(site: pathlib.Path) -> None:
  for name in [f"techniques/{p}" for p in TECHNIQUE_PAGES] + [f"guides/{g}" for g in GUIDES]:
    html = (site / f"{name}.html").read_text()
    assert "Traceback" not in html, name
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", _page(f"{name}.md")):
      built = site / "_images" / pathlib.Path(image).name
      assert built.exists(), f"{name}: figure {image} is missing from the site"
  index = (site / "index.html").read_text()
  for name in ("design", "changelog", "api"):
    assert f'href="{name}.html"' in index, f"{name} is not linked from the home page"


# ---------------------------------------------------------------------------- the examples


def test_home_page_example_is_the_readme_one() -> None:
  readme = _BLOCK.findall((ROOT / "README.md").read_text())
  assert _blocks("index.md")[0] == readme[0], (
      "docs/index.md's example differs from the README's first example (tested there)")


@pytest.mark.parametrize("name,index", EXAMPLES, ids=[f"{n}:{i}" for n, i in EXAMPLES])
def test_page_example_runs(name: str, index: int) -> None:
  _run(name, index, {})


def test_optax_clipping_guide_shows_what_it_fixes(capsys: pytest.CaptureFixture) -> None:
  _run("guides/optax_clipping.md", 0, {})
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[:2] == ["[nan nan nan]", "[1. 1. 1.]"]  # optax's, gradtx's derivative at 0
  assert lines[2] == "[0. 0.]"  # optax: the overflowing norm zeroes the step
  np.testing.assert_allclose(np.array(lines[3].strip("[]").split(), float), [0.5 ** 0.5] * 2,
                             rtol=1e-6)  # gradtx: the clipped gradient has norm 1
def test_contrastive_example_is_the_full_batch_gradient():
  import jax

  namespace = {}
  _run("techniques/contrastive.md", 0, namespace)
  ns = namespace
  # The reference: plain autodiff over the concatenated chunks, same per-chunk keys.
  def reference(params):
    chunks = [ns["batch"][i:i + 128] for i in range(0, 1000, 128)]
    reps = [ns["encode_fn"](params, c, jax.random.fold_in(jax.random.key(2), i))
            for i, c in enumerate(chunks)]
    return ns["loss_fn"](params, jax.numpy.concatenate(reps))

  ref_loss, ref_grads = jax.value_and_grad(reference)(ns["params"])
  assert abs(float(ns["loss"]) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
  for key in ("w", "log_tau"):
    scale = float(abs(ref_grads[key]).max())
    assert float(abs(ns["grads"][key] - ref_grads[key]).max()) < 1e-5 * scale


def test_attribution_example_is_complete():
  import jax.numpy as jnp

  namespace = {}
  _run("techniques/attribution.md", 0, namespace)
  ns = namespace
  assert ns["scores"].shape == (8, 12)
  # Completeness against the model itself: Σ token scores = F(x)[1] - F(padding)[1].
  gap = ns["fn"](ns["ids"])[:, 1] - ns["fn"](jnp.zeros_like(ns["ids"]))[:, 1]
  assert float(jnp.max(jnp.abs(ns["scores"].sum(1) - gap))) < 1e-4
  assert float(jnp.max(jnp.abs(ns["delta"]))) < 1e-4
  x = ns["x"]
  gap = ns["mlp"](x)[:, 0] - ns["mlp"](jnp.zeros_like(x))[:, 0]
  assert float(jnp.max(jnp.abs(ns["attr"].sum(1) - gap))) < 1e-4


def test_child_tuning_example_keeps_the_top_fisher_coordinates():
  import numpy as np

  namespace = {}
  _run("techniques/child_tuning.md", 0, namespace)
  ns = namespace
  assert bool(np.all(np.asarray(ns["mask"]["head"])))
  # The encoder's kept fraction is 30% of the included values (ties aside), globally.
  encoder = np.concatenate([np.asarray(ns["fisher"]["encoder"][k]).ravel()
                            for k in ("layer_0", "layer_1")])
  kept = np.concatenate([np.asarray(ns["mask"]["encoder"][k]).ravel()
                         for k in ("layer_0", "layer_1")])
  np.testing.assert_array_equal(kept, encoder >= np.percentile(encoder, 70.0))
  assert float(ns["state"][0].mask_density) > 0.3  # the head trains freely


def test_diag_newton_example_is_lloyds_step():
  import numpy as np

  namespace = {}
  _run("techniques/gradient_descent_and_em.md", 0, namespace)
  x = np.asarray(namespace["x"], np.float64)
  centroids = x[:3]
  labels = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), 1)
  lloyd = np.stack([x[labels == j].mean(0) for j in range(3)])
  np.testing.assert_allclose(np.asarray(namespace["params"]["c"]), lloyd, rtol=1e-5, atol=1e-6)


def test_es_example_raises_a_non_differentiable_accuracy():
  import jax.numpy as jnp

  namespace = {}
  _run("techniques/zeroth_order.md", 0, namespace)
  ns = namespace
  start = float(ns["accuracy"]({"w": jnp.zeros((8, 2))}))
  assert float(ns["accuracy"](ns["params"])) > max(0.9, start + 0.3)


def test_train_state_pattern_passes_loss_fn():
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax.training import train_state

  snippet = re.search(r"two lines in the train step:\n\n```\n(.*?)```",
                      _page("techniques/zeroth_order.md"), flags=re.S)
  assert snippet, "the TrainState pattern is missing from techniques/zeroth_order.md"
  code = snippet.group(1)
  # A diagonal quadratic: one undamped diagonal-Newton step lands on its minimum, 0.
  curvature = jnp.array([1.0, 4.0, 9.0])
  loss_fn = lambda p: 0.5 * jnp.sum(curvature * p["w"] ** 2)
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  state = train_state.TrainState.create(
      apply_fn=None, params=params,
      tx=gradtx.diag_newton(1.0, damping=0.0, key=jax.random.key(0)))
  namespace = {"state": state, "grads": jax.grad(loss_fn)(params), "loss_fn": loss_fn,
               "optax": optax}
  exec(compile(code, "techniques/zeroth_order.md", "exec"), namespace)  # noqa: S102
  np.testing.assert_allclose(np.asarray(namespace["state"].params["w"]), 0.0, atol=1e-6)
  assert int(namespace["state"].step) == 1
