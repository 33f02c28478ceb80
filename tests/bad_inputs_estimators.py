"""Bad inputs of the estimators: es_gradient, forward_gradient, score_function_gradient,
zeroth_order and fill_masked (rows of ``tests/test_bad_inputs.py``)."""

from __future__ import annotations

import functools

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


def zo(estimator="es", **kw):
  return gradtx.zeroth_order(estimator, **{"key": KEY, **kw})


def zo_update(updates, params, **kw):
  tx = zo(**{"sigma": 0.1, "num_samples": 4, **kw})
  return tx.update(updates, tx.init(params), params, loss_fn=lambda p: jnp.sum(p["w"]))


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


MESH = jax.make_mesh((1,), ("pop",))

CASES = [
    # es_gradient: keys, params, fn
    Case("estimators-es-key-int", lambda: es(key=0), TypeError,
         r"key must be a jax\.random key .*got 0"),
    Case("estimators-es-key-batch", lambda: es(key=jax.random.split(KEY, 2)), ValueError,
         r"key must be a single key \(shape \(\)\), got shape \(2,\)"),
    Case("estimators-es-key-float-array", lambda: es(key=jnp.zeros(2)), TypeError,
         r"key must be a jax\.random key .*float32"),
    Case("estimators-es-int-params", lambda: es(params={"w": jnp.arange(3)}), TypeError,
         r"params must hold floating arrays; .*w \(int32\)"),
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
    Case("estimators-es-sigma-zero", lambda: es(sigma=0.0), ValueError,
         r"sigma must be a finite number > 0, got 0\.0"),
    Case("estimators-es-sigma-nan", lambda: es(sigma=float("nan")), ValueError,
         r"sigma must be a finite number > 0, got nan"),
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
    # es_gradient: num_samples and the other options
    Case("estimators-es-num_samples-odd", lambda: es(num_samples=5), ValueError,
         r"num_samples must be even with antithetic=True.*got 5"),
    Case("estimators-es-num_samples-zero", lambda: es(num_samples=0), ValueError,
         r"num_samples must be an int >= 1, got 0"),
    Case("estimators-es-num_samples-float", lambda: es(num_samples=4.0), TypeError,
         r"num_samples must be an int >= 1, got 4\.0"),
    Case("estimators-es-num_samples-traced", traced(lambda n: es(num_samples=n)), TypeError,
         r"num_samples must be a static Python value"),
    Case("estimators-es-batch_size-traced", traced(lambda b: es(batch_size=b)), TypeError,
         r"batch_size must be a static Python value"),
    Case("estimators-es-batch_size-zero", lambda: es(batch_size=0), ValueError,
         r"batch_size must be an int >= 1, got 0"),
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
    Case("estimators-forward-key-int", lambda: fwd(key=1), TypeError,
         r"key must be a jax\.random key .*got 1"),
    Case("estimators-forward-int-params", lambda: fwd(params={"w": jnp.arange(3)}), TypeError,
         r"params must hold floating arrays; .*w \(int32\)"),
    Case("estimators-forward-vector-fn", jitted(fwd, fn=lambda p: jnp.sin(p["w"])), TypeError,
         r"fn must return a scalar .*shape \(3,\)"),
    Case("estimators-forward-num_directions-zero", lambda: fwd(num_directions=0), ValueError,
         r"num_directions must be an int >= 1, got 0"),
    Case("estimators-forward-num_directions-float", lambda: fwd(num_directions=2.0), TypeError,
         r"num_directions must be an int >= 1, got 2\.0"),
    Case("estimators-forward-num_directions-traced",
         traced(lambda k: fwd(num_directions=k)), TypeError,
         r"num_directions must be a static Python value"),
    # score_function_gradient
    Case("estimators-score-sample_fn-none",
         lambda: gradtx.score_function_gradient(lambda p, y: 0.0, lambda y: 0.0, P, KEY,
                                                sample_fn=None, num_samples=4), TypeError,
         r"sample_fn must be a function called as sample_fn\(params, key\) -> y, got None"),
    Case("estimators-score-key-string", lambda: sfg(key="seed"), TypeError,
         r"key must be a jax\.random key .*'seed'"),
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
    Case("estimators-score-num_samples-traced", traced(lambda n: sfg(num_samples=n)),
         TypeError, r"num_samples must be a static Python value"),
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
         r"estimator must be one of 'es', 'forward', got 'cma'"),
    Case("estimators-zeroth_order-estimator-int", lambda: zo(3), TypeError,
         r"estimator must be 'es', 'forward' or a callable, got 3"),
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
]
