"""Randomness: typed keys, one key per leaf keyed by its path, and state keys.

Leaf ``path`` of a step draws with ``fold_in(step_key, crc32(path) & 0x7FFFFFFF)``
(:func:`leaf_keys`), so a leaf's draw does not change when other leaves are added or
hidden (``optax.masked``). Transformations keep the raw key data in their state and split
it once per update (:func:`split_state_key`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import _paths


def is_key(value: Any) -> bool:
  """Whether ``value`` is a typed key or raw ``PRNGKey`` data (uint32 of shape (2,) etc.)."""
  if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
    return True
  return (isinstance(value, (jax.Array, np.ndarray)) and value.dtype == np.uint32
          and value.ndim == 1)


def as_key(key: Any, *, argname: str = "key") -> jax.Array:
  """A single typed ``jax.random`` key from a typed key or a raw ``PRNGKey`` (uint32)."""
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"{argname} must be a single key (shape ()), got shape {key.shape}; "
                       f"index one key of the batch, e.g. {argname}[0]")
    return key
  if not is_key(key):
    raise TypeError(f"{argname} must be a jax.random key (jax.random.key(seed) or "
                    f"jax.random.PRNGKey(seed)), got {_describe(key)}")
  try:
    return jax.random.wrap_key_data(key)
  except (TypeError, ValueError) as err:
    raise TypeError(
        f"{argname}: raw key data of shape {key.shape} is not a default-implementation key; "
        f"pass a typed key instead (jax.random.key(seed, impl=...))") from err


def _describe(value: Any) -> str:
  if isinstance(value, (jax.Array, np.ndarray)):
    return f"an array of dtype {value.dtype} and shape {value.shape}"
  return repr(value)


def leaf_keys(key: jax.Array, paths: Sequence[str]) -> jax.Array:
  """One key per path, ``fold_in(key, crc32(path) & 0x7FFFFFFF)``, in one vectorised op."""
  ids = jnp.asarray([zlib.crc32(p.encode()) & 0x7FFFFFFF for p in paths], jnp.uint32)
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def per_leaf(key: jax.Array, tree: Any, draw: Callable[[jax.Array, Any], Any]) -> Any:
  """``draw(leaf_key, leaf)`` for every leaf, with the leaf's path-keyed key.

  A leaf's draw depends only on ``key`` and its path (:func:`leaf_keys`). An empty tree
  gives itself back.
  """
  paths, treedef = _paths.leaf_paths_and_treedef(tree)
  if not paths:
    return tree
  keys = leaf_keys(key, paths)
  return jax.tree.unflatten(
      treedef, [draw(keys[i], leaf) for i, leaf in enumerate(jax.tree.leaves(tree))])


def split_state_key(raw_key: jax.Array, impl: Any) -> tuple[jax.Array, jax.Array]:
  """``(raw data of the next state key, this update's typed key)`` from a state's key data."""
  next_key, step_key = jax.random.split(jax.random.wrap_key_data(raw_key, impl=impl))
  return jax.random.key_data(next_key), step_key


# Wellons' integer mixers, bijections of uint32 with low avalanche bias: rounds of
# ``x = (x ^ (x >> shift)) * multiplier``, then ``x ^ (x >> final)``.
MIXERS = {
    "lowbias32": (((16, 0x7FEB352D), (15, 0x846CA68B)), 16),
    "triple32": (((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB)), 14),
}


def mix32(x: jax.Array, mixer: str) -> jax.Array:
  """One of :data:`MIXERS` applied to the uint32 array ``x``."""
  rounds, final = MIXERS[mixer]
  for shift, multiplier in rounds:
    x = (x ^ (x >> shift)) * jnp.uint32(multiplier)
  return x ^ (x >> final)


def counter_hash(index: jax.Array, seed0: jax.Array, seed1: jax.Array,
                 mixer: str) -> jax.Array:
  """``h_k = M(M(k (s_1 | 1) + s_0) ^ s_1)`` for the uint32 counters ``k = index``.

  Keyed by two uint32 words; entry ``k`` depends on ``k`` alone, not on a generator
  state, so XLA fuses the draw into whatever consumes it.
  """
  return mix32(mix32(index * (seed1 | jnp.uint32(1)) + seed0, mixer) ^ seed1, mixer)
