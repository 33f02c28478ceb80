"""Tests for gradtx.layerwise: per-path multipliers, layer-wise LR decay, per-path transforms.

References are independent of the code under test: hand-computed multipliers, numpy,
plain ``jax.grad`` SGD, and optax's own optimizers run on the sub-trees. The last
section proves Su's reparametrisation (Su Jianlin, "Layer-wise learning rates and free
gradients", 2019, kexue.fm/archives/6418) on a real Flax model.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from sklearn.datasets import load_digits

import gradtx


def _ones_like_params():
  return {
      "embed": {"table": jnp.ones((3, 2))},
      "encoder": {f"layer_{i}": {"w": jnp.ones(2)} for i in range(3)},
      "head": {"w": jnp.ones(2), "b": jnp.ones(1)},
  }


# ----------------------------------------------------------------------------- scale_by_path


def test_scale_by_path_multipliers_per_path():
  grads = {"body": {"w": jnp.array([1.0, -2.0])}, "head": {"w": jnp.array([4.0]),
                                                          "b": jnp.array([-1.0])}}
  tx = gradtx.scale_by_path({r"head/w": 10.0, r"head/.*": 3.0, r"body/.*": 0.5})
  updates, state = tx.update(grads, tx.init(grads))
  np.testing.assert_array_equal(updates["body"]["w"], [0.5, -1.0])
  np.testing.assert_array_equal(updates["head"]["w"], [40.0])
  np.testing.assert_array_equal(updates["head"]["b"], [-3.0])
  assert int(state.count) == 1


def test_scale_by_path_default_multiplier():
  grads = {"a": jnp.array([2.0]), "b": jnp.array([2.0])}
  tx = gradtx.scale_by_path({"a": 3.0}, default=0.25)
  updates, _ = tx.update(grads, tx.init(grads))
  assert updates == {"a": 6.0, "b": 0.5}
  # The default default is 1: unmatched leaves pass through unchanged.
  tx = gradtx.scale_by_path({"a": 3.0})
  updates, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_array_equal(updates["b"], [2.0])


def test_scale_by_path_default_none_makes_unmatched_an_error():
  params = {"a": jnp.ones(1), "b": jnp.ones(1)}
  tx = gradtx.scale_by_path({"a": 3.0}, default=None)
  with pytest.raises(ValueError, match=r"1 leaf path\(s\) match no rule.*'b'"):
    tx.init(params)
  # When the rules cover every leaf, default=None is fine.
  tx = gradtx.scale_by_path({"a": 3.0, "b": 2.0}, default=None)
  updates, _ = tx.update(params, tx.init(params))
  assert updates == {"a": 3.0, "b": 2.0}


def test_scale_by_path_rule_matching_nothing_fails_at_init():
  params = {"encoder": jnp.ones(1), "head": jnp.ones(1)}
  tx = gradtx.scale_by_path({r"haed": 3.0})
  with pytest.raises(ValueError, match=r"rule 'haed' matches no leaf path.*'head'"):
    tx.init(params)


@pytest.mark.parametrize("bad", ["fast", None, [1.0, 2.0]])
def test_scale_by_path_bad_multiplier_is_type_error(bad):
  with pytest.raises(TypeError, match=r"multiplier for 'head' must be a number or a schedule"):
    gradtx.scale_by_path({"head": bad})


def test_scale_by_path_schedule_multiplier_follows_step_count_under_jit():
  schedule = optax.linear_schedule(0.0, 1.0, transition_steps=4)  # 0, .25, .5, .75, 1, 1
  grads = {"body": jnp.array([2.0]), "head": jnp.array([4.0])}
  tx = gradtx.scale_by_path({"head": schedule, "body": lambda count: 1.0 + count})
  traces = []
  update = jax.jit(lambda u, s: (traces.append(None), tx.update(u, s))[1])
  state = tx.init(grads)
  for step, expected_head in enumerate([0.0, 0.25, 0.5, 0.75, 1.0, 1.0]):
    updates, state = update(grads, state)
    np.testing.assert_allclose(updates["head"], [4.0 * expected_head], rtol=1e-6)
    np.testing.assert_allclose(updates["body"], [2.0 * (1 + step)], rtol=1e-6)
  assert len(traces) == 1  # one compilation for all steps


def test_scale_by_path_evaluates_each_schedule_once_per_step():
  calls = []

  def schedule(count):
    calls.append(None)  # once per trace of the rule, however many leaves it covers
    return 0.5 * (count + 1)

  grads = {f"w{i}": jnp.array([float(i)]) for i in range(4)}
  tx = gradtx.scale_by_path({"w[012]": schedule}, default=schedule)
  state = tx.init(grads)
  for step in range(2):
    updates, state = tx.update(grads, state)
    chex.assert_trees_all_close(
        updates, {f"w{i}": np.array([i * 0.5 * (step + 1)]) for i in range(4)})
  assert len(calls) == 4  # the rule and the default, on each of the two steps


def test_scale_by_path_non_finite_multipliers_are_refused_at_construction():
  with pytest.raises(ValueError, match=r"rules: the multiplier for 'a' must be a finite "
                                       r"number, got nan"):
    gradtx.scale_by_path({"a": float("nan")})
  with pytest.raises(ValueError, match=r"default must be a finite number, got inf"):
    gradtx.scale_by_path({"a": 1.0}, default=float("inf"))
  # Zero freezes a leaf and a negative multiplier reverses it: both are allowed.
  grads = {"a": jnp.array([2.0]), "b": jnp.array([2.0])}
  tx = gradtx.scale_by_path({"a": 0.0}, default=-1.0)
  updates, _ = tx.update(grads, tx.init(grads))
  chex.assert_trees_all_close(updates, {"a": np.array([0.0]), "b": np.array([-2.0])})


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_scale_by_path_keeps_dtype(dtype):
  grads = {"a": jnp.array([1.5, -0.75], dtype), "b": jnp.array([1.0], dtype)}
  tx = gradtx.scale_by_path({"a": 3.0}, default=0.5)
  updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
  assert updates["a"].dtype == dtype and updates["b"].dtype == dtype
  np.testing.assert_array_equal(np.asarray(updates["a"], np.float32), [4.5, -2.25])
  np.testing.assert_array_equal(np.asarray(updates["b"], np.float32), [0.5])


def test_scale_by_path_after_adam_is_a_per_path_learning_rate():
  params = {"body": jnp.array([1.0, -1.0]), "head": jnp.array([0.5])}
  grads_seq = [
      {"body": jnp.array([0.3, -0.1]), "head": jnp.array([2.0])},
      {"body": jnp.array([-0.2, 0.4]), "head": jnp.array([-1.0])},
      {"body": jnp.array([0.1, 0.1]), "head": jnp.array([0.5])},
  ]
  tx = optax.chain(optax.adam(0.1), gradtx.scale_by_path({"head": 5.0}))
  ref = optax.adam(0.1)  # reference: plain Adam, head update scaled by 5 by hand
  state, ref_state = tx.init(params), ref.init(params)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = ref.update(grads, ref_state, params)
    np.testing.assert_allclose(updates["body"], ref_updates["body"], rtol=1e-6)
    np.testing.assert_allclose(updates["head"], 5.0 * ref_updates["head"], rtol=1e-6)
    params = optax.apply_updates(params, updates)


def test_scale_by_path_inside_optax_masked():
  grads = {"a": jnp.array([1.0]), "b": jnp.array([1.0]), "c": jnp.array([1.0])}
  tx = optax.masked(gradtx.scale_by_path({"a": 2.0, "b": 3.0}, default=None),
                    {"a": True, "b": True, "c": False})
  updates, _ = tx.update(grads, tx.init(grads))
  assert updates == {"a": 2.0, "b": 3.0, "c": 1.0}


def test_scale_by_path_on_nnx_state():
  class Net(nnx.Module):

    def __init__(self, rngs):
      self.body = nnx.Linear(3, 4, rngs=rngs)
      self.head = nnx.Linear(4, 1, rngs=rngs)

  model = Net(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(lambda p: p + 1.0, params)  # any nnx.State shaped like the params
  tx = gradtx.scale_by_path({r"head/.*": 10.0, r"body/kernel": 0.0}, default=None)
  with pytest.raises(ValueError, match=r"'body/bias'"):
    tx.init(params)
  tx = gradtx.scale_by_path({r"head/.*": 10.0, r"body/kernel": 0.0, r"body/bias": 1.0})
  updates, _ = jax.jit(tx.update)(grads, tx.init(params))
  assert isinstance(updates, nnx.State)
  np.testing.assert_allclose(updates["head"]["kernel"][...], 10 * grads["head"]["kernel"][...],
                             rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["bias"][...], 10 * grads["head"]["bias"][...],
                             rtol=1e-6)
  np.testing.assert_array_equal(updates["body"]["kernel"][...], 0.0)
  np.testing.assert_array_equal(updates["body"]["bias"][...], grads["body"]["bias"][...])


# ----------------------------------------------------------------------------- layer-wise decay

_DEPTH_RULES = {r"embed/.*": 0, r"encoder/layer_(\d+)/.*": 1, r"head/.*": 4}


def test_layer_depths_adds_captured_layer_index():
  depths = gradtx.layer_depths(_ones_like_params(), num_layers=3, depth_rules=_DEPTH_RULES)
  assert depths == {
      "embed": {"table": 0},
      "encoder": {"layer_0": {"w": 1}, "layer_1": {"w": 2}, "layer_2": {"w": 3}},
      "head": {"w": 4, "b": 4},
  }
  # The rule's value is an offset: the same blocks numbered from 1, starting at depth 0.
  params = {"block_1": jnp.ones(1), "block_2": jnp.ones(1), "stem": jnp.ones(1)}
  depths = gradtx.layer_depths(params, num_layers=2,
                               depth_rules={r"block_(\d+)": 0, "stem": 0})
  assert depths == {"block_1": 1, "block_2": 2, "stem": 0}


def test_layer_depths_non_integer_capture_is_a_clear_error():
  params = {"enc": {"layer_0": jnp.ones(1)}}
  with pytest.raises(ValueError, match=r"captured \['enc', '0'\] from 'enc/layer_0'.*\(\?:"):
    gradtx.layer_depths(params, num_layers=1, depth_rules={r"(enc)/layer_(\d+)": 1})
  # A non-capturing group is the fix.
  depths = gradtx.layer_depths(params, num_layers=1, depth_rules={r"(?:enc)/layer_(\d+)": 1})
  assert depths == {"enc": {"layer_0": 1}}


def test_layer_depths_out_of_range_names_the_path():
  params = _ones_like_params()
  params["encoder"]["layer_4"] = {"w": jnp.ones(2)}  # depth 5 > num_layers + 1 = 4
  with pytest.raises(ValueError, match=r"depth of 'encoder/layer_4/w'.*\[0, 4\], got 5"):
    gradtx.layer_depths(params, num_layers=3, depth_rules=_DEPTH_RULES)
  with pytest.raises(ValueError, match=r"depth of 'embed/table'.*got -1"):
    gradtx.layer_depths(_ones_like_params(), num_layers=3,
                        depth_rules={**_DEPTH_RULES, r"embed/.*": -1})


def test_layer_depths_default_depth():
  rules = {r"encoder/layer_(\d+)/.*": 1}
  with pytest.raises(ValueError, match=r"3 leaf path\(s\).*`default_depth=`"):
    gradtx.layer_depths(_ones_like_params(), num_layers=3, depth_rules=rules)
  depths = gradtx.layer_depths(_ones_like_params(), num_layers=3, depth_rules=rules,
                               default_depth=4)
  assert jax.tree.leaves(depths) == [4, 1, 2, 3, 4, 4]  # embed, layers 0-2, head b, head w
  with pytest.raises(ValueError,
                     match=r"default_depth must be in \[0, num_layers \+ 1\] = \[0, 4\], got 5"):
    gradtx.layer_depths(_ones_like_params(), num_layers=3, depth_rules=rules, default_depth=5)
  with pytest.raises(TypeError, match=r"default_depth must be an int"):
    gradtx.layer_depths(_ones_like_params(), num_layers=3, depth_rules=rules,
                        default_depth=1.5)


def test_layer_depths_bad_arguments():
  with pytest.raises(TypeError, match=r"depth for 'head/\.\*' must be an int, got 1.0"):
    gradtx.layer_depths(_ones_like_params(), num_layers=3,
                        depth_rules={**_DEPTH_RULES, r"head/.*": 1.0})
  with pytest.raises(ValueError, match=r"num_layers must be an int >= 0, got -1"):
    gradtx.layer_depths(_ones_like_params(), num_layers=-1, depth_rules=_DEPTH_RULES)
  with pytest.raises(TypeError, match=r"num_layers must be an int"):
    gradtx.layer_depths(_ones_like_params(), num_layers=True, depth_rules=_DEPTH_RULES)


def test_layerwise_lr_decay_multipliers():
  # L = 3: multiplier decay ** (L + 1 - depth), written out by hand.
  decay = 0.8
  tx = gradtx.layerwise_lr_decay(decay, num_layers=3, depth_rules=_DEPTH_RULES)
  grads = _ones_like_params()
  updates, state = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(updates["embed"]["table"], np.full((3, 2), 0.8**4), rtol=1e-6)
  for i, expected in enumerate([0.8**3, 0.8**2, 0.8]):
    np.testing.assert_allclose(updates["encoder"][f"layer_{i}"]["w"], [expected] * 2, rtol=1e-6)
  np.testing.assert_array_equal(updates["head"]["w"], [1.0, 1.0])  # depth L + 1: untouched
  np.testing.assert_array_equal(updates["head"]["b"], [1.0])
  assert int(state.count) == 1


def test_layerwise_lr_decay_reproduces_electra_code_convention():
  """ELECTRA's released code (model/optimization.py, `_get_layer_lrs`) sets
  embeddings depth 0, `encoder/layer_i` depth i + 1, the task head n_layers + 2, and
  multiplies the lr by decay ** (n_layers + 2 - depth): the top block gets decay**2.
  The docstring says: pass num_layers = L + 1 and give the head depth L + 2.
  """
  n_layers, decay = 3, 0.5
  electra_lr = {  # decay ** (n_layers + 2 - depth), as in ELECTRA's code
      "embed": decay ** (n_layers + 2 - 0),
      "layer_0": decay ** (n_layers + 2 - 1),
      "layer_1": decay ** (n_layers + 2 - 2),
      "layer_2": decay ** (n_layers + 2 - 3),
      "head": decay ** (n_layers + 2 - (n_layers + 2)),
  }
  assert electra_lr["layer_2"] == decay**2 and electra_lr["head"] == 1.0
  tx = gradtx.layerwise_lr_decay(
      decay, num_layers=n_layers + 1,
      depth_rules={**_DEPTH_RULES, r"head/.*": n_layers + 2},
  )
  grads = _ones_like_params()
  updates, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(updates["embed"]["table"], electra_lr["embed"], rtol=1e-6)
  for i in range(n_layers):
    np.testing.assert_allclose(updates["encoder"][f"layer_{i}"]["w"], electra_lr[f"layer_{i}"],
                               rtol=1e-6)
  np.testing.assert_allclose(updates["head"]["w"], electra_lr["head"], rtol=1e-6)


def test_layerwise_lr_decay_equals_separate_adam_learning_rates():
  # The paper's formulation: each layer its own optimizer with lr * decay ** (L + 1 - d).
  lr, decay, num_layers = 0.1, 0.7, 3
  params = {
      "embed": {"table": jnp.array([[0.1, -0.2], [0.3, 0.4]])},
      "encoder": {f"layer_{i}": {"w": jnp.array([0.5 * i, -0.1])} for i in range(3)},
      "head": {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.2])},
  }
  group_of = {"embed": 0, "layer_0": 1, "layer_1": 2, "layer_2": 3, "head": 4}
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: group_of[path[-2].key if path[0].key == "encoder" else path[0].key],
      params,
  )
  ref = optax.partition(
      {d: optax.adam(lr * decay ** (num_layers + 1 - d)) for d in range(5)}, labels
  )
  tx = optax.chain(optax.adam(lr), gradtx.layerwise_lr_decay(
      decay, num_layers=num_layers, depth_rules=_DEPTH_RULES))
  loss = lambda p: sum(jnp.sum(jnp.sin(3.0 * x) * x) for x in jax.tree.leaves(p))

  @jax.jit
  def run(theta, ref_theta):
    state, ref_state = tx.init(theta), ref.init(ref_theta)
    for _ in range(5):
      updates, state = tx.update(jax.grad(loss)(theta), state, theta)
      theta = optax.apply_updates(theta, updates)
      ref_updates, ref_state = ref.update(jax.grad(loss)(ref_theta), ref_state, ref_theta)
      ref_theta = optax.apply_updates(ref_theta, ref_updates)
    return theta, ref_theta

  theta, ref_theta = run(params, params)
  chex.assert_trees_all_close(theta, ref_theta, rtol=1e-5, atol=1e-7)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), theta, params)
  assert min(jax.tree.leaves(moved)) > 1e-3


def test_layerwise_lr_decay_schedule_and_jit():
  decay = lambda count: 0.5 + 0.25 * count  # 0.5, 0.75, 1.0
  tx = gradtx.layerwise_lr_decay(decay, num_layers=1,
                                 depth_rules={"embed": 0, "block": 1, "head": 2})
  grads = {"embed": jnp.array([1.0]), "block": jnp.array([1.0]), "head": jnp.array([1.0])}
  traces = []
  update = jax.jit(lambda u, s: (traces.append(None), tx.update(u, s))[1])
  state = tx.init(grads)
  for d in [0.5, 0.75, 1.0]:
    updates, state = update(grads, state)
    np.testing.assert_allclose(updates["embed"], [d**2], rtol=1e-6)
    np.testing.assert_allclose(updates["block"], [d], rtol=1e-6)
    np.testing.assert_array_equal(updates["head"], [1.0])
  assert len(traces) == 1


def test_layerwise_lr_decay_keeps_bf16():
  grads = {"embed": jnp.array([1.0, 2.0], jnp.bfloat16), "head": jnp.array([3.0], jnp.bfloat16)}
  tx = gradtx.layerwise_lr_decay(0.5, num_layers=2, depth_rules={"embed": 0, "head": 3})
  updates, _ = tx.update(grads, tx.init(grads))
  assert updates["embed"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(updates["embed"], np.float32), [0.125, 0.25])


def test_layerwise_lr_decay_bad_arguments():
  with pytest.raises(ValueError, match=r"decay must be a finite number > 0, got 0"):
    gradtx.layerwise_lr_decay(0.0, num_layers=2, depth_rules={"a": 0})
  with pytest.raises(ValueError, match=r"num_layers must be an int >= 0"):
    gradtx.layerwise_lr_decay(0.5, num_layers=-2, depth_rules={"a": 0})
  with pytest.raises(TypeError, match=r"depth_rules must be an ordered mapping"):
    gradtx.layerwise_lr_decay(0.5, num_layers=2, depth_rules="a")
  tx = gradtx.layerwise_lr_decay(0.5, num_layers=2, depth_rules={"a": 0})
  with pytest.raises(ValueError, match=r"'b'.*`default_depth=`"):
    tx.init({"a": jnp.ones(1), "b": jnp.ones(1)})
  tx = gradtx.layerwise_lr_decay(0.5, num_layers=2, depth_rules={"a": 5})
  with pytest.raises(ValueError, match=r"depth of 'a'.*got 5"):
    tx.init({"a": jnp.ones(1)})


def test_layerwise_lr_decay_without_a_head_at_num_layers_plus_one_is_refused():
  # #13: num_layers=3 with conv1, conv2, head at depths 0, 1, 2 trained the head at
  # decay**2 without a word. Now init refuses, saying what num_layers means.
  params = {"conv1": jnp.ones(2), "conv2": jnp.ones(2), "head": jnp.ones(2)}
  rules = {"conv1": 0, "conv2": 1, "head": 2}
  tx = gradtx.layerwise_lr_decay(0.5, num_layers=3, depth_rules=rules)
  with pytest.raises(ValueError) as err:
    tx.init(params)
  msg = str(err.value)
  assert "num_layers=3" in msg and "depth num_layers + 1 = 4" in msg
  assert "deepest leaves are at depth 2 ('head')" in msg
  assert "number of blocks between the embeddings (depth 0) and the head" in msg
  assert "pass num_layers=1" in msg
  # The fix the message gives: the head at num_layers + 1 trains at the full rate.
  tx = gradtx.layerwise_lr_decay(0.5, num_layers=1, depth_rules=rules)
  updates, _ = tx.update(params, tx.init(params))
  chex.assert_trees_all_close(updates, {"conv1": np.full(2, 0.25), "conv2": np.full(2, 0.5),
                                        "head": np.ones(2)})


def test_layerwise_lr_decay_with_the_head_masked_out_is_allowed():
  # The head trained by another transformation: the body alone has no depth L + 1.
  params = {"embed": jnp.ones(1), "block": jnp.ones(1), "head": jnp.ones(1)}
  body = gradtx.layerwise_lr_decay(0.5, num_layers=1, depth_rules={"embed": 0, "block": 1})
  for tx, head in ((optax.masked(body, {"embed": True, "block": True, "head": False}), 1.0),
                   (gradtx.by_path({"head": optax.scale(3.0)}, default=body), 3.0)):
    updates, _ = tx.update(params, tx.init(params))
    expected = {"embed": np.array([0.25]), "block": np.array([0.5]), "head": np.array([head])}
    chex.assert_trees_all_close(updates, expected)


def test_depth_rule_without_slash_wildcard_gets_the_fullmatch_hint():
  params = {"embed": {"table": jnp.ones(2)}, "head": {"w": jnp.ones(2), "b": jnp.ones(1)}}
  tx = gradtx.layerwise_lr_decay(0.5, num_layers=0, depth_rules={"embed": 0, "head": 1})
  with pytest.raises(ValueError, match=r"3 leaf path\(s\) match no rule.*re\.fullmatch.*"
                                       r"write 'layer_0/\.\*'.*tree_paths"):
    tx.init(params)


# ----------------------------------------------------------------------------- by_path

def _by_path_params():
  return {
      "body": {"w1": jnp.array([1.0, 2.0]), "w2": jnp.array([[0.5, -0.5]])},
      "frozen": {"w": jnp.array([1.0, 1.0, 1.0])},
      "head": {"w": jnp.array([0.3, -0.3])},
  }


_BY_PATH_GRADS = [
    {"body": {"w1": jnp.array([3.0, 0.0]), "w2": jnp.array([[0.0, 4.0]])},    # norm 5: clipped
     "frozen": {"w": jnp.array([7.0, 7.0, 7.0])},
     "head": {"w": jnp.array([1.0, -2.0])}},
    {"body": {"w1": jnp.array([0.3, 0.0]), "w2": jnp.array([[0.0, -0.4]])},   # norm .5: kept
     "frozen": {"w": jnp.array([-1.0, 2.0, 0.0])},
     "head": {"w": jnp.array([0.5, 0.5])}},
    {"body": {"w1": jnp.array([-6.0, 8.0]), "w2": jnp.array([[0.0, 0.0]])},   # norm 10
     "frozen": {"w": jnp.array([0.0, 0.0, 9.0])},
     "head": {"w": jnp.array([-3.0, 0.1])}},
]


def test_by_path_applies_each_transformation_to_its_own_group():
  tx = gradtx.by_path({
      r"body/.*": gradtx.clip_by_global_norm(1.0),
      r"frozen/.*": optax.set_to_zero(),
      r"head/.*": optax.adam(0.1),
  })
  params = _by_path_params()
  state = tx.init(params)
  head_ref = optax.adam(0.1)  # reference: Adam on the head sub-tree alone
  head_ref_state = head_ref.init(params["head"])
  for grads in _BY_PATH_GRADS:
    updates, state = jax.jit(tx.update)(grads, state, params)
    # Body: clipped by the norm of the body leaves only (numpy, by hand).
    body = [np.asarray(grads["body"]["w1"]), np.asarray(grads["body"]["w2"])]
    body_norm = np.sqrt(sum(np.sum(g**2) for g in body))
    scale = min(1.0, 1.0 / body_norm)
    np.testing.assert_allclose(updates["body"]["w1"], body[0] * scale, rtol=1e-6)
    np.testing.assert_allclose(updates["body"]["w2"], body[1] * scale, rtol=1e-6)
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "grad_norm"), body_norm,
                               rtol=1e-6)
    # Frozen: zero.
    np.testing.assert_array_equal(updates["frozen"]["w"], np.zeros(3))
    # Head: exactly Adam on the head sub-tree.
    head_updates, head_ref_state = head_ref.update(grads["head"], head_ref_state, params["head"])
    np.testing.assert_allclose(updates["head"]["w"], head_updates["w"], rtol=1e-6)
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["frozen"]["w"], np.ones(3))
  # Adam's state saw only the head: its moments are the reference's.
  adam_mu = optax.tree_utils.tree_get(state, "mu")
  np.testing.assert_allclose(adam_mu["head"]["w"], head_ref_state[0].mu["w"], rtol=1e-6)
  assert isinstance(adam_mu["body"]["w1"], optax.MaskedNode)
  adam_nu = optax.tree_utils.tree_get(state, "nu")
  np.testing.assert_allclose(adam_nu["head"]["w"], head_ref_state[0].nu["w"], rtol=1e-6)


def test_by_path_same_transformation_object_in_two_rules_keeps_two_states():
  adam = optax.adam(0.1)
  tx = gradtx.by_path({"a": adam, "b": adam})
  params = {"a": jnp.array([0.0]), "b": jnp.array([0.0])}
  ref = optax.adam(0.1)
  state, ref_a, ref_b = tx.init(params), ref.init(params["a"]), ref.init(params["b"])
  for ga, gb in [(1.0, -5.0), (2.0, 0.1), (-1.0, 3.0)]:
    grads = {"a": jnp.array([ga]), "b": jnp.array([gb])}
    updates, state = tx.update(grads, state, params)
    ua, ref_a = ref.update(grads["a"], ref_a)
    ub, ref_b = ref.update(grads["b"], ref_b)
    np.testing.assert_allclose(updates["a"], ua, rtol=1e-6)
    np.testing.assert_allclose(updates["b"], ub, rtol=1e-6)


def test_by_path_default_and_unmatched():
  params = _by_path_params()
  with pytest.raises(ValueError, match=r"2 leaf path\(s\) match no rule.*'body/w1'"):
    gradtx.by_path({r"frozen/.*": optax.set_to_zero(), r"head/.*": optax.sgd(1.0)}).init(params)
  tx = gradtx.by_path({r"frozen/.*": optax.set_to_zero()}, default=optax.sgd(1.0))
  grads = _BY_PATH_GRADS[0]
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["frozen"]["w"], np.zeros(3))
  np.testing.assert_array_equal(updates["body"]["w1"], -grads["body"]["w1"])
  np.testing.assert_array_equal(updates["head"]["w"], -grads["head"]["w"])


def test_by_path_rule_matching_nothing_is_named():
  with pytest.raises(ValueError, match=r"rule 'haed/\.\*' matches no leaf path"):
    gradtx.by_path({r"haed/.*": optax.sgd(1.0)}, default=optax.identity()).init(
        _by_path_params())


def test_by_path_non_transformation_values_are_type_errors():
  with pytest.raises(TypeError, match=r"value for 'head/\.\*' must be an optax.Gradient"):
    gradtx.by_path({r"head/.*": 0.1})
  with pytest.raises(TypeError, match=r"value for 'head' must be an optax.*factory sgd"):
    gradtx.by_path({"head": optax.sgd})  # the factory, not the transformation
  with pytest.raises(TypeError, match=r"default must be an optax.GradientTransformation"):
    gradtx.by_path({"head": optax.sgd(1.0)}, default="sgd")


def test_by_path_passes_extra_args_to_inner_transformations():
  def scale_by_extra():
    def update(updates, state, params=None, *, loss_scale, **extra):
      del params, extra
      return jax.tree.map(lambda u: u * loss_scale, updates), state
    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)

  tx = gradtx.by_path({"a": scale_by_extra()}, default=optax.identity())
  grads = {"a": jnp.array([2.0]), "b": jnp.array([2.0])}
  updates, _ = tx.update(grads, tx.init(grads), loss_scale=3.0)
  assert updates == {"a": 6.0, "b": 2.0}


# ----------------------------------------------------------------------------- Su's proof
#
# θ = λφ with a fixed λ per layer. SGD on φ with loss L(λφ) moves θ = λφ exactly as SGD
# on θ whose update is scaled by λ²; Adam on φ moves θ as Adam on θ scaled by λ (the
# normalisation cancels one λ; eps is the only difference: eps on φ is eps/λ on θ, so
# both use eps = 1e-12). Checked step for step for 20 steps on a real Flax linen MLP and
# real digits (4 batches of 64 in turn), in float32. Tolerance: rtol = 1e-5, atol = 1e-6
# (atol for entries near 0; the weights are O(0.1-1) and move by up to ~0.6). Measured:
# max |θ_t - λφ_t| over all steps and entries is ~2e-7 (SGD) and ~4e-7 (Adam), i.e.
# float32 round-off; the largest excess over 1e-5·|λφ_t| is ~1e-8 (SGD), ~5e-8 (Adam).
# As a control, the wrong power of λ (λ for SGD, λ² for Adam) misses by 0.5-1.3.

_LAMBDA = {"Dense_0": 3.0, "Dense_1": 0.5}
_STEPS = 20


class _DigitsMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(16)(x)))


@pytest.fixture(scope="module")
def digits_problem():
  images, labels = load_digits(return_X_y=True)
  xs = jnp.asarray(images[:256] / 16.0, jnp.float32).reshape(4, 64, 64)  # 4 batches of 64
  ys = jnp.asarray(labels[:256]).reshape(4, 64)
  model = _DigitsMLP()
  theta0 = jax.jit(model.init)(jax.random.key(0), xs[0])
  lam = {"params": {layer: {"bias": lam_l, "kernel": lam_l} for layer, lam_l in _LAMBDA.items()}}

  def loss(theta, x, y):
    logits = model.apply(theta, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return xs, ys, theta0, lam, loss


def _trajectories(problem, tx_theta, tx_phi):
  """θ_t under ``tx_theta`` and λ φ_t under ``tx_phi`` (on φ), for t = 1..20."""
  xs, ys, theta0, lam, loss = problem
  times_lam = lambda tree: jax.tree.map(lambda s, p: s * p, lam, tree)
  phi0 = jax.tree.map(lambda s, t: t / s, lam, theta0)
  loss_phi = lambda phi, x, y: loss(times_lam(phi), x, y)

  @jax.jit
  def run():
    def body(carry, t):
      theta, state, phi, phi_state = carry
      x, y = xs[t % 4], ys[t % 4]  # the 4 batches in turn
      updates, state = tx_theta.update(jax.grad(loss)(theta, x, y), state, theta)
      theta = optax.apply_updates(theta, updates)
      phi_updates, phi_state = tx_phi.update(jax.grad(loss_phi)(phi, x, y), phi_state, phi)
      phi = optax.apply_updates(phi, phi_updates)
      return (theta, state, phi, phi_state), (theta, times_lam(phi))

    carry = (theta0, tx_theta.init(theta0), phi0, tx_phi.init(phi0))
    return jax.lax.scan(body, carry, jnp.arange(_STEPS))[1]

  thetas, lam_phis = run()
  return theta0, thetas, lam_phis


def _worst_relative_gap(a_tree, b_tree):
  gaps = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b) / (jnp.abs(b) + 1e-3))),
                      a_tree, b_tree)
  return max(jax.tree.leaves(gaps))


def _assert_same_trajectory(theta0, thetas, lam_phis):
  for leaf0, a, b in zip(jax.tree.leaves(theta0), jax.tree.leaves(thetas),
                         jax.tree.leaves(lam_phis), strict=True):
    assert a.shape == (_STEPS, *leaf0.shape)
    for t in range(_STEPS):
      np.testing.assert_allclose(a[t], b[t], rtol=1e-5, atol=1e-6, err_msg=f"step {t + 1}")
    # The trajectory really went somewhere (so agreement is not trivial).
    assert float(jnp.max(jnp.abs(a[-1] - leaf0))) > 1e-2


def _lambda_rules(power):
  return {rf"params/{layer}/.*": lam_l**power for layer, lam_l in _LAMBDA.items()}


def test_su_sgd_on_phi_is_sgd_on_theta_with_lambda_squared(digits_problem):
  lr = 0.1
  plain_sgd = optax.GradientTransformation(  # φ ← φ - η ∇_φ L(λφ), written out
      lambda params: (), lambda grads, state, params=None: (
          jax.tree.map(lambda g: -lr * g, grads), state))
  tx = optax.chain(optax.sgd(lr), gradtx.scale_by_path(_lambda_rules(2), default=None))
  _assert_same_trajectory(*_trajectories(digits_problem, tx, plain_sgd))
  # Control: λ instead of λ² follows a different path.
  tx = optax.chain(optax.sgd(lr), gradtx.scale_by_path(_lambda_rules(1), default=None))
  _, thetas, lam_phis = _trajectories(digits_problem, tx, plain_sgd)
  assert _worst_relative_gap(thetas, lam_phis) > 1e-2


def test_su_adam_on_phi_is_adam_on_theta_with_lambda(digits_problem):
  lr, eps = 0.01, 1e-12
  adam_phi = optax.adam(lr, eps=eps)
  tx = optax.chain(optax.adam(lr, eps=eps), gradtx.scale_by_path(_lambda_rules(1), default=None))
  _assert_same_trajectory(*_trajectories(digits_problem, tx, adam_phi))
  # Control: λ² (right for SGD) is wrong for Adam.
  tx = optax.chain(optax.adam(lr, eps=eps), gradtx.scale_by_path(_lambda_rules(2), default=None))
  _, thetas, lam_phis = _trajectories(digits_problem, tx, adam_phi)
  assert _worst_relative_gap(thetas, lam_phis) > 1e-2


# --------------------------------------------------------------------------------------
# NaN/inf gradients: the multipliers are plain products, so a fault stays in its leaf and
# shows in the update; the state (a step count) is never touched by it.


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: gradtx.scale_by_path({"a": 2.0}, default=0.5),
        lambda: gradtx.layerwise_lr_decay(0.5, num_layers=0, depth_rules={"a": 0, "b": 1}),
    ],
    ids=["scale_by_path", "layerwise_lr_decay"],
)
def test_nonfinite_gradient_propagates_in_its_leaf_only(make_tx, bad):
  tx = make_tx()
  grads = {"a": jnp.array([1.0, bad]), "b": jnp.array([4.0])}
  updates, state = tx.update(grads, tx.init(grads))
  a = np.asarray(updates["a"])
  assert np.isfinite(a[0]) and not np.isfinite(a[1])
  assert np.isfinite(np.asarray(updates["b"])).all()
  assert int(state.count) == 1


def test_layerwise_lr_decay_default_depth_injected_as_a_hyperparameter():
  """``optax.inject_hyperparams`` turns an int ``default_depth`` into a traced array."""
  p = {"embed": jnp.ones(1), "layer": jnp.ones(1), "head": jnp.ones(1)}
  tx = optax.inject_hyperparams(gradtx.layerwise_lr_decay)(
      decay=0.5, num_layers=1, depth_rules={"layer": 1, "head": 2}, default_depth=0)
  updates, _ = jax.jit(tx.update)(p, tx.init(p))
  chex.assert_trees_all_close(updates, {"embed": np.array([0.25]), "layer": np.array([0.5]),
                                        "head": np.array([1.0])})
