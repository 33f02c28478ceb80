"""Tests of gradtx/curvature.py against independent references.

References: Lloyd's K-means step and the soft-assignment EM step written in numpy (on
sklearn's digits, float64); Hessians from ``jax.hessian`` (plain autodiff) or closed forms;
Hutchinson's variance ``Σ_{j≠i} H_ij² / S`` (measured over many draws); the documented
``g / (max(h, 0) + λ)`` in numpy; the Gauss–Newton diagonal of a small softmax model with
closed-form Jacobians (numpy float64), against which the GNB estimator's expectation is
checked exactly by enumerating labels; and a numpy transcription of Sophia's Algorithm 1
(Liu et al., arXiv:2305.14342) for the documented Sophia-H / Sophia-G recipe.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import gradtx

SIGMAS = 5.0
K = 10


# ----------------------------------------------------------------------------- K-means = Newton


@pytest.fixture(scope="module")
def digits():
  data = load_digits()
  x = data.data.astype(np.float64)
  first_of_each = [int(np.flatnonzero(data.target == k)[0]) for k in range(K)]
  return x, x[first_of_each].copy()  # every cluster starts non-empty


def sq_distances(x, c, xp):
  return xp.sum((x[:, None, :] - c[None, :, :]) ** 2, axis=-1)  # (N, K)


def np_lloyd(x, c):
  assign = np.argmin(sq_distances(x, c, np), axis=1)
  return np.stack([x[assign == j].mean(0) for j in range(len(c))])


def np_softmax(z, axis):
  z = z - z.max(axis=axis, keepdims=True)
  return np.exp(z) / np.exp(z).sum(axis=axis, keepdims=True)


def np_soft_em(x, c, sharpness):
  resp = np_softmax(-sharpness * sq_distances(x, c, np), axis=1)  # (N, K)
  return (resp.T @ x) / resp.sum(0)[:, None]


def kmeans_loss(x, sharpness=None):
  """``Σ_ij C_ij ‖x_i - c_j‖²`` with the assignments C held fixed (stop_gradient)."""

  def loss(params):
    d2 = sq_distances(x, params["centroids"], jnp)
    if sharpness is None:  # hard: the nearest centroid
      assign = jax.nn.one_hot(jnp.argmin(jax.lax.stop_gradient(d2), axis=1), d2.shape[1])
    else:
      assign = jax.nn.softmax(-sharpness * jax.lax.stop_gradient(d2), axis=1)
    return jnp.sum(jax.lax.stop_gradient(assign) * d2)

  return loss


def newton_steps(loss, centroids, steps, **tx_kwargs):
  tx = gradtx.diag_newton(1.0, damping=0.0, key=jax.random.key(0), **tx_kwargs)
  params = {"centroids": jnp.asarray(centroids)}

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params, loss_fn=loss)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  out = []
  for _ in range(steps):
    params, state = step(params, state)
    out.append(np.asarray(params["centroids"]))
  return out, state


def test_hard_kmeans_newton_step_is_lloyd(digits):
  x, c0 = digits
  with jax.enable_x64(True):
    trajectory, state = newton_steps(kmeans_loss(x), c0, steps=4)
  c = c0
  for t, got in enumerate(trajectory):
    c = np_lloyd(x, c)
    np.testing.assert_allclose(got, c, rtol=1e-12, atol=1e-12, err_msg=f"step {t}")
  assert not np.allclose(trajectory[-1], c0)
  # The curvature the step used: 2 Σ_i C_ij for every coordinate of centroid j.
  counts = np.bincount(np.argmin(sq_distances(x, trajectory[-2], np), axis=1), minlength=K)
  np.testing.assert_allclose(state[0].curvature["centroids"],
                             np.repeat(2.0 * counts[:, None], x.shape[1], axis=1), rtol=1e-12)


def test_soft_kmeans_newton_step_is_soft_em(digits):
  x, c0 = digits
  sharpness = 0.005
  resp = np_softmax(-sharpness * sq_distances(x, c0, np), axis=1)
  assert resp.max(1).mean() < 0.95  # the assignments really are soft
  with jax.enable_x64(True):
    trajectory, _ = newton_steps(kmeans_loss(x, sharpness), c0, steps=3, samples=2)
  c = c0
  for t, got in enumerate(trajectory):
    c = np_soft_em(x, c, sharpness)
    np.testing.assert_allclose(got, c, rtol=1e-11, atol=1e-11, err_msg=f"step {t}")


def test_kmeans_with_curvature_passed_directly(digits):
  x, c0 = digits
  with jax.enable_x64(True):
    loss = kmeans_loss(x)
    assign = np.argmin(sq_distances(x, c0, np), axis=1)
    curvature = np.repeat(2.0 * np.bincount(assign, minlength=K)[:, None], x.shape[1], axis=1)
    params = {"centroids": jnp.asarray(c0)}
    for tx in (gradtx.diag_newton(1.0, damping=0.0, key=jax.random.key(1)),
               optax.chain(gradtx.scale_by_diag_newton(damping=0.0, key=jax.random.key(1)),
                           optax.sgd(1.0))):
      updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params,
                             curvature={"centroids": jnp.asarray(curvature)})
      np.testing.assert_allclose(params["centroids"] + updates["centroids"], np_lloyd(x, c0),
                                 rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- Hutchinson


def diagonal_loss(params):
  return (jnp.sum(jnp.array([1.0, 2.0, 3.0]) * params["x"] ** 4) / 12
          + jnp.sum(jnp.cos(params["y"])) + 0.5 * jnp.sum(params["y"] ** 2))


def diagonal_hessian(params):
  """Closed form of ``diag(∇² diagonal_loss)``."""
  return {"x": np.array([1.0, 2.0, 3.0]) * np.asarray(params["x"]) ** 2,
          "y": 1.0 - np.cos(np.asarray(params["y"]))}


DIAG_PARAMS = {"x": jnp.array([0.5, -1.0, 2.0]),
               "y": jnp.array([[0.1, 1.0, -2.0], [3.0, 0.0, 0.7]])}


def test_hutchinson_is_exact_for_diagonal_hessians():
  estimate = jax.jit(lambda key: gradtx.hutchinson_diagonal(diagonal_loss, DIAG_PARAMS, key))
  for seed in range(3):
    got = estimate(jax.random.key(seed))
    for k, h in diagonal_hessian(DIAG_PARAMS).items():
      np.testing.assert_allclose(got[k], h, rtol=1e-6, atol=1e-6, err_msg=f"{seed} {k}")


RNG = np.random.default_rng(3)
A = RNG.normal(size=(7, 7))
A = A @ A.T / 7
B = RNG.normal(size=(5, 7))


def flat(params):
  return jnp.concatenate([params["u"], params["v"].ravel()])


def dense_loss(params):
  z = flat(params)
  return 0.5 * z @ A @ z + jnp.sum(jax.nn.softplus(B @ z))


DENSE_PARAMS = {"u": jnp.array([0.3, -0.2, 1.0]), "v": jnp.array([[0.5, -1.0], [0.2, 0.1]])}


DENSE_SAMPLES = 4096


@jax.jit
def dense_estimate(key):
  """Hutchinson's estimate of the dense Hessian's diagonal with ``DENSE_SAMPLES`` probes."""
  return gradtx.hutchinson_diagonal(dense_loss, DENSE_PARAMS, key, samples=DENSE_SAMPLES)


def test_hutchinson_is_unbiased_for_a_dense_hessian():
  hessian = jax.jit(jax.hessian(lambda z: dense_loss({"u": z[:3], "v": z[3:].reshape(2, 2)})))
  h = np.asarray(hessian(flat(DENSE_PARAMS)), np.float64)
  off = h - np.diag(np.diag(h))
  assert np.abs(off).max() > 0.1  # dense: a single probe is not exact
  estimate = np.asarray(flat(dense_estimate(jax.random.key(7))), np.float64)
  # z_i (Hz)_i = H_ii + Σ_{j≠i} H_ij z_i z_j: mean H_ii, variance Σ_{j≠i} H_ij².
  bound = SIGMAS * np.sqrt((off ** 2).sum(1) / DENSE_SAMPLES)
  np.testing.assert_array_less(np.abs(estimate - np.diag(h)), bound)


def test_hutchinson_same_key_same_estimate():
  first, again, other = (dense_estimate(jax.random.key(k)) for k in (5, 5, 6))
  for k in DENSE_PARAMS:
    np.testing.assert_array_equal(first[k], again[k])
  assert any(not np.array_equal(first[k], other[k]) for k in DENSE_PARAMS)


@pytest.mark.parametrize("samples,error", [(0, ValueError), (-2, ValueError), (1.5, TypeError),
                                           (True, TypeError)])
def test_hutchinson_samples_must_be_a_positive_int(samples, error):
  with pytest.raises(error, match=rf"samples must be an int >= 1, got {samples}"):
    gradtx.hutchinson_diagonal(dense_loss, DENSE_PARAMS, jax.random.key(0), samples=samples)


# ----------------------------------------------------------------------------- the transformation


def test_direction_clips_negative_curvature_and_adds_damping():
  tx = gradtx.scale_by_diag_newton(damping=0.5, key=jax.random.key(0))
  g = {"w": jnp.array([1.0, -2.0, 3.0, 4.0])}
  h = np.array([-1.0, 0.0, 2.0, 7.5])
  d, state = tx.update(g, tx.init(g), g, curvature={"w": jnp.asarray(h)})
  np.testing.assert_allclose(d["w"], np.array([1.0, -2.0, 3.0, 4.0]) / (np.maximum(h, 0) + 0.5),
                             rtol=1e-6)
  np.testing.assert_array_equal(state.curvature["w"], h)  # logged as estimated


def test_newton_with_loss_fn_uses_the_hessian_diagonal():
  tx = gradtx.scale_by_diag_newton(damping=0.1, key=jax.random.key(0))
  g = jax.grad(diagonal_loss)(DIAG_PARAMS)
  d, state = tx.update(g, tx.init(DIAG_PARAMS), DIAG_PARAMS, loss_fn=diagonal_loss)
  h = diagonal_hessian(DIAG_PARAMS)
  for k in h:
    np.testing.assert_allclose(state.curvature[k], h[k], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d[k], np.asarray(g[k]) / (np.maximum(h[k], 0) + 0.1), rtol=1e-5)


def test_newton_one_step_to_the_minimum_of_a_diagonal_quadratic():
  scales = np.array([0.5, 1.0, 10.0, 200.0])
  target = np.array([3.0, -1.0, 0.25, 7.0])
  loss = lambda p: jnp.sum(scales * (p["w"] - target) ** 2)
  tx = gradtx.diag_newton(1.0, damping=0.0, key=jax.random.key(0))
  params = {"w": jnp.zeros(4)}
  updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params, loss_fn=loss)
  np.testing.assert_allclose(optax.apply_updates(params, updates)["w"], target, rtol=1e-5)


@jax.jit
def three_curvatures(key):
  """The curvature the state logs after each of 3 steps at the same params."""
  tx = gradtx.scale_by_diag_newton(key=key)
  state = tx.init(DENSE_PARAMS)
  assert state.rng_key.dtype == jnp.uint32  # raw key data: serialisable
  out = []
  for _ in range(3):
    _, state = tx.update(DENSE_PARAMS, state, DENSE_PARAMS, loss_fn=dense_loss)
    out.append(flat(state.curvature))
  return out


def test_probes_are_redrawn_every_step_and_reproducible():
  """The state's key is split every step (new probes), and the same key gives the same run."""
  first, again = three_curvatures(jax.random.key(11)), three_curvatures(jax.random.key(11))
  raw = three_curvatures(jax.random.key_data(jax.random.key(11)))  # uint32 key data alike
  first = [np.asarray(x) for x in first]
  for a, b, c in zip(first, again, raw, strict=True):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])


def test_diag_newton_learning_rate_schedule():
  schedule = lambda count: 0.5 * 0.5 ** count
  tx = gradtx.diag_newton(schedule, damping=0.25, key=jax.random.key(0))
  g = {"w": jnp.array([2.0, -1.0])}
  h = {"w": jnp.array([4.0, 1.0])}
  state = tx.init(g)
  for t in range(3):
    u, state = tx.update(g, state, g, curvature=h)
    np.testing.assert_allclose(u["w"], -0.5 * 0.5 ** t * np.array([2.0, -1.0])
                               / (np.array([4.0, 1.0]) + 0.25), rtol=1e-6)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("factory", [gradtx.scale_by_diag_newton,
                                     lambda **kw: gradtx.diag_newton(1.0, **kw)],
                         ids=["scale_by_diag_newton", "diag_newton"])
def test_construction_errors(factory):
  key = jax.random.key(0)
  for damping in (-1e-3, float("nan"), float("inf")):
    with pytest.raises(ValueError, match=rf"damping must be a finite number >= 0, got {damping}"):
      factory(damping=damping, key=key)
  with pytest.raises(ValueError, match=r"samples must be an int >= 1, got 0"):
    factory(samples=0, key=key)
  with pytest.raises(ValueError,
                     match=r"estimator must be 'hutchinson', 'gnb' or a function .*got 'exact'"):
    factory(estimator="exact", key=key)
  with pytest.raises(TypeError, match=r"key must be a jax.random key .*got 0"):
    factory(key=0)
  with pytest.raises(TypeError, match=r"key must be a jax.random key"):
    factory(key=jnp.zeros(2, jnp.float32))


@pytest.mark.parametrize("lr", [0.0, -1.0])
def test_diag_newton_learning_rate_positive(lr):
  with pytest.raises(ValueError, match=rf"learning_rate must be a finite number > 0, got {lr}"):
    gradtx.diag_newton(lr, key=jax.random.key(0))


def test_update_errors():
  tx = gradtx.scale_by_diag_newton(key=jax.random.key(0))
  g = {"a": jnp.ones(2), "b": jnp.ones(3)}
  state = tx.init(g)
  with pytest.raises(ValueError, match=r"scale_by_diag_newton needs the curvature: pass "
                                       r"loss_fn=\(params -> scalar loss\) or curvature="):
    tx.update(g, state, g)
  with pytest.raises(ValueError, match=r"scale_by_diag_newton with loss_fn needs the params"):
    tx.update(g, state, loss_fn=lambda p: jnp.zeros(()))
  with pytest.raises(ValueError, match=r"curvature must have the structure of the updates: "
                                       r"missing \['b'\]"):
    tx.update(g, state, g, curvature={"a": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"curvature must have the leaf shapes of the updates; "
                                       r"these differ: b: \(1,\) vs \(3,\)"):
    tx.update(g, state, g, curvature={"a": jnp.ones(2), "b": jnp.ones(1)})


# ----------------------------------------------------------------------------- NaN / inf


def test_nan_gradient_or_curvature_propagates():
  tx = gradtx.scale_by_diag_newton(damping=0.1, key=jax.random.key(0))
  g = {"w": jnp.array([np.nan, 1.0, 1.0])}
  d, _ = tx.update(g, tx.init(g), g, curvature={"w": jnp.array([1.0, np.nan, 1.0])})
  assert np.isnan(d["w"][0]) and np.isnan(d["w"][1])
  np.testing.assert_allclose(d["w"][2], 1.0 / 1.1, rtol=1e-6)
  d, _ = tx.update({"w": jnp.array([np.inf, 1.0, 1.0])}, tx.init(g), g,
                   curvature={"w": jnp.ones(3)})
  assert np.isinf(d["w"][0])


def test_nan_loss_curvature_propagates():
  tx = gradtx.scale_by_diag_newton(damping=0.1, key=jax.random.key(0))
  params = {"w": jnp.array([-1.0, 1.0])}
  loss = lambda p: jnp.sum(jnp.sqrt(p["w"]) ** 3)  # NaN derivatives at w < 0
  d, state = tx.update(jax.grad(loss)(params), tx.init(params), params, loss_fn=loss)
  assert np.isnan(d["w"][0]) and np.isnan(state.curvature["w"][0])
  assert np.isfinite(d["w"][1])


def test_inf_curvature_is_visible():
  tx = gradtx.scale_by_diag_newton(damping=0.1, key=jax.random.key(0))
  g = {"w": jnp.array([1.0, 1.0])}
  d, _ = tx.update(g, tx.init(g), g, curvature={"w": jnp.array([np.inf, -np.inf])})
  assert not np.any(np.isfinite(d["w"]))


# ----------------------------------------------------------------------------- variance ∝ 1/S

VAR_A = np.asarray(A, np.float64)  # a constant, dense Hessian (0.5 zᵀAz)


def test_hutchinson_variance_is_one_over_samples():
  """Var[ĥ_i] = Σ_{j≠i} A_ij² / S (numpy float64), measured over 3000 independent draws."""
  quadratic = lambda p: 0.5 * p["z"] @ jnp.asarray(A, jnp.float32) @ p["z"]
  params = {"z": jnp.ones(7)}
  keys = jax.random.split(jax.random.key(0), 3000)
  off = (VAR_A ** 2).sum(1) - np.diag(VAR_A) ** 2
  variances = {}
  for samples in (1, 4, 16):
    draws = jax.jit(jax.vmap(lambda k, s=samples: gradtx.hutchinson_diagonal(
        quadratic, params, k, samples=s)["z"]))(keys)
    draws = np.asarray(draws, np.float64)
    np.testing.assert_allclose(draws.mean(0), np.diag(VAR_A),
                               atol=SIGMAS * np.sqrt(off.max() / samples / 3000))
    variances[samples] = draws.var(0)
    np.testing.assert_allclose(variances[samples], off / samples, rtol=0.2)
  ratio = variances[1].sum() / variances[16].sum()
  assert 12 < ratio < 20, ratio


# ----------------------------------------------------------------------------- GNB

GNB_RNG = np.random.default_rng(5)
GNB_X = GNB_RNG.normal(size=(2, 3))  # B = 2 examples, 3 features
GNB_PARAMS = {"w1": GNB_RNG.normal(size=(3, 4)), "w2": GNB_RNG.normal(size=(4, 3)),
              "b": GNB_RNG.normal(size=(3,))}  # C = 3 classes


def gnb_logits(params, x):
  return jnp.tanh(x @ params["w1"]) @ params["w2"] + params["b"]


def np_logits_and_jacobian(params, x):
  """Per example: logits (C,) and the Jacobian of every parameter, closed form (numpy)."""
  w1, w2, b = (np.asarray(params[k], np.float64) for k in ("w1", "w2", "b"))
  a = np.tanh(x @ w1)  # (B, H)
  logits = a @ w2 + b
  num_classes = w2.shape[1]
  # ∂f_c/∂w1[i, j] = w2[j, c] (1 - a_j²) x_i; ∂f_c/∂w2[j, c'] = a_j δ_cc'; ∂f_c/∂b_c' = δ_cc'
  jw1 = np.einsum("jc,bj,bi->bcij", w2, 1 - a ** 2, x)
  jw2 = np.einsum("bj,cd->bcjd", a, np.eye(num_classes))
  jb = np.broadcast_to(np.eye(num_classes), (x.shape[0], num_classes, num_classes))
  return logits, {"w1": jw1, "w2": jw2, "b": jb}


def np_softmax_rows(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def np_gauss_newton_diagonal(params, x):
  """diag((1/B) Σ_b J_bᵀ (diag p_b - p_b p_bᵀ) J_b), per leaf."""
  logits, jac = np_logits_and_jacobian(params, x)
  p = np_softmax_rows(logits)
  m = np.stack([np.diag(pb) - np.outer(pb, pb) for pb in p])  # (B, C, C)
  return {k: np.einsum("bc...,bcd,bd...->...", j, m, j) / x.shape[0] for k, j in jac.items()}


def np_gnb(params, x, labels, weights=None):
  """B ĝ ⊙ ĝ with ĝ = (1/B) Σ_b w_b J_bᵀ (p_b - e_{y_b}) (numpy)."""
  logits, jac = np_logits_and_jacobian(params, x)
  p = np_softmax_rows(logits)
  weights = np.ones(len(x)) if weights is None else np.asarray(weights, np.float64)
  residual = weights[:, None] * (p - np.eye(p.shape[1])[labels])
  count = weights.sum()
  return {k: count * (np.einsum("bc...,bc->...", j, residual) / count) ** 2
          for k, j in jac.items()}


def test_gnb_expectation_is_the_gauss_newton_diagonal_exactly():
  """Σ over all 3² label pairs, weighted by the model's probabilities, of the estimator at
  those labels equals the Gauss–Newton diagonal (numpy, float64)."""
  from gradtx.curvature import _gnb_from_labels
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, GNB_PARAMS)
    x = jnp.asarray(GNB_X)
    p = np_softmax_rows(np_logits_and_jacobian(GNB_PARAMS, GNB_X)[0])
    expectation = jax.tree.map(np.zeros_like, GNB_PARAMS)
    for y0 in range(3):
      for y1 in range(3):
        h = _gnb_from_labels(gnb_logits, params, x, jnp.array([y0, y1]))
        np.testing.assert_allclose(h["w1"], np_gnb(GNB_PARAMS, GNB_X, [y0, y1])["w1"],
                                   rtol=1e-10)
        expectation = jax.tree.map(lambda e, v, w=p[0, y0] * p[1, y1]: e + w * np.asarray(v),
                                   expectation, h)
  chex.assert_trees_all_close(expectation, np_gauss_newton_diagonal(GNB_PARAMS, GNB_X),
                              rtol=1e-10, atol=1e-12)


def test_gnb_diagonal_one_draw_and_its_mean():
  """One draw is B ĝ² at the labels categorical(key, logits) draws; the mean of 4000
  draws is within a CLT bound of the Gauss–Newton diagonal."""
  params32_ = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), GNB_PARAMS)
  x = jnp.asarray(GNB_X, jnp.float32)
  key = jax.random.key(3)
  labels = np.asarray(jax.random.categorical(key, gnb_logits(params32_, x)))
  chex.assert_trees_all_close(gradtx.gnb_diagonal(gnb_logits, params32_, x, key),
                              np_gnb(GNB_PARAMS, GNB_X, labels), rtol=1e-4, atol=1e-6)
  keys = jax.random.split(jax.random.key(4), 4000)
  draws = jax.jit(jax.vmap(lambda k: gradtx.gnb_diagonal(gnb_logits, params32_, x, k)))(keys)
  exact = np_gauss_newton_diagonal(GNB_PARAMS, GNB_X)
  for k, d in draws.items():
    d = np.asarray(d, np.float64)
    bound = SIGMAS * d.std(0) / np.sqrt(len(keys)) + 1e-6
    np.testing.assert_array_less(np.abs(d.mean(0) - exact[k]), bound)


def test_gnb_language_model_logits_and_mask():
  """(batch, sequence, classes) logits: every token is an example, B = the unmasked count."""
  rng = np.random.default_rng(8)
  tokens = rng.normal(size=(2, 3, 3))  # (batch, sequence, features)
  mask = np.array([[True, True, False], [True, False, False]])
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), GNB_PARAMS)
  key = jax.random.key(9)
  got = gradtx.gnb_diagonal(gnb_logits, params, jnp.asarray(tokens, jnp.float32), key,
                            mask=jnp.asarray(mask))
  labels = np.asarray(jax.random.categorical(
      key, gnb_logits(params, jnp.asarray(tokens, jnp.float32)))).reshape(-1)
  expected = np_gnb(GNB_PARAMS, tokens.reshape(6, 3), labels, mask.reshape(-1))
  chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("logits_fn,match", [
    (lambda p, x: gnb_logits(p, x)[0], r"must return logits of shape \(batch, classes\).*"
                                       r"got shape \(3,\)"),
    (lambda p, x: jnp.sum(gnb_logits(p, x)), r"got shape \(\)"),
    (lambda p, x: gnb_logits(p, x)[:, :1], r"at least 2 classes, got shape \(2, 1\)"),
])
def test_gnb_logits_must_be_batch_by_classes(logits_fn, match):
  with pytest.raises(ValueError, match=match):
    gradtx.gnb_diagonal(logits_fn, GNB_PARAMS, GNB_X, jax.random.key(0))


# ----------------------------------------------------------------------------- every, ema


def test_every_and_ema_follow_the_documented_recursion():
  """Curvatures passed each step: h refreshed on t % 3 == 0 as β h + (1-β) ĥ (numpy)."""
  tx = gradtx.scale_by_diag_newton(damping=0.1, every=3, ema=0.5, key=jax.random.key(0))
  rng = np.random.default_rng(0)
  g = {"w": jnp.asarray(rng.normal(size=4), jnp.float32)}
  state, h = tx.init(g), np.zeros(4)
  step = jax.jit(lambda g, s, c: tx.update(g, s, g, curvature={"w": c}))
  for t in range(8):
    fresh = rng.uniform(0.5, 3.0, size=4)
    d, state = step(g, state, jnp.asarray(fresh, jnp.float32))
    if t % 3 == 0:
      h = 0.5 * h + 0.5 * fresh
    np.testing.assert_allclose(state.curvature["w"], h, rtol=1e-6, err_msg=str(t))
    np.testing.assert_allclose(d["w"], np.asarray(g["w"]) / (h + 0.1), rtol=1e-5)


def test_estimator_runs_only_on_refresh_steps():
  """A custom estimator (params, key, **kwargs) -> curvature: its value is taken at the
  params of steps 0, 2, 4 and kept in between, while the params move."""
  estimator = lambda params, key, scale, **_: jax.tree.map(lambda p: scale * p ** 2, params)
  tx = gradtx.scale_by_diag_newton(estimator=estimator, every=2, damping=0.0,
                                   key=jax.random.key(0))
  params = {"w": jnp.array([1.0, 2.0])}
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(p, s, p, scale=3.0))
  for t in range(5):
    _, state = step(params, state)
    if t % 2 == 0:
      expected = 3.0 * np.asarray(params["w"]) ** 2
    np.testing.assert_allclose(state.curvature["w"], expected, rtol=1e-6, err_msg=str(t))
    params = {"w": params["w"] + 1.0}


def test_damping_mode_max():
  tx = gradtx.scale_by_diag_newton(damping=0.5, damping_mode="max", key=jax.random.key(0))
  g = {"w": jnp.array([1.0, -2.0, 3.0])}
  d, _ = tx.update(g, tx.init(g), g, curvature={"w": jnp.array([-1.0, 0.2, 4.0])})
  np.testing.assert_allclose(d["w"], [1.0 / 0.5, -2.0 / 0.5, 3.0 / 4.0], rtol=1e-6)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(every=0), ValueError, r"every must be an int >= 1, got 0"),
    (dict(every=-3), ValueError, r"every must be an int >= 1, got -3"),
    (dict(every=2.0), TypeError, r"every must be an int >= 1, got 2.0"),
    (dict(ema=1.0), ValueError, r"ema must be in \[0.0, 1.0\), got 1.0"),
    (dict(ema=-0.1), ValueError, r"ema must be in \[0.0, 1.0\), got -0.1"),
    (dict(damping_mode="floor"), ValueError, r"damping_mode must be one of 'add', 'max'"),
])
def test_every_ema_damping_mode_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    gradtx.scale_by_diag_newton(key=jax.random.key(0), **kwargs)


# ----------------------------------------------------------------------------- Sophia


SOPHIA = dict(learning_rate=0.05, b1=0.9, b2=0.8, gamma=0.05, eps=1e-12, weight_decay=0.1,
              every=3)


def np_sophia(theta, grad, estimate, steps, *, learning_rate, b1, b2, gamma, eps, weight_decay,
              every, clip_threshold=1.0, decayed=None):
  """Liu et al.'s Algorithm 1, verbatim (t from 1; refresh when t mod k = 1), the clip at
  ``clip_threshold`` and weight decay on the ``decayed`` leaves (all by default).

  Returns the params after each step and the fraction of clipped coordinates of each step.
  """
  decayed = decayed or {k: True for k in theta}
  m = {k: np.zeros_like(v) for k, v in theta.items()}
  h = {k: np.zeros_like(v) for k, v in theta.items()}
  out, fractions = [], []
  for t in range(1, steps + 1):
    g = grad(theta)
    m = {k: b1 * m[k] + (1 - b1) * g[k] for k in theta}
    if t % every == 1 % every:
      h_hat = estimate(theta, t)
      h = {k: b2 * h[k] + (1 - b2) * h_hat[k] for k in theta}
    ratio = {k: m[k] / np.maximum(gamma * h[k], eps) for k in theta}
    fractions.append(sum(int(np.sum(np.abs(r) > clip_threshold)) for r in ratio.values())
                     / sum(r.size for r in ratio.values()))
    theta = {k: theta[k] - learning_rate * weight_decay * decayed[k] * theta[k] for k in theta}
    theta = {k: theta[k] - learning_rate * np.clip(ratio[k], -clip_threshold, clip_threshold)
             for k in theta}
    out.append(theta)
  return out, fractions


def np_diagonal_grad(params):
  x, y = (np.asarray(params[k], np.float64) for k in ("x", "y"))
  return {"x": np.array([1.0, 2.0, 3.0]) * x ** 3 / 3, "y": -np.sin(y) + y}


def trajectory(tx, params, steps, grad_of=None, **update_kwargs):
  """The params and the logged ``clip_fraction`` after each of ``steps`` jitted updates on
  the gradient of ``grad_of`` (default: the ``loss_fn`` passed along)."""
  grad = jax.grad(grad_of or update_kwargs["loss_fn"])
  step = jax.jit(lambda p, s: tx.update(grad(p), s, p, **update_kwargs))
  state, out, fractions = tx.init(params), [], []
  for _ in range(steps):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    out.append(params)
    fractions.append(float(optax.tree.get(state, "clip_fraction")))
  return out, fractions


def assert_trajectories_close(got, expected, **tolerances):
  for t, (a, b) in enumerate(zip(got, expected, strict=True)):
    chex.assert_trees_all_close(a, b, custom_message=f"step {t}", **tolerances)


@pytest.mark.parametrize("options", [
    {},
    dict(clip_threshold=0.3, decayed={"x": False, "y": True}),
], ids=["paper", "clip_threshold-and-decay-mask"])
def test_sophia_h_matches_algorithm_1(options):
  """Sophia-H on a loss with a diagonal Hessian (Hutchinson exact), 12 steps, float64;
  the logged clip fraction is numpy's, and the clip really acts on some steps only."""
  decayed = options.pop("decayed", None)
  mask = None if decayed is None else dict(decayed)
  with jax.enable_x64(True):
    tx = gradtx.sophia(estimator="hutchinson", key=jax.random.key(0),
                       weight_decay_mask=mask, **options, **SOPHIA)
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), DIAG_PARAMS)
    got, got_fractions = trajectory(tx, params, 12, loss_fn=diagonal_loss)
  theta0 = jax.tree.map(lambda v: np.asarray(v, np.float64), DIAG_PARAMS)
  expected, fractions = np_sophia(theta0, np_diagonal_grad,
                                  lambda th, t: diagonal_hessian(th), 12, decayed=decayed,
                                  **options, **SOPHIA)
  assert_trajectories_close(got, expected, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(got_fractions, fractions, rtol=0, atol=1e-6)  # float32
  assert 0 < max(fractions) and min(fractions) < 1, fractions


def test_sophia_g_matches_algorithm_1():
  """Sophia-G on the small softmax model, 10 steps, float64: the labels are the ones the
  transformation draws (the state key split once per step, categorical on the logits);
  everything else (gradients, B ĝ², EMAs, clip, decay) is numpy."""
  labels = np.array([0, 2])
  with jax.enable_x64(True):
    key = jax.random.key(7)
    tx = gradtx.sophia(key=key, **SOPHIA)  # estimator="gnb" is the default
    params = jax.tree.map(jnp.asarray, GNB_PARAMS)
    x = jnp.asarray(GNB_X)
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        gnb_logits(p, x), labels).mean()
    got, got_fractions = trajectory(tx, params, 10, grad_of=loss, logits_fn=gnb_logits,
                                    inputs=x)
    step_keys, raw = [], jax.random.key_data(key)
    for _ in range(10):
      next_key, step_key = jax.random.split(jax.random.wrap_key_data(raw))
      raw = jax.random.key_data(next_key)
      step_keys.append(step_key)

    def estimate(theta, t):
      logits = np_logits_and_jacobian(theta, GNB_X)[0]
      drawn = np.asarray(jax.random.categorical(step_keys[t - 1],
                                                jnp.asarray(logits, jnp.float32)))
      return np_gnb(theta, GNB_X, drawn)

  def grad(theta):
    logits, jac = np_logits_and_jacobian(theta, GNB_X)
    residual = (np_softmax_rows(logits) - np.eye(3)[labels]) / len(labels)
    return {k: np.einsum("bc...,bc->...", j, residual) for k, j in jac.items()}

  expected, fractions = np_sophia(GNB_PARAMS, grad, estimate, 10, **SOPHIA)
  assert_trajectories_close(got, expected, rtol=1e-9, atol=1e-11)
  np.testing.assert_allclose(got_fractions, fractions, rtol=0, atol=1e-6)  # float32
