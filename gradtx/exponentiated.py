r"""Exponentiated (multiplicative) updates for positive, simplex and signed parameters.

Writing a positive parameter as ``θ = e^φ`` and stepping ``φ ← φ - η ∇_θ L`` (the
θ-gradient, i.e. mirror descent with the entropy; a plain gradient step on ``φ`` would
use ``θ ⊙ ∇_θ L`` instead) gives the exponentiated-gradient update
``θ ← θ ⊙ exp(-η ∇_θ L)`` (Kivinen & Warmuth's EGU): multiplicative, so positivity is
kept for free. Normalising after the step keeps a probability vector on the simplex; EG±
handles signed parameters as the difference of two positive ones under a total budget.

The same family contains EM: pLSA's M-step ``p ← p ⊙ G / Σ p ⊙ G`` (``G = -∂L/∂p``) is a
normalised multiplicative update, :func:`normalized_multiplicative`.

These transformations turn an incoming *direction* ``d`` (a gradient, or e.g. Adam's
``m̂/(√v̂+ε)``, oriented like the gradient) into the update ``u = θ_new - θ``, so they end
a chain: ``optax.chain(optax.scale_by_adam(), gradtx.exponentiated_gradient(1e-2))``.

References:
  Kivinen, Warmuth, "Exponentiated gradient versus gradient descent for linear
  predictors", Information and Computation 132(1), 1997.
  Su, "Exponentiated gradient and meta-learned step sizes", kexue.fm/archives/8968.
  Hofmann, "Probabilistic latent semantic analysis", UAI 1999.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradtx import _checks, _numerics, _paths

NORMALIZATIONS = (None, "simplex")

# ``axis``: an int for every leaf, or ``{regex: int}`` path rules (or ``(regex, int)`` pairs).
_Axis = int | Mapping[str, int] | Sequence[tuple[str, int]]


def _axes(params: optax.Params, axis: _Axis) -> Any:
  """Per-leaf axis: an int for every leaf, or ``{regex: int}`` path rules."""
  if isinstance(axis, int) and not isinstance(axis, bool):
    return jax.tree.map(lambda _: axis, params)
  return _paths.map_by_rules(params, axis, argname="axis", has_default=False)[0]


def _check_axes(params: optax.Params, axis: _Axis, name: str) -> None:
  """Every leaf has the axis it is normalised along (a 0-d leaf has none); the rules, if
  any, cover every leaf."""
  paths, _ = _paths.leaf_paths_and_treedef(params)
  axes = jax.tree.leaves(_axes(params, axis))
  bad = [f"{path!r} (shape {np.shape(leaf)}, axis {ax})"
         for path, leaf, ax in zip(paths, jax.tree.leaves(params), axes, strict=True)
         if not -np.ndim(leaf) <= ax < np.ndim(leaf)]
  if bad:
    raise ValueError(f"{name}: axis must be an axis of every leaf (each slice along it is "
                     f"normalised); these leaves have no such axis: {', '.join(bad[:8])}. "
                     "Give them an axis they have with {regex: int} rules, or leave them "
                     "out (optax.masked)")


def _check_axis_value(axis: Any) -> None:
  if isinstance(axis, int) and not isinstance(axis, bool):
    return
  for _, value in _paths.compile_rules(axis, argname="axis"):
    if not isinstance(value, int) or isinstance(value, bool):
      raise TypeError(f"axis: every rule value must be an int axis, got {value!r}")


def _inf_to_nan(d: jax.Array, dtype: Any) -> jax.Array:
  """``d`` in ``dtype`` with ±inf turned into NaN: an infinite direction is a failed
  gradient, and ``e^{-η·inf}`` would otherwise silently zero a coordinate (or blow it up)."""
  d = d.astype(dtype)
  return jnp.where(jnp.isinf(d), jnp.nan, d)


def _require_params(params: Any, name: str) -> None:
  if params is None:
    raise ValueError(f"{name} needs the params: call update(updates, state, params)")


def _check_params(params: Any, name: str, *, strict: bool) -> None:
  """Floating params, positive (``strict``) or non-negative where they are concrete."""
  _checks.check_float_leaves("params", params)
  bad = []
  for path, leaf in zip(_paths.tree_paths(params), jax.tree.leaves(params), strict=True):
    if isinstance(leaf, jax.core.Tracer) or np.size(leaf) == 0:
      continue
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = jnp.min(leaf)  # sharded over other processes too: a global reduction
    lowest = float(np.min(np.asarray(leaf, np.float64)))
    if not (lowest > 0 if strict else lowest >= 0) or not np.isfinite(lowest):
      bad.append(f"{path!r} (min {lowest:g})")
  if bad:
    need = "> 0" if strict else ">= 0"
    raise ValueError(f"{name} needs params {need} everywhere (a multiplicative update "
                     f"cannot change their sign); got {', '.join(bad)}")


class ExponentiatedGradientState(NamedTuple):
  """State of :func:`exponentiated_gradient`: ``count`` drives a learning-rate schedule."""

  count: chex.Array


def exponentiated_gradient(
    learning_rate: optax.ScalarOrSchedule,
    *,
    normalize: str | None = None,
    axis: int | Mapping[str, int] | Sequence[tuple[str, int]] = -1,
) -> optax.GradientTransformationExtraArgs:
  r"""Exponentiated-gradient update (EGU), optionally normalised onto the simplex.

  .. math::
    \text{EGU: } u = \theta \odot \big(e^{-\eta d} - 1\big), \qquad
    \text{simplex: } u = \frac{\theta \odot e^{-\eta d}}
      {\sum_{\text{axis}} \theta \odot e^{-\eta d}} - \theta

  where ``d`` is the incoming direction (the gradient, or a preconditioned one). The
  simplex variant is computed as a softmax of ``log θ - η d`` (no overflow for large
  ``η d``), so after one step every slice along ``axis`` sums to 1 (the initial params
  need only be positive). A NaN/inf direction gives NaN updates (propagated). Params
  and directions must hold real floating arrays (integer and complex leaves are refused
  at ``init`` / ``update``, naming their paths); for ``"simplex"`` every leaf must have
  ``axis`` (a 0-d leaf is refused at ``init``, naming it).

  Args:
    learning_rate: ``η`` > 0, or a schedule ``count -> η``.
    normalize: ``None`` (EGU; params must be >= 0, and 0 stays 0) or ``"simplex"``
      (params must be > 0).
    axis: for ``"simplex"``, the axis each probability vector lies along: an int for
      every leaf, or ``{regex: int}`` path rules (``gradtx.tree_paths``).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, gradtx
    >>> tx = gradtx.exponentiated_gradient(1.0, normalize="simplex")
    >>> theta = {"p": jnp.array([0.25, 0.25, 0.5])}
    >>> u, _ = tx.update({"p": jnp.array([0.0, 1.0, 0.0])}, tx.init(theta), theta)
    >>> new = optax.apply_updates(theta, u)["p"]
    >>> round(float(new.sum()), 6), bool(new[1] < 0.25)
    (1.0, True)

  References:
    Kivinen, Warmuth, "Exponentiated gradient versus gradient descent for linear
    predictors", Information and Computation 132(1), 1997.
  """
  _checks.check_positive("learning_rate", learning_rate)
  _checks.check_choice("normalize", normalize, NORMALIZATIONS)
  _check_axis_value(axis)
  strict = normalize == "simplex"

  def init_fn(params):
    _check_params(params, "exponentiated_gradient", strict=strict)
    if strict:
      _check_axes(params, axis, "exponentiated_gradient")
    return ExponentiatedGradientState(count=jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require_params(params, "exponentiated_gradient")
    _checks.check_float_leaves("updates", updates)
    eta = _numerics.scalar_or_schedule(learning_rate, state.count)

    def egu(d, theta):
      dt = _numerics.compute_dtype(theta)
      theta_c = theta.astype(dt)
      return (theta_c * jnp.expm1(-eta.astype(dt) * _inf_to_nan(d, dt))).astype(theta.dtype)

    def simplex(d, theta, ax):
      dt = _numerics.compute_dtype(theta)
      theta_c = theta.astype(dt)
      logits = jnp.log(theta_c) - eta.astype(dt) * _inf_to_nan(d, dt)
      return (jax.nn.softmax(logits, axis=ax) - theta_c).astype(theta.dtype)

    if strict:
      new_updates = jax.tree.map(simplex, updates, params, _axes(params, axis))
    else:
      new_updates = jax.tree.map(egu, updates, params)
    return new_updates, ExponentiatedGradientState(optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class EGPlusMinusState(NamedTuple):
  """State of :func:`eg_plus_minus`.

  Attributes:
    count: number of updates so far (drives a learning-rate schedule).
    theta_plus: ``θ⁺ > 0``, like the params.
    theta_minus: ``θ⁻ > 0``, like the params; ``θ = θ⁺ - θ⁻``.
  """

  count: chex.Array
  theta_plus: optax.Params
  theta_minus: optax.Params


def eg_plus_minus(
    learning_rate: optax.ScalarOrSchedule, *, total: float
) -> optax.GradientTransformationExtraArgs:
  r"""EG± (Kivinen & Warmuth): exponentiated gradient for signed parameters.

  .. math::
    \theta = \theta^+ - \theta^-,\quad
    \theta^\pm \leftarrow \frac{U\, \theta^\pm \odot e^{\mp \eta d}}
      {\sum (\theta^+ \odot e^{-\eta d} + \theta^- \odot e^{\eta d})},\quad
    u = (\theta^+ - \theta^-)_{\text{new}} - (\theta^+ - \theta^-)_{\text{old}}

  ``Σ(θ⁺ + θ⁻) = U`` (over every coordinate of every leaf) before and after each step,
  so ``‖θ‖₁ <= U``. At ``init``, ``θ^± = max(±θ, 0) + s`` with
  ``s = (U - ‖θ‖₁) / (2 n)`` (n coordinates), which needs ``‖θ‖₁ < U``. The update is
  computed from the state (not from ``params``), so EG± should end the chain.
  A NaN/inf direction gives NaN updates and NaN ``θ^±`` (propagated). Params and
  directions must hold real floating arrays (other leaves are refused, naming their paths).

  Args:
    learning_rate: ``η`` > 0, or a schedule ``count -> η``.
    total: the budget ``U`` > 0.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    :class:`EGPlusMinusState`.

  Example:
    >>> import jax.numpy as jnp, optax, gradtx
    >>> tx = gradtx.eg_plus_minus(0.5, total=4.0)
    >>> w = {"w": jnp.array([1.0, -1.0])}
    >>> state = tx.init(w)
    >>> u, state = tx.update({"w": jnp.array([1.0, 1.0])}, state, w)
    >>> total = sum(float(x.sum()) for x in (state.theta_plus["w"], state.theta_minus["w"]))
    >>> round(total, 5), bool(u["w"][0] < 0)
    (4.0, True)

  References:
    Kivinen, Warmuth, "Exponentiated gradient versus gradient descent for linear
    predictors", Information and Computation 132(1), 1997.
  """
  _checks.check_positive("learning_rate", learning_rate)
  _checks.check_positive("total", total, allow_schedule=False)
  budget = total  # may be a tracer under optax.inject_hyperparams

  def init_fn(params):
    _checks.check_float_leaves("params", params)
    leaves = jax.tree.leaves(params)
    size = optax.tree.size(params)
    norm1 = sum(jnp.sum(jnp.abs(x.astype(_numerics.compute_dtype(x)))) for x in leaves)
    budget_value = _checks.concrete_scalar(budget)  # None when traced
    if (leaves and budget_value is not None and not isinstance(norm1, jax.core.Tracer)
        and not float(norm1) < budget_value):
      raise ValueError(f"eg_plus_minus needs ‖params‖₁ < total so that θ⁺, θ⁻ > 0; got "
                       f"‖params‖₁ = {float(norm1):g} and total = {total!r}")
    slack = (budget - norm1) / (2 * max(size, 1))

    def split(sign):
      return jax.tree.map(
          lambda x: (jnp.maximum(sign * x, 0) + slack.astype(x.dtype)) if size else x, params)

    return EGPlusMinusState(count=jnp.zeros((), jnp.int32), theta_plus=split(1),
                            theta_minus=split(-1))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _checks.check_float_leaves("updates", updates)
    eta = _numerics.scalar_or_schedule(learning_rate, state.count)

    # In log space: θ± ⊙ e^{∓ηd} / Z as exp(log θ± ∓ ηd - log Z), so a large |ηd| cannot
    # overflow before the normalisation.
    def log_grown(theta, d, sign):
      dt = _numerics.compute_dtype(theta)
      return jnp.log(theta.astype(dt)) - sign * eta.astype(dt) * _inf_to_nan(d, dt)

    log_plus = jax.tree.map(lambda t, d: log_grown(t, d, 1.0), state.theta_plus, updates)
    log_minus = jax.tree.map(lambda t, d: log_grown(t, d, -1.0), state.theta_minus, updates)
    per_leaf = [jax.nn.logsumexp(x) for x in jax.tree.leaves(log_plus)
                + jax.tree.leaves(log_minus) if x.size]
    log_mass = jax.nn.logsumexp(jnp.stack(per_leaf)) if per_leaf else 0.0

    def renorm(log_theta, old):
      mass = jnp.asarray(budget, log_theta.dtype) * jnp.exp(log_theta - log_mass)
      # A coordinate whose share underflows (|ηd| beyond ~88 in float32) keeps the
      # smallest normal value instead of 0, from which a multiplicative rule could never
      # recover (log 0 = -inf); the budget moves by at most n · tiny.
      return jnp.maximum(mass.astype(old.dtype), jnp.finfo(old.dtype).tiny)

    plus = jax.tree.map(renorm, log_plus, state.theta_plus)
    minus = jax.tree.map(renorm, log_minus, state.theta_minus)
    def change(p, m, p0, m0, d):  # Δ(θ⁺ - θ⁻), in at least float32
      return ((p.astype(_numerics.compute_dtype(p)) - m) - (p0 - m0)).astype(d.dtype)

    new_updates = jax.tree.map(change, plus, minus, state.theta_plus, state.theta_minus,
                               updates)
    return new_updates, EGPlusMinusState(count=optax.safe_increment(state.count),
                                         theta_plus=plus, theta_minus=minus)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# The state of :func:`normalized_multiplicative` (none is needed); the name stays importable.
NormalizedMultiplicativeState = optax.EmptyState


def normalized_multiplicative(
    *, axis: int | Mapping[str, int] | Sequence[tuple[str, int]] = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""The normalised multiplicative update that is EM's M-step for pLSA-type models.

  .. math::
    \theta_{\text{new}} = \frac{\theta \odot G}{\sum_{\text{axis}} \theta \odot G},
    \qquad G = -d \;(= -\partial L / \partial \theta \ge 0), \qquad
    u = \theta_{\text{new}} - \theta

  For pLSA with ``L = -Σ_{d,w} n(d, w) log Σ_z p(w|z) p(z|d)``, ``p(w|z) ⊙ G`` is
  exactly the expected count ``Σ_d n(d, w) P(z|d, w)`` of the E-step, so one update of
  both ``p(w|z)`` (normalised over w) and ``p(z|d)`` (normalised over z) from the same
  gradient is one EM iteration. It is the large-step limit of the linearised simplex EG
  (``θ ⊙ (1 - η d)`` normalised, as ``η → ∞``). ``-d`` must be >= 0 with a positive sum
  along ``axis``; otherwise the result is NaN/negative (not checked inside jit). As in
  EM, a coordinate whose expected count is 0 (a word that never occurs) becomes 0, and
  ``log 0`` in the next loss is then -inf: drop such rows or smooth the counts. Params
  and directions must hold real floating arrays, and every leaf must have ``axis`` (a 0-d
  leaf is refused at ``init``); the errors name the leaves.

  Args:
    axis: the axis each distribution lies along: an int for every leaf, or
      ``{regex: int}`` path rules.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state ``optax.EmptyState``);
    ``update`` needs ``params`` (> 0) and the gradient of the loss (negative
    log-likelihood) as the incoming updates.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> tx = gradtx.normalized_multiplicative(axis=0)
    >>> p = {"p": jnp.array([0.5, 0.5])}
    >>> u, _ = tx.update({"p": jnp.array([-3.0, -1.0])}, tx.init(p), p)
    >>> (p["p"] + u["p"]).tolist()
    [0.75, 0.25]

  References:
    Hofmann, "Probabilistic latent semantic analysis", UAI 1999.
    Su, "Gradient descent and EM are one idea", kexue.fm/archives/4277.
  """
  _check_axis_value(axis)

  def init_fn(params):
    _check_params(params, "normalized_multiplicative", strict=True)
    _check_axes(params, axis, "normalized_multiplicative")
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _require_params(params, "normalized_multiplicative")
    _checks.check_float_leaves("updates", updates)

    def leaf(d, theta, ax):
      dt = _numerics.compute_dtype(theta)
      weighted = theta.astype(dt) * -d.astype(dt)
      new = weighted / jnp.sum(weighted, axis=ax, keepdims=True)
      return (new - theta.astype(dt)).astype(theta.dtype)

    return jax.tree.map(leaf, updates, params, _axes(params, axis)), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
