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

``_sharded.py`` runs the same passes on each device's rows; it uses this module through
four functions: :func:`check_args` (construction), :func:`check_call` (each call),
:func:`encode_chunks` (step 1) and :func:`pull_back` (step 3).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from gradtx import _checks, _chunking, _random

_METHODS = ("two_pass", "remat")


# ----------------------------------------------------------------------------- checks


def check_args(encode_fn: Any, loss_fn: Any, chunk_size: Any, has_aux: Any) -> None:
  """The construction-time checks shared by the single-device and sharded versions."""
  _check_encode_fn(encode_fn)
  _check_loss_fn(loss_fn)
  _checks.check_static("chunk_size", chunk_size)
  _checks.check_int("chunk_size", chunk_size, minimum=1)
  _checks.check_bool("has_aux", has_aux)


def _check_loss_fn(loss_fn: Any) -> None:
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be a function loss_fn(params, reps) -> scalar, got "
                    f"{loss_fn!r}")


def _check_encode_fn(encode_fn: Any) -> None:
  """``encode_fn`` can be called as ``encode_fn(params, inputs_chunk, rng)``."""
  if not callable(encode_fn):
    raise TypeError(f"encode_fn must be a function encode_fn(params, inputs_chunk, rng) -> "
                    f"reps, got {encode_fn!r}")
  try:
    signature = inspect.signature(encode_fn)
  except (TypeError, ValueError):  # a builtin or C callable: nothing to inspect
    return
  try:
    signature.bind(None, None, None)
  except TypeError:
    name = getattr(encode_fn, "__name__", type(encode_fn).__name__)
    raise TypeError(
        f"encode_fn must take three positional arguments (params, inputs_chunk, rng), but "
        f"{name} has the signature {signature}. Add the key parameter even if it is unused: "
        f"def encode_fn(params, inputs, rng): ..., or wrap the function: "
        f"lambda params, inputs, rng: {name}(params, inputs)"
    ) from None


def check_call(inputs: Any, extra_args: tuple, rng: Any,
               loss_inputs: Any = None) -> tuple[int, jax.Array | None]:
  """``(batch size, typed key or None)`` of a call ``f(params, inputs, *extra_args, rng=rng)``.

  ``loss_inputs`` (per-sample data for the loss, e.g. labels) must have the batch size.
  """
  if extra_args:
    raise TypeError(
        f"pass the random key by keyword: f(params, inputs, rng=key), not as a third "
        f"positional argument (got {len(extra_args)} extra positional argument(s))"
    )
  leaves = jax.tree_util.tree_flatten_with_path(inputs)[0]
  if not leaves:
    raise ValueError(f"inputs must hold at least one array with a batch axis (axis 0), got "
                     f"{inputs!r}")
  batch = _checks.common_leading_size(
      "inputs", [(jax.tree_util.keystr(path), x) for path, x in leaves])
  if batch == 0:
    raise ValueError("inputs must have at least one row: the batch (axis 0) is empty")
  _check_loss_inputs(loss_inputs, batch)
  return batch, None if rng is None else _random.as_key(rng, argname="rng")


def _check_loss_inputs(loss_inputs: Any, batch: int) -> None:
  """Every leaf of ``loss_inputs`` has ``batch`` rows (axis 0), named by path if not."""
  if loss_inputs is None:
    return
  leaves = jax.tree_util.tree_flatten_with_path(loss_inputs)[0]
  named = [(jax.tree_util.keystr(path), x) for path, x in leaves]
  size = _checks.common_leading_size("loss_inputs", named) if named else batch
  if size != batch:
    raise ValueError(
        f"loss_inputs must have one row per sample of the batch: axis 0 of every leaf must "
        f"have {batch} rows (the batch size of inputs), got {size}"
    )


def with_loss_inputs(loss_fn: Callable, loss_inputs: Any) -> Callable:
  """``loss_fn(params, reps)``, or ``loss_fn(params, reps, loss_inputs)`` when given."""
  if loss_inputs is None:
    return loss_fn
  return lambda params, reps: loss_fn(params, reps, loss_inputs)


def _check_reps(reps: Any) -> None:
  """One chunk's representations are 2-D floating arrays, checked while tracing."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(reps)[0]:
    if getattr(leaf, "ndim", None) != 2:
      raise ValueError(
          f"encode_fn must return 2-D representations (batch, features); the leaf at "
          f"{jax.tree_util.keystr(path)} has shape {getattr(leaf, 'shape', type(leaf))}"
      )
  # Integer representations would get a zero gradient without a word.
  _checks.check_float_leaves("the representations returned by encode_fn", reps)


# ----------------------------------------------------------------------------- the passes


def _keyed(inputs: Any, chunk_size: int, rng: jax.Array | None, first_index: Any) -> Any:
  """``(inputs, chunk number of each row)``: chunk i gets ``fold_in(rng, first_index + i)``."""
  if rng is None:
    return inputs, None
  batch = jax.tree.leaves(inputs)[0].shape[0]
  return inputs, first_index + jnp.arange(batch) // chunk_size


def _chunk_key(rng: jax.Array | None, chunk_numbers: Any) -> jax.Array | None:
  return None if rng is None else jax.random.fold_in(rng, chunk_numbers[0])


def _encode(encode_fn: Callable, params: Any, inputs_chunk: Any, key: Any) -> Any:
  """``encode_fn`` on one chunk, its output checked; a clear error if it needs a key."""
  try:
    reps = encode_fn(params, inputs_chunk, key)
  except TypeError as e:
    if key is None and "NoneType" in str(e) and "key" in str(e):
      raise TypeError(
          "encode_fn uses its rng, but no key was passed (it got rng=None): call "
          "f(params, inputs, rng=jax.random.key(0)) with a fresh key per step; chunk i "
          "gets fold_in(rng, i)"
      ) from e
    raise
  _check_reps(reps)
  return reps


def encode_chunks(encode_fn: Callable, params: Any, inputs: Any, *, chunk_size: int,
                  rng: jax.Array | None, first_index: Any = 0) -> Any:
  """The first encoder pass (step 1): every chunk's representations, concatenated.

  Chunk ``i`` (consecutive ``chunk_size`` rows, the last one possibly shorter) is
  encoded with the key ``fold_in(rng, first_index + i)``. ``first_index`` (possibly
  traced) numbers the chunks globally when ``inputs`` is one device's shard of a larger
  batch (``_sharded.py``); it is 0 for a whole batch.
  """
  def encode(chunk):
    x, chunk_numbers = chunk
    return _encode(encode_fn, params, x, _chunk_key(rng, chunk_numbers))

  return _chunking.map_chunks(encode, _keyed(inputs, chunk_size, rng, first_index),
                              chunk_size)


def pull_back(encode_fn: Callable, params: Any, inputs: Any, reps_grad: Any, *,
              chunk_size: int, rng: jax.Array | None, first_index: Any = 0,
              init: Any = None) -> Any:
  """The second encoder pass (step 3): ``Σ_i vjp(encode_fn(·, chunk_i, key_i))(G_i)``.

  The result is the encoder's share of the gradient (the loss-side share comes from
  :func:`representation_grad`), added to ``init`` if given (accumulated in its buffer).

  ``reps_grad`` holds the rows ``G_i`` of these ``inputs`` (in order); chunks and keys
  are those of :func:`encode_chunks`.
  """
  inputs, chunk_numbers = _keyed(inputs, chunk_size, rng, first_index)

  def chunk_grad(chunk):
    x, g, numbers = chunk
    _, vjp = jax.vjp(lambda p: encode_fn(p, x, _chunk_key(rng, numbers)), params)
    return vjp(g)[0]

  return _chunking.sum_chunks(chunk_grad, (inputs, reps_grad, chunk_numbers), chunk_size,
                             init=init)


# ----------------------------------------------------------------------------- public


def representation_grad(loss_fn: Callable, params: optax.Params, reps: Any, *,
                        has_aux: bool = False) -> tuple[Any, Any, optax.Updates]:
  """The loss, its gradient w.r.t. the representations, and w.r.t. loss-side params.

  Step 2 of the two-pass algorithm, exposed for accumulation across separate calls:
  compute ``reps`` for the whole batch once (no gradients), call this, then feed each
  micro-batch's rows of ``reps_grad`` to :func:`surrogate_loss`.

  Args:
    loss_fn: ``loss_fn(params, reps) -> scalar`` (or ``(scalar, aux)`` with has_aux).
    params: the parameters (the loss may use some, e.g. a learnable temperature).
    reps: the whole batch's representations (a pytree of (B, d) floating arrays).
    has_aux: as in ``jax.value_and_grad``.

  Returns:
    ``(loss_or_(loss, aux), reps_grad, loss_params_grad)``.

  Raises:
    TypeError: ``reps`` has integer or boolean leaves (named by path), ``loss_fn`` is
      not callable, ``has_aux`` is not a bool.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> loss = lambda p, h: p["scale"] * jnp.sum(h ** 2)
    >>> value, reps_grad, params_grad = gradtx.representation_grad(
    ...     loss, {"scale": 2.0}, jnp.array([[1.0, 2.0]]))
    >>> float(value), reps_grad.tolist(), float(params_grad["scale"])  # 2Σh², 4h, Σh²
    (10.0, [[4.0, 8.0]], 5.0)
  """
  _check_loss_fn(loss_fn)
  _checks.check_bool("has_aux", has_aux)
  _checks.check_float_leaves("reps", reps)
  value, (params_grad, reps_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1),
                                                       has_aux=has_aux)(params, reps)
  return value, reps_grad, params_grad


def surrogate_loss(reps: Any, reps_grad: Any, *, scale: chex.Numeric = 1.0) -> jax.Array:
  r"""``scale · Σ_i <h_i, stop_gradient(G_i)>``: its parameter gradient is the chunk's exact share.

  With ``G`` the whole batch's ``∂L/∂h`` (from :func:`representation_grad`), the
  gradient of this w.r.t. the encoder parameters, summed over the chunks, is exactly
  the full-batch gradient of the contrastive loss (the value itself is meaningless).
  Under ``optax.MultiSteps(every_k_schedule=k)``, which *averages* the k micro-batch
  gradients, use ``scale=k`` and add the loss-side gradient unscaled on every call.

  .. math::
    S(\theta) = s \sum_i \langle h_i(\theta), \operatorname{sg}(G_i) \rangle, \qquad
    \nabla_\theta S = s \sum_i \Big(\frac{\partial h_i}{\partial \theta}\Big)^{\!\top} G_i

  Args:
    reps: one micro-batch's representations, computed with gradients.
    reps_grad: the matching rows of ``G``: the same tree structure and leaf shapes as
      ``reps`` (gradients are stopped here regardless).
    scale: ``s`` > 0, multiplies the surrogate (``k`` under MultiSteps averaging).

  Returns:
    The scalar surrogate, float32.

  Raises:
    ValueError: ``reps_grad`` does not have the structure or leaf shapes of ``reps``
      (the message names the paths: a transposed ``G`` would otherwise be flattened and
      paired with the wrong entries), or ``scale`` is not a finite number > 0.

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> w, x = jnp.ones((2, 2)), jnp.eye(2)
    >>> G = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> jax.grad(lambda w: gradtx.surrogate_loss(x @ w, G))(w).tolist()  # xᵀ G
    [[1.0, 0.0], [0.0, 2.0]]

  References:
    Gao, Zhang, Han, Callan, "Scaling deep contrastive learning batch size under memory
    limited setup" (GradCache), 2021, arXiv:2101.06983.
  """
  _checks.check_same_structure("reps_grad", reps_grad, "reps", reps)
  _checks.check_float_leaves("reps", reps)
  _checks.check_positive("scale", scale, allow_schedule=False)
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
      chunk's key (or ``None``); reps is a pytree of (chunk, d) floating arrays — two
      towers may return a dict. A deterministic encoder still takes (and ignores) ``rng``.
    loss_fn: ``loss_fn(params, reps) -> scalar`` on the whole batch's representations;
      ``params`` is passed so loss-side parameters (a temperature) get their gradient.
      Called as ``loss_fn(params, reps, loss_inputs)`` when ``f`` gets ``loss_inputs``.
    chunk_size: rows per chunk (a static int >= 1).
    method: ``"two_pass"`` (encode without gradients, loss gradient, re-encode with
      vjp: the GradCache algorithm) or ``"remat"`` (``lax.map`` over
      ``jax.checkpoint(encode_fn)``: autodiff rematerialises). Both are exact; see
      ``benchmarks/contrastive_memory.py`` for their memory and time.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; ``f`` then returns
      ``((loss, aux), grads)``.

  Returns:
    ``f(params, inputs, *, rng=None, loss_inputs=None) -> (loss, grads)``,
    jit-compatible. ``rng`` (a ``jax.random`` key, by keyword) is required when
    ``encode_fn`` draws randomness. ``loss_inputs`` is per-sample data the loss needs
    besides the representations (labels for ``supervised_contrastive`` or ``info_nce(...,
    labels=)``): a pytree of arrays with the batch's rows on axis 0, passed whole to
    ``loss_fn`` (a new batch's labels need no new ``f``, so no recompilation).

  Raises:
    TypeError: ``encode_fn`` cannot be called as ``encode_fn(params, inputs, rng)``;
      ``chunk_size`` is not a static int; (when ``f`` is called) the key is passed
      positionally or is not a key, or ``encode_fn`` needs a key and got ``None``.
    ValueError: ``chunk_size`` < 1, an unknown ``method``; (when ``f`` is called) the
      leaves of ``inputs`` differ in batch size, ``encode_fn`` returns representations
      that are not 2-D.

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
  check_args(encode_fn, loss_fn, chunk_size, has_aux)
  _checks.check_choice("method", method, _METHODS)
  passes = _remat if method == "remat" else _two_pass

  def value_and_grad(params, inputs, *extra_args, rng=None, loss_inputs=None):
    _, rng = check_call(inputs, extra_args, rng, loss_inputs)
    return passes(encode_fn, with_loss_inputs(loss_fn, loss_inputs), has_aux, params, inputs,
                  chunk_size=chunk_size, rng=rng)

  return value_and_grad


def _remat(encode_fn, loss_fn, has_aux, params, inputs, *, chunk_size, rng):
  encode = jax.checkpoint(encode_fn)

  def total_loss(p):
    return loss_fn(p, encode_chunks(encode, p, inputs, chunk_size=chunk_size, rng=rng))

  return jax.value_and_grad(total_loss, has_aux=has_aux)(params)


def _two_pass(encode_fn, loss_fn, has_aux, params, inputs, *, chunk_size, rng):
  # Pass 1: representations only; stop_gradient keeps autodiff from saving anything.
  reps = encode_chunks(encode_fn, jax.lax.stop_gradient(params), inputs,
                       chunk_size=chunk_size, rng=rng)
  value, reps_grad, loss_grads = representation_grad(loss_fn, params, reps, has_aux=has_aux)
  # The encoder's share accumulates into the loss-side gradient's buffer.
  return value, pull_back(encode_fn, params, inputs, reps_grad, chunk_size=chunk_size,
                          rng=rng, init=loss_grads)
