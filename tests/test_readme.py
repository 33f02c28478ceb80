"""The README's example runs, its set-up commands are the ones CI uses, its links resolve.

The technique examples live on the documentation pages now; tests/test_docs.py runs them.
"""

import pathlib
import re

import gradtx

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_example_does_what_its_comments_say(capsys):
  import jax
  import numpy as np
  import optax

  namespace = {}
  exec(compile(BLOCKS[0], "README.md", "exec"), namespace)  # noqa: S102
  ns = namespace
  paths_line, norm_line = capsys.readouterr().out.strip().splitlines()
  expected_paths = [f"params/layers_{i}/{w}" for i in (0, 2, 4) for w in ("bias", "kernel")]
  assert paths_line == str(expected_paths)

  # Independent reference: the same model's loss and gradient at the initial params.
  initial = ns["model"].init(jax.random.key(0), ns["x"])
  def loss_fn(p):
    logits = ns["model"].apply(p, ns["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ns["y"]).mean()
  loss, grads = jax.value_and_grad(loss_fn)(initial)
  np.testing.assert_allclose(float(ns["loss"]), float(loss), rtol=1e-6)
  g = {k: np.asarray(v, np.float64) for k, v in zip(
      gradtx.tree_paths(grads), jax.tree.leaves(grads), strict=True)}
  norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
  np.testing.assert_allclose(float(norm_line), norm, rtol=1e-5)  # the pre-clip global norm

  # Adam's first step is g_c / (|g_c| + eps) whatever the soft-clip scale c; the layer-wise
  # decay multiplies it by 0.8 ** (2 - depth): 0.64, 0.8, 1 for layers 0, 2, 4.
  new = dict(zip(gradtx.tree_paths(ns["params"]), jax.tree.leaves(ns["params"]), strict=True))
  old = dict(zip(gradtx.tree_paths(initial), jax.tree.leaves(initial), strict=True))
  scale = 1.0 / (norm + 1.0)  # soft clipping: γ / (‖g‖ + γ) with γ = 1
  for path, grad in g.items():
    depth = {"layers_0": 0, "layers_2": 1, "layers_4": 2}[path.split("/")[1]]
    step = -1e-3 * 0.8 ** (2 - depth) * (scale * grad) / (np.abs(scale * grad) + 1e-8)
    np.testing.assert_allclose(np.asarray(new[path], np.float64) - np.asarray(old[path]),
                               step, rtol=2e-3, atol=1e-7, err_msg=path)


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
  commands = re.findall(r"^pip install -e .*$", README, flags=re.M)
  assert commands == [
      'pip install -e ".[examples]" && python -m gradtx.tour',
      'pip install -e ".[dev]" && pytest -x -q',
  ]
  assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_links_resolve():
  links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
  local = [link for link in links if "://" not in link]
  assert local, "the README links to no documentation page"
  missing = [link for link in local if not (ROOT / link).exists()]
  assert not missing, f"README links to missing files: {missing}"
