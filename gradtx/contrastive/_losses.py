"""Contrastive losses: InfoNCE / CLIP, SimCLR's NT-Xent and supervised contrastive.

All three are one loss over a similarity matrix ``s_ij = <q_i, k_j> / τ`` with a set of
*allowed* columns ``A(i)`` (everything but, where ``q`` and ``k`` are the same samples,
the anchor itself) and a set of *positive* columns ``P(i) ⊆ A(i)`` (same label):

.. math::
  \\ell_i = \\log \\sum_{j \\in A(i)} e^{s_{ij}} - \\frac{1}{|P(i)|} \\sum_{j \\in P(i)} s_{ij},
  \\qquad L = \\frac{1}{|\\{i : P(i) \\neq \\emptyset\\}|} \\sum_{i : P(i) \\neq \\emptyset} \\ell_i

Su's form of it, ``L = -Σ t_ij s_ij + Σ_i log Σ_j e^{s_ij}``, is the case of one positive
per row. The log-sum-exp is the stable one (max subtracted). With ``block_size`` the
loss is computed tile by tile with a streaming log-sum-exp and a custom VJP, so the
B × B matrix never exists (see ``_blockwise.py``).

References:
  van den Oord, Li, Vinyals, "Representation learning with contrastive predictive
  coding", 2018, arXiv:1807.03748 (InfoNCE).
  Radford et al., "Learning transferable visual models from natural language
  supervision", 2021, arXiv:2103.00020 (CLIP's symmetric loss).
  Chen, Kornblith, Norouzi, Hinton, "A simple framework for contrastive learning of
  visual representations", 2020, arXiv:2002.05709 (NT-Xent).
  Khosla et al., "Supervised contrastive learning", 2020, arXiv:2004.11362 (L_out).
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gradtx import _checks, _numerics
from gradtx.contrastive import _blockwise


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  r"""Rows scaled to unit L2 norm (in at least float32); zero rows stay zero.

  .. math::
    \hat x_i = \frac{x_i}{\max(\|x_i\|_2, \epsilon)}

  Args:
    x: an array whose last axis holds the features.
    eps: ``ε`` > 0, the smallest norm divided by (rows shorter than it are scaled by
      ``1/ε`` instead: a zero row stays zero).

  Returns:
    ``x`` with unit-norm rows, in float32 (float64 for float64 input).

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> gradtx.l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
  """
  _checks.check_positive("eps", eps, allow_schedule=False)
  x = x.astype(_numerics.compute_dtype(x))
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def dense_row_losses(q, k, q_labels, k_labels, inv_temperature, *, exclude_self):
  """Per-row loss ``ℓ_i`` and whether row i has a positive, from the dense B × B matrix.

  The reference the blockwise path (``_blockwise.blockwise_row_losses``) must match.
  """
  s = (q @ k.T) * inv_temperature
  allowed = jnp.ones(s.shape, bool)
  if exclude_self:
    allowed = ~jnp.eye(s.shape[0], s.shape[1], dtype=bool)
  positive = (q_labels[:, None] == k_labels[None, :]) & allowed
  lse = jax.nn.logsumexp(jnp.where(allowed, s, -jnp.inf), axis=1)
  num_positives = positive.sum(axis=1)
  has_positive = num_positives > 0
  positive_mean = jnp.where(positive, s, 0.0).sum(axis=1) / jnp.maximum(num_positives, 1)
  return jnp.where(has_positive, lse - positive_mean, 0.0), has_positive


def _inverse_temperature(temperature: chex.Numeric, dtype: jax.typing.DTypeLike) -> jax.Array:
  """``1/τ`` in ``dtype``; a traced τ ≤ 0 (a learnable one, unchecked) gives NaN."""
  tau = jnp.asarray(temperature, dtype)
  inv_temperature = 1.0 / tau
  if _checks.concrete_scalar(temperature) is None:
    # A traced τ ≤ 0 gives a visible NaN, not a loss with the similarities' sign flipped.
    inv_temperature = jnp.where(tau > 0, inv_temperature, jnp.nan)
  return inv_temperature


def _compute_dtype(q: jax.Array, k: jax.Array) -> np.dtype:
  return jnp.promote_types(_numerics.compute_dtype(q), _numerics.compute_dtype(k))


def _softmax_loss(q, k, labels, temperature, *, block_size, axis_name, pairs):
  """The mean of the row losses ``ℓ_i`` over the rows with a positive (all devices).

  ``pairs``: ``"rows"`` (q against k), ``"both"`` (``½ (mean over the rows of q + mean
  over the rows of k)`` of the same scores, CLIP; tiled, both directions come out of one
  pass) or ``"self"`` (``k`` is ``q``, the anchor itself left out: NT-Xent, SupCon).
  """
  dtype = _compute_dtype(q, k)
  q, k = q.astype(dtype), k.astype(dtype)
  inv_temperature = _inverse_temperature(temperature, dtype)
  exclude_self = pairs == "self"
  if block_size is None and axis_name is None:
    sides = [dense_row_losses(q, k, labels, labels, inv_temperature,
                              exclude_self=exclude_self)]
    if pairs == "both":
      sides.append(dense_row_losses(k, q, labels, labels, inv_temperature,
                                    exclude_self=exclude_self))
  else:
    sides = list(_blockwise.tiled_losses(
        _blockwise.Softmax, q, k, labels, labels, inv_temperature,
        exclude_self=exclude_self, block_size=block_size, axis_name=axis_name, mode=pairs))
  means = [_mean_over_anchors(rows, has_positive, axis_name) for rows, has_positive in sides]
  return means[0] if len(means) == 1 else 0.5 * (means[0] + means[1])


def _mean_over_anchors(row_loss: jax.Array, has_positive: jax.Array,
                       axis_name: str | None = None) -> jax.Array:
  if axis_name is not None:
    return _blockwise.global_mean(row_loss, has_positive, axis_name)
  count = jnp.maximum(has_positive.sum(), 1)
  return jnp.sum(jnp.where(has_positive, row_loss, 0.0)) / count


def _check_representations(name: str, x: Any) -> None:
  if not hasattr(x, "ndim") or x.ndim != 2:
    shape = getattr(x, "shape", type(x).__name__)
    raise ValueError(f"{name} must be a 2-D array (batch, features), got shape {shape}")
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    raise TypeError(f"{name} must be a real array, got dtype {x.dtype}: the similarity "
                    f"<q_i, k_j> of complex rows is not a real logit")


def _check_pair(name_a: str, a: Any, name_b: str, b: Any, axis_name: Any) -> None:
  """Two (B, d) towers paired row by row (this device's rows when ``axis_name``)."""
  _check_representations(name_a, a)
  _check_representations(name_b, b)
  if a.shape[0] != b.shape[0]:
    local = (f" (the local batches of this device inside shard_map over {axis_name!r}: each "
             f"device must hold the same rows of both)" if axis_name is not None else "")
    raise ValueError(
        f"{name_a} and {name_b} must have the same batch size (towers are paired row by "
        f"row){local}, got {name_a}.shape={a.shape} and {name_b}.shape={b.shape}"
    )
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"{name_a} and {name_b} must have the same feature size, got {a.shape} "
                     f"and {b.shape}")


def _check_axis_name(axis_name: Any) -> None:
  """``None`` or the name of an axis bound by an enclosing ``jax.shard_map``."""
  if axis_name is None:
    return
  if not isinstance(axis_name, str):
    raise TypeError(f"axis_name must be None or the name (a str) of the mesh axis that "
                    f"shards the batch, got {axis_name!r}")
  try:
    jax.lax.axis_size(axis_name)
  except NameError:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound: the ring losses run inside "
        f"jax.shard_map(..., mesh=mesh, in_specs=P({axis_name!r}), ...) over a mesh with "
        f"the axis {axis_name!r}, each device passing its own rows; outside shard_map, use "
        f"axis_name=None"
    ) from None


def _check_common(temperature: Any, block_size: Any, axis_name: Any = None) -> None:
  """τ: a scalar, > 0 when concrete (a traced τ ≤ 0 gives NaN); block_size: static int."""
  _checks.check_positive("temperature", temperature, allow_schedule=False)
  if block_size is not None:
    _checks.check_static("block_size", block_size)
    _checks.check_int("block_size", block_size, minimum=1)
  _check_axis_name(axis_name)


def _check_labels(labels: Any, batch: int, name: str = "labels") -> jax.Array:
  labels = jnp.asarray(labels)
  if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(
        f"{name} must be an integer array of shape ({batch},), got "
        f"{labels.dtype} array of shape {labels.shape}"
    )
  return labels


def _labels_or_ids(labels: Any, batch: int, axis_name: str | None) -> jax.Array:
  """The given labels (this device's rows), or each row's global position."""
  if labels is None:
    return _blockwise.global_ids(batch, axis_name)
  return _check_labels(labels, batch)


def info_nce(
    a: jax.Array,
    b: jax.Array,
    *,
    temperature: chex.Numeric,
    symmetric: bool = True,
    labels: jax.Array | None = None,
    normalize: bool = True,
    block_size: int | None = None,
    axis_name: str | None = None,
) -> jax.Array:
  r"""InfoNCE between two towers; with ``symmetric=True``, CLIP's loss.

  Row i of ``a`` is paired with row i of ``b`` (or, with ``labels``, with every row of
  ``b`` of the same label). With ``s_ij = <a_i, b_j> / τ``:

  .. math::
    L_{a \to b} = \frac{1}{B} \sum_i \Big[\log \sum_j e^{s_{ij}}
      - \frac{1}{|P(i)|} \sum_{j \in P(i)} s_{ij}\Big], \qquad
    L = \tfrac12 (L_{a \to b} + L_{b \to a}) \text{ if symmetric}

  Args:
    a: (B, d) representations of the first tower (the anchors).
    b: (B, d) representations of the second tower.
    temperature: τ > 0: a Python float or a scalar array — a learnable parameter gets
      its gradient (e.g. ``jnp.exp(log_tau)``). A traced τ ≤ 0 gives a NaN loss.
    symmetric: average the a→b and b→a directions (CLIP). Tiled or as a ring, both
      directions come out of the same tiles (one pass, one ring: the ``b`` block
      carries its columns' log-sum-exp statistics).
    labels: optional (B,) integer labels; positives are all pairs with equal labels.
    normalize: use cosine similarity (rows scaled to unit norm first), as CLIP does.
    block_size: compute the loss in tiles of this many rows/columns without forming
      the B × B matrix (streaming log-sum-exp, custom VJP); ``None`` = dense (one tile
      per ring hop with ``axis_name``). A static Python int (it sets the tile shapes).
    axis_name: the name of the mesh axis that shards the batch, to call the loss inside
      ``jax.shard_map``: each device passes its own rows (and labels) and gets the loss
      of the whole batch, computed as a ring (``lax.ppermute``, ``n − 1`` hops, forward
      and backward, never the all-gathered batch); its gradient w.r.t. the local rows
      is their share of the global gradient. ``None``: one device.

  Returns:
    The scalar loss, float32 (float64 for float64 inputs).

  Raises:
    TypeError: ``temperature`` is None, a string or a schedule; ``block_size`` is not
      an int or is traced; ``symmetric`` or ``normalize`` not a bool; complex
      representations; ``axis_name`` not a str.
    ValueError: a concrete ``temperature`` ≤ 0 or non-finite, or not a scalar;
      ``block_size`` < 1; ``a`` and ``b`` not (B, d) arrays of the same shape; bad
      ``labels``; ``axis_name`` not bound by an enclosing ``shard_map``.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> a = jnp.eye(3)
    >>> round(float(gradtx.info_nce(a, a, temperature=1.0)), 4)  # log(1 + 2e^-1) ...
    0.5514

  References:
    van den Oord et al., 2018, arXiv:1807.03748; Radford et al., 2021, arXiv:2103.00020;
    Cheng et al., "Breaking the memory barrier" (Inf-CL), 2024, arXiv:2410.17243 (ring).
  """
  _check_pair("a", a, "b", b, axis_name)
  _check_common(temperature, block_size, axis_name)
  _checks.check_bool("symmetric", symmetric)
  _checks.check_bool("normalize", normalize)
  labels = _labels_or_ids(labels, a.shape[0], axis_name)
  if normalize:
    a, b = l2_normalize(a), l2_normalize(b)

  return _softmax_loss(a, b, labels, temperature, block_size=block_size,
                       axis_name=axis_name, pairs="both" if symmetric else "rows")


def nt_xent(z1: jax.Array, z2: jax.Array, *, temperature: chex.Numeric,
            block_size: int | None = None, axis_name: str | None = None) -> jax.Array:
  r"""SimCLR's NT-Xent: one tower, two augmented views of each of B samples.

  The 2B rows ``z = [z1; z2]`` are L2-normalised; each row's positive is the other view
  of the same sample, its negatives the other 2B - 2 rows:

  .. math::
    L = \frac{1}{2B} \sum_{i=1}^{2B} -\log
      \frac{e^{s_{i, i \pm B}}}{\sum_{j \neq i} e^{s_{ij}}}, \qquad
    s_{ij} = \frac{\langle z_i, z_j \rangle}{\tau \|z_i\| \|z_j\|}

  ``temperature``, ``block_size`` and ``axis_name`` are those of :func:`info_nce`
  (learnable τ; tiles without the 2B × 2B matrix; a ring inside ``jax.shard_map``, where
  each device passes both views of its own samples). The rows are compared with each
  other, so the backward needs no travelling gradient of the columns: 2 tile products
  per tile instead of 3.

  Args:
    z1: (B, d) representations of the first views.
    z2: (B, d) representations of the second views.
    temperature: τ > 0, as in :func:`info_nce`.
    block_size: rows and columns per tile, as in :func:`info_nce`; ``None`` = dense.
    axis_name: the mesh axis that shards the batch, as in :func:`info_nce`.

  Returns:
    The scalar loss, float32 (float64 for float64 inputs).

  Raises:
    TypeError: as :func:`info_nce` (``temperature``, ``block_size``, complex inputs,
      ``axis_name``).
    ValueError: as :func:`info_nce`, and ``z1`` and ``z2`` not (B, d) arrays of the
      same shape.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> z = jnp.eye(2)
    >>> round(float(gradtx.nt_xent(z, z, temperature=1.0)), 4)  # -log(e / (e + 2))
    0.5514

  References:
    Chen, Kornblith, Norouzi, Hinton, "SimCLR", ICML 2020, arXiv:2002.05709.
  """
  _check_representations("z1", z1)
  _check_representations("z2", z2)
  if z1.shape != z2.shape:
    raise ValueError(
        f"z1 and z2 must have the same shape (two views of the same samples), got "
        f"{z1.shape} and {z2.shape}"
    )
  _check_common(temperature, block_size, axis_name)
  z = jnp.concatenate([l2_normalize(z1), l2_normalize(z2)], axis=0)  # no unnormalised copy
  labels = jnp.tile(_blockwise.global_ids(z1.shape[0], axis_name), 2)
  return _softmax_loss(z, z, labels, temperature, block_size=block_size,
                       axis_name=axis_name, pairs="self")


def supervised_contrastive(z: jax.Array, labels: jax.Array, *, temperature: chex.Numeric,
                           block_size: int | None = None,
                           axis_name: str | None = None) -> jax.Array:
  r"""Supervised contrastive loss (Khosla et al.'s :math:`L^{sup}_{out}`).

  Rows are L2-normalised; the positives of anchor i are the other rows with its label:

  .. math::
    L = \frac{1}{|I^+|} \sum_{i \in I^+} \frac{-1}{|P(i)|} \sum_{p \in P(i)}
      \log \frac{e^{s_{ip}}}{\sum_{a \neq i} e^{s_{ia}}}

  Anchors whose label occurs only once have no positive; they are left out of the mean
  (``I^+`` are the anchors with at least one positive), and a batch with none gives 0.

  ``temperature``, ``block_size`` and ``axis_name`` are those of :func:`nt_xent` (and of
  :func:`info_nce`); under ``jax.shard_map`` each device passes its own rows and labels.

  Args:
    z: (N, d) representations (stack the views of each sample as separate rows).
    labels: (N,) integer class labels.
    temperature: τ > 0, a float or a learnable scalar array.
    block_size: tiles of this many rows and columns (a static int); ``None``: the
      dense N × N scores.
    axis_name: the mesh axis whose devices each hold rows of ``z`` and ``labels``
      (the loss is then a ring over them); ``None``: one device.

  Returns:
    The scalar loss (float32, or float64 for float64 ``z``).

  Raises:
    TypeError, ValueError: those of :func:`nt_xent` for a bad ``temperature``,
      ``block_size``, ``axis_name`` or a complex ``z``; ValueError also for ``z`` not
      (N, d) or ``labels`` not an (N,) integer array.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> z = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> loss = gradtx.supervised_contrastive(z, jnp.array([0, 0, 1]), temperature=1.0)
    >>> round(float(loss), 4)  # -log(e / (e + 1)): the two anchors of class 0
    0.3133

  References:
    Khosla et al., "Supervised contrastive learning", NeurIPS 2020, arXiv:2004.11362.
  """
  _check_representations("z", z)
  _check_common(temperature, block_size, axis_name)
  labels = _check_labels(labels, z.shape[0])
  z = l2_normalize(z)
  return _softmax_loss(z, z, labels, temperature, block_size=block_size,
                       axis_name=axis_name, pairs="self")
