"""What the estimators share: each member's noise, the fitness weights, the input checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import _checks, _numerics, _paths, _random
from gradtx.estimators import _noise

NOISES = ("gaussian", "rademacher")
# Leaves of more entries draw their noise in blocks of BLOCK entries, block b from
# fold_in(leaf_key, b): a block can then be drawn (and used) alone, so a step can stream
# θ + σz through one perturbed buffer without materialising z (XLA:CPU runs threefry as a
# loop whose state would otherwise be two uint32 buffers of the leaf's size).
BLOCK = 1 << 16


def sampler(noise: str) -> Callable[..., jax.Array]:
  return jax.random.normal if noise == "gaussian" else jax.random.rademacher


def flat_noise(leaf_key: jax.Array, size: int, noise: str, dtype: Any) -> jax.Array:
  """A leaf's dense noise, flat: one draw up to BLOCK entries, else blocks of BLOCK."""
  sample = sampler(noise)
  if size <= BLOCK:
    return sample(leaf_key, (size,), dtype)
  full, rest = divmod(size, BLOCK)
  blocks = jax.vmap(lambda b: sample(jax.random.fold_in(leaf_key, b), (BLOCK,), dtype))(
      jnp.arange(full, dtype=jnp.uint32))
  parts = [blocks.reshape(-1)]
  if rest:
    parts.append(sample(jax.random.fold_in(leaf_key, full), (rest,), dtype))
  return jnp.concatenate(parts)


def streamed(base: jax.Array, leaf_key: jax.Array, noise: str, dtype: Any,
             fn: Callable[[jax.Array, jax.Array], jax.Array],
             mask: jax.Array | None = None) -> jax.Array:
  """``fn(base, z)`` for a leaf's dense noise ``z`` (:func:`flat_noise`), block by block.

  Each block of ``z`` is drawn, used and dropped (a ``fori_loop`` updating ``base``'s
  buffer in place), so no leaf-sized noise or RNG state is ever live. ``mask`` zeroes
  ``z`` outside it. ``fn`` is elementwise and keeps ``base``'s dtype.
  """
  shape, flat = base.shape, base.reshape(-1)
  flat_mask = None if mask is None else mask.reshape(-1)

  def apply(values, z, m):
    return fn(values, z if m is None else jnp.where(m, z, jnp.zeros((), z.dtype)))

  if flat.size <= BLOCK:
    return apply(flat, flat_noise(leaf_key, flat.size, noise, dtype), flat_mask).reshape(shape)
  sample = sampler(noise)
  full, rest = divmod(flat.size, BLOCK)

  def body(b, buf):
    start = b * BLOCK
    z = sample(jax.random.fold_in(leaf_key, b.astype(jnp.uint32)), (BLOCK,), dtype)
    m = None if flat_mask is None else jax.lax.dynamic_slice(flat_mask, (start,), (BLOCK,))
    block = apply(jax.lax.dynamic_slice(buf, (start,), (BLOCK,)), z, m)
    return jax.lax.dynamic_update_slice(buf, block, (start,))

  flat = jax.lax.fori_loop(0, full, body, flat)
  if rest:
    z = sample(jax.random.fold_in(leaf_key, full), (rest,), dtype)
    m = None if flat_mask is None else flat_mask[full * BLOCK:]
    flat = flat.at[full * BLOCK:].set(apply(flat[full * BLOCK:], z, m))
  return flat.reshape(shape)


def member_noise(key: jax.Array, index: jax.Array | int, params: Any, noise: str,
                 shape: _noise.Shaping | None = None) -> Any:
  """The noise ``ε`` of population member ``index``: a pytree like ``params`` (float32+).

  Leaf ``path`` draws from ``fold_in(fold_in(key, index), crc32(path) & 0x7FFFFFFF)``
  (:func:`gradtx._random.per_leaf`), flat and reshaped, in blocks of ``BLOCK`` entries
  beyond that size (:func:`flat_noise`). ``shape`` (:mod:`._noise`) masks it (frozen leaves are
  zeros drawn from nothing) or makes matrix leaves low rank (``U`` from that key, ``V``
  from ``fold_in(subspace_key or fold_in(key, index), crc32(path))``).
  """
  sample = sampler(noise)
  leaves = jax.tree.leaves(params)
  if shape is None:
    shape = _noise.Shaping((False,) * len(leaves), (None,) * len(leaves))
  member_key = jax.random.fold_in(key, index)
  v_keys = None
  if shape.rank is not None and leaves:
    v_base = member_key if shape.subspace_key is None else shape.subspace_key
    v_keys = _random.leaf_keys(v_base, _paths.tree_paths(params))
  order = iter(range(len(leaves)))  # per_leaf draws the leaves in order

  def draw(leaf_key, leaf):
    i = next(order)
    leaf_shape, dtype = jnp.shape(leaf), _numerics.compute_dtype(leaf)
    if shape.frozen[i]:
      return jnp.zeros(leaf_shape, dtype)
    if v_keys is not None and shape.rank is not None and len(leaf_shape) >= 2:
      z = _noise.low_rank(leaf_key, v_keys[i], leaf_shape, shape.rank, sample, dtype)
    else:
      # Drawn flat and reshaped: up to BLOCK entries the same values as drawing the
      # shape (threefry counts elements in row-major order), and faster on XLA:CPU.
      size = int(np.prod(leaf_shape, dtype=np.int64))
      z = flat_noise(leaf_key, size, noise, dtype).reshape(leaf_shape)
    mask = shape.masks[i]
    return z if mask is None else jnp.where(mask, z, jnp.zeros((), dtype))

  return _random.per_leaf(member_key, params, draw)


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
    assert f0 is not None, "baseline='f0' evaluates f(θ) first"
    return fitness - f0
  if baseline == "mean":  # leave-one-out mean: unbiased
    return (fitness - jnp.mean(fitness)) * (n / max(n - 1, 1))
  return fitness
