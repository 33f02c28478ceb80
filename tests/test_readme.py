"""The README's example runs, and its set-up commands are the ones CI uses."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_example_runs(capsys):
  namespace = {}
  exec(compile(BLOCKS[0], "README.md", "exec"), namespace)  # noqa: S102
  printed = capsys.readouterr().out
  assert "params/layers_0/kernel" in printed
  assert float(namespace["loss"]) > 0


def test_readme_contrastive_example_is_the_full_batch_gradient():
  import jax

  namespace = {}
  exec(compile(BLOCKS[1], "README.md", "exec"), namespace)  # noqa: S102
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


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
  commands = re.findall(r"^pip install -e .*$", README, flags=re.M)
  assert commands == [
      'pip install -e ".[examples]" && python -m gradtx.tour',
      'pip install -e ".[dev]" && pytest -x -q',
  ]
  assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_attribution_example_is_complete():
  import jax.numpy as jnp

  namespace = {}
  exec(compile(BLOCKS[2], "README.md", "exec"), namespace)  # noqa: S102
  ns = namespace
  assert ns["scores"].shape == (8, 12)
  # Completeness against the model itself: Σ token scores = F(x)[1] - F(padding)[1].
  gap = ns["fn"](ns["ids"])[:, 1] - ns["fn"](jnp.zeros_like(ns["ids"]))[:, 1]
  assert float(jnp.max(jnp.abs(ns["scores"].sum(1) - gap))) < 1e-4
  assert float(jnp.max(jnp.abs(ns["delta"]))) < 1e-4
  x = ns["x"]
  gap = ns["mlp"](x)[:, 0] - ns["mlp"](jnp.zeros_like(x))[:, 0]
  assert float(jnp.max(jnp.abs(ns["attr"].sum(1) - gap))) < 1e-4


def test_readme_child_tuning_example_keeps_the_top_fisher_coordinates():
  import numpy as np

  namespace = {}
  exec(compile(BLOCKS[3], "README.md", "exec"), namespace)  # noqa: S102
  ns = namespace
  assert bool(np.all(np.asarray(ns["mask"]["head"])))
  # The encoder's kept fraction is 30% of the included values (ties aside), globally.
  encoder = np.concatenate([np.asarray(ns["fisher"]["encoder"][k]).ravel()
                            for k in ("layer_0", "layer_1")])
  kept = np.concatenate([np.asarray(ns["mask"]["encoder"][k]).ravel()
                         for k in ("layer_0", "layer_1")])
  np.testing.assert_array_equal(kept, encoder >= np.percentile(encoder, 70.0))
  assert float(ns["state"][0].mask_density) > 0.3  # the head trains freely


def test_readme_diag_newton_example_is_lloyds_step():
  import numpy as np

  namespace = {}
  exec(compile(BLOCKS[4], "README.md", "exec"), namespace)  # noqa: S102
  x = np.asarray(namespace["x"], np.float64)
  centroids = x[:3]
  labels = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), 1)
  lloyd = np.stack([x[labels == j].mean(0) for j in range(3)])
  np.testing.assert_allclose(np.asarray(namespace["params"]["c"]), lloyd, rtol=1e-5, atol=1e-6)


def test_readme_es_example_raises_a_non_differentiable_accuracy():
  import jax.numpy as jnp

  namespace = {}
  exec(compile(BLOCKS[5], "README.md", "exec"), namespace)  # noqa: S102
  ns = namespace
  start = float(ns["accuracy"]({"w": jnp.zeros((8, 2))}))
  assert float(ns["accuracy"](ns["params"])) > max(0.9, start + 0.3)
