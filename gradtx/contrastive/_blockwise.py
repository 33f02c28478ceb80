r"""Blockwise contrastive row losses: streaming log-sum-exp, no B × B matrix.

The row losses of ``_losses.dense_row_losses``,

.. math::
  \ell_i = \log \sum_{j \in A(i)} e^{s_{ij}} - \frac{1}{|P(i)|} \sum_{j \in P(i)} s_{ij},
  \qquad s_{ij} = \tau^{-1} \langle q_i, k_j \rangle,

are computed tile by tile. Rows and columns are cut into blocks of ``block_size`` (a
batch that does not divide is padded with masked rows and columns; no sample is
dropped). For each block of rows, the column blocks ``J`` are visited in turn and the
log-sum-exp is carried online (Milakov & Gimelshein's streaming softmax normaliser):

.. math::
  m_i \leftarrow \max(m_i, \max_{j \in J \cap A(i)} s_{ij}), \qquad
  l_i \leftarrow l_i\, e^{m_i^{old} - m_i} + \sum_{j \in J \cap A(i)} e^{s_{ij} - m_i},
  \qquad \mathrm{lse}_i = m_i + \log l_i,

together with the positive sums ``Σ_{j∈P(i)} s_ij`` and counts ``|P(i)|``. Rows without
a positive give ``ℓ_i = 0`` and ``has_positive = False``, as in the dense loss.

The backward pass is a ``jax.custom_vjp`` that recomputes each tile from ``q``, ``k``
and the saved ``lse``: with the upstream cotangent ``c_i`` of ``ℓ_i``,

.. math::
  g_{ij} = \frac{\partial}{\partial s_{ij}} \sum_i c_i \ell_i
    = c_i \Big(p_{ij} - \frac{[j \in P(i)]}{|P(i)|}\Big), \qquad
  p_{ij} = [j \in A(i)]\, e^{s_{ij} - \mathrm{lse}_i}

(``g_ij = 0`` on rows without a positive), and

.. math::
  \bar q_i = \tau^{-1} \sum_j g_{ij} k_j, \qquad
  \bar k_j = \tau^{-1} \sum_i g_{ij} q_i, \qquad
  \overline{\tau^{-1}} = \sum_{ij} g_{ij} \langle q_i, k_j \rangle.

Cost. Memory is O(B·d + block²): the residuals are ``q``, ``k``, the labels, ``τ⁻¹``,
``lse`` and the positive counts (O(B)); one tile of ``block × block`` scores lives at a
time. At B = 65536, d = 128 in float32 the dense matrix alone is 16 GiB, while the
blockwise ``value_and_grad`` of the symmetric InfoNCE needs about 160 MiB of
temporaries with ``block_size=1024`` (XLA CPU ``memory_analysis``; the tests check < 1 GiB).
FLOPs: the forward costs ``Bq·Bk·d`` multiply-adds, as the dense loss does; the
backward recomputes the scores and does the two products for ``q̄`` and ``k̄``, about
twice the forward's work again (3 tile matmuls instead of the dense backward's 2): the
price of never storing the matrix. Tiles are visited sequentially (``lax.map`` and
``lax.scan``), so a block of 512–2048 keeps the matmuls large enough to be efficient;
1024 is a sensible default. Forward-mode differentiation (``jax.jvp``, Hessians) is not
available through the custom VJP.

Computation is in float32, or float64 when the inputs are float64. Matmuls use JAX's
default precision, like the dense loss (set ``jax.default_matmul_precision`` to change
both).

References:
  Milakov, Gimelshein, "Online normalizer calculation for softmax", 2018,
  arXiv:1805.02867 (the streaming log-sum-exp).
  Dao, Fu, Ermon, Rudra, Ré, "FlashAttention: fast and memory-efficient exact attention
  with IO-awareness", 2022, arXiv:2205.14135 (tiling with recomputation in the backward).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from gradtx import _checks


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _pad_blocks(x: jax.Array, num_blocks: int, block: int) -> jax.Array:
  """``x`` (n, ...) zero-padded to ``num_blocks * block`` rows, as (num_blocks, block, ...)."""
  pad = num_blocks * block - x.shape[0]
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape((num_blocks, block) + x.shape[1:])


def _tile_masks(row_start, col_start, q_lab, k_lab, *, num_cols, exclude_self):
  """Allowed and positive masks of one (rows, cols) tile; padded columns not allowed."""
  rows = row_start + jnp.arange(q_lab.shape[0])
  cols = col_start + jnp.arange(k_lab.shape[0])
  allowed = jnp.broadcast_to(cols[None, :] < num_cols, (rows.shape[0], cols.shape[0]))
  if exclude_self:
    allowed = allowed & (rows[:, None] != cols[None, :])
  positive = allowed & (q_lab[:, None] == k_lab[None, :])
  return allowed, positive


def _forward(qb, kb, qlb, klb, inv_t, num_cols, exclude_self):
  """Streaming pass: per padded row, ``lse``, positive sum and positive count."""
  dtype = qb.dtype
  row_block, col_block = qb.shape[1], kb.shape[1]
  col_starts = jnp.arange(kb.shape[0]) * col_block

  def row_block_stats(xs):
    q_i, ql_i, row_start = xs

    def step(carry, ys):
      m, norm, pos_sum, pos_count = carry
      k_j, kl_j, col_start = ys
      s = (q_i @ k_j.T) * inv_t
      allowed, positive = _tile_masks(row_start, col_start, ql_i, kl_j,
                                      num_cols=num_cols, exclude_self=exclude_self)
      s_allowed = jnp.where(allowed, s, -jnp.inf)
      m_new = jnp.maximum(m, s_allowed.max(axis=1))
      shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing allowed yet
      norm = norm * jnp.exp(m - shift) + jnp.exp(s_allowed - shift[:, None]).sum(axis=1)
      pos_sum = pos_sum + jnp.where(positive, s, 0.0).sum(axis=1)
      pos_count = pos_count + positive.sum(axis=1, dtype=jnp.int32)
      return (m_new, norm, pos_sum, pos_count), None

    init = (
        jnp.full((row_block,), -jnp.inf, dtype),
        jnp.zeros((row_block,), dtype),
        jnp.zeros((row_block,), dtype),
        jnp.zeros((row_block,), jnp.int32),
    )
    (m, norm, pos_sum, pos_count), _ = jax.lax.scan(step, init, (kb, klb, col_starts))
    lse = jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(norm)  # -inf where nothing allowed
    return lse, pos_sum, pos_count

  row_starts = jnp.arange(qb.shape[0]) * row_block
  return jax.lax.map(row_block_stats, (qb, qlb, row_starts))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blockwise_core(qb, kb, qlb, klb, inv_t, num_cols, exclude_self):
  """Row losses and positive counts of the padded, blocked inputs (differentiable)."""
  loss, count, _ = _core_fwd_values(qb, kb, qlb, klb, inv_t, num_cols, exclude_self)
  return loss, count


def _core_fwd_values(qb, kb, qlb, klb, inv_t, num_cols, exclude_self):
  lse, pos_sum, count = _forward(qb, kb, qlb, klb, inv_t, num_cols, exclude_self)
  has_positive = count > 0
  loss = jnp.where(has_positive, lse - pos_sum / jnp.maximum(count, 1).astype(lse.dtype), 0.0)
  return loss, count, lse


def _core_fwd(qb, kb, qlb, klb, inv_t, num_cols, exclude_self):
  loss, count, lse = _core_fwd_values(qb, kb, qlb, klb, inv_t, num_cols, exclude_self)
  return (loss, count), (qb, kb, qlb, klb, inv_t, lse, count)


def _core_bwd(num_cols, exclude_self, residuals, cotangents):
  qb, kb, qlb, klb, inv_t, lse, count = residuals
  c_loss, _ = cotangents  # the integer count output carries no gradient
  dtype = qb.dtype
  row_block, col_block = qb.shape[1], kb.shape[1]
  has_positive = count > 0
  coef = jnp.where(has_positive, c_loss, 0.0).astype(dtype)  # c_i, 0 on rows without P(i)
  pos_coef = coef / jnp.maximum(count, 1).astype(dtype)  # c_i / |P(i)|
  safe_lse = jnp.where(has_positive, lse, 0.0)  # finite: a row with a positive has A(i)
  col_starts = jnp.arange(kb.shape[0]) * col_block
  row_starts = jnp.arange(qb.shape[0]) * row_block

  def row_step(carry, xs):
    dkb, dinv = carry
    q_i, ql_i, lse_i, coef_i, pos_coef_i, row_start = xs

    def col_step(inner, ys):
      dq_i, dkb, dinv = inner
      k_j, kl_j, col_start, j = ys
      raw = q_i @ k_j.T
      allowed, positive = _tile_masks(row_start, col_start, ql_i, kl_j,
                                      num_cols=num_cols, exclude_self=exclude_self)
      p = jnp.where(allowed, jnp.exp(raw * inv_t - lse_i[:, None]), 0.0)
      g = coef_i[:, None] * p - jnp.where(positive, pos_coef_i[:, None], 0.0)
      dq_i = dq_i + g @ k_j
      dkb = dkb.at[j].add(g.T @ q_i)
      dinv = dinv + jnp.sum(g * raw)
      return (dq_i, dkb, dinv), None

    init = (jnp.zeros_like(q_i), dkb, dinv)
    ys = (kb, klb, col_starts, jnp.arange(kb.shape[0]))
    (dq_i, dkb, dinv), _ = jax.lax.scan(col_step, init, ys)
    return (dkb, dinv), dq_i

  init = (jnp.zeros_like(kb), jnp.zeros((), dtype))
  xs = (qb, qlb, safe_lse, coef, pos_coef, row_starts)
  (dkb, dinv), dqb = jax.lax.scan(row_step, init, xs)
  dinv = dinv.astype(inv_t.dtype).reshape(inv_t.shape)
  return dqb * inv_t, dkb * inv_t, None, None, dinv


_blockwise_core.defvjp(_core_fwd, _core_bwd)


def blockwise_row_losses(
    q: jax.Array,
    k: jax.Array,
    q_labels: jax.Array,
    k_labels: jax.Array,
    inv_temperature: Any,
    *,
    exclude_self: bool,
    block_size: int,
) -> tuple[jax.Array, jax.Array]:
  r"""Per-row contrastive losses ``ℓ_i`` computed tile by tile (no B × B matrix).

  The same values as ``dense_row_losses``: with ``s_ij = <q_i, k_j> · inv_temperature``,
  allowed columns ``A(i)`` (all but ``j = i`` when ``exclude_self``) and positives
  ``P(i) = {j ∈ A(i) : k_labels[j] = q_labels[i]}``,

  .. math::
    \ell_i = \log \sum_{j \in A(i)} e^{s_{ij}} - \frac{1}{|P(i)|} \sum_{j \in P(i)} s_{ij}

  and 0 for rows without a positive. Gradients (for ``q``, ``k`` and
  ``inv_temperature``) come from a custom VJP that recomputes the tiles; memory is
  O(B·d + block_size²) forward and backward.

  Args:
    q: (Bq, d) anchor representations (float32 or float64).
    k: (Bk, d) candidate representations, the same dtype.
    q_labels: (Bq,) integer labels of the anchors.
    k_labels: (Bk,) integer labels of the candidates.
    inv_temperature: scalar ``1/τ`` (a float or a learnable array).
    exclude_self: leave column ``j = i`` out of ``A(i)`` (``q`` and ``k`` the same rows).
    block_size: rows and columns per tile (at most the batch size is used); 1024 is a
      sensible default: a 4 MiB float32 tile, matmuls large enough to be efficient.

  Returns:
    ``(row_loss, has_positive)``: (Bq,) losses in the compute dtype and (Bq,) bools.

  Example:
    >>> import jax.numpy as jnp
    >>> from gradtx.contrastive._blockwise import blockwise_row_losses
    >>> z, labels = jnp.eye(3), jnp.arange(3)
    >>> loss, ok = blockwise_row_losses(z, z, labels, labels, 1.0, exclude_self=False,
    ...                                 block_size=2)
    >>> [round(float(x), 4) for x in loss], bool(ok.all())  # log(e + 2) - 1
    ([0.5514, 0.5514, 0.5514], True)
  """
  _checks.check_static("block_size", block_size)
  _checks.check_int("block_size", block_size, minimum=1)
  _checks.check_bool("exclude_self", exclude_self)
  if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
    raise ValueError(f"q and k must be (B, d) arrays with the same d, got {q.shape} and {k.shape}")
  if q_labels.shape != q.shape[:1] or k_labels.shape != k.shape[:1]:
    raise ValueError(
        f"q_labels and k_labels must have shapes {q.shape[:1]} and {k.shape[:1]}, got "
        f"{q_labels.shape} and {k_labels.shape}"
    )
  dtype = jnp.promote_types(jnp.promote_types(q.dtype, k.dtype), jnp.float32)
  q, k = q.astype(dtype), k.astype(dtype)
  inv_t = jnp.asarray(inv_temperature, dtype)
  num_rows, num_cols = q.shape[0], k.shape[0]
  row_block = max(1, min(block_size, num_rows))
  col_block = max(1, min(block_size, num_cols))
  num_row_blocks, num_col_blocks = _cdiv(num_rows, row_block), _cdiv(num_cols, col_block)
  qb = _pad_blocks(q, num_row_blocks, row_block)
  kb = _pad_blocks(k, num_col_blocks, col_block)
  qlb = _pad_blocks(q_labels, num_row_blocks, row_block)
  klb = _pad_blocks(k_labels, num_col_blocks, col_block)
  loss, count = _blockwise_core(qb, kb, qlb, klb, inv_t, num_cols, bool(exclude_self))
  loss = loss.reshape(-1)[:num_rows]
  has_positive = count.reshape(-1)[:num_rows] > 0
  return loss, has_positive
