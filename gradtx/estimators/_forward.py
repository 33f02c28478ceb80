r"""Forward gradients: ``<∇f(θ), v> v`` from one ``jax.jvp`` per direction."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradtx import _checks, _numerics
from gradtx.estimators import _common


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
  """The options of :func:`forward_gradient`, checked when built (as :class:`ESOptions`)."""

  num_directions: int = 1

  def __post_init__(self):
    _checks.check_static("num_directions", self.num_directions)
    _checks.check_int("num_directions", self.num_directions, minimum=1)

  def estimate(self, fn: Callable[[Any], jax.Array], params: Any, key: jax.Array) -> Any:
    """The forward gradient of ``fn`` at ``params`` (:func:`forward_gradient`)."""
    _checks.check_callable("fn", fn, call="fn(params) -> scalar")
    key = _common.check_inputs(params, key)

    def one(k):
      v = _common.member_noise(key, k, params, "gaussian")
      tangent = jax.tree.map(lambda p, e: e.astype(jnp.result_type(p)), params, v)
      value, slope = jax.jvp(fn, (params,), (tangent,))
      _common.scalar_output("fn", value)
      return jax.tree.map(lambda e: slope.astype(e.dtype) * e, v)

    draws = jax.vmap(one)(jnp.arange(int(self.num_directions), dtype=jnp.uint32))
    return jax.tree.map(
        lambda d, p: _numerics.sharded_like(jnp.mean(d, 0).astype(jnp.result_type(p)), p),
        draws, params)


def forward_gradient(
    fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    num_directions: int = ForwardOptions.num_directions,
) -> Any:
  r"""Forward gradient: ``(1/K) Σ_k <∇f(θ), v_k> v_k`` with ``v_k ~ N(0, I)``.

  .. math::
    \hat g = \frac{1}{K} \sum_{k=1}^{K} \big(\nabla f(\theta) \cdot v_k\big)\, v_k,
    \qquad \mathbb{E}\,\hat g = \nabla f(\theta)

  Each directional derivative is one forward-mode ``jax.jvp`` (no backward pass, no
  stored activations); the K directions run vectorised. Direction ``k`` is drawn like
  ES member ``k`` (``fold_in(key, k)``, then the leaf path).

  Args:
    fn: ``fn(params) -> scalar``, differentiable in forward mode.
    params: the point ``θ``, any pytree of float arrays.
    key: a ``jax.random`` key.
    num_directions: K >= 1 (static).

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> f = lambda p: jnp.sum(p["w"] ** 2)
    >>> g = gradtx.forward_gradient(f, {"w": jnp.ones(2)}, jax.random.key(0),
    ...                             num_directions=20000)
    >>> jnp.round(g["w"], 1).tolist()
    [2.0, 2.0]

  References:
    Baydin, Pearlmutter, Syme, Wood, Torr, "Gradients without backpropagation", 2022,
    arXiv:2202.08587.
  """
  return ForwardOptions(num_directions=num_directions).estimate(fn, params, key)
