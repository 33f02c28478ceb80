"""Contrastive losses whose gradient accumulates exactly (GradCache, arXiv:2101.06983).

- Losses: :func:`info_nce` (CLIP, two towers), :func:`nt_xent` (SimCLR),
  :func:`supervised_contrastive`; ``block_size=`` streams them tile by tile.
- :func:`cached_value_and_grad`: the exact large-batch gradient at chunk-sized memory.
- :func:`representation_grad` + :func:`surrogate_loss`: the same, across separate calls
  (micro-batches under ``optax.MultiSteps``).
- :func:`sharded_cached_value_and_grad`: the batch sharded over a device mesh, global
  negatives, only representations cross devices.
"""

from gradtx.contrastive._cached import (
    cached_value_and_grad,
    representation_grad,
    surrogate_loss,
)
from gradtx.contrastive._losses import info_nce, l2_normalize, nt_xent, supervised_contrastive
from gradtx.contrastive._sharded import sharded_cached_value_and_grad

__all__ = (
    "cached_value_and_grad",
    "info_nce",
    "l2_normalize",
    "nt_xent",
    "representation_grad",
    "sharded_cached_value_and_grad",
    "supervised_contrastive",
    "surrogate_loss",
)
