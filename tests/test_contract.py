"""The contract every public gradtx transformation satisfies (see CONTRIBUTING.md).

``TRANSFORMATIONS`` lists every public transformation with a valid configuration, one
line each; every check below runs over all of them. Adding a transformation to gradtx
means adding its line here (``test_every_public_transformation_is_listed`` enforces it).

Checks, per entry: ``optax.chain`` with sgd/adam; a second jitted step does not
recompile; ``optax.inject_hyperparams`` gives the plain factory's updates;
``optax.MultiSteps`` only moves the params every k-th step, by the mean gradient;
``optax.masked`` and ``optax.partition`` (MaskedNode leaves); bf16/f32/f64 params keep
their dtype and the state keeps its dtypes; an empty pytree; ``None`` leaves; unknown
extra keyword arguments are ignored; 50 ``lax.scan`` steps converge on the entry's
problem; the state round-trips through ``flax.serialization`` and the run continues
bit-identically; params sharded over 4 CPU devices give the unsharded updates (one
subprocess, ``tests/_sharded_contract.py``); logged state fields are readable with
``optax.tree_utils.tree_get``.

Most entries run on a quadratic of random normal params. An entry with a domain (positive
params, probability vectors, the non-positive gradient of a likelihood) names its
``problem``; an entry that returns the full update rather than a direction says so
(``full_update``), and an entry whose ``update`` needs runtime inputs passes them
(``update_kwargs``) wherever a check calls ``update``. A check an entry fails because of a
reported gradtx bug is listed in its ``known_failures`` and runs as a strict xfail.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import chex
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradtx

# --------------------------------------------------------------------------------------
# The problems the entries run on.

# The test params: rules in TRANSFORMATIONS are written for these paths. Leading dims are
# divisible by 4 (the sharded check splits them over 4 devices).
SHAPES = {"w1": (8, 3), "w2": (4, 5), "b": (8,)}
ALWAYS_KEPT = ("w1",)  # what the masked/partition checks keep besides an entry's ``needs``


def random_arrays(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
  """Fixed random float32 arrays (numpy's generator: no PRNG ops in the compiled steps)."""
  rng = np.random.default_rng(seed)
  return {name: (scale * rng.standard_normal(shape)).astype(np.float32)
          for name, shape in SHAPES.items()}


def random_tree(seed: int, dtype: Any = jnp.float32, scale: float = 1.0) -> dict[str, Any]:
  return {name: jnp.asarray(x, dtype) for name, x in random_arrays(seed, scale).items()}


def present(params: Any) -> list[tuple[str, Any]]:
  """The ``(path, array)`` pairs of the ``SHAPES`` leaves that ``params`` holds.

  A loss given to ``update`` as ``loss_fn`` sees what the transformation sees: under
  ``optax.masked``/``optax.partition`` ``MaskedNode()`` in place of the masked-out leaves,
  in the None-leaves check a ``None``, in the references of those checks a sub-dict.
  """
  return [(k, params[k]) for k in SHAPES if k in params and jax.tree.leaves(params[k])]


def _total(terms: Any) -> jax.Array:
  return sum(terms, jnp.zeros((), jnp.float32))


_TARGET = random_arrays(1, scale=1.5)


def loss(params: Any) -> jax.Array:
  """``½‖θ - t‖²`` over the leaves present."""
  return _total(0.5 * jnp.sum(jnp.square(x.astype(jnp.float32) - _TARGET[k]))
                for k, x in present(params))


_POSITIVE_TARGET = {k: np.abs(t) + np.float32(0.1) for k, t in _TARGET.items()}


def positive_loss(params: Any) -> jax.Array:
  """``½‖θ - t‖²`` with a positive target ``|t| + 0.1`` (for positive params)."""
  return _total(0.5 * jnp.sum(jnp.square(x.astype(jnp.float32) - _POSITIVE_TARGET[k]))
                for k, x in present(params))


# The axis each leaf's probability vectors lie along in the categorical problem; the
# entries that run on it spell these axes as path rules.
CATEGORICAL_AXES = {"w1": 0, "w2": 1, "b": 0}


def _distributions(seed: int) -> dict[str, np.ndarray]:
  """Random positive float32 leaves, each slice along its ``CATEGORICAL_AXES`` summing to 1.

  Not far from uniform (probabilities within a factor ~10 of each other), so that one EG
  step of the checks moves no coordinate by a factor below bfloat16's resolution.
  """
  return {k: (np.exp(x) / np.exp(x).sum(CATEGORICAL_AXES[k], keepdims=True)).astype(np.float32)
          for k, x in random_arrays(seed, scale=0.5).items()}


_COUNTS = _distributions(2)  # normalised counts q: the maximum-likelihood θ


def categorical_loss(params: Any) -> jax.Array:
  """``Σ q (log q - log θ)``: the categorical NLL of counts ``q`` minus its minimum.

  ``KL(q ‖ θ) >= 0`` on the simplex, 0 at ``θ = q``; its gradient ``-q/θ`` is the NLL's, so
  the normalised multiplicative (EM) update reaches ``q`` in one step.
  """
  return _total(jnp.sum(_COUNTS[k] * (np.log(_COUNTS[k]) - jnp.log(x.astype(jnp.float32))))
                for k, x in present(params))


@dataclasses.dataclass(frozen=True)
class Problem:
  """What the checks run an entry on.

  Attributes:
    name: for messages.
    initial: the float32 starting params, ``{path: array}`` shaped like ``SHAPES``.
    loss: ``params -> scalar`` with minimum 0, summing over the leaves ``present``; the
      steps of the checks follow its gradient and the scan check drives it below 1 %.
    grads: ``seed -> {path: array}``: gradients for the checks that feed fixed ones
      (MultiSteps, masked/partition, None leaves), signed as the loss's can be.
  """

  name: str
  initial: dict[str, np.ndarray]
  loss: Callable[[Any], jax.Array]
  grads: Callable[[int], dict[str, np.ndarray]]

  def params(self, dtype: Any = jnp.float32) -> dict[str, Any]:
    return {k: jnp.asarray(x, dtype) for k, x in self.initial.items()}

  def random_grads(self, seed: int) -> dict[str, Any]:
    return {k: jnp.asarray(x) for k, x in self.grads(seed).items()}


QUADRATIC = Problem("quadratic", random_arrays(0), loss,
                    lambda seed: random_arrays(seed, scale=3.0))
# Positive params, for multiplicative updates (EGU).
POSITIVE_QUADRATIC = Problem(
    "positive quadratic",
    {k: np.abs(x) + np.float32(0.1) for k, x in random_arrays(0).items()}, positive_loss,
    lambda seed: random_arrays(seed, scale=3.0))
# Probability vectors along CATEGORICAL_AXES and gradients <= 0 (a likelihood's), for the
# simplex EG and the normalised multiplicative (EM) update.
CATEGORICAL = Problem(
    "categorical NLL", _distributions(3), categorical_loss,
    lambda seed: {k: -(np.float32(0.1) + np.abs(x))
                  for k, x in random_arrays(seed, scale=3.0).items()})


def params_tree(dtype: Any = jnp.float32) -> dict[str, Any]:
  return QUADRATIC.params(dtype)


# --------------------------------------------------------------------------------------
# The list.

# Names of the checks, for ``Entry.known_failures``.
CHECKS = (
    "chain", "recompile/plain", "recompile/inject_hyperparams", "inject_hyperparams",
    "multi_steps", "masked", "partition", "dtype/bfloat16", "dtype/float32", "dtype/float64",
    "empty_pytree", "none_leaves", "unknown_extra_args", "scan", "serialization",
    "logged_fields/alone", "logged_fields/chain", "logged_fields/inject_hyperparams",
    "sharded",
)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One public transformation, configured.

  Attributes:
    name: the pytest id.
    factory: the public factory, e.g. ``gradtx.clip_by_global_norm``.
    kwargs: a valid configuration (keyword arguments of ``factory``).
    static_args: arguments ``optax.inject_hyperparams`` must pass through unchanged
      (shapes, structural ints, keys, base transformations).
    fields: state fields a user logs, read with ``optax.tree_utils.tree_get``.
    needs: params paths (keys of ``SHAPES``) the entry's rules must see; the masked
      and partition checks never mask them out.
    trains: for a transformation that by design never moves some coordinates (a fixed
      mask), ``{path: bool array}`` of those it moves; convergence is measured on them.
    rtol: relative tolerance of the update comparisons (eager vs jit, wrapped vs plain).
    atol: their absolute tolerance. An ES estimate divides differences of float32 losses
      by σ, so eager and jitted runs (which round the loss differently) differ by about
      ulp(loss)/σ in every coordinate, however small the coordinate.
    problem: the params, loss and gradients the checks use (default: the quadratic of
      random normal params); an entry with a domain gets a problem inside it.
    full_update: the entry returns the whole update (the negative step included, like
      ``optax.adam``, and it ends a chain) instead of a direction. The checks that finish
      a chain with ``optax.sgd(LR)`` (which would turn it into ascent) finish it with
      ``optax.scale(LR)``, and the Adam check feeds it Adam's direction
      (``chain(optax.scale_by_adam(), entry)``) instead of chaining ``optax.adam`` after it.
    update_kwargs: keyword arguments every ``update`` call of the checks passes (e.g. a
      ``loss_fn``), through ``chain``, ``inject_hyperparams``, ``MultiSteps``, ``masked``,
      ``partition`` and ``jit``.
    sharded_atol: the absolute tolerance of the sharded check (4 devices reduce in another
      order, so a global sum can differ in its last bit); an entry whose update is the
      difference of larger state values (EG±: ``Δ(θ⁺ - θ⁻)``) needs their ulp.
    known_failures: ``{check: reason}`` for checks (names in ``CHECKS``) the entry fails
      because of a reported gradtx bug; they run as ``xfail(strict=True)``, so a fix makes
      them fail until the line is removed.
    converged_fraction: the scan check asks the loss after 50 steps at the fixed ``LR`` to
      be below this fraction of the initial one; a method that by design stalls at a
      fixed step (sign descent moves every coordinate by ``LR``) says how far.
  """

  name: str
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  static_args: tuple[str, ...] = ()
  fields: tuple[str, ...] = ()
  needs: tuple[str, ...] = ()
  trains: dict[str, Any] | None = None
  rtol: float = 1e-6
  atol: float = 1e-7
  problem: Problem = QUADRATIC
  full_update: bool = False
  update_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  sharded_atol: float = 1e-7
  known_failures: Mapping[str, str] = dataclasses.field(default_factory=dict)
  converged_fraction: float = 0.01

  def __post_init__(self):
    unknown = set(self.known_failures) - set(CHECKS)
    assert not unknown, f"{self.name}: known_failures names unknown checks {sorted(unknown)}"

  def make(self) -> optax.GradientTransformation:
    return self.factory(**self.kwargs)

  def make_injected(self) -> optax.GradientTransformationExtraArgs:
    return optax.inject_hyperparams(self.factory, static_args=self.static_args)(**self.kwargs)


_CLIP = ("grad_norm", "clip_scale")
_SCHEDULE = optax.linear_schedule(2.0, 0.5, transition_steps=20)
_FIXED_MASK = {k: np.arange(np.prod(s)).reshape(s) % 3 != 1 for k, s in SHAPES.items()}
_STEP_SIZE = ("lr_scale", "gain_mean", "gain_min", "gain_max")


def gnb_logits(params: Any, x: jax.Array) -> jax.Array:
  """(batch, 3) logits from the params present (for the GNB entry)."""
  s = _total(jnp.mean(v.astype(jnp.float32)) for _, v in present(params))
  return x[:, None] * jnp.stack([s, -s, 0.5 * s])


GNB_INPUTS = jnp.linspace(-1.0, 1.0, 8)


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
    # Stacked (scanned) leaves: one norm/multiplier per slice of axis 0 (or -1). The logged
    # per-leaf grad_norm check does not apply to per-slice vectors (tests/test_scanned.py
    # checks them against numpy).
    Entry("clip_by_leaf_norm-stacked", gradtx.clip_by_leaf_norm,
          dict(max_norm=1.0, mode="soft", stacked={"w1": 0, "w2": -1}), needs=("w1", "w2")),
    Entry("scale_by_path-stacked", gradtx.scale_by_path,
          dict(rules={"w1": np.linspace(0.5, 2.0, 8, dtype=np.float32),
                      "w2": gradtx.per_slice(lambda i: _SCHEDULE if i % 2 else 0.25 * (i + 2))},
               stacked={"w1": 0, "w2": 1}), needs=("w1", "w2")),
    Entry("layerwise_lr_decay-stacked", gradtx.layerwise_lr_decay,
          dict(decay=0.9, num_layers=8, depth_rules={"w1": 1, "b": 9}, default_depth=0,
               stacked={"w1": 0}), needs=("w1", "b")),
    Entry("by_path", gradtx.by_path,
          dict(rules={"w.*": gradtx.clip_by_global_norm(1.0)}, default=optax.identity())),
    Entry("child_tuning_f", gradtx.child_tuning_f, dict(reserve_p=0.5, key=jax.random.key(0)),
          static_args=("key",), fields=("mask_density",)),
    Entry("child_tuning_f-jax-prng-schedule", gradtx.child_tuning_f,
          dict(reserve_p=optax.linear_schedule(0.9, 0.5, 10), key=jax.random.key(1),
               rescale=False, prng="jax"), static_args=("key",), fields=("mask_density",)),
    Entry("child_tuning_d", gradtx.child_tuning_d, dict(mask=_FIXED_MASK),
          fields=("mask_density",), trains=_FIXED_MASK),
    # `axis` is a structural int: inject_hyperparams would turn its default into an array.
    Entry("exponentiated_gradient-egu", gradtx.exponentiated_gradient,
          dict(learning_rate=0.5), static_args=("axis",), problem=POSITIVE_QUADRATIC,
          full_update=True),
    Entry("exponentiated_gradient-simplex-schedule", gradtx.exponentiated_gradient,
          dict(learning_rate=optax.linear_schedule(0.5, 0.3, 20), normalize="simplex",
               axis={"w2": 1, ".*": 0}), static_args=("axis",), needs=("w2",),
          problem=CATEGORICAL, full_update=True),
    # The update is θ⁺ − θ⁻ of values ~4 (cancellation): eager and jitted runs differ ~2e-5.
    Entry("eg_plus_minus", gradtx.eg_plus_minus, dict(learning_rate=0.2, total=200.0),
          full_update=True, sharded_atol=1e-6, rtol=5e-5),
    Entry("normalized_multiplicative", gradtx.normalized_multiplicative,
          dict(axis={"w2": -1, ".*": 0}), static_args=("axis",), needs=("w2",),
          problem=CATEGORICAL, full_update=True),
    Entry("eg_step_size-egdd-adam", gradtx.eg_step_size,
          dict(base=optax.scale_by_adam(), learning_rate=0.3), static_args=("base",),
          fields=_STEP_SIZE, full_update=True),
    Entry("eg_step_size-su-schedule", gradtx.eg_step_size,
          dict(base=optax.identity(), learning_rate=optax.linear_schedule(1.0, 0.5, 20),
               rule="su"), static_args=("base",), fields=_STEP_SIZE, full_update=True),
    Entry("hypergradient_descent-additive", gradtx.hypergradient_descent,
          dict(base=optax.identity(), learning_rate=0.5, hyper_lr=0.01, log_space=False),
          static_args=("base",), fields=("current_learning_rate",), full_update=True),
    Entry("hypergradient_descent-log-space-bounds", gradtx.hypergradient_descent,
          dict(base=optax.scale_by_adam(), learning_rate=0.3, hyper_lr=0.05,
               multiplicative=True, min_lr=0.01, max_lr=1.0), static_args=("base",),
          fields=("current_learning_rate",), full_update=True),
    Entry("hypergradient_descent-multiplicative-adam", gradtx.hypergradient_descent,
          dict(base=optax.scale_by_adam(), learning_rate=0.3, hyper_lr=0.1,
               multiplicative=True), static_args=("base",),
          fields=("current_learning_rate",), full_update=True),
    # Keys of a non-default PRNG (the state must carry the impl along); "unsafe_rbg" also
    # compiles the Hutchinson probes ~2x faster than threefry. The Hessian is I: exact.
    Entry("scale_by_diag_newton", gradtx.scale_by_diag_newton,
          dict(damping=1e-3, samples=2, key=jax.random.key(2, impl="unsafe_rbg")),
          static_args=("key", "samples"), fields=("curvature",),
          update_kwargs=dict(loss_fn=loss)),
    Entry("scale_by_diag_newton-every-ema-max", gradtx.scale_by_diag_newton,
          dict(damping=1e-3, every=3, ema=0.5, damping_mode="max",
               key=jax.random.key(5, impl="unsafe_rbg")),
          static_args=("key", "samples"), fields=("curvature",),
          update_kwargs=dict(loss_fn=loss)),
    # Sophia-G's curvature: Gauss-Newton-Bartlett from the logits of the present params.
    Entry("scale_by_diag_newton-gnb", gradtx.scale_by_diag_newton,
          dict(estimator="gnb", every=2, ema=0.9, damping=1.0, damping_mode="max",
               key=jax.random.key(6, impl="unsafe_rbg")),
          static_args=("key", "samples"), fields=("curvature",),
          update_kwargs=dict(logits_fn=gnb_logits, inputs=GNB_INPUTS)),
    Entry("diag_newton", gradtx.diag_newton,
          dict(learning_rate=1.0, damping=1e-3, key=jax.random.key(3, impl="unsafe_rbg")),
          static_args=("key", "samples"), fields=("curvature",), full_update=True,
          update_kwargs=dict(loss_fn=loss)),
    # Sophia-G: GNB from the logits of the present params (damping eps/gamma = 1 in max
    # mode, as for scale_by_diag_newton-gnb), refreshed every 2 steps (the checks see the
    # reuse), weight decay on the kernels only. Sophia-H shares the chain but its
    # estimator, checked above as scale_by_diag_newton.
    Entry("sophia-g", gradtx.sophia,
          dict(learning_rate=1.0, b1=0.5, b2=0.5, gamma=1.0, eps=1.0, every=2,
               weight_decay=1e-3, key=jax.random.key(7, impl="unsafe_rbg"),
               weight_decay_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
          static_args=("key", "samples", "weight_decay_mask"),
          fields=("curvature", "clip_fraction"), full_update=True,
          update_kwargs=dict(logits_fn=gnb_logits, inputs=GNB_INPUTS)),
    # Replaces the gradient by an antithetic ES estimate of ∇loss (exact in the mean; on a
    # quadratic the mirrored pairs cancel the curvature, so the noise shrinks with ‖g‖).
    Entry("zeroth_order-es", gradtx.zeroth_order,
          dict(estimator="es", key=jax.random.key(4), sigma=0.1, num_samples=128),
          static_args=("estimator", "key", "num_samples"),
          update_kwargs=dict(loss_fn=loss), rtol=1e-4, atol=2e-4, sharded_atol=2e-4),
    # ZO-SGD-Sign: the sign of an antithetic ES estimate. Every coordinate moves by the
    # learning rate, so at the fixed LR = 0.5 the quadratic stalls near LR: ~6% of its start.
    Entry("zeroth_order-sign", gradtx.zeroth_order,
          dict(estimator="sign", key=jax.random.key(8), sigma=0.1, num_samples=128),
          static_args=("estimator", "key", "num_samples"),
          update_kwargs=dict(loss_fn=loss), converged_fraction=0.1),
    # HiZOO: perturbations scaled by a running diagonal-Hessian estimate (in the state).
    Entry("zeroth_order-hizoo", gradtx.zeroth_order,
          dict(estimator="hizoo", key=jax.random.key(6), sigma=0.1, num_samples=64,
               alpha=0.01),
          static_args=("estimator", "key", "num_samples"), fields=("hessian_diag",),
          update_kwargs=dict(loss_fn=loss), rtol=2e-3, atol=1e-3, sharded_atol=1e-3),
    # LOZO: low-rank perturbations of matrix leaves (V kept for 2 steps), lean evaluation.
    Entry("zeroth_order-lozo", gradtx.zeroth_order,
          dict(estimator="es", key=jax.random.key(7), sigma=0.1, num_samples=1024, rank=3,
               resample_every=2, lean=True),
          static_args=("estimator", "key", "num_samples"),
          update_kwargs=dict(loss_fn=loss), rtol=1e-4, atol=2e-4, sharded_atol=2e-4),
    # The forward gradient <∇f, v> v (jax.jvp): no σ, so the default tolerances, but each
    # slope <∇f, v> sums over every coordinate (4 shards sum in another order).
    Entry("zeroth_order-forward", gradtx.zeroth_order,
          dict(estimator="forward", key=jax.random.key(5), num_directions=64),
          static_args=("estimator", "key", "num_directions"),
          update_kwargs=dict(loss_fn=loss), sharded_atol=1e-6),
)

each_entry = pytest.mark.parametrize("entry", TRANSFORMATIONS, ids=lambda e: e.name)

# --------------------------------------------------------------------------------------
# Shared helpers. The quadratic's gradient norm (~10) is well above the clip thresholds,
# so clipping is active.

LR = 0.5


def known_failure(request: pytest.FixtureRequest, entry: Entry, check: str) -> None:
  """Marks the running check a strict xfail when the entry lists it as a known failure."""
  assert check in CHECKS, check
  if check in entry.known_failures:
    request.applymarker(pytest.mark.xfail(reason=entry.known_failures[check], strict=True))


def finish(entry: Entry) -> optax.GradientTransformation:
  """What the checks chain after the entry to take a step of size ``LR``."""
  return optax.scale(LR) if entry.full_update else optax.sgd(LR)


def finish_sign(entry: Entry) -> float:
  """``chain(entry, finish(entry))`` gives ``finish_sign(entry) * LR`` times the entry's update."""
  return 1.0 if entry.full_update else -1.0


def with_adam(entry: Entry) -> optax.GradientTransformation:
  """The entry in a chain with Adam: before ``optax.adam``, or after Adam's direction."""
  if entry.full_update:
    return optax.chain(optax.scale_by_adam(), entry.make())
  return optax.chain(entry.make(), optax.adam(0.1))


def updater(tx: optax.GradientTransformation, entry: Entry) -> Callable[..., Any]:
  """``(updates, state, params) -> tx.update(...)`` with the entry's ``update_kwargs``."""
  kwargs = dict(entry.update_kwargs)
  return lambda updates, state, params: tx.update(updates, state, params, **kwargs)


def make_step(tx: optax.GradientTransformation, entry: Entry | None = None) -> Callable[..., Any]:
  """``(params, state) -> (params, state, updates)`` on the gradient of the entry's loss."""
  problem = QUADRATIC if entry is None else entry.problem
  kwargs = {} if entry is None else dict(entry.update_kwargs)

  def step(params, state):
    grads = jax.grad(problem.loss)(params)
    updates, state = tx.update(grads, state, params, **kwargs)
    return optax.apply_updates(params, updates), state, updates

  return step


def assert_trees_close(actual: Any, desired: Any, rtol: float = 1e-6, atol: float = 0.0,
                       msg: str = "") -> None:
  """Same structure, shapes and dtypes, values close (chex; the message names the check)."""
  chex.assert_trees_all_equal_shapes_and_dtypes(actual, desired, custom_message=msg)
  chex.assert_trees_all_close(actual, desired, rtol=rtol, atol=atol, custom_message=msg)


def assert_trees_equal(actual: Any, desired: Any, msg: str = "") -> None:
  chex.assert_trees_all_equal_shapes_and_dtypes(actual, desired, custom_message=msg)
  chex.assert_trees_all_equal(actual, desired, custom_message=msg)


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
def test_chain(entry, request):
  known_failure(request, entry, "chain")
  params = entry.problem.params()
  grads = jax.grad(entry.problem.loss)(params)
  plain = entry.make()
  plain_updates, _ = updater(plain, entry)(grads, plain.init(params), params)  # eager
  finished = optax.chain(entry.make(), finish(entry))
  for tx, name in ((finished, "sgd"), (with_adam(entry), "adam")):
    step = jax.jit(make_step(tx, entry))
    state = tx.init(params)
    p = params
    for i in range(2):
      p, state, updates = step(p, state)
      assert shapes_and_dtypes(updates) == shapes_and_dtypes(params), name
      assert all_finite(updates) and all_finite(state), name
      if name == "sgd" and i == 0:
        expected = jax.tree.map(lambda u: finish_sign(entry) * LR * u, plain_updates)
        assert_trees_close(updates, expected, atol=entry.atol, msg=name, rtol=entry.rtol)


@each_entry
@pytest.mark.parametrize("variant", ["plain", "inject_hyperparams"])
def test_second_jitted_step_does_not_recompile(entry, variant, request):
  known_failure(request, entry, f"recompile/{variant}")
  tx = entry.make() if variant == "plain" else entry.make_injected()
  tx = optax.chain(tx, finish(entry))
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)  # runs once per trace
    return make_step(tx, entry)(params, state)

  params = entry.problem.params()
  state = tx.init(params)
  for _ in range(3):
    params, state, _ = step(params, state)
  assert len(traces) == 1, f"traced {len(traces)} times in 3 steps"


@each_entry
def test_inject_hyperparams_matches_plain_factory(entry, request):
  known_failure(request, entry, "inject_hyperparams")
  plain, injected = entry.make(), entry.make_injected()
  params = entry.problem.params()
  plain_step = jax.jit(make_step(plain, entry))
  injected_step = jax.jit(make_step(injected, entry))
  p_plain, s_plain = params, plain.init(params)
  p_inj, s_inj = params, injected.init(params)
  assert_trees_close(s_inj.inner_state, s_plain, msg="init state", rtol=entry.rtol)
  for i in range(3):
    p_plain, s_plain, u_plain = plain_step(p_plain, s_plain)
    p_inj, s_inj, u_inj = injected_step(p_inj, s_inj)
    assert_trees_close(u_inj, u_plain, msg=f"updates, step {i}", rtol=entry.rtol,
                       atol=entry.atol)
    assert_trees_close(s_inj.inner_state, s_plain, msg=f"state, step {i}", rtol=entry.rtol,
                       atol=entry.atol)


@each_entry
def test_multi_steps(entry, request):
  known_failure(request, entry, "multi_steps")
  every_k = 2
  inner = optax.chain(entry.make(), finish(entry))
  tx = optax.MultiSteps(inner, every_k_schedule=every_k)
  params = entry.problem.params()
  grads = [entry.problem.random_grads(10 + i) for i in range(2 * every_k)]
  update = jax.jit(updater(tx, entry))
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
      expected, ref_state = updater(inner, entry)(mean, ref_state, params)  # eager reference
      assert_trees_close(updates, expected, rtol=max(1e-5, entry.rtol),
                         atol=max(1e-6, entry.atol),
                         msg=f"step {i}")
      assert any(np.any(np.asarray(u)) for u in jax.tree.leaves(updates)), f"step {i}"
      assert bool(tx.has_updated(state))
    params = optax.apply_updates(params, updates)


@each_entry
@pytest.mark.parametrize("wrapper", ["masked", "partition"])
def test_masked_and_partition(entry, wrapper, request):
  known_failure(request, entry, wrapper)
  kept = kept_paths(entry)
  params = entry.problem.params()
  if wrapper == "masked":
    tx = optax.masked(entry.make(), {k: k in kept for k in SHAPES})
  else:
    labels = {k: "entry" if k in kept else "frozen" for k in SHAPES}
    tx = optax.partition({"entry": entry.make(), "frozen": optax.set_to_zero()}, labels)
  # Reference: the transformation on the kept leaves alone (eager).
  ref = entry.make()
  sub = lambda tree: {k: tree[k] for k in kept}
  update = jax.jit(updater(tx, entry))
  state, ref_state = tx.init(params), ref.init(sub(params))
  for i in range(2):
    grads = entry.problem.random_grads(20 + i)
    updates, state = update(grads, state, params)
    expected, ref_state = updater(ref, entry)(sub(grads), ref_state, sub(params))
    assert_trees_close(sub(updates), expected, atol=entry.atol, rtol=entry.rtol,
                       msg=f"kept leaves, step {i}")
    for k in SHAPES:
      if k not in kept:
        other = grads[k] if wrapper == "masked" else jnp.zeros_like(grads[k])
        np.testing.assert_array_equal(updates[k], other, err_msg=f"masked-out {k}, step {i}")
    params = optax.apply_updates(params, updates)


@each_entry
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_updates_keep_params_dtype(entry, dtype, request):
  known_failure(request, entry, f"dtype/{dtype}")
  with jax.enable_x64(dtype == "float64"):
    dtype = jnp.dtype(dtype)
    params = entry.problem.params(dtype)
    assert all(x.dtype == dtype for x in jax.tree.leaves(params))
    tx = entry.make()
    step = jax.jit(make_step(tx, entry))
    state = tx.init(params)
    init_layout = shapes_and_dtypes(state)
    for i in range(2):
      params, state, updates = step(params, state)
      assert shapes_and_dtypes(updates) == shapes_and_dtypes(params), f"step {i}"
      assert shapes_and_dtypes(state) == init_layout, f"state layout, step {i}"
      assert all_finite(updates), f"step {i}"


@each_entry
def test_empty_pytree(entry, request):
  known_failure(request, entry, "empty_pytree")
  for tx in (entry.make(), optax.chain(entry.make(), finish(entry))):
    state = tx.init({})
    update = jax.jit(updater(tx, entry))
    for _ in range(2):
      updates, state = update({}, state, {})
      assert updates == {}
    assert all_finite(state)


@each_entry
def test_none_leaves(entry, request):
  known_failure(request, entry, "none_leaves")
  tx = entry.make()
  params = entry.problem.params()
  with_none = {**params, "unused": None}
  update = jax.jit(updater(tx, entry))
  state, ref_state = tx.init(with_none), tx.init(params)
  for i in range(2):
    grads = entry.problem.random_grads(30 + i)
    updates, state = update({**grads, "unused": None}, state, with_none)
    expected, ref_state = updater(tx, entry)(grads, ref_state, params)  # eager, no None leaf
    assert updates["unused"] is None
    assert_trees_close({k: v for k, v in updates.items() if k != "unused"}, expected,
                       atol=entry.atol, msg=f"step {i}", rtol=entry.rtol)


@each_entry
def test_unknown_extra_args_are_ignored(entry, request):
  known_failure(request, entry, "unknown_extra_args")
  tx = entry.make()
  if not isinstance(tx, optax.GradientTransformationExtraArgs):
    tx = optax.with_extra_args_support(tx)
  params = entry.problem.params()
  grads = jax.grad(entry.problem.loss)(params)
  kwargs = dict(entry.update_kwargs)
  state = tx.init(params)
  expected, expected_state = tx.update(grads, state, params, **kwargs)
  updates, new_state = tx.update(grads, state, params, some_unknown_arg=1, **kwargs)
  assert_trees_equal(updates, expected)
  assert_trees_equal(new_state, expected_state)
  chained = optax.chain(entry.make(), finish(entry))
  jitted = jax.jit(lambda g, s, p: chained.update(g, s, p, some_unknown_arg=jnp.ones(3),
                                                  **kwargs))
  updates, _ = jitted(grads, chained.init(params), params)
  assert_trees_close(updates, jax.tree.map(lambda u: finish_sign(entry) * LR * u, expected),
                     atol=entry.atol, rtol=entry.rtol)


@each_entry
def test_converges_inside_scan(entry, request):
  known_failure(request, entry, "scan")
  tx = optax.chain(entry.make(), finish(entry))
  step = make_step(tx, entry)
  loss_fn = entry.problem.loss

  @jax.jit
  def run(params):
    def body(carry, _):
      params, state = carry
      params, state, _ = step(params, state)
      return (params, state), loss_fn(params)

    (params, state), losses = jax.lax.scan(body, (params, tx.init(params)), length=50)
    return params, state, losses

  params = entry.problem.params()
  final_params, state, losses = run(params)
  assert all_finite(state) and all_finite(losses)
  if entry.trains is not None:  # measure on the coordinates the entry moves
    assert entry.problem is QUADRATIC, "`trains` is measured on the quadratic"
    trained = lambda p: {k: jnp.where(entry.trains[k], p[k], _TARGET[k]) for k in SHAPES}
    losses = [loss(trained(params)), loss(trained(final_params))]
    frozen = {k: np.asarray(final_params[k])[~entry.trains[k]] for k in SHAPES}
    assert_trees_equal(frozen, {k: np.asarray(params[k])[~entry.trains[k]] for k in SHAPES})
  initial = float(loss_fn(params)) if entry.trains is None else float(losses[0])
  assert float(losses[-1]) < entry.converged_fraction * initial, (entry.problem.name, initial,
                                               np.asarray(losses).tolist())


@each_entry
def test_state_round_trips_through_flax_serialization(entry, request):
  known_failure(request, entry, "serialization")
  tx = with_adam(entry)
  step = jax.jit(make_step(tx, entry))
  params = entry.problem.params()
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
@pytest.mark.parametrize("wrapper", ["alone", "chain", "inject_hyperparams"])
def test_logged_fields_are_readable(entry, wrapper, request):
  known_failure(request, entry, f"logged_fields/{wrapper}")
  params = entry.problem.params()
  grads = jax.grad(entry.problem.loss)(params)
  tx = {"alone": entry.make, "chain": lambda: with_adam(entry),
        "inject_hyperparams": entry.make_injected}[wrapper]()
  ref_global = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                           for g in jax.tree.leaves(grads)))
  ref_per_leaf = {k: np.linalg.norm(np.asarray(g, np.float64).ravel()) for k, g in grads.items()}
  _, state = updater(tx, entry)(grads, tx.init(params), params)
  for field in entry.fields:
    value = optax.tree_utils.tree_get(state, field)
    assert value is not None, f"tree_get(state, {field!r}) found nothing"
    assert jax.tree.leaves(value) and all_finite(value), f"{field}={value}"
  norm = optax.tree_utils.tree_get(state, "grad_norm")
  if "grad_norm" in entry.fields and isinstance(norm, dict):
    for k, v in norm.items():
      np.testing.assert_allclose(v, ref_per_leaf[k], rtol=1e-5, err_msg=k)
  elif "grad_norm" in entry.fields:
    np.testing.assert_allclose(norm, ref_global, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Sharded params: XLA_FLAGS must be set before jax is imported, so every entry runs in
# one subprocess (``tests/_sharded_contract.py``), once per session.

SHARDED_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharded_contract.py")


@pytest.fixture(scope="module")
def _sharded_process(tmp_path_factory):
  """The sharded run on 4 forced CPU devices, in a subprocess (one for the module)."""
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
def test_sharded_params_give_unsharded_updates(entry, sharded_results, request):
  known_failure(request, entry, "sharded")
  results, log = sharded_results
  if entry.name not in results:
    pytest.fail(f"no result from {SHARDED_HELPER}: {log}")
  record = results[entry.name]
  assert record["ok"], record["error"]
