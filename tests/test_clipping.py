"""Tests of gradtx/clipping.py against independent references.

Every expected value comes from a numpy / plain-Python re-implementation written here
(global and per-leaf norms, hard and soft clipping, ``numpy.percentile`` for AutoClip,
ZClip as published in bluorion-com/ZClip) or from a closed form; the code under test
is never compared with itself.
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradtx

SHAPES = {"dense/kernel": (4, 3), "dense/bias": (3,), "head": (2, 2, 2), "scalar": ()}


# ----------------------------------------------------------------------------- references


def np_tree(tree):
  """The tree's leaves as float64 numpy arrays (exact for f32/bf16/f64 values)."""
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def np_norm(x):
  return math.sqrt(float(np.sum(np.square(np.asarray(x, np.float64)))))


def np_global_norm(tree):
  return math.sqrt(sum(np_norm(x) ** 2 for x in jax.tree.leaves(tree)))


def np_scale(norm, gamma, mode):
  """min(1, γ/n) (hard) or γ/(n + γ) (soft), with the 0-norm limit 1."""
  if mode == "hard":
    return 1.0 if norm <= gamma else gamma / norm
  return gamma / (norm + gamma)


def random_tree(rng, dtype=np.float32, scale=1.0, shapes=None):
  shapes = SHAPES if shapes is None else shapes
  return {k: jnp.asarray(scale * rng.standard_normal(s), dtype) for k, s in shapes.items()}


def tree_with_norm(rng, norm, shapes=None):
  """A random float32 tree whose global norm is ``norm`` (up to f32 rounding)."""
  tree = np_tree(random_tree(rng, shapes=shapes))
  factor = norm / np_global_norm(tree)
  return {k: jnp.asarray(v * factor, jnp.float32) for k, v in tree.items()}


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def all_nan(tree):
  return all(bool(np.all(np.isnan(np.asarray(x, np.float64)))) for x in jax.tree.leaves(tree))


@functools.partial(jax.jit, static_argnames="mode")
def global_clip(g, gamma, mode):
  """One step of clip_by_global_norm; γ is traced, so one compilation serves every γ."""
  tx = gradtx.clip_by_global_norm(gamma, mode=mode)
  return tx.update(g, tx.init(g))


def run_steps(tx, grads):
  """``tx`` over a gradient sequence in one jit-compiled ``lax.scan``.

  Returns the per-step updates and states, stacked along a leading step axis (numpy).
  """

  def body(state, g):
    u, state = tx.update(g, state)
    return state, (u, state)

  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
  run = jax.jit(lambda gs: jax.lax.scan(body, tx.init(grads[0]), gs)[1])
  return jax.tree.map(np.asarray, run(stacked))


def step_tree(stacked, step):
  return jax.tree.map(lambda x: x[step], stacked)


def grads_with_norms(rng, norms, leaf, index):
  """One random tree per global norm; for a non-finite norm, a tree of norm 1 holding that
  value at ``leaf[index]``."""
  grads = []
  for n in norms:
    g = tree_with_norm(rng, n if math.isfinite(n) else 1.0)
    if not math.isfinite(n):
      g[leaf] = g[leaf].at[index].set(n)
    grads.append(g)
  return grads


def assert_scaled_or_skipped(us, states, grads, step, scale, kept):
  """A finite gradient's update is ``scale * g``; a non-finite one's is all NaN, with a
  non-finite ``grad_norm`` and the state fields ``kept`` as the step before left them."""
  u, state = step_tree(us, step), step_tree(states, step)
  if math.isfinite(np_global_norm(grads[step])):
    expected_u = jax.tree.map(lambda x: x * scale, np_tree(grads[step]))
    chex.assert_trees_all_close(u, expected_u, rtol=1e-5)
    return
  before = step_tree(states, step - 1)
  assert all_nan(u)
  assert not math.isfinite(state.grad_norm)
  for field in kept:
    np.testing.assert_array_equal(getattr(state, field), getattr(before, field), err_msg=field)


# ----------------------------------------------------------------------- clip_by_global_norm


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_global_norm_clip_matches_numpy(mode, dtype):
  rng = np.random.default_rng(0)
  # Leaves of ~1000 entries: a norm accumulated in bf16 would miss the f32 tolerance.
  shapes = {**SHAPES, "big": (25, 40)}
  for trial in range(3):
    g = random_tree(rng, dtype, scale=10.0 ** (trial - 1), shapes=shapes)
    g_np = np_tree(g)
    norm = np_global_norm(g_np)
    for relative_gamma in (0.3, 2.5):  # clipped / not clipped (hard)
      gamma = relative_gamma * norm
      u, state = global_clip(g, gamma, mode)
      scale = np_scale(norm, gamma, mode)
      if mode == "hard":
        assert (scale < 1) == (relative_gamma < 1)  # both branches are exercised
      np.testing.assert_allclose(float(state.grad_norm), norm, rtol=2e-6)
      np.testing.assert_allclose(float(state.clip_scale), scale, rtol=2e-6)
      assert state.count == 1
      for k in g:
        assert u[k].dtype == g[k].dtype
      rtol = 2e-6 if dtype == jnp.float32 else 8e-3  # bf16 keeps 8 significant bits
      chex.assert_trees_all_close(u, jax.tree.map(lambda x, s=scale: x * s, g_np), rtol=rtol)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_global_norm_clip_float64(mode):
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    g = random_tree(rng, jnp.float64, scale=3.0)
    g_np = np_tree(g)
    norm = np_global_norm(g_np)
    u, state = global_clip(g, 0.5 * norm, mode)
    for k in g:
      assert u[k].dtype == jnp.float64
    scale = np_scale(norm, 0.5 * norm, mode)
    np.testing.assert_allclose(float(state.grad_norm), norm, rtol=1e-6)
    chex.assert_trees_all_close(u, jax.tree.map(lambda x: x * scale, g_np), rtol=1e-6)


def test_global_norm_state_readable_with_tree_get():
  g = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 12.0])}  # ‖g‖ = 13
  tx = gradtx.clip_by_global_norm(6.5)
  _, state = tx.update(g, tx.init(g))
  assert float(optax.tree_utils.tree_get(state, "grad_norm")) == pytest.approx(13.0)
  assert float(optax.tree_utils.tree_get(state, "clip_scale")) == pytest.approx(0.5)
  # Also found inside a chain, where users log it from.
  chained = optax.chain(gradtx.clip_by_global_norm(6.5, mode="soft"), optax.sgd(0.1))
  _, chain_state = chained.update(g, chained.init(g), g)
  assert float(optax.tree_utils.tree_get(chain_state, "grad_norm")) == pytest.approx(13.0)
  assert float(optax.tree_utils.tree_get(chain_state, "clip_scale")) == pytest.approx(
      6.5 / (13.0 + 6.5))


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_global_norm_schedule_follows_step_count_under_jit(mode):
  g = {"w": jnp.array([6.0, 8.0])}  # ‖g‖ = 10
  # γ_k = 20 + (1 - 20) k / 8 for k <= 8, then 1: both sides of ‖g‖ = 10 are visited.
  schedule = optax.linear_schedule(init_value=20.0, end_value=1.0, transition_steps=8)
  tx = gradtx.clip_by_global_norm(schedule, mode=mode)
  traces = []

  def update(updates, state):
    traces.append(None)
    return tx.update(updates, state)

  update = jax.jit(update)
  state = tx.init(g)
  for k in range(12):
    gamma = 20.0 + (1.0 - 20.0) * min(k, 8) / 8
    u, state = update(g, state)
    scale = np_scale(10.0, gamma, mode)
    np.testing.assert_allclose(float(state.clip_scale), scale, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["w"]), np.array([6.0, 8.0]) * scale, rtol=1e-6)
    assert int(state.count) == k + 1
  assert len(traces) == 1  # the count is traced, not baked in: no recompilation


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_global_norm_zero_gradient_value_and_meta_gradient_are_finite(mode):
  g = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
  w = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[0.3, 0.0], [-1.0, 4.0]])}

  def objective(grads, gamma):
    tx = gradtx.clip_by_global_norm(gamma, mode=mode)
    u, state = tx.update(grads, tx.init(grads))
    value = sum(jnp.sum(u[k] * w[k]) for k in u)
    return value + state.clip_scale + state.grad_norm, u

  (value, u), (d_g, d_gamma) = jax.jit(
      jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(g, 1.5)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((value, u, d_g, d_gamma)))
  # Closed forms at g = 0: u = 0, clip_scale = 1, grad_norm = 0; du/dg = I (scale 1, and
  # the derivative of the scale is multiplied by g = 0); d‖g‖/dg = 0 (the subgradient 0);
  # d clip_scale/dγ = 0 (hard: γ/γ; soft: γ/(0 + γ)).
  assert float(value) == pytest.approx(1.0)
  chex.assert_trees_all_close(u, jax.tree.map(np.zeros_like, np_tree(g)), rtol=0, atol=0)
  chex.assert_trees_all_close(d_g, np_tree(w), rtol=1e-6)
  assert float(d_gamma) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_global_norm_meta_gradient_matches_closed_form(mode):
  rng = np.random.default_rng(3)
  g = random_tree(rng, scale=2.0)
  w = random_tree(rng)
  g_np, w_np = np_tree(g), np_tree(w)
  n = np_global_norm(g_np)
  gw = float(np.dot(flat(g_np), flat(w_np)))

  def objective(grads, gamma):
    u, _ = global_clip(grads, gamma, mode)
    return sum(jnp.sum(u[k] * w[k]) for k in u)

  meta_gradient = jax.jit(jax.grad(objective, argnums=(0, 1)))
  for gamma in (0.2 * n, 3.0 * n):  # clipped / not clipped (hard)
    d_g, d_gamma = meta_gradient(g, gamma)
    check_meta_gradient(mode, g_np, w_np, n, gw, gamma, d_g, d_gamma)


def check_meta_gradient(mode, g_np, w_np, n, gw, gamma, d_g, d_gamma):
  # f = s(n, γ) g·w with n = ‖g‖:  df/dg = s w + (g·w) ∂s/∂n g/n,  df/dγ = (g·w) ∂s/∂γ.
  if mode == "hard" and gamma < n:
    s, ds_dn, ds_dgamma = gamma / n, -gamma / n**2, 1.0 / n
  elif mode == "hard":
    s, ds_dn, ds_dgamma = 1.0, 0.0, 0.0
  else:
    s, ds_dn, ds_dgamma = gamma / (n + gamma), -gamma / (n + gamma) ** 2, n / (n + gamma) ** 2
  expected_d_g = jax.tree.map(lambda gi, wi: s * wi + gw * ds_dn * gi / n, g_np, w_np)
  chex.assert_trees_all_close(d_g, expected_d_g, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(d_gamma), gw * ds_dgamma, rtol=2e-5, atol=1e-7)


FINITE_F32 = st.floats(-100.0, 100.0, width=32, allow_nan=False, allow_infinity=False,
                       allow_subnormal=False)
GRADS = st.fixed_dictionaries({
    "a": hnp.arrays(np.float32, (5,), elements=FINITE_F32),
    "b": hnp.arrays(np.float32, (2, 3), elements=FINITE_F32),
})
GAMMAS = st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False)


def clipped(g, gamma, mode):
  u, _ = global_clip({k: jnp.asarray(v) for k, v in g.items()}, gamma, mode)
  return np_tree(u)


@given(g=GRADS, gamma=GAMMAS)
def test_property_hard_clip_bounded_and_identity_below(g, gamma):
  u = clipped(g, gamma, "hard")
  norm_g, norm_u = np_global_norm(np_tree(g)), np_global_norm(u)
  assert norm_u <= gamma * (1 + 1e-5)
  assert norm_u == pytest.approx(min(norm_g, gamma), rel=1e-5, abs=1e-30)
  if norm_g < gamma * (1 - 1e-5):
    chex.assert_trees_all_close(u, np_tree(g), rtol=0, atol=0)  # untouched, bit for bit


@given(g=GRADS, gamma=GAMMAS)
def test_property_soft_clip_below_gamma_and_at_least_half_hard(g, gamma):
  soft, hard = clipped(g, gamma, "soft"), clipped(g, gamma, "hard")
  norm_g, norm_soft, norm_hard = (np_global_norm(t) for t in (np_tree(g), soft, hard))
  assert norm_soft < gamma
  assert norm_soft >= 0.5 * norm_hard * (1 - 1e-5)
  assert norm_soft <= norm_hard * (1 + 1e-5)
  assert norm_soft == pytest.approx(norm_g * gamma / (norm_g + gamma), rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("mode", ["hard", "soft"])
@given(g=GRADS, gamma=GAMMAS)
def test_property_direction_unchanged(mode, g, gamma):
  u, g_flat = flat(clipped(g, gamma, mode)), flat(np_tree(g))
  if np.linalg.norm(g_flat) > 0:
    cosine = np.dot(u, g_flat) / (np.linalg.norm(u) * np.linalg.norm(g_flat))
    assert cosine == pytest.approx(1.0, abs=1e-6)
  assert np.all(np.sign(u) * np.sign(g_flat) >= 0)  # no entry flips sign


# Magnitudes 1e-30..1e30 (#13): a tree is sign · 10**e per entry, the exponents spread
# around a centre (all tiny, all huge, or mixed: spread 60 covers the whole range), in
# float32 or float64. γ = ‖g‖ · 10**r with |r| <= 3, so every clipped entry lies in
# [1e-33, 3e33] and the clipped norm in [1e-33, 3e33]: normal float32 numbers (smallest
# normal 1.2e-38, largest 3.4e38), so the result itself neither underflows nor overflows
# and 1e-5 relative is a fair demand; every ‖g‖² below 1e-38 or above 3.4e38 exercises
# the second, rescaled pass of the norm.
WIDE_TREES = st.tuples(
    st.sampled_from(["float32", "float64"]),
    st.floats(-30.0, 30.0),                                           # centre exponent
    st.sampled_from([0.0, 1.0, 8.0, 60.0]),                           # spread
    hnp.arrays(np.float64, (7,), elements=st.floats(-0.5, 0.5)),      # offsets
    hnp.arrays(np.bool_, (7,)),                                       # signs
)


@given(tree=WIDE_TREES, log_ratio=st.floats(-3.0, 3.0))
def test_property_clipped_norm_is_min_of_norm_and_gamma_over_60_decades(tree, log_ratio):
  dtype, centre, spread, offsets, negative = tree
  exponents = np.clip(centre + spread * offsets, -30.0, 30.0)
  values = np.where(negative, -1.0, 1.0) * 10.0**exponents
  with jax.enable_x64(dtype == "float64"):
    g = {"a": jnp.asarray(values[:3], dtype), "b": jnp.asarray(values[3:].reshape(2, 2), dtype)}
    g_np = np_tree(g)  # the entries as rounded to ``dtype``, exactly, in float64
    norm = np_global_norm(g_np)
    gamma = float(norm * 10.0**log_ratio)
    u, state = global_clip(g, gamma, "hard")
    assert u["a"].dtype == jnp.dtype(dtype)
    assert float(state.grad_norm) == pytest.approx(norm, rel=1e-5)
    assert np_global_norm(np_tree(u)) == pytest.approx(min(norm, gamma), rel=1e-5)


# ------------------------------------------------------------------------- clip_by_leaf_norm


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_leaf_norm_clip_matches_numpy(mode):
  rng = np.random.default_rng(4)
  gamma = 1.5
  # Leaf norms on both sides of γ, and one zero leaf.
  g = {
      "big": jnp.asarray(rng.standard_normal((4, 3)) * 3.0, jnp.float32),
      "small": jnp.asarray(rng.standard_normal(3) * 0.1, jnp.float32),
      "zero": jnp.zeros((2, 2), jnp.float32),
      "half": jnp.asarray(rng.standard_normal(6), jnp.bfloat16),
  }
  g_np = np_tree(g)
  norms = {k: np_norm(v) for k, v in g_np.items()}
  assert norms["big"] > gamma > norms["small"]
  tx = gradtx.clip_by_leaf_norm(gamma, mode=mode)
  update = jax.jit(tx.update)
  state = tx.init(g)
  assert jax.tree.structure(state.grad_norm) == jax.tree.structure(g)
  assert jax.tree.structure(state.clip_scale) == jax.tree.structure(g)
  for step in range(2):
    u, state = update(g, state)
    assert int(state.count) == step + 1
    for k in g:
      s = np_scale(norms[k], gamma, mode)
      assert u[k].dtype == g[k].dtype
      rtol = 8e-3 if g[k].dtype == jnp.bfloat16 else 2e-6
      np.testing.assert_allclose(np.asarray(u[k], np.float64), g_np[k] * s, rtol=rtol)
      np.testing.assert_allclose(float(state.grad_norm[k]), norms[k], rtol=2e-6)
      np.testing.assert_allclose(float(state.clip_scale[k]), s, rtol=2e-6)
  per_leaf = optax.tree_utils.tree_get(state, "grad_norm")
  assert {k: float(v) for k, v in per_leaf.items()} == pytest.approx(norms, rel=2e-6)


def test_leaf_norm_clip_schedule():
  g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 2.0])}  # leaf norms 5 and 2
  tx = gradtx.clip_by_leaf_norm(optax.linear_schedule(4.0, 1.0, 3))
  state = tx.init(g)
  for k in range(4):
    gamma = 4.0 - 3.0 * k / 3
    u, state = tx.update(g, state)
    for name, n in (("a", 5.0), ("b", 2.0)):
      s = np_scale(n, gamma, "hard")
      np.testing.assert_allclose(np.asarray(u[name]), np.asarray(g[name]) * s, rtol=1e-6)


# --------------------------------------------------------------------------------- auto_clip


def autoclip_reference(norms, percentile, history, mode):
  """Seetharaman et al.'s AutoClip: record the norm, then clip to the percentile.

  Non-finite norms are not recorded (gradtx's documented choice); the history keeps the
  last ``history`` recorded norms. Returns (threshold, scale) per step.
  """
  recorded, out = [], []
  for n in norms:
    if math.isfinite(n):
      recorded.append(n)
    window = recorded[-history:]
    threshold = float(np.percentile(window, percentile)) if window else n
    scale = np_scale(n, threshold, mode) if math.isfinite(n) else math.nan
    out.append((threshold, scale))
  return out


@pytest.mark.parametrize(
    "percentile, history, mode",
    [(0.0, 7, "hard"), (10.0, 7, "hard"), (37.5, 7, "hard"), (50.0, 8, "soft"),
     (90.0, 5, "hard"), (100.0, 7, "hard"), (10.0, 1, "hard"), (25.0, 200, "hard")],
)
def test_auto_clip_threshold_is_numpy_percentile_of_ring_buffer(percentile, history, mode):
  rng = np.random.default_rng(5)
  num_steps = 45  # many wrap-arounds of the ring buffer, except for history=200 (the paper)
  norms = np.exp(rng.normal(0.0, 1.0, num_steps))
  grads = [tree_with_norm(rng, n) for n in norms]
  us, states = run_steps(gradtx.auto_clip(percentile, history=history, mode=mode), grads)
  expected = np.array(autoclip_reference(norms, percentile, history, mode))
  thresholds, scales = expected[:, 0], expected[:, 1]
  np.testing.assert_allclose(states.grad_norm, norms, rtol=2e-6)
  np.testing.assert_allclose(states.max_norm, thresholds, rtol=1e-5)
  np.testing.assert_allclose(states.clip_scale, scales, rtol=1e-5)
  np.testing.assert_array_equal(states.num_recorded, np.arange(1, num_steps + 1))
  for step, g in enumerate(grads):
    expected_u = jax.tree.map(lambda x, s=scales[step]: x * s, np_tree(g))
    chex.assert_trees_all_close(step_tree(us, step), expected_u, rtol=1e-5)
  if percentile < 100 and history > 1:
    assert np.sum(scales < 1) > 0  # the thresholds were not all trivially above the norms


@pytest.mark.parametrize("percentile", [0.0, 10.0, 50.0, 100.0])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_auto_clip_first_step_threshold_is_first_norm(percentile, mode):
  rng = np.random.default_rng(6)
  g = tree_with_norm(rng, 1234.5)
  tx = gradtx.auto_clip(percentile, history=16, mode=mode)
  u, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(float(state.max_norm), 1234.5, rtol=1e-6)
  if mode == "hard":  # never clipped
    assert float(state.clip_scale) == 1.0
    chex.assert_trees_all_close(u, np_tree(g), rtol=0, atol=0)
  else:  # soft clipping to γ = ‖g‖ halves it
    np.testing.assert_allclose(float(state.clip_scale), 0.5, rtol=1e-6)


def test_auto_clip_non_finite_norm_is_not_recorded_and_update_is_nan():
  rng = np.random.default_rng(7)
  history, percentile = 6, 30.0
  norms = list(np.exp(rng.normal(0.0, 0.5, 20)))
  bad = {3: math.nan, 9: math.inf, 10: math.nan}
  for step, value in bad.items():
    norms.insert(step, value)
  grads = grads_with_norms(rng, norms, "dense/bias", 1)
  us, states = run_steps(gradtx.auto_clip(percentile, history=history), grads)
  expected = autoclip_reference(norms, percentile, history, "hard")
  for step, (threshold, scale) in enumerate(expected):
    assert_scaled_or_skipped(us, states, grads, step, scale,
                             kept=("num_recorded", "norm_history"))
    # After a non-finite norm too, the threshold comes from the finite history.
    np.testing.assert_allclose(step_tree(states, step).max_norm, threshold, rtol=1e-5)


def test_auto_clip_zero_gradient_gives_no_nan():
  # First step ‖g‖ = 0 gives γ = 0: 0/0 must not leak into the update.
  tx = gradtx.auto_clip(10.0, history=4)
  g0 = {"w": jnp.zeros(3)}
  u, state = tx.update(g0, tx.init(g0))
  np.testing.assert_array_equal(u["w"], np.zeros(3))
  assert float(state.clip_scale) == 1.0
  # History [0, 1]: γ = numpy.percentile([0, 1], 10) = 0.1.
  u, state = tx.update({"w": jnp.array([1.0, 0.0, 0.0])}, state)
  np.testing.assert_allclose(float(state.max_norm), np.percentile([0.0, 1.0], 10.0))
  np.testing.assert_allclose(np.asarray(u["w"]), [0.1, 0.0, 0.0], rtol=1e-6)


# ------------------------------------------------------------------------------ zscore_clip


class ZClipReference:
  """ZClip as published: bluorion-com/ZClip ``zclip/zclip.py``, mode "zscore",
  clip_option "adaptive_scaling", clip_factor 1, skip_update_on_spike False.

  Written from the paper's algorithm and that code in plain Python floats (float64).
  Two deliberate differences, both documented by gradtx: non-finite norms are skipped
  (the reference would put them into its buffer/EMA), and the clip coefficient is
  ``effective / norm`` (the reference's ``clip_grad_norm_`` adds 1e-6 to the norm).
  """

  def __init__(self, alpha, z_thresh, warmup_steps, eps, max_norm):
    self.alpha, self.z_thresh, self.warmup_steps = alpha, z_thresh, warmup_steps
    self.eps, self.max_norm = eps, max_norm
    self.buffer, self.mean, self.var = [], None, None

  def step(self, norm):
    """Returns (scale, z, spike); z is 0 during warm-up."""
    if not math.isfinite(norm):
      return math.nan, math.nan, False
    if self.mean is None:  # warm-up: collect, then seed the EMAs
      self.buffer.append(norm)
      if len(self.buffer) >= self.warmup_steps:
        self.mean = sum(self.buffer) / len(self.buffer)
        self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
      effective = norm if self.max_norm is None else min(norm, self.max_norm)
      return self._scale(effective, norm), 0.0, False
    std = self.var**0.5
    z = (norm - self.mean) / (std + self.eps)
    spike = z > self.z_thresh
    clip_val = self.mean + (self.z_thresh * std) / (z / self.z_thresh) if spike else None
    effective = clip_val if spike else norm
    if self.max_norm is not None:
      effective = min(effective, self.max_norm)
    c = clip_val if spike else norm
    self.mean = self.alpha * self.mean + (1 - self.alpha) * c
    self.var = self.alpha * self.var + (1 - self.alpha) * (c - self.mean) ** 2
    return self._scale(effective, norm), z, spike

  @staticmethod
  def _scale(effective, norm):
    return effective / norm if norm > effective else 1.0

  def stats(self):
    if self.mean is None:  # during warm-up gradtx keeps the running mean/variance
      return float(np.mean(self.buffer)), float(np.var(self.buffer))
    return self.mean, self.var


def spiky_norms(rng, num_steps, spikes):
  norms = 1.0 + 0.1 * rng.standard_normal(num_steps)
  for step, factor in spikes.items():
    norms[step] *= factor
  return norms


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(alpha=0.9, z_thresh=2.5, warmup_steps=10),
        dict(alpha=0.97, z_thresh=2.0, warmup_steps=5, eps=1e-4),
        dict(alpha=0.8, z_thresh=2.5, warmup_steps=10, max_norm=1.12),
    ],
)
def test_zscore_clip_matches_published_zclip(kwargs):
  rng = np.random.default_rng(8)
  # Spikes after warm-up (and one inside it, which must not be clipped by the z-test).
  spikes = {3: 4.0, 14: 10.0, 15: 3.0, 30: 50.0, 31: 1.8, 47: 6.0}
  norms = spiky_norms(rng, 60, spikes)
  full = dict(alpha=0.97, z_thresh=2.5, warmup_steps=25, eps=1e-6, max_norm=None)
  full.update(kwargs)
  reference = ZClipReference(**full)
  grads = [tree_with_norm(rng, n) for n in norms]
  us, states = run_steps(gradtx.zscore_clip(**kwargs), grads)
  detected = []
  for step, (n, g) in enumerate(zip(norms, grads, strict=True)):
    u, state = step_tree(us, step), step_tree(states, step)
    scale, z, spike = reference.step(n)
    if step >= full["warmup_steps"]:  # keep the test data clear of the decision boundary
      assert abs(z - full["z_thresh"]) > 1e-3
    if spike:
      detected.append(step)
    if step in (14, 30, 47):  # the injected spikes were clipped hard
      assert spike and np_global_norm(u) < 0.5 * n
    mean, var = reference.stats()
    np.testing.assert_allclose(state.grad_norm, n, rtol=2e-6)
    np.testing.assert_allclose(state.z_score, z, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state.clip_scale, scale, rtol=1e-5)
    np.testing.assert_allclose(state.norm_mean, mean, rtol=1e-5)
    np.testing.assert_allclose(state.norm_var, var, rtol=1e-4, atol=1e-9)
    chex.assert_trees_all_close(u, jax.tree.map(lambda x, s=scale: x * s, np_tree(g)), rtol=1e-5)
    if full["max_norm"] is not None:
      assert np_global_norm(u) <= full["max_norm"] * (1 + 1e-5)
  assert 3 not in detected  # a spike inside warm-up is not z-tested
  if full["max_norm"] is not None:
    assert np.sum(norms[: full["warmup_steps"]] > full["max_norm"]) > 0  # cap used in warm-up


def test_zscore_clip_spike_clipped_to_adaptive_threshold_closed_form():
  # Warm-up norms 1, 2, 3 (population mean 2, variance 2/3), then a spike of 20.
  tx = gradtx.zscore_clip(alpha=0.5, z_thresh=2.0, warmup_steps=3, eps=1e-12)
  state = tx.init({"w": jnp.zeros(1)})
  for n in [1.0, 2.0, 3.0]:
    _, state = tx.update({"w": jnp.array([n])}, state)
  np.testing.assert_allclose([float(state.norm_mean), float(state.norm_var)], [2.0, 2 / 3],
                             rtol=1e-6)
  u, state = tx.update({"w": jnp.array([20.0])}, state)
  std = math.sqrt(2 / 3)
  z = 18.0 / std
  c = 2.0 + 2.0 * std / (z / 2.0)  # μ + z_thr σ / (z / z_thr)
  np.testing.assert_allclose(float(state.z_score), z, rtol=1e-5)
  np.testing.assert_allclose(float(u["w"][0]), c, rtol=1e-5)
  mean = 0.5 * 2.0 + 0.5 * c
  np.testing.assert_allclose(float(state.norm_mean), mean, rtol=1e-5)
  np.testing.assert_allclose(float(state.norm_var), 0.5 * 2 / 3 + 0.5 * (c - mean) ** 2,
                             rtol=1e-5)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_zscore_clip_non_finite_gradient_keeps_statistics_and_gives_nan(bad):
  rng = np.random.default_rng(9)
  kwargs = dict(alpha=0.9, z_thresh=2.5, warmup_steps=6)
  norms = list(spiky_norms(rng, 25, {12: 8.0}))
  norms.insert(2, bad)  # during warm-up
  norms.insert(15, bad)  # after warm-up
  reference = ZClipReference(eps=1e-6, max_norm=None, **kwargs)
  grads = grads_with_norms(rng, norms, "head", (0, 1, 0))
  us, states = run_steps(gradtx.zscore_clip(**kwargs), grads)
  for step, n in enumerate(norms):
    scale, _, _ = reference.step(n)
    assert_scaled_or_skipped(us, states, grads, step, scale,
                             kept=("num_recorded", "norm_mean", "norm_var"))
    if math.isfinite(n):
      mean, var = reference.stats()
      state = step_tree(states, step)
      np.testing.assert_allclose(state.norm_mean, mean, rtol=1e-5)
      np.testing.assert_allclose(state.norm_var, var, rtol=1e-4, atol=1e-9)


# --------------------------------------------------------------- every transformation: faults

TRANSFORMATIONS = {
    "global_hard": lambda: gradtx.clip_by_global_norm(1.0),
    "global_soft": lambda: gradtx.clip_by_global_norm(1.0, mode="soft"),
    "leaf_hard": lambda: gradtx.clip_by_leaf_norm(1.0),
    "leaf_soft": lambda: gradtx.clip_by_leaf_norm(1.0, mode="soft"),
    "auto_hard": lambda: gradtx.auto_clip(50.0, history=8),
    "auto_soft": lambda: gradtx.auto_clip(50.0, history=8, mode="soft"),
    "zscore": lambda: gradtx.zscore_clip(warmup_steps=2),
    "zscore_max_norm": lambda: gradtx.zscore_clip(warmup_steps=2, max_norm=0.5),
}
STATISTICS = ("num_recorded", "norm_history", "norm_mean", "norm_var")


@pytest.mark.parametrize("name", sorted(TRANSFORMATIONS))
def test_non_finite_gradient_propagates_visibly_and_does_not_poison_state(name):
  rng = np.random.default_rng(10)
  tx = TRANSFORMATIONS[name]()
  update = jax.jit(tx.update)
  good = [random_tree(rng, scale=s) for s in (0.5, 1.0, 2.0, 0.7)]
  state = tx.init(good[0])
  for g in good[:3]:
    _, state = update(g, state)
  for bad in ("nan", "inf", "-inf"):
    faulty = random_tree(rng)
    faulty["dense/kernel"] = faulty["dense/kernel"].at[1, 2].set(float(bad))
    u, bad_state = update(faulty, state)
    if name.startswith("leaf"):  # per-leaf: only the faulty leaf is NaN
      assert all_nan(u["dense/kernel"]), bad
      assert not math.isfinite(float(bad_state.grad_norm["dense/kernel"]))
      mode = name.split("_")[1]
      for k in faulty:
        if k != "dense/kernel":
          s = np_scale(np_norm(faulty[k]), 1.0, mode)
          np.testing.assert_allclose(np.asarray(u[k]), np.asarray(faulty[k]) * s, rtol=2e-6)
    else:
      assert all_nan(u), bad
      assert not math.isfinite(float(bad_state.grad_norm))
    # Statistics that drive later steps are untouched (count still advances for schedules).
    for field in STATISTICS:
      if hasattr(state, field):
        np.testing.assert_array_equal(getattr(bad_state, field), getattr(state, field))
    # The next finite step is exactly what it would have been without the faulty one.
    u_after, _ = update(good[3], bad_state)
    u_clean, _ = update(good[3], state)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u_after))
    chex.assert_trees_all_close(u_after, np_tree(u_clean), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["global_hard", "global_soft", "leaf_soft", "auto_hard",
                                  "zscore_max_norm"])
def test_finite_gradient_whose_squares_overflow_float32_is_clipped_not_nan(name):
  # Every entry is finite, but the float32 sum of squares of 1e20 is inf: the norm must
  # still be the float64 reference (it was inf, giving NaN updates, before #13).
  rng = np.random.default_rng(11)
  tx = TRANSFORMATIONS[name]()
  update = jax.jit(tx.update)
  state = tx.init(random_tree(rng))
  for s in (0.5, 1.0, 2.0):
    _, state = update(random_tree(rng, scale=s), state)
  g = random_tree(rng)
  g["dense/kernel"] = g["dense/kernel"].at[0, 0].set(1e20)
  g_np = np_tree(g)
  u, new_state = update(g, state)
  if name.startswith("leaf"):
    mode = name.split("_")[1]
    for k in g:
      norm = np_norm(g_np[k])
      np.testing.assert_allclose(float(new_state.grad_norm[k]), norm, rtol=1e-6)
      np.testing.assert_allclose(np.asarray(u[k], np.float64),
                                 g_np[k] * np_scale(norm, 1.0, mode), rtol=2e-6)
    return
  norm = np_global_norm(g_np)
  np.testing.assert_allclose(float(new_state.grad_norm), norm, rtol=1e-6)
  scale = float(new_state.clip_scale)
  if name.startswith("global"):
    np.testing.assert_allclose(scale, np_scale(norm, 1.0, name.split("_")[1]), rtol=1e-6)
  assert 0 < scale < 1e-18  # the spike is clipped hard, whatever the rule's threshold
  chex.assert_trees_all_close(u, jax.tree.map(lambda x: x * scale, g_np), rtol=2e-6)


def test_float64_norm_is_computed_in_float64_under_x64():
  # ‖[1e200, 1e200]‖ overflows float32 (and float64's sum of squares): the state keeps
  # float64 and the update is the float64 reference.
  with jax.enable_x64(True):
    g = {"w": jnp.array([1e200, -1e200, 3.0], jnp.float64), "b": jnp.array([1e-200])}
    norm = math.sqrt(2.0) * 1e200
    clipped = {k: np.asarray(v) / norm for k, v in g.items()}
    for tx, expected in ((gradtx.clip_by_global_norm(1.0), clipped),
                         (gradtx.zscore_clip(warmup_steps=1, max_norm=1.0), clipped),
                         (gradtx.auto_clip(50.0, history=4), g)):  # γ_1 = ‖g_1‖: unclipped
      u, state = jax.jit(tx.update)(g, tx.init(g))
      assert state.grad_norm.dtype == jnp.float64
      np.testing.assert_allclose(float(state.grad_norm), norm, rtol=1e-12)
      chex.assert_trees_all_close(u, expected, rtol=1e-12, atol=1e-300)
    tx = gradtx.clip_by_leaf_norm(1.0)
    u, state = jax.jit(tx.update)(g, tx.init(g))
    assert state.grad_norm["w"].dtype == jnp.float64
    np.testing.assert_allclose(float(state.grad_norm["b"]), 1e-200, rtol=1e-12)
    chex.assert_trees_all_close(u, {"w": np.asarray(g["w"]) / norm, "b": g["b"]},
                                rtol=1e-12)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_complex_gradients_are_clipped_by_their_modulus(mode):
  # [10+10j, 10-10j] has modulus norm 20 (its real parts alone would give √200, and the
  # old float32 cast dropped the imaginary parts: "norm" 0 for [10j, -10j]).
  g = {"c": jnp.array([10 + 10j, 10 - 10j], jnp.complex64), "r": jnp.array([5.0])}
  c = np.array([10 + 10j, 10 - 10j])
  norm = math.sqrt(float(np.sum(np.abs(c) ** 2)) + 25.0)
  u, state = global_clip(g, 2.0, mode)
  scale = np_scale(norm, 2.0, mode)
  np.testing.assert_allclose(float(state.grad_norm), norm, rtol=1e-6)
  assert u["c"].dtype == jnp.complex64
  np.testing.assert_allclose(np.asarray(u["c"]), c * scale, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(u["r"]), [5.0 * scale], rtol=1e-6)
  tx = gradtx.clip_by_leaf_norm(2.0, mode=mode)
  imaginary = {"c": jnp.array([10j, -10j], jnp.complex64)}
  u, state = tx.update(imaginary, tx.init(imaginary))
  np.testing.assert_allclose(float(state.grad_norm["c"]), math.sqrt(200.0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(u["c"]), np.array([10j, -10j]) *
                             np_scale(math.sqrt(200.0), 2.0, mode), rtol=1e-6)


@pytest.mark.parametrize("make, mode", [(gradtx.clip_by_global_norm, "hard"),
                                        (gradtx.clip_by_leaf_norm, "soft")])
def test_schedule_max_norm_not_positive_gives_nan_not_a_sign_flip(make, mode):
  # γ = 2, 0, -2, NaN on steps 0-3. γ <= 0 used to flip the sign (hard: γ/‖g‖ < 0) or
  # pass a zero leaf unclipped; now every entry is NaN and grad_norm stays the reference.
  values = jnp.array([2.0, 0.0, -2.0, jnp.nan])
  tx = make(lambda count: values[jnp.minimum(count, 3)], mode=mode)
  g = {"w": jnp.array([3.0, 4.0]), "z": jnp.zeros(2)}
  update = jax.jit(tx.update)
  u, state = update(g, tx.init(g))
  s = np_scale(5.0, 2.0, mode)
  chex.assert_trees_all_close(u, {"w": np.array([3.0, 4.0]) * s, "z": np.zeros(2)},
                              rtol=1e-6)
  for step in range(1, 4):
    u, state = update(g, state)
    assert all_nan(u), step
    norms = state.grad_norm if isinstance(state.grad_norm, dict) else {"w": state.grad_norm}
    np.testing.assert_allclose(float(norms["w"]), 5.0, rtol=1e-6)


def test_clip_scale_refuses_to_flip_the_sign():
  scale = gradtx.clipping.clip_scale
  for mode in ("hard", "soft"):
    assert np.isnan(float(scale(jnp.float32(5.0), -1.0, mode)))
    assert np.isnan(float(scale(jnp.float32(0.0), jnp.nan, mode)))
    assert float(scale(jnp.float32(0.0), 0.0, mode)) == 1.0  # AutoClip's zero threshold
  assert float(scale(jnp.float32(4.0), 0.0, "hard")) == 0.0


def test_state_after_a_failed_call_gives_the_clean_run():
  rng = np.random.default_rng(12)
  grads = [random_tree(rng, scale=s) for s in (0.5, 3.0, 1.0, 0.2, 4.0)]
  tx = TRANSFORMATIONS["auto_hard"]()
  clean_us, clean_states = run_steps(tx, grads)
  update = jax.jit(tx.update)
  state = tx.init(grads[0])
  for step, g in enumerate(grads):
    with pytest.raises(TypeError, match=r"updates must hold floating.*dense/bias \(int32\)"):
      update({**g, "dense/bias": jnp.array([1, 2, 3])}, state)
    u, state = update(g, state)
    chex.assert_trees_all_close(u, step_tree(clean_us, step), rtol=1e-6)
    chex.assert_trees_all_close(state, step_tree(clean_states, step), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(TRANSFORMATIONS))
def test_zero_gradient_gives_finite_value_and_meta_gradient(name):
  g = {"a": jnp.zeros((3,)), "b": jnp.zeros((2,))}
  w = {"a": jnp.array([1.0, 2.0, -1.0]), "b": jnp.array([0.5, -3.0])}
  tx = TRANSFORMATIONS[name]()

  def objective(grads):
    state = tx.init(grads)
    for _ in range(3):  # past zscore's warm-up
      u, state = tx.update(grads, state)
    return sum(jnp.sum(u[k] * w[k]) for k in u), u

  (value, u), d_g = jax.jit(jax.value_and_grad(objective, has_aux=True))(g)
  assert float(value) == 0.0
  assert all(bool(jnp.all(u[k] == 0)) for k in u)
  # At g = 0 nothing is clipped: du/dg = I (or a positive multiple for soft), so the
  # meta-gradient is finite and parallel to w.
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(d_g))
  ratio = flat(np_tree(d_g)) / flat(np_tree(w))
  np.testing.assert_allclose(ratio, np.full_like(ratio, ratio[0]), rtol=1e-6)
  assert ratio[0] > 0


# ------------------------------------------------------------------------------- bad inputs

BAD_INPUTS = [
    (lambda: gradtx.clip_by_global_norm(0.0), ValueError, "max_norm", "0.0"),
    (lambda: gradtx.clip_by_global_norm(-1.0), ValueError, "max_norm", "-1.0"),
    (lambda: gradtx.clip_by_global_norm(math.inf), ValueError, "max_norm", "inf"),
    (lambda: gradtx.clip_by_global_norm(1.0, mode="medium"), ValueError, "mode", "'medium'"),
    (lambda: gradtx.clip_by_leaf_norm(0.0), ValueError, "max_norm", "0.0"),
    (lambda: gradtx.clip_by_leaf_norm(1.0, mode="medium"), ValueError, "mode", "'medium'"),
    (lambda: gradtx.auto_clip(150.0), ValueError, "percentile", "150.0"),
    (lambda: gradtx.auto_clip(-1.0), ValueError, "percentile", "-1.0"),
    (lambda: gradtx.auto_clip(10.0, history=0), ValueError, "history", "0"),
    (lambda: gradtx.auto_clip(10.0, history=2.5), TypeError, "history", "2.5"),
    (lambda: gradtx.auto_clip(10.0, mode="medium"), ValueError, "mode", "'medium'"),
    (lambda: gradtx.zscore_clip(alpha=1.0), ValueError, "alpha", "1.0"),
    (lambda: gradtx.zscore_clip(alpha=0.0), ValueError, "alpha", "0.0"),
    (lambda: gradtx.zscore_clip(z_thresh=0), ValueError, "z_thresh", "0"),
    (lambda: gradtx.zscore_clip(warmup_steps=0), ValueError, "warmup_steps", "0"),
    (lambda: gradtx.zscore_clip(eps=-1e-6), ValueError, "eps", "-1e-06"),
    (lambda: gradtx.zscore_clip(max_norm=0.0), ValueError, "max_norm", "0.0"),
]


@pytest.mark.parametrize("make, error, argument, value", BAD_INPUTS)
def test_bad_configuration_names_argument_and_value(make, error, argument, value):
  with pytest.raises(error, match=rf"\b{argument}\b.*\bgot {re.escape(value)}$"):
    make()


def test_good_edge_configurations_are_accepted():
  gradtx.auto_clip(0.0)
  gradtx.auto_clip(100.0, history=1)
  gradtx.zscore_clip(alpha=1e-3, warmup_steps=1)
  gradtx.clip_by_global_norm(optax.linear_schedule(1.0, 0.1, 10))  # schedules checked later
