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


def _noise_scales(leaves: list[jax.Array], stdev: float, relative: bool) -> list[jax.Array]:
  """Per leaf, the noise standard deviation of every example, shaped to broadcast."""
  scales = []
  for x in leaves:
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if relative:
      flat = x.reshape(x.shape[0], -1)
      spread = jnp.max(flat, axis=1) - jnp.min(flat, axis=1)
      scales.append((stdev * spread).reshape(shape).astype(x.dtype))
    else:
      scales.append(jnp.full(shape, stdev, x.dtype))
  return scales


def _check_smooth_args(attribution_fn: Any, samples: Any, stdev: Any, kind: Any,
                       batch_size: Any, relative: Any) -> None:
  _checks.check_callable("attribution_fn", attribution_fn,
                         call="attribution_fn(inputs) -> attributions")
  _checks.check_static("samples", samples)
  _checks.check_int("samples", samples, minimum=1)
  _checks.check_non_negative("stdev", stdev, allow_schedule=False)
  _checks.check_choice("kind", kind, SMOOTHING_KINDS)
  _integrated._check_batch_size(batch_size)
  _checks.check_bool("relative", relative)


def smooth_grad(
    attribution_fn: Callable[[Any], Any],
    inputs: Any,
    *,
    key: jax.Array,
    samples: int = 25,
    stdev: float = 0.15,
    kind: str = "smoothgrad",
    relative: bool = True,
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

  References:
    Smilkov, Thorat, Kim, Viégas, Wattenberg, "SmoothGrad: removing noise by adding
    noise", 2017, arXiv:1706.03825.
    Adebayo, Gilmer, Goodfellow, Kim, "Local explanation methods for deep neural
    networks lack sensitivity to parameter values", 2018, arXiv:1810.03307.
  """
  _check_smooth_args(attribution_fn, samples, stdev, kind, batch_size, relative)
  key = _random.as_key(key, argname="key")
  _, leaves, treedef, _ = _integrated._check_inputs(inputs)
  scales = _noise_scales(leaves, float(stdev), relative)

  def one(index):
    noise = _random.per_leaf(jax.random.fold_in(key, index), inputs,
                             lambda k, x: jax.random.normal(k, x.shape, x.dtype))
    noisy = [x + s * e for x, s, e in zip(leaves, scales, jax.tree.leaves(noise),
                                         strict=True)]
    attrs = attribution_fn(jax.tree.unflatten(treedef, noisy))
    if kind == "smoothgrad":
      return attrs
    squares = jax.tree.map(jnp.square, attrs)
    return (attrs, squares) if kind == "vargrad" else squares

  def chunk_sum(indices):
    return jax.tree.map(lambda a: jnp.sum(a, axis=0), jax.vmap(one)(indices))

  total = _chunking.sum_chunks(chunk_sum, jnp.arange(samples, dtype=jnp.uint32),
                               min(batch_size or samples, samples))
  if kind != "vargrad":
    return jax.tree.map(lambda t: t / samples, total)
  mean = jax.tree.map(lambda t: t / samples, total[0])
  return jax.tree.map(lambda m, t: jnp.maximum(t / samples - m * m, 0), mean, total[1])
