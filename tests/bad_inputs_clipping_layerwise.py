"""Bad-input rows for clipping, layer-wise scaling and path rules (gradtx/clipping.py,
gradtx/layerwise.py, the paths of gradtx/_paths.py).

Each row makes one realistic mistake; an error row names the argument (and the value or
the paths), a ``check`` row asserts the documented result against numpy or a closed form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _bad_inputs import Case

import gradtx
from gradtx import _paths

_W = {"w": jnp.array([3.0, 4.0])}  # ‖w‖ = 5
_INTS = {"layer": {"w": jnp.array([3, 4])}}
_COLLIDING = {"a/b": jnp.zeros(1), "a": {"b": jnp.ones(1)}}
_COLLISION = r"two leaves have the same path 'a/b': \['a'\]\['b'\] and \['a/b'\]"
_SCHEDULE = optax.linear_schedule(1.0, 0.1, 10)


def _step(tx, grads, params=None):
  """One update of ``tx`` from its initial state; ``params`` default to ``grads``."""
  return tx.update(grads, tx.init(grads if params is None else params))


def _jit_step(tx, grads):
  return jax.jit(tx.update)(grads, tx.init(grads))


def _injected_clip(max_norm):
  """clip_by_global_norm under inject_hyperparams, with ``max_norm`` traced under jit."""
  tx = optax.inject_hyperparams(gradtx.clip_by_global_norm)(max_norm=1.0)

  @jax.jit
  def step(value):
    state = tx.init(_W)
    state.hyperparams["max_norm"] = value
    return tx.update(_W, state)

  return step(max_norm)


def _all_nan(result):
  updates, _ = result
  assert all(bool(jnp.all(jnp.isnan(u))) for u in jax.tree.leaves(updates)), updates


def _close(expected, rtol=1e-6):
  """A check: the updates equal ``expected`` (numpy) to ``rtol``."""
  def check(result):
    updates, _ = result
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
      np.testing.assert_allclose(np.asarray(got), want, rtol=rtol)
  return check


def _equals(expected, rtol=1e-6):
  return lambda value: np.testing.assert_allclose(np.asarray(value), expected, rtol=rtol)


_COMPLEX = {"c": jnp.array([10 + 10j, 10 - 10j], jnp.complex64)}  # |·| norm 20, Re norm √200
_HUGE = {"w": jnp.array([1e20, 1.0], jnp.float32)}  # ‖·‖² overflows float32

CASES = [
    # --------------------------------------------------------------- clip_by_global_norm
    Case("clipping-global-max_norm-none", lambda: gradtx.clip_by_global_norm(None),
         TypeError, r"max_norm must be .*got None"),
    Case("clipping-global-max_norm-zero", lambda: gradtx.clip_by_global_norm(0.0),
         ValueError, r"max_norm must be a finite number > 0, got 0\.0"),
    Case("clipping-global-max_norm-nan", lambda: gradtx.clip_by_global_norm(math.nan),
         ValueError, r"max_norm must be a finite number > 0, got nan"),
    Case("clipping-global-max_norm-1d",
         lambda: gradtx.clip_by_global_norm(jnp.array([1.0, 2.0])),
         ValueError, r"max_norm must be a scalar .*shape \(2,\)"),
    Case("clipping-global-max_norm-string", lambda: gradtx.clip_by_global_norm("1.0"),
         TypeError, r"max_norm must be .*got '1\.0'"),
    Case("clipping-global-mode", lambda: gradtx.clip_by_global_norm(1.0, mode="Hard"),
         ValueError, r"mode must be one of 'hard', 'soft', got 'Hard'"),
    Case("clipping-global-int-grads", lambda: _step(gradtx.clip_by_global_norm(1.0), _INTS),
         TypeError, r"params must hold floating or complex arrays.*layer/w \(int32\)"),
    Case("clipping-global-int-grads-float-params",
         lambda: _step(gradtx.clip_by_global_norm(1.0), _INTS,
                       {"layer": {"w": jnp.zeros(2)}}),
         TypeError, r"updates must hold floating or complex arrays.*layer/w \(int32\)"),
    Case("clipping-global-bool-grads",
         lambda: _step(gradtx.clip_by_global_norm(1.0), {"m": jnp.array([True, False])},
                       {"m": jnp.zeros(2)}),
         TypeError, r"updates must hold .*m \(bool\)"),
    Case("clipping-global-colliding-paths",
         lambda: _step(gradtx.clip_by_global_norm(1.0), _COLLIDING), ValueError, _COLLISION),
    Case("clipping-global-overflowing-squares",
         lambda: _jit_step(gradtx.clip_by_global_norm(1.0), _HUGE),
         check=_close({"w": np.array([1.0, 1e-20])})),
    Case("clipping-global-complex-modulus",
         lambda: _jit_step(gradtx.clip_by_global_norm(2.0), _COMPLEX),
         check=_close({"c": np.array([1 + 1j, 1 - 1j])})),
    Case("clipping-global-schedule-negative-under-jit",
         lambda: _jit_step(gradtx.clip_by_global_norm(lambda count: count - 1.0), _W),
         check=_all_nan),
    Case("clipping-global-schedule-nan-under-jit",
         lambda: _jit_step(gradtx.clip_by_global_norm(lambda count: jnp.nan * count), _W),
         check=_all_nan),
    Case("clipping-global-injected-negative-under-jit", lambda: _injected_clip(-1.0),
         check=_all_nan),
    Case("clipping-global-injected-positive-under-jit", lambda: _injected_clip(2.5),
         check=_close({"w": np.array([1.5, 2.0])})),
    # ---------------------------------------------------------------- clip_by_leaf_norm
    Case("clipping-leaf-max_norm-negative", lambda: gradtx.clip_by_leaf_norm(-1.0),
         ValueError, r"max_norm must be a finite number > 0, got -1\.0"),
    Case("clipping-leaf-max_norm-1d", lambda: gradtx.clip_by_leaf_norm(np.ones(3)),
         ValueError, r"max_norm must be a scalar .*shape \(3,\)"),
    Case("clipping-leaf-mode", lambda: gradtx.clip_by_leaf_norm(1.0, mode=None),
         ValueError, r"mode must be one of 'hard', 'soft', got None"),
    Case("clipping-leaf-int-params", lambda: _step(gradtx.clip_by_leaf_norm(1.0), _INTS),
         TypeError, r"params must hold .*layer/w \(int32\)"),
    Case("clipping-leaf-complex-modulus",
         lambda: _step(gradtx.clip_by_leaf_norm(2.0), _COMPLEX),
         check=_close({"c": np.array([1 + 1j, 1 - 1j])})),
    Case("clipping-leaf-schedule-zero-under-jit",
         lambda: _jit_step(gradtx.clip_by_leaf_norm(lambda count: 0.0 * count), _W),
         check=_all_nan),
    # ------------------------------------------------------------------------ auto_clip
    Case("clipping-auto-percentile-schedule", lambda: gradtx.auto_clip(_SCHEDULE),
         TypeError, r"percentile must be a number, not a schedule"),
    Case("clipping-auto-percentile-none", lambda: gradtx.auto_clip(None),
         TypeError, r"percentile must be a number, got None"),
    Case("clipping-auto-percentile-above-100", lambda: gradtx.auto_clip(150.0),
         ValueError, r"percentile must be in \[0\.0, 100\.0\], got 150\.0"),
    Case("clipping-auto-percentile-nan", lambda: gradtx.auto_clip(math.nan),
         ValueError, r"percentile must be a finite number, got nan"),
    Case("clipping-auto-percentile-fraction-array",
         lambda: gradtx.auto_clip(np.array([10.0, 90.0])),
         ValueError, r"percentile must be a scalar .*shape \(2,\)"),
    Case("clipping-auto-history-zero", lambda: gradtx.auto_clip(10.0, history=0),
         ValueError, r"history must be an int >= 1, got 0"),
    Case("clipping-auto-history-float", lambda: gradtx.auto_clip(10.0, history=100.0),
         TypeError, r"history must be an int >= 1, got 100\.0"),
    Case("clipping-auto-history-traced",
         lambda: jax.jit(lambda h: gradtx.auto_clip(10.0, history=h).init(_W))(8),
         TypeError, r"history must be a static Python value"),
    Case("clipping-auto-int-grads",
         lambda: _step(gradtx.auto_clip(10.0), _INTS, {"layer": {"w": jnp.zeros(2)}}),
         TypeError, r"updates must hold .*layer/w \(int32\)"),
    # ---------------------------------------------------------------------- zscore_clip
    Case("clipping-zscore-max_norm-schedule", lambda: gradtx.zscore_clip(max_norm=_SCHEDULE),
         TypeError, r"max_norm must be a number, not a schedule"),
    Case("clipping-zscore-alpha-schedule", lambda: gradtx.zscore_clip(alpha=_SCHEDULE),
         TypeError, r"alpha must be a number, not a schedule"),
    Case("clipping-zscore-alpha-one", lambda: gradtx.zscore_clip(alpha=1.0),
         ValueError, r"alpha must be in \(0\.0, 1\.0\), got 1\.0"),
    Case("clipping-zscore-z_thresh-none", lambda: gradtx.zscore_clip(z_thresh=None),
         TypeError, r"z_thresh must be a finite number > 0, got None"),
    Case("clipping-zscore-eps-negative", lambda: gradtx.zscore_clip(eps=-1e-6),
         ValueError, r"eps must be a finite number > 0, got -1e-06"),
    Case("clipping-zscore-warmup-float", lambda: gradtx.zscore_clip(warmup_steps=2.5),
         TypeError, r"warmup_steps must be an int >= 1, got 2\.5"),
    Case("clipping-zscore-max_norm-inf", lambda: gradtx.zscore_clip(max_norm=math.inf),
         ValueError, r"max_norm must be a finite number > 0, got inf"),
    Case("clipping-zscore-int-grads", lambda: _step(gradtx.zscore_clip(), _INTS),
         TypeError, r"params must hold .*layer/w \(int32\)"),
    # ---------------------------------------------------- global_norm, leaf_norm, clip_scale
    Case("clipping-global_norm-python-floats", lambda: gradtx.global_norm([3.0, 4.0]),
         check=_equals(5.0)),
    Case("clipping-global_norm-python-ints", lambda: gradtx.global_norm([3, 4]),
         TypeError, r"tree must hold floating or complex arrays; these leaves are not: "
                    r"0 \(int\d+\), 1 \(int\d+\)"),
    Case("clipping-global_norm-overflowing-squares", lambda: gradtx.global_norm(_HUGE),
         check=_equals(1e20)),
    Case("clipping-global_norm-underflowing-squares",
         lambda: gradtx.global_norm({"w": jnp.full(4, 1e-30, jnp.float32)}),
         check=_equals(2e-30, rtol=1e-6)),
    Case("clipping-global_norm-complex", lambda: gradtx.global_norm(_COMPLEX),
         check=_equals(20.0)),
    Case("clipping-leaf_norm-int", lambda: gradtx.clipping.leaf_norm(jnp.arange(3)),
         TypeError, r"x must hold floating or complex arrays.*<root> \(int32\)"),
    Case("clipping-clip_scale-negative-max_norm",
         lambda: gradtx.clipping.clip_scale(jnp.float32(5.0), -1.0, "hard"),
         check=lambda scale: np.testing.assert_equal(np.isnan(float(scale)), True)),
    # ---------------------------------------------------------------------- scale_by_path
    Case("layerwise-scale_by_path-nan-rule", lambda: gradtx.scale_by_path({"a": math.nan}),
         ValueError, r"rules: the multiplier for 'a' must be a finite number, got nan"),
    Case("layerwise-scale_by_path-inf-default",
         lambda: gradtx.scale_by_path({"a": 1.0}, default=math.inf),
         ValueError, r"default must be a finite number, got inf"),
    Case("layerwise-scale_by_path-string-rule", lambda: gradtx.scale_by_path({"a": "0.1"}),
         TypeError, r"rules: the multiplier for 'a' must be a number or a schedule, got '0\.1'"),
    # A 1-D multiplier is per slice: only for a leaf named in stacked= (checked at init).
    Case("layerwise-scale_by_path-array-rule",
         lambda: gradtx.scale_by_path({"a": np.array([1.0, 2.0])}).init({"a": np.ones(3)}),
         ValueError, r"rules: the multiplier for 'a' is per slice, but the leaf 'a' .* is not "
                     r"stacked"),
    Case("layerwise-scale_by_path-int-grads",
         lambda: _step(gradtx.scale_by_path({".*": 2.0}), _INTS),
         TypeError, r"params must hold .*layer/w \(int32\)"),
    Case("layerwise-scale_by_path-rule-without-wildcard",
         lambda: _step(gradtx.scale_by_path({"layer": 2.0}), _W, {"layer": {"w": jnp.ones(2)}}),
         ValueError, r"rule 'layer' matches no leaf path; existing paths include 'layer/w'.*"
                     r"re\.fullmatch"),
    Case("layerwise-scale_by_path-default-none-unmatched",
         lambda: gradtx.scale_by_path({"a": 2.0}, default=None).init(
             {"a": jnp.ones(1), "b": jnp.ones(1)}),
         ValueError, r"rules: 1 leaf path\(s\) match no rule .*'b'.*`default=`.*re\.fullmatch"),
    Case("layerwise-scale_by_path-rules-set", lambda: gradtx.scale_by_path({"a", "b"}),
         TypeError, r"rules must be an ordered mapping"),
    Case("layerwise-scale_by_path-bad-regex", lambda: gradtx.scale_by_path({"a(": 1.0}),
         ValueError, r"rules: rule 'a\(' is not a valid regex"),
    Case("layerwise-scale_by_path-negative-reverses",
         lambda: _step(gradtx.scale_by_path({"w": -0.5}), _W),
         check=_close({"w": np.array([-1.5, -2.0])})),
    # ------------------------------------------------------------------ layerwise_lr_decay
    Case("layerwise-decay-head-not-at-num_layers-plus-1",
         lambda: gradtx.layerwise_lr_decay(
             0.5, num_layers=3, depth_rules={"conv1": 0, "conv2": 1, "head": 2}).init(
                 {"conv1": jnp.ones(1), "conv2": jnp.ones(1), "head": jnp.ones(1)}),
         ValueError, r"num_layers=3, but no leaf has depth num_layers \+ 1 = 4.*"
                     r"pass num_layers=1"),
    Case("layerwise-decay-depth-rule-without-wildcard",
         lambda: gradtx.layerwise_lr_decay(0.5, num_layers=0,
                                           depth_rules={"embed": 0, "head": 1}).init(
             {"embed": {"t": jnp.ones(1)}, "head": {"w": jnp.ones(1)}}),
         ValueError, r"depth_rules: 2 leaf path\(s\) match no rule.*`default_depth=`.*"
                     r"re\.fullmatch"),
    Case("layerwise-decay-zero", lambda: gradtx.layerwise_lr_decay(
        0.0, num_layers=1, depth_rules={"a": 0}),
         ValueError, r"decay must be a finite number > 0, got 0\.0"),
    Case("layerwise-decay-none", lambda: gradtx.layerwise_lr_decay(
        None, num_layers=1, depth_rules={"a": 0}),
         TypeError, r"decay must be .*got None"),
    Case("layerwise-decay-num_layers-float", lambda: gradtx.layerwise_lr_decay(
        0.5, num_layers=2.0, depth_rules={"a": 0}),
         TypeError, r"num_layers must be an int >= 0, got 2\.0"),
    Case("layerwise-decay-default_depth-out-of-range", lambda: gradtx.layerwise_lr_decay(
        0.5, num_layers=2, depth_rules={"a": 0}, default_depth=4),
         ValueError, r"default_depth must be in \[0, num_layers \+ 1\] = \[0, 3\], got 4"),
    Case("layerwise-decay-depth-float", lambda: gradtx.layerwise_lr_decay(
        0.5, num_layers=2, depth_rules={"a": 1.0}),
         TypeError, r"depth_rules: the depth for 'a' must be an int, got 1\.0"),
    Case("layerwise-decay-int-grads",
         lambda: _step(gradtx.layerwise_lr_decay(0.5, num_layers=0, depth_rules={".*": 1}),
                       _INTS, {"layer": {"w": jnp.ones(2)}}),
         TypeError, r"updates must hold .*layer/w \(int32\)"),
    Case("layerwise-layer_depths-non-digit-capture",
         lambda: gradtx.layer_depths({"enc": {"l0": jnp.ones(1)}}, num_layers=1,
                                     depth_rules={r"(enc)/l(\d)": 1}),
         ValueError, r"captured \['enc', '0'\] from 'enc/l0'.*\(\?:\.\.\.\)"),
    # -------------------------------------------------------------------- by_path, labels
    Case("layerwise-by_path-factory", lambda: gradtx.by_path({"head": optax.adam}),
         TypeError, r"rules: the value for 'head' must be an optax\.GradientTransformation; "
                    r"it is the factory adam: call it"),
    Case("layerwise-by_path-default-string",
         lambda: gradtx.by_path({"a": optax.identity()}, default="sgd"),
         TypeError, r"default must be an optax\.GradientTransformation, got 'sgd'"),
    Case("layerwise-path_labels-non-string-key",
         lambda: gradtx.path_labels(_W, {0: "x"}, default="y"),
         TypeError, r"rules: every rule key must be a regex string, got 0"),
    # ------------------------------------------------------------------------------ paths
    Case("paths-tree_paths-collision", lambda: gradtx.tree_paths(_COLLIDING),
         ValueError, _COLLISION),
    Case("paths-path_labels-collision",
         lambda: gradtx.path_labels(_COLLIDING, {".*": 1}), ValueError, _COLLISION),
    Case("paths-scale_by_path-collision",
         lambda: gradtx.scale_by_path({".*": 2.0}).init(_COLLIDING), ValueError, _COLLISION),
    Case("paths-by_path-collision",
         lambda: gradtx.by_path({".*": optax.identity()}).init(_COLLIDING),
         ValueError, _COLLISION),
    Case("paths-path_tree-none-and-masked",
         lambda: _paths.path_tree({"a": None, "b": optax.MaskedNode(), "c": [jnp.ones(1)]}),
         check=lambda tree: np.testing.assert_equal(
             tree, {"a": None, "b": optax.MaskedNode(), "c": ["c/0"]})),
]
