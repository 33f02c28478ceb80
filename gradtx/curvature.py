r"""Diagonal Newton steps: the bridge between gradient descent and EM.

Minimising the local quadratic model of ``L`` at every step gives Newton's
``θ ← θ - H⁻¹ g``; replacing the Hessian by a constant ``1/η`` gives gradient descent. In
between lies the *diagonal* Newton step ``θ ← θ - g / diag(H)``: one step size per
coordinate, read off the curvature. For K-means, ``L = Σ_ij C_ij ‖x_i - c_j‖²`` with the
assignments ``C`` held fixed (EM's E-step), ``diag(H)`` is ``2 Σ_i C_ij`` for every
coordinate of centroid ``j`` and the diagonal Newton step is exactly Lloyd's update
``c_j ← Σ_i C_ij x_i / Σ_i C_ij`` (hard or soft assignments alike).

``diag(H)`` comes from Hessian-vector products of a ``loss_fn`` passed to ``update``:
Hutchinson's estimator ``E[z ⊙ Hz]`` with Rademacher ``z`` (exact, with one sample, when
``H`` is diagonal), or directly from a ``curvature`` the caller passes.

References:
  Bekas, Kokiopoulou, Saad, "An estimator for the diagonal of a matrix", Applied
  Numerical Mathematics 57(11), 2007 (Hutchinson-type diagonal estimator).
  Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, "AdaHessian", AAAI 2021,
  arXiv:2006.00719.
  Su, "Gradient descent and EM are one idea", kexue.fm/archives/4277.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from gradtx import _checks, _numerics, _random

ESTIMATORS = ("hutchinson",)


def _rademacher(key: jax.Array, tree: Any) -> Any:
  """±1 per coordinate; a leaf's draw depends only on the key and its path."""
  return _random.per_leaf(
      key, tree, lambda leaf_key, leaf: jax.random.rademacher(leaf_key, jnp.shape(leaf),
                                                               leaf.dtype))


def _check_samples(samples: Any) -> None:
  _checks.check_static("samples", samples)
  _checks.check_int("samples", samples, minimum=1)


def hutchinson_diagonal(loss_fn: Callable[[Any], jax.Array], params: Any, key: jax.Array,
                        samples: int = 1) -> Any:
  r"""Hutchinson's estimate of the Hessian diagonal, ``(1/S) Σ_s z_s ⊙ H z_s``.

  ``z_s`` are Rademacher (±1) vectors, so ``E[z ⊙ Hz] = diag(H)``; when ``H`` is diagonal
  every sample is exact (``z ⊙ (h ⊙ z) = h``). Each sample is one Hessian-vector product
  (forward-over-reverse, ``jax.jvp`` of ``jax.grad``); samples run vectorised.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: where to evaluate the Hessian (floating leaves; integer ones are refused,
      naming their paths).
    key: a ``jax.random`` key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``).
    samples: the number S >= 1 of probe vectors; static (a Python int, not traced).

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 2.0, 3.0]) * p["w"] ** 2)
    >>> d = gradtx.hutchinson_diagonal(loss, {"w": jnp.ones(3)}, jax.random.key(0))
    >>> d["w"].tolist()
    [2.0, 4.0, 6.0]

  References:
    Bekas, Kokiopoulou, Saad, "An estimator for the diagonal of a matrix", 2007.
  """
  _check_samples(samples)
  key = _random.as_key(key, argname="key")
  _checks.check_float_leaves("params", params)
  grad = jax.grad(loss_fn)

  def one(sample_key):
    z = _rademacher(sample_key, params)
    hz = jax.jvp(grad, (params,), (z,))[1]
    return jax.tree.map(jnp.multiply, z, hz)

  draws = jax.vmap(one)(jax.random.split(key, samples))
  return jax.tree.map(lambda d: jnp.mean(d, axis=0), draws)


class ScaleByDiagNewtonState(NamedTuple):
  """State of :func:`scale_by_diag_newton`.

  Attributes:
    rng_key: raw key data (uint32) for the next Hutchinson probes.
    curvature: the last ``diag(H)`` estimate (like the params), for logging.
  """

  rng_key: chex.Array
  curvature: Any


def scale_by_diag_newton(
    *,
    damping: float = 1e-4,
    estimator: str = "hutchinson",
    samples: int = 1,
    key: jax.Array,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions by the Hessian diagonal: ``g / (max(diag(H), 0) + λ)``.

  .. math::
    d = \frac{g}{\max(\mathrm{diag}(H), 0) + \lambda}

  Like every optax ``scale_by_*`` transformation this returns a direction, not a step:
  ``optax.chain(gradtx.scale_by_diag_newton(key=k), optax.sgd(1.0))`` (or
  :func:`diag_newton`) applies the Newton step ``u = -g / (diag(H) + λ)``. ``diag(H)`` is
  estimated from the ``loss_fn`` passed to ``update`` (Hutchinson), or taken from a
  ``curvature`` passed instead. Negative curvature estimates are clipped at 0 so that
  the step never ascends; ``λ = damping`` keeps flat directions finite (``λ = 0`` only
  when the curvature is known to be positive, as for K-means, where an empty cluster has
  zero curvature and gets a NaN centroid; a tiny λ keeps it in place instead). A NaN/inf
  gradient or
  curvature gives NaN/inf directions (propagated; an infinite curvature gives NaN, not a
  silent zero step).

  Args:
    damping: ``λ >= 0`` (a number, not a schedule).
    estimator: ``"hutchinson"`` (Rademacher probes of Hessian-vector products).
    samples: probes per step, S >= 1; static (under ``optax.inject_hyperparams`` list it
      in ``static_args``).
    key: a ``jax.random`` key; the state carries it forward, split every step.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params,
    *, loss_fn=None, curvature=None)`` needs one of ``loss_fn(params) -> scalar`` (the
    loss whose gradient ``updates`` is) or ``curvature`` (a pytree with the paths and
    leaf shapes of ``updates``; a mismatch is an error naming the paths). ``updates``
    must be floating (integer leaves are refused, naming their paths).

  Example:
    >>> import jax, jax.numpy as jnp, optax, gradtx
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 10.0]) * (p["w"] - 3.0) ** 2)
    >>> tx = gradtx.diag_newton(1.0, damping=0.0, key=jax.random.key(0))
    >>> params = {"w": jnp.zeros(2)}
    >>> updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params, loss_fn=loss)
    >>> optax.apply_updates(params, updates)["w"].tolist()   # one step to the minimum
    [3.0, 3.0]

  References:
    Yao et al., "AdaHessian", AAAI 2021, arXiv:2006.00719 (Hutchinson diagonal).
    Su, "Gradient descent and EM are one idea", kexue.fm/archives/4277.
  """
  _checks.check_non_negative("damping", damping, allow_schedule=False)
  _checks.check_choice("estimator", estimator, ESTIMATORS)
  _check_samples(samples)
  typed = _random.as_key(key)
  impl = jax.random.key_impl(typed)

  def init_fn(params):
    return ScaleByDiagNewtonState(jax.random.key_data(typed), jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), _numerics.compute_dtype(p)), params))

  def update_fn(updates, state, params=None, *, loss_fn=None, curvature=None, **extra_args):
    del extra_args
    _checks.check_float_leaves("updates", updates)  # g / (h + λ) would be truncated
    next_key, step_key = _random.split_state_key(state.rng_key, impl)
    if curvature is None:
      if loss_fn is None:
        raise ValueError(
            "scale_by_diag_newton needs the curvature: pass loss_fn=(params -> scalar loss) "
            "or curvature=(a pytree like params) to update(...)")
      if params is None:
        raise ValueError("scale_by_diag_newton with loss_fn needs the params: call "
                         "update(updates, state, params, loss_fn=...)")
      curvature = hutchinson_diagonal(loss_fn, params, step_key, samples)
    else:
      _checks.check_same_structure("curvature", curvature, "the updates", updates)
    curvature = jax.tree.map(
        lambda h, g: h.astype(_numerics.compute_dtype(g)), curvature, updates)
    def direction(g, h):
      # An infinite curvature is a failed estimate: NaN, not g/inf = 0 (or g/λ for -inf).
      h = jnp.where(jnp.isinf(h), jnp.nan, jnp.maximum(h, 0))
      return (g / (h + damping)).astype(g.dtype)

    directions = jax.tree.map(direction, updates, curvature)
    return directions, ScaleByDiagNewtonState(next_key, curvature)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def diag_newton(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    damping: float = 1e-4,
    estimator: str = "hutchinson",
    samples: int = 1,
    key: jax.Array,
) -> optax.GradientTransformationExtraArgs:
  r"""The diagonal Newton step ``u = -η g / (max(diag(H), 0) + λ)``.

  ``optax.chain(scale_by_diag_newton(...), optax.scale_by_learning_rate(η))``; see
  :func:`scale_by_diag_newton` for the arguments and the ``loss_fn`` / ``curvature``
  update arguments. With ``η = 1`` and ``λ = 0`` it is Newton's step on a loss with a
  diagonal Hessian, and EM's M-step for K-means.

  Args:
    learning_rate: ``η`` > 0, or a schedule.
    damping: ``λ >= 0``.
    estimator: ``"hutchinson"``.
    samples: probes per step.
    key: a ``jax.random`` key.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> tx = gradtx.diag_newton(0.5, damping=0.0, key=jax.random.key(0))
    >>> g = {"w": jnp.array([2.0])}
    >>> tx.update(g, tx.init(g), g, curvature={"w": jnp.array([4.0])})[0]["w"].tolist()
    [-0.25]

  References:
    Su, "Gradient descent and EM are one idea", kexue.fm/archives/4277.
  """
  _checks.check_positive("learning_rate", learning_rate)
  return optax.chain(
      scale_by_diag_newton(damping=damping, estimator=estimator, samples=samples, key=key),
      optax.scale_by_learning_rate(learning_rate))
