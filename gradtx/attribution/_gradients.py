r"""Gradient maps and noise averaging: saliency, gradient × input, SmoothGrad / VarGrad.

The plain gradient ``∂F/∂x`` (saliency) and ``x ⊙ ∂F/∂x`` (gradient × input) are one
backward pass for the whole batch. SmoothGrad averages *any* attribution function over
Gaussian perturbations of the input:

.. math::
  \mathrm{SG}(x) = \frac{1}{S} \sum_{s=1}^{S} A(x + \varepsilon_s), \qquad
  \varepsilon_s \sim \mathcal{N}(0, \sigma^2 I), \quad
  \sigma = \text{stdev} \cdot (\max x - \min x)

(``smoothgrad``; ``smoothgrad_sq`` averages ``A²``; ``vargrad`` is the variance
``mean(A²) − mean(A)²``). The noise samples run vectorised (``vmap``) in chunks of
``batch_size`` inside a ``lax.scan``: memory grows with ``batch_size``, not ``samples``.

References:
  Simonyan, Vedaldi, Zisserman, "Deep inside convolutional networks: visualising image
  classification models and saliency maps", 2013, arXiv:1312.6034 (saliency).
  Shrikumar, Greenside, Shcherbina, Kundaje, "Not just a black box: learning important
  features through propagating activation differences", 2016, arXiv:1605.01713
  (gradient × input).
  Smilkov, Thorat, Kim, Viégas, Wattenberg, "SmoothGrad: removing noise by adding
  noise", 2017, arXiv:1706.03825.
  Adebayo, Gilmer, Goodfellow, Kim, "Local explanation methods for deep neural networks
  lack sensitivity to parameter values", 2018, arXiv:1810.03307 (VarGrad).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gradtx import _checks, _chunking, _random
from gradtx.attribution import _integrated

SMOOTHING_KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")


def _gradient(fn: Callable, inputs: Any, target: Any) -> tuple[Any, list[jax.Array], Any]:
  """``(treedef, leaves, per-leaf gradients of the target output)``, NaN rows for bad targets."""
  checked = _integrated.prepare(fn, inputs, target)
  grads = jax.grad(lambda z: jnp.sum(checked.scalar(z)))(list(checked.leaves))
  return checked.treedef, checked.leaves, _integrated._nan_rows(checked.bad_target, grads)


def saliency(fn: Callable[[Any], jax.Array], inputs: Any, *, target: ArrayLike | None = None,
             absolute: bool = False) -> Any:
  r"""The gradient of ``fn``'s (target) output for every example: ``∂F/∂x``.

  .. math::
    S(x) = \nabla_x F(x) \quad (\text{or } |\nabla_x F(x)| \text{ with ``absolute``})

  PAIR saliency's ``GradientSaliency``; Captum's ``Saliency`` takes the absolute value
  by default (``absolute=True`` here).

  Args:
    fn: maps a batch (the structure of ``inputs``, leading axis N) to (N,) outputs, or
      to (N, C) outputs from which ``target`` picks one (as in
      :func:`integrated_gradients`). Examples must be independent (no batch statistics).
    inputs: a floating-point batch (N, ...) or a pytree of batches sharing N.
    target: with (N, C) outputs, an int or one int per example (N,); a traced target
      outside [0, C) gives that example NaN values.
    absolute: return ``|∂F/∂x|``.

  Returns:
    The gradient with the structure, shapes and dtypes of ``inputs``.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> w = jnp.array([[1.0, 0.0], [-2.0, 1.0]])
    >>> gradtx.saliency(lambda x: x @ w, jnp.ones((1, 2)), target=0)
    Array([[ 1., -2.]], dtype=float32)

  References:
    Simonyan, Vedaldi, Zisserman, "Deep inside convolutional networks: visualising image
    classification models and saliency maps", 2013, arXiv:1312.6034.
  """
  _checks.check_bool("absolute", absolute)
  treedef, _, grads = _gradient(fn, inputs, target)
  return jax.tree.unflatten(treedef, [jnp.abs(g) if absolute else g for g in grads])


def gradient_x_input(fn: Callable[[Any], jax.Array], inputs: Any, *,
                     target: ArrayLike | None = None) -> Any:
  r"""Gradient × input for every example: ``x ⊙ ∂F/∂x``.

  .. math::
    A(x) = x \odot \nabla_x F(x)

  The first-order Taylor attribution against a zero baseline: complete
  (``Σ A = F(x) − F(0)``) exactly when ``F`` is linear without bias; Integrated
  Gradients is what stays complete for any ``F``.

  Args:
    fn: a batch to (N,) or (N, C) outputs, as in :func:`saliency`.
    inputs: a floating-point batch (N, ...) or a pytree of batches sharing N.
    target: with (N, C) outputs, an int or one int per example.

  Returns:
    Attributions with the structure, shapes and dtypes of ``inputs``.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> w = jnp.array([3.0, -1.0])
    >>> gradtx.gradient_x_input(lambda x: x @ w, jnp.array([[2.0, 5.0]]))
    Array([[ 6., -5.]], dtype=float32)

  References:
    Shrikumar, Greenside, Shcherbina, Kundaje, "Not just a black box: learning important
    features through propagating activation differences", 2016, arXiv:1605.01713.
  """
  treedef, leaves, grads = _gradient(fn, inputs, target)
  return jax.tree.unflatten(treedef, [x * g for x, g in zip(leaves, grads, strict=True)])


def _add_noise(key: jax.Array, tree: Any, stdev: float, relative: bool) -> Any:
  """``tree`` plus Gaussian noise, per leaf ``σ ε`` with ``ε`` from ``per_leaf(key, ...)``.

  ``σ = stdev · (max − min)`` of each example's values in the leaf (``relative``), or
  ``stdev``.
  """

  def noisy(leaf_key: jax.Array, x: jax.Array) -> jax.Array:
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if relative:
      flat = x.reshape(x.shape[0], -1)
      scale = (stdev * (jnp.max(flat, axis=1) - jnp.min(flat, axis=1))).reshape(shape)
    else:
      scale = jnp.full(shape, stdev, x.dtype)
    return x + scale.astype(x.dtype) * jax.random.normal(leaf_key, x.shape, x.dtype)

  return _random.per_leaf(key, tree, noisy)


class _LayerNoise:
  """``layer_noise`` for an attribution at a layer: ``h -> h + σ ε`` (noise sample ``key``).

  It records that it was called, so that an ``attribution_fn`` that takes the argument
  but never applies it is an error instead of a silently noise-free average.
  """

  def __init__(self, key: jax.Array, stdev: float, relative: bool, calls: list[int]):
    self.key, self.stdev, self.relative, self.calls = key, stdev, relative, calls

  def __call__(self, h: Any) -> Any:
    _checks.check_float_leaves("layer_noise's argument h (the layer output)", h)
    self.calls.append(1)
    return _add_noise(self.key, h, self.stdev, self.relative)


def _attribute_at_layer(attribution_fn: Callable[..., Any], inputs: Any,
                        noise: _LayerNoise) -> Any:
  try:
    return attribution_fn(inputs, layer_noise=noise)
  except TypeError as error:
    if "layer_noise" not in str(error):
      raise
    raise TypeError(
        f"attribution_fn must accept the keyword layer_noise= with noise_at='layer' (as "
        f"layer_integrated_gradients and token_attributions do), got {attribution_fn!r}: "
        f"{error}") from None


NOISE_AT = ("inputs", "layer")


def _check_smooth_args(attribution_fn: Any, samples: Any, stdev: Any, kind: Any,
                       batch_size: Any, relative: Any, noise_at: Any) -> None:
  _checks.check_callable("attribution_fn", attribution_fn,
                         call="attribution_fn(inputs) -> attributions")
  _checks.check_static("samples", samples)
  _checks.check_int("samples", samples, minimum=1)
  _checks.check_non_negative("stdev", stdev, allow_schedule=False)
  _checks.check_choice("kind", kind, SMOOTHING_KINDS)
  _integrated._check_batch_size(batch_size)
  _checks.check_bool("relative", relative)
  _checks.check_choice("noise_at", noise_at, NOISE_AT)


def smooth_grad(
    attribution_fn: Callable[[Any], Any],
    inputs: Any,
    *,
    key: jax.Array,
    samples: int = 25,
    stdev: float = 0.15,
    kind: str = "smoothgrad",
    relative: bool = True,
    noise_at: str = "inputs",
    batch_size: int | None = None,
) -> Any:
  r"""SmoothGrad, SmoothGrad², VarGrad: any attribution averaged over Gaussian noise.

  .. math::
    \bar A = \frac{1}{S} \sum_{s=1}^{S} A(x + \varepsilon_s), \quad
    \overline{A^2} = \frac{1}{S} \sum_{s=1}^{S} A(x + \varepsilon_s)^2, \quad
    \mathrm{VarGrad} = \overline{A^2} - \bar A^2

  with ``ε_s ~ N(0, σ²)`` drawn independently for every feature of every example. With
  ``relative=True`` (the default, as Smilkov et al. and PAIR saliency), ``σ = stdev ·
  (max x − min x)`` over each example's features (per leaf of a pytree); with
  ``relative=False``, ``σ = stdev`` (Captum's ``NoiseTunnel(stdevs=)``).

  Noise of sample ``s`` for the leaf at path ``p``: ``jax.random.normal`` with key
  ``fold_in(fold_in(key, s), crc32(p))`` (``gradtx._random.per_leaf``), so the result
  does not depend on ``batch_size``. Same key, same result.

  Noise at a layer (``noise_at="layer"``): token ids cannot take Gaussian noise, so for
  a language model the noise goes on the output ``h`` of the attributed layer (the
  embeddings). ``inputs`` is then passed unchanged and ``attribution_fn`` is called as
  ``attribution_fn(inputs, layer_noise=f_s)``, where ``f_s(h) = h + σ ε_s`` draws
  sample ``s`` as above with ``h``'s leaf paths and ``σ`` from each example's range of
  ``h``; :func:`layer_integrated_gradients` and :func:`token_attributions` take it and
  attribute the perturbed layer output, so every sample stays complete
  (``Σ LIG = g(h + σ ε_s) − g(h(x'))``). Memory: ``batch_size`` noise samples at once,
  each with the attribution's own ``batch_size`` of path steps.

  Args:
    attribution_fn: maps a batch with the structure of ``inputs`` to attributions (any
      pytree of arrays), e.g. ``functools.partial(gradtx.saliency, fn, target=3)``,
      ``lambda x: gradtx.integrated_gradients(fn, x, steps=16, target=t)``; every leaf
      of its result is averaged (a completeness delta included).
    inputs: a floating-point batch (N, ...) or a pytree of batches sharing N.
    key: a ``jax.random`` key.
    samples: number of noise samples S >= 1.
    stdev: the noise level >= 0: a fraction of each example's value range, or with
      ``relative=False`` the absolute standard deviation.
    kind: ``"smoothgrad"`` (mean), ``"smoothgrad_sq"`` (mean of squares; PAIR's
      ``magnitude=True``) or ``"vargrad"`` (variance).
    relative: ``stdev`` relative to each example's value range (True) or absolute.
    noise_at: ``"inputs"`` (the default): the noise is added to ``inputs``, which must
      be floating-point; ``"layer"``: to the layer output of an attribution at a layer
      (``attribution_fn`` must accept ``layer_noise=``; ``inputs`` may be token ids).
    batch_size: noise samples evaluated at once (each a whole batch); ``None`` = all.
      Memory grows with it, not with ``samples``.

  Returns:
    The averaged result of ``attribution_fn``, with its structure.

  Example:
    >>> import functools, jax, jax.numpy as jnp, gradtx
    >>> fn = lambda x: jnp.sum(x ** 2, axis=1)          # gradient 2x: noise averages out
    >>> x = jnp.array([[1.0, -1.0, 0.5]])
    >>> sg = gradtx.smooth_grad(functools.partial(gradtx.saliency, fn), x,
    ...                         key=jax.random.key(0), samples=2000)
    >>> bool(jnp.allclose(sg, 2 * x, atol=0.05))
    True

    SmoothGrad over token attributions, the noise on the embeddings:

    >>> import flax.linen as nn
    >>> class TinyLM(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, ids):
    ...     h = jnp.cumsum(jnp.tanh(nn.Embed(16, 8, name="embed")(ids)), axis=1)
    ...     return nn.Dense(16)(h)                     # causal (N, T, 16) logits
    >>> ids = jnp.array([[3, 1, 4, 1, 5]])
    >>> variables = TinyLM().init(jax.random.key(0), ids)
    >>> attribute = functools.partial(gradtx.token_attributions,
    ...                               lambda i: TinyLM().apply(variables, i),
    ...                               layer="embed", position=2, steps=16)
    >>> out = jax.jit(lambda i: gradtx.smooth_grad(
    ...     attribute, i, key=jax.random.key(0), samples=8, stdev=0.1,
    ...     noise_at="layer"))(ids)
    >>> out.scores.shape, bool(jnp.all(out.scores[:, 3:] == 0))
    ((1, 5), True)

  References:
    Smilkov, Thorat, Kim, Viégas, Wattenberg, "SmoothGrad: removing noise by adding
    noise", 2017, arXiv:1706.03825.
    Adebayo, Gilmer, Goodfellow, Kim, "Local explanation methods for deep neural
    networks lack sensitivity to parameter values", 2018, arXiv:1810.03307.
  """
  _check_smooth_args(attribution_fn, samples, stdev, kind, batch_size, relative, noise_at)
  key = _random.as_key(key, argname="key")
  if noise_at == "inputs":
    _integrated._check_inputs(inputs)
  elif not jax.tree.leaves(inputs):
    raise ValueError("inputs must hold at least one array, got an empty pytree")
  calls: list[int] = []

  def one(index):
    sample_key = jax.random.fold_in(key, index)
    if noise_at == "layer":
      attrs = _attribute_at_layer(attribution_fn, inputs,
                                  _LayerNoise(sample_key, float(stdev), relative, calls))
    else:
      attrs = attribution_fn(_add_noise(sample_key, inputs, float(stdev), relative))
    if kind == "smoothgrad":
      return attrs
    squares = jax.tree.map(jnp.square, attrs)
    return (attrs, squares) if kind == "vargrad" else squares

  def chunk_sum(indices):
    return jax.tree.map(lambda a: jnp.sum(a, axis=0), jax.vmap(one)(indices))

  total = _chunking.sum_chunks(chunk_sum, jnp.arange(samples, dtype=jnp.uint32),
                               min(batch_size or samples, samples))
  if noise_at == "layer" and not calls:
    raise ValueError(
        "attribution_fn accepted layer_noise= but never called it (noise_at='layer'): pass "
        "it on to layer_integrated_gradients or token_attributions, e.g. "
        "lambda ids, layer_noise: gradtx.token_attributions(fn, ids, 'embed', "
        "position=p, layer_noise=layer_noise)")
  if kind != "vargrad":
    return jax.tree.map(lambda t: t / samples, total)
  mean = jax.tree.map(lambda t: t / samples, total[0])
  return jax.tree.map(lambda m, t: jnp.maximum(t / samples - m * m, 0), mean, total[1])
