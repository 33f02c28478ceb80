"""Contrastive losses whose gradient accumulates exactly (GradCache, arXiv:2101.06983).

- Losses: :func:`info_nce` (CLIP, two towers), :func:`nt_xent` (SimCLR),
  :func:`supervised_contrastive`, :func:`sigmoid_contrastive` (SigLIP); ``block_size=``
  streams them tile by tile, ``axis_name=`` runs them as a ring inside ``jax.shard_map``.
- :func:`cached_value_and_grad`: the exact large-batch gradient at chunk-sized memory.
- :func:`representation_grad` + :func:`surrogate_loss`: the same, across separate calls
  (micro-batches under ``optax.MultiSteps``).
- :func:`sharded_cached_value_and_grad`: the batch sharded over a device mesh, global
  negatives, only representations cross devices (all-gathered, or around a ring).
"""

from gradtx.contrastive._cached import (
    cached_value_and_grad,
    representation_grad,
    surrogate_loss,
)
from gradtx.contrastive._losses import info_nce, l2_normalize, nt_xent, supervised_contrastive
from gradtx.contrastive._sharded import sharded_cached_value_and_grad
from gradtx.contrastive._sigmoid import sigmoid_contrastive

__all__ = (
    "cached_value_and_grad",
    "info_nce",
    "l2_normalize",
    "nt_xent",
    "representation_grad",
    "sharded_cached_value_and_grad",
    "sigmoid_contrastive",
    "supervised_contrastive",
    "surrogate_loss",
)
