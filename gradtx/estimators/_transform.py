r"""The transformation :func:`zeroth_order` and :func:`fill_masked` for masked ``loss_fn``\ s."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradtx import _checks, _paths, _random
from gradtx.estimators._es import ESOptions
from gradtx.estimators._forward import ForwardOptions
from gradtx.estimators._hizoo import HiZOOOptions

# LOZO's subspace key for steps [m k, (m + 1) k) is fold_in(fold_in(key, _SUBSPACE), m).
_SUBSPACE = 0x10205


@dataclasses.dataclass(frozen=True)
class SignOptions(ESOptions):
  r"""ZO-SGD-Sign: ``sign(ĝ)`` of :func:`es_gradient`'s estimate with these options.

  .. math::
    u = \operatorname{sign}(\hat g)

  With one mirrored pair, ``sign(ĝ_k) = sign(ℓ₊ - ℓ₋) sign(z_k)``; for a linear ``f`` with
  gradient ``g`` and Gaussian ``z`` its mean is ``(2/π) arcsin(g_k / ‖g‖)`` (a biased,
  bounded direction: every coordinate moves by the learning rate).

  References:
    Liu, Chen, Chen, Hong, "signSGD via zeroth-order oracle", ICLR 2019 (ZO-signSGD);
    Zhang et al., "Revisiting zeroth-order optimization for memory-efficient LLM
    fine-tuning: a benchmark", 2024, arXiv:2402.11592 (ZO-Bench).
  """

  def estimate(self, fn: Callable[[Any], jax.Array], params: Any, key: jax.Array) -> Any:
    return jax.tree.map(jnp.sign, super().estimate(fn, params, key))


OPTIONS = {"es": ESOptions, "forward": ForwardOptions, "hizoo": HiZOOOptions,
           "sign": SignOptions}


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def fill_masked(tree: Any, full: Any) -> Any:
  """``tree`` with its ``optax.MaskedNode`` leaves taken from ``full`` (same structure).

  Inside ``optax.masked`` / ``optax.partition`` / ``gradtx.by_path`` a transformation sees
  the params it owns and ``MaskedNode()`` elsewhere; a ``loss_fn`` for
  :func:`zeroth_order` rebuilds the whole tree with ``fill_masked(p, params)``. ``full``
  must hold a leaf (or a subtree) at every path of ``tree``, masked or not; a mismatch is
  an error naming the paths.

  Example:
    >>> import optax, gradtx
    >>> gradtx.fill_masked({"a": 1.0, "b": optax.MaskedNode()}, {"a": 0.0, "b": 2.0})
    {'a': 1.0, 'b': 2.0}
  """
  try:
    return jax.tree.map(lambda t, f: f if _is_masked(t) else t, tree, full,
                        is_leaf=_is_masked)
  except ValueError:
    # Name the paths: the tree's leaves (masked ones included) against full's.
    slots = _paths.tree_paths(jax.tree.map(lambda t: np.zeros(()) if _is_masked(t) else t,
                                           tree, is_leaf=_is_masked))
    have = _paths.tree_paths(full)
    missing = [p for p in slots if not any(h == p or h.startswith(p + "/") for h in have)]
    extra = [h for h in have if not any(h == p or h.startswith(p + "/") for p in slots)]
    raise ValueError(f"fill_masked: full must have the structure of tree (any subtree where "
                     f"tree has MaskedNode); missing in full: {missing[:8]}; not in tree: "
                     f"{extra[:8]}") from None


class ZerothOrderState(NamedTuple):
  """State of :func:`zeroth_order`.

  Attributes:
    count: number of estimates so far.
    rng_key: raw key data (uint32) for the next estimate.
    hessian_diag: HiZOO's running Hessian diagonal (a pytree like the params; ``"hizoo"``
      only, else ``optax.EmptyState()``), read with
      ``optax.tree_utils.tree_get(state, "hessian_diag")``.
  """

  count: chex.Array
  rng_key: chex.Array
  hessian_diag: Any = optax.EmptyState()


def _estimator(estimator: Any, options: dict[str, Any]) -> Any:
  """The options object of ``estimator`` (checked now), or a callable's ``estimate``."""
  if callable(estimator) and not isinstance(estimator, str):
    return lambda fn, params, key: estimator(fn, params, key, **options)
  if not isinstance(estimator, str):
    raise TypeError(f"estimator must be one of {tuple(OPTIONS)} or a callable, got "
                    f"{estimator!r}")
  _checks.check_choice("estimator", estimator, OPTIONS)
  cls = OPTIONS[estimator]
  fields = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(options) - set(fields))
  if unknown:
    raise TypeError(f"zeroth_order({estimator!r}, ...): bad estimator options {unknown}; "
                    f"{estimator!r} takes {fields}")
  for field in dataclasses.fields(cls):
    if field.default is dataclasses.MISSING and field.name not in options:
      raise TypeError(f"zeroth_order({estimator!r}, ...) needs {field.name}=: "
                      f"{estimator!r} has no default for {field.name}")
  return cls(**options)


def _subspaces(options: Any, resample_every: int | None, key: jax.Array) -> Callable:
  """``options_at(count)``: LOZO's options with the subspace key of step ``count``."""
  if resample_every is None:
    return lambda count: options
  _checks.check_static("resample_every", resample_every)
  _checks.check_int("resample_every", resample_every, minimum=1)
  if getattr(options, "rank", None) is None:
    raise ValueError(f"resample_every={resample_every!r} needs rank= (it keeps the low-rank "
                     f"V factors for that many steps; LOZO)")
  base = jax.random.fold_in(key, _SUBSPACE)
  return lambda count: dataclasses.replace(
      options, subspace_key=jax.random.fold_in(base, count // int(resample_every)))


def zeroth_order(
    estimator: str | Callable[..., Any] = "es",
    *,
    key: jax.Array,
    sigma: float | jax.Array | None = None,
    num_samples: int | None = None,
    num_directions: int | None = None,
    **estimator_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Replaces the incoming updates by a zeroth-order estimate of ``∇ loss_fn(params)``.

  .. math::
    u = \hat\nabla_\theta\, \mathrm{loss\_fn}(\theta)

  so ``optax.chain(gradtx.zeroth_order("es", key=k, sigma=0.01, num_samples=64),
  optax.adam(1e-3))`` trains an objective with no usable gradient, its ``update`` called
  as ``tx.update(updates, state, params, loss_fn=loss_fn)`` (``updates`` only supply the
  structure; zeros do). Inside ``optax.masked`` / ``gradtx.by_path`` only the owned
  leaves are perturbed: ``loss_fn`` then receives a tree with ``optax.MaskedNode()`` at the
  others — rebuild it with :func:`fill_masked`. The key is split every step.

  ``sigma``, ``num_samples`` and ``num_directions`` are named arguments so that
  ``optax.inject_hyperparams(gradtx.zeroth_order, static_args=("estimator", "key",
  "num_samples"))`` can inject (and schedule) ``sigma``; ``num_samples`` and
  ``num_directions`` are shapes and must stay static.

  The estimators for fine-tuning (MeZO and its successors): ``"es"`` with
  ``num_samples=2`` and ``lean=True`` is MeZO's estimate (followed by ``optax.sgd``; the
  in-place step itself is :func:`zo_sgd_step`); ``mask=`` perturbs a subset (Sparse
  MeZO, or a ``fisher_mask``); ``rank=r`` low-rank noise for matrix leaves, with
  ``resample_every=k`` keeping the ``V`` factors for ``k`` steps (LOZO: step ``t`` uses
  the subspace key ``fold_in(fold_in(key, 0x10205), t // k)``); ``"hizoo"`` preconditions
  by a running Hessian diagonal kept in the state as ``hessian_diag``
  (:func:`hizoo_gradient`); ``"sign"`` returns ``sign(ĝ)`` (ZO-SGD-Sign).

  Args:
    estimator: ``"es"`` (:func:`es_gradient`), ``"forward"`` (:func:`forward_gradient`),
      ``"hizoo"`` (:func:`hizoo_gradient`), ``"sign"`` (the sign of :func:`es_gradient`:
      ``(2/π) arcsin(g_k/‖g‖)`` in mean for a linear ``f`` and one Gaussian pair), or a
      callable ``estimator(fn, params, key, **estimator_kwargs) -> grads``.
    key: a ``jax.random`` key.
    sigma: the smoothing scale (required with ``"es"``, ``"sign"`` and ``"hizoo"``).
    num_samples: the population size (required with ``"es"`` and ``"sign"``; ``"hizoo"``:
      the evaluations besides ``f(θ)``, default 2).
    num_directions: the forward gradient's number of directions (default 1).
    **estimator_kwargs: the estimator's other options, checked here: the fields of
      ``ESOptions`` (``antithetic``, ``shaping``, ``lean``, ``mask``, ``rank``, ...),
      ``ForwardOptions`` or ``HiZOOOptions`` (``alpha``, ``damping``, ``mask``); and
      ``resample_every=k`` with ``rank`` (LOZO).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` and
    ``loss_fn``, and ``updates`` with the structure of ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gradtx
    >>> loss = lambda p: jnp.sum(jnp.round(p["w"] * 100) ** 2)   # piecewise constant
    >>> tx = optax.chain(gradtx.zeroth_order("es", key=jax.random.key(0), sigma=0.1,
    ...                                      num_samples=32), optax.sgd(1e-5))
    >>> params = {"w": jnp.array([1.0, -1.0])}
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda p, s: tx.update(p, s, p, loss_fn=loss))
    >>> for _ in range(20):
    ...   u, state = step(params, state)
    ...   params = optax.apply_updates(params, u)
    >>> bool(loss(params) < 2e4)
    True

  References:
    Salimans et al., 2017, arXiv:1703.03864. Su, "Policy gradient and zeroth-order
    optimisation are the same", kexue.fm/archives/7737. Malladi et al., 2023,
    arXiv:2305.17333 (MeZO). Zhao et al., 2024, arXiv:2402.15173 (HiZOO). Liu et al.,
    2024, arXiv:2402.15751 (Sparse MeZO). Chen et al., 2024, arXiv:2410.07698 (LOZO).
    Zhang et al., 2024, arXiv:2402.11592 (ZO-Bench: ZO-SGD-Sign).
  """
  # optax.inject_hyperparams re-calls the factory with its bound arguments, which hands
  # ``**estimator_kwargs`` back as one keyword of that name.
  estimator_kwargs = {**estimator_kwargs.pop("estimator_kwargs", {}), **estimator_kwargs}
  resample_every = estimator_kwargs.pop("resample_every", None)
  named = dict(sigma=sigma, num_samples=num_samples, num_directions=num_directions)
  options = _estimator(estimator, {**{k: v for k, v in named.items() if v is not None},
                                   **estimator_kwargs})
  typed = _random.as_key(key)
  impl = jax.random.key_impl(typed)
  options_at = _subspaces(options, resample_every, typed)
  hizoo = isinstance(options, HiZOOOptions)

  def init_fn(params):
    hessian = options.init(params) if hizoo else optax.EmptyState()
    return ZerothOrderState(jnp.zeros((), jnp.int32), jax.random.key_data(typed), hessian)

  def update_fn(updates, state, params=None, *, loss_fn=None, **extra_args):
    del extra_args
    if loss_fn is None:
      raise ValueError("zeroth_order needs the objective: call update(updates, state, "
                       "params, loss_fn=loss_fn) with loss_fn(params) -> scalar")
    if params is None:
      raise ValueError("zeroth_order needs the params: call update(updates, state, params, "
                       "loss_fn=...)")
    _checks.check_callable("loss_fn", loss_fn, call="loss_fn(params) -> scalar")
    _checks.check_same_structure("updates", updates, "params", params)
    next_key, step_key = _random.split_state_key(state.rng_key, impl)
    hessian = state.hessian_diag
    if hizoo:
      grads, hessian = options.estimate_with_state(loss_fn, params, step_key, hessian)
    else:
      current = options_at(state.count)
      estimate = current if callable(current) else current.estimate
      grads = estimate(loss_fn, params, step_key)
    grads = jax.tree.map(lambda g, u: g.astype(jnp.result_type(u)), grads, updates)
    return grads, ZerothOrderState(optax.safe_increment(state.count), next_key, hessian)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
