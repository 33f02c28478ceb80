r"""MeZO's in-place step :func:`zo_sgd_step`: ZO-SGD at the memory of inference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradtx import _checks, _numerics, _paths, _random
from gradtx.estimators import _common, _noise


def _perturber(params: Any, key: jax.Array, noise: str,
               shape: _noise.Shaping) -> Callable[[Any, Any], Any]:
  """``perturb(θ, step) = θ + step·z`` for ES member 0's noise ``z``, leaf by leaf.

  Dense leaves stream their noise block by block (:func:`_common.streamed`); low-rank
  leaves build ``U Vᵀ/√r`` (small factors); frozen leaves are returned as they are.
  """
  paths = _paths.tree_paths(params)
  keys = _random.leaf_keys(jax.random.fold_in(key, 0), paths) if paths else None

  def perturb(tree, step):
    leaves, treedef = jax.tree.flatten(tree)
    low_rank = None
    out = []
    for i, p in enumerate(leaves):
      dtype = _numerics.compute_dtype(p)
      add = lambda v, z: (v.astype(z.dtype) + step * z).astype(v.dtype)  # noqa: E731
      if shape.frozen[i]:
        out.append(p)
      elif shape.rank is not None and p.ndim >= 2:
        if low_rank is None:  # the dense leaves' draws in this tree are never used
          low_rank = jax.tree.leaves(_common.member_noise(key, 0, tree, noise, shape))
        out.append(add(p, low_rank[i]))
      else:
        assert keys is not None  # there are leaves, so there are paths
        out.append(_common.streamed(p, keys[i], noise, dtype, add, shape.masks[i]))
    return jax.tree.unflatten(treedef, out)

  return perturb


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
) -> tuple[Any, jax.Array]:
  r"""One MeZO step (ZO-SGD with one mirrored pair), in place when jitted with donation.

  .. math::
    \ell_\pm = f(\theta \pm \sigma z), \qquad
    \theta' = \theta - \eta\, \frac{\ell_+ - \ell_-}{2\sigma}\, z

  with ``z`` the noise of ES member 0 for ``key`` (the documented draw of
  :func:`es_gradient`: ``θ'`` equals ``θ - η · es_gradient(f, θ, key, sigma=σ,
  num_samples=2, mask=..., rank=...)``), regenerated leaf by leaf from the key each time
  it is used instead of stored. ``mask`` (Sparse MeZO) and ``rank`` (LOZO) shape ``z`` as
  in :func:`es_gradient`. The returned loss is ``(ℓ₊ + ℓ₋)/2 = f(θ) + O(σ²)``, the
  loss at ``θ`` without a third forward pass.

  Jit it with the params donated, ``jax.jit(step, donate_argnums=1)``, so that XLA writes
  ``θ'`` into ``θ``'s buffer. The step then holds one perturbed copy of the params next
  to the forward pass's temporaries: the two evaluations are ordered
  (``lax.optimization_barrier``) so that they share one perturbed buffer, and ``θ`` is
  never modified before the update (no restore, no round-off drift: MeZO's in-place
  ``θ+σz, θ−2σz, θ+σz`` walk cannot be written over an immutable JAX array without that
  copy). Its compiled memory against a forward pass, and its speed against the
  materialised estimate, are measured by ``benchmarks/zeroth_order_lm.py``
  (``benchmarks/results/zeroth_order_lm.md``).

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
    with low-rank structures", 2024, arXiv:2410.07698 (LOZO).
  """
  _checks.check_callable("loss_fn", loss_fn, call="loss_fn(params) -> scalar")
  _checks.check_positive("sigma", sigma, allow_schedule=False)
  _checks.check_finite("learning_rate", learning_rate, allow_schedule=False)
  _checks.check_choice("noise", noise, _common.NOISES)
  key = _common.check_inputs(params, key)
  if subspace_key is not None:
    subspace_key = _random.as_key(subspace_key, argname="subspace_key")
  shape = _noise.shaping(params, mask=mask, rank=rank, subspace_key=subspace_key)

  perturb = _perturber(params, key, noise, shape)  # z regenerated at every use

  def value(p):
    return _common.scalar_output("loss_fn", loss_fn(p)).astype(jnp.float32)

  up = perturb(params, sigma)
  plus = value(up)
  # θ - σz as (θ + σz) - 2σz, over the buffer of θ + σz (MeZO's walk), once the first
  # loss is known: `0 * plus` (kept by XLA, which does not assume finite floats) orders
  # every leaf's second perturbation after the whole first forward pass, so the two
  # passes share one perturbed buffer and never hold their activations at once.
  minus = value(perturb(up, -2 * sigma + 0.0 * plus))
  slope = (plus - minus) / (2 * jnp.asarray(sigma, jnp.float32))
  # The update starts from the untouched θ (no restore, no drift), in its donated buffer.
  new = perturb(params, -jnp.asarray(learning_rate, jnp.float32) * slope)
  return new, (plus + minus) / 2
