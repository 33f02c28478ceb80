"""Tests for gradtx._paths: leaf paths, path collisions and ordered regex path rules.

Expected paths and labels are written out by hand from the tree's structure, never
derived from the code under test.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import gradtx
from gradtx import _paths

# ----------------------------------------------------------------------------- tree_paths


def _leaf_ids(tree):
  """Each leaf is a 1-element array holding a distinct integer; list them in leaf order."""
  return [int(x[0]) for x in jax.tree.leaves(tree)]


def test_tree_paths_nested_dicts_in_leaf_order():
  tree = {
      "encoder": {"layer_1": {"kernel": jnp.array([1]), "bias": jnp.array([2])}},
      "b": jnp.array([3]),
      "a": {"x": {"y": jnp.array([4])}},
  }
  paths = gradtx.tree_paths(tree)
  # Dicts flatten in sorted key order.
  assert paths == ["a/x/y", "b", "encoder/layer_1/bias", "encoder/layer_1/kernel"]
  # Path i names leaf i of jax.tree.leaves.
  assert dict(zip(paths, _leaf_ids(tree), strict=True)) == {
      "encoder/layer_1/kernel": 1, "encoder/layer_1/bias": 2, "b": 3, "a/x/y": 4,
  }


def test_tree_paths_lists_and_tuples_use_indices():
  tree = {"layers": [{"w": jnp.array([0])}, {"w": jnp.array([1])}], "t": (jnp.array([2]),)}
  paths = gradtx.tree_paths(tree)
  assert paths == ["layers/0/w", "layers/1/w", "t/0"]
  assert _leaf_ids(tree) == [0, 1, 2]


class _Pair(NamedTuple):
  first: jax.Array
  second: jax.Array


def test_tree_paths_namedtuple_uses_field_names():
  tree = {"opt": _Pair(first=jnp.array([0]), second=jnp.array([1]))}
  assert gradtx.tree_paths(tree) == ["opt/first", "opt/second"]


def test_tree_paths_skips_masked_nodes_and_none():
  tree = {"a": optax.MaskedNode(), "b": None, "c": [None, jnp.array([0])], "d": jnp.array([1])}
  assert gradtx.tree_paths(tree) == ["c/1", "d"]


def test_tree_paths_empty_tree():
  assert gradtx.tree_paths({}) == []
  assert gradtx.tree_paths({"a": None, "b": optax.MaskedNode()}) == []


def test_tree_paths_pytree_without_keys_uses_flat_index():
  @jax.tree_util.register_pytree_node_class
  class Box:
    def __init__(self, a, b):
      self.a, self.b = a, b

    def tree_flatten(self):
      return (self.a, self.b), None

    @classmethod
    def tree_unflatten(cls, aux, children):
      del aux
      return cls(*children)

  assert gradtx.tree_paths({"box": Box(jnp.zeros(1), jnp.ones(1))}) == ["box/0", "box/1"]


class _LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(4)(x))
    return nn.Dense(2, name="head")(x)


def test_tree_paths_flax_linen_params():
  params = _LinenMLP().init(jax.random.key(0), jnp.ones((1, 3)))
  assert gradtx.tree_paths(params) == [
      "params/Dense_0/bias", "params/Dense_0/kernel", "params/head/bias", "params/head/kernel",
  ]
  # The leaves really are in that order (shapes identify them).
  shapes = [x.shape for x in jax.tree.leaves(params)]
  assert shapes == [(4,), (3, 4), (2,), (4, 2)]


class _NnxMLP(nnx.Module):

  def __init__(self, rngs):
    self.encoder = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.encoder(x))))


def test_tree_paths_flax_nnx_state_has_no_value_suffix():
  model = _NnxMLP(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  paths = gradtx.tree_paths(state)
  assert paths == [
      "encoder/bias", "encoder/kernel", "head/bias", "head/kernel", "norm/bias", "norm/scale",
  ]
  assert not any(p.endswith("value") for p in paths)
  shapes = [x.shape for x in jax.tree.leaves(state)]
  assert shapes == [(4,), (3, 4), (2,), (4, 2), (4,), (4,)]
  # The full state also holds the BatchNorm statistics.
  assert gradtx.tree_paths(nnx.state(model, nnx.BatchStat)) == ["norm/mean", "norm/var"]


def test_path_tree_holds_paths_in_place():
  tree = {"a": [jnp.zeros(1), None], "b": _Pair(jnp.zeros(1), jnp.zeros(2))}
  assert _paths.path_tree(tree) == {"a": ["a/0", None], "b": _Pair("b/first", "b/second")}


def test_colliding_paths_are_an_error_naming_both_leaves():
  # "a/b" the key and a -> b the nesting both join to "a/b": one leaf's rule, mask or
  # random draw would silently apply to the other (#13).
  tree = {"a/b": jnp.zeros(1), "a": {"b": jnp.ones(1)}}
  for call in (gradtx.tree_paths, _paths.path_tree,
               lambda t: gradtx.path_labels(t, {".*": 0}),
               lambda t: gradtx.scale_by_path({".*": 2.0}).init(t),
               lambda t: gradtx.clip_by_global_norm(1.0).init(t)):
    with pytest.raises(ValueError, match=r"two leaves have the same path 'a/b': "
                                         r"\['a'\]\['b'\] and \['a/b'\]"):
      call(tree)
  # Keys that only look alike do not collide.
  assert gradtx.tree_paths({"a/b": jnp.zeros(1), "a": {"c": jnp.ones(1)}}) == ["a/c", "a/b"]


# ----------------------------------------------------------------------------- path rules

_PARAMS = {
    "embed": {"table": jnp.zeros((5, 2))},
    "layer_1": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)},
    "layer_10": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)},
    "head": {"kernel": jnp.zeros((2, 3))},
}


def test_path_labels_first_match_wins():
  labels = gradtx.path_labels(_PARAMS, {
      r"layer_1/bias": "special",   # earlier: takes layer_1/bias before the next rule
      r"layer_\d+/.*": "body",
      r".*": "rest",
  })
  assert labels == {
      "embed": {"table": "rest"},
      "layer_1": {"kernel": "body", "bias": "special"},
      "layer_10": {"kernel": "body", "bias": "body"},
      "head": {"kernel": "rest"},
  }


def test_path_labels_sequence_of_pairs_keeps_order():
  rules = [(r"head/.*", "h"), (r".*", "other")]
  labels = gradtx.path_labels(_PARAMS, rules)
  assert labels["head"]["kernel"] == "h"
  assert labels["layer_10"]["bias"] == "other"
  # Reversed, the catch-all takes everything and the head rule is shadowed.
  with pytest.raises(ValueError, match=r"'head/\.\*' only matches paths claimed by earlier"):
    gradtx.path_labels(_PARAMS, rules[::-1])


def test_path_labels_uses_fullmatch_so_layer_1_is_not_layer_10():
  # re.fullmatch: "layer_1/.*" covers layer_1/... but not layer_10/... (re.match would).
  labels = gradtx.path_labels(_PARAMS, {r"layer_1/.*": "one"}, default="other")
  assert labels["layer_1"] == {"kernel": "one", "bias": "one"}
  assert labels["layer_10"] == {"kernel": "other", "bias": "other"}
  # A rule must cover the whole path: "layer_1" alone names no leaf.
  with pytest.raises(ValueError, match=r"rule 'layer_1' matches no leaf path"):
    gradtx.path_labels(_PARAMS, {r"layer_1": "one"}, default="other")


def test_path_labels_default_fills_unmatched():
  labels = gradtx.path_labels(_PARAMS, {r"head/.*": 1}, default=0)
  assert jax.tree.leaves(labels) == [0, 1, 0, 0, 0, 0]  # embed, head, layer_1 x2, layer_10 x2


def test_path_labels_unmatched_leaves_error_lists_them():
  with pytest.raises(ValueError) as err:
    gradtx.path_labels(_PARAMS, {r"layer_\d+/.*": "body"})
  msg = str(err.value)
  assert "2 leaf path(s) match no rule" in msg
  assert "'embed/table'" in msg and "'head/kernel'" in msg
  assert "layer_1/kernel" not in msg
  assert "default=" in msg


def test_path_labels_unmatched_listing_is_truncated():
  many = {f"p{i:02d}": jnp.zeros(1) for i in range(12)}
  # p00 and p01 are matched; the other 10 are listed 8 at a time.
  with pytest.raises(ValueError, match=r"10 leaf path\(s\).*'p09', \.\.\. \(2 more\)"):
    gradtx.path_labels(many, {"nothing_matches_this|p00": 0, "p01": 1}, default=None)


def test_path_labels_rule_matching_nothing_is_named_with_existing_paths():
  with pytest.raises(ValueError) as err:
    gradtx.path_labels(_PARAMS, {r"haed/.*": "typo"}, default="x")
  msg = str(err.value)
  assert "'haed/.*' matches no leaf path" in msg
  assert "'head/kernel'" in msg and "'embed/table'" in msg
  assert "tree_paths" in msg


def test_path_labels_shadowed_rule_is_an_error():
  with pytest.raises(ValueError) as err:
    gradtx.path_labels(_PARAMS, {r"layer_.*": "a", r"layer_10/.*": "b"}, default="x")
  msg = str(err.value)
  assert "'layer_10/.*'" in msg and "only matches paths claimed by earlier rules" in msg
  assert "'layer_10/bias'" in msg


def test_path_labels_invalid_regex_is_a_clear_error():
  with pytest.raises(ValueError, match=r"rules: rule '\[oops' is not a valid regex"):
    gradtx.path_labels(_PARAMS, {r"[oops": 1, r".*": 0})


@pytest.mark.parametrize(
    "rules",
    [
        "head/.*",                      # a bare string
        3,                              # not a container
        {"head/.*", ".*"},              # a set has no order
        [("head/.*",), (".*", 0)],      # not pairs
        ["ab", "cd"],                   # strings of length 2 are not (regex, value) pairs
    ],
)
def test_path_labels_wrong_rule_container_is_type_error(rules):
  with pytest.raises(TypeError, match=r"rules must be an ordered mapping"):
    gradtx.path_labels(_PARAMS, rules)


def test_path_labels_non_string_regex_is_type_error():
  with pytest.raises(TypeError, match=r"every rule key must be a regex string, got 3"):
    gradtx.path_labels(_PARAMS, {3: "x"}, default="y")


def test_path_labels_empty_tree_is_fine():
  assert gradtx.path_labels({}, {r"head/.*": 1}) == {}
  assert gradtx.path_labels({"a": optax.MaskedNode()}, {r"x": 1}) == {"a": optax.MaskedNode()}


def test_path_labels_on_nnx_state_and_linen_params():
  state = nnx.state(_NnxMLP(nnx.Rngs(0)), nnx.Param)
  labels = gradtx.path_labels(state, {r"head/.*": "head"}, default="body")
  assert jax.tree.leaves(labels) == ["body", "body", "head", "head", "body", "body"]
  params = _LinenMLP().init(jax.random.key(0), jnp.ones((1, 3)))
  labels = gradtx.path_labels(params, {r"params/head/.*": "head", r"params/.*": "body"})
  assert labels == {"params": {"Dense_0": {"bias": "body", "kernel": "body"},
                               "head": {"bias": "head", "kernel": "head"}}}


def test_match_rules_exposes_the_regex_match():
  matches = _paths.match_rules(
      ["encoder/layer_3/kernel", "head/kernel"], {r"encoder/layer_(\d+)/.*": "L"},
      argname="rules", has_default=True,
  )
  assert matches[1] is None
  assert matches[0].rule_index == 0 and matches[0].value == "L"
  assert matches[0].match.group(1) == "3"


def test_labels_drive_optax_partition():
  params = {"body": jnp.array([1.0, -2.0]), "head": jnp.array([3.0])}
  labels = gradtx.path_labels(params, {"body": "frozen", "head": "train"})
  tx = optax.partition({"frozen": optax.set_to_zero(), "train": optax.sgd(0.5)}, labels)
  grads = {"body": jnp.array([1.0, 1.0]), "head": jnp.array([2.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["body"], [0.0, 0.0])
  np.testing.assert_array_equal(updates["head"], [-1.0])


# ---------------------------------------------------------------------- stacked layers


def test_tree_paths_of_stacked_layers_as_documented():
  """The three layouts ``tree_paths`` documents: linen ``nn.scan``, nnx ``nnx.vmap``, and
  ``jax.vmap``-initialised params — one leaf per weight, the layers on axis 0."""
  import _scanned_models as models

  scanned = models.scanned_params(models.unrolled_params())
  shapes = dict(zip(gradtx.tree_paths(scanned), [x.shape for x in jax.tree.leaves(scanned)],
                    strict=True))
  assert shapes["params/blocks/mlp_in/kernel"] == (models.LAYERS, models.DIM, 4 * models.DIM)
  assert shapes["params/head/kernel"] == (models.DIM, models.VOCAB)
  state = nnx.state(models.nnx_model(scanned), nnx.Param)
  nnx_shapes = dict(zip(gradtx.tree_paths(state), [x.shape for x in jax.tree.leaves(state)],
                        strict=True))
  assert nnx_shapes["blocks/mlp_in/kernel"] == (models.LAYERS, models.DIM, 4 * models.DIM)
  assert {"params/" + p for p in nnx_shapes} == set(shapes)
  vmapped = jax.vmap(lambda k: nn.Dense(3).init(k, jnp.ones(2)))(
      jax.random.split(jax.random.key(0), 5))
  assert gradtx.tree_paths(vmapped) == ["params/bias", "params/kernel"]
  assert [x.shape for x in jax.tree.leaves(vmapped)] == [(5, 3), (5, 2, 3)]


def test_resolve_stacked_gives_axis_and_length_per_leaf():
  tree = {"a": jnp.ones((2, 3)), "b": jnp.ones((4, 3)), "c": jnp.ones(1)}
  got = _paths.resolve_stacked(tree, {"a": -1, "b": 0})
  assert got == [_paths.StackedLeaf(1, 3), _paths.StackedLeaf(0, 4), None]
  assert _paths.resolve_stacked(tree, None) == [None, None, None]
  assert _paths.resolve_stacked({}, {"x": 0}) == []  # construction: the rules' form only
