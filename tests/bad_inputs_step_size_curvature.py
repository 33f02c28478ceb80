"""Bad-input rows for the options of issue #19: hypergradient descent in log space with
bounds, the Gauss–Newton–Bartlett estimator, curvature refreshed every k steps and
smoothed (``every``, ``ema``, ``damping_mode``, callable estimators).

The older rows of these modules are in ``bad_inputs_exponentiated_step_size.py`` and
``bad_inputs_child_tuning_curvature.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _bad_inputs import Case

import gradtx

A = "step_size_curvature"
KEY = jax.random.key(0)
X = jnp.ones((2, 3))
P = {"w": jnp.zeros((3, 4))}


def hd(**kwargs):
  return gradtx.hypergradient_descent(
      **{"base": optax.identity(), "learning_rate": 0.1, "hyper_lr": 0.01, **kwargs})


def newton(**kwargs):
  return gradtx.scale_by_diag_newton(**{"key": KEY, **kwargs})


def linear(p, x):
  return x @ p["w"]


def gnb(logits_fn=linear, params=P, inputs=X, **kwargs):
  return gradtx.gnb_diagonal(logits_fn, params, inputs, KEY, **kwargs)


def sophia(**kwargs):
  return gradtx.sophia(**{"learning_rate": 0.1, "key": KEY, **kwargs})


def option_rows(area, factory, rows):
  """One ``Case`` per ``(name, options, error, match)``: ``factory(**options)`` raises."""
  return [Case(f"{A}-{area}-{name}", lambda options=options: factory(**options), error, match)
          for name, options, error, match in rows]


def newton_update(tx, **update_kwargs):
  return tx.update(P, tx.init(P), P, **update_kwargs)


def huge_hyper_lr_alpha():
  """β = 1e3 for 50 SGD steps on ½‖w‖², max_lr = 1.5: the log-space rate stays in
  (0, 1.5] (the params cannot diverge, and the rate never reaches 0 or goes below)."""
  tx = hd(hyper_lr=1e3, max_lr=1.5)

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(params, state, params)
    return (optax.apply_updates(params, updates), state), state.current_learning_rate

  params = {"w": jnp.array([3.0, -1.0])}
  return jax.lax.scan(step, (params, tx.init(params)), length=50)[1]


def check_positive_and_finite(alphas):
  alphas = np.asarray(alphas)
  assert np.all(alphas > 0) and np.all(alphas <= 1.5 * (1 + 1e-6)), alphas
  assert alphas.min() < 1e-3 and alphas.max() > 1.0, alphas  # it swung both ways


CASES = option_rows("hd", hd, [
    ("log_space-int", dict(log_space=1), TypeError, r"log_space must be a bool, got 1"),
    ("min_lr-zero", dict(min_lr=0.0), ValueError, r"min_lr must be a finite number > 0, got 0.0"),
    ("max_lr-negative", dict(max_lr=-1.0), ValueError,
     r"max_lr must be a finite number > 0, got -1.0"),
    ("max_lr-schedule", dict(max_lr=optax.constant_schedule(1.0)), TypeError,
     r"max_lr must be a number, not a schedule"),
    ("min_lr-above-max_lr", dict(min_lr=0.5, max_lr=0.2), ValueError,
     r"min_lr must be <= max_lr, got min_lr=0.5 and max_lr=0.2"),
]) + option_rows("newton", newton, [
    ("every-zero", dict(every=0), ValueError, r"every must be an int >= 1, got 0"),
    ("every-negative", dict(every=-2), ValueError, r"every must be an int >= 1, got -2"),
    ("every-float", dict(every=10.0), TypeError, r"every must be an int >= 1, got 10.0"),
    ("ema-one", dict(ema=1.0), ValueError, r"ema must be in \[0.0, 1.0\), got 1.0"),
    ("ema-negative", dict(ema=-0.5), ValueError, r"ema must be in \[0.0, 1.0\), got -0.5"),
    ("ema-none", dict(ema=None), TypeError, r"ema must be a number in \[0.0, 1.0\), got None"),
    ("damping_mode-unknown", dict(damping_mode="floor"), ValueError,
     r"damping_mode must be one of 'add', 'max', got 'floor'"),
    ("estimator-unknown", dict(estimator="fisher"), ValueError,
     r"estimator must be 'hutchinson', 'gnb' or a function .*got 'fisher'"),
]) + option_rows("sophia", sophia, [
    ("learning_rate-zero", dict(learning_rate=0.0), ValueError,
     r"learning_rate must be a finite number > 0, got 0.0"),
    ("b1-one", dict(b1=1.0), ValueError, r"b1 must be in \[0.0, 1.0\), got 1.0"),
    ("b2-negative", dict(b2=-0.1), ValueError, r"b2 must be in \[0.0, 1.0\), got -0.1"),
    ("gamma-zero", dict(gamma=0.0), ValueError, r"gamma must be a finite number > 0, got 0.0"),
    ("gamma-schedule", dict(gamma=optax.constant_schedule(0.01)), TypeError,
     r"gamma must be a number, not a schedule"),
    ("eps-negative", dict(eps=-1e-12), ValueError,
     r"eps must be a finite number > 0, got -1e-12"),
    ("weight_decay-negative", dict(weight_decay=-0.1), ValueError,
     r"weight_decay must be a finite number >= 0, got -0.1"),
    ("clip_threshold-inf", dict(clip_threshold=float("inf")), ValueError,
     r"clip_threshold must be a finite number > 0, got inf"),
    ("every-zero", dict(every=0), ValueError, r"every must be an int >= 1, got 0"),
    ("estimator-unknown", dict(estimator="adahessian"), ValueError,
     r"estimator must be 'hutchinson', 'gnb' or a function .*got 'adahessian'"),
    ("key-int", dict(key=0), TypeError, r"key must be a jax.random key"),
]) + [
    Case(f"{A}-hd-learning_rate-outside-bounds", lambda: hd(min_lr=0.2, max_lr=1.0),
         ValueError, r"learning_rate must lie in \[min_lr, max_lr\] = \[0.2, 1.0\].*got 0.1"),
    Case(f"{A}-hd-log-space-huge-hyper_lr-stays-positive", huge_hyper_lr_alpha,
         check=check_positive_and_finite),
    # ------------------------------------------------------------ eg_step_size
    Case(f"{A}-egss-initial_scale-outside-scale_range",
         lambda: gradtx.eg_step_size(optax.identity(), learning_rate=0.1, initial_scale=0.01),
         ValueError, r"initial_scale must lie in scale_range = \(0.1, 10.0\), got 0.01"),
    Case(f"{A}-egss-initial_scale-zero",
         lambda: gradtx.eg_step_size(optax.identity(), learning_rate=0.1, initial_scale=0.0),
         ValueError, r"initial_scale must be a finite number > 0, got 0.0"),
    # ------------------------------------------------------------ gnb_diagonal
    Case(f"{A}-gnb-logits-1d", lambda: gnb(lambda p, x: linear(p, x)[0]), ValueError,
         r"logits_fn\(params, inputs\) must return logits of shape \(batch, classes\).*"
         r"got shape \(4,\)"),
    Case(f"{A}-gnb-logits-scalar-loss", lambda: gnb(lambda p, x: jnp.sum(linear(p, x))),
         ValueError, r"must return logits of shape \(batch, classes\).*got shape \(\)"),
    Case(f"{A}-gnb-logits-one-class", lambda: gnb(lambda p, x: linear(p, x)[:, :1]),
         ValueError, r"at least 2 classes, got shape \(2, 1\)"),
    Case(f"{A}-gnb-logits-tuple", lambda: gnb(lambda p, x: (linear(p, x),)), ValueError,
         r"must return logits of shape \(batch, classes\).*got a tuple"),
    Case(f"{A}-gnb-logits-integer", lambda: gnb(lambda p, x: jnp.ones((2, 4), jnp.int32)),
         TypeError, r"logits_fn\(params, inputs\) must return floating logits, got int32"),
    Case(f"{A}-gnb-logits_fn-not-callable", lambda: gnb(jnp.ones((2, 4))), TypeError,
         r"logits_fn must be a function called as logits_fn\(params, inputs\)"),
    Case(f"{A}-gnb-mask-shape", lambda: gnb(mask=jnp.ones(3, bool)), ValueError,
         r"mask must have the logits' leading shape \(2,\).*got shape \(3,\)"),
    Case(f"{A}-gnb-key-int", lambda: gradtx.gnb_diagonal(linear, P, X, 0), TypeError,
         r"key must be a jax.random key"),
    Case(f"{A}-gnb-integer-params",
         lambda: gnb(params={"w": jnp.zeros((3, 4), jnp.int32)}), TypeError,
         r"params must hold floating arrays; these leaves are not: w \(int32\)"),
    # ------------------------------------------------------------ scale_by_diag_newton
    Case(f"{A}-newton-gnb-without-logits_fn",
         lambda: newton_update(newton(estimator="gnb"), inputs=X), ValueError,
         r"estimator='gnb'\) needs logits_fn=.* and inputs="),
    Case(f"{A}-newton-gnb-without-params",
         lambda: newton(estimator="gnb").update(P, newton(estimator="gnb").init(P),
                                                logits_fn=linear, inputs=X),
         ValueError, r"with estimator='gnb' needs the params"),
    Case(f"{A}-newton-gnb-bad-logits",
         lambda: newton_update(newton(estimator="gnb", every=2),
                               logits_fn=lambda p, x: linear(p, x)[0], inputs=X),
         ValueError, r"must return logits of shape \(batch, classes\).*got shape \(4,\)"),
    # ------------------------------------------------------------ sophia
    Case(f"{A}-sophia-g-without-logits_fn",
         lambda: newton_update(sophia(), loss_fn=lambda p: jnp.sum(p["w"] ** 2)), ValueError,
         r"estimator='gnb'\) needs logits_fn=.* and inputs="),
    Case(f"{A}-sophia-h-without-loss_fn",
         lambda: newton_update(sophia(estimator="hutchinson"), logits_fn=linear, inputs=X),
         ValueError, r"needs the curvature: pass loss_fn="),
]
