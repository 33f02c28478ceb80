"""Chunking: a leading axis cut into stacked full chunks plus a remainder.

Memory-bounded loops (population members, interpolation steps, batch chunks) all take
the same shape: ``n`` items, ``chunk`` of them live at a time. The ``n // chunk`` full
chunks are stacked and run under ``lax.map`` / ``lax.scan``; the ``n % chunk`` items left
over run once more, outside the loop. No padding, so no wasted work and no masking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Chunks(NamedTuple):
  """A pytree's axis 0 split as ``full`` (``(num_full, chunk, ...)``) and ``rest``."""

  full: Any
  rest: Any
  num_full: int

  @property
  def has_rest(self) -> bool:
    return any(x.shape[0] > 0 for x in jax.tree.leaves(self.rest))


def split(tree: Any, chunk: int) -> Chunks:
  """Cuts axis 0 of every leaf into ``n // chunk`` stacked chunks and the remainder."""
  leaves = jax.tree.leaves(tree)
  n = leaves[0].shape[0] if leaves else 0
  num_full = n // chunk
  full = jax.tree.map(
      lambda x: x[: num_full * chunk].reshape((num_full, chunk) + x.shape[1:]), tree)
  rest = jax.tree.map(lambda x: x[num_full * chunk:], tree)
  return Chunks(full, rest, num_full)


def concat(full: Any, rest: Any) -> Any:
  """The inverse of :func:`split` for per-item outputs: ``(num_full, chunk, ...)`` + rest."""
  return jax.tree.map(
      lambda f, r: jnp.concatenate([f.reshape((-1,) + f.shape[2:]), r], axis=0), full, rest)


def map_chunks(fn: Callable[[Any], Any], tree: Any, chunk: int) -> Any:
  """``fn`` over chunks of axis 0, outputs concatenated: ``fn(tree)`` at bounded memory.

  ``fn`` maps a batch of items to per-item outputs (axis 0 of the same length).
  """
  chunks = split(tree, chunk)
  out_full = jax.lax.map(fn, chunks.full) if chunks.num_full else None
  out_rest = fn(chunks.rest) if chunks.has_rest else None
  if out_full is None:
    return out_rest
  if out_rest is None:
    return jax.tree.map(lambda f: f.reshape((-1,) + f.shape[2:]), out_full)
  return concat(out_full, out_rest)


def sum_chunks(fn: Callable[[Any], Any], tree: Any, chunk: int, init: Any = None) -> Any:
  """``Σ_chunks fn(chunk)``: ``fn`` of a batch of items returns their summed pytree.

  The full chunks run under ``lax.scan`` starting from the first chunk's sum (not from
  zeros, so the carry has ``fn``'s own type and sharding, also inside ``shard_map``); the
  remainder is added once after the loop. ``init``, if given, is a pytree like ``fn``'s
  output that the sum starts from (``init + Σ``): the loop then accumulates into it, with
  no buffer for the first chunk's sum beside it.
  """
  chunks = split(tree, chunk)
  total, start = init, 0
  if chunks.num_full:
    if total is None:
      total, start = fn(jax.tree.map(lambda x: x[0], chunks.full)), 1
    if chunks.num_full > start:
      # Chunks are read by index, not scanned over ``full[1:]``: that slice is a copy.
      def add_chunk(acc: Any, i: jax.Array) -> tuple[Any, None]:
        chunk_i = jax.tree.map(
            lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), chunks.full)
        return jax.tree.map(jnp.add, acc, fn(chunk_i)), None
      total = jax.lax.scan(add_chunk, total, jnp.arange(start, chunks.num_full))[0]
  if chunks.has_rest:
    tail = fn(chunks.rest)
    total = tail if total is None else jax.tree.map(jnp.add, total, tail)
  if total is None:
    raise ValueError("sum_chunks: there are no items to sum (axis 0 has length 0)")
  return total
