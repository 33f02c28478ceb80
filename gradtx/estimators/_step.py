r"""MeZO's in-place step :func:`zo_sgd_step`: ZO-SGD at the memory of inference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradtx import _checks, _numerics, _random
from gradtx.estimators import _common, _noise


def zo_sgd_step(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    sigma: float | jax.Array,
    learning_rate: float | jax.Array,
    mask: Any = None,
    rank: int | None = None,
    subspace_key: jax.Array | None = None,
    noise: str = "gaussian",
    sign: bool = False,
) -> tuple[Any, jax.Array]:
  r"""One MeZO step (ZO-SGD with one mirrored pair), in place when jitted with donation.

  .. math::
    \ell_\pm = f(\theta \pm \sigma z), \qquad
    \theta' = \theta - \eta\, \frac{\ell_+ - \ell_-}{2\sigma}\, z
    \quad \text{or (ZO-SGD-Sign)} \quad
    \theta' = \theta - \eta\, \operatorname{sign}(\ell_+ - \ell_-)\, \operatorname{sign}(z)

  with ``z`` the noise of ES member 0 for ``key`` (the documented draw of
  :func:`es_gradient`: ``θ'`` equals ``θ - η · es_gradient(f, θ, key, sigma=σ,
  num_samples=2, mask=..., rank=...)`` up to the rounding of the perturbed members), never
  stored: each entry of ``z`` is a counter hash of its index (no generator state), drawn
  inside the pass that uses it. ``mask`` (Sparse MeZO) and ``rank`` (LOZO) shape ``z`` as
  in :func:`es_gradient`. The returned loss is ``(ℓ₊ + ℓ₋)/2 = f(θ) + O(σ²)``, the loss at
  ``θ`` without a third forward pass.

  Jit it with the params donated, ``jax.jit(step, donate_argnums=1)`` (or ``0`` once the
  loss is bound), so that XLA writes ``θ'`` into ``θ``'s buffer. The step makes three
  passes over the params around its two forward passes: ``θ₊ = θ + σz`` (draws ``z``),
  ``θ₋ = 2θ - θ₊`` (no draw; written over ``θ₊`` once ``ℓ₊`` is known) and ``θ' = θ - η ĝ
  z`` (draws ``z`` again, into ``θ``'s buffer). Its temporaries are then exactly one
  forward pass's plus one parameter-sized buffer (and a few hundred bytes of scalars), and
  ``θ`` itself is never modified before the update: no restore, no round-off drift
  (MeZO's in-place ``θ+σz, θ−2σz, θ+σz`` walk cannot be written over an immutable JAX
  array without that one copy). Low-rank leaves (``rank``) add the largest such leaf's
  ``U Vᵀ`` (a matrix product is not fused into the pass). Its compiled memory against a
  forward pass, and its speed against the materialised estimate, are measured by
  ``benchmarks/zeroth_order_lm.py`` (``benchmarks/results/zeroth_order_lm.md``).

  Args:
    loss_fn: ``loss_fn(params) -> scalar``, e.g. the mean loss of a batch.
    params: ``θ``, a pytree of float arrays.
    key: this step's ``jax.random`` key (a fresh one every step).
    sigma: the perturbation scale ``σ`` > 0 (MeZO: 1e-3).
    learning_rate: ``η`` (a number, or an array inside ``jit``).
    mask: perturb and update only where True (a boolean pytree, or a rule such as
      :func:`gradtx.magnitude_mask`); see :func:`es_gradient`.
    rank: low-rank ``z`` for matrix leaves (LOZO); see :func:`es_gradient`.
    subspace_key: the key of the low-rank ``V`` factors (keep it for ``k`` steps for
      LOZO's lazy subspace); ``None``: drawn from ``key``.
    noise: ``"gaussian"`` (MeZO) or ``"rademacher"`` (SPSA).
    sign: take the sign of the estimate (ZO-SGD-Sign: every perturbed entry moves by
      exactly ``η``), in the same fused pass; equal to :func:`zeroth_order` ``("sign",
      num_samples=2)`` followed by SGD, without the stored estimate.

  Returns:
    ``(new_params, loss)``.

  Example:
    >>> import functools, jax, jax.numpy as jnp, gradtx
    >>> loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
    >>> step = jax.jit(functools.partial(gradtx.zo_sgd_step, loss, sigma=1e-3,
    ...                                  learning_rate=0.05), donate_argnums=0)
    >>> params = {"w": jnp.zeros(4)}
    >>> for key in jax.random.split(jax.random.key(0), 300):
    ...   params, value = step(params, key)
    >>> bool(loss(params) < 0.01)
    True

  References:
    Malladi, Gao, Nichani, Damian, Lee, Chen, Arora, "Fine-tuning language models with
    just forward passes", 2023, arXiv:2305.17333 (MeZO). Liu et al., "Sparse MeZO", 2024,
    arXiv:2402.15751. Chen et al., "Enhancing zeroth-order fine-tuning for language models
    with low-rank structures", 2024, arXiv:2410.07698 (LOZO). Liu, Chen, Chen, Hong,
    "signSGD via zeroth-order oracle", ICLR 2019 (ZO-SGD-Sign).
  """
  _checks.check_callable("loss_fn", loss_fn, call="loss_fn(params) -> scalar")
  _checks.check_positive("sigma", sigma, allow_schedule=False)
  _checks.check_finite("learning_rate", learning_rate, allow_schedule=False)
  _checks.check_choice("noise", noise, _common.NOISES)
  _checks.check_bool("sign", sign)
  key = _common.check_inputs(params, key)
  if subspace_key is not None:
    subspace_key = _random.as_key(subspace_key, argname="subspace_key")
  shape = _noise.shaping(params, mask=mask, rank=rank, subspace_key=subspace_key)

  leaves, treedef = jax.tree.flatten(params)

  def each(fn, *others):
    """``fn(θ_leaf, *other_leaves)`` for every perturbed leaf; frozen leaves as they are."""
    return [p if frozen else fn(p, *xs)
            for frozen, p, *xs in zip(shape.frozen, leaves, *others, strict=True)]

  def value(perturbed):
    loss = loss_fn(jax.tree.unflatten(treedef, perturbed))
    return _common.scalar_output("loss_fn", loss).astype(jnp.float32)

  def moved(by, draw_key, of_z=lambda e: e):
    """``θ + by · of_z(z)``, ``z`` drawn anew (fused into this pass), in each leaf's dtype."""
    z = jax.tree.leaves(_common.member_noise(draw_key, 0, params, noise, shape))
    return each(lambda p, e: (p.astype(e.dtype) + by * of_z(e)).astype(p.dtype), z)

  up = moved(sigma, key)
  plus = value(up)
  # θ - σz as 2θ - (θ + σz): no second draw. `+ 0·ℓ₊` (kept by XLA, which does not assume
  # finite floats) orders it after f(θ + σz), so it overwrites the buffer of θ + σz: one
  # perturbed copy of θ for both passes.
  after = 0.0 * plus

  def mirrored(p, u):
    dtype = _numerics.compute_dtype(p)
    return (2 * p.astype(dtype) + after - u.astype(dtype)).astype(p.dtype)

  minus = value(each(mirrored, up))
  slope = (plus - minus) / (2 * jnp.asarray(sigma, jnp.float32))
  # The update draws z again, fused into θ - η ĝ z in θ's donated buffer; the barrier keeps
  # XLA from merging the two draws into one stored (parameter-sized) z.
  key, minus = jax.lax.optimization_barrier((key, minus))
  eta = jnp.asarray(learning_rate, jnp.float32)
  new = (moved(-eta * jnp.sign(slope), key, jnp.sign) if sign else moved(-eta * slope, key))
  return jax.tree.unflatten(treedef, new), (plus + minus) / 2
