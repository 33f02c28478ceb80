"""Tests of gradtx/curvature.py against independent references.

References: Lloyd's K-means step and the soft-assignment EM step written in numpy (on
sklearn's digits, float64); Hessians from ``jax.hessian`` (plain autodiff) or closed forms;
Hutchinson's variance ``Σ_{j≠i} H_ij²`` for a CLT bound on its mean; the documented
``g / (max(h, 0) + λ)`` in numpy.
"""

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
  with pytest.raises(ValueError, match=r"estimator must be one of 'hutchinson', got 'exact'"):
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
