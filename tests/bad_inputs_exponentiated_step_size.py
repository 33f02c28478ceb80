"""Bad-input rows for gradtx/exponentiated.py and gradtx/step_size.py.

Exponentiated gradient (EGU, simplex EG, EG±), the normalised multiplicative (EM) update,
and the self-adapting step sizes (EGDD / Su's rule, hypergradient descent): hyperparameters
that are ``None``, schedules or arrays where a number is needed, optimizer factories
passed as the base transformation, integer and complex params or updates, leaves without
the axis a simplex is normalised along. Plus the documented edge results: a finite
meta-gradient through the first step (closed form), 0-d params where no axis is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _bad_inputs import Case

import gradtx

A = "exponentiated_step_size"
W = {"w": jnp.array([0.5, 1.0])}


def init(tx, params=W):
  return tx.init(params)


def update(tx, updates, params=W):
  """One jitted update (the checks run while it is traced; one compile, not op by op)."""
  return jax.jit(tx.update)(updates, tx.init(params), params)


def egu(**kwargs):
  return gradtx.exponentiated_gradient(**{"learning_rate": 0.1, **kwargs})


def simplex(**kwargs):
  return egu(normalize="simplex", **kwargs)


def eg_pm(**kwargs):
  return gradtx.eg_plus_minus(**{"learning_rate": 0.1, "total": 4.0, **kwargs})


def egss(**kwargs):
  return gradtx.eg_step_size(**{"base": optax.identity(), "learning_rate": 0.1, **kwargs})


def hd(**kwargs):
  return gradtx.hypergradient_descent(
      **{"base": optax.identity(), "learning_rate": 0.1, "hyper_lr": 0.01, **kwargs})


def one_step_meta_gradient(make_tx):
  """∂/∂θ of ½‖θ_1‖² after one step from θ (the step's gradient is θ itself)."""
  def loss_after(theta):
    tx = make_tx()
    params = {"w": theta}
    updates, _ = tx.update(params, tx.init(params), params)
    return 0.5 * jnp.sum(optax.apply_updates(params, updates)["w"] ** 2)
  return jax.jit(jax.grad(loss_after))(jnp.array([1.0, -2.0, 0.5]))


def check_one_step_meta_gradient(lr):
  """The first step is plain ``-η g`` (gains and scale 1, cosine 0): θ_1 = (1 - η) θ, so the
  gradient of ½‖θ_1‖² is (1 - η)² θ; it was NaN (the cosine's √0 in the derivative)."""
  def check(grad):
    np.testing.assert_allclose(grad, (1 - lr) ** 2 * np.array([1.0, -2.0, 0.5]), rtol=1e-6)
  return check


def check_close(expected, rtol=1e-6):
  def check(actual):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol)
  return check


def eg_pm_0d_split():
  state = gradtx.eg_plus_minus(0.1, total=2.0).init({"s": jnp.array(0.5)})
  return state.theta_plus["s"], state.theta_minus["s"]


# ‖g‖²‖d‖² overflows float32 for gradients ~1e10: the cosine read 0 (α did not move).
_G1, _G2 = np.array([3e10, 1e10]), np.array([2e10, -4e10])
_COS = _G1 @ _G2 / (np.linalg.norm(_G1) * np.linalg.norm(_G2))


def large_gradient_alpha(log_space=False):
  tx = hd(hyper_lr=0.5, multiplicative=True, log_space=log_space)
  params, step = {"w": jnp.zeros(2)}, jax.jit(tx.update)
  _, state = step({"w": jnp.asarray(_G1, jnp.float32)}, tx.init(params), params)
  _, state = step({"w": jnp.asarray(_G2, jnp.float32)}, state, params)
  return state.current_learning_rate
INT = {"w": jnp.array([3, 4])}
S_GRAD, S_PARAM = {"s": jnp.array(2.0)}, {"s": jnp.array(0.5)}
COMPLEX = {"w": jnp.array([1 + 1j, 1 - 1j], jnp.complex64)}
FACTORY = r"base must be an optax.GradientTransformation; it is the factory "

CASES = [
    # ------------------------------------------------------------ exponentiated_gradient
    Case(f"{A}-egu-learning_rate-none", lambda: egu(learning_rate=None), TypeError,
         r"learning_rate must be a finite number > 0 or a schedule, got None"),
    Case(f"{A}-egu-learning_rate-vector", lambda: egu(learning_rate=jnp.ones(2)), ValueError,
         r"learning_rate must be a scalar .*shape \(2,\)"),
    Case(f"{A}-egu-learning_rate-nan", lambda: egu(learning_rate=float("nan")), ValueError,
         r"learning_rate must be a finite number > 0, got nan"),
    Case(f"{A}-egu-normalize-unknown", lambda: egu(normalize="l1"), ValueError,
         r"normalize must be one of None, 'simplex', got 'l1'"),
    Case(f"{A}-egu-axis-none", lambda: egu(axis=None), TypeError,
         r"axis must be an ordered mapping .*got NoneType: None"),
    Case(f"{A}-simplex-axis-rule-float", lambda: simplex(axis={"w": 0.5}), TypeError,
         r"axis: every rule value must be an int axis, got 0\.5"),
    Case(f"{A}-simplex-axis-rules-miss-a-leaf",
         lambda: init(simplex(axis={"a": 0}), {"a": jnp.ones(2), "b": jnp.ones(3)}),
         ValueError, r"axis: 1 leaf path\(s\) match no rule.*'b'"),
    Case(f"{A}-simplex-0d-leaf-axis-minus-1",
         lambda: init(simplex(), {"v": jnp.ones(3) / 3, "b": jnp.array(0.5)}), ValueError,
         r"exponentiated_gradient: axis must be an axis of every leaf.*'b' \(shape \(\), "
         r"axis -1\)"),
    Case(f"{A}-simplex-axis-out-of-range", lambda: init(simplex(axis=2), {"p": jnp.ones((2, 2))}),
         ValueError, r"axis must be an axis of every leaf.*'p' \(shape \(2, 2\), axis 2\)"),
    Case(f"{A}-egu-int-params", lambda: init(egu(), INT), TypeError,
         r"params must hold floating arrays; these leaves are not: w \(int32\)"),
    Case(f"{A}-egu-complex-updates", lambda: update(egu(), COMPLEX), TypeError,
         r"updates must hold floating arrays; these leaves are not: w \(complex64\)"),
    Case(f"{A}-egu-negative-params", lambda: init(egu(), {"w": jnp.array([1.0, -1.0])}),
         ValueError, r"exponentiated_gradient needs params >= 0.*'w' \(min -1\)"),
    Case(f"{A}-simplex-zero-params", lambda: init(simplex(), {"w": jnp.array([0.0, 1.0])}),
         ValueError, r"exponentiated_gradient needs params > 0.*'w' \(min 0\)"),
    Case(f"{A}-egu-missing-params", lambda: egu().update(W, egu().init(W)), ValueError,
         r"exponentiated_gradient needs the params: call update\(updates, state, params\)"),
    Case(f"{A}-egu-0d-params-need-no-axis",  # EGU has no axis: a 0-d leaf is fine
         lambda: update(egu(learning_rate=0.5), S_GRAD, S_PARAM)[0]["s"],
         check=check_close(0.5 * np.expm1(-1.0))),
    # ------------------------------------------------------------ eg_plus_minus
    Case(f"{A}-eg_pm-total-none", lambda: eg_pm(total=None), TypeError,
         r"total must be a finite number > 0, got None"),
    Case(f"{A}-eg_pm-total-schedule", lambda: eg_pm(total=lambda count: 4.0), TypeError,
         r"total must be a number, not a schedule"),
    Case(f"{A}-eg_pm-total-inf", lambda: eg_pm(total=float("inf")), ValueError,
         r"total must be a finite number > 0, got inf"),
    Case(f"{A}-eg_pm-learning_rate-none", lambda: eg_pm(learning_rate=None), TypeError,
         r"learning_rate must be a finite number > 0 or a schedule, got None"),
    Case(f"{A}-eg_pm-params-beyond-total",
         lambda: init(eg_pm(total=1.0), {"w": jnp.array([1.0, -0.5])}), ValueError,
         r"eg_plus_minus needs ‖params‖₁ < total.*‖params‖₁ = 1\.5 and total = 1\.0"),
    Case(f"{A}-eg_pm-int-params", lambda: init(eg_pm(), {"w": jnp.array([1, -1])}), TypeError,
         r"params must hold floating arrays; these leaves are not: w \(int32\)"),
    Case(f"{A}-eg_pm-complex-updates", lambda: update(eg_pm(), COMPLEX), TypeError,
         r"updates must hold floating arrays; these leaves are not: w \(complex64\)"),
    Case(f"{A}-eg_pm-0d-params-split", eg_pm_0d_split,  # s = (2 - 0.5) / 2
         check=lambda parts: check_close([1.25, 0.75])(np.array(parts))),
    # ------------------------------------------------------------ normalized_multiplicative
    Case(f"{A}-em-0d-leaf", lambda: init(gradtx.normalized_multiplicative(),
                                         {"p": jnp.ones(2) / 2, "t": jnp.array(1.0)}),
         ValueError, r"normalized_multiplicative: axis must be an axis of every leaf.*'t' "
                     r"\(shape \(\), axis 0\)"),
    Case(f"{A}-em-axis-none", lambda: gradtx.normalized_multiplicative(axis=None), TypeError,
         r"axis must be an ordered mapping .*got NoneType: None"),
    Case(f"{A}-em-zero-params",
         lambda: init(gradtx.normalized_multiplicative(), {"p": jnp.array([0.0, 1.0])}),
         ValueError, r"normalized_multiplicative needs params > 0.*'p' \(min 0"),
    Case(f"{A}-em-int-updates", lambda: update(gradtx.normalized_multiplicative(), INT),
         TypeError, r"updates must hold floating arrays; these leaves are not: w \(int32\)"),
    Case(f"{A}-em-bool-params",
         lambda: init(gradtx.normalized_multiplicative(), {"m": jnp.array([True, True])}),
         TypeError, r"params must hold floating arrays; these leaves are not: m \(bool\)"),
    # ------------------------------------------------------------ eg_step_size
    Case(f"{A}-egss-base-factory",
         lambda: gradtx.eg_step_size(optax.adam, learning_rate=0.1), TypeError,
         FACTORY + "adam"),
    Case(f"{A}-egss-base-none", lambda: egss(base=None), TypeError,
         r"base must be an optax.GradientTransformation, got None"),
    Case(f"{A}-egss-learning_rate-none", lambda: egss(learning_rate=None), TypeError,
         r"learning_rate must be a finite number > 0 or a schedule, got None"),
    Case(f"{A}-egss-gain_lr-none", lambda: egss(gain_lr=None), TypeError,
         r"gain_lr must be a finite number > 0, got None"),
    Case(f"{A}-egss-gain_lr-schedule", lambda: egss(gain_lr=optax.constant_schedule(0.1)),
         TypeError, r"gain_lr must be a number, not a schedule"),
    Case(f"{A}-egss-scale_lr-vector", lambda: egss(scale_lr=np.ones(3)), ValueError,
         r"scale_lr must be a scalar .*shape \(3,\)"),
    Case(f"{A}-egss-beta-none", lambda: egss(beta=None), TypeError,
         r"beta must be a number in \[0\.0, 1\.0\), got None"),
    Case(f"{A}-egss-beta-one", lambda: egss(beta=1.0), ValueError,
         r"beta must be in \[0\.0, 1\.0\), got 1\.0"),
    Case(f"{A}-egss-gain_range-none", lambda: egss(gain_range=None), TypeError,
         r"gain_range must be a pair \(low, high\), got None"),
    Case(f"{A}-egss-scale_range-above-one", lambda: egss(scale_range=(2.0, 3.0)), ValueError,
         r"scale_range must satisfy 0 < low <= 1 <= high < inf .*got \(2\.0, 3\.0\)"),
    Case(f"{A}-egss-rule-unknown", lambda: egss(rule="adam"), ValueError,
         r"rule must be one of 'egdd', 'su', got 'adam'"),
    Case(f"{A}-egss-gains-none", lambda: egss(gains=None), ValueError,
         r"gains must be one of 'per_coordinate', 'per_leaf', 'none', got None"),
    Case(f"{A}-egss-int-params", lambda: init(egss(), INT), TypeError,
         r"params must hold floating arrays; these leaves are not: w \(int32\)"),
    Case(f"{A}-egss-complex-params", lambda: init(egss(), COMPLEX), TypeError,
         r"params must hold floating arrays; these leaves are not: w \(complex64\)"),
    Case(f"{A}-egss-int-updates", lambda: update(egss(), INT), TypeError,
         r"updates must hold floating arrays; these leaves are not: w \(int32\)"),
    Case(f"{A}-egss-meta-gradient-first-step",
         lambda: one_step_meta_gradient(lambda: gradtx.eg_step_size(
             optax.identity(), learning_rate=0.3)),
         check=check_one_step_meta_gradient(0.3)),
    # ------------------------------------------------------------ hypergradient_descent
    Case(f"{A}-hd-base-factory",
         lambda: hd(base=optax.sgd), TypeError, FACTORY + "sgd"),
    Case(f"{A}-hd-multiplicative-int", lambda: hd(multiplicative=1), TypeError,
         r"multiplicative must be a bool, got 1"),
    Case(f"{A}-hd-multiplicative-none", lambda: hd(multiplicative=None), TypeError,
         r"multiplicative must be a bool, got None"),
    Case(f"{A}-hd-learning_rate-none", lambda: hd(learning_rate=None), TypeError,
         r"learning_rate must be a finite number > 0, got None"),
    Case(f"{A}-hd-learning_rate-schedule",
         lambda: hd(learning_rate=optax.linear_schedule(0.1, 0.01, 10)), TypeError,
         r"learning_rate must be a number, not a schedule"),
    Case(f"{A}-hd-hyper_lr-inf", lambda: hd(hyper_lr=float("inf")), ValueError,
         r"hyper_lr must be a finite number > 0, got inf"),
    Case(f"{A}-hd-complex-params", lambda: init(hd(multiplicative=True), COMPLEX), TypeError,
         r"params must hold floating arrays; these leaves are not: w \(complex64\)"),
    Case(f"{A}-hd-int-updates", lambda: update(hd(), INT), TypeError,
         r"updates must hold floating arrays; these leaves are not: w \(int32\)"),
    Case(f"{A}-hd-multiplicative-meta-gradient-first-step",
         lambda: one_step_meta_gradient(lambda: hd(learning_rate=0.3, multiplicative=True)),
         check=check_one_step_meta_gradient(0.3)),
    Case(f"{A}-hd-multiplicative-cosine-of-large-gradients", large_gradient_alpha,
         check=check_close(0.1 * (1 + 0.5 * _COS))),
    Case(f"{A}-hd-log-space-cosine-of-large-gradients",
         lambda: large_gradient_alpha(log_space=True),
         check=check_close(0.1 * np.exp(0.5 * _COS))),
]
