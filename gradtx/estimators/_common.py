"""What the estimators share: each member's noise, the fitness weights, the input checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import _checks, _numerics, _random

NOISES = ("gaussian", "rademacher")


def member_noise(key: jax.Array, index: jax.Array, params: Any, noise: str) -> Any:
  """The noise ``ε`` of population member ``index``: a pytree like ``params`` (float32+).

  Leaf ``path`` draws from ``fold_in(fold_in(key, index), crc32(path) & 0x7FFFFFFF)``
  (:func:`gradtx._random.per_leaf`).
  """
  sample = jax.random.normal if noise == "gaussian" else jax.random.rademacher

  def draw(leaf_key, leaf):
    # Drawn flat and reshaped: the same values as drawing the shape (threefry counts
    # elements in row-major order) and faster on XLA:CPU.
    shape = jnp.shape(leaf)
    size = (int(np.prod(shape, dtype=np.int64)),)
    return sample(leaf_key, size, _numerics.compute_dtype(leaf)).reshape(shape)

  return _random.per_leaf(jax.random.fold_in(key, index), params, draw)


def scalar_output(argname: str, value: Any) -> jax.Array:
  """``value`` as an array, refused (naming ``argname``) unless it is a scalar.

  A function that returns a vector (per-example losses, logits) would otherwise
  broadcast into the weights and give a silently wrong estimate.
  """
  value = jnp.asarray(value)
  if value.shape != ():
    raise TypeError(f"{argname} must return a scalar (shape ()), got an output of shape "
                    f"{value.shape}; reduce it, e.g. with jnp.mean or jnp.sum")
  return value


def check_inputs(params: Any, key: Any, *, allow_complex: bool = False) -> jax.Array:
  """Refuses non-float ``params`` leaves (naming the paths); ``key`` as a typed key."""
  _checks.check_float_leaves("params", params, allow_complex=allow_complex)
  return _random.as_key(key, argname="key")


def centered_ranks(values: jax.Array) -> jax.Array:
  """``rank / (N - 1) - 0.5`` (OpenAI ES, evosax), ranks from 0.

  Tied values share their average rank (as evosax and ``scipy.stats.rankdata``), so a
  plateau of equal fitness (e.g. accuracy) gets weight 0 on average instead of an order
  by position; NaN ranks as the largest value (the worst loss).
  """
  n = values.shape[0]
  rankable = jnp.where(jnp.isnan(values), jnp.inf, values)
  ranks = jax.scipy.stats.rankdata(rankable, method="average") - 1.0
  return ranks.astype(values.dtype) / max(n - 1, 1) - 0.5


def weights(fitness: jax.Array, f0: jax.Array | None, shaping: str | None,
            baseline: str | None) -> jax.Array:
  """Per-member weights ``w_i`` (members in order, shape (N,))."""
  n = fitness.shape[0]
  if shaping == "centered_rank":
    return centered_ranks(fitness)
  if shaping == "standardize":
    std = jnp.std(fitness)
    return (fitness - jnp.mean(fitness)) / jnp.where(std > 0, std, 1.0)
  if baseline == "f0":
    return fitness - f0
  if baseline == "mean":  # leave-one-out mean: unbiased
    return (fitness - jnp.mean(fitness)) * (n / max(n - 1, 1))
  return fitness
