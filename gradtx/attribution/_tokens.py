r"""Token attribution for causal language models: one score per input token, bounded memory.

The question a language-model user asks is "which earlier tokens made the model predict
this token here?". The output attributed is the next-token log-probability at a chosen
position ``p``,

.. math::
  F(x) = \log \operatorname{softmax}\big(\mathrm{logits}(x)_{p}\big)_{y}, \qquad
  y = x_{p+1} \text{ by default (the token that actually follows)},

and the path runs through the token embeddings (Layer Integrated Gradients at the
embedding layer), summed over the embedding dimension: one score per token, complete up
to the quadrature error (the delta is returned with the scores). With a causal mask the
tokens after ``p`` get exactly zero.

Memory: the interpolation points run ``batch_size`` at a time inside a ``lax.scan``
(default 1), so the compiled program holds one forward-backward pass of the model, not
``steps`` of them — the difference between fitting and not fitting at long contexts
(``benchmarks/results/attribution_family.md``).

References:
  Sundararajan, Taly, Yan, "Axiomatic attribution for deep networks", ICML 2017,
  arXiv:1703.01365.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gradtx import _checks
from gradtx.attribution import _layer

if TYPE_CHECKING:
  from flax import nnx


class TokenAttributions(NamedTuple):
  """What :func:`token_attributions` returns (every field per example)."""

  scores: jax.Array  # (N, T): one score per input token
  delta: jax.Array  # (N,): Σ scores − (log_prob − baseline_log_prob)
  log_prob: jax.Array  # (N,): the target's log-probability at position p for the input
  #   (at the perturbed embeddings with layer_noise)
  baseline_log_prob: jax.Array  # (N,): the same for the baseline


def _index(name: str, value: ArrayLike, size: int, what: str, batch: int,
           allow_negative: bool) -> int | jax.Array:
  """An int or (N,) integer array in range, checked when concrete; negatives wrapped."""
  low = -size if allow_negative else 0
  if isinstance(value, jax.core.Tracer):
    if value.shape not in ((), (batch,)) or not jnp.issubdtype(value.dtype, jnp.integer):
      raise TypeError(f"{name} must be an int or an integer array of shape ({batch},), got "
                      f"{value.dtype} of shape {value.shape}")
    return jnp.where(value < 0, value + size, value) if allow_negative else value
  arr = np.asarray(value)
  if arr.shape not in ((), (batch,)) or not np.issubdtype(arr.dtype, np.integer):
    raise TypeError(f"{name} must be an int or an integer array of shape ({batch},), got "
                    f"{value!r}")
  bad = (arr < low) | (arr >= size)
  if np.any(bad):
    raise ValueError(f"{name} must be in [{low}, {size}) ({what}), got "
                     f"{arr[bad].tolist() if arr.ndim else int(arr)}")
  arr = np.where(arr < 0, arr + size, arr)
  return int(arr) if arr.ndim == 0 else jnp.asarray(arr)


def _check_logits(fn: Callable[[jax.Array], jax.Array], ids: jax.Array) -> tuple[int, int, int]:
  """``(N, T, V)`` of ``fn(ids)``, which must be (N, T, V) floating logits."""
  _checks.check_callable("fn", fn, call="fn(ids) -> (N, T, V) logits")
  shape = np.shape(ids)
  if len(shape) != 2 or not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
    raise ValueError(f"ids must be integer token ids of shape (N, T), got "
                     f"{jnp.asarray(ids).dtype} of shape {shape}")
  out = jax.eval_shape(fn, ids)
  if (not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 3
      or out.shape[:2] != shape or not jnp.issubdtype(out.dtype, jnp.floating)):
    got = (f"{out.dtype} of shape {out.shape}" if isinstance(out, jax.ShapeDtypeStruct)
           else f"the pytree {jax.tree.structure(out)}")
    raise ValueError(f"fn must map ids {shape} to floating next-token logits of shape "
                     f"{shape + ('V',)}, got {got}")
  return shape[0], shape[1], out.shape[2]


def _target_fn(fn: Callable[[jax.Array], jax.Array], ids: jax.Array, position: ArrayLike,
               target_token: ArrayLike | None) -> Callable[[jax.Array], jax.Array]:
  """``ids -> (N,)`` the target's next-token log-probability at ``position``."""
  batch, length, vocab = _check_logits(fn, ids)
  pos = _index("position", position, length, f"a position in sequences of {length} tokens",
               batch, allow_negative=True)
  if target_token is None:
    last: int | None = pos if isinstance(pos, int) else None
    if isinstance(pos, jax.Array) and not isinstance(pos, jax.core.Tracer):
      last = int(np.max(np.asarray(pos)))
    if last is None or last + 1 >= length:
      raise ValueError(
          f"target_token must be given when position is the last of the {length} tokens "
          f"(or traced): the default target is the token that follows position, "
          f"ids[:, position + 1], got position={position!r}")
    target_token = jnp.asarray(ids)[jnp.arange(batch), jnp.broadcast_to(pos, (batch,)) + 1]
  else:
    target_token = _index("target_token", target_token, vocab, f"a vocabulary of {vocab}",
                          batch, allow_negative=False)
  rows = jnp.arange(batch)
  positions = jnp.broadcast_to(jnp.asarray(pos), (batch,))
  tokens = jnp.broadcast_to(jnp.asarray(target_token), (batch,))

  def log_prob(x: jax.Array) -> jax.Array:
    out = fn(x)
    logits = out[rows, positions].astype(jnp.promote_types(out.dtype, jnp.float32))
    return jax.nn.log_softmax(logits, axis=-1)[rows, tokens]

  return log_prob


def token_attributions(
    fn: Callable[[jax.Array], jax.Array],
    ids: jax.Array,
    layer: str,
    *,
    position: ArrayLike,
    target_token: ArrayLike | None = None,
    model: nnx.Module | None = None,
    baseline: ArrayLike | None = None,
    layer_baseline: ArrayLike | None = 0.0,
    layer_noise: Callable[[jax.Array], jax.Array] | None = None,
    steps: int = 50,
    method: str = "gausslegendre",
    batch_size: int | None = 1,
) -> TokenAttributions:
  r"""One score per input token for a causal LM's next-token log-probability.

  .. math::
    s_t = \sum_{e} \mathrm{LIG}_{t,e}, \qquad
    F(x) = \log \operatorname{softmax}(\mathrm{logits}(x)_{p})_{y}, \qquad
    \delta = \sum_t s_t - \big(F(x) - F(x')\big)

  Layer Integrated Gradients (:func:`layer_integrated_gradients`) at the embedding
  layer ``layer``, with the baseline embedding ``layer_baseline`` (zeros by default; or
  ``baseline=`` token ids such as padding). Put the model in inference mode.

  Args:
    fn: maps token ids (N, T) to next-token logits (N, T, V) (linen: ``lambda ids:
      model.apply(variables, ids)``; nnx: the model, or a function calling it).
    ids: integer token ids (N, T).
    layer: the embedding layer's module path (``"embed"``, ``"Embed_0"``).
    position: the position p whose next-token prediction is attributed: an int in
      [-T, T) (negative counts from the end) or one per example (N,).
    target_token: the token y whose log-probability is attributed: an int in [0, V) or
      one per example; ``None`` = the token that follows, ``ids[:, p + 1]``.
    model: for nnx, the root module ``layer`` is a path in (default: ``fn`` if it is an
      ``nnx.Module``); ``None`` for linen.
    baseline: baseline token ids (e.g. the padding id everywhere), or
    layer_baseline: the baseline embedding (``0.0`` = zeros, the default; a (D,) vector
      or a full (N, T, D) array). Pass ``layer_baseline=None`` with ``baseline=``.
    layer_noise: ``None``, or a function of the embeddings (N, T, D) returning the
      perturbed embeddings that are attributed instead (``log_prob`` is then the one at
      them): what :func:`smooth_grad` passes with ``noise_at="layer"`` (SmoothGrad over
      token attributions; noise cannot go on token ids).
    steps: quadrature nodes. method: quadrature (as :func:`integrated_gradients`).
    batch_size: interpolation points per forward-backward pass (default 1: the memory of
      one pass); ``None`` = all ``steps`` at once.

  Returns:
    A :class:`TokenAttributions`: ``scores`` (N, T), ``delta``, ``log_prob`` and
    ``baseline_log_prob`` (N,).

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, gradtx
    >>> class TinyLM(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, ids):
    ...     h = nn.Embed(16, 8, name="embed")(ids)
    ...     h = jnp.cumsum(jnp.tanh(nn.Dense(8)(h)), axis=1)   # causal: a running sum
    ...     return nn.Dense(16)(h)                             # (N, T, 16) logits
    >>> ids = jnp.array([[3, 1, 4, 1, 5]])
    >>> variables = TinyLM().init(jax.random.key(0), ids)
    >>> out = gradtx.token_attributions(lambda i: TinyLM().apply(variables, i), ids,
    ...                                 "embed", position=2)    # explains ids[0, 3]
    >>> out.scores.shape, bool(jnp.all(out.scores[:, 3:] == 0)), bool(abs(out.delta[0]) < 1e-4)
    ((1, 5), True, True)

  References:
    Sundararajan, Taly, Yan, "Axiomatic attribution for deep networks", ICML 2017,
    arXiv:1703.01365.
  """
  from flax import nnx

  if model is None and isinstance(fn, nnx.Module):
    model = fn
  if baseline is not None and layer_baseline is not None and not (
      isinstance(layer_baseline, float) and layer_baseline == 0.0):
    raise ValueError("pass at most one of baseline (token ids) and layer_baseline "
                     "(embeddings), got both")
  if baseline is not None:
    layer_baseline = None
  scored = _target_fn(fn, ids, position, target_token)
  scores, delta, log_prob = _layer.attribute(
      scored, ids, layer, layer_index=None, model=model, baseline=baseline,
      layer_baseline=layer_baseline, layer_noise=layer_noise, steps=steps, method=method,
      batch_size=batch_size, target=None, reduce="sum", return_delta=True, with_output=True)
  assert delta is not None, "return_delta=True gives the delta"
  return TokenAttributions(scores, delta, log_prob, log_prob - (jnp.sum(scores, 1) - delta))
