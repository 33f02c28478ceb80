"""Models shared by the attribution tests (a helper module: not collected)."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx


class NnxStack(nnx.Module):
  """Embed -> ``layers`` blocks in an ``nnx.List``, in turn -> a linear head of the mean over
  tokens: ids (N, T) -> (N, classes). Blocks are paths ``blocks/0``, ``blocks/1``, ..."""

  def __init__(self, vocab: int, dim: int, classes: int,
               make_block: Callable[[nnx.Rngs], nnx.Module], layers: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.blocks = nnx.List([make_block(rngs) for _ in range(layers)])
    self.head = nnx.Linear(dim, classes, rngs=rngs)

  def __call__(self, ids):
    h = self.embed(ids)
    for block in self.blocks:
      h = block(h)
    return self.head(h.mean(axis=1))
