"""Bad inputs of ``child_tuning`` (ChildTuning-F/-D, the Fisher pass and mask) and
``curvature`` (Hutchinson's diagonal, the diagonal Newton step).

Each row names the argument (and the value or the paths) in the message it expects, or
checks a documented non-error result against numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _bad_inputs import Case

import gradtx

A = "child_tuning_curvature"
KEY = jax.random.key(0)
G = {"w": jnp.array([1.0, -2.0, 3.0, 4.0])}
INT_G = {"enc": {"w": jnp.array([3, 4], jnp.int32)}, "b": jnp.ones(2)}
FISHER = {"layer": jnp.array([1.0, 4.0, 2.0, 3.0]), "head": jnp.array([0.5, 1.0])}


def _loss(params, batch):
  return jnp.sum(params["w"] * batch)


def _quadratic(params):
  return jnp.sum(jnp.array([1.0, 2.0, 3.0, 4.0]) * params["w"] ** 2)


def _f_update(tx, g=G, steps=1):
  """``steps`` jit-compiled updates; the last updates and state."""
  state = tx.init(g)
  update = jax.jit(tx.update)
  for _ in range(steps):
    u, state = update(g, state)
  return u, state


def _scheduled_f(bad_p, prng):
  """A schedule 0.5, ``bad_p`` (out of (0, 1]) under jit: the second step is all NaN."""
  tx = gradtx.child_tuning_f(lambda count: jnp.where(count == 0, 0.5, bad_p), key=KEY,
                             prng=prng)
  return _f_update(tx, steps=2)


def _all_nan(result):
  u, state = result
  assert np.all(np.isnan(np.asarray(u["w"]))), u
  assert np.isnan(float(state.mask_density))


def _int_updates_masked_exactly(result):
  u = np.asarray(result["w"])
  assert u.dtype == np.int32
  np.testing.assert_array_equal(u, np.array([3, 0, 5, 0], np.int32))


def _d_int(rescale):
  tx = gradtx.child_tuning_d({"w": jnp.array([True, False, True, False])}, rescale=rescale)
  g = {"w": jnp.array([3, 4, 5, 6], jnp.int32)}
  return tx.update(g, tx.init(g))[0]


def _mask_without_nan_head(mask):
  # The head is not included (all True); the layer's mask is numpy's percentile mask.
  layer = np.array([1.0, 4.0, 2.0, 3.0])
  np.testing.assert_array_equal(mask["layer"], layer >= np.percentile(layer, 50.0))
  np.testing.assert_array_equal(mask["head"], [True, True])


def _traced_samples():
  return jax.jit(lambda s: gradtx.hutchinson_diagonal(_quadratic, G, KEY, samples=s))(2)


def _injected_samples():
  tx = optax.inject_hyperparams(gradtx.scale_by_diag_newton, static_args=("key",))(
      damping=0.1, samples=2, key=KEY)
  return jax.jit(lambda g, state: tx.update(g, state, g, loss_fn=_quadratic))(G, tx.init(G))


def _newton(**kwargs):
  return gradtx.scale_by_diag_newton(key=KEY, **kwargs)


def _newton_update(g=G, **update_kwargs):
  tx = _newton()
  return tx.update(g, tx.init(g), g, **update_kwargs)


CASES = [
    # ------------------------------------------------------------------ child_tuning_f
    Case(f"{A}-child_tuning_f-reserve_p-none",
         lambda: gradtx.child_tuning_f(None, key=KEY),
         TypeError, r"reserve_p must be a number in \(0\.0, 1\.0\].*got None"),
    Case(f"{A}-child_tuning_f-reserve_p-zero",
         lambda: gradtx.child_tuning_f(0.0, key=KEY),
         ValueError, r"reserve_p must be in \(0\.0, 1\.0\], got 0\.0"),
    Case(f"{A}-child_tuning_f-reserve_p-above-one",
         lambda: gradtx.child_tuning_f(1.5, key=KEY),
         ValueError, r"reserve_p must be in \(0\.0, 1\.0\], got 1\.5"),
    Case(f"{A}-child_tuning_f-reserve_p-nan",
         lambda: gradtx.child_tuning_f(float("nan"), key=KEY),
         ValueError, r"reserve_p must be in \(0\.0, 1\.0\], got nan"),
    Case(f"{A}-child_tuning_f-reserve_p-vector",
         lambda: gradtx.child_tuning_f(jnp.array([0.3, 0.5]), key=KEY),
         ValueError, r"reserve_p must be a scalar .*shape \(2,\)"),
    Case(f"{A}-child_tuning_f-reserve_p-string",
         lambda: gradtx.child_tuning_f("0.3", key=KEY),
         TypeError, r"reserve_p must be a number .*got '0\.3'"),
    Case(f"{A}-child_tuning_f-reserve_p-schedule-above-one-hash-is-nan",
         lambda: _scheduled_f(1.5, "hash"), check=_all_nan),
    Case(f"{A}-child_tuning_f-reserve_p-schedule-zero-jax-is-nan",
         lambda: _scheduled_f(0.0, "jax"), check=_all_nan),
    Case(f"{A}-child_tuning_f-key-none",
         lambda: gradtx.child_tuning_f(0.5, key=None),
         TypeError, r"key must be a jax\.random key .*got None"),
    Case(f"{A}-child_tuning_f-key-int",
         lambda: gradtx.child_tuning_f(0.5, key=0),
         TypeError, r"key must be a jax\.random key .*got 0"),
    Case(f"{A}-child_tuning_f-key-batch",
         lambda: gradtx.child_tuning_f(0.5, key=jax.random.split(KEY)),
         ValueError, r"key must be a single key \(shape \(\)\), got shape \(2,\)"),
    Case(f"{A}-child_tuning_f-rescale-int",
         lambda: gradtx.child_tuning_f(0.5, key=KEY, rescale=1),
         TypeError, r"rescale must be a bool, got 1"),
    Case(f"{A}-child_tuning_f-prng-unknown",
         lambda: gradtx.child_tuning_f(0.5, key=KEY, prng="numpy"),
         ValueError, r"prng must be one of 'hash', 'jax', got 'numpy'"),
    Case(f"{A}-child_tuning_f-integer-updates",
         lambda: _f_update(gradtx.child_tuning_f(0.5, key=KEY), g=INT_G),
         TypeError, r"updates must hold floating arrays; these leaves are not: "
                    r"enc/w \(int32\)"),
    Case(f"{A}-child_tuning_f-integer-updates-scheduled-p",
         lambda: _f_update(gradtx.child_tuning_f(optax.constant_schedule(0.5), key=KEY,
                                                 rescale=False), g=INT_G),
         TypeError, r"updates must hold floating arrays; these leaves are not: enc/w"),
    Case(f"{A}-child_tuning_f-colliding-paths",
         lambda: _f_update(gradtx.child_tuning_f(0.5, key=KEY),
                           g={"a/b": jnp.ones(2), "a": {"b": jnp.ones(2)}}),
         ValueError, r"two leaves have the same path 'a/b'"),
    # ------------------------------------------------------------------ child_tuning_d
    Case(f"{A}-child_tuning_d-mask-not-boolean",
         lambda: gradtx.child_tuning_d({"enc": {"w": jnp.ones(2)}}),
         TypeError, r"mask must be a pytree of boolean arrays; not boolean: 'enc/w' "
                    r"\(float32\)"),
    Case(f"{A}-child_tuning_d-mask-missing-paths",
         lambda: gradtx.child_tuning_d({"w": jnp.ones(4, bool)}).init(
             {"w": jnp.ones(4), "head": jnp.ones(2)}),
         ValueError, r"mask has no leaf for the params paths \['head'\]"),
    Case(f"{A}-child_tuning_d-mask-shape",
         lambda: gradtx.child_tuning_d({"w": jnp.ones((2, 2), bool)}).init(G),
         ValueError, r"shapes differ at 'w': mask \(2, 2\) vs params \(4,\)"),
    Case(f"{A}-child_tuning_d-mask-colliding-paths",
         lambda: gradtx.child_tuning_d({"a/b": jnp.ones(2, bool),
                                        "a": {"b": jnp.ones(2, bool)}}),
         ValueError, r"two leaves have the same path 'a/b'"),
    Case(f"{A}-child_tuning_d-rescale-string",
         lambda: gradtx.child_tuning_d({"w": jnp.ones(4, bool)}, rescale="yes"),
         TypeError, r"rescale must be a bool, got 'yes'"),
    Case(f"{A}-child_tuning_d-integer-updates-rescaled", lambda: _d_int(True),
         TypeError, r"updates must hold floating arrays; these leaves are not: w \(int32\)"),
    Case(f"{A}-child_tuning_d-integer-updates-not-rescaled-are-masked-exactly",
         lambda: _d_int(False), check=_int_updates_masked_exactly),
    # ------------------------------------------------------------------ fisher_information
    Case(f"{A}-fisher_information-loss_fn-not-callable",
         lambda: gradtx.fisher_information("loss", {"w": jnp.ones(2)}, [jnp.ones(2)]),
         TypeError, r"loss_fn must be callable as loss_fn\(params, batch\), got 'loss'"),
    Case(f"{A}-fisher_information-integer-params",
         lambda: gradtx.fisher_information(_loss, {"w": jnp.ones(2, jnp.int32)},
                                           [jnp.ones(2)]),
         TypeError, r"params must hold floating arrays; these leaves are not: w \(int32\)"),
    Case(f"{A}-fisher_information-per_example-int",
         lambda: gradtx.fisher_information(_loss, {"w": jnp.ones(2)}, [jnp.ones(2)],
                                           per_example=1),
         TypeError, r"per_example must be a bool, got 1"),
    Case(f"{A}-fisher_information-clip_norm-zero",
         lambda: gradtx.fisher_information(_loss, {"w": jnp.ones(2)}, [jnp.ones(2)],
                                           clip_norm=0.0),
         ValueError, r"clip_norm must be a finite number > 0, got 0\.0"),
    Case(f"{A}-fisher_information-clip_norm-schedule",
         lambda: gradtx.fisher_information(_loss, {"w": jnp.ones(2)}, [jnp.ones(2)],
                                           clip_norm=optax.constant_schedule(1.0)),
         TypeError, r"clip_norm must be a number, not a schedule"),
    Case(f"{A}-fisher_information-clip_scope-unknown",
         lambda: gradtx.fisher_information(_loss, {"w": jnp.ones(2)}, [jnp.ones(2)],
                                           clip_norm=1.0, clip_scope="layer"),
         ValueError, r"clip_scope must be one of 'per_leaf', 'global', got 'layer'"),
    Case(f"{A}-fisher_information-batches-empty",
         lambda: gradtx.fisher_information(_loss, {"w": jnp.ones(2)}, []),
         ValueError, r"batches must yield at least one batch, got none"),
    Case(f"{A}-fisher_information-batches-sizes-differ",
         lambda: gradtx.fisher_information(
             lambda p, b: jnp.sum(p["w"] * b["x"]) + jnp.sum(b["y"]), {"w": jnp.ones(2)},
             {"x": jnp.ones((3, 2)), "y": jnp.ones((2, 2))}),
         ValueError, r"batches must have the same number of batches \(axis 0\).*x: 3.*y: 2"),
    # ------------------------------------------------------------------ fisher_mask
    Case(f"{A}-fisher_mask-nan",
         lambda: gradtx.fisher_mask({**FISHER, "layer": FISHER["layer"].at[1].set(jnp.nan)},
                                    0.5),
         ValueError, r"fisher must be finite .*not finite at: layer \(1 of 4\)"),
    Case(f"{A}-fisher_mask-inf-per_leaf",
         lambda: gradtx.fisher_mask({**FISHER, "head": jnp.array([jnp.inf, 1.0])}, 0.5,
                                    scope="per_leaf"),
         ValueError, r"fisher must be finite .*not finite at: head \(1 of 2\)"),
    Case(f"{A}-fisher_mask-nan-outside-include",
         lambda: gradtx.fisher_mask({**FISHER, "head": jnp.array([jnp.nan, 1.0])}, 0.5,
                                    include="layer"),
         check=_mask_without_nan_head),
    Case(f"{A}-fisher_mask-reserve_p-schedule",
         lambda: gradtx.fisher_mask(FISHER, optax.constant_schedule(0.5)),
         TypeError, r"reserve_p must be a number in \(0, 1\]"),
    Case(f"{A}-fisher_mask-reserve_p-none",
         lambda: gradtx.fisher_mask(FISHER, None),
         TypeError, r"reserve_p must be a number in \(0\.0, 1\.0\].*got None"),
    Case(f"{A}-fisher_mask-reserve_p-zero",
         lambda: gradtx.fisher_mask(FISHER, 0),
         ValueError, r"reserve_p must be in \(0\.0, 1\.0\], got 0"),
    Case(f"{A}-fisher_mask-include-matches-nothing",
         lambda: gradtx.fisher_mask(FISHER, 0.5, include=["layer", "encoder.*"]),
         ValueError, r"include: rule 'encoder\.\*' matches no leaf path"),
    Case(f"{A}-fisher_mask-include-empty",
         lambda: gradtx.fisher_mask(FISHER, 0.5, include=[]),
         ValueError, r"include must hold at least one path regex"),
    Case(f"{A}-fisher_mask-scope-unknown",
         lambda: gradtx.fisher_mask(FISHER, 0.5, scope="per_layer"),
         ValueError, r"scope must be one of 'global', 'per_leaf', got 'per_layer'"),
    # ------------------------------------------------------------------ hutchinson_diagonal
    Case(f"{A}-hutchinson_diagonal-key-int",
         lambda: gradtx.hutchinson_diagonal(_quadratic, G, 0),
         TypeError, r"key must be a jax\.random key .*got 0"),
    Case(f"{A}-hutchinson_diagonal-key-float-array",
         lambda: gradtx.hutchinson_diagonal(_quadratic, G, jnp.zeros(2)),
         TypeError, r"key must be a jax\.random key .*dtype float32"),
    Case(f"{A}-hutchinson_diagonal-samples-zero",
         lambda: gradtx.hutchinson_diagonal(_quadratic, G, KEY, samples=0),
         ValueError, r"samples must be an int >= 1, got 0"),
    Case(f"{A}-hutchinson_diagonal-samples-float",
         lambda: gradtx.hutchinson_diagonal(_quadratic, G, KEY, samples=1.5),
         TypeError, r"samples must be an int >= 1, got 1\.5"),
    Case(f"{A}-hutchinson_diagonal-samples-traced",
         _traced_samples, TypeError, r"samples must be a static Python value"),
    Case(f"{A}-hutchinson_diagonal-integer-params",
         lambda: gradtx.hutchinson_diagonal(_quadratic, {"w": jnp.ones(4, jnp.int32)}, KEY),
         TypeError, r"params must hold floating arrays; these leaves are not: w \(int32\)"),
    # ------------------------------------------------------------------ scale_by_diag_newton
    Case(f"{A}-scale_by_diag_newton-damping-negative", lambda: _newton(damping=-1e-3),
         ValueError, r"damping must be a finite number >= 0, got -0\.001"),
    Case(f"{A}-scale_by_diag_newton-damping-inf", lambda: _newton(damping=float("inf")),
         ValueError, r"damping must be a finite number >= 0, got inf"),
    Case(f"{A}-scale_by_diag_newton-damping-none", lambda: _newton(damping=None),
         TypeError, r"damping must be a finite number >= 0, got None"),
    Case(f"{A}-scale_by_diag_newton-damping-schedule",
         lambda: _newton(damping=optax.constant_schedule(0.1)),
         TypeError, r"damping must be a number >= 0, not a schedule"),
    Case(f"{A}-scale_by_diag_newton-estimator-unknown", lambda: _newton(estimator="exact"),
         ValueError, r"estimator must be 'hutchinson', 'gnb' or a function .*got 'exact'"),
    Case(f"{A}-scale_by_diag_newton-key-float-array",
         lambda: gradtx.scale_by_diag_newton(key=jnp.zeros(2)),
         TypeError, r"key must be a jax\.random key"),
    Case(f"{A}-scale_by_diag_newton-samples-injected-not-static", _injected_samples,
         TypeError, r"samples must be a static Python value .*static_args"),
    Case(f"{A}-scale_by_diag_newton-curvature-missing-leaf",
         lambda: _newton_update({"a": jnp.ones(2), "b": jnp.ones(3)},
                                curvature={"a": jnp.ones(2)}),
         ValueError, r"curvature must have the structure of the updates: missing \['b'\]"),
    Case(f"{A}-scale_by_diag_newton-curvature-extra-leaf",
         lambda: _newton_update(curvature={"w": jnp.ones(4), "v": jnp.ones(1)}),
         ValueError, r"curvature must have the structure of the updates: not in the "
                     r"updates: \['v'\]"),
    Case(f"{A}-scale_by_diag_newton-curvature-shape",
         lambda: _newton_update(curvature={"w": jnp.ones(1)}),
         ValueError, r"curvature must have the leaf shapes of the updates; these differ: "
                     r"w: \(1,\) vs \(4,\)"),
    Case(f"{A}-scale_by_diag_newton-integer-updates",
         lambda: _newton_update({"w": jnp.array([3, 4], jnp.int32)},
                                curvature={"w": jnp.ones(2)}),
         TypeError, r"updates must hold floating arrays; these leaves are not: w \(int32\)"),
    Case(f"{A}-scale_by_diag_newton-no-curvature", lambda: _newton_update(),
         ValueError, r"needs the curvature: pass loss_fn=.* or curvature="),
    # ------------------------------------------------------------------ diag_newton
    Case(f"{A}-diag_newton-learning_rate-zero",
         lambda: gradtx.diag_newton(0.0, key=KEY),
         ValueError, r"learning_rate must be a finite number > 0, got 0\.0"),
    Case(f"{A}-diag_newton-learning_rate-none",
         lambda: gradtx.diag_newton(None, key=KEY),
         TypeError, r"learning_rate must be a finite number > 0.*got None"),
    Case(f"{A}-diag_newton-samples-zero",
         lambda: gradtx.diag_newton(1.0, samples=0, key=KEY),
         ValueError, r"samples must be an int >= 1, got 0"),
]
