"""Gradient clipping: hard and soft, by global or per-leaf norm, with adaptive thresholds.

Zhang et al. (2020) show that under (L0, L1)-smoothness, ``‖∇²f‖ <= L0 + L1‖∇f‖``, the
best fixed-direction step is ``η* = 1 / (L0 + L1‖g‖)``: a step that shrinks as the
gradient grows. Both clipping rules below approximate it (TECHNIQUES.md §6):

  hard:  u = g · min(1, γ / ‖g‖)        soft:  u = g · γ / (‖g‖ + γ)

and ``½ · hard <= soft <= hard`` in norm, with the direction unchanged. The adaptive
rules choose γ from the history of gradient norms: AutoClip (a percentile of all norms
seen) and ZClip (an EMA z-score test).

Every state carries the pre-clip ``grad_norm`` and the applied ``clip_scale`` for
logging (``optax.tree_utils.tree_get(state, "grad_norm")``).

NaN/inf gradients: the norm is NaN/inf, the returned updates are NaN (the fault
propagates visibly, it is never hidden; per-leaf clipping marks only the faulty
leaves), ``grad_norm`` records the non-finite value,
and the adaptive rules do *not* record it in their statistics, so one bad step never
poisons later thresholds.

References:
  Zhang, He, Sra, Jadbabaie, "Why gradient clipping accelerates training: a theoretical
  justification for adaptivity", ICLR 2020, arXiv:1905.11881.
  Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive gradient clipping for
  source separation networks", MLSP 2020, arXiv:2007.14469.
  Kumar, Owen, Chowdhury, Güra, "ZClip: Adaptive spike mitigation for LLM
  pre-training", 2025, arXiv:2504.02507.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from gradtx import _checks, _numerics

_MODES = ("hard", "soft")


def _sqrt_with_zero_gradient_at_zero(sum_of_squares: jax.Array) -> jax.Array:
  """``sqrt`` whose derivative at 0 is 0 instead of inf (NaN stays NaN)."""
  is_zero = sum_of_squares == 0
  safe = jnp.where(is_zero, jnp.ones_like(sum_of_squares), sum_of_squares)
  return jnp.where(is_zero, jnp.zeros_like(sum_of_squares), jnp.sqrt(safe))


def leaf_norm(x: jax.Array) -> jax.Array:
  """L2 norm of one array, accumulated in at least float32; safe to differentiate at 0."""
  x = x.astype(_numerics.compute_dtype(x))
  return _sqrt_with_zero_gradient_at_zero(jnp.sum(jnp.square(x)))


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over every leaf of ``tree`` (float32 or wider; 0 for an empty tree)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  sum_of_squares = sum(jnp.sum(jnp.square(x.astype(_numerics.compute_dtype(x)))) for x in leaves)
  return _sqrt_with_zero_gradient_at_zero(sum_of_squares)


def clip_scale(norm: jax.Array, max_norm: jax.Array, mode: str) -> jax.Array:
  """The factor that clipping multiplies a gradient of norm ``norm`` by.

  hard: ``γ / max(‖g‖, γ)`` (= ``min(1, γ/‖g‖)``, written so that ‖g‖ = 0 gives 1 with
  finite derivatives); soft: ``γ / (‖g‖ + γ)``. ``‖g‖ = γ = 0`` (a zero gradient under
  AutoClip's zero threshold) gives 1, not 0/0. A non-finite ``‖g‖`` gives NaN (not 0 for
  inf), so every entry of the clipped gradient shows the fault.
  """
  max_norm = jnp.asarray(max_norm, norm.dtype)
  denominator = jnp.maximum(norm, max_norm) if mode == "hard" else norm + max_norm
  positive = denominator > 0
  scale = jnp.where(positive, max_norm / jnp.where(positive, denominator, 1.0), 1.0)
  return jnp.where(jnp.isfinite(norm), scale, jnp.nan)


def _scale_tree(updates: Any, scale: Any) -> Any:
  """Multiplies each leaf by its scale (a scalar or a tree of scalars), keeping dtypes."""
  if not isinstance(scale, jax.Array):
    return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scale)
  return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)


def _check_mode(mode: str) -> None:
  _checks.check_choice("mode", mode, _MODES)


class ClipByGlobalNormState(NamedTuple):
  """State of :func:`clip_by_global_norm`.

  Attributes:
    count: number of updates so far (drives a ``max_norm`` schedule).
    grad_norm: the global norm of the last incoming gradient, before clipping.
    clip_scale: the factor the last gradient was multiplied by (1 means unclipped).
  """

  count: chex.Array
  grad_norm: chex.Array
  clip_scale: chex.Array


def clip_by_global_norm(
    max_norm: optax.ScalarOrSchedule, *, mode: str = "hard"
) -> optax.GradientTransformation:
  r"""Clips the whole gradient pytree by its global L2 norm, hard or soft.

  .. math::
    \text{hard: } u = g \cdot \min\!\left(1, \frac{\gamma}{\|g\|}\right) \qquad
    \text{soft: } u = g \cdot \frac{\gamma}{\|g\| + \gamma}

  Soft clipping is the step size ``1/(L0 + L1‖g‖)`` that Zhang et al. derive for
  (L0, L1)-smooth objectives; it satisfies ``½‖hard(g)‖ <= ‖soft(g)‖ < γ``. Unlike
  ``optax.clip_by_global_norm``, the state exposes the pre-clip ``grad_norm`` and the
  applied ``clip_scale``, and ``‖g‖ = 0`` gives no NaN in the value or its derivatives.
  A NaN/inf gradient yields NaN updates (propagated, not hidden).

  Args:
    max_norm: the threshold γ > 0, or a schedule ``count -> γ``.
    mode: ``"hard"`` or ``"soft"``.

  Returns:
    An ``optax.GradientTransformation`` whose state is :class:`ClipByGlobalNormState`.

  Example:
    >>> import jax.numpy as jnp, optax, gradtx
    >>> tx = gradtx.clip_by_global_norm(1.0, mode="soft")
    >>> g = {"w": jnp.array([3.0, 4.0])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> u["w"].tolist(), float(state.grad_norm), round(float(state.clip_scale), 4)
    ([0.5, 0.6666666865348816], 5.0, 0.1667)

  References:
    Zhang, He, Sra, Jadbabaie, "Why gradient clipping accelerates training", ICLR 2020,
    arXiv:1905.11881.
  """
  _checks.check_positive("max_norm", max_norm)
  _check_mode(mode)

  def init_fn(params):
    del params
    return ClipByGlobalNormState(
        count=jnp.zeros((), jnp.int32),
        grad_norm=jnp.zeros((), jnp.float32),
        clip_scale=jnp.ones((), jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    norm = global_norm(updates).astype(jnp.float32)
    scale = clip_scale(norm, _numerics.scalar_or_schedule(max_norm, state.count), mode)
    new_state = ClipByGlobalNormState(optax.safe_increment(state.count), norm, scale)
    return _scale_tree(updates, scale), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ClipByLeafNormState(NamedTuple):
  """State of :func:`clip_by_leaf_norm`: per-leaf ``grad_norm`` and ``clip_scale`` trees."""

  count: chex.Array
  grad_norm: Any
  clip_scale: Any


def clip_by_leaf_norm(
    max_norm: optax.ScalarOrSchedule, *, mode: str = "hard"
) -> optax.GradientTransformation:
  r"""Clips every leaf (tensor) by its own L2 norm, hard or soft.

  .. math::
    u_\ell = g_\ell \cdot \min\!\left(1, \frac{\gamma}{\|g_\ell\|}\right) \;\text{(hard)}
    \qquad u_\ell = g_\ell \cdot \frac{\gamma}{\|g_\ell\| + \gamma} \;\text{(soft)}

  Args:
    max_norm: the per-tensor threshold γ > 0, or a schedule ``count -> γ``.
    mode: ``"hard"`` or ``"soft"``.

  Returns:
    An ``optax.GradientTransformation``; its :class:`ClipByLeafNormState` holds
    ``grad_norm`` and ``clip_scale`` as pytrees shaped like the params (one scalar each).

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> tx = gradtx.clip_by_leaf_norm(1.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> u["a"].tolist(), u["b"].tolist(), float(state.grad_norm["a"])
    ([0.6000000238418579, 0.800000011920929], [0.5], 5.0)

  References:
    Zhang, He, Sra, Jadbabaie, ICLR 2020, arXiv:1905.11881.
  """
  _checks.check_positive("max_norm", max_norm)
  _check_mode(mode)

  def init_fn(params):
    return ClipByLeafNormState(
        count=jnp.zeros((), jnp.int32),
        grad_norm=jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params),
        clip_scale=jax.tree.map(lambda _: jnp.ones((), jnp.float32), params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    threshold = _numerics.scalar_or_schedule(max_norm, state.count)
    norms = jax.tree.map(lambda u: leaf_norm(u).astype(jnp.float32), updates)
    scales = jax.tree.map(lambda n: clip_scale(n, threshold, mode), norms)
    new_state = ClipByLeafNormState(optax.safe_increment(state.count), norms, scales)
    return _scale_tree(updates, scales), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AutoClipState(NamedTuple):
  """State of :func:`auto_clip`.

  Attributes:
    num_recorded: how many finite norms have been recorded (the ring-buffer cursor).
    norm_history: ring buffer of the last ``history`` finite global norms.
    grad_norm: pre-clip global norm of the last gradient.
    max_norm: the threshold applied to the last gradient.
    clip_scale: the factor the last gradient was multiplied by.
  """

  num_recorded: chex.Array
  norm_history: chex.Array
  grad_norm: chex.Array
  max_norm: chex.Array
  clip_scale: chex.Array


def _linear_percentile(values: jax.Array, num_valid: jax.Array, q: jax.Array) -> jax.Array:
  """``numpy.percentile(values[:num_valid], q)`` (linear method) for a traced ``num_valid``.

  Entries at positions >= ``num_valid`` are ignored.
  """
  valid = jnp.arange(values.shape[0]) < num_valid
  ordered = jnp.sort(jnp.where(valid, values, jnp.inf))
  last = jnp.maximum(num_valid - 1, 0)
  position = jnp.asarray(q, jnp.float32) / 100.0 * last.astype(jnp.float32)
  below = jnp.floor(position).astype(jnp.int32)
  above = jnp.minimum(below + 1, last)
  weight = position - below.astype(jnp.float32)
  low, high = ordered[below], ordered[above]
  # numpy's lerp: exact at both ends.
  return jnp.where(weight >= 0.5, high - (high - low) * (1 - weight), low + (high - low) * weight)


def auto_clip(
    percentile: float = 10.0, *, history: int = 1000, mode: str = "hard"
) -> optax.GradientTransformation:
  r"""AutoClip: clips to a percentile of the history of global gradient norms.

  .. math::
    \gamma_t = \operatorname{percentile}_p\big(\|g_{t-h+1}\|, \dots, \|g_t\|\big),
    \qquad u_t = g_t \cdot \min(1, \gamma_t / \|g_t\|)

  As in Seetharaman et al.'s reference code, the current norm is recorded *before*
  the threshold is computed, so the first step's history is ``[‖g_1‖]``, its threshold
  ``γ_1 = ‖g_1‖`` and (in hard mode) it is never clipped; over the first few steps the
  threshold is a percentile of only a handful of norms. The history is a ring buffer of the last
  ``history`` finite norms (the paper keeps all of them: ``history >= num_steps``
  reproduces it exactly). Non-finite norms are not recorded.

  Args:
    percentile: p in [0, 100]; the paper recommends 10.
    history: ring-buffer length (static; with ``optax.inject_hyperparams`` list it in
      ``static_args``).
    mode: ``"hard"`` (the paper) or ``"soft"`` clipping to the threshold.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`AutoClipState`.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> tx = gradtx.auto_clip(50.0, history=4)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for g in [1.0, 3.0, 10.0]:
    ...   u, state = tx.update({"w": jnp.array([g])}, state)
    >>> float(state.max_norm), u["w"].tolist()
    (3.0, [3.0])

  References:
    Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive gradient clipping for
    source separation networks", MLSP 2020, arXiv:2007.14469.
  """
  _checks.check_in_interval("percentile", percentile, 0.0, 100.0)
  _checks.check_int("history", history, minimum=1)
  _check_mode(mode)

  def init_fn(params):
    del params
    return AutoClipState(
        num_recorded=jnp.zeros((), jnp.int32),
        norm_history=jnp.zeros((history,), jnp.float32),
        grad_norm=jnp.zeros((), jnp.float32),
        max_norm=jnp.zeros((), jnp.float32),
        clip_scale=jnp.ones((), jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    norm = global_norm(updates).astype(jnp.float32)
    finite = jnp.isfinite(norm)
    cursor = state.num_recorded % history
    norm_history = jnp.where(
        finite, state.norm_history.at[cursor].set(norm), state.norm_history
    )
    num_recorded = jnp.where(finite, optax.safe_increment(state.num_recorded),
                             state.num_recorded)
    num_valid = jnp.minimum(num_recorded, history)
    threshold = _linear_percentile(norm_history, num_valid, percentile)
    threshold = jnp.where(num_valid > 0, threshold, norm)
    scale = clip_scale(norm, threshold, mode)
    new_state = AutoClipState(num_recorded, norm_history, norm, threshold, scale)
    return _scale_tree(updates, scale), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ZScoreClipState(NamedTuple):
  """State of :func:`zscore_clip`.

  Attributes:
    num_recorded: number of finite norms seen (warm-up ends when it reaches
      ``warmup_steps``).
    norm_mean: during warm-up the running mean of the norms; after it, their EMA.
    norm_var: during warm-up the running (population) variance; after it, its EMA.
    grad_norm: pre-clip global norm of the last gradient.
    z_score: ``(‖g‖ - mean) / (std + eps)`` of the last gradient (0 during warm-up).
    clip_scale: the factor the last gradient was multiplied by.
  """

  num_recorded: chex.Array
  norm_mean: chex.Array
  norm_var: chex.Array
  grad_norm: chex.Array
  z_score: chex.Array
  clip_scale: chex.Array


def zscore_clip(
    *,
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    warmup_steps: int = 25,
    eps: float = 1e-6,
    max_norm: float | None = None,
) -> optax.GradientTransformation:
  r"""ZClip: clips global-norm spikes detected by an EMA z-score test.

  Warm-up (the first ``warmup_steps`` finite norms): nothing is clipped (except by
  ``max_norm`` if given) and the mean μ and population variance σ² of the norms are
  accumulated; they seed the EMAs. After warm-up, for ``n = ‖g_t‖``:

  .. math::
    z = \frac{n - \mu}{\sigma + \epsilon}, \qquad
    c = \begin{cases} \mu + \dfrac{z_{thr}\,\sigma}{z / z_{thr}} & z > z_{thr} \\
        n & \text{otherwise} \end{cases}, \qquad u = g \cdot \min(1, c / n)

  and the statistics are updated with the *clipped* norm c, the mean first:
  ``μ ← αμ + (1-α)c``, ``σ² ← ασ² + (1-α)(c - μ)²`` (the reference implementation's
  order). This is the paper's "adaptive_scaling" option, the default of its code.

  ``max_norm`` adds a fixed hard cap on top (the reference's ``max_grad_norm``, which
  also applies during warm-up); ``None``, the default here, applies none — the
  reference code's default changed between versions, and a silent cap of 1.0 would
  surprise users of a z-score method. Non-finite norms do not touch the statistics.

  Args:
    alpha: EMA factor in (0, 1).
    z_thresh: z-score above which a norm is a spike (> 0).
    warmup_steps: number of norms that seed the statistics (>= 1).
    eps: added to σ in the z-score.
    max_norm: optional fixed cap on the norm, > 0.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ZScoreClipState`.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> tx = gradtx.zscore_clip(warmup_steps=3)
    >>> state = tx.init({"w": jnp.zeros(1)})
    >>> for g in [1.0, 1.2, 0.8, 50.0]:
    ...   u, state = tx.update({"w": jnp.array([g])}, state)
    >>> bool(state.z_score > 2.5), float(u["w"][0]) < 2.0
    (True, True)

  References:
    Kumar, Owen, Chowdhury, Güra, "ZClip: Adaptive spike mitigation for LLM
    pre-training", 2025, arXiv:2504.02507.
  """
  _checks.check_in_interval("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
  _checks.check_positive("z_thresh", z_thresh)
  _checks.check_int("warmup_steps", warmup_steps, minimum=1)
  _checks.check_positive("eps", eps)
  if max_norm is not None:
    _checks.check_positive("max_norm", max_norm)

  def init_fn(params):
    del params
    zero = jnp.zeros((), jnp.float32)
    return ZScoreClipState(
        num_recorded=jnp.zeros((), jnp.int32),
        norm_mean=zero, norm_var=zero, grad_norm=zero, z_score=zero,
        clip_scale=jnp.ones((), jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    norm = global_norm(updates).astype(jnp.float32)
    finite = jnp.isfinite(norm)
    warming_up = state.num_recorded < warmup_steps

    # Warm-up: Welford's running mean and population variance.
    n = (state.num_recorded + 1).astype(jnp.float32)
    delta = norm - state.norm_mean
    warm_mean = state.norm_mean + delta / n
    warm_var = ((n - 1) * state.norm_var + delta * (norm - warm_mean)) / n

    # After warm-up: z-score test, adaptive threshold, EMA of the clipped norm.
    std = jnp.sqrt(state.norm_var)
    z = (norm - state.norm_mean) / (std + eps)
    spike = z > z_thresh
    adaptive = state.norm_mean + z_thresh * std / jnp.where(spike, z / z_thresh, 1.0)
    clip_value = jnp.where(spike, adaptive, norm)
    ema_mean = alpha * state.norm_mean + (1 - alpha) * clip_value
    ema_var = alpha * state.norm_var + (1 - alpha) * jnp.square(clip_value - ema_mean)

    target = jnp.where(warming_up, norm, clip_value)
    if max_norm is not None:
      target = jnp.minimum(target, max_norm)
    # ``target <= norm`` always, so this is min(1, target / norm) with 0/0 -> 1.
    scale = jnp.where(norm > 0, target / jnp.where(norm > 0, norm, 1.0), 1.0)
    scale = jnp.where(finite, scale, jnp.nan)

    keep = jnp.logical_not(finite)
    new_state = ZScoreClipState(
        num_recorded=jnp.where(keep, state.num_recorded, optax.safe_increment(state.num_recorded)),
        norm_mean=jnp.where(keep, state.norm_mean, jnp.where(warming_up, warm_mean, ema_mean)),
        norm_var=jnp.where(keep, state.norm_var, jnp.where(warming_up, warm_var, ema_var)),
        grad_norm=norm,
        z_score=jnp.where(warming_up, 0.0, z),
        clip_scale=scale,
    )
    return _scale_tree(updates, scale), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
