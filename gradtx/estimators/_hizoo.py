r"""HiZOO: zeroth-order estimates preconditioned by a running diagonal Hessian estimate."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import _checks, _chunking, _numerics
from gradtx.estimators import _common, _noise


@dataclasses.dataclass(frozen=True)
class HiZOOOptions:
  """The options of :func:`hizoo_gradient`, checked when built (as :class:`ESOptions`)."""

  sigma: Any
  num_samples: int = 2
  alpha: float = 1e-3
  damping: float = 1e-2
  mask: Any = None

  def __post_init__(self):
    _checks.check_positive("sigma", self.sigma, allow_schedule=False)
    _checks.check_static("num_samples", self.num_samples)
    _checks.check_int("num_samples", self.num_samples, minimum=2)
    if int(self.num_samples) % 2:
      raise ValueError(f"num_samples must be even for HiZOO (mirrored pairs ±z), got "
                       f"{self.num_samples!r}")
    _checks.check_in_interval("alpha", self.alpha, 0.0, 1.0, low_open=True)
    _checks.check_non_negative("damping", self.damping, allow_schedule=False)

  def init(self, params: Any) -> Any:
    """The initial Hessian diagonal: ones like ``params`` (float32 or wider)."""
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), _numerics.compute_dtype(p)), params)

  def estimate_with_state(self, fn: Callable[[Any], jax.Array], params: Any, key: Any,
                          hessian_diag: Any) -> tuple[Any, Any]:
    """``(ĝ, new hessian_diag)`` (:func:`hizoo_gradient`)."""
    return _estimate(self, fn, params, key, hessian_diag)


def hizoo_gradient(fn: Callable[[Any], jax.Array], params: Any, key: jax.Array,
                   hessian_diag: Any, *, sigma: float,
                   num_samples: int = HiZOOOptions.num_samples,
                   alpha: float = HiZOOOptions.alpha, damping: float = HiZOOOptions.damping,
                   mask: Any = HiZOOOptions.mask) -> tuple[Any, Any]:
  r"""HiZOO: the two-point estimate with ``z = Σ^{1/2} u`` and a running Hessian diagonal.

  With ``H`` the running estimate of the Hessian's diagonal (``hessian_diag``),
  ``Σ = (|H| + λ)^{-1}`` (``λ = damping``), ``u_j ~ N(0, I)`` and ``P = N/2`` mirrored
  pairs, ``ℓ_{j±} = f(θ ± σ Σ^{1/2} u_j)`` and ``ℓ_0 = f(θ)`` (one extra forward pass):

  .. math::
    \hat g = \frac{1}{P} \sum_j \frac{\ell_{j+} - \ell_{j-}}{2\sigma}\, \Sigma^{1/2} u_j,
    \qquad
    \hat H = \frac{\Sigma^{-1}}{P} \sum_j \frac{\ell_{j+} + \ell_{j-} - 2\ell_0}{2\sigma^2}
      \big(u_j \odot u_j - 1\big),
    \qquad H' = (1 - \alpha) H + \alpha \hat H

  On a quadratic with Hessian ``A`` (diagonal or not), ``E ĝ = Σ ∇f`` (a preconditioned
  gradient) and ``E Ĥ = diag(A)`` exactly, whatever ``H`` is, so ``H`` converges to the
  diagonal (tested on a diagonal quadratic). The paper smooths ``|Ĥ|``, whose mean grows
  with the dimension (``E|Ĥ_k| ≈ (d/2) E|u² - 1| A_kk``); this keeps the unbiased ``Ĥ`` and
  takes ``|H| + λ`` only to scale the perturbation. Masked entries (``mask``) are neither
  perturbed nor updated.

  Args:
    fn: ``fn(params) -> scalar``.
    params: ``θ``, a pytree of float arrays.
    key: a ``jax.random`` key (pair ``j`` draws ``u_j`` as ES member ``j``).
    hessian_diag: ``H``, a pytree like ``params`` (start from ones:
      ``HiZOOOptions(sigma).init(params)``); positional or by name.
    sigma: ``σ`` > 0.
    num_samples: ``N`` evaluations besides ``f(θ)`` (even: ``N/2`` mirrored pairs,
      evaluated one after the other).
    alpha: the smoothing ``α`` in (0, 1] (the paper: 1e-6 to 1e-8 for LLMs).
    damping: ``λ >= 0``, which bounds the perturbation's scale by ``σ/√λ``.
    mask: perturb only where True (see :func:`es_gradient`).

  Returns:
    ``(ĝ, H')``: the estimate (dtypes of ``params``) and the new Hessian diagonal.

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> a = jnp.array([1.0, 10.0, 100.0])
    >>> f = lambda p: 0.5 * jnp.sum(a * p["w"] ** 2)
    >>> def step(h, key):
    ...   g, h = gradtx.hizoo_gradient(f, {"w": jnp.ones(3)}, key, sigma=0.01,
    ...                                hessian_diag=h, alpha=0.002)
    ...   return h, None
    >>> keys = jax.random.split(jax.random.key(0), 6000)
    >>> h, _ = jax.jit(lambda h: jax.lax.scan(step, h, keys))({"w": jnp.ones(3)})
    >>> jnp.round(h["w"] / a, 0).tolist()
    [1.0, 1.0, 1.0]

  References:
    Zhao, Dang, Shi, Chen, Liu, Hu, Wang, Zheng, Shen, Li, "Second-order fine-tuning
    without pain for LLMs: a Hessian informed zeroth-order optimizer", 2024,
    arXiv:2402.15173 (HiZOO).
  """
  options = HiZOOOptions(sigma=sigma, num_samples=num_samples, alpha=alpha,
                         damping=damping, mask=mask)
  return options.estimate_with_state(fn, params, key, hessian_diag)


def _estimate(options: HiZOOOptions, fn: Callable, params: Any, key: Any,
              hessian: Any) -> tuple[Any, Any]:
  _checks.check_callable("fn", fn, call="fn(params) -> scalar")
  key = _common.check_inputs(params, key)
  _checks.check_same_structure("hessian_diag", hessian, "params", params)
  shape = _noise.shaping(params, mask=options.mask)
  sigma = options.sigma
  sigma = float(sigma) if isinstance(sigma, (int, float)) else jnp.asarray(sigma, jnp.float32)
  damping = options.damping  # a number, or an array under optax.inject_hyperparams
  curvature = jax.tree.map(lambda h: jnp.abs(h.astype(_numerics.compute_dtype(h))) + damping,
                           hessian)
  root = jax.tree.map(jax.lax.rsqrt, curvature)  # Σ^{1/2}

  def value(step, u):
    perturbed = jax.tree.map(lambda p, r, e: (p.astype(e.dtype) + step * r * e).astype(p.dtype),
                             params, root, u)
    return _common.scalar_output("fn", fn(perturbed)).astype(jnp.float32)

  f0 = _common.scalar_output("fn", fn(params)).astype(jnp.float32)

  def pair(j):  # one pair: its gradient term and its Hessian term
    u = _common.member_noise(key, j, params, "gaussian", shape)
    plus = value(sigma, u)
    minus = value(-sigma + 0.0 * plus, u)  # after the first pass (as in zo_sgd_step)
    slope = (plus - minus) / (2 * sigma)
    bend = (plus + minus - 2 * f0) / (2 * sigma * sigma)
    return (jax.tree.map(lambda r, e: slope * r * e, root, u),
            jax.tree.map(lambda e: bend * (e * e - 1), u))

  pairs = int(options.num_samples) // 2
  total_g, total_h = _chunking.sum_chunks(
      lambda js: jax.tree.map(lambda x: x.sum(0), jax.lax.map(pair, js)),
      jnp.arange(pairs, dtype=jnp.uint32), 1)
  alpha = options.alpha
  masks = jax.tree.unflatten(jax.tree.structure(params), [
      np.bool_(not frozen) if m is None else m for m, frozen in zip(
          shape.masks, shape.frozen, strict=True)])

  def new_h(h, c, t, m):
    updated = (1 - alpha) * h.astype(c.dtype) + alpha * c * t / pairs
    return jnp.where(m, updated, h).astype(jnp.result_type(h))

  grads = jax.tree.map(lambda t, p: _numerics.sharded_like(
      (t / pairs).astype(jnp.result_type(p)), p), total_g, params)
  return grads, jax.tree.map(new_h, hessian, curvature, total_h, masks)
