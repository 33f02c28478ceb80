"""Zeroth-order fine-tuning: zo_sgd_step (MeZO), masks, low rank (LOZO), HiZOO, ZO-SGD-Sign.

References are numpy (float64) computations from the documented noise (the draws are
rebuilt here from ``jax.random`` primitives and the documented keys), closed forms, and
compiled memory (``memory_analysis``). Statistical bounds are 5 standard errors.
"""

import functools
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
import scipy.stats

import gradtx
from gradtx.estimators import _common

V_TAG = 0x5AB5


def _crc(path):
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


def _triple32(x):
  for shift, multiplier in ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB)):
    x = (x ^ (x >> np.uint32(shift))) * np.uint32(multiplier)
  return x ^ (x >> np.uint32(14))


def documented_draw(leaf_key, shape, noise="gaussian"):
  """A leaf's documented noise in numpy: the counter hash of each entry, then the
  Gaussian (``√2 erfinv(u)``, scipy in float64) or Rademacher transform."""
  s0, s1 = (np.uint32(s) for s in np.asarray(jax.random.bits(leaf_key, (2,), jnp.uint32)))
  k = np.arange(int(np.prod(shape)), dtype=np.uint32)
  h = _triple32(_triple32(k * (s1 | np.uint32(1)) + s0) ^ s1)
  if noise == "rademacher":
    return (1.0 - 2.0 * (h >> np.uint32(31))).reshape(shape)
  unit = ((h >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1)
  low = np.nextafter(np.float32(-1), np.float32(1))
  uniform = np.maximum(low, unit * (np.float32(1) - low) + low).astype(np.float64)
  return (np.sqrt(2.0) * scipy.special.erfinv(uniform)).reshape(shape)


def reference_noise(key, index, shapes, *, rank=None, subspace_key=None, masks=None):
  """The documented draw of member ``index`` (numpy float64), by path."""
  member = jax.random.fold_in(key, index)
  out = {}
  for path, shape in shapes.items():
    leaf_key = jax.random.fold_in(member, _crc(path))
    size = int(np.prod(shape))
    if rank is not None and len(shape) >= 2:
      m, n = size // shape[-1], shape[-1]
      u = documented_draw(leaf_key, (m, rank))
      base = member if subspace_key is None else subspace_key
      v_key = jax.random.fold_in(jax.random.fold_in(base, _crc(path)), V_TAG)
      v = documented_draw(v_key, (n, rank))
      z = (u @ v.T / np.sqrt(rank)).reshape(shape)
    else:
      z = documented_draw(leaf_key, shape)
    if masks is not None and path in masks:
      z = np.where(masks[path], z, 0.0)
    out[path] = z
  return out


def _mlp_loss(p):
  x = jnp.linspace(-1.0, 1.0, 24).reshape(4, 6)
  return jnp.mean(jnp.tanh(x @ p["a"]) @ p["b"]) + 0.1 * jnp.sum(p["c"] ** 2)


def _np_mlp_loss(p):
  x = np.linspace(-1.0, 1.0, 24).reshape(4, 6)
  return np.mean(np.tanh(x @ p["a"]) @ p["b"]) + 0.1 * np.sum(p["c"] ** 2)


PARAMS = {"a": jnp.linspace(-0.5, 0.5, 18).reshape(6, 3), "b": jnp.array([0.3, -0.2, 0.1]),
          "c": jnp.linspace(0.0, 1.0, 5)}
SHAPES = {"a": (6, 3), "b": (3,), "c": (5,)}


def _np(tree):
  return {k: np.asarray(v, np.float64) for k, v in tree.items()}


# --------------------------------------------------------------------------------------
# zo_sgd_step: the MeZO step against numpy.


@pytest.mark.parametrize("kw", [
    {},
    {"rank": 2},
    {"mask": {"a": np.arange(18).reshape(6, 3) % 2 == 0, "b": False, "c": True}},
])
@pytest.mark.parametrize("sign", [False, True])
def test_zo_sgd_step_equals_numpy_reference(kw, sign):
  key, sigma, lr = jax.random.key(7), 0.01, 0.1
  masks = None
  if "mask" in kw:
    masks = {k: np.broadcast_to(v, SHAPES[k]) for k, v in kw["mask"].items()}
  z = reference_noise(key, 0, SHAPES, rank=kw.get("rank"), masks=masks)
  theta = _np(PARAMS)
  plus = _np_mlp_loss({k: theta[k] + sigma * z[k] for k in theta})
  minus = _np_mlp_loss({k: theta[k] - sigma * z[k] for k in theta})
  if sign:  # ZO-SGD-Sign: every perturbed entry moves by exactly lr
    want = {k: theta[k] - lr * np.sign(plus - minus) * np.sign(z[k]) for k in theta}
  else:
    want = {k: theta[k] - lr * (plus - minus) / (2 * sigma) * z[k] for k in theta}
  step = jax.jit(functools.partial(gradtx.zo_sgd_step, _mlp_loss, sigma=sigma,
                                   learning_rate=lr, sign=sign, **kw))
  new, loss = step(PARAMS, key)
  for k in theta:
    np.testing.assert_allclose(np.asarray(new[k]), want[k], rtol=1e-5, atol=2e-6, err_msg=k)
  assert float(loss) == pytest.approx((plus + minus) / 2, rel=1e-5)
  if "mask" in kw:  # the frozen leaf is passed through bit for bit
    np.testing.assert_array_equal(new["b"], PARAMS["b"])


def test_zo_sgd_step_on_a_large_leaf_equals_numpy_and_updates_in_place():
  """A leaf of 200,003 entries (the counter hash far past small sizes): the documented
  draw, and the donated params updated in their own buffer."""
  size = 200_003
  theta = jnp.linspace(-1.0, 1.0, size)
  c = np.cos(np.arange(size) / 7.0)
  f = lambda p: jnp.sum(jnp.asarray(c, jnp.float32) * p["w"]) + jnp.sum(p["w"] ** 2) / size
  key, sigma, lr = jax.random.key(3), 0.05, 0.01
  z = reference_noise(key, 0, {"w": (size,)})["w"]
  t = np.asarray(theta, np.float64)
  fn = lambda w: np.sum(c * w) + np.sum(w**2) / size
  slope = (fn(t + sigma * z) - fn(t - sigma * z)) / (2 * sigma)
  step = jax.jit(functools.partial(gradtx.zo_sgd_step, f, sigma=sigma, learning_rate=lr),
                 donate_argnums=0)
  params = {"w": theta + 0.0}
  new, _ = step(params, key)
  assert params["w"].is_deleted()  # donated: updated in place
  np.testing.assert_allclose(np.asarray(new["w"]), t - lr * slope * z, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_the_counter_hash_noise_equals_numpy(noise):
  key = jax.random.key(11)
  got = _common.draw(key, (3, 70_001), noise, jnp.float32)
  # float32 erfinv against scipy's float64: 6e-6 relative in the tails (|z| > 3.5).
  np.testing.assert_allclose(np.asarray(got, np.float64),
                             documented_draw(key, (3, 70_001), noise), rtol=1e-5, atol=1e-6)


def test_the_counter_hash_noise_is_standard_normal_and_independent():
  """2^20 draws of one leaf, and of two other leaf keys: moments, the normal CDF, and
  correlations along the counter, between keys and between squares, within 5 standard
  errors (the exact Gaussian moments: HiZOO's Hessian estimate relies on E z⁴ = 3)."""
  n = 1 << 20
  z, a, b = (np.asarray(_common.draw(jax.random.fold_in(jax.random.key(5), i), (n,),
                                      "gaussian", jnp.float32), np.float64) for i in range(3))
  se = 1 / np.sqrt(n)
  assert abs(z.mean()) < 5 * se
  assert abs(z.var() - 1) < 5 * np.sqrt(2) * se
  assert abs(np.mean(z**4) - 3) < 5 * np.sqrt(96) * se
  assert scipy.stats.kstest(z, "norm").pvalue > 1e-4
  for x, y in ((z[:-1], z[1:]), (z[:-2], z[2:]), (z, a), (a, b), (z**2 - 1, a**2 - 1),
               (z[:-1] ** 2 - 1, z[1:] ** 2 - 1)):
    assert abs(np.corrcoef(x, y)[0, 1]) < 5 * se


@pytest.mark.parametrize("sign", [False, True])
def test_zo_sgd_step_is_sgd_on_the_es_estimate_of_one_pair(sign):
  key = jax.random.key(1)
  for kw in ({}, {"rank": 1}, {"mask": gradtx.magnitude_mask(0.5)}):
    new, _ = gradtx.zo_sgd_step(_mlp_loss, PARAMS, key, sigma=0.02, learning_rate=0.3,
                                sign=sign, **kw)
    g = gradtx.es_gradient(_mlp_loss, PARAMS, key, sigma=0.02, num_samples=2, **kw)
    g = jax.tree.map(jnp.sign, g) if sign else g
    chex.assert_trees_all_close(new, jax.tree.map(lambda p, d: p - 0.3 * d, PARAMS, g),
                                rtol=1e-5, atol=1e-6)


def _packed_mlp(num_params, batch=64):
  hidden = round(num_params / 74)
  x = jax.ShapeDtypeStruct((batch, 64), jnp.float32)
  params = {"w": jax.ShapeDtypeStruct((74, hidden), jnp.float32)}

  def loss(p, x):
    logits = jax.nn.relu(x @ p["w"][:64]) @ p["w"][64:].T
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0])

  return loss, params, x, 74 * hidden * 4


def _temp(fn, *args, donate=()):
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("sign", [False, True])
def test_zo_sgd_step_memory_is_a_forward_pass_plus_one_parameter_buffer(sign):
  """Compiled temporaries (1M parameters, compile only): at most one forward pass's plus
  one parameter-sized buffer and 4 KiB of scalars (no RNG state: the noise is a counter
  hash fused into its use); below the materialised one-pair step's (with ``sign``: below
  the sign of the materialised estimate, ZO-SGD-Sign as a chain computes it)."""
  loss, params, x, nbytes = _packed_mlp(1_000_000)
  key = jax.random.key(0)
  forward = _temp(loss, params, x)
  step = _temp(lambda p, x, k: gradtx.zo_sgd_step(lambda q: loss(q, x), p, k, sigma=1e-3,
                                                  learning_rate=1e-3, sign=sign),
               params, x, key, donate=(0,))

  def materialised(p, x, k):
    g = gradtx.es_gradient(lambda q: loss(q, x), p, k, sigma=1e-3, num_samples=2)
    return jax.tree.map(lambda a, b: a - 1e-3 * (jnp.sign(b) if sign else b), p, g)

  default = _temp(materialised, params, x, key, donate=(0,))
  assert step <= forward + nbytes + 4096, (step, forward, nbytes)
  assert step < 0.8 * default, (step, default)


def test_lean_es_memory_is_bounded_by_parameter_buffers():
  """(Issue #12) lean temporaries from compiled memory, not a jaxpr grep (which misses a
  materialised (32, 2, D) population): a few parameter-sized buffers over the forward's,
  and far below the default mode's."""
  loss, params, x, nbytes = _packed_mlp(200_000, batch=16)
  key = jax.random.key(0)
  forward = _temp(loss, params, x)
  est = lambda lean: _temp(lambda p, x, k: gradtx.es_gradient(
      lambda q: loss(q, x), p, k, sigma=0.1, num_samples=64, lean=lean), params, x, key)
  lean, default = est(True), est(False)
  assert lean <= forward + 3 * nbytes + 4096, (lean, forward, nbytes)
  assert lean < 0.1 * default, (lean, default)


# --------------------------------------------------------------------------------------
# Masks (Sparse MeZO).


def test_es_with_a_mask_equals_numpy_and_skips_frozen_leaves():
  key, sigma, n = jax.random.key(2), 0.05, 6
  mask = {"a": np.arange(18).reshape(6, 3) % 3 == 0, "b": np.zeros(3, bool), "c": True}
  got = gradtx.es_gradient(_mlp_loss, PARAMS, key, sigma=sigma, num_samples=n, mask=mask)
  masks = {k: np.broadcast_to(v, SHAPES[k]) for k, v in mask.items()}
  theta = _np(PARAMS)
  want = {k: np.zeros(SHAPES[k]) for k in theta}
  for j in range(n // 2):
    z = reference_noise(key, j, SHAPES, masks=masks)
    diff = (_np_mlp_loss({k: theta[k] + sigma * z[k] for k in theta})
            - _np_mlp_loss({k: theta[k] - sigma * z[k] for k in theta}))
    for k in theta:
      want[k] += diff * z[k] / (n * sigma)
  for k in theta:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-4, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(got["b"], np.zeros(3))
  assert np.all(np.asarray(got["a"])[~masks["a"]] == 0)
  # A frozen leaf draws nothing: no random bits of its size in the program.
  text = str(jax.make_jaxpr(lambda p: gradtx.es_gradient(
      _mlp_loss, p, key, sigma=sigma, num_samples=2,
      mask={"a": True, "b": True, "c": False}))(PARAMS))
  assert "random_bits" in text or "threefry" in text
  assert "u32[5]" not in text and "f32[5]" in text  # c's noise never drawn


def test_masked_es_estimates_the_masked_gradient():
  """Unbiased for ``m ⊙ ∇f`` on a linear function; zero outside the mask."""
  w = np.array([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])
  m = np.array([True, False, True, True, False, True])
  f = lambda p: jnp.dot(p["w"], jnp.asarray(w, jnp.float32))
  draws = np.asarray(jax.jit(jax.vmap(lambda k: gradtx.es_gradient(
      f, {"w": jnp.zeros(6)}, k, sigma=0.1, num_samples=8, mask={"w": m})["w"]))(
          jax.random.split(jax.random.key(0), 500)), np.float64)
  gm = w * m
  se = np.sqrt((gm @ gm + gm**2) / 4 / 500)  # 4 Gaussian pairs
  assert np.all(np.abs(draws.mean(0) - gm) < 5 * se + 1e-6)
  assert np.all(draws[:, ~m] == 0)


def test_magnitude_mask_matches_numpy_quantiles():
  rng = np.random.default_rng(0)
  params = {"a": rng.normal(size=(8, 5)).astype(np.float32), "b": rng.normal(size=7)}
  mask = gradtx.magnitude_mask(0.3)(jax.tree.map(jnp.asarray, params))
  for k, v in params.items():
    a = np.abs(v.astype(np.float32)).astype(np.float64)
    np.testing.assert_array_equal(np.asarray(mask[k]), a <= np.quantile(a, 0.3), err_msg=k)


def test_a_fisher_mask_is_a_mask():
  fisher = {"a": jnp.arange(18.0).reshape(6, 3), "b": jnp.ones(3), "c": jnp.arange(5.0)}
  mask = gradtx.fisher_mask(fisher, 0.25, include=["a"])
  new, _ = gradtx.zo_sgd_step(_mlp_loss, PARAMS, jax.random.key(0), sigma=0.01,
                              learning_rate=1.0, mask=mask)
  moved = np.asarray(new["a"]) != np.asarray(PARAMS["a"])
  np.testing.assert_array_equal(moved, np.asarray(mask["a"]))


# --------------------------------------------------------------------------------------
# Low rank (LOZO).


def test_low_rank_es_is_unbiased_with_the_variance_of_its_noise():
  """On a linear function the one-pair estimate is ``(g·z) z``: its mean is ``g`` (the
  noise has identity covariance) and its per-coordinate variance is that of the
  documented noise, computed in numpy from independent ``U``, ``V`` draws; it exceeds
  the dense estimator's ``‖g‖² + g_k²``."""
  m, n, r = 4, 3, 2
  g = np.linspace(-1.0, 1.5, m * n).reshape(m, n)
  f = lambda p: jnp.sum(p["w"] * jnp.asarray(g, jnp.float32))
  reps = 3000
  draws = np.asarray(jax.jit(jax.vmap(lambda k: gradtx.es_gradient(
      f, {"w": jnp.zeros((m, n))}, k, sigma=0.1, num_samples=2, rank=r)["w"]))(
          jax.random.split(jax.random.key(5), reps)), np.float64)
  rng = np.random.default_rng(0)
  u, v = rng.normal(size=(200_000, m, r)), rng.normal(size=(200_000, n, r))
  z = np.einsum("kmr,knr->kmn", u, v) / np.sqrt(r)
  est = np.einsum("kmn,mn->k", z, g)[:, None, None] * z
  var = est.var(0)
  assert np.all(np.abs(draws.mean(0) - g) < 5 * np.sqrt(var / reps))
  ratio = draws.var(0, ddof=1) / var
  assert np.all((ratio > 0.75) & (ratio < 1.3)), ratio
  dense = g.ravel() @ g.ravel() + g**2
  assert np.all(var > dense)


def test_low_rank_es_equals_numpy_with_a_subspace_key():
  key, sub, sigma = jax.random.key(4), jax.random.key(40), 0.05
  got = gradtx.es_gradient(_mlp_loss, PARAMS, key, sigma=sigma, num_samples=4, rank=2,
                           subspace_key=sub)
  theta = _np(PARAMS)
  want = {k: np.zeros(SHAPES[k]) for k in theta}
  for j in range(2):
    z = reference_noise(key, j, SHAPES, rank=2, subspace_key=sub)
    diff = (_np_mlp_loss({k: theta[k] + sigma * z[k] for k in theta})
            - _np_mlp_loss({k: theta[k] - sigma * z[k] for k in theta}))
    for k in theta:
      want[k] += diff * z[k] / (4 * sigma)
  for k in theta:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_resample_every_keeps_the_subspace_for_k_steps():
  """LOZO: within a window of k steps every estimate of a matrix leaf lies in the same
  r-dimensional row space (rank of the stacked estimates = r); across windows it grows."""
  m, n, r, k = 6, 5, 2, 3
  g = np.linspace(-1.0, 1.0, m * n).reshape(m, n)
  f = lambda p: jnp.sum(p["w"] * jnp.asarray(g, jnp.float32))
  tx = gradtx.zeroth_order("es", key=jax.random.key(0), sigma=0.1, num_samples=2,
                           rank=r, resample_every=k)
  params = {"w": jnp.zeros((m, n))}
  state = tx.init(params)
  step = jax.jit(lambda s: tx.update(params, s, params, loss_fn=f))
  estimates = []
  for _ in range(2 * k):
    u, state = step(state)
    estimates.append(np.asarray(u["w"], np.float64))
  rank_of = lambda mats: np.linalg.matrix_rank(np.concatenate(mats, 0), tol=1e-5)
  assert rank_of(estimates[:k]) == r and rank_of(estimates[k:]) == r
  assert rank_of(estimates) > r


# --------------------------------------------------------------------------------------
# ZO-SGD-Sign.


def test_sign_estimate_has_the_documented_mean():
  """One Gaussian pair on a linear function: ``E sign(ĝ_k) = (2/π) arcsin(g_k/‖g‖)``."""
  g = np.array([1.0, -2.0, 0.5, 3.0])
  f = lambda p: jnp.dot(p["w"], jnp.asarray(g, jnp.float32))
  tx = gradtx.zeroth_order("sign", key=jax.random.key(0), sigma=0.1, num_samples=2)
  params = {"w": jnp.zeros(4)}

  def run(state, _):
    u, state = tx.update(params, state, params, loss_fn=f)
    return state, u["w"]

  _, draws = jax.jit(lambda s: jax.lax.scan(run, s, None, length=4000))(tx.init(params))
  draws = np.asarray(draws, np.float64)
  assert set(np.unique(draws)) <= {-1.0, 1.0}
  want = 2 / np.pi * np.arcsin(g / np.linalg.norm(g))
  se = np.sqrt((1 - want**2) / draws.shape[0])
  assert np.all(np.abs(draws.mean(0) - want) < 5 * se), (draws.mean(0), want)


# --------------------------------------------------------------------------------------
# HiZOO.


def test_hizoo_equals_numpy_reference():
  key, sigma, alpha, damping = jax.random.key(8), 0.05, 0.3, 0.1
  hessian = {k: np.full(SHAPES[k], 2.0) - np.linspace(0, 3, int(np.prod(SHAPES[k]))).reshape(
      SHAPES[k]) for k in SHAPES}
  got_g, got_h = gradtx.hizoo_gradient(
      _mlp_loss, PARAMS, key, sigma=sigma, num_samples=4, alpha=alpha, damping=damping,
      hessian_diag=jax.tree.map(lambda h: jnp.asarray(h, jnp.float32), hessian))
  theta = _np(PARAMS)
  curv = {k: np.abs(h) + damping for k, h in hessian.items()}
  f0 = _np_mlp_loss(theta)
  g = {k: np.zeros(SHAPES[k]) for k in theta}
  h_hat = {k: np.zeros(SHAPES[k]) for k in theta}
  for j in range(2):
    u = reference_noise(key, j, SHAPES)
    zz = {k: u[k] / np.sqrt(curv[k]) for k in theta}
    plus = _np_mlp_loss({k: theta[k] + sigma * zz[k] for k in theta})
    minus = _np_mlp_loss({k: theta[k] - sigma * zz[k] for k in theta})
    for k in theta:
      g[k] += (plus - minus) / (2 * sigma) * zz[k] / 2
      h_hat[k] += curv[k] * (plus + minus - 2 * f0) / (2 * sigma**2) * (u[k] ** 2 - 1) / 2
  for k in theta:
    np.testing.assert_allclose(np.asarray(got_g[k]), g[k], rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(np.asarray(got_h[k]), (1 - alpha) * hessian[k] + alpha * h_hat[k],
                               rtol=2e-3, atol=2e-3, err_msg=k)


def test_hizoo_hessian_converges_to_the_diagonal_of_a_quadratic():
  """Eight independent runs (keys) of 20,000 steps: the mean of their Hessian diagonals."""
  a = np.array([0.5, 2.0, 8.0, 30.0])
  f = lambda p: 0.5 * jnp.sum(jnp.asarray(a, jnp.float32) * (p["w"] - 1.0) ** 2)
  params = {"w": jnp.zeros(4)}

  def final_hessian(key):
    tx = gradtx.zeroth_order("hizoo", key=key, sigma=1e-2, alpha=5e-4, num_samples=2)

    def run(state, _):
      _, state = tx.update(params, state, params, loss_fn=f)
      return state, None

    state, _ = jax.lax.scan(run, tx.init(params), None, length=20_000)
    return optax.tree_utils.tree_get(state, "hessian_diag")["w"]

  runs = np.asarray(jax.jit(jax.vmap(final_hessian))(jax.random.split(jax.random.key(1), 8)))
  # One run's EMA over ~1/α = 2000 samples of Ĥ_k (variance ≈ (d + 2)·A_k² each, heavy
  # tailed) has a spread of about 10% of A_k (measured over keys); the mean of 8, ~4%.
  np.testing.assert_allclose(runs.mean(0), a, rtol=0.2)


def test_hizoo_preconditions_the_gradient():
  """With the exact diagonal as H (and no damping) the estimate's mean is ``Σ ∇f``."""
  a = np.array([1.0, 4.0, 16.0])
  theta = np.array([1.0, 1.0, 1.0])
  f = lambda p: 0.5 * jnp.sum(jnp.asarray(a, jnp.float32) * p["w"] ** 2)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: gradtx.hizoo_gradient(
      f, {"w": jnp.asarray(theta, jnp.float32)}, k, sigma=1e-2, damping=0.0, num_samples=8,
      hessian_diag={"w": jnp.asarray(a, jnp.float32)})[0]["w"]))(
          jax.random.split(jax.random.key(2), 2000)), np.float64)
  want = a * theta / a  # Σ∇f = A⁻¹ A θ
  assert np.all(np.abs(draws.mean(0) - want) < 5 * draws.std(0) / np.sqrt(2000) + 1e-6)


def test_zeroth_order_hizoo_state_and_masked_entries():
  mask = {"a": True, "b": False, "c": np.array([True, False, True, False, True])}
  tx = gradtx.zeroth_order("hizoo", key=jax.random.key(0), sigma=0.01, alpha=0.5, mask=mask)
  state = tx.init(PARAMS)
  np.testing.assert_array_equal(optax.tree_utils.tree_get(state, "hessian_diag")["b"],
                                np.ones(3))
  u, state = jax.jit(lambda s: tx.update(PARAMS, s, PARAMS, loss_fn=_mlp_loss))(state)
  h = optax.tree_utils.tree_get(state, "hessian_diag")
  np.testing.assert_array_equal(h["b"], np.ones(3))
  np.testing.assert_array_equal(np.asarray(h["c"])[[1, 3]], [1.0, 1.0])
  assert not np.allclose(np.asarray(h["a"]), 1.0)
  np.testing.assert_array_equal(u["b"], np.zeros(3))


def test_zeroth_order_hizoo_under_inject_hyperparams():
  injected = optax.inject_hyperparams(gradtx.zeroth_order, static_args=(
      "estimator", "key", "num_samples"))(estimator="hizoo", key=jax.random.key(3),
                                          sigma=0.01, num_samples=2, alpha=0.1)
  plain = gradtx.zeroth_order("hizoo", key=jax.random.key(3), sigma=0.01, num_samples=2,
                              alpha=0.1)
  got, s1 = jax.jit(lambda s: injected.update(PARAMS, s, PARAMS, loss_fn=_mlp_loss))(
      injected.init(PARAMS))
  want, s2 = plain.update(PARAMS, plain.init(PARAMS), PARAMS, loss_fn=_mlp_loss)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(optax.tree_utils.tree_get(s1, "hessian_diag"),
                              optax.tree_utils.tree_get(s2, "hessian_diag"), rtol=1e-5)
