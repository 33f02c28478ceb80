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

OPTIONS = {"es": ESOptions, "forward": ForwardOptions}


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
  """

  count: chex.Array
  rng_key: chex.Array


def _estimator(estimator: Any, options: dict[str, Any]) -> Callable[..., Any]:
  """``estimate(fn, params, key)`` for ``estimator`` with ``options`` (checked now)."""
  if callable(estimator) and not isinstance(estimator, str):
    return lambda fn, params, key: estimator(fn, params, key, **options)
  if not isinstance(estimator, str):
    raise TypeError(f"estimator must be 'es', 'forward' or a callable, got {estimator!r}")
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
  return cls(**options).estimate


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

  Args:
    estimator: ``"es"`` (:func:`es_gradient`), ``"forward"`` (:func:`forward_gradient`),
      or a callable ``estimator(fn, params, key, **estimator_kwargs) -> grads``.
    key: a ``jax.random`` key.
    sigma: ES's smoothing scale (required with ``"es"``).
    num_samples: ES's population size (required with ``"es"``).
    num_directions: the forward gradient's number of directions (default 1).
    **estimator_kwargs: the estimator's other options (``antithetic``, ``shaping``,
      ``lean``, ...: the fields of ``ESOptions`` / ``ForwardOptions``), checked here.

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
    optimisation are the same", kexue.fm/archives/7737.
  """
  # optax.inject_hyperparams re-calls the factory with its bound arguments, which hands
  # ``**estimator_kwargs`` back as one keyword of that name.
  estimator_kwargs = {**estimator_kwargs.pop("estimator_kwargs", {}), **estimator_kwargs}
  named = dict(sigma=sigma, num_samples=num_samples, num_directions=num_directions)
  estimate = _estimator(estimator, {**{k: v for k, v in named.items() if v is not None},
                                    **estimator_kwargs})
  typed = _random.as_key(key)
  impl = jax.random.key_impl(typed)

  def init_fn(params):
    del params
    return ZerothOrderState(jnp.zeros((), jnp.int32), jax.random.key_data(typed))

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
    grads = estimate(loss_fn, params, step_key)
    grads = jax.tree.map(lambda g, u: g.astype(jnp.result_type(u)), grads, updates)
    return grads, ZerothOrderState(optax.safe_increment(state.count), next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
