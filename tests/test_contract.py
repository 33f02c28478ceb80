"""The contract every public gradtx transformation satisfies (DESIGN.md, "Conventions").

``TRANSFORMATIONS`` lists every public transformation with a valid configuration, one
line each; every check below runs over all of them. Adding a transformation to gradtx
means adding its line here (``test_every_public_transformation_is_listed`` enforces it).

Checks, per entry: ``optax.chain`` with sgd/adam; a second jitted step does not
recompile; ``optax.inject_hyperparams`` gives the plain factory's updates;
``optax.MultiSteps`` only moves the params every k-th step, by the mean gradient;
``optax.masked`` and ``optax.partition`` (MaskedNode leaves); bf16/f32/f64 params keep
their dtype and the state keeps its dtypes; an empty pytree; ``None`` leaves; unknown
extra keyword arguments are ignored; 50 ``lax.scan`` steps converge on a quadratic; the
state round-trips through ``flax.serialization`` and the run continues bit-identically;
params sharded over 4 CPU devices give the unsharded updates (one subprocess,
``tests/_sharded_contract.py``); logged state fields are readable with
``optax.tree_utils.tree_get``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradtx

# --------------------------------------------------------------------------------------
# The list.

# The test params: rules in TRANSFORMATIONS are written for these paths. Leading dims are
# divisible by 4 (the sharded check splits them over 4 devices).
SHAPES = {"w1": (8, 3), "w2": (4, 5), "b": (8,)}
ALWAYS_KEPT = ("w1",)  # what the masked/partition checks keep besides an entry's ``needs``


@dataclasses.dataclass(frozen=True)
class Entry:
  """One public transformation, configured.

  Attributes:
    name: the pytest id.
    factory: the public factory, e.g. ``gradtx.clip_by_global_norm``.
    kwargs: a valid configuration (keyword arguments of ``factory``).
    static_args: arguments ``optax.inject_hyperparams`` must pass through unchanged
      (shapes, structural ints).
    fields: state fields a user logs, read with ``optax.tree_utils.tree_get``.
    needs: params paths (keys of ``SHAPES``) the entry's rules must see; the masked
      and partition checks never mask them out.
    trains: for a transformation that by design never moves some coordinates (a fixed
      mask), ``{path: bool array}`` of those it moves; convergence is measured on them.
  """

  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  static_args: tuple[str, ...] = ()
  fields: tuple[str, ...] = ()
  needs: tuple[str, ...] = ()
  trains: dict[str, Any] | None = None

  def make(self) -> optax.GradientTransformation:
    return self.factory(**self.kwargs)

  def make_injected(self) -> optax.GradientTransformationExtraArgs:
    return optax.inject_hyperparams(self.factory, static_args=self.static_args)(**self.kwargs)


_CLIP = ("grad_norm", "clip_scale")
_SCHEDULE = optax.linear_schedule(2.0, 0.5, transition_steps=20)
_FIXED_MASK = {k: np.arange(np.prod(s)).reshape(s) % 3 != 1 for k, s in SHAPES.items()}

TRANSFORMATIONS = (
    Entry("clip_by_global_norm-hard", gradtx.clip_by_global_norm, dict(max_norm=1.0),
          fields=_CLIP),
    Entry("clip_by_global_norm-soft", gradtx.clip_by_global_norm,
          dict(max_norm=1.0, mode="soft"), fields=_CLIP),
    Entry("clip_by_global_norm-schedule", gradtx.clip_by_global_norm,
          dict(max_norm=_SCHEDULE), fields=_CLIP),
    Entry("clip_by_leaf_norm-hard", gradtx.clip_by_leaf_norm, dict(max_norm=1.0), fields=_CLIP),
    Entry("clip_by_leaf_norm-soft", gradtx.clip_by_leaf_norm, dict(max_norm=1.0, mode="soft"),
          fields=_CLIP),
    Entry("auto_clip", gradtx.auto_clip, dict(percentile=10.0, history=8),
          static_args=("history",), fields=(*_CLIP, "max_norm")),
    Entry("zscore_clip", gradtx.zscore_clip, dict(warmup_steps=2), fields=(*_CLIP, "z_score")),
    Entry("scale_by_path", gradtx.scale_by_path,
          dict(rules={"w1": 0.5, "w.*": _SCHEDULE}, default=1.0), needs=("w2",)),
    Entry("layerwise_lr_decay", gradtx.layerwise_lr_decay,
          dict(decay=0.5, num_layers=2, depth_rules={r"w(\d)": 0, "b": 3}), needs=("b",)),
    Entry("by_path", gradtx.by_path,
          dict(rules={"w.*": gradtx.clip_by_global_norm(1.0)}, default=optax.identity())),
    Entry("child_tuning_f", gradtx.child_tuning_f, dict(reserve_p=0.5, key=jax.random.key(0)),
          static_args=("key",), fields=("mask_density",)),
    Entry("child_tuning_f-jax-prng-schedule", gradtx.child_tuning_f,
          dict(reserve_p=optax.linear_schedule(0.9, 0.5, 10), key=jax.random.key(1),
               rescale=False, prng="jax"), static_args=("key",), fields=("mask_density",)),
    Entry("child_tuning_d", gradtx.child_tuning_d, dict(mask=_FIXED_MASK),
          fields=("mask_density",), trains=_FIXED_MASK),
)

each_entry = pytest.mark.parametrize("entry", TRANSFORMATIONS, ids=lambda e: e.name)

# --------------------------------------------------------------------------------------
# Shared fixtures: a quadratic whose gradient norm (~10) is well above the clip
# thresholds, so clipping is active.

LR = 0.5


def random_arrays(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
  """Fixed random float32 arrays (numpy's generator: no PRNG ops in the compiled steps)."""
  rng = np.random.default_rng(seed)
  return {name: (scale * rng.standard_normal(shape)).astype(np.float32)
          for name, shape in SHAPES.items()}


def random_tree(seed: int, dtype: Any = jnp.float32, scale: float = 1.0) -> dict[str, Any]:
  return {name: jnp.asarray(x, dtype) for name, x in random_arrays(seed, scale).items()}


def params_tree(dtype: Any = jnp.float32) -> dict[str, Any]:
  return random_tree(0, dtype)


_TARGET = random_arrays(1, scale=1.5)


def loss(params: Any) -> jax.Array:
  return sum(0.5 * jnp.sum(jnp.square(params[k].astype(jnp.float32) - _TARGET[k]))
             for k in SHAPES)


def make_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
  """``(params, state) -> (params, state, updates)`` on the quadratic's gradient."""

  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  return step


def assert_trees_close(actual: Any, desired: Any, rtol: float = 1e-6, atol: float = 0.0,
                       msg: str = "") -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(desired), msg
  for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
    assert jnp.shape(a) == jnp.shape(d) and jnp.result_type(a) == jnp.result_type(d), msg
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(d, np.float64),
                               rtol=rtol, atol=atol, err_msg=msg)


def assert_trees_equal(actual: Any, desired: Any, msg: str = "") -> None:
  assert jax.tree.structure(actual) == jax.tree.structure(desired), msg
  for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
    assert jnp.shape(a) == jnp.shape(d) and jnp.result_type(a) == jnp.result_type(d), msg
    np.testing.assert_array_equal(np.asarray(a), np.asarray(d), err_msg=msg)


def shapes_and_dtypes(tree: Any) -> Any:
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def all_finite(tree: Any) -> bool:
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def kept_paths(entry: Entry) -> tuple[str, ...]:
  kept = tuple(k for k in SHAPES if k in ALWAYS_KEPT or k in entry.needs)
  assert len(kept) < len(SHAPES), f"{entry.name}: `needs` leaves nothing to mask out"
  return kept


# --------------------------------------------------------------------------------------
# The list is complete.


def _returns_transformation(obj: Any) -> bool:
  if not inspect.isfunction(obj):
    return False
  return "GradientTransformation" in str(inspect.signature(obj).return_annotation)


def test_every_public_transformation_is_listed():
  public = {name for name in gradtx.__all__ if _returns_transformation(getattr(gradtx, name))}
  listed = {entry.factory.__name__ for entry in TRANSFORMATIONS}
  assert public, "found no public transformation factories"
  assert public <= listed, f"add to TRANSFORMATIONS: {sorted(public - listed)}"
  assert len({e.name for e in TRANSFORMATIONS}) == len(TRANSFORMATIONS), "duplicate names"


# --------------------------------------------------------------------------------------
# The checks.


@each_entry
def test_chain(entry):
  params = params_tree()
  grads = jax.grad(loss)(params)
  plain = entry.make()
  plain_updates, _ = plain.update(grads, plain.init(params), params)  # eager, unchained
  for opt, name in ((optax.sgd(LR), "sgd"), (optax.adam(0.1), "adam")):
    tx = optax.chain(entry.make(), opt)
    step = jax.jit(make_step(tx))
    state = tx.init(params)
    p = params
    for i in range(2):
      p, state, updates = step(p, state)
      assert shapes_and_dtypes(updates) == shapes_and_dtypes(params), name
      assert all_finite(updates) and all_finite(state), name
      if name == "sgd" and i == 0:
        expected = jax.tree.map(lambda u: -LR * u, plain_updates)
        assert_trees_close(updates, expected, atol=1e-7, msg=name)


@each_entry
def test_second_jitted_step_does_not_recompile(entry):
  for tx, name in ((entry.make(), "plain"), (entry.make_injected(), "inject_hyperparams")):
    tx = optax.chain(tx, optax.sgd(LR))
    traces = []

    @jax.jit
    def step(params, state, tx=tx, traces=traces):
      traces.append(None)  # runs once per trace
      return make_step(tx)(params, state)

    params = params_tree()
    state = tx.init(params)
    for _ in range(3):
      params, state, _ = step(params, state)
    assert len(traces) == 1, f"{name}: traced {len(traces)} times in 3 steps"
    assert step._cache_size() == 1, name


@each_entry
def test_inject_hyperparams_matches_plain_factory(entry):
  plain, injected = entry.make(), entry.make_injected()
  params = params_tree()
  plain_step, injected_step = jax.jit(make_step(plain)), jax.jit(make_step(injected))
  p_plain, s_plain = params, plain.init(params)
  p_inj, s_inj = params, injected.init(params)
  assert_trees_close(s_inj.inner_state, s_plain, msg="init state")
  for i in range(3):
    p_plain, s_plain, u_plain = plain_step(p_plain, s_plain)
    p_inj, s_inj, u_inj = injected_step(p_inj, s_inj)
    assert_trees_close(u_inj, u_plain, msg=f"updates, step {i}")
    assert_trees_close(s_inj.inner_state, s_plain, msg=f"state, step {i}")


@each_entry
def test_multi_steps(entry):
  every_k = 2
  inner = optax.chain(entry.make(), optax.sgd(LR))
  tx = optax.MultiSteps(inner, every_k_schedule=every_k)
  params = params_tree()
  grads = [random_tree(10 + i, scale=3.0) for i in range(2 * every_k)]
  update = jax.jit(tx.update)
  state = tx.init(params)
  ref_state = inner.init(params)
  for i, g in enumerate(grads):
    updates, state = update(g, state, params)
    assert shapes_and_dtypes(updates) == shapes_and_dtypes(params)
    if (i + 1) % every_k:
      assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates)), (
          f"params moved on mini-step {i}")
      assert not bool(tx.has_updated(state))
    else:
      mean = jax.tree.map(lambda *gs: sum(gs) / every_k, *grads[i + 1 - every_k:i + 1])
      expected, ref_state = inner.update(mean, ref_state, params)  # eager reference
      assert_trees_close(updates, expected, rtol=1e-5, atol=1e-6, msg=f"step {i}")
      assert any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates)), f"step {i}"
      assert bool(tx.has_updated(state))
    params = optax.apply_updates(params, updates)


@each_entry
@pytest.mark.parametrize("wrapper", ["masked", "partition"])
def test_masked_and_partition(entry, wrapper):
  kept = kept_paths(entry)
  params = params_tree()
  if wrapper == "masked":
    tx = optax.masked(entry.make(), {k: k in kept for k in SHAPES})
  else:
    labels = {k: "entry" if k in kept else "frozen" for k in SHAPES}
    tx = optax.partition({"entry": entry.make(), "frozen": optax.set_to_zero()}, labels)
  # Reference: the transformation on the kept leaves alone (eager).
  ref = entry.make()
  sub = lambda tree: {k: tree[k] for k in kept}
  update = jax.jit(tx.update)
  state, ref_state = tx.init(params), ref.init(sub(params))
  for i in range(2):
    grads = random_tree(20 + i, scale=3.0)
    updates, state = update(grads, state, params)
    expected, ref_state = ref.update(sub(grads), ref_state, sub(params))
    assert_trees_close(sub(updates), expected, atol=1e-7, msg=f"kept leaves, step {i}")
    for k in SHAPES:
      if k not in kept:
        other = grads[k] if wrapper == "masked" else jnp.zeros_like(grads[k])
        np.testing.assert_array_equal(updates[k], other, err_msg=f"masked-out {k}, step {i}")
    params = optax.apply_updates(params, updates)


@each_entry
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_updates_keep_params_dtype(entry, dtype):
  with jax.enable_x64(dtype == "float64"):
    dtype = jnp.dtype(dtype)
    params = params_tree(dtype)
    assert all(x.dtype == dtype for x in jax.tree.leaves(params))
    tx = entry.make()
    step = jax.jit(make_step(tx))
    state = tx.init(params)
    init_layout = shapes_and_dtypes(state)
    for i in range(2):
      params, state, updates = step(params, state)
      assert shapes_and_dtypes(updates) == shapes_and_dtypes(params), f"step {i}"
      assert shapes_and_dtypes(state) == init_layout, f"state layout, step {i}"
      assert all_finite(updates), f"step {i}"


@each_entry
def test_empty_pytree(entry):
  for tx in (entry.make(), optax.chain(entry.make(), optax.sgd(LR))):
    state = tx.init({})
    update = jax.jit(tx.update)
    for _ in range(2):
      updates, state = update({}, state, {})
      assert updates == {}
    assert all_finite(state)


@each_entry
def test_none_leaves(entry):
  tx = entry.make()
  params = params_tree()
  with_none = {**params, "unused": None}
  update = jax.jit(tx.update)
  state, ref_state = tx.init(with_none), tx.init(params)
  for i in range(2):
    grads = random_tree(30 + i, scale=3.0)
    updates, state = update({**grads, "unused": None}, state, with_none)
    expected, ref_state = tx.update(grads, ref_state, params)  # eager, no None leaf
    assert updates["unused"] is None
    assert_trees_close({k: v for k, v in updates.items() if k != "unused"}, expected,
                       atol=1e-7, msg=f"step {i}")


@each_entry
def test_unknown_extra_args_are_ignored(entry):
  tx = entry.make()
  if not isinstance(tx, optax.GradientTransformationExtraArgs):
    tx = optax.with_extra_args_support(tx)
  params = params_tree()
  grads = jax.grad(loss)(params)
  state = tx.init(params)
  expected, expected_state = tx.update(grads, state, params)
  updates, new_state = tx.update(grads, state, params, some_unknown_arg=1)
  assert_trees_equal(updates, expected)
  assert_trees_equal(new_state, expected_state)
  chained = optax.chain(entry.make(), optax.sgd(LR))
  jitted = jax.jit(lambda g, s, p: chained.update(g, s, p, some_unknown_arg=jnp.ones(3)))
  updates, _ = jitted(grads, chained.init(params), params)
  assert_trees_close(updates, jax.tree.map(lambda u: -LR * u, expected), atol=1e-7)


@each_entry
def test_converges_inside_scan(entry):
  tx = optax.chain(entry.make(), optax.sgd(LR))
  step = make_step(tx)

  @jax.jit
  def run(params):
    def body(carry, _):
      params, state = carry
      params, state, _ = step(params, state)
      return (params, state), loss(params)

    (params, state), losses = jax.lax.scan(body, (params, tx.init(params)), length=50)
    return params, state, losses

  params = params_tree()
  final_params, state, losses = run(params)
  assert all_finite(state) and all_finite(losses)
  if entry.trains is not None:  # measure on the coordinates the entry moves
    trained = lambda p: {k: jnp.where(entry.trains[k], p[k], _TARGET[k]) for k in SHAPES}  # noqa: E731
    losses = [loss(trained(params)), loss(trained(final_params))]
    frozen = {k: np.asarray(final_params[k])[~entry.trains[k]] for k in SHAPES}
    assert_trees_equal(frozen, {k: np.asarray(params[k])[~entry.trains[k]] for k in SHAPES})
  initial = float(loss(params)) if entry.trains is None else float(losses[0])
  assert float(losses[-1]) < 0.01 * initial, (initial, np.asarray(losses).tolist())


@each_entry
def test_state_round_trips_through_flax_serialization(entry):
  tx = optax.chain(entry.make(), optax.adam(0.1))
  step = jax.jit(make_step(tx))
  params = params_tree()
  template = tx.init(params)
  state = template
  for _ in range(2):
    params, state, _ = step(params, state)
  restored = flax.serialization.from_bytes(template, flax.serialization.to_bytes(state))
  assert_trees_equal(restored, state)
  params_a, state_a, params_b, state_b = params, state, params, restored
  for i in range(3):
    params_a, state_a, updates_a = step(params_a, state_a)
    params_b, state_b, updates_b = step(params_b, state_b)
    assert_trees_equal(updates_b, updates_a, msg=f"step {i} after restoring")
  assert_trees_equal(state_b, state_a)


@pytest.mark.parametrize("entry", [e for e in TRANSFORMATIONS if e.fields],
                         ids=lambda e: e.name)
def test_logged_fields_are_readable(entry):
  params = params_tree()
  grads = jax.grad(loss)(params)
  wrappers = {
      "alone": entry.make(),
      "chain": optax.chain(entry.make(), optax.adam(0.1)),
      "inject_hyperparams": entry.make_injected(),
  }
  ref_global = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                           for g in jax.tree.leaves(grads)))
  ref_per_leaf = {k: np.linalg.norm(np.asarray(g, np.float64).ravel()) for k, g in grads.items()}
  for name, tx in wrappers.items():
    _, state = tx.update(grads, tx.init(params), params)
    for field in entry.fields:
      value = optax.tree_utils.tree_get(state, field)
      assert value is not None, f"{name}: tree_get(state, {field!r}) found nothing"
      assert jax.tree.leaves(value) and all_finite(value), f"{name}: {field}={value}"
    norm = optax.tree_utils.tree_get(state, "grad_norm")
    if "grad_norm" in entry.fields and isinstance(norm, dict):
      for k, v in norm.items():
        np.testing.assert_allclose(v, ref_per_leaf[k], rtol=1e-5, err_msg=f"{name}: {k}")
    elif "grad_norm" in entry.fields:
      np.testing.assert_allclose(norm, ref_global, rtol=1e-5, err_msg=name)


# --------------------------------------------------------------------------------------
# Sharded params: XLA_FLAGS must be set before jax is imported, so every entry runs in
# one subprocess (``tests/_sharded_contract.py``), once per session.

SHARDED_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharded_contract.py")


@pytest.fixture(scope="module", autouse=True)
def _sharded_process(tmp_path_factory):
  """Starts the sharded run as the module starts, so that it overlaps the other checks."""
  folder = tmp_path_factory.mktemp("sharded_contract")
  with open(folder / "stdout", "w+") as out, open(folder / "stderr", "w+") as err:
    proc = subprocess.Popen([sys.executable, SHARDED_HELPER], stdout=out, stderr=err,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
      yield proc, out, err
    finally:
      if proc.poll() is None:  # the sharded checks were deselected, or timed out
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def sharded_results(_sharded_process):
  proc, out, err = _sharded_process
  try:
    proc.wait(timeout=600)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  out.seek(0)
  err.seek(0)
  stdout, stderr = out.read(), err.read()
  results = {}
  for line in stdout.splitlines():
    if line.startswith("{"):
      record = json.loads(line)
      results[record["name"]] = record
  return results, f"rc={proc.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"


@each_entry
def test_sharded_params_give_unsharded_updates(entry, sharded_results):
  results, log = sharded_results
  if entry.name not in results:
    pytest.fail(f"no result from {SHARDED_HELPER}: {log}")
  record = results[entry.name]
  assert record["ok"], record["error"]
