"""Tests of gradtx/exponentiated.py against independent references.

References: numpy implementations of the update equations (EGU ``θ ⊙ e^{-ηd}``, simplex EG
``θ ⊙ e^{-ηd} / Σ θ ⊙ e^{-ηd}``, Kivinen & Warmuth's EG± with the documented initial split
``θ^± = max(±θ, 0) + s``), driven by numpy's closed-form gradients while gradtx gets
``jax.grad``'s; pLSA's EM iteration written out in numpy (E-step posteriors, M-step
normalised expected counts). Properties (positivity, slices on the simplex, EG±'s budget)
by hypothesis over random directions and learning rates.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradtx

RNG = np.random.default_rng(0)


def f32s(low, high):
  """float32 values in [low, high] (the bounds rounded inwards to float32)."""
  low32, high32 = np.float32(low), np.float32(high)
  low32 = low32 if low32 >= low else np.nextafter(low32, np.float32(np.inf))
  high32 = high32 if high32 <= high else np.nextafter(high32, np.float32(-np.inf))
  return st.floats(float(low32), float(high32), width=32)


def positive(shape, low=0.2, high=2.0, rng=RNG):
  return rng.uniform(low, high, shape).astype(np.float32)


def tree32(tree):
  return {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}


def run(tx, params, grad_fn, steps, **update_kwargs):
  """``steps`` jitted steps of ``tx`` on ``grad_fn(params)``; the params after each step."""
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **update_kwargs))
  state = tx.init(params)
  trajectory, states = [], []
  for _ in range(steps):
    updates, state = update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(jax.tree.map(np.asarray, params))
    states.append(state)
  return trajectory, states


# ----------------------------------------------------------------------------- numpy references


def np_egu(theta, d, eta):
  return theta * np.exp(-eta * d)


def np_simplex(theta, d, eta, axis):
  w = theta * np.exp(-eta * d)
  return w / w.sum(axis=axis, keepdims=True)


def np_eg_pm_init(params, total):
  n = sum(x.size for x in params.values())
  slack = (total - sum(np.abs(x).sum() for x in params.values())) / (2 * n)
  plus = {k: np.maximum(x, 0) + slack for k, x in params.items()}
  minus = {k: np.maximum(-x, 0) + slack for k, x in params.items()}
  return plus, minus


def np_eg_pm_step(plus, minus, d, eta, total):
  """θ^± ← U θ^± e^{∓ηd} / Σ_all(θ⁺ e^{-ηd} + θ⁻ e^{ηd})."""
  grown_plus = {k: plus[k] * np.exp(-eta * d[k]) for k in plus}
  grown_minus = {k: minus[k] * np.exp(eta * d[k]) for k in minus}
  mass = sum(x.sum() for x in grown_plus.values()) + sum(x.sum() for x in grown_minus.values())
  return ({k: total * x / mass for k, x in grown_plus.items()},
          {k: total * x / mass for k, x in grown_minus.items()})


TARGET = {"a": RNG.normal(size=(3, 4)), "b": RNG.normal(size=(5,)), "c": RNG.normal(size=(2, 3, 2))}
SHAPES = {k: v.shape for k, v in TARGET.items()}


def quadratic(params):
  return sum(0.5 * jnp.sum((params[k] - TARGET[k]) ** 2) for k in params)


def np_quadratic_grad(params):
  return {k: params[k] - TARGET[k] for k in params}


# ----------------------------------------------------------------------------- EGU


@pytest.mark.parametrize("schedule", [False, True])
def test_egu_matches_numpy_over_steps(schedule):
  eta = (lambda count: 0.4 * 0.8 ** count) if schedule else 0.3
  eta_at = (lambda t: 0.4 * 0.8 ** t) if schedule else (lambda t: 0.3)
  theta0 = {k: positive(s) for k, s in SHAPES.items()}
  trajectory, states = run(gradtx.exponentiated_gradient(eta), tree32(theta0),
                           jax.grad(quadratic), steps=8)
  theta = {k: v.astype(np.float64) for k, v in theta0.items()}
  for t, actual in enumerate(trajectory):
    g = np_quadratic_grad(theta)
    theta = {k: np_egu(theta[k], g[k], eta_at(t)) for k in theta}
    for k in theta:
      np.testing.assert_allclose(actual[k], theta[k], rtol=2e-5, err_msg=f"step {t}, {k}")
  assert int(states[-1].count) == 8


def test_egu_keeps_zero_at_zero():
  theta = {"w": jnp.array([0.0, 1.0, 0.0, 2.0])}
  tx = gradtx.exponentiated_gradient(0.5)
  u, _ = tx.update({"w": jnp.array([-3.0, 1.0, 5.0, -1.0])}, tx.init(theta), theta)
  np.testing.assert_allclose(u["w"], [0.0, np.expm1(-0.5), 0.0, 2 * np.expm1(0.5)], rtol=1e-6)


# |η d| stays below ~15: beyond it e^{-ηd} drops under float32's resolution of θ, so θ + u
# (optax's additive update) rounds to exactly 0 even though θ ⊙ e^{-ηd} > 0.
@given(theta=hnp.arrays(np.float32, (3, 4), elements=f32s(1e-3, 1e3)),
       steps=st.lists(hnp.arrays(np.float32, (3, 4), elements=f32s(-5, 5)),
                      min_size=1, max_size=3),
       eta=st.floats(1e-3, 100.0))
def test_egu_keeps_params_positive(theta, steps, eta):
  tx = gradtx.exponentiated_gradient(eta)
  params = {"w": jnp.asarray(theta)}
  state = tx.init(params)
  expected = theta.astype(np.float64)
  for eta_d in steps:
    d = {"w": jnp.asarray(eta_d / np.float32(eta))}  # so that η·d = eta_d
    u, state = tx.update(d, state, params)
    params = optax.apply_updates(params, u)
    expected = expected * np.exp(-eta_d.astype(np.float64))
    assert np.all(np.isfinite(params["w"])) and np.all(params["w"] > 0)
  np.testing.assert_allclose(params["w"], expected, rtol=1e-4)


# ----------------------------------------------------------------------------- simplex EG


AXIS_RULES = {"a": 0, "b": -1, "c": 1}


def normalized(x, axis):
  return x / x.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("axis", [0, AXIS_RULES], ids=["axis0", "rules"])
def test_simplex_matches_numpy_over_steps(axis):
  axes = AXIS_RULES if isinstance(axis, dict) else dict.fromkeys(SHAPES, 0)
  theta0 = {k: positive(s) for k, s in SHAPES.items()}  # positive, not yet normalised
  tx = gradtx.exponentiated_gradient(0.7, normalize="simplex", axis=axis)
  trajectory, _ = run(tx, tree32(theta0), jax.grad(quadratic), steps=6)
  theta = {k: v.astype(np.float64) for k, v in theta0.items()}
  for t, actual in enumerate(trajectory):
    g = np_quadratic_grad(theta)
    theta = {k: np_simplex(theta[k], g[k], 0.7, axes[k]) for k in theta}
    for k in theta:
      np.testing.assert_allclose(actual[k], theta[k], rtol=2e-5, atol=1e-7,
                                 err_msg=f"step {t}, {k}")
      np.testing.assert_allclose(actual[k].sum(axes[k]), 1.0, rtol=1e-5)


# Huge η·d (up to 1e12): the softmax form must neither overflow nor produce NaN.
@given(theta=hnp.arrays(np.float32, (4, 3), elements=f32s(1e-6, 1.0)),
       third=hnp.arrays(np.float32, (2, 3, 2), elements=f32s(1e-6, 1.0)),
       d=hnp.arrays(np.float32, (4, 3), elements=f32s(-1e6, 1e6)),
       d3=hnp.arrays(np.float32, (2, 3, 2), elements=f32s(-1e6, 1e6)),
       eta=st.floats(1e-6, 1e6))
def test_simplex_slices_sum_to_one(theta, third, d, d3, eta):
  tx = gradtx.exponentiated_gradient(eta, normalize="simplex", axis={"p": 0, "q": 1})
  params = {"p": jnp.asarray(theta), "q": jnp.asarray(third)}
  state = tx.init(params)
  for _ in range(2):
    u, state = tx.update({"p": jnp.asarray(d), "q": jnp.asarray(d3)}, state, params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))
    params = optax.apply_updates(params, u)
    for k, axis in (("p", 0), ("q", 1)):
      x = np.asarray(params[k], np.float64)
      assert np.all(np.isfinite(x)) and np.all(x >= 0), k
      np.testing.assert_allclose(x.sum(axis), 1.0, atol=2e-6, err_msg=k)


def test_simplex_moves_mass_away_from_large_gradients():
  theta = {"p": jnp.full((4,), 0.25)}
  tx = gradtx.exponentiated_gradient(1.0, normalize="simplex")
  d = np.array([0.0, 1.0, 2.0, -1.0])
  u, _ = tx.update({"p": jnp.asarray(d, jnp.float32)}, tx.init(theta), theta)
  np.testing.assert_allclose(theta["p"] + u["p"], np.exp(-d) / np.exp(-d).sum(), rtol=1e-6)


# ----------------------------------------------------------------------------- EG±


def test_eg_plus_minus_matches_numpy_over_steps():
  theta0 = {k: (0.3 * RNG.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
  total = 12.0
  tx = gradtx.eg_plus_minus(0.2, total=total)
  trajectory, states = run(tx, tree32(theta0), jax.grad(quadratic), steps=7)
  plus, minus = np_eg_pm_init({k: v.astype(np.float64) for k, v in theta0.items()}, total)
  for t, (actual, state) in enumerate(zip(trajectory, states, strict=True)):
    g = np_quadratic_grad({k: plus[k] - minus[k] for k in plus})
    plus, minus = np_eg_pm_step(plus, minus, g, 0.2, total)
    for k in plus:
      np.testing.assert_allclose(state.theta_plus[k], plus[k], rtol=2e-5, err_msg=f"{t} {k}")
      np.testing.assert_allclose(state.theta_minus[k], minus[k], rtol=2e-5, err_msg=f"{t} {k}")
      # the params (moved by the updates) track θ⁺ - θ⁻
      np.testing.assert_allclose(actual[k], plus[k] - minus[k], rtol=1e-4, atol=1e-5)


def test_eg_plus_minus_initial_split():
  theta = {"w": jnp.array([1.0, -2.0, 0.0]), "v": jnp.array([0.5])}
  state = gradtx.eg_plus_minus(0.1, total=7.5).init(theta)
  slack = (7.5 - 3.5) / (2 * 4)
  np.testing.assert_allclose(state.theta_plus["w"], [1 + slack, slack, slack])
  np.testing.assert_allclose(state.theta_minus["w"], [slack, 2 + slack, slack])
  np.testing.assert_allclose(state.theta_plus["v"], [0.5 + slack])
  np.testing.assert_allclose(state.theta_minus["v"], [slack])


@given(theta=hnp.arrays(np.float32, (6,), elements=f32s(-1.0, 1.0)),
       steps=st.lists(hnp.arrays(np.float32, (6,), elements=f32s(-8, 8)),
                      min_size=1, max_size=4),
       eta=st.floats(1e-3, 10.0),
       headroom=st.floats(1.01, 100.0))
def test_eg_plus_minus_keeps_budget_and_positive_parts(theta, steps, eta, headroom):
  total = float(headroom * (np.abs(theta).sum() + 0.1))
  tx = gradtx.eg_plus_minus(eta, total=total)
  params = {"w": jnp.asarray(theta)}
  state = tx.init(params)
  for eta_d in steps:
    u, state = tx.update({"w": jnp.asarray(eta_d / np.float32(eta))}, state, params)
    params = optax.apply_updates(params, u)
    plus, minus = np.asarray(state.theta_plus["w"]), np.asarray(state.theta_minus["w"])
    assert np.all(plus > 0) and np.all(minus > 0), (plus, minus)
    np.testing.assert_allclose(plus.sum() + minus.sum(), total, rtol=1e-5)
    assert np.abs(np.asarray(params["w"])).sum() <= total * (1 + 1e-5)


def test_eg_plus_minus_large_step_stays_finite():
  tx = gradtx.eg_plus_minus(1.0, total=10.0)
  w = {"w": jnp.array([1.0, -1.0, 0.5])}
  u, state = tx.update({"w": jnp.array([-200.0, 0.0, 0.0])}, tx.init(w), w)
  assert np.all(np.isfinite(u["w"]))
  assert np.all(np.asarray(state.theta_plus["w"]) > 0)


# ----------------------------------------------------------------------------- pLSA = EM


def plsa_nll(params, counts):
  """``-Σ_{d,w} n(d,w) log Σ_z p(w|z) p(z|d)``; p(w|z) is (W, Z), p(z|d) (Z, D)."""
  p_w_d = params["p_w_z"] @ params["p_z_d"]  # (W, D)
  return -jnp.sum(counts.T * jnp.log(p_w_d))


def np_plsa_em(counts, p_w_z, p_z_d):
  """One EM iteration of pLSA (Hofmann 1999). ``counts`` is (D, W)."""
  joint = p_w_z[None, :, :] * p_z_d.T[:, None, :]  # (D, W, Z): p(w|z) p(z|d)
  posterior = joint / joint.sum(-1, keepdims=True)  # E-step: P(z | d, w)
  expected = counts[:, :, None] * posterior  # n(d, w) P(z | d, w)
  new_w_z = expected.sum(0) / expected.sum((0, 1))  # M-step: normalised over w
  new_z_d = expected.sum(1) / expected.sum((1, 2))[:, None]  # normalised over z, (D, Z)
  return new_w_z, new_z_d.T


def np_plsa_nll(counts, p_w_z, p_z_d):
  return -np.sum(counts.T * np.log(p_w_z @ p_z_d))


@pytest.mark.parametrize("layout", ["axis0", "rules"])
def test_normalized_multiplicative_is_plsa_em(layout):
  rng = np.random.default_rng(4)
  docs, words, topics = 7, 9, 3
  counts = rng.poisson(2.0, (docs, words)) + (rng.uniform(size=(docs, words)) < 0.2) * 5
  counts[:, 0] += 1  # every document has words
  p_w_z = normalized(rng.uniform(0.2, 1.0, (words, topics)), 0)
  p_z_d = normalized(rng.uniform(0.2, 1.0, (topics, docs)), 0)
  with jax.enable_x64(True):
    if layout == "axis0":
      tx = gradtx.normalized_multiplicative(axis=0)
      to_tree = lambda wz, zd: {"p_w_z": jnp.asarray(wz), "p_z_d": jnp.asarray(zd)}
      from_tree = lambda p: (np.asarray(p["p_w_z"]), np.asarray(p["p_z_d"]))
      nll = lambda p: plsa_nll(p, counts)
    else:  # p(z|d) stored as (D, Z), normalised along axis 1
      tx = gradtx.normalized_multiplicative(axis={"p_w_z": 0, "p_d_z": 1})
      to_tree = lambda wz, zd: {"p_w_z": jnp.asarray(wz), "p_d_z": jnp.asarray(zd.T)}
      from_tree = lambda p: (np.asarray(p["p_w_z"]), np.asarray(p["p_d_z"]).T)
      nll = lambda p: plsa_nll({"p_w_z": p["p_w_z"], "p_z_d": p["p_d_z"].T}, counts)
    params = to_tree(p_w_z, p_z_d)
    state = tx.init(params)
    update = jax.jit(tx.update)
    previous = np_plsa_nll(counts, p_w_z, p_z_d)
    for step in range(5):
      u, state = update(jax.grad(nll)(params), state, params)
      params = optax.apply_updates(params, u)
      p_w_z, p_z_d = np_plsa_em(counts, p_w_z, p_z_d)
      got_w_z, got_z_d = from_tree(params)
      np.testing.assert_allclose(got_w_z, p_w_z, rtol=1e-12, err_msg=f"p(w|z), step {step}")
      np.testing.assert_allclose(got_z_d, p_z_d, rtol=1e-12, err_msg=f"p(z|d), step {step}")
      current = np_plsa_nll(counts, p_w_z, p_z_d)
      assert current <= previous + 1e-9  # EM never increases the NLL
      previous = current


def test_normalized_multiplicative_categorical_mle_in_one_step():
  counts = np.array([[3.0, 1.0], [1.0, 0.0], [4.0, 9.0]], np.float32)  # (categories, dists)
  theta = {"p": jnp.full((3, 2), 1 / 3)}
  nll = lambda p: -jnp.sum(counts * jnp.log(p["p"]))
  tx = gradtx.normalized_multiplicative(axis=0)
  u, _ = tx.update(jax.grad(nll)(theta), tx.init(theta), theta)
  np.testing.assert_allclose(theta["p"] + u["p"], counts / counts.sum(0), rtol=1e-6)


# ----------------------------------------------------------------------------- errors


def test_egu_rejects_negative_params():
  with pytest.raises(ValueError, match=r"exponentiated_gradient needs params >= 0.*'w' \(min -1"):
    gradtx.exponentiated_gradient(0.1).init({"v": jnp.ones(2), "w": jnp.array([1.0, -1.0])})


def test_simplex_rejects_zero_params():
  with pytest.raises(ValueError, match=r"exponentiated_gradient needs params > 0.*'w' \(min 0\)"):
    gradtx.exponentiated_gradient(0.1, normalize="simplex").init({"w": jnp.array([0.0, 1.0])})


@pytest.mark.parametrize("norm1", [3.0, 4.0])
def test_eg_plus_minus_rejects_params_beyond_total(norm1):
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([norm1 - 3.0])}
  with pytest.raises(ValueError, match=rf"‖params‖₁ < total.*‖params‖₁ = {norm1:g} and "
                                       r"total = 3\.0"):
    gradtx.eg_plus_minus(0.1, total=3.0).init(params)


@pytest.mark.parametrize("factory", [
    lambda lr: gradtx.exponentiated_gradient(lr),
    lambda lr: gradtx.exponentiated_gradient(lr, normalize="simplex"),
    lambda lr: gradtx.eg_plus_minus(lr, total=1.0),
], ids=["egu", "simplex", "eg_pm"])
@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf")])
def test_learning_rate_must_be_positive(factory, lr):
  with pytest.raises(ValueError, match=rf"learning_rate must be a finite number > 0, got {lr}"):
    factory(lr)


@pytest.mark.parametrize("total", [0.0, -1.0])
def test_eg_plus_minus_total_must_be_positive(total):
  with pytest.raises(ValueError, match=rf"total must be a finite number > 0, got {total}"):
    gradtx.eg_plus_minus(0.1, total=total)


def test_unknown_normalize():
  with pytest.raises(ValueError, match=r"normalize must be one of None, 'simplex', got 'l1'"):
    gradtx.exponentiated_gradient(0.1, normalize="l1")


def test_axis_rules_errors():
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"axis: 1 leaf path\(s\) match no rule.*'b'"):
    gradtx.exponentiated_gradient(0.1, normalize="simplex", axis={"a": 0}).init(params)
  with pytest.raises(ValueError, match=r"axis: 1 leaf path\(s\) match no rule.*'b'"):
    gradtx.normalized_multiplicative(axis={"a": 0}).init(params)
  with pytest.raises(TypeError, match=r"axis: every rule value must be an int axis, got 0\.5"):
    gradtx.exponentiated_gradient(0.1, normalize="simplex", axis={"a": 0.5})
  with pytest.raises(TypeError, match=r"axis must be an ordered mapping"):
    gradtx.normalized_multiplicative(axis=True)


def test_missing_params():
  g = {"w": jnp.ones(2)}
  for name, tx in (("exponentiated_gradient", gradtx.exponentiated_gradient(0.1)),
                   ("normalized_multiplicative", gradtx.normalized_multiplicative())):
    with pytest.raises(ValueError, match=rf"{name} needs the params: call update\(updates, "
                                         r"state, params\)"):
      tx.update(g, tx.init(g))


def test_normalized_multiplicative_rejects_non_positive_params():
  with pytest.raises(ValueError, match=r"normalized_multiplicative needs params > 0.*'p' \(min 0"):
    gradtx.normalized_multiplicative().init({"p": jnp.array([0.0, 1.0])})


# ----------------------------------------------------------------------------- NaN / inf


def test_egu_nan_direction_propagates_to_its_coordinate():
  theta = {"w": jnp.array([0.5, 1.0, 2.0])}
  tx = gradtx.exponentiated_gradient(0.5)
  u, state = tx.update({"w": jnp.array([np.nan, 1.0, -1.0])}, tx.init(theta), theta)
  assert np.isnan(u["w"][0])
  np.testing.assert_allclose(u["w"][1:], [1.0 * np.expm1(-0.5), 2.0 * np.expm1(0.5)], rtol=1e-6)
  assert int(state.count) == 1


def test_simplex_nan_direction_propagates_to_its_slice():
  theta = {"w": jnp.full((2, 3), 1 / 3)}
  tx = gradtx.exponentiated_gradient(0.5, normalize="simplex", axis=1)
  u, _ = tx.update({"w": jnp.array([[np.nan, 0.0, 0.0], [1.0, 0.0, 0.0]])}, tx.init(theta),
                   theta)
  assert np.all(np.isnan(u["w"][0]))
  w = np.exp([-0.5, 0.0, 0.0])
  np.testing.assert_allclose(theta["w"][1] + u["w"][1], w / w.sum(), rtol=1e-6)


def test_eg_plus_minus_nan_direction_propagates_everywhere():
  params = {"w": jnp.array([0.5, -0.5]), "b": jnp.array([0.1])}
  tx = gradtx.eg_plus_minus(0.5, total=4.0)
  u, state = tx.update({"w": jnp.array([np.nan, 1.0]), "b": jnp.array([1.0])}, tx.init(params),
                       params)
  for tree in (u, state.theta_plus, state.theta_minus):
    assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(tree))  # the budget couples all


def test_normalized_multiplicative_bad_directions():
  theta = {"p": jnp.full((2, 3), 0.5)}
  tx = gradtx.normalized_multiplicative(axis=0)
  d = jnp.array([[np.nan, 0.0, 1.0], [-1.0, 0.0, -3.0]])
  u, _ = tx.update({"p": d}, tx.init(theta), theta)
  new = np.asarray(theta["p"] + u["p"])
  assert np.all(np.isnan(new[:, 0]))  # NaN propagates along its slice
  assert np.all(np.isnan(new[:, 1]))  # -d sums to 0 along the axis: 0/0
  assert new[0, 2] < 0  # a positive d (not a likelihood's gradient) gives a negative value


def test_inf_direction_gives_nan_updates_as_documented():
  theta = {"w": jnp.full((1, 3), 1 / 3)}
  for normalize in (None, "simplex"):
    tx = gradtx.exponentiated_gradient(0.5, normalize=normalize)
    u, _ = tx.update({"w": jnp.array([[np.inf, 0.0, 0.0]])}, tx.init(theta), theta)
    assert np.isnan(u["w"][0, 0]), normalize


def test_normalized_multiplicative_state_is_optax_empty_state():
  theta = {"p": jnp.full((2,), 0.5)}
  state = gradtx.normalized_multiplicative().init(theta)
  assert isinstance(state, optax.EmptyState) and state == ()
  assert gradtx.NormalizedMultiplicativeState is optax.EmptyState  # the public name stays
