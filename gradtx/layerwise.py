"""Layer-wise learning rates and per-path transformations, chosen by parameter path.

Su's "free gradient" view (Su 2019, see References): reparametrise ``θ = λφ``. Plain
SGD on φ moves θ by ``-λ² η ∇_θ L``, so it *is* SGD on θ with learning rate ``λ² η``;
Adam and RMSProp divide by the gradient's scale, which cancels one λ, so Adam on φ is
Adam on θ with learning rate ``λ η`` (eps negligible). A per-layer learning rate is therefore a
per-leaf multiplier on the update, picked by the leaf's path — which is what
:func:`scale_by_path` and :func:`layerwise_lr_decay` do, and :func:`by_path`
generalises to any transformation per path (freezing, per-layer clipping, a different
optimizer for the head).

Paths are "/"-joined (see :func:`gradtx.tree_paths`); rules are ordered
``{regex: value}``, matched with ``re.fullmatch``, first match wins. A leaf that no rule
covers (without a default) and a rule that covers no leaf are both errors that list
the paths, so a typo never silently leaves a layer at the wrong learning rate.

Rule values are checked at construction (a NaN or infinite multiplier names its rule);
integer or boolean leaves, which the products would truncate, are refused, naming the
paths; two leaves with the same path are an error (see :func:`gradtx.tree_paths`).

NaN/inf gradients: the multipliers are plain products, so a non-finite entry stays
where it is and shows in the update (propagated, never hidden); the states hold only a
step count, which a bad gradient cannot poison. :func:`by_path` inherits the behaviour
of the transformations it applies.

References:
  Su Jianlin, "Layer-wise learning rates and free gradients", 2019,
  kexue.fm/archives/6418.
  Clark, Luong, Le, Manning, "ELECTRA: Pre-training text encoders as discriminators
  rather than generators", ICLR 2020, arXiv:2003.10555 (layer-wise LR decay).
  Bao, Dong, Piao, Wei, "BEiT: BERT pre-training of image transformers", ICLR 2022,
  arXiv:2106.08254.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradtx import _checks, _numerics, _paths


def path_labels(params: optax.Params, rules: _paths.Rules[Any], *, default: Any = None) -> Any:
  """Labels every leaf of ``params`` with the value of the first rule matching its path.

  Args:
    params: a pytree (dict, Flax linen params, ``nnx.State``, lists, NamedTuples).
    rules: ordered ``{regex: label}`` (or a sequence of pairs); a regex must match the
      whole "/"-joined path.
    default: label for leaves no rule matches. ``None`` (the default) makes such leaves
      an error.

  Returns:
    A pytree shaped like ``params`` holding the labels, ready for ``optax.partition``.

  Raises:
    ValueError: a leaf matches no rule and there is no default (the paths are listed);
      a rule matches no leaf, or only leaves an earlier rule took (the rule is named).

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> params = {"encoder": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.ones(2)}}
    >>> gradtx.path_labels(params, {"encoder/.*": "body", "head/.*": "head"})
    {'encoder': {'kernel': 'body'}, 'head': {'kernel': 'head'}}
  """
  labels, _, _ = _paths.map_by_rules(
      params, rules, argname="rules", default=default, has_default=default is not None
  )
  return labels


class ScaleByPathState(NamedTuple):
  """State of :func:`scale_by_path`: the step ``count`` that drives schedule multipliers."""

  count: chex.Array


def _scale_leaf(update: jax.Array, multiplier: jax.Array) -> jax.Array:
  return (update * multiplier).astype(update.dtype)


def _check_float(argname: str, tree: Any) -> None:
  _checks.check_float_leaves(argname, tree, allow_complex=True)


@dataclasses.dataclass(frozen=True)
class per_slice:  # noqa: N801 -- used like a function: per_slice(lambda i: ...)
  """A :func:`scale_by_path` multiplier that depends on the slice (layer) index.

  ``per_slice(fn)`` as a rule value gives slice ``i`` of a stacked leaf (see
  ``stacked=``) the multiplier ``fn(i)``: a finite number or a schedule
  ``count -> multiplier``. ``fn`` is called with Python ints ``0 … L-1`` when the step is
  traced. Only stacked leaves may take it.

  Example:
    >>> import jax.numpy as jnp, optax, gradtx
    >>> p = {"blocks": jnp.ones((3, 2)), "head": jnp.ones(2)}
    >>> tx = gradtx.scale_by_path({"blocks": gradtx.per_slice(lambda i: 0.5 ** (3 - i))},
    ...                           stacked={"blocks": 0})
    >>> tx.update(p, tx.init(p))[0]["blocks"][:, 0].tolist()
    [0.125, 0.25, 0.5]
  """

  fn: Callable[[int], optax.ScalarOrSchedule]

  def __post_init__(self):
    _checks.check_callable("per_slice's argument", self.fn, call="fn(slice_index)")


def _check_multiplier(name: str, value: Any) -> None:
  """A number, a schedule, a 1-D array of finite numbers or a :class:`per_slice`."""
  if isinstance(value, per_slice):
    return
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 1:
    if not isinstance(value, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(value))):
      raise ValueError(f"{name} must hold finite numbers, got {value!r}")
    return
  _checks.check_finite(name, value)


def _slice_multipliers(value: Any, count: jax.Array | None, path: str,
                       stack: _paths.StackedLeaf | None, pattern: str) -> jax.Array | None:
  """A rule value at ``count`` for the leaf at ``path``: a scalar, or one per slice.

  ``count=None`` (at ``init``) only checks the value against the leaf: it returns ``None``
  and evaluates no schedule.
  """
  per_slice_value = isinstance(value, per_slice) or (
      isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 1)
  if not per_slice_value:
    return None if count is None else _numerics.scalar_or_schedule(value, count)
  what = f"rules: the multiplier for {pattern!r}"
  if stack is None:
    raise ValueError(f"{what} is per slice, but the leaf {path!r} it matches is not stacked: "
                     f"name it in stacked={{regex: axis}}, or give it a number")
  if isinstance(value, per_slice):
    values = [value.fn(i) for i in range(stack.length)]
    for i, v in enumerate(values):
      _checks.check_finite(f"{what}, per_slice(fn)({i}) for {path!r},", v)
    if count is None:
      return None
    return jnp.stack([_numerics.scalar_or_schedule(v, count) for v in values]
                     ) if values else jnp.zeros((0,), jnp.float32)
  if np.shape(value)[0] != stack.length:
    raise ValueError(f"{what} has {np.shape(value)[0]} entries, but {path!r} stacks "
                     f"{stack.length} slices along axis {stack.axis}: give one per slice")
  return None if count is None else jnp.asarray(value, jnp.float32)


def scale_by_path(rules: _paths.Rules[Any], *, default: optax.ScalarOrSchedule | None = 1.0,
                  stacked: _paths.Rules[int] | None = None
                  ) -> optax.GradientTransformationExtraArgs:
  r"""Multiplies each leaf's update by a multiplier chosen by its path.

  .. math:: u_\ell = m(\text{path}_\ell) \, g_\ell \qquad
     (u_{\ell, i} = m_i(\text{path}_\ell) \, g_{\ell, i} \text{ for slice } i
     \text{ of a stacked leaf})

  Placed after the optimizer's scaling (``optax.chain(optax.adam(η), scale_by_path(...))``)
  a multiplier ``m`` is a learning-rate multiplier: the leaf trains at ``m η``. Before
  an adaptive optimizer it would be cancelled by the normalisation; that is why it
  goes after. By the reparametrisation ``θ = λφ``, ``m = λ²`` under SGD and ``m = λ``
  under Adam reproduce training φ instead of θ.

  Stacked (scanned) layers: leaves named in ``stacked={regex: axis}`` hold one layer per
  slice along ``axis`` (see :func:`gradtx.tree_paths`); their rule may give one
  multiplier per slice, as a 1-D array of length L or as :class:`per_slice` ``(fn)``
  (``fn(i)``: a number or a schedule). A number or a schedule applies to every slice.

  Args:
    rules: ordered ``{regex: multiplier}``; a multiplier is a finite number (any sign:
      0 freezes a leaf, a negative one reverses its gradient), a schedule
      ``count -> multiplier``, or, for stacked leaves only, a 1-D array or
      :class:`per_slice`.
    default: multiplier for leaves no rule matches (1.0: leave them alone). Pass
      ``default=None`` to make unmatched leaves an error.
    stacked: ``{regex: axis}`` naming the leaves whose ``axis`` indexes layers, or
      ``None``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`ScaleByPathState`.

  Raises:
    TypeError, ValueError: at construction, a multiplier or ``default`` that is not a
      finite number or a schedule (the rule is named); at ``init``, a rule that matches
      no leaf or a leaf that matches no rule (the paths are listed); integer leaves; a
      per-slice multiplier on a leaf that is not stacked or of the wrong length; the
      errors of ``stacked=`` (an axis out of range, different lengths under one rule).

  Example:
    >>> import jax.numpy as jnp, optax, gradtx
    >>> params = {"body": jnp.ones(2), "head": jnp.ones(2)}
    >>> tx = optax.chain(optax.sgd(1.0), gradtx.scale_by_path({"head": 10.0}))
    >>> u, _ = tx.update(params, tx.init(params))
    >>> u["body"].tolist(), u["head"].tolist()
    ([-1.0, -1.0], [-10.0, -10.0])

    One multiplier per layer of a stacked leaf (3 layers on axis 0):

    >>> p = {"blocks": jnp.ones((3, 2))}
    >>> tx = gradtx.scale_by_path({"blocks": jnp.array([0.1, 0.2, 0.3])},
    ...                           stacked={"blocks": 0})
    >>> tx.update(p, tx.init(p))[0]["blocks"][:, 0].tolist()
    [0.10000000149011612, 0.20000000298023224, 0.30000001192092896]

  References:
    Su Jianlin, "Layer-wise learning rates and free gradients", 2019,
    kexue.fm/archives/6418.
  """
  compiled = _paths.compile_rules(rules, argname="rules")
  for pattern, multiplier in compiled:
    _check_multiplier(f"rules: the multiplier for {pattern.pattern!r}", multiplier)
  has_default = default is not None
  if has_default:
    _checks.check_finite("default", default)
  _paths.resolve_stacked({}, stacked)

  def scales(tree, count):
    """Per leaf, in leaf order, its multiplier at ``count`` shaped to broadcast
    (``count=None``: only the checks, no value)."""
    matches = _paths.map_by_rules(tree, rules, argname="rules", has_default=has_default)[1]
    stacks = _paths.resolve_stacked(tree, stacked)
    paths, leaves = _paths.tree_paths(tree), jax.tree.leaves(tree)
    fallback = (_numerics.scalar_or_schedule(default, count)
                if count is not None and any(match is None for match in matches) else None)
    cache = {}  # each rule's value (a schedule included) is evaluated once per step
    out = []
    for path, leaf, match, stack in zip(paths, leaves, matches, stacks, strict=True):
      if match is None:
        out.append(fallback)
        continue
      key = (match.rule_index, stack)
      if key not in cache:
        cache[key] = _slice_multipliers(match.value, count, path, stack,
                                        match.match.re.pattern)
      m = cache[key]
      if m is None or m.ndim == 0:
        out.append(m)
        continue
      # A vector is a per-slice value, which _slice_multipliers refuses on a leaf that is
      # not stacked (only a schedule returning a non-scalar, a misuse, can fail here).
      assert stack is not None, f"a multiplier of shape {m.shape} for the unstacked {path!r}"
      out.append(stack.along(m, jnp.ndim(leaf)))
    return out

  def init_fn(params):
    _check_float("params", params)
    scales(params, None)  # report bad rules at init, not at the first step
    return ScaleByPathState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _check_float("updates", updates)
    leaves, treedef = jax.tree.flatten(updates)
    scaled = [_scale_leaf(u, m)
              for u, m in zip(leaves, scales(updates, state.count), strict=True)]
    return (jax.tree.unflatten(treedef, scaled),
            ScaleByPathState(count=optax.safe_increment(state.count)))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def layer_depths(params: optax.Params, *, num_layers: int, depth_rules: _paths.Rules[int],
                 default_depth: int | None = None,
                 stacked: _paths.Rules[int] | None = None) -> Any:
  """The depth of every leaf under ``depth_rules``, as a pytree of ints.

  A rule's value is the depth itself; if the regex captures a group, the captured
  integer is *added* to it, so ``{r"encoder/layer_(\\d+)/.*": 1}`` gives 0-indexed
  ``layer_i`` the depth ``i + 1``. Depths must lie in ``[0, num_layers + 1]``.

  A stacked leaf (named in ``stacked={regex: axis}``: L layers along ``axis``, as
  ``nn.scan`` stores them) gets one depth per slice: its rule gives the depth ``d`` of
  slice 0 and slice ``i`` gets ``d + i``, returned as an int array of length L.

  Args:
    params: the pytree whose leaves get a depth.
    num_layers: L, the number of blocks between the embeddings (depth 0) and the head
      (depth ``L + 1``).
    depth_rules: ordered ``{regex: depth}`` (an int; an offset when the regex captures
      the layer index).
    default_depth: depth of leaves no rule matches; ``None`` makes them an error.
    stacked: ``{regex: axis}`` naming the stacked leaves, or ``None``.

  Returns:
    A pytree shaped like ``params`` holding Python ints (numpy int arrays for the
    stacked leaves).

  Raises:
    ValueError: a depth outside ``[0, num_layers + 1]`` (the path and rule are named; for
      a stacked leaf, the depth of its last slice), a captured group that is not digits,
      a leaf no rule matches, a rule no leaf matches, the errors of ``stacked=``.
    TypeError: a depth that is not an int.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> p = {"embed": jnp.ones(1), "layer_0": jnp.ones(1), "layer_1": jnp.ones(1),
    ...      "head": jnp.ones(1)}
    >>> gradtx.layer_depths(p, num_layers=2,
    ...                     depth_rules={"embed": 0, r"layer_(\\d+)": 1, "head": 3})
    {'embed': 0, 'head': 3, 'layer_0': 1, 'layer_1': 2}
    >>> p = {"embed": jnp.ones(1), "blocks": jnp.ones((2, 5)), "head": jnp.ones(1)}
    >>> d = gradtx.layer_depths(p, num_layers=2, depth_rules={"embed": 0, "blocks": 1,
    ...                         "head": 3}, stacked={"blocks": 0})
    >>> d["blocks"].tolist()
    [1, 2]
  """
  _check_depth_arguments(num_layers, depth_rules, default_depth)
  _, matches, paths = _paths.map_by_rules(
      params, depth_rules, argname="depth_rules",
      has_default=default_depth is not None, default_name="default_depth",
  )
  stacks = _paths.resolve_stacked(params, stacked)
  depths: list[Any] = []  # ints (traced under inject_hyperparams), int arrays when stacked
  for path, match, stack in zip(paths, matches, stacks, strict=True):
    if match is None:
      # map_by_rules leaves a leaf unmatched only when there is a default.
      assert default_depth is not None
      depth, rule = default_depth, "default_depth"
    else:
      captured = [g for g in match.match.groups() if g is not None]
      if not all(g.isdecimal() for g in captured):
        raise ValueError(
            f"depth_rules: rule {match.match.re.pattern!r} captured {captured!r} from "
            f"{path!r}; captured groups must be layer indices (digits). Use (?:...) for "
            "groups that are not."
        )
      depth = match.value + sum(int(g) for g in captured)
      rule = f"rule {match.match.re.pattern!r}"
    if stack is not None:
      slice_depths = np.arange(stack.length) + depth
      last = f"slice {stack.length - 1} of {stack.length} (axis {stack.axis})"
      if stack.length:
        _check_depth(f"depth of {path!r}, {last}, ({rule} + slice index)",
                     int(slice_depths[-1]), num_layers)
      depths.append(slice_depths)
      continue
    if match is not None:
      _check_depth(f"depth of {path!r} ({rule})", depth, num_layers)
    depths.append(depth)
  return jax.tree.unflatten(jax.tree.structure(params), depths)


def _check_depth_arguments(num_layers: Any, depth_rules: Any, default_depth: Any) -> None:
  """Checks ``num_layers``, the form of ``depth_rules`` and ``default_depth``."""
  _checks.check_int("num_layers", num_layers, minimum=0)
  if default_depth is not None:
    _checks.check_int("default_depth", default_depth, minimum=0)
    _check_depth("default_depth", default_depth, num_layers)
  compiled = _paths.compile_rules(depth_rules, argname="depth_rules")
  for pattern, depth in compiled:
    if isinstance(depth, bool) or not isinstance(depth, int):
      raise TypeError(
          f"depth_rules: the depth for {pattern.pattern!r} must be an int, got {depth!r}"
      )


def _check_depth(name: str, depth: Any, num_layers: Any) -> None:
  depth, num_layers = _checks.concrete_scalar(depth), _checks.concrete_scalar(num_layers)
  if depth is None or num_layers is None:
    return  # traced by optax.inject_hyperparams: checked at init, where it is concrete
  if not 0 <= depth <= num_layers + 1:
    raise ValueError(
        f"{name} must be in [0, num_layers + 1] = [0, {num_layers + 1:g}], got {depth:g}"
    )


def _check_head_present(params: Any, depths: Any, num_layers: Any) -> None:
  """Refuses a tree whose top depth is not ``num_layers + 1`` (a miscounted ``num_layers``).

  A tree with masked leaves (``optax.masked``, ``optax.partition``, :func:`by_path`) may
  leave the head to another transformation, so it is not checked.
  """
  num_layers = _checks.concrete_scalar(num_layers)
  per_leaf = [np.ravel(d) for d in jax.tree.leaves(depths)]
  by_depth = [int(np.max(d)) if d.size else -1 for d in per_leaf]
  if num_layers is None or not by_depth or int(num_layers) + 1 in by_depth:
    return
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  if any(is_masked(x) for x in jax.tree.leaves(params, is_leaf=is_masked)):
    return
  head, deepest = int(num_layers) + 1, max(by_depth)
  top = [p for p, d in zip(_paths.tree_paths(params), by_depth, strict=True) if d == deepest]
  raise ValueError(
      f"num_layers={int(num_layers)}, but no leaf has depth num_layers + 1 = {head}, the "
      f"head's depth (multiplier 1): the deepest leaves are at depth {deepest} "
      f"({', '.join(repr(p) for p in top[:4])}), so even they would train at "
      f"decay**{head - deepest}. num_layers is the number of blocks between the "
      f"embeddings (depth 0) and the head (depth num_layers + 1): if depth {deepest} is "
      f"the head, pass num_layers={max(deepest - 1, 0)}. If the head is trained by another "
      "transformation, apply this one with optax.masked or gradtx.by_path."
  )


class LayerwiseLrDecayState(NamedTuple):
  """State of :func:`layerwise_lr_decay`: ``count`` drives a ``decay`` schedule."""

  count: chex.Array


def layerwise_lr_decay(
    decay: optax.ScalarOrSchedule,
    *,
    num_layers: int,
    depth_rules: _paths.Rules[int],
    default_depth: int | None = None,
    stacked: _paths.Rules[int] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Layer-wise learning-rate decay: deeper-from-the-top layers train slower.

  .. math:: u_\ell = \text{decay}^{\,(L + 1 - d_\ell)} \; g_\ell

  with ``L = num_layers`` and ``d_ℓ`` the leaf's depth: embeddings 0, transformer
  block ``i`` (0-indexed) ``i + 1``, the head ``L + 1`` (multiplier 1). Chain it after
  the optimizer, as with :func:`scale_by_path`.

  The convention is BEiT's (and the one ELECTRA's paper states): the top block gets
  ``decay¹``. ELECTRA's released code assigns the task head depth ``L + 2`` and uses
  the exponent ``L + 2 - d``, which leaves the top block at ``decay²`` and no layer at
  ``decay¹`` — the off-by-one discussed in its issue tracker. To reproduce that code
  exactly, pass ``num_layers=L + 1`` and give the head depth ``L + 2``.

  Scanned layers (linen ``nn.scan``, nnx ``nnx.vmap``/``nnx.scan``): a block weight is
  one leaf holding all L blocks along a layer axis. Name those leaves in
  ``stacked={regex: axis}``: their depth rule gives the depth of slice 0 and slice ``i``
  gets depth ``+ i``, so ``stacked={r"params/blocks/.*": 0}`` with the rule
  ``{r"params/blocks/.*": 1}`` trains slice ``i`` exactly as the unrolled model's
  ``blocks_i`` would be trained by ``{r"params/blocks_(\d+)/.*": 1}``.

  A model whose deepest leaf is not at depth ``L + 1`` (``num_layers=3`` with conv1,
  conv2, head at depths 0, 1, 2) would train every leaf, the head included, at a
  fraction of the learning rate: ``init`` refuses it with a ``ValueError`` that says
  what ``num_layers`` means. A tree with masked-out leaves (``optax.masked``,
  ``optax.partition``, :func:`by_path`: the head may be trained by another
  transformation) is not checked.

  Args:
    decay: the per-layer factor (typically 0.6-0.95), a number or a schedule.
    num_layers: L, the number of blocks between embeddings and head.
    depth_rules: ordered ``{regex: depth}``; with a captured group the captured
      integer is added to the depth (see :func:`layer_depths`).
    default_depth: depth of leaves no rule matches; ``None`` makes them an error.
      ``num_layers + 1`` treats them as part of the head (ELECTRA's choice).
    stacked: ``{regex: axis}`` naming the leaves whose ``axis`` indexes layers (see
      :func:`gradtx.tree_paths`), or ``None``. An axis out of range for a matched leaf,
      leaves of different lengths under one rule, and a last slice deeper than
      ``num_layers + 1`` are errors at ``init`` naming the path and the sizes.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`LayerwiseLrDecayState`.

  Example:
    >>> import jax.numpy as jnp, optax, gradtx
    >>> p = {"embed": jnp.ones(1), "layer_0": jnp.ones(1), "layer_1": jnp.ones(1),
    ...      "head": jnp.ones(1)}
    >>> tx = gradtx.layerwise_lr_decay(0.5, num_layers=2,
    ...     depth_rules={"embed": 0, r"layer_(\d+)": 1, "head": 3})
    >>> u, _ = tx.update(p, tx.init(p))
    >>> {k: float(v[0]) for k, v in u.items()}
    {'embed': 0.125, 'head': 1.0, 'layer_0': 0.25, 'layer_1': 0.5}

    The same model with its two layers stacked on axis 0 (as ``nn.scan`` stores them):

    >>> p = {"embed": jnp.ones(1), "layers": jnp.ones((2, 1)), "head": jnp.ones(1)}
    >>> tx = gradtx.layerwise_lr_decay(0.5, num_layers=2,
    ...     depth_rules={"embed": 0, "layers": 1, "head": 3}, stacked={"layers": 0})
    >>> u, _ = tx.update(p, tx.init(p))
    >>> u["layers"][:, 0].tolist()
    [0.25, 0.5]

  References:
    Clark, Luong, Le, Manning, "ELECTRA: Pre-training text encoders as discriminators
    rather than generators", ICLR 2020, arXiv:2003.10555; Bao, Dong, Piao, Wei, "BEiT:
    BERT pre-training of image transformers", ICLR 2022, arXiv:2106.08254.
  """
  _checks.check_positive("decay", decay)
  # The rules' form now; their fit to the params at init.
  _check_depth_arguments(num_layers, depth_rules, default_depth)

  _paths.resolve_stacked({}, stacked)

  def depths_for(tree):
    return layer_depths(tree, num_layers=num_layers, depth_rules=depth_rules,
                        default_depth=default_depth, stacked=stacked)

  def init_fn(params):
    _check_float("params", params)
    _check_head_present(params, depths_for(params), num_layers)
    return LayerwiseLrDecayState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _check_float("updates", updates)
    base = _numerics.scalar_or_schedule(decay, state.count)
    leaves, treedef = jax.tree.flatten(updates)
    depths = jax.tree.leaves(depths_for(updates))
    stacks = _paths.resolve_stacked(updates, stacked)
    powers = {}  # one power per depth, shared by an unrolled leaf and a stack's slice

    def power(depth):
      if isinstance(depth, jax.core.Tracer):  # a default_depth injected as a hyperparameter
        return base ** (num_layers + 1 - depth)
      if int(depth) not in powers:
        powers[int(depth)] = base ** (num_layers + 1 - int(depth))
      return powers[int(depth)]

    scaled = [_scale_leaf(u, power(d) if stack is None else stack.along(
        jnp.stack([power(i) for i in d]) if stack.length else jnp.zeros(0), u.ndim))
              for u, d, stack in zip(leaves, depths, stacks, strict=True)]
    return (jax.tree.unflatten(treedef, scaled),
            LayerwiseLrDecayState(count=optax.safe_increment(state.count)))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_DEFAULT_LABEL = "__default__"


def by_path(rules: _paths.Rules[optax.GradientTransformation], *,
            default: optax.GradientTransformation | None = None
            ) -> optax.GradientTransformationExtraArgs:
  """Applies a different transformation to each group of leaves, chosen by path.

  Built on ``optax.partition``: each transformation sees only its own leaves (the
  others are ``optax.MaskedNode``) and keeps its own state.

  Args:
    rules: ordered ``{regex: GradientTransformation}``; first match wins.
    default: the transformation for leaves no rule matches; ``None`` makes such leaves
      an error. ``optax.identity()`` passes them through; ``optax.set_to_zero()``
      freezes them.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra args reach every inner one).

  Raises:
    TypeError: a rule value or ``default`` that is not a transformation (a factory such
      as ``optax.sgd`` is named, with the call that makes one).

  Example:
    >>> import jax.numpy as jnp, optax, gradtx
    >>> params = {"body": jnp.array([3.0, 4.0]), "head": jnp.array([3.0, 4.0])}
    >>> tx = gradtx.by_path({"body": gradtx.clip_by_global_norm(1.0),
    ...                      "head": optax.set_to_zero()})
    >>> u, _ = tx.update(params, tx.init(params))
    >>> u["body"].tolist(), u["head"].tolist()
    ([0.6000000238418579, 0.800000011920929], [0.0, 0.0])
  """
  compiled = _paths.compile_rules(rules, argname="rules")
  for pattern, tx in compiled:
    _checks.check_transformation(f"rules: the value for {pattern.pattern!r}", tx)
  if default is not None:
    _checks.check_transformation("default", default)
  # Labels are rule positions, so two rules may share a regex-equal transformation.
  labels = [f"rule_{i}:{pattern.pattern}" for i, (pattern, _) in enumerate(compiled)]
  transforms = {label: tx for label, (_, tx) in zip(labels, compiled, strict=True)}
  labels_of_rules = [(p.pattern, lab) for (p, _), lab in zip(compiled, labels, strict=True)]
  if default is not None:
    transforms[_DEFAULT_LABEL] = default

  def labels_for(tree):
    return path_labels(tree, labels_of_rules,
                       default=_DEFAULT_LABEL if default is not None else None)

  return optax.partition(transforms, labels_for)
