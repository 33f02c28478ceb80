r"""Tiled and ring-sharded pairwise losses: no B × B matrix, no all-gathered batch.

Every contrastive loss of this package is a sum of per-row losses over a similarity
matrix ``s_ij = τ⁻¹ <q_i, k_j> + β`` with a set of *allowed* columns ``A(i)`` and a set of
*positive* columns ``P(i) ⊆ A(i)`` (equal labels). Two kernels share the tiling code:

- softmax (InfoNCE, NT-Xent, SupCon; ``β = 0``):
  ``ℓ_i = log Σ_{j∈A(i)} e^{s_ij} − |P(i)|⁻¹ Σ_{j∈P(i)} s_ij``, carried online with a
  streaming log-sum-exp (Milakov & Gimelshein):
  ``m_i ← max(m_i, max_j s_ij)``, ``l_i ← l_i e^{m_i^{old} − m_i} + Σ_j e^{s_ij − m_i}``,
  ``lse_i = m_i + log l_i``; rows without a positive give ``ℓ_i = 0`` and do not count;
- sigmoid (SigLIP): ``ℓ_i = −Σ_{j∈A(i)} log σ(z_ij s_ij)``, ``z_ij = ±1`` (positive or
  not): a plain sum, no normaliser to carry.

**Tiles.** Rows and columns are cut into blocks of ``block_size`` (a batch that does not
divide is padded with masked rows and columns; nothing is dropped). For each block of
rows the column blocks are visited in turn (``lax.scan`` over row blocks and over
column blocks); one ``block × block`` tile of scores lives at a time.

**Both directions, one pass** (``mode="both"``, CLIP's symmetric InfoNCE): the loss of
``k``'s rows against ``q`` is the kernel on the *columns* of the same scores, so each
tile also updates column statistics (the kernel on the transposed tile), which travel
with the ``k`` block; each tile is multiplied once for both directions, forward and
backward. **Self pairs** (``mode="self"``, NT-Xent, SupCon: ``k`` is ``q``): forward
as ``"rows"``; the backward uses ``s_ij = s_ji`` (see below).

**The ring** (``axis_name=``, inside ``jax.shard_map`` over ``n`` devices). Device ``d``
holds its rows ``q⁽ᵈ⁾`` and its block ``k⁽ᵈ⁾``. It accumulates the row statistics of
``q⁽ᵈ⁾`` against ``k⁽ᵈ⁾``, passes the ``k`` block (with its labels and global row ids) to
device ``d + 1`` with ``lax.ppermute`` while it computes, and repeats: after ``n − 1``
hops every row has seen every column (Inf-CL, Cheng et al. 2024); with ``"both"`` the
block's column statistics come home in one more (small) hop. Per device and hop:
``B/n`` rows of work, memory ``O((B/n)·d + block²)``; the all-gathered ``B × d`` never
exists. The backward pass is a ring too: the ``k`` block travels again together with its
gradient accumulator ``k̄`` (and, with ``"both"``, its columns' cotangents and saved
log-sum-exps), which every device adds its rows' share to; one last hop brings ``k̄``
home. With ``"self"`` no ``k̄`` travels: the travelling rows carry their own cotangents
and saved values, and ``g_ji``, their tile's gradient transposed, is the local rows'
gradient through the columns, so ``q̄_i = τ⁻¹ Σ_j (g_ij + g_ji) q_j`` is complete on its
own device. Row ids are global (``axis_index · rows``), so self-exclusion and the
default labels are those of the single-device loss.

**Gradients** (a ``jax.custom_vjp`` recomputing the tiles from ``q``, ``k`` and per-row
saved values; ``c_i`` the cotangent of ``ℓ_i``): ``g_ij = ∂(Σ_i c_i ℓ_i)/∂s_ij`` is

.. math::
  g_{ij} = c_i \Big([j \in A(i)]\, e^{s_{ij} - \mathrm{lse}_i}
    - \frac{[j \in P(i)]}{|P(i)|}\Big) \ \text{(softmax)}, \qquad
  g_{ij} = -c_i\, [j \in A(i)]\, z_{ij}\, \sigma(-z_{ij} s_{ij}) \ \text{(sigmoid)},

and ``q̄_i = τ⁻¹ Σ_j g_ij k_j``, ``k̄_j = τ⁻¹ Σ_i g_ij q_i``, ``∂τ⁻¹ = Σ_ij g_ij <q_i, k_j>``,
``β̄ = Σ_ij g_ij``. ``τ`` and ``β`` are replicated over the ring: their gradients are the
``psum`` of every device's share. The cotangents ``c_i`` are those of each device's own
rows; the ring's global mean (:func:`global_mean`) has the semantics of a replicated
loss (its cotangent, the same on every device, is not summed over the devices), under
``check_vma=True`` or ``False`` alike.

Cost. The forward costs ``Bq·Bk·d`` multiply-adds, as the dense loss; the backward
recomputes the scores and does the two products for ``q̄`` and ``k̄`` (3 tile matmuls
instead of the dense backward's 2: the price of never storing the matrix; 2 with
``"self"``). With ``"both"`` the two directions share these products (the dense
symmetric loss computes the matrix twice). At B = 65536, d = 128 in float32 the dense
matrix alone is 16 GiB, while the blockwise ``value_and_grad`` of the symmetric InfoNCE
needs about 100 MiB of temporaries with ``block_size=1024`` (the tests check < 1 GiB;
``benchmarks/results/contrastive_memory.md``); ring numbers are in
``benchmarks/results/contrastive_scaling.md``. Forward-mode differentiation
(``jax.jvp``, Hessians) is not available through the custom VJP.

Computation is in float32, or float64 when the inputs are float64; matmuls use JAX's
default precision, like the dense loss.

References:
  Milakov, Gimelshein, "Online normalizer calculation for softmax", 2018,
  arXiv:1805.02867 (the streaming log-sum-exp).
  Dao, Fu, Ermon, Rudra, Ré, "FlashAttention", 2022, arXiv:2205.14135 (tiling with
  recomputation in the backward).
  Liu, Zaharia, Abbeel, "Ring attention with blockwise transformers for near-infinite
  context", 2023, arXiv:2310.01889 (blocks passed around a ring of devices).
  Cheng et al., "Breaking the memory barrier: near infinite batch size scaling for
  contrastive loss" (Inf-CL), 2024, arXiv:2410.17243.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from gradtx import _checks

# ---------------------------------------------------------------------------- kernels


class Softmax:
  """InfoNCE's row statistics ``(m, l, Σ_P s, |P|)`` and its tile gradient."""

  @staticmethod
  def init(shape, dtype):
    return (jnp.full(shape, -jnp.inf, dtype), jnp.zeros(shape, dtype),
            jnp.zeros(shape, dtype), jnp.zeros(shape, jnp.int32))

  @staticmethod
  def accumulate(stats, s, allowed, positive):
    m, norm, pos_sum, pos_count = stats
    s_allowed = jnp.where(allowed, s, -jnp.inf)
    m_new = jnp.maximum(m, s_allowed.max(axis=-1))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing allowed yet
    norm = norm * jnp.exp(m - shift) + jnp.exp(s_allowed - shift[..., None]).sum(axis=-1)
    pos_sum = pos_sum + jnp.where(positive, s, 0.0).sum(axis=-1)
    pos_count = pos_count + positive.sum(axis=-1, dtype=jnp.int32)
    return m_new, norm, pos_sum, pos_count

  @staticmethod
  def finalize(stats):
    """``(ℓ, counts, saved)``: rows count when they have a positive."""
    m, norm, pos_sum, count = stats
    lse = jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(norm)  # -inf where nothing allowed
    has_positive = count > 0
    loss = jnp.where(has_positive, lse - pos_sum / jnp.maximum(count, 1).astype(lse.dtype), 0.0)
    return loss, has_positive, (jnp.where(has_positive, lse, 0.0), count)

  @staticmethod
  def tile_grad(s, allowed, positive, coef, saved):
    lse, count = saved
    p = jnp.where(allowed, jnp.exp(s - lse[:, None]), 0.0)
    pos_coef = coef / jnp.maximum(count, 1).astype(coef.dtype)
    return coef[:, None] * p - jnp.where(positive, pos_coef[:, None], 0.0)


class Sigmoid:
  """SigLIP's row sums ``−Σ_j log σ(z_ij s_ij)`` and their tile gradient."""

  @staticmethod
  def init(shape, dtype):
    return (jnp.zeros(shape, dtype),)

  @staticmethod
  def accumulate(stats, s, allowed, positive):
    z = jnp.where(positive, 1.0, -1.0).astype(s.dtype)
    return (stats[0] - jnp.where(allowed, jax.nn.log_sigmoid(z * s), 0.0).sum(axis=-1),)

  @staticmethod
  def finalize(stats):
    return stats[0], jnp.ones(stats[0].shape, bool), ()

  @staticmethod
  def tile_grad(s, allowed, positive, coef, saved):
    del saved
    z = jnp.where(positive, 1.0, -1.0).astype(s.dtype)
    return jnp.where(allowed, -z * jax.nn.sigmoid(-z * s), 0.0) * coef[:, None]


# ------------------------------------------------------------------------------ rings


def _vary(tree: Any, axis_name: str | None) -> Any:
  """Leaves marked device-varying over ``axis_name`` (scan carries under check_vma=True)."""
  if axis_name is None:
    return tree

  def vary(x):
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    if axis_name in getattr(manual, "varying", frozenset()):
      return x
    return jax.lax.pcast(x, axis_name, to="varying")

  return jax.tree.map(vary, tree)


def _ring_perm(axis_name: str) -> list[tuple[int, int]]:
  n = jax.lax.axis_size(axis_name)
  return [(i, (i + 1) % n) for i in range(n)]


def _around_ring(step, carry, block, axis_name):
  """``step(carry, block) -> (carry, block)`` on this device's block, then on each of the
  ``n − 1`` blocks that arrive by ``ppermute`` (the next one is sent while this one is
  computed). Returns the carry and the last block, which came from device ``d + 1``."""
  if axis_name is None:
    return step(carry, block)
  perm = _ring_perm(axis_name)

  def hop(state, _):
    carry, block = state
    carry, block = step(carry, block)
    return (carry, jax.lax.ppermute(block, axis_name, perm)), None

  hops = jax.lax.axis_size(axis_name) - 1
  if hops:
    (carry, block), _ = jax.lax.scan(hop, (carry, block), length=hops)
  return step(carry, block)


# ------------------------------------------------------------------------------ tiles


def _tile_masks(q_ids, q_lab, k_ids, k_lab, exclude_self):
  """Allowed and positive masks of one tile; padded rows and columns (id < 0) are not
  allowed (the transposed masks are those of the tile seen from the columns)."""
  allowed = (q_ids[:, None] >= 0) & (k_ids[None, :] >= 0)
  if exclude_self:
    allowed = allowed & (q_ids[:, None] != k_ids[None, :])
  return allowed, allowed & (q_lab[:, None] == k_lab[None, :])


def _scores(q_i, k_j, inv_t, bias):
  raw = q_i @ k_j.T
  return raw, raw * inv_t + bias


def _hop_stats(kernel, exclude_self, stats, rows, block, inv_t, bias):
  """Row statistics of every local row block updated with one ``k`` block's tiles.

  ``block = (k, labels, ids, column statistics or None)``: two-sided, each tile also
  updates the travelling block's column statistics (the kernel on the transposed tile).
  """
  kb, klb, kib, col_stats = block

  def row_block(col_stats, xs):
    st, q_i, ql_i, qi_i = xs

    def col(st, ys):
      k_j, kl_j, ki_j, cst_j = ys
      _, s = _scores(q_i, k_j, inv_t, bias)
      allowed, positive = _tile_masks(qi_i, ql_i, ki_j, kl_j, exclude_self)
      if cst_j is not None:
        cst_j = kernel.accumulate(cst_j, s.T, allowed.T, positive.T)
      return kernel.accumulate(st, s, allowed, positive), cst_j

    st, col_stats = jax.lax.scan(col, st, (kb, klb, kib, col_stats))
    return col_stats, st

  col_stats, stats = jax.lax.scan(row_block, col_stats, (stats,) + rows)
  return stats, (kb, klb, kib, col_stats)


def _hop_grads(kernel, exclude_self, carry, rows, row_coefs, block, inv_t, bias):
  """One ``k`` block's tiles: adds to ``q̄``, ``∂τ⁻¹``, ``β̄`` (and the travelling ``k̄``).

  ``row_coefs`` are the rows' cotangents ``c_i`` and the kernel's saved row values;
  ``block = (k, labels, ids, column coefficients or None, k̄ or None)``. The column
  coefficients are those of the columns' own losses (two-sided: CLIP's ``b → a``) or, with
  ``k̄ = None`` (self pairs, ``k`` the rows of ``q`` from another device), those of the
  travelling rows: their share of the tile, transposed, lands on the local rows, so the
  gradient of ``q`` is complete on its own device and no ``k̄`` travels.
  """
  dqb, dinv, dbias = carry
  kb, klb, kib, col_coefs, dkb = block
  self_pairs = dkb is None

  def row_step(inner, xs):
    dkb, dinv, dbias = inner
    q_i, ql_i, qi_i, coef_i, saved_i = xs

    def col_step(acc, ys):
      dq_i, dkb, dinv, dbias = acc
      k_j, kl_j, ki_j, col_j, j = ys
      raw, s = _scores(q_i, k_j, inv_t, bias)
      allowed, positive = _tile_masks(qi_i, ql_i, ki_j, kl_j, exclude_self)
      g = kernel.tile_grad(s, allowed, positive, coef_i, saved_i)
      if self_pairs:  # ∂τ⁻¹, β̄ of the travelling rows' losses count on their own device
        g_col = kernel.tile_grad(s.T, allowed.T, positive.T, *col_j).T
        dq_i = dq_i + (g + g_col) @ k_j
      else:  # two-sided, both sides' losses are of these scores; k̄ travels
        if col_j is not None:
          g = g + kernel.tile_grad(s.T, allowed.T, positive.T, *col_j).T
        dq_i, dkb = dq_i + g @ k_j, dkb.at[j].add(g.T @ q_i)
      return (dq_i, dkb, dinv + jnp.sum(g * raw), dbias + jnp.sum(g)), None

    ys = (kb, klb, kib, col_coefs, jnp.arange(kb.shape[0]))
    (dq_i, dkb, dinv, dbias), _ = jax.lax.scan(col_step, (jnp.zeros_like(q_i), dkb, dinv,
                                                          dbias), ys)
    return (dkb, dinv, dbias), dq_i

  (dkb, dinv, dbias), dq = jax.lax.scan(row_step, (dkb, dinv, dbias), rows + row_coefs)
  return (dqb + dq, dinv, dbias), (kb, klb, kib, col_coefs, dkb)


def _home(x, axis_name):
  """What travelled the ring ends one hop short of home (on device ``d − 1``): send it."""
  if axis_name is None:
    return x
  return jax.lax.ppermute(x, axis_name, _ring_perm(axis_name))


# ``mode`` of the core: "rows" (the losses of the rows of q), "both" (and of the rows of k
# against q: the columns of the same scores), "self" (k is q: rows only, and the
# backward uses the symmetry of the pairs).
_MODES = ("rows", "both", "self")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _tiled_core(kernel, axis_name, exclude_self, mode, rows, block, inv_t, bias):
  """``((loss, counted),)`` of the rows of ``q`` (and with ``mode="both"`` of ``k``) of
  the padded, blocked local inputs (``block=None``: ``k`` is ``q``, ``mode="self"``);
  ``counted`` (int32) says whether a row enters the mean."""
  sides = _core_values(kernel, axis_name, exclude_self, mode, rows, block, inv_t, bias)
  return tuple((loss, counted) for loss, counted, _ in sides)


def _core_values(kernel, axis_name, exclude_self, mode, rows, block, inv_t, bias):
  """Per side, ``(loss, counted, saved)``: one pass around the ring for both sides."""
  block = rows if block is None else block
  dtype = rows[0].dtype
  init = _vary(kernel.init(rows[0].shape[:2], dtype), axis_name)
  both = mode == "both"
  col_init = _vary(kernel.init(block[0].shape[:2], dtype), axis_name) if both else None

  def step(stats, blk):
    return _hop_stats(kernel, exclude_self, stats, rows, blk, inv_t, bias)

  stats, last = _around_ring(step, init, block + (col_init,), axis_name)
  sides = [(stats, rows[2])]
  if both:  # the column statistics of this device's block come home
    sides.append((_home(last[3], axis_name), block[2]))
  out = []
  for side_stats, ids in sides:
    loss, counted, saved = kernel.finalize(side_stats)
    counted = counted & (ids >= 0)  # padded rows never count
    out.append((loss, counted.astype(jnp.int32), saved))
  return tuple(out)


def _core_fwd(kernel, axis_name, exclude_self, mode, rows, block, inv_t, bias):
  sides = _core_values(kernel, axis_name, exclude_self, mode, rows, block, inv_t, bias)
  outputs = tuple((loss, counted) for loss, counted, _ in sides)
  return outputs, (rows, block, inv_t, bias, tuple((c, s) for _, c, s in sides))


def _core_bwd(kernel, axis_name, exclude_self, mode, residuals, cotangents):
  rows, block, inv_t, bias, saved = residuals
  qb = rows[0]
  # Each side's cotangents c_i (counted rows only; the integer output has no gradient).
  coefs = [(jnp.where(counted > 0, ct_loss, 0.0).astype(qb.dtype), side_saved)
           for (counted, side_saved), (ct_loss, _) in zip(saved, cotangents, strict=True)]
  zero = jnp.zeros((), qb.dtype)
  carry = _vary((jnp.zeros_like(qb), zero, zero), axis_name)
  if mode == "self":  # the rows travel with their coefficients; no k̄
    travelling = rows + (coefs[0], None)
  else:
    travelling = block + (coefs[1] if mode == "both" else None, jnp.zeros_like(block[0]))

  def step(carry, blk):
    return _hop_grads(kernel, exclude_self, carry, rows, coefs[0], blk, inv_t, bias)

  (dqb, dinv, dbias), last = _around_ring(step, carry, travelling, axis_name)
  if axis_name is not None:  # τ, β are replicated: sum the shares
    dinv, dbias = jax.lax.psum((dinv, dbias), axis_name)
  dinv = dinv.astype(inv_t.dtype).reshape(inv_t.shape)
  dbias = dbias.astype(bias.dtype).reshape(bias.shape)
  no_grad = (None, None)
  d_block = None if mode == "self" else (_home(last[4], axis_name) * inv_t,) + no_grad
  return (dqb * inv_t,) + no_grad, d_block, dinv, dbias


_tiled_core.defvjp(_core_fwd, _core_bwd)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _pad_blocks(x: jax.Array, num_blocks: int, block: int, value: Any = 0) -> jax.Array:
  """``x`` (n, ...) padded with ``value`` to ``num_blocks * block`` rows, blocked."""
  pad = num_blocks * block - x.shape[0]
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value)
  return x.reshape((num_blocks, block) + x.shape[1:])


def _blocked(x, labels, block_size, axis_name):
  """``(x, labels, global ids)`` blocked by ``block_size`` (None: one block); padded rows
  get the id -1 (never allowed, never counted)."""
  n = x.shape[0]
  block = max(1, min(block_size or n, n))
  num_blocks = _cdiv(n, block)
  ids = global_ids(n, axis_name)
  return (_pad_blocks(x, num_blocks, block), _pad_blocks(labels, num_blocks, block),
          _pad_blocks(ids, num_blocks, block, -1))


def global_ids(n: int, axis_name: str | None) -> jax.Array:
  """Global positions of this device's ``n`` rows: ``axis_index · n + arange(n)``."""
  ids = jnp.arange(n, dtype=jnp.int32)
  if axis_name is None:
    return ids
  return ids + jax.lax.axis_index(axis_name).astype(jnp.int32) * n


def tiled_losses(kernel, q, k, q_labels, k_labels, inv_temperature, bias=0.0, *,
                 exclude_self: bool, block_size: int | None, axis_name: str | None = None,
                 mode: str = "rows") -> tuple[tuple[jax.Array, jax.Array], ...]:
  """Per-row losses of ``kernel`` (:class:`Softmax` or :class:`Sigmoid`) by tiles.

  ``q``, ``k`` (and their labels) are this device's rows when ``axis_name`` is given (the
  ``k`` blocks then travel the ring), the whole batch otherwise. ``block_size=None``
  means one tile per ring hop (``axis_name`` given). Returns ``((row_loss, counts),)``:
  (Bq,) losses in the compute dtype and (Bq,) bools (rows that enter the mean). ``mode``:

  - ``"rows"``: the losses of the rows of ``q``;
  - ``"both"``: a second pair, the losses of the rows of ``k`` against every row of
    ``q`` (the kernel on the columns of the same scores: CLIP's ``b → a``), from the
    same tiles: the two directions cost one pass (and one ring), not two;
  - ``"self"``: ``k`` is ``q`` with the same labels (``k``, ``k_labels`` ignored; NT-Xent,
    SupCon): the backward uses ``s_ij = s_ji``: each tile's share of the travelling rows'
    gradient lands on the local rows, so no ``k̄`` travels (2 tile matmuls, not 3).
  """
  _checks.check_choice("mode", mode, _MODES)
  if mode == "self":
    k, k_labels = q, q_labels
  dtype = jnp.promote_types(jnp.promote_types(q.dtype, k.dtype), jnp.float32)
  q, k = q.astype(dtype), k.astype(dtype)
  inv_t, bias = jnp.asarray(inv_temperature, dtype), jnp.asarray(bias, dtype)
  rows = _blocked(q, q_labels, block_size, axis_name)
  block = None if mode == "self" else _blocked(k, k_labels, block_size, axis_name)
  sides = _tiled_core(kernel, axis_name, bool(exclude_self), mode, rows, block, inv_t, bias)
  return tuple((loss.reshape(-1)[:n], counted.reshape(-1)[:n] > 0)
               for (loss, counted), n in zip(sides, (q.shape[0], k.shape[0]), strict=False))


def tiled_row_losses(kernel, q, k, q_labels, k_labels, inv_temperature, bias=0.0, *,
                     exclude_self: bool, block_size: int | None,
                     axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """``(row_loss, counts)`` of the rows of ``q``: :func:`tiled_losses`, one-sided."""
  return tiled_losses(kernel, q, k, q_labels, k_labels, inv_temperature, bias,
                      exclude_self=exclude_self, block_size=block_size,
                      axis_name=axis_name)[0]


def blockwise_row_losses(
    q: jax.Array,
    k: jax.Array,
    q_labels: jax.Array,
    k_labels: jax.Array,
    inv_temperature: jax.Array,
    *,
    exclude_self: bool,
    block_size: int,
) -> tuple[jax.Array, jax.Array]:
  r"""Per-row InfoNCE losses ``ℓ_i`` computed tile by tile (no B × B matrix).

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
  return tiled_row_losses(Softmax, q, k, q_labels, k_labels, inv_temperature,
                          exclude_self=exclude_self, block_size=block_size)


# ------------------------------------------------------------------------ global mean


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def global_mean(row_loss: jax.Array, counted: jax.Array, axis_name: str) -> jax.Array:
  """``psum(Σ counted ℓ_i) / psum(Σ counted)``: the mean over every device's counted rows.

  Its cotangent is that of a replicated loss (the same on every device, not summed): row
  ``i`` gets ``c / count``, under ``check_vma=True`` or ``False`` alike.
  """
  return _global_mean_fwd(row_loss, counted, axis_name)[0]


def _global_mean_fwd(row_loss, counted, axis_name):
  total = jax.lax.psum(jnp.sum(jnp.where(counted, row_loss, 0.0)), axis_name)
  count = jnp.maximum(jax.lax.psum(jnp.sum(counted, dtype=jnp.int32), axis_name), 1)
  return total / count.astype(total.dtype), (counted, count)


def _global_mean_bwd(axis_name, residuals, ct):
  del axis_name
  counted, count = residuals
  return jnp.where(counted, ct / count.astype(ct.dtype), 0.0).astype(ct.dtype), None


global_mean.defvjp(_global_mean_fwd, _global_mean_bwd)
