"""Bad-input rows for ``stacked={regex: axis}`` (scanned layers) across the per-layer techniques.

Each row makes one realistic mistake; an error row names the argument, the path and the
sizes, a ``check`` row asserts the documented result against numpy.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from _bad_inputs import Case

import gradtx

_P = {"blocks": {"k": jnp.ones((4, 3)), "b": jnp.ones((4,))}, "head": jnp.ones(2)}
_UNEVEN = {"blocks": {"k": jnp.ones((4, 3)), "b": jnp.ones((3,))}, "head": jnp.ones(2)}
_DEPTHS = {"blocks/.*": 1, "head": 5}


def _init(tx, params=_P):
  return tx.init(params)


def _llrd(stacked, depths=None, num_layers=4, params=_P):
  tx = gradtx.layerwise_lr_decay(0.5, num_layers=num_layers, depth_rules=depths or _DEPTHS,
                                 stacked=stacked)
  return tx.update(params, tx.init(params))


def _scale(rules, stacked):
  tx = gradtx.scale_by_path(rules, stacked=stacked)
  return tx.update(_P, tx.init(_P))


def _equals(expected):
  return lambda result: np.testing.assert_allclose(np.asarray(result[0]["blocks"]["k"]),
                                                   expected, rtol=1e-6)


CASES = [
    Case("scanned-axis-out-of-range", lambda: _llrd({"blocks/.*": 1}),
         ValueError, r"stacked: axis 1 of rule 'blocks/\.\*' is out of range for 'blocks/b' "
                     r"of shape \(4,\) \(1 axes; allowed -1\.\.0\)"),
    Case("scanned-axis-on-scalar",
         lambda: _init(gradtx.clip_by_leaf_norm(1.0, stacked={"s": 0}), {"s": jnp.ones(())}),
         ValueError, r"axis 0 of rule 's' is out of range for 's' of shape \(\) .*scalar"),
    Case("scanned-different-lengths", lambda: _llrd({"blocks/.*": 0}, params=_UNEVEN),
         ValueError, r"stacked: rule 'blocks/\.\*' matches leaves of different lengths .*"
                     r"'blocks/b': 3 \(shape \(3,\), axis 0\), 'blocks/k': 4"),
    Case("scanned-different-lengths-clip",
         lambda: _init(gradtx.clip_by_leaf_norm(1.0, stacked={"blocks/.*": 0}), _UNEVEN),
         ValueError, r"different lengths.*'blocks/b': 3.*'blocks/k': 4"),
    Case("scanned-different-lengths-fisher",
         lambda: gradtx.fisher_mask(_UNEVEN, 0.5, scope="per_leaf", stacked={"blocks/.*": 0}),
         ValueError, r"different lengths.*'blocks/b': 3.*'blocks/k': 4"),
    Case("scanned-axis-not-int", lambda: gradtx.clip_by_leaf_norm(1.0, stacked={"b": 0.0}),
         TypeError, r"stacked: the axis for 'b' must be an int .*got 0\.0"),
    Case("scanned-axis-bool", lambda: gradtx.layerwise_lr_decay(
        0.5, num_layers=1, depth_rules={".*": 0}, stacked={"b": True}),
         TypeError, r"stacked: the axis for 'b' must be an int .*got True"),
    Case("scanned-not-a-rule-set", lambda: gradtx.scale_by_path({}, stacked=0),
         TypeError, r"stacked must be an ordered mapping .*got int: 0"),
    Case("scanned-rule-matches-nothing", lambda: _llrd({"block/.*": 0}),
         ValueError, r"stacked: rule 'block/\.\*' matches no leaf path"),
    Case("scanned-last-slice-too-deep", lambda: _llrd({"blocks/.*": 0}, num_layers=2,
                                                     depths={"blocks/.*": 1, "head": 3}),
         ValueError, r"depth of 'blocks/b', slice 3 of 4 \(axis 0\), \(rule 'blocks/\.\*' "
                     r"\+ slice index\) must be in \[0, num_layers \+ 1\] = \[0, 3\], got 4"),
    Case("scanned-llrd-closed-form", lambda: _llrd({"blocks/.*": 0}),
         check=_equals(np.repeat(0.5 ** (4 - np.arange(4.0)), 3).reshape(4, 3))),
    Case("scanned-scale-wrong-length",
         lambda: _scale({"blocks/.*": jnp.ones(3)}, {"blocks/.*": 0}),
         ValueError, r"multiplier for 'blocks/\.\*' has 3 entries, but 'blocks/b' stacks 4 "
                     r"slices along axis 0"),
    Case("scanned-scale-per-slice-on-unstacked",
         lambda: _scale({"head": jnp.ones(2)}, None),
         ValueError, r"multiplier for 'head' is per slice, but the leaf 'head' .*not stacked"),
    Case("scanned-scale-array-not-finite",
         lambda: gradtx.scale_by_path({"b": jnp.array([1.0, jnp.nan])}),
         ValueError, r"multiplier for 'b' must hold finite numbers"),
    Case("scanned-scale-2d-array",
         lambda: gradtx.scale_by_path({"b": jnp.ones((2, 2))}),
         ValueError, r"multiplier for 'b' must be a scalar .*shape \(2, 2\)"),
    Case("scanned-per-slice-not-callable", lambda: gradtx.per_slice(0.5),
         TypeError, r"per_slice's argument must be a function called as fn\(slice_index\), "
                    r"got 0\.5"),
    Case("scanned-per-slice-returns-nan",
         lambda: _scale({"blocks/.*": gradtx.per_slice(lambda i: np.nan if i == 2 else 1.0)},
                        {"blocks/.*": 0}),
         ValueError, r"per_slice\(fn\)\(2\) for 'blocks/b', must be a finite number, got nan"),
    Case("scanned-fisher-global-scope",
         lambda: gradtx.fisher_mask(_P, 0.5, stacked={"blocks/.*": 0}),
         ValueError, r"stacked=.* needs scope='per_leaf' .*scope='global'"),
    Case("scanned-clip-closed-form",
         lambda: gradtx.clip_by_leaf_norm(1.0, stacked={"w": 1}).update(
             {"w": jnp.array([[3.0, 0.3], [4.0, 0.4]])},
             gradtx.clip_by_leaf_norm(1.0, stacked={"w": 1}).init({"w": jnp.ones((2, 2))})),
         check=lambda r: np.testing.assert_allclose(np.asarray(r[0]["w"]),
                                                    [[0.6, 0.3], [0.8, 0.4]], rtol=1e-6)),
]
