"""Bad inputs of the estimators: es_gradient, forward_gradient, score_function_gradient,
zeroth_order, fill_masked, zo_sgd_step, hizoo_gradient and magnitude_mask (rows of
``tests/test_bad_inputs.py``)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from _bad_inputs import Case

import gradtx

KEY = jax.random.key(0)
P = {"w": jnp.array([0.5, -1.0, 2.0])}
W = np.array([1.0, -2.0, 3.0])


def linear(p):
  return jnp.dot(p["w"].astype(jnp.float32), jnp.asarray(W, jnp.float32))


def es(params=P, key=KEY, fn=linear, **kw):
  kw = {"sigma": 0.1, "num_samples": 4, **kw}
  return gradtx.es_gradient(fn, params, key, **kw)


def fwd(params=P, key=KEY, fn=linear, **kw):
  return gradtx.forward_gradient(fn, params, key, **kw)


def sfg(key=KEY, reward=lambda y: jnp.float32(y), log_prob=None, params=None, **kw):
  params = {"logits": jnp.zeros(3)} if params is None else params
  log_prob = log_prob or (lambda p, y: jax.nn.log_softmax(p["logits"])[y])
  kw = {"num_samples": 4, **kw}
  return gradtx.score_function_gradient(
      log_prob, reward, params, key,
      sample_fn=lambda p, k: jax.random.categorical(k, p["logits"]), **kw)


P2 = {"a": jnp.ones((3, 2)), "b": jnp.ones(2)}


def step(params=P, key=KEY, **kw):
  kw = {"sigma": 1e-3, "learning_rate": 0.1, **kw}
  return gradtx.zo_sgd_step(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p)), params,
                            key, **kw)


def hizoo(params=P, key=KEY, **kw):
  kw = {"sigma": 0.1, "hessian_diag": jax.tree.map(jnp.ones_like, params), **kw}
  return gradtx.hizoo_gradient(linear if params is P else lambda p: 0.0, params, key, **kw)


def zo(estimator="es", **kw):
  return gradtx.zeroth_order(estimator, **{"key": KEY, **kw})


def zo_update(updates, params, **kw):
  tx = zo(**{"sigma": 0.1, "num_samples": 4, **kw})
  return tx.update(updates, tx.init(params), params,
                   loss_fn=lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p)))


def jitted(estimate, **kw):
  """``estimate(P, **kw)`` under ``jax.jit``: a mistake found while tracing costs no compile."""
  return lambda: jax.jit(functools.partial(estimate, **kw))(P)


def traced(fn):
  """``fn(x)`` with ``x`` traced under jit (a static argument passed as an array)."""
  return lambda: jax.jit(fn)(4)


def injected_without_static_num_samples():
  tx = optax.inject_hyperparams(gradtx.zeroth_order, static_args=("estimator", "key"))(
      estimator="es", key=KEY, sigma=0.1, num_samples=4)
  return jax.jit(lambda s: tx.update(P, s, P, loss_fn=linear))(tx.init(P))


def bf16_params():
  return {"w": jnp.array([0.01, 0.25, 1.0, 3.0], jnp.bfloat16)}


def bf16_sum(p):
  return jnp.sum(p["w"].astype(jnp.float32) * jnp.array([1.0, -1.0, 2.0, 0.5]))


def numpy_spacing_ok(params, sigma):
  """Where ``σ`` is at least bfloat16's spacing at ``|θ|`` (numpy / ml_dtypes)."""
  w = np.abs(np.asarray(params["w"]).astype(ml_dtypes.bfloat16))
  return np.asarray(np.spacing(w), np.float64) <= sigma


def check_bf16_nan_where_unresolved(g):
  want_nan = ~numpy_spacing_ok(bf16_params(), 0.005)
  np.testing.assert_array_equal(np.isnan(np.asarray(g["w"], np.float32)), want_nan)
  assert want_nan.tolist() == [False, False, True, True]


def check_fill_masked_subtree(out):
  assert set(out) == {"a", "b"}
  np.testing.assert_array_equal(out["a"], np.ones(2))
  np.testing.assert_array_equal(out["b"]["c"], np.full(3, 7.0))


def out_of_range_rows() -> list[Case]:
  """``sigma`` <= 0 or NaN, and HiZOO's ``alpha`` outside (0, 1], for every function that
  takes them: one row per (function, value), all with the same message."""
  takers = {"es": es, "zo_sgd_step": step, "hizoo": hizoo,
            "zeroth_order-sign": functools.partial(zo, "sign", num_samples=2),
            "zeroth_order-hizoo": functools.partial(zo, "hizoo", sigma=0.1)}
  sigmas = {"zero": 0.0, "negative": -1e-3, "nan": float("nan")}
  alphas = {"zero": 0.0, "above-one": 1.5}
  rows = [Case(f"estimators-{name}-sigma-{label}", functools.partial(make, sigma=value),
               ValueError, rf"sigma must be a finite number > 0, got {re.escape(repr(value))}")
          for name, make in takers.items() if name != "zeroth_order-hizoo"
          for label, value in sigmas.items()]
  return rows + [
      Case(f"estimators-{name}-alpha-{label}", functools.partial(make, alpha=value),
           ValueError, rf"alpha must be in \(0\.0, 1\.0\], got {re.escape(repr(value))}")
      for name, make in takers.items() if "hizoo" in name for label, value in alphas.items()]


def wrong_input_rows() -> list[Case]:
  """A key that is not a key, and integer params, for every estimator: the same messages."""
  takers = {"es": es, "forward": fwd, "score": sfg, "zo_sgd_step": step, "hizoo": hizoo}
  rows = [Case(f"estimators-{name}-key-{type(value).__name__}",
               functools.partial(make, key=value), TypeError,
               rf"key must be a jax\.random key .*got {re.escape(repr(value))}")
          for name, make in takers.items() for value in (0, "seed")]
  return rows + [
      Case(f"estimators-{name}-integer-params",
           functools.partial(make, params={"w": jnp.arange(3)}), TypeError,
           r"params must hold floating arrays; these leaves are not: w \(int32\)")
      for name, make in takers.items() if name != "score"]


def count_option_rows() -> list[Case]:
  """The static counts (sizes, ranks, periods): 0, a float and a traced value, for every
  function that takes one."""
  takers = [("es", es, "num_samples"), ("es", es, "batch_size"), ("es", es, "rank"),
            ("forward", fwd, "num_directions"), ("score", sfg, "num_samples"),
            ("zo_sgd_step", functools.partial(step, params=P2), "rank"),
            ("zeroth_order", functools.partial(zo, sigma=0.1, num_samples=2, rank=1),
             "resample_every")]
  rows = []
  for name, make, option in takers:
    tag = f"estimators-{name}-{option}"
    rows.append(Case(f"{tag}-traced", traced(lambda n, make=make, option=option: make(
        **{option: n})), TypeError, rf"{option} must be a static Python value"))
    rows += [Case(f"{tag}-{label}", functools.partial(make, **{option: value}), error,
                  rf"{option} must be an int >= 1, got {re.escape(repr(value))}")
             for label, value, error in (("zero", 0, ValueError), ("float", 2.0, TypeError))
             if name != "score"]  # score: num_samples=0 fails the baseline's check first
  return rows


MESH = jax.make_mesh((1,), ("pop",))

CASES = [
    # es_gradient: keys, params, fn
    Case("estimators-es-key-batch", lambda: es(key=jax.random.split(KEY, 2)), ValueError,
         r"key must be a single key \(shape \(\)\), got shape \(2,\)"),
    Case("estimators-es-key-float-array", lambda: es(key=jnp.zeros(2)), TypeError,
         r"key must be a jax\.random key .*float32"),
    Case("estimators-es-bool-params", lambda: es(params={"a": P["w"], "m": jnp.ones(2, bool)}),
         TypeError, r"params must hold floating .*m \(bool\)"),
    Case("estimators-es-vector-fn", jitted(es, fn=lambda p: p["w"] * 2.0), TypeError,
         r"fn must return a scalar \(shape \(\)\), got an output of shape \(3,\)"),
    Case("estimators-es-vector-fn-f0-baseline",
         jitted(es, fn=lambda p: p["w"], antithetic=False, baseline="f0"), TypeError,
         r"fn must return a scalar .*shape \(3,\)"),
    Case("estimators-es-params-and-fn-swapped",
         lambda: gradtx.es_gradient(P, linear, KEY, sigma=0.1, num_samples=4), TypeError,
         r"fn must be a function called as fn\(params\) -> scalar, got \{"),
    # es_gradient: sigma
    Case("estimators-es-sigma-none", lambda: es(sigma=None), TypeError,
         r"sigma must be a finite number > 0, got None"),
    Case("estimators-es-sigma-schedule", lambda: es(sigma=optax.constant_schedule(0.1)),
         TypeError, r"sigma must be a number, not a schedule"),
    Case("estimators-es-sigma-vector", lambda: es(sigma=jnp.array([0.1, 0.2])), ValueError,
         r"sigma must be a scalar .*shape \(2,\)"),
    Case("estimators-es-bf16-sigma-below-resolution",
         lambda: es(params=bf16_params(), fn=bf16_sum, sigma=0.005), ValueError,
         r"sigma=0\.005 is below the resolution of params leaf 'w' \(bfloat16: spacing "
         r"0\.015625 at \|θ\| = 3\).*sigma >= 0\.015625"),
    Case("estimators-es-bf16-sigma-below-resolution-jit-nan",
         lambda: jax.jit(functools.partial(es, fn=bf16_sum, sigma=0.005, num_samples=2))(
             bf16_params()),
         check=check_bf16_nan_where_unresolved),
    *out_of_range_rows(),
    *wrong_input_rows(),
    *count_option_rows(),
    # es_gradient: num_samples and the other options
    Case("estimators-es-num_samples-odd", lambda: es(num_samples=5), ValueError,
         r"num_samples must be even with antithetic=True.*got 5"),
    Case("estimators-es-antithetic-string", lambda: es(antithetic="yes"), TypeError,
         r"antithetic must be a bool, got 'yes'"),
    Case("estimators-es-lean-int", lambda: es(lean=1), TypeError, r"lean must be a bool, got 1"),
    Case("estimators-es-noise-uniform", lambda: es(noise="uniform"), ValueError,
         r"noise must be one of 'gaussian', 'rademacher', got 'uniform'"),
    Case("estimators-es-shaping-rank", lambda: es(shaping="rank"), ValueError,
         r"shaping must be one of None, 'centered_rank', 'standardize', got 'rank'"),
    Case("estimators-es-baseline-median", lambda: es(baseline="median"), ValueError,
         r"baseline must be one of 'f0', 'mean', None, got 'median'"),
    Case("estimators-es-baseline-mean-one-sample",
         lambda: es(num_samples=1, antithetic=False, baseline="mean"), ValueError,
         r"baseline='mean' needs num_samples >= 2"),
    Case("estimators-es-axis_name-without-mesh", lambda: es(axis_name="pop"), ValueError,
         r"pass both mesh and axis_name .*axis_name='pop'"),
    Case("estimators-es-axis_name-not-in-mesh", lambda: es(mesh=MESH, axis_name="data"),
         ValueError, r"axis_name must be an axis of mesh \('pop',\), got 'data'"),
    # forward_gradient
    Case("estimators-forward-vector-fn", jitted(fwd, fn=lambda p: jnp.sin(p["w"])), TypeError,
         r"fn must return a scalar .*shape \(3,\)"),
    # score_function_gradient
    Case("estimators-score-sample_fn-none",
         lambda: gradtx.score_function_gradient(lambda p, y: 0.0, lambda y: 0.0, P, KEY,
                                                sample_fn=None, num_samples=4), TypeError,
         r"sample_fn must be a function called as sample_fn\(params, key\) -> y, got None"),
    Case("estimators-score-int-params",
         lambda: sfg(params={"logits": jnp.zeros(3, jnp.int32)}), TypeError,
         r"params must hold floating or complex arrays; .*logits \(int32\)"),
    Case("estimators-score-vector-reward", jax.jit(lambda: sfg(reward=lambda y: jnp.ones(2) * y)),
         TypeError, r"reward_fn must return a scalar .*shape \(2,\)"),
    Case("estimators-score-vector-log_prob",
         jax.jit(lambda: sfg(log_prob=lambda p, y: jax.nn.log_softmax(p["logits"]))), TypeError,
         r"log_prob_fn must return a scalar .*shape \(3,\)"),
    Case("estimators-score-num_samples-one-mean", lambda: sfg(num_samples=1), ValueError,
         r"num_samples must be >= 2 with baseline='mean'.*got 1"),
    Case("estimators-score-baseline-f0", lambda: sfg(baseline="f0"), ValueError,
         r"baseline must be one of 'mean', None, got 'f0'"),
    # zeroth_order
    Case("estimators-zeroth_order-missing-sigma", lambda: zo(num_samples=4), TypeError,
         r"zeroth_order\('es', \.\.\.\) needs sigma="),
    Case("estimators-zeroth_order-missing-num_samples", lambda: zo(sigma=0.1), TypeError,
         r"zeroth_order\('es', \.\.\.\) needs num_samples="),
    Case("estimators-zeroth_order-unknown-option",
         lambda: zo(sigma=0.1, num_samples=4, sigmaa=0.1), TypeError,
         r"bad estimator options \['sigmaa'\]"),
    Case("estimators-zeroth_order-es-option-for-forward", lambda: zo("forward", sigma=0.1),
         TypeError, r"zeroth_order\('forward', \.\.\.\): bad estimator options \['sigma'\]"),
    Case("estimators-zeroth_order-estimator-cma", lambda: zo("cma"), ValueError,
         r"estimator must be one of 'es', 'forward', 'hizoo', 'sign', got 'cma'"),
    Case("estimators-zeroth_order-estimator-int", lambda: zo(3), TypeError,
         r"estimator must be one of \('es', 'forward', 'hizoo', 'sign'\) or a callable, got 3"),
    Case("estimators-zeroth_order-key-none", lambda: zo(key=None, sigma=0.1, num_samples=4),
         TypeError, r"key must be a jax\.random key .*got None"),
    Case("estimators-zeroth_order-lean-not-bool",
         lambda: zo(sigma=0.1, num_samples=4, lean="no"), TypeError,
         r"lean must be a bool, got 'no'"),
    Case("estimators-zeroth_order-updates-missing-leaf",
         lambda: zo_update({"w": jnp.zeros(2)}, {"w": jnp.ones(2), "b": jnp.ones(1)}),
         ValueError, r"updates must have the structure of params: missing \['b'\]"),
    Case("estimators-zeroth_order-updates-shape",
         lambda: zo_update({"w": jnp.zeros(3)}, {"w": jnp.ones(2)}), ValueError,
         r"updates must have the leaf shapes of params; these differ: w: \(3,\) vs \(2,\)"),
    Case("estimators-zeroth_order-num_samples-injected-not-static",
         injected_without_static_num_samples, TypeError,
         r"num_samples must be a static Python value .*static_args"),
    Case("estimators-zeroth_order-loss_fn-not-callable",
         lambda: zo(sigma=0.1, num_samples=4).update(P, zo(sigma=0.1, num_samples=4).init(P),
                                                     P, loss_fn=1.0), TypeError,
         r"loss_fn must be a function called as loss_fn\(params\) -> scalar, got 1\.0"),
    # fill_masked
    Case("estimators-fill_masked-missing-path",
         lambda: gradtx.fill_masked({"a": 1.0, "b": optax.MaskedNode()}, {"a": 0.0}),
         ValueError, r"fill_masked: full must have the structure of tree.*missing in full: "
         r"\['b'\]"),
    Case("estimators-fill_masked-extra-path",
         lambda: gradtx.fill_masked({"a": 1.0}, {"a": 0.0, "c": 2.0}), ValueError,
         r"not in tree: \['c'\]"),
    Case("estimators-fill_masked-subtree-at-masked-node",
         lambda: gradtx.fill_masked({"a": jnp.ones(2), "b": optax.MaskedNode()},
                                    {"a": jnp.zeros(2), "b": {"c": jnp.full(3, 7.0)}}),
         check=check_fill_masked_subtree),
    # zo_sgd_step, masks, low rank, HiZOO, sign (issue #18)
    Case("estimators-zo_sgd_step-learning_rate-nan", lambda: step(learning_rate=float("nan")),
         ValueError, r"learning_rate must be a finite number, got nan"),
    Case("estimators-zo_sgd_step-learning_rate-schedule",
         lambda: step(learning_rate=optax.constant_schedule(0.1)), TypeError,
         r"learning_rate must be a number, not a schedule"),
    Case("estimators-zo_sgd_step-mask-missing-path",
         lambda: step(params=P2, mask={"a": True}), ValueError,
         r"mask must have the structure of params: missing \['b'\]"),
    Case("estimators-zo_sgd_step-mask-extra-path",
         lambda: step(mask={"w": True, "v": False}), ValueError,
         r"mask must have the structure of params: not in params: \['v'\]"),
    Case("estimators-zo_sgd_step-mask-wrong-shape",
         lambda: step(mask={"w": jnp.ones(2, bool)}), ValueError,
         r"mask must hold booleans of each leaf's shape .*w: bool\[2\] for a leaf of shape "
         r"\[3\]"),
    Case("estimators-zo_sgd_step-mask-not-bool",
         lambda: step(mask={"w": jnp.ones(3)}), ValueError,
         r"mask must hold booleans .*w: float32\[3\]"),
    Case("estimators-zo_sgd_step-rank-larger-than-matrix",
         lambda: step(params=P2, rank=4), ValueError,
         r"rank=4 is larger than these matrix leaves allow: a \[3, 2\] \(min\(m, n\) = 2\)"),
    Case("estimators-zo_sgd_step-sign-string", lambda: step(sign="yes"), TypeError,
         r"sign must be a bool, got 'yes'"),
    Case("estimators-zo_sgd_step-noise", lambda: step(noise="uniform"), ValueError,
         r"noise must be one of 'gaussian', 'rademacher', got 'uniform'"),
    Case("estimators-es-mask-missing-path", lambda: es(params=P2, mask={"b": True}),
         ValueError, r"mask must have the structure of params: missing \['a'\]"),
    Case("estimators-es-mask-rule-wrong-structure",
         lambda: es(mask=lambda p: {"v": True}), ValueError,
         r"mask must have the structure of params: missing \['w'\]; not in params: \['v'\]"),
    Case("estimators-es-rank-larger-than-matrix",
         lambda: es(params=P2, rank=3), ValueError,
         r"rank=3 is larger than these matrix leaves allow: a \[3, 2\]"),
    Case("estimators-es-subspace_key-not-a-key",
         lambda: es(params=P2, rank=1, subspace_key=3), TypeError,
         r"subspace_key must be a jax\.random key"),
    Case("estimators-hizoo-num_samples-odd", lambda: hizoo(num_samples=3), ValueError,
         r"num_samples must be even for HiZOO \(mirrored pairs ±z\), got 3"),
    Case("estimators-hizoo-damping-negative", lambda: hizoo(damping=-1.0), ValueError,
         r"damping must be a finite number >= 0, got -1\.0"),
    Case("estimators-hizoo-hessian-mismatch",
         lambda: hizoo(hessian_diag={"v": jnp.ones(3)}), ValueError,
         r"hessian_diag must have the structure of params: missing \['w'\]"),
    Case("estimators-zeroth_order-hizoo-rank", lambda: zo("hizoo", sigma=0.1, rank=2),
         TypeError, r"zeroth_order\('hizoo', \.\.\.\): bad estimator options \['rank'\]"),
    Case("estimators-zeroth_order-resample_every-without-rank",
         lambda: zo(sigma=0.1, num_samples=2, resample_every=5), ValueError,
         r"resample_every=5 needs rank="),
    Case("estimators-zeroth_order-rank-larger-than-matrix",
         lambda: zo_update(P2, P2, rank=5), ValueError,
         r"rank=5 is larger than these matrix leaves allow: a \[3, 2\]"),
    Case("estimators-magnitude_mask-density-zero", lambda: gradtx.magnitude_mask(0.0),
         ValueError, r"density must be in \(0\.0, 1\.0\], got 0\.0"),
    Case("estimators-magnitude_mask-density-above-one", lambda: gradtx.magnitude_mask(1.5),
         ValueError, r"density must be in \(0\.0, 1\.0\], got 1\.5"),
]
