"""Pytree paths and path rules: how every module names and selects leaves.

A leaf's *path* is its key path joined with "/": ``"encoder/layer_3/Dense_0/kernel"``.
Dict keys, list/tuple indices, NamedTuple fields and Flax ``nnx.Variable`` wrappers are
all understood (the ``.value`` attribute of an nnx Variable is not part of the path, so
linen and nnx models spell their paths the same way).

A *rule set* is an ordered mapping ``{regex: value}`` (or a sequence of pairs). A leaf
takes the value of the first regex that matches its whole path (``re.fullmatch``).

Two different leaves may not share a path (``{"a/b": x, "a": {"b": y}}``): that is an
error naming both, because every rule, mask and per-leaf random draw is keyed by path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import jax
from flax import nnx

_V = TypeVar("_V")

#: An ordered rule set: ``{regex: value}`` or a sequence of ``(regex, value)`` pairs; the
#: first regex that matches a leaf's whole path gives the leaf its value.
Rules = Mapping[str, _V] | Sequence[tuple[str, _V]]

_MAX_LISTED = 8
_FULLMATCH_HINT = (
    "Rules are regexes matched against the whole path (re.fullmatch): 'layer_0' does not "
    "match 'layer_0/kernel', write 'layer_0/.*'; see gradtx.tree_paths(params)."
)


def _is_nnx_variable(node: Any) -> bool:
  return isinstance(node, nnx.Variable)


def _key_to_str(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def leaf_paths_and_treedef(tree: Any) -> tuple[list[str], jax.tree_util.PyTreeDef]:
  """Paths of every array leaf, in ``jax.tree.leaves`` order, and the treedef."""
  outer = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_nnx_variable)[0]
  paths = []
  first_owner: dict[str, Any] = {}
  for key_path, node in outer:
    path = "/".join(_key_to_str(k) for k in key_path)
    owner = first_owner.setdefault(path, key_path)
    if owner != key_path:
      raise ValueError(
          f"two leaves have the same path {path!r}: {jax.tree_util.keystr(owner)} and "
          f"{jax.tree_util.keystr(key_path)}. Paths join keys with '/', so a key that "
          "contains '/' collides with a nested one; rename one of them."
      )
    # An nnx Variable holds its array under ``.value``; name the leaf by the variable.
    paths.extend([path] * len(jax.tree.leaves(node)) if _is_nnx_variable(node) else [path])
  return paths, jax.tree.structure(tree)


def tree_paths(tree: Any) -> list[str]:
  """Lists the "/"-joined path of every leaf of ``tree``, in leaf order.

  Use it to see the names that path rules (``path_labels``, ``scale_by_path``,
  ``by_path``, ``layerwise_lr_decay``) are matched against.

  Stacked (scanned) layers: a model that scans over its blocks stores each block weight
  once, with a leading layer axis, under one path — it is one leaf, not L:

  * linen ``nn.scan(Block, variable_axes={"params": 0}, length=L)`` named ``"blocks"``:
    ``params/blocks/mlp_in/kernel`` of shape ``(L, d, 4d)`` (where the unrolled model has
    ``params/blocks_0/mlp_in/kernel`` … ``params/blocks_{L-1}/...`` of shape ``(d, 4d)``);
    ``variable_axes={"params": 1}`` puts the layer axis at 1 instead.
  * nnx blocks made by ``nnx.vmap`` (``nnx.split_rngs(splits=L)``, ``out_axes=0``) and
    applied with ``nnx.scan``: ``nnx.state(model, nnx.Param)`` has ``blocks/mlp_in/kernel``
    of shape ``(L, d, 4d)`` (nnx paths have no ``params/`` prefix).
  * params initialised under ``jax.vmap(model.init)(keys)``: *every* leaf gains the
    leading axis, ``params/Dense_0/kernel`` of shape ``(L, in, out)``.

  The per-layer techniques (``layerwise_lr_decay``, ``scale_by_path``,
  ``clip_by_leaf_norm``, ``fisher_mask``) take ``stacked={regex: axis}`` to treat each
  slice along ``axis`` of the matched leaves as one layer, e.g.
  ``stacked={r"params/blocks/.*": 0}``.

  Args:
    tree: any pytree: a dict, Flax linen params, an ``nnx.State``, lists, NamedTuples.

  Returns:
    One string per leaf, in the order of ``jax.tree.leaves(tree)``.

  Example:
    >>> import jax.numpy as jnp
    >>> import gradtx
    >>> gradtx.tree_paths({"params": {"Dense_0": {"kernel": jnp.ones(2), "bias": jnp.ones(1)}}})
    ['params/Dense_0/bias', 'params/Dense_0/kernel']
  """
  return leaf_paths_and_treedef(tree)[0]


def path_tree(tree: Any) -> Any:
  """A pytree with the structure of ``tree`` whose leaves are their own paths."""
  paths, treedef = leaf_paths_and_treedef(tree)
  return jax.tree.unflatten(treedef, paths)


class RuleMatch(NamedTuple):
  """Which rule claimed a leaf: its position, its value and the regex match."""

  rule_index: int
  value: Any
  match: re.Match[str]


def compile_rules(rules: Any, *, argname: str) -> list[tuple[re.Pattern[str], Any]]:
  """Validates and compiles an ordered ``{regex: value}`` rule set.

  ``rules`` is typed ``Any``: this is where a value that is not a :data:`Rules` is refused.
  """
  if isinstance(rules, Mapping):
    items = list(rules.items())
  elif isinstance(rules, Sequence) and not isinstance(rules, str) and all(
      isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2
      for item in rules
  ):
    items = [tuple(item) for item in rules]
  else:
    raise TypeError(
        f"{argname} must be an ordered mapping {{regex: value}} or a sequence of "
        f"(regex, value) pairs, got {type(rules).__name__}: {rules!r}"
    )
  compiled = []
  for pattern, value in items:
    if not isinstance(pattern, str):
      raise TypeError(f"{argname}: every rule key must be a regex string, got {pattern!r}")
    try:
      compiled.append((re.compile(pattern), value))
    except re.error as err:
      raise ValueError(f"{argname}: rule {pattern!r} is not a valid regex: {err}") from None
  return compiled


def _listing(items: Sequence[str]) -> str:
  shown = ", ".join(repr(s) for s in items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return shown + (f", ... ({more} more)" if more > 0 else "")


def match_rules(
    paths: Sequence[str],
    rules: Any,
    *,
    argname: str,
    has_default: bool,
    default_name: str = "default",
) -> list[RuleMatch | None]:
  """Assigns each path the first rule whose regex matches the whole path.

  Raises, naming the paths, when a path matches no rule and there is no default, and,
  naming the rule, when a rule claims no path (it matches nothing, or only paths an
  earlier rule already took). An empty tree has nothing to match and raises nothing.

  Returns:
    Per path, the ``RuleMatch`` that claimed it, or ``None`` (left to the default).
  """
  compiled = compile_rules(rules, argname=argname)
  claimed: list[RuleMatch | None] = []
  for path in paths:
    found = None
    for index, (pattern, value) in enumerate(compiled):
      match = pattern.fullmatch(path)
      if match is not None:
        found = RuleMatch(index, value, match)
        break
    claimed.append(found)
  if not paths:
    return claimed

  unmatched = [p for p, m in zip(paths, claimed, strict=True) if m is None]
  if unmatched and not has_default:
    raise ValueError(
        f"{argname}: {len(unmatched)} leaf path(s) match no rule and no default was given: "
        f"{_listing(unmatched)}. Add a rule for them or pass `{default_name}=`. {_FULLMATCH_HINT}"
    )
  used = {m.rule_index for m in claimed if m is not None}
  for index, (pattern, _) in enumerate(compiled):
    if index in used:
      continue
    shadowed = [p for p in paths if pattern.fullmatch(p)]
    why = (
        f"only matches paths claimed by earlier rules ({_listing(shadowed)})"
        if shadowed
        else f"matches no leaf path; existing paths include {_listing(list(paths))}"
    )
    raise ValueError(f"{argname}: rule {pattern.pattern!r} {why}. {_FULLMATCH_HINT}")
  return claimed


def map_by_rules(tree: Any, rules: Any, *, argname: str, default: Any = None,
                 has_default: bool, default_name: str = "default"
                 ) -> tuple[Any, list[RuleMatch | None], list[str]]:
  """Labels every leaf of ``tree`` with its rule's value (or ``default``).

  Returns:
    ``(values_tree, matches, paths)``: the per-leaf values as a pytree shaped like
    ``tree``, plus the per-leaf matches and paths in leaf order.
  """
  paths, treedef = leaf_paths_and_treedef(tree)
  matches = match_rules(paths, rules, argname=argname, has_default=has_default,
                        default_name=default_name)
  values = [default if m is None else m.value for m in matches]
  return jax.tree.unflatten(treedef, values), matches, paths


class StackedLeaf(NamedTuple):
  """A leaf whose ``axis`` indexes layers (a scanned or vmapped stack of ``length`` blocks)."""

  axis: int
  length: int

  def along(self, per_slice: Any, ndim: int) -> Any:
    """A ``(length,)`` vector shaped to broadcast along ``axis`` of an ``ndim``-d leaf."""
    shape = (1,) * self.axis + (self.length,) + (1,) * (ndim - self.axis - 1)
    return per_slice.reshape(shape)  # a numpy vector stays numpy, a jax one jax


def resolve_stacked(tree: Any, stacked: Any, *, argname: str = "stacked"
                    ) -> list[StackedLeaf | None]:
  """Which leaves of ``tree`` are stacked layers, from ``stacked={regex: axis}`` rules.

  The one place every technique reads its ``stacked=`` option. A leaf takes the axis of
  the first rule matching its whole path; leaves no rule matches are ordinary leaves
  (``None``). Called with an empty tree (``{}``) it checks only the form of the rules,
  which is what the factories do at construction.

  Args:
    tree: the pytree (params, updates, a Fisher tree).
    stacked: ``None`` (nothing stacked), or ordered ``{regex: axis}`` (or pairs); an axis
      is an int, negative counting from the end of each leaf's shape.
    argname: the argument's name in the messages.

  Returns:
    Per leaf, in ``jax.tree.leaves`` order, a :class:`StackedLeaf` (the axis made
    non-negative, the number of layers) or ``None``.

  Raises:
    TypeError: ``stacked`` is not a rule set, or an axis is not an int.
    ValueError: a rule matches no leaf; an axis out of range for a matched leaf (its path,
      shape and the allowed axes are named); leaves of different lengths under one rule
      (every path and length is named).
  """
  if stacked is None:
    return [None] * len(jax.tree.leaves(tree))
  compiled = compile_rules(stacked, argname=argname)
  for pattern, axis in compiled:
    if isinstance(axis, bool) or not isinstance(axis, int):
      raise TypeError(f"{argname}: the axis for {pattern.pattern!r} must be an int (the axis "
                      f"that indexes the layers), got {axis!r}")
  paths, _ = leaf_paths_and_treedef(tree)
  matches = match_rules(paths, stacked, argname=argname, has_default=True)
  found: list[StackedLeaf | None] = []
  by_rule: dict[int, list[tuple[str, tuple[int, ...], int]]] = {}
  for path, leaf, match in zip(paths, jax.tree.leaves(tree), matches, strict=True):
    if match is None:
      found.append(None)
      continue
    shape = tuple(leaf.shape) if hasattr(leaf, "shape") else jax.numpy.shape(leaf)
    if not -len(shape) <= match.value < len(shape):
      allowed = f"-{len(shape)}..{len(shape) - 1}" if shape else "none: it is a scalar"
      raise ValueError(
          f"{argname}: axis {match.value} of rule {match.match.re.pattern!r} is out of range "
          f"for {path!r} of shape {shape} ({len(shape)} axes; allowed {allowed})")
    axis = match.value % len(shape)
    found.append(StackedLeaf(axis, shape[axis]))
    by_rule.setdefault(match.rule_index, []).append((path, shape, axis))
  for index, leaves in by_rule.items():
    if len({shape[axis] for _, shape, axis in leaves}) > 1:
      sizes = ", ".join(f"{p!r}: {shape[axis]} (shape {shape}, axis {axis})"
                        for p, shape, axis in leaves[:_MAX_LISTED])
      raise ValueError(
          f"{argname}: rule {compiled[index][0].pattern!r} matches leaves of different "
          f"lengths along their layer axis ({sizes}); every leaf one rule stacks must hold "
          "the same layers: split the rule, or fix the axis")
  return found
