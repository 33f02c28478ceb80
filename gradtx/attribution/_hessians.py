r"""Integrated Hessians: pairwise feature interactions that add up to Integrated Gradients.

Integrated Hessians (Janizek, Sturmfels, Lee 2021) integrate Integrated Gradients once
more: the interaction of features ``i`` and ``j`` is the IG of ``IG_i`` with respect to
``x_j``, a double path integral over ``α, β ∈ [0, 1]``:

.. math::
  \Gamma_{ij}(x) = d_i d_j \int_0^1\!\!\int_0^1 \alpha\beta\,
    \partial_{ij} F(x' + \alpha\beta\, d)\, d\alpha\, d\beta
    + [i = j]\, d_i \int_0^1\!\!\int_0^1 \partial_i F(x' + \alpha\beta\, d)\,
    d\alpha\, d\beta, \qquad d = x - x'

Each row sums to the feature's Integrated Gradient, ``Σ_j Γ_ij = IG_i`` (so
``Σ_ij Γ_ij = F(x) − F(x')``), and on a quadratic model the Gauss–Legendre rule in both
α and β is exact. Hessian rows come from forward-over-reverse products (``jax.jvp`` of
the gradient) for a chunk of rows at a time, summed over the quadrature points in
chunks of ``batch_size``: memory holds (N, rows per chunk, D), never a D × D Hessian
per point.

References:
  Janizek, Sturmfels, Lee, "Explaining explanations: axiomatic feature interactions for
  deep networks", JMLR 22(104), 2021, arXiv:2002.04138.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gradtx import _chunking
from gradtx.attribution import _integrated
from gradtx.attribution._guided import flat_path, unflatten_features


def _double_rule(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Points ``t = α_k β_l`` and weights ``w_k w_l`` of the product rule (steps² points)."""
  nodes, weights = _integrated._quadrature(method, steps)
  return np.outer(nodes, nodes).ravel(), np.outer(weights, weights).ravel()


def integrated_hessians(fn: Callable[[Any], jax.Array], inputs: Any, *, baseline: Any = None,
                        steps: int = 16, method: str = "gausslegendre",
                        batch_size: int | None = None, row_batch_size: int | None = None,
                        target: ArrayLike | None = None, return_delta: bool = False) -> Any:
  r"""Integrated Hessians (Janizek et al. 2021): the interaction matrix of every example.

  .. math::
    \Gamma_{ij} = d_i d_j \sum_{k,l} w_k w_l\, \alpha_k \alpha_l\,
      \partial_{ij} F(x' + \alpha_k \alpha_l d)
      + [i = j]\, d_i \sum_{k,l} w_k w_l\, \partial_i F(x' + \alpha_k \alpha_l d)

  with the nodes ``α_k`` and weights ``w_k`` of ``method`` (as in
  :func:`integrated_gradients`) in both integrals: ``steps²`` points, each a gradient
  and D Hessian-vector products. Rows sum to the Integrated Gradients of the same rule
  applied twice; ``δ = Σ_ij Γ_ij − (F(x) − F(x'))``. ``fn`` must be twice
  differentiable (GELU, tanh, softplus; ReLU's Hessian is zero almost everywhere).

  Args:
    fn: maps a batch to (N,) or (N, C) outputs (examples independent).
    inputs: a floating-point batch (N, ...) or a pytree of batches sharing N.
    baseline: ``x'`` as in :func:`integrated_gradients` (``None`` = zeros).
    steps: nodes per integral (α and β); ``steps²`` points in all.
    method: quadrature, as in :func:`integrated_gradients`.
    batch_size: quadrature points evaluated at once; ``None`` = all ``steps²``.
    row_batch_size: Hessian rows computed at once; ``None`` = all D. Memory grows with
      ``batch_size × row_batch_size × D`` per example.
    target: with (N, C) outputs, an int or one int per example.
    return_delta: also return the per-example completeness delta (N,).

  Returns:
    For one array input ``(N, *S)``, the interactions ``(N, *S, *S)``; for a pytree input,
    the ``(N, D, D)`` matrix over its features flattened leaf by leaf (``jax.tree.leaves``
    order, each row-major). With ``return_delta``, the pair ``(interactions, delta)``.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> a = jnp.array([[1.0, 2.0], [2.0, -1.0]])
    >>> fn = lambda x: 0.5 * jnp.einsum("ni,ij,nj->n", x, a, x)   # a quadratic
    >>> x = jnp.array([[1.0, 3.0]])
    >>> gamma = gradtx.integrated_hessians(fn, x, steps=2)
    >>> gamma[0]                          # off-diagonal: d_i d_j a_ij / 4
    Array([[ 2. ,  1.5],
           [ 1.5, -3. ]], dtype=float32)
    >>> gamma[0].sum(1)                   # rows sum to IG = d ⊙ (a d) / 2
    Array([ 3.5, -1.5], dtype=float32)

  References:
    Janizek, Sturmfels, Lee, "Explaining explanations: axiomatic feature interactions
    for deep networks", JMLR 22(104), 2021, arXiv:2002.04138.
  """
  _integrated.check_options(steps, return_delta, method=method, batch_size=batch_size,
                            row_batch_size=row_batch_size)
  checked, base, dtype, x_in, x_base = flat_path(fn, inputs, target, baseline)
  leaves = checked.leaves
  diff = x_in - x_base
  grad = jax.grad(lambda flat: jnp.sum(checked.scalar(unflatten_features(flat, leaves))))
  n, d = diff.shape
  ts, ws = _double_rule(method, steps)
  points = (jnp.asarray(ts, dtype), jnp.asarray(ws, dtype))

  def rows_of(rows):  # (R,) row indices -> (R, N, D) rows of Γ
    tangents = jax.nn.one_hot(rows, d, dtype=dtype)  # (R, D), shared by the examples

    def point(args):
      t, w = args
      p = x_base + t * diff
      hvp = lambda e: jax.jvp(grad, (p,), (jnp.broadcast_to(e, (n, d)),))
      g, h = jax.vmap(hvp, out_axes=(None, 0))(tangents)  # g (N, D), h (R, N, D)
      return w * t * h, w * jnp.take(g, rows, axis=1).T  # (R, N, D), (R, N)

    hess, first = _integrated._sum_over_steps(point, points, len(ts), batch_size)
    gamma = diff[None, :, :] * jnp.take(diff, rows, axis=1).T[:, :, None] * hess
    diag = (jnp.take(diff, rows, axis=1).T * first)[:, :, None] * tangents[:, None, :]
    return gamma + diag

  gamma = _chunking.map_chunks(rows_of, jnp.arange(d), min(row_batch_size or d, d))
  gamma = jnp.transpose(gamma, (1, 0, 2))  # (N, D, D)
  gamma = _integrated._nan_rows(checked.bad_target, [gamma])[0]
  out = gamma.astype(jnp.result_type(*leaves))
  if len(leaves) == 1:
    shape = leaves[0].shape[1:]
    out = out.reshape((n,) + shape + shape)
  if not return_delta:
    return out
  delta = jnp.sum(gamma, axis=(1, 2)) - (checked.scalar(list(leaves)) - checked.scalar(base))
  return out, delta
