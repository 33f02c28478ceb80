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
# The uniform in (-1, 1) of jax.random.normal: [0, 1) scaled onto [_LOW, 1).
_LOW = np.nextafter(np.float32(-1.0), np.float32(1.0))


def hashed_bits(leaf_key: jax.Array, size: int) -> jax.Array:
  """``size`` uint32 words: ``h_k = T(T(k (s_1 | 1) + s_0) ^ s_1)`` for entries ``k``.

  ``T`` is Wellons' triple32 integer mixer (:func:`gradtx._random.counter_hash`) and
  ``(s_0, s_1) = jax.random.bits(leaf_key, (2,))`` (the key's own generator, once per
  leaf). Entry ``k`` depends on ``k`` alone, not on an RNG state: XLA fuses the draw into
  whatever consumes it, so ``θ + σz`` is one pass over ``θ`` that never materialises
  ``z``.
  """
  if size >= 2**32:
    raise ValueError(f"a params leaf of {size:,} entries is too large for the noise's "
                     f"32-bit counter (at most 2**32 - 1 entries); split the leaf")
  s0, s1 = jax.random.bits(leaf_key, (2,), jnp.uint32)
  k = jax.lax.iota(jnp.uint32, size)
  return _random.counter_hash(k, s0, s1, "triple32")


def draw(leaf_key: jax.Array, shape: tuple[int, ...], noise: str, dtype: Any) -> jax.Array:
  """A leaf's noise of ``shape`` (entries in row-major order), from :func:`hashed_bits`.

  Gaussian: ``z_k = √2 erfinv(u_k)`` with ``u_k`` the top 23 bits of ``h_k`` as a uniform
  on ``[nextafter(-1, 1), 1)`` (the transform of ``jax.random.normal``), in float32;
  Rademacher: ``z_k = 1 - 2 (h_k >> 31)``. Cast to ``dtype``.
  """
  bits = hashed_bits(leaf_key, int(np.prod(shape, dtype=np.int64)))
  if noise == "gaussian":
    mantissa = (bits >> 9) | jnp.uint32(0x3F800000)  # a float in [1, 2)
    unit = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0
    uniform = jnp.maximum(_LOW, unit * (1.0 - _LOW) + _LOW)
    z = np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(uniform)
  else:
    z = 1.0 - 2.0 * (bits >> 31).astype(jnp.float32)
  return z.astype(dtype).reshape(shape)


def sampler(noise: str) -> Callable[..., jax.Array]:
  """``sample(leaf_key, shape, dtype)``: :func:`draw` of this ``noise``."""
  return lambda leaf_key, shape, dtype: draw(leaf_key, shape, noise, dtype)


def member_noise(key: jax.Array, index: jax.Array | int, params: Any, noise: str,
                 shape: _noise.Shaping | None = None) -> Any:
  """The noise ``ε`` of population member ``index``: a pytree like ``params`` (float32+).

  Leaf ``path`` draws from ``fold_in(fold_in(key, index), crc32(path) & 0x7FFFFFFF)``
  (:func:`gradtx._random.per_leaf`) with :func:`draw`. ``shape`` (:mod:`._noise`) masks it
  (frozen leaves are zeros drawn from nothing) or makes matrix leaves low rank (``U``
  from that key, ``V`` from ``fold_in(subspace_key or fold_in(key, index), crc32(path))``).
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

  def leaf_noise(leaf_key, leaf):
    i = next(order)
    leaf_shape, dtype = jnp.shape(leaf), _numerics.compute_dtype(leaf)
    if shape.frozen[i]:
      return jnp.zeros(leaf_shape, dtype)
    if v_keys is not None and shape.rank is not None and len(leaf_shape) >= 2:
      z = _noise.low_rank(leaf_key, v_keys[i], leaf_shape, shape.rank, sample, dtype)
    else:
      z = sample(leaf_key, leaf_shape, dtype)
    mask = shape.masks[i]
    return z if mask is None else jnp.where(mask, z, jnp.zeros((), dtype))

  return _random.per_leaf(member_key, params, leaf_noise)


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
