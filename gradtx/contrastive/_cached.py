"""Exact large-batch gradients of contrastive losses at chunk-sized memory.

A contrastive loss couples the samples of a batch, so summing the gradients of small
batches is not the large batch's gradient. But with ``h = encode(θ, x)`` and the
representations' gradient ``G = ∂L/∂h`` computed once from the whole batch,

.. math::
  \\nabla_\\theta L = \\sum_i \\Big(\\frac{\\partial h_i}{\\partial \\theta}\\Big)^{\\!\\top} G_i
  = \\nabla_\\theta \\sum_i \\langle h_i, \\operatorname{sg}(G_i) \\rangle

(Su, kexue.fm/archives/8471; GradCache, Gao et al. 2021): the surrogate on the right
splits per sample. The two-pass algorithm:

1. encode every chunk without keeping activations → all representations ``h``;
2. ``L, G = value_and_grad(loss_fn)(h)`` on the whole batch (no encoder involved);
3. encode each chunk again with the SAME randomness (``fold_in(rng, chunk_index)``) and
   pull its rows of ``G`` back through it (``vjp``); sum the parameter gradients.

Cost: two encoder forwards and one backward; memory: one chunk's activations plus the
representations. Loss-side parameters (a learnable temperature) get their gradient
once, from step 2 — unlike summing k recomputed losses, which scales it by k.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradtx import _checks

_METHODS = ("two_pass", "remat")


def _batch_size(inputs: Any) -> int:
  leaves = jax.tree_util.tree_flatten_with_path(inputs)[0]
  return _checks.common_leading_size(
      "inputs", [(jax.tree_util.keystr(path), x) for path, x in leaves])


def _split(inputs: Any, chunk_size: int) -> tuple[Any, Any, int]:
  """Splits axis 0 into ``n`` stacked full chunks and a (possibly empty) remainder."""
  batch = _batch_size(inputs)
  num_full = batch // chunk_size
  full = jax.tree.map(
      lambda x: x[: num_full * chunk_size].reshape(num_full, chunk_size, *x.shape[1:]), inputs
  )
  rest = jax.tree.map(lambda x: x[num_full * chunk_size:], inputs)
  return full, rest, num_full


def _chunk_key(rng: jax.Array | None, index: Any) -> jax.Array | None:
  return None if rng is None else jax.random.fold_in(rng, index)


def _concat(full: Any, rest: Any) -> Any:
  """Inverse of ``_split`` for the representations."""
  return jax.tree.map(
      lambda f, r: jnp.concatenate([f.reshape(-1, *f.shape[2:]), r], axis=0), full, rest
  )


def _has_rows(rest: Any) -> bool:
  return bool(jax.tree.leaves(rest)) and jax.tree.leaves(rest)[0].shape[0] > 0


def _encode_all(encode_fn, params, full, rest, num_full, rng, encode=None, first_index=0):
  """Representations of every chunk, chunk i encoded with key ``fold_in(rng, first_index + i)``.

  ``first_index`` (possibly traced) numbers the chunks globally when this is one shard
  of a larger batch (``_sharded.py``); it is 0 for a whole batch.
  """
  encode = encode or encode_fn
  indices = first_index + jnp.arange(num_full)
  reps_full = jax.lax.map(lambda c: encode(params, c[0], _chunk_key(rng, c[1])),
                          (full, indices))
  # One chunk's leaves, before concatenation (which fails obscurely on a scalar leaf).
  _check_reps(jax.tree.map(lambda r: jax.ShapeDtypeStruct(r.shape[1:], r.dtype), reps_full))
  if _has_rows(rest):
    reps_rest = encode(params, rest, _chunk_key(rng, first_index + num_full))
    _check_reps(reps_rest)
  else:
    reps_rest = jax.tree.map(lambda r: r[:0].reshape(0, *r.shape[2:]), reps_full)
  return reps_full, reps_rest


def _check_reps(reps: Any) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(reps)[0]:
    if leaf.ndim != 2:
      raise ValueError(
          f"encode_fn must return 2-D representations (batch, features); the leaf at "
          f"{jax.tree_util.keystr(path)} has shape {leaf.shape}"
      )


def representation_grad(loss_fn: Callable, params: Any, reps: Any, *, has_aux: bool = False):
  """The loss, its gradient w.r.t. the representations, and w.r.t. loss-side params.

  Step 2 of the two-pass algorithm, exposed for accumulation across separate calls:
  compute ``reps`` for the whole batch once (no gradients), call this, then feed each
  micro-batch's rows of ``reps_grad`` to :func:`surrogate_loss`.

  Args:
    loss_fn: ``loss_fn(params, reps) -> scalar`` (or ``(scalar, aux)`` with has_aux).
    params: the parameters (the loss may use some, e.g. a learnable temperature).
    reps: the whole batch's representations (a pytree of (B, d) arrays).
    has_aux: as in ``jax.value_and_grad``.

  Returns:
    ``(loss_or_(loss, aux), reps_grad, loss_params_grad)``.
  """
  value, (params_grad, reps_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1),
                                                       has_aux=has_aux)(params, reps)
  return value, reps_grad, params_grad


def surrogate_loss(reps: Any, reps_grad: Any, *, scale: float = 1.0) -> jax.Array:
  r"""``scale · Σ_i <h_i, stop_gradient(G_i)>``: its parameter gradient is the chunk's exact share.

  With ``G`` the whole batch's ``∂L/∂h`` (from :func:`representation_grad`), the
  gradient of this w.r.t. the encoder parameters, summed over the chunks, is exactly
  the full-batch gradient of the contrastive loss (the value itself is meaningless).
  Under ``optax.MultiSteps(every_k_schedule=k)``, which *averages* the k micro-batch
  gradients, use ``scale=k`` and add the loss-side gradient unscaled on every call.

  Args:
    reps: one micro-batch's representations, computed with gradients.
    reps_grad: the matching rows of ``G`` (gradients are stopped here regardless).
    scale: multiplies the surrogate (``k`` under MultiSteps averaging).

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> w, x = jnp.ones((2, 2)), jnp.eye(2)
    >>> G = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> jax.grad(lambda w: gradtx.surrogate_loss(x @ w, G))(w).tolist()  # xᵀ G
    [[1.0, 0.0], [0.0, 2.0]]
  """
  products = jax.tree.map(
      lambda h, g: jnp.vdot(h.astype(jnp.float32), jax.lax.stop_gradient(g).astype(jnp.float32)),
      reps, reps_grad,
  )
  return scale * sum(jax.tree.leaves(products), jnp.zeros((), jnp.float32))


def cached_value_and_grad(
    encode_fn: Callable,
    loss_fn: Callable,
    *,
    chunk_size: int,
    method: str = "two_pass",
    has_aux: bool = False,
) -> Callable:
  """``value_and_grad`` of a contrastive loss over a large batch, encoded in chunks.

  The returned ``f(params, inputs, *, rng=None)`` computes exactly

  ``jax.value_and_grad(lambda p: loss_fn(p, concat_i encode_fn(p, chunk_i,
  fold_in(rng, i))))(params)``

  where ``chunk_i`` are consecutive slices of ``chunk_size`` rows along axis 0 of every
  leaf of ``inputs`` (the last one shorter if the batch is not divisible: no sample is
  dropped or repeated), while keeping only one chunk's activations in memory.

  Args:
    encode_fn: ``encode_fn(params, inputs_chunk, rng) -> reps_chunk``; ``rng`` is that
      chunk's key (or ``None``); reps is a pytree of (chunk, d) arrays — two towers may
      return a dict.
    loss_fn: ``loss_fn(params, reps) -> scalar`` on the whole batch's representations;
      ``params`` is passed so loss-side parameters (a temperature) get their gradient.
    chunk_size: rows per chunk (>= 1).
    method: ``"two_pass"`` (encode without gradients, loss gradient, re-encode with
      vjp: the GradCache algorithm) or ``"remat"`` (``lax.map`` over
      ``jax.checkpoint(encode_fn)``: autodiff rematerialises). Both are exact; see
      ``benchmarks/contrastive_memory.py`` for their memory and time.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; ``f`` then returns
      ``((loss, aux), grads)``.

  Returns:
    ``f(params, inputs, *, rng=None) -> (loss, grads)``, jit-compatible.

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> encode = lambda p, x, rng: x @ p["w"]
    >>> loss = lambda p, h: gradtx.nt_xent(h[::2], h[1::2], temperature=0.5)
    >>> params, x = {"w": jnp.eye(4)[:, :3]}, jax.random.normal(jax.random.key(0), (10, 4))
    >>> f = gradtx.cached_value_and_grad(encode, loss, chunk_size=4)
    >>> value, grads = f(params, x)
    >>> ref_value, ref_grads = jax.value_and_grad(lambda p: loss(p, encode(p, x, None)))(params)
    >>> bool(jnp.allclose(grads["w"], ref_grads["w"], rtol=1e-5, atol=1e-6))
    True

  References:
    Gao, Zhang, Han, Callan, "Scaling deep contrastive learning batch size under memory
    limited setup" (GradCache), 2021, arXiv:2101.06983; Su, kexue.fm/archives/8471.
  """
  _checks.check_int("chunk_size", chunk_size, minimum=1)
  _checks.check_choice("method", method, _METHODS)

  def value_and_grad(params, inputs, *, rng=None):
    full, rest, num_full = _split(inputs, chunk_size)
    if method == "remat":
      return _remat(encode_fn, loss_fn, has_aux, params, full, rest, num_full, rng)
    return _two_pass(encode_fn, loss_fn, has_aux, params, full, rest, num_full, rng)

  return value_and_grad


def _remat(encode_fn, loss_fn, has_aux, params, full, rest, num_full, rng):
  encode = jax.checkpoint(encode_fn)

  def total_loss(p):
    reps = _concat(*_encode_all(encode_fn, p, full, rest, num_full, rng, encode=encode))
    _check_reps(reps)
    return loss_fn(p, reps)

  return jax.value_and_grad(total_loss, has_aux=has_aux)(params)


def _two_pass(encode_fn, loss_fn, has_aux, params, full, rest, num_full, rng):
  # Pass 1: representations only; stop_gradient keeps autodiff from saving anything.
  frozen = jax.lax.stop_gradient(params)
  reps_full, reps_rest = _encode_all(encode_fn, frozen, full, rest, num_full, rng)
  reps = _concat(reps_full, reps_rest)
  _check_reps(reps)

  value, reps_grad, grads = representation_grad(loss_fn, params, reps, has_aux=has_aux)

  grads = _pull_back_all(encode_fn, params, full, rest, num_full, rng, reps_grad, reps_full,
                         grads)
  return value, grads


def _pull_back_all(encode_fn, params, full, rest, num_full, rng, reps_grad, reps_full, grads,
                   first_index=0):
  """Pass 2: re-encodes each chunk with its key and adds ``vjp(G rows)`` to ``grads``.

  ``reps_grad`` holds the rows of ``G`` of these inputs only (in ``_concat`` order);
  ``first_index`` numbers the chunks as in :func:`_encode_all`.
  """
  grad_full, grad_rest = _split_like(reps_grad, full=reps_full)

  def pull_back(acc, chunk):
    inputs_chunk, g_chunk, index = chunk
    _, vjp = jax.vjp(lambda p: encode_fn(p, inputs_chunk, _chunk_key(rng, index)), params)
    return jax.tree.map(jnp.add, acc, vjp(g_chunk)[0]), None

  grads, _ = jax.lax.scan(pull_back, grads,
                          (full, grad_full, first_index + jnp.arange(num_full)))
  if _has_rows(rest):
    _, vjp = jax.vjp(lambda p: encode_fn(p, rest, _chunk_key(rng, first_index + num_full)),
                     params)
    grads = jax.tree.map(jnp.add, grads, vjp(grad_rest)[0])
  return grads


def _split_like(reps_grad: Any, *, full: Any) -> tuple[Any, Any]:
  """Splits the whole batch's ``G`` like ``_split``: stacked full chunks, remainder."""
  def head(g, f):
    return g[: f.shape[0] * f.shape[1]].reshape(f.shape[0], f.shape[1], *g.shape[1:])

  def tail(g, f):
    return g[f.shape[0] * f.shape[1]:]

  return jax.tree.map(head, reps_grad, full), jax.tree.map(tail, reps_grad, full)
