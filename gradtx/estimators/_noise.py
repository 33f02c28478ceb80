r"""The shape of a draw's noise: sparse masks (Sparse MeZO) and low rank (LOZO).

A draw's noise ``z`` (:func:`gradtx.estimators._common.member_noise`) is i.i.d. per
coordinate by default. Two options shape it, for every estimator that perturbs:

- ``mask``: ``z ⊙ m`` for a boolean pytree ``m`` like the params (or a rule
  ``m = rule(params)`` evaluated on the current params, e.g. :func:`magnitude_mask`). A leaf
  whose mask is ``False`` (a Python bool, or a concrete all-False array) draws no noise at
  all; inside a leaf the noise is drawn for the whole leaf (so unmasked entries see the
  same noise whatever the mask) and zeroed outside the mask.
- ``rank=r``: a leaf with at least two axes, viewed as an ``m × n`` matrix (its last axis
  is ``n``), draws ``z = U Vᵀ / √r`` with ``U`` (``m × r``) from the draw's key and ``V``
  (``n × r``) from ``subspace_key`` (when given: kept for several steps, LOZO) or from the
  draw's key. Every entry of ``z`` then has mean 0 and variance 1 and distinct entries are
  uncorrelated (``E[z zᵀ] = I`` over ``U`` and ``V``), so the estimators keep their
  expectation; leaves with fewer than two axes draw dense noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import _checks, _paths

# The V factor of a leaf draws from fold_in(subspace_key, crc32(path)), then this tag, so
# V never equals the U of the same key.
_V_TAG = 0x5AB5


class Shaping(NamedTuple):
  """Per leaf (in ``jax.tree.leaves`` order): ``frozen`` (static bools: no noise at all),
  ``masks`` (a boolean array, or ``None`` for the whole leaf), ``rank`` (static) and the
  ``subspace_key`` (a typed key or ``None``)."""

  frozen: tuple[bool, ...]
  masks: tuple[Any, ...]
  rank: int | None = None
  subspace_key: Any = None

  @property
  def arrays(self) -> tuple[Any, Any]:
    """The traced part (for ``shard_map`` arguments); :meth:`with_arrays` puts it back."""
    return self.masks, self.subspace_key

  def with_arrays(self, arrays: tuple[Any, Any]) -> Shaping:
    masks, subspace_key = arrays
    return self._replace(masks=tuple(masks), subspace_key=subspace_key)


def magnitude_mask(density: float) -> Callable[[Any], Any]:
  r"""Sparse MeZO's rule: perturb the fraction ``density`` of each leaf with the smallest ``|θ|``.

  .. math::
    m_k = \big(|\theta_k| \le q_{\rho}(|\theta|)\big)

  with ``q_ρ`` the ``ρ``-quantile of the leaf's magnitudes (``jnp.quantile``, linear
  interpolation). Returns the rule ``mask(params) -> boolean pytree``: pass it as
  ``mask=`` to re-evaluate it on the current params at every step (a sort per leaf), or
  call it once, ``mask=gradtx.magnitude_mask(0.2)(params)``, to keep a fixed mask.

  Args:
    density: the fraction ``ρ`` in (0, 1] of each leaf's entries to perturb.

  Returns:
    ``mask(params) -> pytree of bool arrays``.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> rule = gradtx.magnitude_mask(0.5)
    >>> rule({"w": jnp.array([0.1, -3.0, 0.2, 4.0])})["w"].tolist()
    [True, False, True, False]

  References:
    Liu, Zhu, Ma, Zhang, Wu, Ma, Wang, "Sparse MeZO: less parameters for better
    performance in zeroth-order LLM fine-tuning", 2024, arXiv:2402.15751.
  """
  _checks.check_in_interval("density", density, 0.0, 1.0, low_open=True)
  _checks.check_finite("density", density, allow_schedule=False)
  rho = float(density)

  def rule(params):
    def leaf_mask(p):
      a = jnp.abs(p.astype(jnp.float32))
      return a <= jnp.quantile(a.reshape(-1), rho) if a.size else jnp.ones(a.shape, bool)

    return jax.tree.map(leaf_mask, params)

  return rule


def _concrete_value(x: Any) -> bool | None:
  """``True``/``False`` when the mask leaf is a Python bool or a concrete uniform array."""
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, jax.core.Tracer):
    return None
  values = np.asarray(x)
  if values.size and values.all():
    return True
  if not values.any():
    return False
  return None


def _mask_leaves(mask: Any, params: Any) -> list[Any]:
  """The mask's leaves, checked against ``params`` (paths named on a mismatch)."""
  if callable(mask) and not isinstance(mask, jax.Array):
    mask = mask(params)
  _checks.check_same_structure("mask", mask, "params", params, shapes=False)
  paths = _paths.tree_paths(params)
  leaves = jax.tree.leaves(mask)
  bad = []
  for path, m, p in zip(paths, leaves, jax.tree.leaves(params), strict=True):
    dtype = np.result_type(getattr(m, "dtype", None) or np.asarray(m).dtype)
    if dtype != np.bool_ or np.shape(m) not in ((), np.shape(p)):
      bad.append(f"{path or '<root>'}: {dtype}{list(np.shape(m))} for a leaf of shape "
                 f"{list(np.shape(p))}")
  if bad:
    raise ValueError("mask must hold booleans of each leaf's shape (or a scalar bool for "
                     f"the whole leaf); these leaves do not: {', '.join(bad[:8])}")
  return leaves


def shaping(params: Any, *, mask: Any = None, rank: int | None = None,
            subspace_key: Any = None) -> Shaping:
  """Checks ``mask`` and ``rank`` against ``params`` and returns their :class:`Shaping`."""
  leaves = jax.tree.leaves(params)
  if rank is not None:
    check_rank(rank, params)
  if mask is None:
    return Shaping((False,) * len(leaves), (None,) * len(leaves), rank, subspace_key)
  frozen, masks = [], []
  for m, p in zip(_mask_leaves(mask, params), leaves, strict=True):
    value = _concrete_value(m)
    frozen.append(value is False)
    masks.append(None if value is not None else jnp.broadcast_to(m, jnp.shape(p)))
  return Shaping(tuple(frozen), tuple(masks), rank, subspace_key)


def check_rank(rank: Any, params: Any) -> None:
  """``rank`` is a static int >= 1 no larger than any matrix leaf's ``min(m, n)``."""
  _checks.check_static("rank", rank)
  _checks.check_int("rank", rank, minimum=1)
  too_small = [f"{path or '<root>'} {list(np.shape(p))} (min(m, n) = "
               f"{min(_matrix(np.shape(p)))})"
               for path, p in zip(_paths.tree_paths(params), jax.tree.leaves(params),
                                  strict=True)
               if np.ndim(p) >= 2 and min(_matrix(np.shape(p))) < int(rank)]
  if too_small:
    raise ValueError(f"rank={rank} is larger than these matrix leaves allow: "
                     f"{', '.join(too_small[:8])}; use rank <= the smallest min(m, n), or "
                     f"leave those leaves out (optax.masked / mask=)")


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
  """``(m, n)``: a shape with at least two axes as a matrix over its last axis."""
  return int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])


def low_rank(u_key: jax.Array, v_key: jax.Array, shape: tuple[int, ...], rank: int,
             sample: Callable, dtype: Any) -> jax.Array:
  """``U Vᵀ / √r`` of ``shape`` (``U`` from ``u_key``, ``V`` from ``v_key``)."""
  m, n = _matrix(shape)
  u = sample(u_key, (m, rank), dtype)
  v = sample(jax.random.fold_in(v_key, _V_TAG), (n, rank), dtype)
  return (u @ v.T / np.sqrt(rank).astype(dtype)).reshape(shape)
