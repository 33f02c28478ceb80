"""Tests of gradtx/child_tuning.py against independent references.

References: binomial / CLT bounds for the random masks, ``numpy`` re-implementations
of the Fisher pass (a plain ``jax.grad`` loop over batches), of the percentile mask and
of ChildTuning's patched AdamW (alibaba/AliceMind ``ChildTuning/ChildTuningOptimizer.py``),
optax's own Adam, and the closed forms behind Su's "gradient dropout = lr × √p" remark.
The code under test is never compared with itself, with one documented exception: the
F masks a key draws are read back by running ``child_tuning_f`` alone on a gradient of
ones (its kept entries are exactly the mask), since the masks are the module's random
choice, not something a reference can recompute.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from hypothesis import given
from hypothesis import strategies as st

import gradtx

SIGMAS = 5.0  # every statistical bound below is a 5-sigma bound
PRNGS = ("hash", "jax")
STEPS = 3
# One tree shape for the mask tests, so that one compiled scan serves them all.
SHAPES = {"a": (128, 256), "b": (128, 256), "c": (1001,), "d": ()}
N = sum(math.prod(s) for s in SHAPES.values())


# ----------------------------------------------------------------------------- helpers


def p_effective(p, prng):
  """The keep rate the mask really has: ``prng="hash"`` rounds p to a multiple of 2^-16."""
  if prng == "hash":
    return min(max(round(p * 65536), 1), 65536) / 65536
  return p


def binomial_bound(p, n):
  """5-sigma half-width of the mean of ``n`` Bernoulli(p) draws (0 for p in {0, 1})."""
  return SIGMAS * math.sqrt(p * (1.0 - p) / n) + 1e-12


def tree_of(fill, shapes=None):
  return {k: jnp.full(s, fill, jnp.float32) for k, s in (shapes or SHAPES).items()}


@functools.partial(jax.jit, static_argnames=("steps", "prng", "rescale"))
def _draw(reserve_p, key, grads, *, steps=STEPS, prng="hash", rescale=True):
  """``steps`` updates of ``child_tuning_f(reserve_p, key=key)`` on the fixed ``grads``.

  One compiled scan; ``reserve_p`` and ``key`` are traced (the factory is called inside
  jit, as ``optax.inject_hyperparams`` does), so one compile serves every p and key.
  Returns the stacked updates, the logged densities and the final count.
  """
  tx = gradtx.child_tuning_f(reserve_p, key=key, prng=prng, rescale=rescale)

  def body(state, _):
    u, state = tx.update(grads, state)
    return state, (u, state.mask_density)

  state, (us, density) = jax.lax.scan(body, tx.init(grads), None, length=steps)
  return us, density, state.count


def draw(reserve_p, key, grads, **kwargs):
  """``_draw`` as numpy: a list (one per step) of update trees, the densities, the count."""
  us, density, count = _draw(reserve_p, key, grads, **kwargs)
  us = jax.tree.map(np.asarray, us)
  steps = len(density)
  return [jax.tree.map(lambda x, t=t: x[t], us) for t in range(steps)], np.asarray(
      density), int(count)


def f_masks(reserve_p, key, like=None, **kwargs):
  """The masks ``child_tuning_f(reserve_p, key=key)`` draws on a tree shaped like ``like``
  (default: ``SHAPES``), one tree per step.

  Read back from a gradient of ones (kept entries are the nonzero ones): the masks are
  the module's own random choice, which no reference can recompute; they depend on the
  key, the step and the leaf's path only, not on the gradient values.
  """
  ones = tree_of(1.0) if like is None else jax.tree.map(
      lambda x: jnp.ones(jnp.shape(x), jnp.float32), like)
  outs, _, _ = draw(reserve_p, key, ones, **kwargs)
  return [jax.tree.map(lambda u: u != 0, out) for out in outs]


def run_steps(tx, grads_per_step, params=None):
  """Applies ``tx`` to each gradient in turn (a jit-compiled update); numpy outputs."""
  state = tx.init(params if params is not None else grads_per_step[0])
  update = jax.jit(tx.update)
  outs, states = [], []
  for g in grads_per_step:
    u, state = update(g, state)
    outs.append(jax.tree.map(np.asarray, u))
    states.append(state)
  return outs, states


def corr(a, b):
  a = a.astype(np.float64).ravel()
  b = b.astype(np.float64).ravel()
  return float(np.corrcoef(a, b)[0, 1])


# ----------------------------------------------------------------------------- F: density


@pytest.mark.parametrize("prng", PRNGS)
def test_f_mask_density_is_binomial(prng):
  for p in (0.05, 0.3, 0.5, 0.9, 1.0):
    outs, density, count = draw(p, jax.random.key(3), tree_of(1.0), prng=prng)
    q = p_effective(p, prng)
    assert count == STEPS
    for out, logged in zip(outs, density, strict=True):
      kept = sum(int(np.count_nonzero(x)) for x in jax.tree.leaves(out))
      assert abs(kept / N - q) <= binomial_bound(q, N), (p, kept / N, q)
      # The logged density is the fraction the mask really kept.
      np.testing.assert_allclose(logged, kept / N, rtol=1e-6)
      if p == 1.0:  # everything kept, nothing rescaled
        for x in jax.tree.leaves(out):
          np.testing.assert_array_equal(x, np.ones_like(x))


@pytest.mark.parametrize("prng", PRNGS)
def test_f_mask_density_follows_reserve_p_schedule(prng):
  schedule = optax.linear_schedule(0.9, 0.1, transition_steps=8)  # 0.9, 0.8, ..., 0.1
  shape = (64, 512)
  n = math.prod(shape)
  tx = gradtx.child_tuning_f(schedule, key=jax.random.key(4), prng=prng)
  outs, states = run_steps(tx, [{"w": jnp.ones(shape)}] * 9)
  for t, (out, state) in enumerate(zip(outs, states, strict=True)):
    q = p_effective(0.9 - 0.1 * t, prng)
    kept = int(np.count_nonzero(out["w"]))
    assert abs(kept / n - q) <= binomial_bound(q, n), (t, kept / n, q)
    np.testing.assert_allclose(float(state.mask_density), kept / n, rtol=1e-6)
    # The rescale follows the schedule too: kept entries are 1 / p_t.
    np.testing.assert_allclose(out["w"][out["w"] != 0], 1.0 / q, rtol=1e-6)


# ----------------------------------------------------------------------------- F: independence


@pytest.mark.parametrize("prng", PRNGS)
def test_f_masks_independent_across_leaves_steps_and_neighbours(prng):
  p = 0.3
  q = p_effective(p, prng)
  m0, m1, _ = f_masks(p, jax.random.key(5), prng=prng)
  a0, b0, a1 = m0["a"].ravel(), m0["b"].ravel(), m1["a"].ravel()
  pairs = {
      "two leaves, same step": (a0, b0),
      "one leaf, consecutive steps": (a0, a1),
      # The hash gives elements 2i and 2i+1 the two halves of one 32-bit word; 2i+1 and
      # 2i+2 come from neighbouring counters.
      "elements 2i, 2i+1": (a0[0::2], a0[1::2]),
      "elements 2i+1, 2i+2": (a0[1:-1:2], a0[2::2]),
      "rows r, r+1": (m0["a"][:-1], m0["a"][1:]),
  }
  for name, (x, y) in pairs.items():
    size = x.size
    joint = float(np.mean(x & y))
    assert abs(joint - q * q) <= binomial_bound(q * q, size), (name, joint, q * q)
    assert abs(corr(x, y)) <= SIGMAS / math.sqrt(size), (name, corr(x, y))


@pytest.mark.parametrize("prng", PRNGS)
def test_f_same_key_same_masks_different_key_independent_masks(prng):
  first = f_masks(0.5, jax.random.key(7), prng=prng)
  again = f_masks(0.5, jax.random.key(7), prng=prng)
  # A raw uint32 key with the same seed is the same key (checked once: not PRNG-specific).
  raw = f_masks(0.5, jax.random.PRNGKey(7), prng=prng) if prng == "hash" else first
  other = f_masks(0.5, jax.random.key(8), prng=prng)
  for a, b, c, d in zip(first, again, raw, other, strict=True):
    for k in SHAPES:
      np.testing.assert_array_equal(a[k], b[k])
      np.testing.assert_array_equal(a[k], c[k])
    # Another key: masks agree only as often as two independent Bernoulli(1/2) do.
    agree = float(np.mean(a["a"] == d["a"]))
    assert abs(agree - 0.5) <= binomial_bound(0.5, a["a"].size), agree
  # Consecutive steps differ too (the key is split every step).
  agree = float(np.mean(first[0]["a"] == first[1]["a"]))
  assert abs(agree - 0.5) <= binomial_bound(0.5, first[0]["a"].size), agree


@pytest.mark.parametrize("prng", PRNGS)
def test_f_leaf_mask_depends_only_on_key_step_and_path(prng):
  key = jax.random.key(11)
  base = f_masks(0.5, key, prng=prng)
  bigger = f_masks(0.5, key, tree_of(1.0, {**SHAPES, "e": (5, 5)}), prng=prng)
  for s, b in zip(base, bigger, strict=True):
    for k in SHAPES:
      np.testing.assert_array_equal(s[k], b[k])

  if prng == "jax":
    return  # optax.masked below is PRNG-agnostic (the per-leaf keys are the same code)
  # optax.masked hides "b" (a leaf fewer): the leaves it still sees keep their masks; "b"
  # passes through.
  tx = optax.masked(gradtx.child_tuning_f(0.5, key=key, prng=prng),
                    {"a": True, "b": False, "c": True, "d": True})
  ones = tree_of(1.0)

  @jax.jit
  def run():
    def body(state, _):
      u, state = tx.update(ones, state)
      return state, u

    return jax.lax.scan(body, tx.init(ones), None, length=STEPS)[1]

  outs = jax.tree.map(np.asarray, run())
  for t, b in enumerate(base):
    for k in ("a", "c", "d"):
      np.testing.assert_array_equal(outs[k][t] != 0, b[k])
    np.testing.assert_array_equal(outs["b"][t], np.ones(SHAPES["b"]))


# ----------------------------------------------------------------------------- F: values


@pytest.mark.parametrize("prng", PRNGS)
def test_f_is_unbiased_over_many_draws(prng):
  """mean_t(g ⊙ M_t / p) → g; each draw has variance g²(1-p)/p per element (CLT bound)."""
  p, steps = 0.3, 2000
  q = p_effective(p, prng)
  rng = np.random.default_rng(0)
  g = rng.standard_normal((8, 8)).astype(np.float32)
  g[0, 0] = 0.0
  us, _, _ = _draw(p, jax.random.key(12), {"w": jnp.asarray(g)}, steps=steps, prng=prng)
  us = np.asarray(us["w"], np.float64)
  mean, meansq = us.mean(0), (us**2).mean(0)
  g64 = g.astype(np.float64)
  sd = np.abs(g64) * math.sqrt((1.0 - q) / (q * steps))
  assert np.all(np.abs(mean - g64) <= SIGMAS * sd + 1e-6), np.max(np.abs(mean - g64) / sd)
  assert mean[0, 0] == 0.0
  # E[u²] = g² / p; the empirical second moment agrees to sampling error.
  np.testing.assert_allclose(meansq.ravel()[1:], (g64**2 / q).ravel()[1:], rtol=0.25)
  # The z-scores are ~N(0, 1): their mean square is chi²(63)/63 (sd 0.18).
  z = ((mean - g64) / np.where(sd > 0, sd, 1.0)).ravel()[1:]
  assert abs(float(np.mean(z**2)) - 1.0) <= SIGMAS * math.sqrt(2 / z.size)


def test_f_hash_rescale_uses_the_rounded_p():
  p = 0.3
  p_hash = round(p * 65536) / 65536  # 19661 / 65536 = 0.30000305...
  assert p_hash != p
  rng = np.random.default_rng(1)
  g = {k: (rng.uniform(0.5, 2.0, s) * rng.choice([-1, 1], s)).astype(np.float32)
       for k, s in SHAPES.items()}
  for prng, rate in (("hash", p_hash), ("jax", p)):  # prng="jax" needs no rounding
    (u, *_), _, _ = draw(p, jax.random.key(13), jax.tree.map(jnp.asarray, g), prng=prng)
    u, g_ = u["a"].ravel(), g["a"].ravel()
    kept = u != 0
    assert 0 < kept.sum() < kept.size
    # float32 arithmetic: within 2 ulp of g / rate ...
    np.testing.assert_allclose(u[kept], g_[kept].astype(np.float64) / rate,
                               rtol=2.0**-22, atol=0)
    if prng == "hash":  # ... and measurably not g / 0.3 (1e-5 relative, ~80 ulp)
      assert not np.allclose(u[kept], g_[kept].astype(np.float64) / p, rtol=2e-6, atol=0)


@pytest.mark.parametrize("prng", PRNGS)
def test_f_rescale_false_gives_g_times_mask(prng):
  rng = np.random.default_rng(2)
  g = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
  key = jax.random.key(14)
  masks = f_masks(0.4, key, prng=prng)
  outs, _, _ = draw(0.4, key, g, prng=prng, rescale=False)
  for out, m in zip(outs, masks, strict=True):
    for k in SHAPES:
      np.testing.assert_array_equal(out[k], np.where(m[k], np.asarray(g[k]), 0.0))


def test_bf16_params_keep_bf16_updates():
  rng = np.random.default_rng(3)
  g = {"w": jnp.asarray(rng.standard_normal(256), jnp.bfloat16)}
  gb = np.asarray(g["w"], np.float64)  # the bf16 values, exactly
  # (The dtype handling is the same code for both PRNGs; the hash one is checked.)
  tx = gradtx.child_tuning_f(0.3, key=jax.random.key(15))
  u = jax.jit(tx.update)(g, tx.init(g))[0]["w"]
  assert u.dtype == jnp.bfloat16
  u = np.asarray(u, np.float64)
  kept = u != 0
  assert 0 < kept.sum() < kept.size
  # bf16 has an 8-bit significand: the kept values are g / p to within one rounding.
  np.testing.assert_allclose(u[kept], gb[kept] / p_effective(0.3, "hash"), rtol=2.0**-8)
  mask = np.asarray(rng.random(256) < 0.5)
  rho = float(np.mean(mask))
  for rescale in (False, True):
    tx = gradtx.child_tuning_d({"w": jnp.asarray(mask)}, rescale=rescale)
    u = tx.update(g, tx.init(g))[0]["w"]
    assert u.dtype == jnp.bfloat16
    expected = np.where(mask, gb / (rho if rescale else 1.0), 0.0)
    np.testing.assert_allclose(np.asarray(u, np.float64), expected, rtol=2.0**-8)


# ----------------------------------------------------------------------------- NaN


@pytest.mark.parametrize("prng", PRNGS)
def test_f_nan_stays_where_kept_and_is_zeroed_where_dropped(prng):
  key = jax.random.key(16)
  g = np.linspace(-1.0, 1.0, SHAPES["c"][0]).astype(np.float32)
  g[::4] = np.nan
  g[1::8] = np.inf
  grads = {**tree_of(1.0), "c": jnp.asarray(g)}
  masks = f_masks(0.5, key, prng=prng)
  outs, density, count = draw(0.5, key, grads, prng=prng)
  assert np.all(np.isfinite(density)) and count == STEPS
  bad = ~np.isfinite(g)
  for out, mask in zip(outs, masks, strict=True):
    u, m = out["c"], mask["c"]
    assert np.any(bad & m) and np.any(bad & ~m)
    assert np.all(np.isnan(u[np.isnan(g) & m]))
    assert np.all(np.isposinf(u[np.isposinf(g) & m]))
    np.testing.assert_array_equal(u[~m], 0.0)
    np.testing.assert_allclose(u[m & ~bad], g[m & ~bad] / p_effective(0.5, prng), rtol=1e-6)
    # The other leaves, and later steps' masks, are untouched by the NaNs: the state
    # carries no gradient statistics.
    for k in ("a", "b", "d"):
      np.testing.assert_array_equal(out[k] != 0, mask[k])


@pytest.mark.parametrize("prng", PRNGS)
def test_f_reserve_p_schedule_out_of_range_gives_a_nan_step(prng):
  """A schedule's p outside (0, 1] (only known under jit) makes that step visibly NaN.

  Without the guard, p = 1.5 would keep everything (hash: p clipped to 1) and p = 0 would
  drop everything or rescale by 2^16: plausible, wrong updates.
  """
  bad = [1.5, 0.0, -0.25, float("nan")]
  schedule = lambda count: jnp.asarray([0.5, *bad, 0.5], jnp.float32)[count]
  rng = np.random.default_rng(20)
  g = rng.uniform(0.5, 2.0, 512).astype(np.float32)
  tx = gradtx.child_tuning_f(schedule, key=jax.random.key(21), prng=prng)
  outs, states = run_steps(tx, [{"w": jnp.asarray(g)}] * (len(bad) + 2))
  q = p_effective(0.5, prng)
  for t in (0, len(bad) + 1):  # the valid steps: g / p where kept, 0 elsewhere
    u, kept = outs[t]["w"], outs[t]["w"] != 0
    assert abs(kept.mean() - q) <= binomial_bound(q, g.size)
    np.testing.assert_allclose(u[kept], g[kept].astype(np.float64) / q, rtol=2.0**-22)
    np.testing.assert_allclose(float(states[t].mask_density), kept.mean(), rtol=1e-6)
  for t in range(1, len(bad) + 1):
    assert np.all(np.isnan(outs[t]["w"])), (bad[t - 1], outs[t]["w"][:8])
    assert np.isnan(float(states[t].mask_density))
    assert int(states[t].count) == t + 1


def test_d_nan_stays_where_kept_and_is_zeroed_where_dropped():
  g = np.array([np.nan, np.nan, np.inf, -np.inf, 1.0, 2.0], np.float32)
  m = np.array([True, False, True, False, True, False])
  tx = gradtx.child_tuning_d({"w": jnp.asarray(m)})
  state = tx.init({"w": g})
  u, state2 = tx.update({"w": jnp.asarray(g)}, state)
  u = np.asarray(u["w"])
  assert np.isnan(u[0]) and u[2] == np.inf and u[4] == 1.0
  np.testing.assert_array_equal(u[~m], 0.0)
  np.testing.assert_array_equal(np.asarray(state2.mask["w"]), m)
  assert float(state2.mask_density) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- D


def test_d_masks_and_reports_density_and_ignores_extra_mask_leaves():
  rng = np.random.default_rng(4)
  params = {"a": jnp.zeros((6, 5)), "b": jnp.zeros(4)}
  mask = {"a": rng.random((6, 5)) < 0.3, "b": np.array([True, False, False, True]),
          "extra": np.ones(3, bool)}
  g = {"a": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
       "b": jnp.asarray(rng.standard_normal(4), jnp.float32)}
  rho = (mask["a"].sum() + 2) / 34
  for rescale in (False, True):
    tx = gradtx.child_tuning_d(jax.tree.map(jnp.asarray, mask), rescale=rescale)
    state = tx.init(params)
    assert float(state.mask_density) == pytest.approx(rho)
    u, _ = tx.update(g, state)
    for k in ("a", "b"):
      expected = np.where(mask[k], np.asarray(g[k], np.float64), 0.0) / (rho if rescale else 1)
      np.testing.assert_allclose(u[k], expected, rtol=1e-6)

  # Under optax.masked the inner init sees only "a": the full mask still fits.
  tx = optax.masked(gradtx.child_tuning_d(jax.tree.map(jnp.asarray, mask)),
                    {"a": True, "b": False})
  u, _ = tx.update(g, tx.init(params))
  np.testing.assert_array_equal(u["a"], np.where(mask["a"], g["a"], 0.0))
  np.testing.assert_array_equal(u["b"], g["b"])


# ----------------------------------------------------------------------------- fisher_information


def _loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["dense"]["kernel"] + params["dense"]["bias"])
  return jnp.mean((h @ params["head"] - batch["y"]) ** 2)


def _loss_array(params, batch):  # batch: (n, 4) = 3 features and the target
  return _loss(params, {"x": batch[:, :3], "y": batch[:, 3]})


def _loss_tuple(params, batch):
  return _loss(params, {"x": batch[0], "y": batch[1]})


def _fisher_setup():
  rng = np.random.default_rng(5)
  params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal(4), jnp.float32)},
            "head": jnp.asarray(rng.standard_normal(4), jnp.float32)}
  x = rng.standard_normal((5, 6, 3)).astype(np.float32) * rng.uniform(0.2, 3, (5, 1, 1))
  y = rng.standard_normal((5, 6)).astype(np.float32) * 2
  return params, x, y


def _np_clip(grads, clip_norm, scope):
  """min(1, c/‖g‖) per leaf (AliceMind: clip_grad_norm_ per parameter) or globally.

  (torch's clip_grad_norm_ scales by c/(‖g‖ + 1e-6); the exact min(1, c/‖g‖) is what
  gradtx documents, and the two differ by ~1e-6/‖g‖ relative.)
  """
  if clip_norm is None:
    return grads
  if scope == "global":
    norm = math.sqrt(sum(float(np.sum(g**2)) for g in grads.values()))
    return {k: g * min(1.0, clip_norm / norm) for k, g in grads.items()}
  return {k: g * min(1.0, clip_norm / math.sqrt(float(np.sum(g**2))))
          for k, g in grads.items()}


_plain_grad = jax.jit(jax.grad(_loss))


def _np_flat_grad(params, batch):
  """Plain autodiff, one batch, flattened to {path: float64 array}."""
  g = _plain_grad(params, batch)
  return {"kernel": np.asarray(g["dense"]["kernel"], np.float64),
          "bias": np.asarray(g["dense"]["bias"], np.float64),
          "head": np.asarray(g["head"], np.float64)}


def _np_fisher(params, x, y, clip_norm, scope, per_example):
  """mean over batches (or over every example) of the clipped gradient squared."""
  units = ([(x[b, i:i + 1], y[b, i:i + 1]) for b in range(len(x)) for i in range(x.shape[1])]
           if per_example else [(x[b], y[b]) for b in range(len(x))])
  total = None
  for xb, yb in units:
    g = _np_clip(_np_flat_grad(params, {"x": jnp.asarray(xb), "y": jnp.asarray(yb)}),
                 clip_norm, scope)
    sq = {k: v**2 for k, v in g.items()}
    total = sq if total is None else {k: total[k] + sq[k] for k in sq}
  return {k: v / len(units) for k, v in total.items()}


def _np_norms(params, x, y, scope, per_example=False):
  """The norms clipping looks at: one per batch (or example), or one per leaf of each."""
  units = ([(x[b, i:i + 1], y[b, i:i + 1]) for b in range(len(x)) for i in range(x.shape[1])]
           if per_example else [(x[b], y[b]) for b in range(len(x))])
  norms = []
  for xb, yb in units:
    g = _np_flat_grad(params, {"x": jnp.asarray(xb), "y": jnp.asarray(yb)})
    if scope == "global":
      norms.append(math.sqrt(sum(float(np.sum(v**2)) for v in g.values())))
    else:
      norms.extend(math.sqrt(float(np.sum(v**2))) for v in g.values())
  return np.array(norms)


def _batches(form, x, y):
  if form == "list":
    return _loss, [{"x": jnp.asarray(x[b]), "y": jnp.asarray(y[b])} for b in range(len(x))]
  if form == "generator":
    return _loss, ({"x": jnp.asarray(x[b]), "y": jnp.asarray(y[b])} for b in range(len(x)))
  if form == "stacked_array":
    return _loss_array, jnp.asarray(np.concatenate([x, y[..., None]], axis=-1))
  if form == "stacked_dict":
    return _loss, {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  assert form == "stacked_tuple"
  return _loss_tuple, (jnp.asarray(x), jnp.asarray(y))


def _flat(fisher):
  return {"kernel": fisher["dense"]["kernel"], "bias": fisher["dense"]["bias"],
          "head": fisher["head"]}


@pytest.mark.parametrize("form, clip", [
    ("list", None), ("generator", None), ("stacked_array", None), ("stacked_dict", None),
    ("stacked_tuple", None), ("list", "per_leaf"), ("list", "global"),
    ("stacked_dict", "per_leaf"), ("stacked_array", "global")])
def test_fisher_information_matches_plain_autodiff_loop(form, clip):
  params, x, y = _fisher_setup()
  clip_norm = None
  if clip is not None:
    norms = _np_norms(params, x, y, clip)
    clip_norm = float(np.median(norms))
    assert np.any(norms > clip_norm * 1.01) and np.any(norms < clip_norm * 0.99)
  loss_fn, batches = _batches(form, x, y)
  kwargs = {} if clip is None else {"clip_norm": clip_norm, "clip_scope": clip}
  fisher = gradtx.fisher_information(loss_fn, params, batches, **kwargs)
  expected = _np_fisher(params, x, y, clip_norm, clip or "per_leaf", per_example=False)
  for k, v in _flat(fisher).items():
    assert v.dtype == jnp.float32
    np.testing.assert_allclose(v, expected[k], rtol=2e-5, atol=1e-9, err_msg=k)
  if clip is not None:  # clipping, and its scope, change the answer: the test can tell
    other = "global" if clip == "per_leaf" else "per_leaf"
    for alternative in (_np_fisher(params, x, y, None, clip, per_example=False),
                        _np_fisher(params, x, y, clip_norm, other, per_example=False)):
      assert not all(np.allclose(expected[k], alternative[k], rtol=1e-3) for k in expected)


@pytest.mark.parametrize("form, clip", [("list", "per_leaf"), ("stacked_dict", "global")])
def test_fisher_information_per_example_matches_example_loop(form, clip):
  params, x, y = _fisher_setup()
  norms = _np_norms(params, x, y, clip, per_example=True)
  clip_norm = float(np.median(norms))  # clips about half of the examples (or leaves)
  loss_fn, batches = _batches(form, x, y)
  fisher = gradtx.fisher_information(loss_fn, params, batches, per_example=True,
                                     clip_norm=clip_norm, clip_scope=clip)
  expected = _np_fisher(params, x, y, clip_norm, clip, per_example=True)
  for k, v in _flat(fisher).items():
    np.testing.assert_allclose(v, expected[k], rtol=2e-5, atol=1e-9, err_msg=k)
  # Per-example is not per-batch, nor per-example unclipped.
  for alternative in (_np_fisher(params, x, y, clip_norm, clip, per_example=False),
                      _np_fisher(params, x, y, None, clip, per_example=True)):
    assert not all(np.allclose(expected[k], alternative[k], rtol=1e-3) for k in expected)


def test_fisher_information_of_bf16_params_accumulates_in_float32():
  params, x, y = _fisher_setup()
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  batches = {"x": jnp.asarray(x, jnp.bfloat16), "y": jnp.asarray(y, jnp.bfloat16)}
  fisher = gradtx.fisher_information(_loss, params, batches)
  expected = _np_fisher(params, x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), None,
                        "per_leaf", per_example=False)
  for k, v in _flat(fisher).items():
    assert v.dtype == jnp.float32, k
    # bf16 gradients (inside jit XLA may round intermediates differently from eager).
    np.testing.assert_allclose(v, expected[k], rtol=5e-2, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------- fisher_mask


def _fisher_tree(rng):
  return {"embed": jnp.asarray(rng.exponential(size=10), jnp.float32),
          "encoder": {"layer_0": {"kernel": jnp.asarray(rng.exponential(size=(6, 5)),
                                                        jnp.float32),
                                  "bias": jnp.asarray(rng.exponential(size=5), jnp.float32)},
                      "layer_1": {"kernel": jnp.asarray(rng.exponential(size=(5, 5)) * 3,
                                                        jnp.float32)}},
          "head": jnp.asarray(rng.exponential(size=5), jnp.float32)}


def _np_mask(fisher, p, included, scope):
  """numpy.percentile thresholding over the included paths (AliceMind's recipe)."""
  paths = gradtx.tree_paths(fisher)
  values = [np.asarray(v, np.float64) for v in jax.tree.leaves(fisher)]
  q = 100 * (1 - p)
  pool = np.concatenate([v.ravel() for path, v in zip(paths, values, strict=True)
                         if path in included])
  out = {}
  for path, v in zip(paths, values, strict=True):
    if path not in included:
      out[path] = np.ones(v.shape, bool)
    else:
      out[path] = v >= np.percentile(pool if scope == "global" else v, q)
  return out


@pytest.mark.parametrize("scope", ["global", "per_leaf"])
@pytest.mark.parametrize("p", [0.1, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("include", [None, r".*layer.*", [r"encoder/layer_0/.*", "head"]])
def test_fisher_mask_matches_numpy_percentile(scope, p, include):
  fisher = _fisher_tree(np.random.default_rng(6))
  paths = gradtx.tree_paths(fisher)
  if include is None:
    included = set(paths)
  elif isinstance(include, str):
    included = {p_ for p_ in paths if "layer" in p_}
  else:
    included = {"encoder/layer_0/kernel", "encoder/layer_0/bias", "head"}
  mask = gradtx.fisher_mask(fisher, p, include=include, scope=scope)
  expected = _np_mask(fisher, p, included, scope)
  for path, m in zip(gradtx.tree_paths(mask), jax.tree.leaves(mask), strict=True):
    assert m.dtype == jnp.bool_
    np.testing.assert_array_equal(m, expected[path], err_msg=path)
    if path not in included or p == 1.0:
      assert bool(np.all(m)), path
  # With distinct values, the global mask keeps ~p of the included values.
  if scope == "global":
    n = sum(np.size(expected[k]) for k in included)
    kept = sum(int(np.sum(expected[k])) for k in included)
    assert abs(kept - p * n) <= 1.0


def test_fisher_mask_refuses_a_non_finite_fisher_naming_the_leaf():
  """An overflowing gradient makes the Fisher inf; numpy.percentile would then give a NaN
  threshold and a mask that freezes every included leaf (checked here, as the failure
  the error prevents)."""
  params = {"layer": {"w": jnp.array([1.0, 2.0, 3.0])}, "head": jnp.array([1.0, 1.0])}
  batches = [jnp.array([1e20, 1.0, 2.0]), jnp.array([3.0, 0.5, 1.0])]
  fisher = gradtx.fisher_information(
      lambda p, b: jnp.sum(p["layer"]["w"] * b) + jnp.sum(p["head"]), params, batches)
  f = np.asarray(fisher["layer"]["w"], np.float64)
  assert np.isinf(f[0]) and np.all(np.isfinite(f[1:]))  # (1e20)² overflows float32
  with np.errstate(invalid="ignore"):
    assert not np.any(f >= np.percentile(f, 50.0))  # what a silent mask would be
  with pytest.raises(ValueError, match=r"fisher must be finite .*not finite at: "
                                       r"layer/w \(1 of 3\)"):
    gradtx.fisher_mask(fisher, 0.5)
  # A leaf left out of include may be anything: the included ones are ranked as numpy does.
  mask = gradtx.fisher_mask({"layer": {"w": jnp.asarray(f[1:])}, "head": fisher["layer"]["w"]},
                            0.5, include="layer/.*")
  np.testing.assert_array_equal(mask["layer"]["w"], f[1:] >= np.percentile(f[1:], 50.0))
  np.testing.assert_array_equal(mask["head"], [True, True, True])


@given(n=st.integers(1, 300), p=st.floats(0.01, 1.0), seed=st.integers(0, 2**32 - 1))
def test_fisher_mask_keeps_the_top_p_fraction(n, p, seed):
  values = np.random.default_rng(seed).permutation(n).astype(np.float32)  # distinct
  mask = np.asarray(gradtx.fisher_mask({"w": jnp.asarray(values)}, p)["w"])
  # np.percentile (linear) at q = 100(1-p) lies in [v_(k), v_(k+1)], k = floor((n-1)(1-p)):
  # the mask keeps the n-1-k largest, plus v_(k) when the threshold lands on it.
  k = math.floor((n - 1) * (1 - p) + 1e-9)
  kept = int(mask.sum())
  assert kept in (n - 1 - k, n - k)
  # ... and the kept ones are the largest.
  assert np.all(values[mask][:, None] > values[~mask][None, :])


# ----------------------------------------------------------------------------- AdamW reproduction


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(jnp.tanh(nn.Dense(5)(x)))


@functools.cache
def _model_setup(steps):
  rng = np.random.default_rng(7)
  model = _MLP()
  xs = rng.standard_normal((steps, 8, 4)).astype(np.float32)
  ys = rng.standard_normal((steps, 8, 2)).astype(np.float32)
  params = model.init(jax.random.key(0), jnp.asarray(xs[0]))

  def loss(params, x, y):
    return jnp.mean((model.apply(params, x) - y) ** 2)

  return params, jax.jit(jax.grad(loss)), xs, ys


def _np_child_tuning_adamw(params, grad_fn, xs, ys, masks, scale, lr, wd,
                           b1=0.9, b2=0.999, eps=1e-8):
  """ChildTuningAdamW.step, in numpy float64, written in optax.adamw's form.

  As in AliceMind: the gradient is masked (and, in F mode, multiplied by 1/p) BEFORE the
  moment updates; bias-corrected Adam; decoupled weight decay on ALL entries, masked or
  not. Two details of the original differ from optax.adamw, and this reference follows
  optax: (1) the original computes ``step_size = lr·sqrt(1-b2^t)/(1-b1^t)`` and
  ``denom = sqrt(v)+eps``, i.e. ``m̂/(sqrt(v̂) + eps/sqrt(1-b2^t))`` — its eps is scaled
  by 1/sqrt(1-b2^t), optax's is not; (2) the original decays the weights after the Adam
  step (``p -= lr·wd·p`` on the already-updated p), optax decays the pre-step p (a term
  of order lr²·wd). Following optax makes the comparison exact up to float32 rounding;
  the original's forms would shift each step by O(eps/|g|) and O(lr²·wd), which is not
  what these tests are about (where and when the mask applies).
  """
  treedef = jax.tree.structure(params)
  theta = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
  m = [np.zeros_like(x) for x in theta]
  v = [np.zeros_like(x) for x in theta]
  for t in range(1, len(xs) + 1):
    g32 = grad_fn(jax.tree.unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in theta]),
                  jnp.asarray(xs[t - 1]), jnp.asarray(ys[t - 1]))
    for i, (g, keep) in enumerate(zip(jax.tree.leaves(g32), jax.tree.leaves(masks[t - 1]),
                                      strict=True)):
      g = np.asarray(g, np.float64) * keep * scale  # masked BEFORE the moments
      m[i] = b1 * m[i] + (1 - b1) * g
      v[i] = b2 * v[i] + (1 - b2) * g**2
      m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
      theta[i] = theta[i] - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * theta[i])
  return jax.tree.unflatten(treedef, theta)


def _run_optax(tx, params, grad_fn, xs, ys):
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    updates, state = tx.update(grad_fn(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  for x, y in zip(xs, ys, strict=True):
    params, state = step(params, state, jnp.asarray(x), jnp.asarray(y))
  return params


def test_child_tuning_d_with_adamw_reproduces_original_optimizer():
  steps, lr, wd = 10, 1e-2, 0.1
  params, grad_fn, xs, ys = _model_setup(steps)
  rng = np.random.default_rng(8)
  mask = jax.tree.map(lambda p: rng.random(np.shape(p)) < 0.3, params)
  tx = optax.chain(gradtx.child_tuning_d(jax.tree.map(jnp.asarray, mask)),
                   optax.adamw(lr, weight_decay=wd))
  got = _run_optax(tx, params, grad_fn, xs, ys)
  expected = _np_child_tuning_adamw(params, grad_fn, xs, ys, [mask] * steps, 1.0, lr, wd)
  chex.assert_trees_all_close(jax.tree.map(lambda a: np.asarray(a, np.float64), got),
                              expected, rtol=1e-5, atol=1e-6)
  # Masked entries moved only by weight decay: θ_T = θ_0 (1 - lr·wd)^T.
  for g_, p0, m in zip(jax.tree.leaves(got), jax.tree.leaves(params), jax.tree.leaves(mask),
                       strict=True):
    np.testing.assert_allclose(np.asarray(g_)[~m], np.asarray(p0)[~m] * (1 - lr * wd)**steps,
                               rtol=1e-5)


def test_child_tuning_f_with_adamw_reproduces_original_optimizer():
  steps, lr, wd, p = 10, 1e-2, 0.1, 0.3
  params, grad_fn, xs, ys = _model_setup(steps)
  key = jax.random.key(9)
  # The masks this key draws (same key → same masks, whatever the gradient values).
  masks = [jax.tree.map(np.asarray, m) for m in f_masks(p, key, params, steps=steps)]
  tx = optax.chain(gradtx.child_tuning_f(p, key=key), optax.adamw(lr, weight_decay=wd))
  got = _run_optax(tx, params, grad_fn, xs, ys)
  # Rescaled by 1/p with the hash PRNG's rounded p (the rate the masks really have).
  expected = _np_child_tuning_adamw(params, grad_fn, xs, ys, masks,
                                    1.0 / p_effective(p, "hash"), lr, wd)
  chex.assert_trees_all_close(jax.tree.map(lambda a: np.asarray(a, np.float64), got),
                              expected, rtol=1e-5, atol=1e-6)
  # Sanity: the reference is sensitive to the masks (another key would not match).
  other = [jax.tree.map(np.asarray, m) for m in f_masks(p, jax.random.key(10), params,
                                                          steps=steps)]
  wrong = _np_child_tuning_adamw(params, grad_fn, xs, ys, other, 1.0 / p, lr, wd)
  assert not all(np.allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)
                 for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(wrong), strict=True))


# ----------------------------------------------------------------------------- placements


def test_gradient_vs_update_placement():
  """Masking the update freezes the dropped coordinates; masking the gradient does not."""
  steps, p, lr = 6, 0.3, 0.1
  q = p_effective(p, "hash")
  rng = np.random.default_rng(10)
  grads = {"w": jnp.asarray(rng.standard_normal((steps, 400)), jnp.float32)}
  key = jax.random.key(17)
  masks = [m["w"] for m in f_masks(p, key, {"w": grads["w"][0]}, steps=steps)]

  @jax.jit
  def run_all(grads):
    def run(tx):
      def body(state, g):
        u, state = tx.update(g, state)
        return state, u

      return jax.lax.scan(body, tx.init(jax.tree.map(lambda x: x[0], grads)), grads)[1]["w"]

    return (run(optax.chain(gradtx.child_tuning_f(p, key=key), optax.adam(lr))),
            run(optax.chain(optax.adam(lr), gradtx.child_tuning_f(p, key=key))),
            run(optax.adam(lr)))

  on_grad, on_update, plain = (np.asarray(x) for x in run_all(grads))
  ever_kept = np.zeros(400, bool)
  for t in range(steps):
    m = masks[t]
    # Update placement: dropped coordinates do not move; kept ones move by Adam's
    # (unmasked) update / p.
    np.testing.assert_array_equal(on_update[t][~m], 0.0)
    np.testing.assert_allclose(on_update[t][m], plain[t][m] / q, rtol=1e-6)
    # Gradient placement: a dropped coordinate still moves if its first moment holds an
    # earlier kept gradient; only never-kept coordinates stand still.
    moving = ~m & ever_kept
    assert np.all(on_grad[t][moving] != 0)
    np.testing.assert_array_equal(on_grad[t][~m & ~ever_kept], 0.0)
    if t >= 2:
      assert moving.sum() > 100
    ever_kept |= m


# ----------------------------------------------------------------------------- Su's claim


def test_su_gradient_dropout_acts_on_adam_like_lr_times_sqrt_p():
  """Su (kexue.fm/archives/8764): for a slowly varying gradient g with per-step noise,
  x = g ⊙ M / p has E[x] = E[g] and E[x²] = E[g²]/p, so Adam's m → E[g] and v → E[g²]/p;
  the step m/√v → √p · E[g]/√E[g²]: the mean step (the drift, i.e. the effective learning
  rate) is √p times Adam's. That is the claim tested here: the mean update over the
  stationary regime (steps 1000..2500, after v̂'s 1/(1-b2) ≈ 1000-step warm-up) for 1024
  coordinates per noise level σ ∈ {0, 2} (means μ = 1 and -0.5), within 5%.
  Sampling error: the update's fluctuation (RMS ≈ 0.23 lr, autocorrelation time
  (1+b1)/(1-b1) = 19 steps) gives a standard error ≲ 0.8% of the smallest drift; the
  m-v correlation and Jensen's bias of 1/√v add ≲ 1% (observed deviations ≲ 3%).
  What the claim does NOT say: the RMS step is not √p times Adam's; it is √(E[m²]/E[x²])
  with the EMA variance Var[m] = Var[x]·(1-b1)/(1+b1) (closed form checked below), which
  for noisy coordinates stays well above √p × Adam's (at σ = 2: 0.61 vs √0.1 ≈ 0.32, and
  0.71 vs √0.3 ≈ 0.55).
  """
  n, steps, window, lr = 2048, 2500, 1500, 1.0
  b1 = 0.9
  mu = np.where(np.arange(n) % 2 == 0, 1.0, -0.5)
  sigma = np.repeat([0.0, 2.0], n // 2)
  mu_j, sigma_j = jnp.asarray(mu, jnp.float32), jnp.asarray(sigma, jnp.float32)

  @jax.jit
  def stationary_updates(p):
    def run(tx):
      def body(state, k):
        u, state = tx.update(mu_j + sigma_j * jax.random.normal(k, (n,)), state)
        return state, u

      keys = jax.random.split(jax.random.key(18), steps)
      return jax.lax.scan(body, tx.init(mu_j), keys)[1][-window:]

    return (run(optax.adam(lr)),
            run(optax.chain(gradtx.child_tuning_f(p, key=jax.random.key(19)),
                            optax.adam(lr))))

  def closed_form(p):
    ex2 = (mu**2 + sigma**2) / p  # E[x²]; E[x] = μ
    mean = -lr * mu / np.sqrt(ex2)
    em2 = mu**2 + (ex2 - mu**2) * (1 - b1) / (1 + b1)
    return mean, lr * np.sqrt(em2 / ex2)

  for p in (0.1, 0.3):
    adam, drop = (np.asarray(x, np.float64) for x in stationary_updates(p))
    q = p_effective(p, "hash")
    mean_cf, rms_cf = closed_form(q)
    for s in np.unique(sigma):
      group = sigma == s
      sign = -np.sign(mu[group])
      drift_adam = float(np.mean(adam[:, group] * sign))
      drift_drop = float(np.mean(drop[:, group] * sign))
      ratio = drift_drop / drift_adam
      assert ratio == pytest.approx(math.sqrt(q), rel=0.05), (p, s, ratio, math.sqrt(q))
      assert drift_drop == pytest.approx(float(np.mean(mean_cf[group] * sign)), rel=0.05)
      rms = math.sqrt(float(np.mean(drop[:, group] ** 2)))
      rms_expected = math.sqrt(float(np.mean(rms_cf[group] ** 2)))
      assert rms == pytest.approx(rms_expected, rel=0.05), (p, s, rms, rms_expected)
      if s == 2.0:  # noise-dominated: the RMS step shrinks by clearly less than √p
        rms_adam = math.sqrt(float(np.mean(adam[:, group] ** 2)))
        assert rms / rms_adam > 1.15 * math.sqrt(q), (p, rms / rms_adam)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan")])
def test_reserve_p_outside_unit_interval_is_rejected(bad):
  with pytest.raises(ValueError, match=rf"reserve_p must be in \(0\.0, 1\.0\], got {bad!r}"):
    gradtx.child_tuning_f(bad, key=jax.random.key(0))
  with pytest.raises(ValueError, match=rf"reserve_p must be in \(0\.0, 1\.0\], got {bad!r}"):
    gradtx.fisher_mask({"w": jnp.ones(3)}, bad)


def test_child_tuning_f_bad_options_are_rejected():
  with pytest.raises(ValueError, match=r"prng must be one of 'hash', 'jax', got 'numpy'"):
    gradtx.child_tuning_f(0.5, key=jax.random.key(0), prng="numpy")
  with pytest.raises(TypeError, match=r"key must be a jax.random key .*got 0"):
    gradtx.child_tuning_f(0.5, key=0)
  with pytest.raises(TypeError, match=r"key must be a jax.random key"):
    gradtx.child_tuning_f(0.5, key=np.zeros(2, np.float32))
  with pytest.raises(ValueError,
                     match=r"key must be a single key \(shape \(\)\), got shape \(2,\)"):
    gradtx.child_tuning_f(0.5, key=jax.random.split(jax.random.key(0)))
  with pytest.raises(TypeError, match=r"rescale must be a bool, got 1"):
    gradtx.child_tuning_f(0.5, key=jax.random.key(0), rescale=1)


def test_child_tuning_d_mask_errors_name_the_paths():
  params = {"enc": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}, "head": jnp.ones(2)}
  tx = gradtx.child_tuning_d({"enc": {"w": jnp.ones((2, 3), bool)}})
  with pytest.raises(ValueError, match=r"mask has no leaf for the params paths "
                                       r"\['enc/b', 'head'\]"):
    tx.init(params)
  tx = gradtx.child_tuning_d({"enc": {"w": jnp.ones((3, 2), bool), "b": jnp.ones(3, bool)},
                              "head": jnp.ones(2, bool)})
  with pytest.raises(ValueError, match=r"shapes differ at 'enc/w': mask \(3, 2\) vs params "
                                       r"\(2, 3\)"):
    tx.init(params)
  with pytest.raises(TypeError, match=r"not boolean: 'enc/w' \(float32\)"):
    gradtx.child_tuning_d({"enc": {"w": jnp.ones((2, 3)), "b": jnp.ones(3, bool)}})
  with pytest.raises(TypeError, match=r"rescale must be a bool"):
    gradtx.child_tuning_d({"w": jnp.ones(2, bool)}, rescale="yes")


def test_fisher_mask_errors():
  fisher = {"layer_0": jnp.ones(4), "head": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"include: rule 'encoder.\*' matches no leaf path"):
    gradtx.fisher_mask(fisher, 0.5, include=["layer_.*", "encoder.*"])
  with pytest.raises(ValueError, match=r"scope must be one of 'global', 'per_leaf', "
                                       r"got 'per_layer'"):
    gradtx.fisher_mask(fisher, 0.5, scope="per_layer")
  with pytest.raises(TypeError, match=r"reserve_p must be a number in \(0, 1\]"):
    gradtx.fisher_mask(fisher, optax.constant_schedule(0.5))


def test_fisher_information_errors():
  params, x, y = _fisher_setup()
  batches = [{"x": jnp.asarray(x[0]), "y": jnp.asarray(y[0])}]
  for bad in (0, -1.0):
    with pytest.raises(ValueError, match=rf"clip_norm must be a finite number > 0, got {bad}"):
      gradtx.fisher_information(_loss, params, batches, clip_norm=bad)
  with pytest.raises(ValueError, match=r"clip_scope must be one of 'per_leaf', 'global', "
                                       r"got 'layer'"):
    gradtx.fisher_information(_loss, params, batches, clip_norm=1.0, clip_scope="layer")
  with pytest.raises(TypeError, match=r"per_example must be a bool"):
    gradtx.fisher_information(_loss, params, batches, per_example=1)
  with pytest.raises(TypeError, match=r"loss_fn must be callable"):
    gradtx.fisher_information("loss", params, batches)
  for empty in ([], (b for b in [])):
    with pytest.raises(ValueError, match=r"batches must yield at least one batch, got none"):
      gradtx.fisher_information(_loss, params, empty)
  with pytest.raises(ValueError, match=r"batches must hold at least one array"):
    gradtx.fisher_information(_loss, params, {})
  with pytest.raises(ValueError, match=r"batches must yield at least one batch"):
    gradtx.fisher_information(_loss_array, params, jnp.zeros((0, 6, 4)))
  with pytest.raises(ValueError, match=r"same number of batches \(axis 0\).*x: 5.*y: 4"):
    gradtx.fisher_information(_loss, params, {"x": jnp.asarray(x), "y": jnp.asarray(y[:4])})


def test_fisher_mask_empty_include_is_an_error():
  with pytest.raises(ValueError, match=r"include must hold at least one path regex"):
    gradtx.fisher_mask({"a": jnp.ones(3)}, 0.5, include=[])


def test_fisher_information_of_stacked_batches_runs_under_jit():
  loss = lambda p, b: jnp.mean(b @ p["w"]) ** 2
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)}
  batches = jnp.arange(40.0).reshape(5, 2, 4) / 40
  jitted = jax.jit(lambda p: gradtx.fisher_information(loss, p, batches))(params)
  want = np.mean([np.square(np.asarray(jax.grad(loss)(params, b)["w"])) for b in batches], 0)
  np.testing.assert_allclose(jitted["w"], want, rtol=1e-5, atol=1e-8)


def test_child_tuning_d_from_a_traced_mask():
  """Masks may be traced: one vmapped run per seed's mask, each like its own numpy mask."""
  masks = np.array([[True, False, True, True], [False, False, True, False]])
  g = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}

  def run(mask, rescale):
    tx = gradtx.child_tuning_d({"w": mask}, rescale=rescale)
    return tx.update(g, tx.init(g))[0]["w"]

  for rescale in (False, True):
    got = jax.vmap(lambda m, r=rescale: run(m, r))(jnp.asarray(masks))
    want = np.where(masks, np.asarray(g["w"]), 0.0)
    if rescale:
      want = want / masks.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, err_msg=str(rescale))
