"""Scanned (stacked) layers: every per-layer technique, per slice, against the unrolled model.

A small transformer is written twice with the same weights (``tests/_scanned_models.py``):
unrolled, ``params/blocks_0 … blocks_3``, and scanned, ``params/blocks/...`` with a leading
layer axis (linen ``nn.scan``; the nnx model, ``nnx.vmap`` + ``nnx.scan``, holds the same
weights). What ``stacked=`` does to the scanned model must be what the per-layer rules do
to the unrolled one, and both must match closed forms computed in numpy.
"""

from __future__ import annotations

import _scanned_models as models
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gradtx

L = models.LAYERS
DECAY = 0.7
UNROLLED_DEPTHS = {r"params/embed/.*": 0, r"params/blocks_(\d+)/.*": 1,
                   r"params/(?:ln_f|head)/.*": L + 1}
SCANNED_DEPTHS = {r"params/embed/.*": 0, r"params/blocks/.*": 1,
                  r"params/(?:ln_f|head)/.*": L + 1}
STACKED = {r"params/blocks/.*": 0}


@pytest.fixture(scope="module")
def weights():
  unrolled = models.unrolled_params()
  return unrolled, models.scanned_params(unrolled)


def _loss(model):
  def loss(params, tokens):
    logits = model.apply(params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  return loss


UNROLLED_LOSS = _loss(models.UnrolledLM())
SCANNED_LOSS = _loss(models.ScannedLM())


_GRAD = {UNROLLED_LOSS: jax.jit(jax.grad(UNROLLED_LOSS)),
         SCANNED_LOSS: jax.jit(jax.grad(SCANNED_LOSS))}


def _grads(params, loss, seed=0):
  return _GRAD[loss](params, models.tokens(seed))


@pytest.fixture(scope="module")
def scanned_grads(weights):
  """The scanned model's gradient on the first batch (computed once per module)."""
  return _grads(weights[1], SCANNED_LOSS)


def test_the_model_pair_computes_the_same_function_and_gradients(weights, scanned_grads):
  unrolled, scanned = weights
  x = models.tokens()
  ref = models.UnrolledLM().apply(unrolled, x)
  chex.assert_trees_all_close(models.ScannedLM().apply(scanned, x), ref, atol=1e-5)
  chex.assert_trees_all_close(models.nnx_model(scanned)(x), ref, atol=1e-5)
  chex.assert_trees_all_close(models.unrolled_like(scanned_grads),
                              _grads(unrolled, UNROLLED_LOSS), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------- layer-wise lr decay


def _llrd(stacked):
  depths = SCANNED_DEPTHS if stacked else UNROLLED_DEPTHS
  return gradtx.layerwise_lr_decay(DECAY, num_layers=L, depth_rules=depths,
                                   stacked=STACKED if stacked else None)


def test_llrd_stacked_updates_equal_the_unrolled_ones_and_the_closed_form(weights,
                                                                         scanned_grads):
  unrolled, scanned = weights
  grads = scanned_grads
  tx = _llrd(stacked=True)
  updates, _ = tx.update(grads, tx.init(scanned))
  ref_tx = _llrd(stacked=False)
  ref, _ = ref_tx.update(models.unrolled_like(grads), ref_tx.init(unrolled))
  chex.assert_trees_all_close(models.unrolled_like(updates), ref, rtol=1e-6, atol=0)
  # Closed form: slice i of every block weight is scaled by DECAY ** (L - i).
  for path, g, u in zip(gradtx.tree_paths(grads), jax.tree.leaves(grads),
                        jax.tree.leaves(updates), strict=True):
    if path.startswith("params/blocks/"):
      want = np.asarray(g, np.float64) * (DECAY ** (L - np.arange(L))).reshape(
          (L,) + (1,) * (g.ndim - 1))
    else:
      want = np.asarray(g, np.float64) * DECAY ** (L + 1 if "embed" in path else 0)
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=path)


def _adam_trajectory(tx_tail, params, loss, steps=20):
  tx = optax.chain(optax.scale_by_adam(), tx_tail, optax.scale(-1e-2))

  @jax.jit
  def run(params, grads_fn_seed):
    def step(carry, seed):
      p, state = carry
      updates, state = tx.update(jax.grad(loss)(p, seed), state, p)
      return (optax.apply_updates(p, updates), state), None
    return jax.lax.scan(step, (params, tx.init(params)), grads_fn_seed)[0][0]

  return run(params, jnp.stack([models.tokens(s) for s in range(steps)]))


def test_llrd_stacked_20_adam_steps_follow_the_unrolled_trajectory(weights):
  """The same 20 Adam steps (rtol 1e-6); both runs take the gradient on the unrolled model,
  so the comparison sees only the transformation (the models' float rounding differs)."""
  unrolled, scanned = weights

  def scanned_loss(params, tokens):  # the unrolled model's loss of the scanned params
    return UNROLLED_LOSS(models.unrolled_like(params), tokens)

  got = _adam_trajectory(_llrd(stacked=True), scanned, scanned_loss)
  want = _adam_trajectory(_llrd(stacked=False), unrolled, UNROLLED_LOSS)
  chex.assert_trees_all_close(models.unrolled_like(got), want, rtol=1e-6, atol=1e-7)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), want, unrolled)
  assert min(jax.tree.leaves(moved)) > 1e-3  # every leaf trained


def test_llrd_stacked_on_the_nnx_state_equals_the_unrolled_rules(weights):
  unrolled, scanned = weights
  model = models.nnx_model(scanned)
  state = nnx.state(model, nnx.Param)
  tokens = models.tokens()

  def loss(m):
    logits = m(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  grads = nnx.grad(loss)(model)  # an nnx.State: paths blocks/query/kernel, ...
  tx = gradtx.layerwise_lr_decay(
      DECAY, num_layers=L, stacked={r"blocks/.*": 0},
      depth_rules={r"embed/.*": 0, r"blocks/.*": 1, r"(?:ln_f|head)/.*": L + 1})
  updates, _ = tx.update(grads, tx.init(state))
  ref_tx = _llrd(stacked=False)
  ref_grads = _grads(unrolled, UNROLLED_LOSS)
  ref, _ = ref_tx.update(ref_grads, ref_tx.init(unrolled))
  by_path = dict(zip(gradtx.tree_paths(ref), jax.tree.leaves(ref), strict=True))
  for path, u in zip(gradtx.tree_paths(updates), jax.tree.leaves(updates), strict=True):
    if path.startswith("blocks/"):
      want = np.stack([by_path[f"params/blocks_{i}/{path[7:]}"] for i in range(L)])
    else:
      want = by_path["params/" + path]
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-4, atol=1e-6, err_msg=path)


def test_layer_depths_gives_one_depth_per_slice(weights):
  _, scanned = weights
  depths = gradtx.layer_depths(scanned, num_layers=L, depth_rules=SCANNED_DEPTHS,
                               stacked=STACKED)
  assert depths["params"]["blocks"]["query"]["kernel"].tolist() == [1, 2, 3, 4]
  assert depths["params"]["embed"]["embedding"] == 0
  assert depths["params"]["head"]["kernel"] == L + 1


def test_llrd_stack_on_axis_1_and_negative_axis():
  g = {"blocks": jnp.ones((2, 3, 4)), "head": jnp.ones(2)}
  for axis in (1, -2):
    tx = gradtx.layerwise_lr_decay(0.5, num_layers=3, depth_rules={"blocks": 1, "head": 4},
                                   stacked={"blocks": axis})
    u, _ = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(np.asarray(u["blocks"][0, :, 0]), [0.125, 0.25, 0.5])


# ------------------------------------------------------------------------ scale_by_path


@pytest.mark.parametrize("form", ["array", "per_slice", "per_slice-schedule"])
def test_scale_by_path_per_slice_multipliers_equal_unrolled_rules(weights, scanned_grads,
                                                                  form):
  unrolled, scanned = weights
  values = [0.1, 0.2, 0.4, 0.8]
  multiplier = {"array": jnp.asarray(values),
                "per_slice": gradtx.per_slice(lambda i: values[i]),
                "per_slice-schedule": gradtx.per_slice(
                    lambda i: optax.constant_schedule(values[i]))}[form]
  tx = gradtx.scale_by_path({r"params/blocks/.*": multiplier, "params/head/.*": 3.0},
                            stacked=STACKED)
  ref_tx = gradtx.scale_by_path({**{f"params/blocks_{i}/.*": v for i, v in enumerate(values)},
                                 "params/head/.*": 3.0})
  grads = scanned_grads
  updates, _ = jax.jit(tx.update)(grads, tx.init(scanned))
  ref, _ = ref_tx.update(models.unrolled_like(grads), ref_tx.init(unrolled))
  chex.assert_trees_all_close(models.unrolled_like(updates), ref, rtol=1e-6, atol=0)


def test_scale_by_path_number_applies_to_every_slice():
  g = {"blocks": jnp.ones((3, 2))}
  tx = gradtx.scale_by_path({"blocks": 2.0}, stacked={"blocks": 0})
  np.testing.assert_array_equal(np.asarray(tx.update(g, tx.init(g))[0]["blocks"]),
                                np.full((3, 2), 2.0))


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("mode", ["hard", pytest.param("soft", marks=pytest.mark.slow)])
def test_clip_by_leaf_norm_per_slice_equals_per_leaf_clipping_unrolled(weights, scanned_grads,
                                                                      mode):
  unrolled, scanned = weights
  grads = jax.tree.map(lambda g: 50.0 * g, scanned_grads)
  gamma = 0.05
  tx = gradtx.clip_by_leaf_norm(gamma, mode=mode, stacked=STACKED)
  updates, state = jax.jit(tx.update)(grads, tx.init(scanned))
  ref_tx = gradtx.clip_by_leaf_norm(gamma, mode=mode)
  ref, ref_state = ref_tx.update(models.unrolled_like(grads), ref_tx.init(unrolled))
  chex.assert_trees_all_close(models.unrolled_like(updates), ref, rtol=1e-6, atol=1e-9)
  # The state's per-leaf trees hold one norm and one scale per slice.
  assert state.grad_norm["params"]["blocks"]["mlp_in"]["kernel"].shape == (L,)
  for field in ("grad_norm", "clip_scale"):
    chex.assert_trees_all_close(models.unrolled_like(getattr(state, field)),
                                getattr(ref_state, field), rtol=1e-6)
  # numpy float64 reference for one stacked leaf.
  g = np.asarray(grads["params"]["blocks"]["mlp_in"]["kernel"], np.float64)
  norms = np.sqrt((g ** 2).sum(axis=(1, 2)))
  scale = np.minimum(1, gamma / norms) if mode == "hard" else gamma / (norms + gamma)
  np.testing.assert_allclose(np.asarray(updates["params"]["blocks"]["mlp_in"]["kernel"]),
                             g * scale[:, None, None], rtol=1e-5)
  assert (scale < 1).any() and (scale > 0).all()


def test_clip_per_slice_norms_survive_overflow_and_underflow():
  """One slice whose squares overflow float32, one whose squares underflow, one ordinary."""
  x = np.stack([np.full((3, 4), 1e20), np.full((3, 4), 1e-25), np.full((3, 4), 0.5)])
  tx = gradtx.clip_by_leaf_norm(1.0, stacked={"w": 0})
  g = {"w": jnp.asarray(x, jnp.float32)}
  updates, state = jax.jit(tx.update)(g, tx.init(g))
  norms = np.sqrt((x.astype(np.float64) ** 2).sum(axis=(1, 2)))
  np.testing.assert_allclose(np.asarray(state.grad_norm["w"]), norms, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["w"]),
                             x * np.minimum(1, 1 / norms)[:, None, None], rtol=1e-6)


def test_clip_per_slice_nan_marks_only_its_slice():
  g = {"w": jnp.array([[3.0, 4.0], [jnp.nan, 1.0]])}
  tx = gradtx.clip_by_leaf_norm(1.0, stacked={"w": 0})
  updates, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(np.asarray(updates["w"][0]), [0.6, 0.8], rtol=1e-6)
  assert np.isnan(np.asarray(updates["w"][1])).all()


def test_clip_stacked_on_vmap_initialised_params():
  """``jax.vmap(model.init)``: every leaf is stacked, so ``stacked={".*": 0}``."""
  from flax import linen as nn
  params = jax.vmap(lambda k: nn.Dense(3).init(k, jnp.ones(2)))(
      jax.random.split(jax.random.key(0), 4))
  tx = gradtx.clip_by_leaf_norm(0.1, stacked={".*": 0})
  updates, state = tx.update(params, tx.init(params))
  for member in range(4):
    one = jax.tree.map(lambda x, m=member: x[m], params)
    ref_tx = gradtx.clip_by_leaf_norm(0.1)
    ref, _ = ref_tx.update(one, ref_tx.init(one))
    chex.assert_trees_all_close(jax.tree.map(lambda x, m=member: x[m], updates), ref,
                                rtol=1e-6)
  assert state.clip_scale["params"]["kernel"].shape == (4,)


# --------------------------------------------------------------------------- ChildTuning


def test_fisher_mask_per_slice_equals_the_unrolled_per_leaf_mask(weights, scanned_grads):
  unrolled, _ = weights
  fisher = jax.tree.map(jnp.square, scanned_grads)
  mask = gradtx.fisher_mask(fisher, 0.3, scope="per_leaf", stacked=STACKED,
                            include=[r"params/blocks/.*"])
  ref = gradtx.fisher_mask(models.unrolled_like(fisher), 0.3, scope="per_leaf",
                           include=[r"params/blocks_\d+/.*"])
  chex.assert_trees_all_equal(models.unrolled_like(mask), ref)
  # numpy: each slice keeps its own top 30 % (a single percentile over the stack would not).
  f = np.asarray(fisher["params"]["blocks"]["mlp_in"]["kernel"], np.float64)
  m = np.asarray(mask["params"]["blocks"]["mlp_in"]["kernel"])
  for i in range(L):
    np.testing.assert_array_equal(m[i], f[i] >= np.percentile(f[i], 70))
  pooled = f >= np.percentile(f, 70)
  assert not np.array_equal(m, pooled)


def test_child_tuning_f_masks_are_independent_across_slices():
  """A stacked leaf's slices get independent Bernoulli(p) masks: densities near p, and the
  correlation of two slices' masks near 0 (|r| < 5/sqrt(n))."""
  g = {"blocks": jnp.ones((4, 64, 64))}
  for prng in ("hash", "jax"):
    tx = gradtx.child_tuning_f(0.5, key=jax.random.key(3), rescale=False, prng=prng)
    masks = np.asarray(tx.update(g, tx.init(g))[0]["blocks"]).reshape(4, -1)
    n = masks.shape[1]
    np.testing.assert_allclose(masks.mean(1), 0.5, atol=5 * 0.5 / np.sqrt(n))
    corr = np.corrcoef(masks)[np.triu_indices(4, 1)]
    assert np.abs(corr).max() < 5 / np.sqrt(n), (prng, corr)


# ---------------------------------------------------------------------- the benchmark


@pytest.mark.slow  # the same claim runs in CI as the 20-step trajectory test above
def test_benchmark_layouts_train_the_same():
  """``benchmarks/scanned_layers.py``'s claim that its two layouts are one model trained
  the same way: equal losses, and equal params after 2 steps of its chains (tiny sizes)."""
  import importlib.util
  import pathlib
  import sys

  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "scanned_layers.py"
  sys.path.insert(0, str(path.parent))
  try:
    spec = importlib.util.spec_from_file_location("scanned_layers_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
  finally:
    sys.path.remove(str(path.parent))
  layers = 2
  unrolled = bench.init(np.random.default_rng(0), layers, 8, 16)
  scanned = bench.stack(unrolled, layers)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 16, (2, 6)), jnp.int32)
  np.testing.assert_allclose(bench.loss(scanned, tokens, layers),
                             bench.loss(unrolled, tokens, layers), rtol=1e-6)
  txs = bench.transforms(layers)
  out = {}
  for name in ("scanned + stacked=", "unrolled + rules"):
    is_scanned, tx = txs[name]
    p = scanned if is_scanned else unrolled
    state, step = tx.init(p), jax.jit(bench.make_step(tx, layers))
    for _ in range(2):
      p, state = step(p, state, tokens)
    out[name] = p
  chex.assert_trees_all_close(out["scanned + stacked="],
                              bench.stack(out["unrolled + rules"], layers), rtol=1e-5,
                              atol=1e-6)
