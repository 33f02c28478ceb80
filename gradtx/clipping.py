"""Gradient clipping: hard and soft, by global or per-leaf norm, with adaptive thresholds.

Zhang et al. (2020) show that under (L0, L1)-smoothness, ``‖∇²f‖ <= L0 + L1‖∇f‖``, the
best fixed-direction step is ``η* = 1 / (L0 + L1‖g‖)``: a step that shrinks as the
gradient grows. Both clipping rules below approximate it:

  hard:  u = g · min(1, γ / ‖g‖)        soft:  u = g · γ / (‖g‖ + γ)

and ``½ · hard <= soft <= hard`` in norm, with the direction unchanged. The adaptive
rules choose γ from the history of gradient norms: AutoClip (a percentile of all norms
seen) and ZClip (an EMA z-score test).

Every state carries the pre-clip ``grad_norm`` and the applied ``clip_scale`` for
logging (``optax.tree_utils.tree_get(state, "grad_norm")``).

Norms (:func:`global_norm`, :func:`leaf_norm`): ``optax.tree.norm`` (``|x|²`` for
complex entries) accumulated in the wider of float32 and the gradient's dtype (bfloat16
in float32, float64 under x64 in float64; the states use that dtype too). When the sum
of squares overflows or underflows (float32 ``[1e20, 1]``), a second pass computes the
norm of ``g`` scaled by a power of two; it runs only on such steps (``lax.cond``; under
``vmap`` both branches run). Integer or boolean gradients are refused, naming the path.

NaN/inf gradients: the norm is NaN/inf, the returned updates are NaN (the fault
propagates visibly, it is never hidden; per-leaf clipping marks only the faulty
leaves), ``grad_norm`` records the non-finite value,
and the adaptive rules do *not* record it in their statistics, so one bad step never
poisons later thresholds. A ``max_norm`` schedule that returns a value <= 0 or NaN gives
NaN updates too (never a sign flip or a silent zero step).

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
from jax.typing import ArrayLike

from gradtx import _checks, _numerics, _paths

_MODES = ("hard", "soft")


def _sqrt_with_zero_gradient_at_zero(sum_of_squares: jax.Array) -> jax.Array:
  """``sqrt`` whose derivative at 0 is 0 instead of inf (NaN stays NaN)."""
  is_zero = sum_of_squares == 0
  safe = jnp.where(is_zero, jnp.ones_like(sum_of_squares), sum_of_squares)
  return jnp.where(is_zero, jnp.zeros_like(sum_of_squares), jnp.sqrt(safe))


def _norm_dtype(tree: Any) -> Any:
  """The real dtype the norms of ``tree`` are computed in: float32, or wider if a leaf is."""
  return jnp.result_type(jnp.float32, *(jnp.finfo(_numerics.compute_dtype(x)).dtype
                                        for x in jax.tree.leaves(tree)))


def _safe_root(sum_of_squares: jax.Array, count: int,
               squares_of_scaled: Any) -> jax.Array:
  """``sqrt(sum_of_squares)`` (elementwise), recomputed where it overflowed or underflowed.

  ``squares_of_scaled(c)`` is the sum of squares of the same entries scaled by ``c`` (of
  ``sum_of_squares``' shape): the norm is then ``‖x · c‖ / c`` for ``c = 2^∓(maxexp/2)``
  (``c = 2^-64`` in float32 after an overflow, ``2^64`` after an underflow). A power of
  two is exact, and it brings the squares of every entry that matters into range: after
  an overflow the entries it flushes are below ``2`` (float32), negligible next to
  ``‖x‖² >= 3e38``; after an underflow every entry is tiny, so none overflows. ``c`` is a
  constant for differentiation, so the derivative is ``x / ‖x‖``. The second pass runs
  only when some sum needs it (``lax.cond``); ``count`` is the number of entries per sum.
  """
  dtype = sum_of_squares.dtype
  finfo = jnp.finfo(dtype)
  # Squares below ``tiny`` flush to 0; above this bound their total is under one ulp.
  trusted_from = count * float(finfo.tiny) / float(finfo.eps)
  rescale = (sum_of_squares < trusted_from) | (sum_of_squares == jnp.inf)

  def rescaled(s):
    half = finfo.maxexp // 2
    factor = jnp.where(s == jnp.inf, jnp.asarray(2.0 ** -half, dtype),
                       jnp.asarray(2.0 ** half, dtype))
    again = (_sqrt_with_zero_gradient_at_zero(squares_of_scaled(factor)) / factor).astype(dtype)
    return jnp.where(rescale, again, _sqrt_with_zero_gradient_at_zero(s))

  return jax.lax.cond(jnp.any(rescale), rescaled, _sqrt_with_zero_gradient_at_zero,
                      sum_of_squares)


def _norm(tree: Any) -> jax.Array:
  """L2 norm of a float (or complex) tree, without spurious overflow or underflow."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  tree = jax.tree.map(lambda x: jnp.asarray(x, _numerics.compute_dtype(x)), tree)
  return _safe_root(optax.tree.norm(tree, squared=True), sum(jnp.size(x) for x in leaves),
                    lambda c: optax.tree.norm(jax.tree.map(lambda x: x * c, tree),
                                              squared=True))


def _slice_norms(x: jax.Array, stack: _paths.StackedLeaf) -> jax.Array:
  """The L2 norm of every slice of ``x`` along ``stack.axis``: a vector of ``stack.length``."""
  x = jnp.asarray(x, _numerics.compute_dtype(x))
  others = tuple(a for a in range(x.ndim) if a != stack.axis)

  def squares(c=None):
    y = x if c is None else x * stack.along(c, x.ndim)
    return jnp.sum(jnp.real(y * jnp.conj(y)) if jnp.iscomplexobj(y) else jnp.square(y),
                   axis=others)

  return _safe_root(squares(), x.size // max(stack.length, 1), squares)


def leaf_norm(x: jax.Array) -> jax.Array:
  """L2 norm of one float or complex array, computed as :func:`global_norm` does.

  Args:
    x: a floating or complex array (integers and booleans are refused).

  Returns:
    A scalar in the wider of float32 and ``x``'s real dtype.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> float(gradtx.clipping.leaf_norm(jnp.array([3.0, 4.0], jnp.bfloat16)))
    5.0
  """
  _checks.check_float_leaves("x", x, allow_complex=True)
  return _norm(x)


def global_norm(tree: optax.Updates) -> jax.Array:
  r"""L2 norm over every leaf of ``tree``, safe to differentiate at 0.

  .. math:: \|g\| = \sqrt{\textstyle\sum_\ell \sum_i |g_{\ell,i}|^2}

  Computed with ``optax.tree.norm`` (``|x|²`` for complex entries) in the wider of
  float32 and the leaves' dtype; a sum of squares that overflows or underflows is
  recomputed from the tree scaled by ``2^∓64`` (``2^∓512`` in float64), so every finite
  tree whose norm is representable gets it (that second pass runs only when needed,
  through ``lax.cond``). The derivative at 0 is 0, not NaN.

  Args:
    tree: a pytree of floating or complex arrays; Python floats count as 0-d arrays.

  Returns:
    A scalar in the wider of float32 and the leaves' real dtype; 0 (float32) for an
    empty tree.

  Raises:
    TypeError: integer or boolean leaves (their paths are named).

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> float(gradtx.global_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0])}))
    5.0
    >>> float(gradtx.global_norm([jnp.array([1e20, 1.0], jnp.float32)]))
    1.0000000200408773e+20
    >>> float(gradtx.global_norm([3.0, 4.0]))
    5.0
  """
  _checks.check_float_leaves("tree", tree, allow_complex=True)
  return _norm(tree)


def clip_scale(norm: jax.Array, max_norm: ArrayLike, mode: str) -> jax.Array:
  """The factor that clipping multiplies a gradient of norm ``norm`` by.

  hard: ``γ / max(‖g‖, γ)`` (= ``min(1, γ/‖g‖)``, written so that ‖g‖ = 0 gives 1 with
  finite derivatives); soft: ``γ / (‖g‖ + γ)``. ``‖g‖ = γ = 0`` (a zero gradient under
  AutoClip's zero threshold) gives 1, not 0/0. A non-finite ``‖g‖`` gives NaN (not 0 for
  inf), so every entry of the clipped gradient shows the fault; so does a negative or
  NaN ``γ`` (never a sign flip).

  Args:
    norm: ‖g‖, a scalar (the result's dtype).
    max_norm: γ >= 0, a scalar (a number or a 0-d array).
    mode: ``"hard"`` or ``"soft"`` (not checked: the callers check it).

  Returns:
    The scale, a scalar of ``norm``'s dtype.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> norm = jnp.float32(3.0)
    >>> [float(gradtx.clipping.clip_scale(norm, 1.0, m)) for m in ("hard", "soft")]
    [0.3333333432674408, 0.25]
  """
  max_norm = jnp.asarray(max_norm, norm.dtype)
  denominator = jnp.maximum(norm, max_norm) if mode == "hard" else norm + max_norm
  positive = denominator > 0
  scale = jnp.where(positive, max_norm / jnp.where(positive, denominator, 1.0), 1.0)
  return jnp.where(jnp.isfinite(norm) & (max_norm >= 0), scale, jnp.nan)


def _threshold(max_norm: optax.ScalarOrSchedule, count: chex.Array) -> jax.Array:
  """γ at ``count``; γ <= 0 or NaN from a schedule (or a traced γ) becomes NaN.

  A concrete number was checked at construction: it adds no work to the step.
  """
  value = _numerics.scalar_or_schedule(max_norm, count)
  if _checks.concrete_scalar(max_norm) is not None:
    return value
  return jnp.where(value > 0, value, jnp.nan)


def _scale_tree(updates: Any, scale: Any) -> Any:
  """Multiplies each leaf by its scale (a scalar or a tree of scalars), keeping dtypes."""
  if not isinstance(scale, jax.Array):
    return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scale)
  return jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates)


def _check_float(argname: str, tree: Any) -> None:
  _checks.check_float_leaves(argname, tree, allow_complex=True)


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
) -> optax.GradientTransformationExtraArgs:
  r"""Clips the whole gradient pytree by its global L2 norm, hard or soft.

  .. math::
    \text{hard: } u = g \cdot \min\!\left(1, \frac{\gamma}{\|g\|}\right) \qquad
    \text{soft: } u = g \cdot \frac{\gamma}{\|g\| + \gamma}

  Soft clipping is the step size ``1/(L0 + L1‖g‖)`` that Zhang et al. derive for
  (L0, L1)-smooth objectives; it satisfies ``½‖hard(g)‖ <= ‖soft(g)‖ < γ``. Unlike
  ``optax.clip_by_global_norm``, the state exposes the pre-clip ``grad_norm`` and the
  applied ``clip_scale``, and ``‖g‖ = 0`` gives no NaN in the value or its derivatives.
  A NaN/inf gradient yields NaN updates (propagated, not hidden); so does a schedule
  that returns γ <= 0 or NaN. The norm is overflow-safe (see :func:`global_norm`).

  Args:
    max_norm: the threshold γ > 0, or a schedule ``count -> γ``.
    mode: ``"hard"`` or ``"soft"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    :class:`ClipByGlobalNormState`.

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
    _check_float("params", params)
    dtype = _norm_dtype(params)
    return ClipByGlobalNormState(
        count=jnp.zeros((), jnp.int32),
        grad_norm=jnp.zeros((), dtype),
        clip_scale=jnp.ones((), dtype),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _check_float("updates", updates)
    norm = _norm(updates)
    scale = clip_scale(norm, _threshold(max_norm, state.count), mode)
    new_state = ClipByGlobalNormState(
        optax.safe_increment(state.count),
        norm.astype(state.grad_norm.dtype),
        scale.astype(state.clip_scale.dtype),
    )
    return _scale_tree(updates, scale), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ClipByLeafNormState(NamedTuple):
  """State of :func:`clip_by_leaf_norm`: per-leaf ``grad_norm`` and ``clip_scale`` trees.

  A leaf stacked by ``stacked=`` has a vector of one norm and one scale per slice.
  """

  count: chex.Array
  grad_norm: Any
  clip_scale: Any


def _leaf_norms(tree: Any, stacks: list[_paths.StackedLeaf | None]) -> list[jax.Array]:
  """Per leaf, its norm (a scalar) or, for a stacked leaf, its slices' norms (a vector)."""
  return [_norm(x) if stack is None else _slice_norms(x, stack)
          for x, stack in zip(jax.tree.leaves(tree), stacks, strict=True)]


def clip_by_leaf_norm(
    max_norm: optax.ScalarOrSchedule, *, mode: str = "hard",
    stacked: _paths.Rules[int] | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips every leaf (tensor) by its own L2 norm, hard or soft.

  .. math::
    u_\ell = g_\ell \cdot \min\!\left(1, \frac{\gamma}{\|g_\ell\|}\right) \;\text{(hard)}
    \qquad u_\ell = g_\ell \cdot \frac{\gamma}{\|g_\ell\| + \gamma} \;\text{(soft)}

  Scanned layers: a leaf named in ``stacked={regex: axis}`` holds L layers along
  ``axis`` (``nn.scan``, ``nnx.vmap``; see :func:`gradtx.tree_paths`). Each of its slices
  ``g_{ℓ,i}`` is clipped by its own norm, exactly as the unrolled model's per-layer leaf
  would be; without ``stacked`` all L layers would share one norm and one scale.

  Args:
    max_norm: the per-tensor threshold γ > 0, or a schedule ``count -> γ`` (a scheduled
      γ <= 0 or NaN gives NaN updates).
    mode: ``"hard"`` or ``"soft"``.
    stacked: ``{regex: axis}`` naming the stacked leaves, or ``None``. An axis out of
      range for a matched leaf or leaves of different lengths under one rule are errors
      at ``init`` naming the path and the sizes.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its :class:`ClipByLeafNormState` holds
    ``grad_norm`` and ``clip_scale`` as pytrees shaped like the params (one scalar each,
    a vector of L for a stacked leaf).

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> tx = gradtx.clip_by_leaf_norm(1.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> u["a"].tolist(), u["b"].tolist(), float(state.grad_norm["a"])
    ([0.6000000238418579, 0.800000011920929], [0.5], 5.0)

    Two layers stacked on axis 0, clipped one by one:

    >>> tx = gradtx.clip_by_leaf_norm(1.0, stacked={"blocks": 0})
    >>> g = {"blocks": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    >>> u, state = tx.update(g, tx.init(g))
    >>> state.grad_norm["blocks"].tolist(), u["blocks"][1].tolist()
    ([5.0, 0.5], [0.30000001192092896, 0.4000000059604645])

  References:
    Zhang, He, Sra, Jadbabaie, ICLR 2020, arXiv:1905.11881.
  """
  _checks.check_positive("max_norm", max_norm)
  _check_mode(mode)
  _paths.resolve_stacked({}, stacked)

  def init_fn(params):
    _check_float("params", params)
    stacks = _paths.resolve_stacked(params, stacked)
    shapes = [() if s is None else (s.length,) for s in stacks]
    leaves, treedef = jax.tree.flatten(params)
    dtypes = [_norm_dtype(p) for p in leaves]
    fill = lambda value: jax.tree.unflatten(treedef, [
        jnp.full(shape, value, dtype) for shape, dtype in zip(shapes, dtypes, strict=True)])
    return ClipByLeafNormState(count=jnp.zeros((), jnp.int32), grad_norm=fill(0),
                               clip_scale=fill(1))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _check_float("updates", updates)
    threshold = _threshold(max_norm, state.count)
    stacks = _paths.resolve_stacked(updates, stacked)
    leaves, treedef = jax.tree.flatten(updates)
    norms = _leaf_norms(updates, stacks)
    scales = [clip_scale(n, threshold, mode) for n in norms]
    clipped = [(u * (s if stack is None else stack.along(s, u.ndim))).astype(u.dtype)
               for u, s, stack in zip(leaves, scales, stacks, strict=True)]
    new_state = ClipByLeafNormState(
        optax.safe_increment(state.count),
        optax.tree.cast_like(jax.tree.unflatten(treedef, norms), state.grad_norm),
        optax.tree.cast_like(jax.tree.unflatten(treedef, scales), state.clip_scale),
    )
    return jax.tree.unflatten(treedef, clipped), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AutoClipState(NamedTuple):
  """State of :func:`auto_clip`.

  Attributes:
    num_recorded: how many finite norms have been recorded (the ring-buffer cursor).
    norm_history: ring buffer of the last ``history`` finite global norms (slots not
      yet written hold 0 and are ignored).
    grad_norm: pre-clip global norm of the last gradient.
    max_norm: the threshold applied to the last gradient.
    clip_scale: the factor the last gradient was multiplied by.
  """

  num_recorded: chex.Array
  norm_history: chex.Array
  grad_norm: chex.Array
  max_norm: chex.Array
  clip_scale: chex.Array


def _history_percentile(norm_history: jax.Array, num_valid: jax.Array,
                        percentile: Any) -> jax.Array:
  """``numpy.percentile`` (linear) of the first ``num_valid`` slots: the others are NaN."""
  filled = jnp.arange(norm_history.shape[0]) < num_valid
  return jnp.nanpercentile(jnp.where(filled, norm_history, jnp.nan), percentile)


def auto_clip(
    percentile: float = 10.0, *, history: int = 1000, mode: str = "hard"
) -> optax.GradientTransformationExtraArgs:
  r"""AutoClip: clips to a percentile of the history of global gradient norms.

  .. math::
    \gamma_t = \operatorname{percentile}_p\big(\|g_{t-h+1}\|, \dots, \|g_t\|\big),
    \qquad u_t = g_t \cdot \min(1, \gamma_t / \|g_t\|)

  As in Seetharaman et al.'s reference code, the current norm is recorded *before*
  the threshold is computed, so the first step's history is ``[‖g_1‖]``, its threshold
  ``γ_1 = ‖g_1‖`` and (in hard mode) it is never clipped; over the first few steps the
  threshold is a percentile of only a handful of norms. The history is a ring buffer of
  the last ``history`` finite norms (the paper keeps all of them: ``history >= num_steps``
  reproduces it exactly); the percentile is ``jnp.nanpercentile`` over it with the
  unwritten slots as NaN. Non-finite norms are not recorded.

  Args:
    percentile: p in [0, 100] (a number: a schedule is refused); the paper recommends 10.
    history: ring-buffer length (static; with ``optax.inject_hyperparams`` list it in
      ``static_args``).
    mode: ``"hard"`` (the paper) or ``"soft"`` clipping to the threshold.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`AutoClipState`.

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
  _checks.check_finite("percentile", percentile, allow_schedule=False)
  _checks.check_in_interval("percentile", percentile, 0.0, 100.0)
  _checks.check_static("history", history)
  _checks.check_int("history", history, minimum=1)
  _check_mode(mode)

  def init_fn(params):
    _check_float("params", params)
    zero = jnp.zeros((), _norm_dtype(params))
    return AutoClipState(
        num_recorded=jnp.zeros((), jnp.int32),
        norm_history=jnp.zeros((history,), zero.dtype),
        grad_norm=zero,
        max_norm=zero,
        clip_scale=jnp.ones_like(zero),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _check_float("updates", updates)
    norm = _norm(updates).astype(state.grad_norm.dtype)
    finite = jnp.isfinite(norm)
    cursor = state.num_recorded % history
    norm_history = jnp.where(
        finite, state.norm_history.at[cursor].set(norm), state.norm_history
    )
    num_recorded = jnp.where(finite, optax.safe_increment(state.num_recorded),
                             state.num_recorded)
    num_valid = jnp.minimum(num_recorded, history)
    threshold = _history_percentile(norm_history, num_valid, percentile)
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


class _ZScoreConfig(NamedTuple):
  alpha: float
  z_thresh: float
  warmup_steps: int
  eps: float
  max_norm: float | None


def _zscore_step(state: ZScoreClipState, norm: jax.Array,
                 config: _ZScoreConfig) -> ZScoreClipState:
  """One ZClip step on the norm ``norm``: the new state (its ``clip_scale`` included)."""
  alpha, z_thresh = config.alpha, config.z_thresh
  finite = jnp.isfinite(norm)
  warming_up = state.num_recorded < config.warmup_steps

  # Warm-up: Welford's running mean and population variance.
  n = (state.num_recorded + 1).astype(norm.dtype)
  delta = norm - state.norm_mean
  warm_mean = state.norm_mean + delta / n
  warm_var = ((n - 1) * state.norm_var + delta * (norm - warm_mean)) / n

  # After warm-up: z-score test, adaptive threshold, EMA of the clipped norm.
  std = jnp.sqrt(state.norm_var)
  z = (norm - state.norm_mean) / (std + config.eps)
  spike = z > z_thresh
  adaptive = state.norm_mean + z_thresh * std / jnp.where(spike, z / z_thresh, 1.0)
  clip_value = jnp.where(spike, adaptive, norm)
  ema_mean = alpha * state.norm_mean + (1 - alpha) * clip_value
  ema_var = alpha * state.norm_var + (1 - alpha) * jnp.square(clip_value - ema_mean)

  target = jnp.where(warming_up, norm, clip_value)
  if config.max_norm is not None:
    target = jnp.minimum(target, config.max_norm)
  # ``target <= norm`` always, so this is min(1, target / norm) with 0/0 -> 1.
  scale = jnp.where(norm > 0, target / jnp.where(norm > 0, norm, 1.0), 1.0)

  keep = jnp.logical_not(finite)
  return ZScoreClipState(
      num_recorded=jnp.where(keep, state.num_recorded, optax.safe_increment(state.num_recorded)),
      norm_mean=jnp.where(keep, state.norm_mean, jnp.where(warming_up, warm_mean, ema_mean)),
      norm_var=jnp.where(keep, state.norm_var, jnp.where(warming_up, warm_var, ema_var)),
      grad_norm=norm,
      z_score=jnp.where(warming_up, 0.0, z),
      clip_scale=jnp.where(finite, scale, jnp.nan),
  )


def zscore_clip(
    *,
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    warmup_steps: int = 25,
    eps: float = 1e-6,
    max_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
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
  Every hyperparameter is a number: schedules are refused.

  Args:
    alpha: EMA factor in (0, 1).
    z_thresh: z-score above which a norm is a spike (> 0).
    warmup_steps: number of norms that seed the statistics (>= 1).
    eps: added to σ in the z-score.
    max_norm: optional fixed cap on the norm, > 0.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`ZScoreClipState`.

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
  _checks.check_finite("alpha", alpha, allow_schedule=False)
  _checks.check_in_interval("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
  _checks.check_positive("z_thresh", z_thresh, allow_schedule=False)
  _checks.check_int("warmup_steps", warmup_steps, minimum=1)
  _checks.check_positive("eps", eps, allow_schedule=False)
  if max_norm is not None:
    _checks.check_positive("max_norm", max_norm, allow_schedule=False)
  config = _ZScoreConfig(alpha, z_thresh, warmup_steps, eps, max_norm)

  def init_fn(params):
    _check_float("params", params)
    zero = jnp.zeros((), _norm_dtype(params))
    return ZScoreClipState(
        num_recorded=jnp.zeros((), jnp.int32),
        norm_mean=zero, norm_var=zero, grad_norm=zero, z_score=zero,
        clip_scale=jnp.ones_like(zero),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _check_float("updates", updates)
    new_state = _zscore_step(state, _norm(updates).astype(state.grad_norm.dtype), config)
    return _scale_tree(updates, new_state.clip_scale), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
