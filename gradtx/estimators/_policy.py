r"""REINFORCE: the score-function (policy) gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradtx import _checks
from gradtx.estimators import _common


def score_function_gradient(
    log_prob_fn: Callable[[Any, Any], jax.Array],
    reward_fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    sample_fn: Callable[[Any, jax.Array], Any],
    num_samples: int,
    baseline: str | None = "mean",
) -> Any:
  r"""REINFORCE: ``∇_θ E_{y ~ p_θ} r(y)`` from samples and the score ``∇ log p_θ(y)``.

  .. math::
    \hat g = \frac{1}{N} \sum_{i=1}^{N} \big(r(y_i) - b_i\big)\, \nabla_\theta
      \log p_\theta(y_i), \qquad y_i \sim p_\theta

  ``baseline="mean"`` uses the leave-one-out mean ``b_i`` of the other rewards (keeps the
  estimate unbiased while removing most of the variance); ``None`` uses 0. Sample ``i``
  is ``sample_fn(params, fold_in(key, i))``; one backward pass through
  ``Σ_i w_i log p_θ(y_i)`` (weights held fixed) gives the estimate.

  Args:
    log_prob_fn: ``log_prob_fn(params, y) -> scalar``, differentiable in ``params``.
    reward_fn: ``reward_fn(y) -> scalar`` (need not be differentiable).
    params: the policy's parameters ``θ`` (float or complex arrays).
    key: a ``jax.random`` key.
    sample_fn: ``sample_fn(params, key) -> y``, a draw from ``p_θ``.
    num_samples: N >= 1 (>= 2 with ``baseline="mean"``); static.
    baseline: ``"mean"`` or ``None``.

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> reward = lambda y: jnp.array([1.0, 0.0, 2.0])[y]
    >>> log_prob = lambda p, y: jax.nn.log_softmax(p["logits"])[y]
    >>> sample = lambda p, k: jax.random.categorical(k, p["logits"])
    >>> g = gradtx.score_function_gradient(log_prob, reward, {"logits": jnp.zeros(3)},
    ...     jax.random.key(0), sample_fn=sample, num_samples=50000)
    >>> [round(float(v), 1) for v in g["logits"]]   # exact: π ⊙ (r - E r) = [0, -⅓, ⅓]
    [0.0, -0.3, 0.3]

  References:
    Williams, "Simple statistical gradient-following algorithms for connectionist
    reinforcement learning", Machine Learning 8, 1992.
  """
  _checks.check_static("num_samples", num_samples)
  _checks.check_int("num_samples", num_samples, minimum=1)
  _checks.check_choice("baseline", baseline, ("mean", None))
  n = int(num_samples)
  if baseline == "mean" and n < 2:
    raise ValueError(f"num_samples must be >= 2 with baseline='mean' (a leave-one-out "
                     f"mean), got {num_samples!r}")
  _checks.check_callable("log_prob_fn", log_prob_fn, call="log_prob_fn(params, y) -> scalar")
  _checks.check_callable("reward_fn", reward_fn, call="reward_fn(y) -> scalar")
  _checks.check_callable("sample_fn", sample_fn, call="sample_fn(params, key) -> y")
  _common.check_inputs(params, key, allow_complex=True)
  # Folded into the key as given: sample_fn sees keys of the kind the caller passed.
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n, dtype=jnp.uint32))
  samples = jax.vmap(sample_fn, in_axes=(None, 0))(params, keys)
  samples = jax.lax.stop_gradient(samples)
  rewards = jax.vmap(lambda y: _common.scalar_output("reward_fn", reward_fn(y)))(samples)
  weights = _common.weights(rewards.astype(jnp.float32), None, None, baseline)

  def surrogate(p):
    log_probs = jax.vmap(lambda y: _common.scalar_output("log_prob_fn", log_prob_fn(p, y)))(
        samples)
    return jnp.sum(jax.lax.stop_gradient(weights).astype(log_probs.dtype) * log_probs) / n

  return jax.grad(surrogate)(params)
