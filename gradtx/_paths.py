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
from typing import Any, NamedTuple

import jax
from flax import nnx

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


def leaf_paths_and_treedef(tree: Any) -> tuple[list[str], Any]:
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

  index: int
  value: Any
  match: re.Match | None


def compile_rules(rules: Any, *, argname: str) -> list[tuple[re.Pattern, Any]]:
  """Validates and compiles an ordered ``{regex: value}`` rule set."""
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
  used = {m.index for m in claimed if m is not None}
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
