r"""Step sizes that learn themselves: EG on the gains (EGDD, Su) and hypergradient descent.

The loss after a step, ``L(θ_t)``, with ``θ_t = θ_{t-1} - η_{t-1} d_{t-1}``, depends on the
step size through ``∂L(θ_t)/∂η_{t-1} = -g_t · d_{t-1}``: the hypergradient. If the new
gradient still points along the last direction, the step was too short; if it points
back, too long. Two ways to act on it:

* :func:`eg_step_size` updates positive gains *multiplicatively* (exponentiated gradient
  on the hypergradient, or its sign), per coordinate and as a global scale, both clipped
  — Amid, Anil, Fifty & Warmuth's EGDD — or with Su's simpler per-coordinate rule
  ``ν ← ν ⊙ exp(γ g_{t-1} ⊙ g_t)``.
* :func:`hypergradient_descent` updates one learning rate from the hypergradient —
  Baydin et al. — by default in log space (``log α ← log α + β g_t · d_{t-1}``, positive
  by construction), or additively / by the cosine as in the paper.

Both wrap any base direction (``optax.scale_by_adam()``, ``optax.trace(0.9)``, ``optax.
identity()`` for SGD) and return the full update (negative step included), so they are
used alone or at the end of a chain, like ``optax.adam``.

References:
  Amid, Anil, Fifty, Warmuth, "Step-size adaptation using exponentiated gradient
  updates", 2022, arXiv:2202.00145 (lingvo's ``EGDD``).
  Baydin, Cornish, Martínez Rubio, Schmidt, Wood, "Online learning rate adaptation with
  hypergradient descent", ICLR 2018, arXiv:1703.04782.
  Su, "Exponentiated gradient and meta-learned step sizes", kexue.fm/archives/8968.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradtx import _checks, _numerics

GAINS = ("per_coordinate", "per_leaf", "none")
SCALES = ("global", "per_leaf", "none")
RULES = ("egdd", "su")


def _zeros(params: optax.Params) -> optax.Updates:
  """Zeros like ``params`` in their compute dtype (at least float32)."""
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _numerics.compute_dtype(p)), params)


def _vdot(a: optax.Updates, b: optax.Updates) -> jax.Array:
  """``Σ a ⊙ b`` over every leaf of two real trees, as a sum of products.

  Not ``optax.tree.vdot``: optax 0.2.8 compares JAX versions as strings, so with JAX 0.10 it
  takes its ``jnp.vdot`` (``ravel``) path, which fails on arrays sharded over an explicit
  mesh ("contracting dimensions are sharded"); a sum of products reduces shards cleanly.
  """
  return optax.tree.sum(optax.tree.mul(a, b))


def _cosine(a: optax.Updates, b: optax.Updates) -> jax.Array:
  """``<a, b> / (‖a‖ ‖b‖)`` over every leaf, 0 when either is 0 (the first step has no
  previous direction).

  A NaN/inf in either gives NaN (propagated, not hidden as "no agreement"). The square
  roots are safe: where a norm is 0 the root is taken of 1 instead, so the derivative of
  the branch ``jnp.where`` drops is finite and a meta-gradient through the first step is
  not NaN (``sqrt'(0)`` is infinite, and ``0 · inf`` is NaN).
  """
  a_sq, b_sq = optax.tree.norm(a, squared=True), optax.tree.norm(b, squared=True)
  zero = (a_sq == 0) | (b_sq == 0)
  norms = jnp.sqrt(jnp.where(zero, 1.0, a_sq)) * jnp.sqrt(jnp.where(zero, 1.0, b_sq))
  # 0 where a norm is 0, yet NaN if the other one is NaN/inf (0 · inf): still visible.
  return jnp.where(zero, 0.0 * (a_sq + b_sq), _vdot(a, b) / norms)


def _check_range(name: str, value: Any) -> tuple[float, float]:
  try:
    low, high = (float(v) for v in value)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a pair (low, high), got {value!r}") from None
  if not 0 < low <= 1 <= high < float("inf"):
    raise ValueError(f"{name} must satisfy 0 < low <= 1 <= high < inf (1 is the initial "
                     f"value), got {value!r}")
  return low, high


def _checked_base(base: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """``base`` checked to be a transformation (not a factory), with extra-args support."""
  _checks.check_transformation("base", base, example="optax.scale_by_adam()")
  return optax.with_extra_args_support(base)


def _gain_statistics(gains: chex.ArrayTree) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, min and max over every gain (float32), reduced leaf by leaf (no concatenated
  copy); 1 when there are no gains."""
  count = optax.tree.size(gains)
  if not count:
    one = jnp.ones((), jnp.float32)
    return one, one, one
  stats = (optax.tree.sum(gains) / count, optax.tree.min(gains), optax.tree.max(gains))
  return optax.tree.cast(stats, jnp.float32)


def _new_gains(gains: chex.ArrayTree, grad_ema: optax.Updates, g: optax.Updates, *, kind: str,
               rule: str, gain_lr: chex.Numeric, low: float, high: float) -> chex.ArrayTree:
  """EGDD's ``clip(p ⊙ e^{η_p sign(g) ⊙ sign(ḡ)})`` or Su's ``clip(p ⊙ e^{η_p g_{t-1} ⊙ g})``."""
  if kind == "none":
    return ()
  if rule == "su":
    agreement = jax.tree.map(jnp.multiply, grad_ema, g)
  else:
    agreement = jax.tree.map(lambda e, x: jnp.sign(e) * jnp.sign(x), grad_ema, g)
  if kind == "per_leaf":
    agreement = jax.tree.map(lambda a: jnp.mean(a) if a.size else jnp.zeros(()), agreement)
  new = jax.tree.map(lambda p, a: jnp.clip(p * jnp.exp(gain_lr * a), low, high),
                     gains, agreement)
  return optax.tree.cast_like(new, gains)  # per-leaf float32 gains stay float32 under x64


def _new_scale(lr_scale: chex.ArrayTree, g: optax.Updates, prev: optax.Updates, *, kind: str,
               scale_lr: chex.Numeric, low: float, high: float) -> chex.ArrayTree:
  """``clip(s e^{η_s cos(g, m_{t-1})})``, the cosine over the tree or per leaf."""
  if kind == "none":
    return lr_scale
  if kind == "global":
    return jnp.clip(lr_scale * jnp.exp(scale_lr * _cosine(g, prev)), low, high)
  return jax.tree.map(
      lambda s, x, m: jnp.clip(s * jnp.exp(scale_lr * _cosine(x, m)), low, high),
      lr_scale, g, prev)


def _check_initial_scale(initial_scale: chex.Numeric,
                         scale_range: Any) -> tuple[float, float]:
  """``scale_range``'s ends, checked, with ``initial_scale`` > 0 inside them."""
  low, high = _check_range("scale_range", scale_range)
  _checks.check_positive("initial_scale", initial_scale, allow_schedule=False)
  s0 = _checks.concrete_scalar(initial_scale)  # None when injected (traced)
  if s0 is not None and not low <= s0 <= high:
    raise ValueError(f"initial_scale must lie in scale_range = {scale_range!r}, got "
                     f"{initial_scale!r}")
  return low, high


def _initial_gains(kind: str, zeros: optax.Updates) -> chex.ArrayTree:
  """Gains of 1: per coordinate (like the params), per leaf (float32 scalars) or none."""
  if kind == "per_coordinate":
    return jax.tree.map(jnp.ones_like, zeros)
  if kind == "per_leaf":
    return jax.tree.map(lambda _: jnp.ones((), jnp.float32), zeros)
  return ()


class EGStepSizeState(NamedTuple):
  """State of :func:`eg_step_size`.

  Attributes:
    count: number of updates so far (drives a learning-rate schedule).
    base_state: the base direction's state.
    gains: the gains ``p`` (per coordinate: like the params; per leaf: one scalar per
      leaf; ``"none"``: ``()``).
    grad_ema: EGDD: the EMA ``ḡ`` of gradients; Su: the previous gradient.
    prev_direction: the previous step's direction ``p ⊙ d`` (before the scale and the
      learning rate), the ``m_{t-1}`` of the scale update.
    lr_scale: the scale ``s`` (a scalar, or one per leaf).
    gain_mean: the mean gain over all coordinates (for logging).
    gain_min: the smallest gain.
    gain_max: the largest gain.
  """

  count: chex.Array
  base_state: optax.OptState
  gains: chex.ArrayTree
  grad_ema: optax.Updates
  prev_direction: optax.Updates
  lr_scale: chex.ArrayTree
  gain_mean: chex.Array
  gain_min: chex.Array
  gain_max: chex.Array


def eg_step_size(
    base: optax.GradientTransformation,
    *,
    learning_rate: optax.ScalarOrSchedule,
    gain_lr: chex.Numeric = 0.01,
    scale_lr: chex.Numeric = 0.001,
    beta: chex.Numeric = 0.9,
    gains: str = "per_coordinate",
    scale: str = "global",
    gain_range: tuple[float, float] = (0.01, 100.0),
    scale_range: tuple[float, float] = (0.1, 10.0),
    rule: str = "egdd",
    initial_scale: chex.Numeric = 1.0,
) -> optax.GradientTransformationExtraArgs:
  r"""Learning-rate gains and scale adapted by exponentiated gradient (EGDD, or Su's rule).

  With ``d_t`` the base direction of ``g_t`` (e.g. Adam's ``m̂/(√v̂+ε)``):

  .. math::
    \text{EGDD: } p_t = \mathrm{clip}\big(p_{t-1} \odot e^{\eta_p\,
      \mathrm{sign}(g_t) \odot \mathrm{sign}(\bar g_{t-1})}\big),\quad
    s_t = \mathrm{clip}\big(s_{t-1}\, e^{\eta_s \cos(g_t,\, m_{t-1})}\big),\quad
    \bar g_t = \beta \bar g_{t-1} + (1 - \beta) g_t

  .. math::
    m_t = p_t \odot d_t, \qquad u_t = -\eta\, s_t\, m_t

  ``cos`` is taken over the whole pytree (``scale="global"``) or per leaf (lingvo's
  EGDD); per-leaf gains use the mean of the sign agreement over the leaf. Su's rule
  (``rule="su"``) is ``p_t = clip(p_{t-1} ⊙ exp(η_p g_{t-1} ⊙ g_t))`` with no scale and no
  EMA. Gains start at 1, the scale at ``initial_scale`` (1).

  How far the rate can move: in ``T`` steps by at most ``e^{(η_p + η_s) T}`` (the gains'
  and the scale's steps), within ``gain_range × scale_range``: ``e^{0.011 T}`` (9× at
  ``T = 200``) with lingvo's defaults, so a rate 100× too small is out of reach. A rate
  too *large* is worse: it can wreck the model in the first few steps, before any
  agreement is measured. Measured on digits (``benchmarks/results/
  step_size_robustness.md``): ``gain_lr=0.05, scale_lr=0.05, scale_range=(1e-3, 1e3)``
  recovers a rate 100× too small, and adding a warm start ``initial_scale=0.01`` (the
  scale starts small and learns its way up) also protects against one 10× too large.

  A NaN/inf gradient makes the update and the adapted
  statistics NaN (propagated, visible in ``gain_mean`` / ``lr_scale``). Params and
  updates must hold real floating arrays (integer and complex leaves are refused, naming
  their paths: the sign rule and the cosine are defined for real numbers). The update is
  differentiable: a meta-gradient through unrolled steps (w.r.t. the initial params or
  ``learning_rate``) is finite, the first step's zero cosine included.

  Args:
    base: the base direction, a transformation (not a factory: ``optax.scale_by_adam()``,
      not ``optax.adam``), e.g. ``optax.scale_by_adam()`` or ``optax.trace(0.9)``
      (momentum, as EGDD wraps) or ``optax.identity()`` (SGD).
    learning_rate: the base learning rate ``η`` > 0, or a schedule.
    gain_lr: ``η_p`` > 0 (lingvo default 0.01). For ``rule="su"`` it is Su's ``γ``,
      which multiplies ``g_{t-1} ⊙ g_t`` and so has units of 1/g²: scale it to the
      gradients (the default can blow up on large gradients).
    scale_lr: ``η_s`` > 0 (lingvo default 0.001).
    beta: the gradient EMA's decay in [0, 1).
    gains: ``"per_coordinate"``, ``"per_leaf"`` or ``"none"``.
    scale: ``"global"``, ``"per_leaf"`` or ``"none"`` (ignored by ``rule="su"``).
    gain_range: ``(low, high)`` clip of the gains, ``0 < low <= 1 <= high``.
    scale_range: ``(low, high)`` clip of the scale.
    rule: ``"egdd"`` or ``"su"``.
    initial_scale: the scale's start ``s_0`` > 0, inside ``scale_range`` (a warm start
      below 1 makes a too-large ``learning_rate`` safe while the scale adapts; with
      ``scale="none"`` or ``rule="su"`` it is a constant factor).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` giving the full update (use it like
    ``optax.adam``); state :class:`EGStepSizeState`.

  Example:
    >>> import jax.numpy as jnp, optax, gradtx
    >>> tx = gradtx.eg_step_size(optax.scale_by_adam(), learning_rate=1e-2)
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   updates, state = tx.update(params, state, params)  # gradient of ½‖w‖²
    ...   params = optax.apply_updates(params, updates)
    >>> bool(state.gain_max > 1.0), float(state.lr_scale) > 1.0
    (True, True)

  References:
    Amid, Anil, Fifty, Warmuth, "Step-size adaptation using exponentiated gradient
    updates", 2022, arXiv:2202.00145.
    Su, "Exponentiated gradient and meta-learned step sizes", kexue.fm/archives/8968.
  """
  _checks.check_positive("learning_rate", learning_rate)
  _checks.check_positive("gain_lr", gain_lr, allow_schedule=False)
  _checks.check_positive("scale_lr", scale_lr, allow_schedule=False)
  _checks.check_in_interval("beta", beta, 0.0, 1.0, high_open=True)
  _checks.check_choice("gains", gains, GAINS)
  _checks.check_choice("scale", scale, SCALES)
  _checks.check_choice("rule", rule, RULES)
  gain_low, gain_high = _check_range("gain_range", gain_range)
  scale_low, scale_high = _check_initial_scale(initial_scale, scale_range)
  if rule == "su":
    scale = "none"
  base = _checked_base(base)

  def init_fn(params: optax.Params) -> EGStepSizeState:
    _checks.check_float_leaves("params", params)
    zeros = _zeros(params)
    one = jnp.ones((), jnp.float32)
    init_gains = _initial_gains(gains, zeros)
    s0 = jnp.full((), initial_scale, jnp.float32)
    init_scale = jax.tree.map(lambda _: s0, zeros) if scale == "per_leaf" else s0
    return EGStepSizeState(
        count=jnp.zeros((), jnp.int32), base_state=base.init(params), gains=init_gains,
        grad_ema=zeros, prev_direction=zeros, lr_scale=init_scale, gain_mean=one,
        gain_min=one, gain_max=one)

  def update_fn(updates: optax.Updates, state: EGStepSizeState,
                params: optax.Params | None = None,
                **extra_args: Any) -> tuple[optax.Updates, EGStepSizeState]:
    _checks.check_float_leaves("updates", updates)
    g = optax.tree.cast_like(updates, state.grad_ema)
    directions, base_state = base.update(updates, state.base_state, params, **extra_args)
    gains_t = _new_gains(state.gains, state.grad_ema, g, kind=gains, rule=rule,
                         gain_lr=gain_lr, low=gain_low, high=gain_high)
    scale_t = _new_scale(state.lr_scale, g, state.prev_direction, kind=scale,
                         scale_lr=scale_lr, low=scale_low, high=scale_high)
    if gains != "none":
      directions = jax.tree.map(jnp.multiply, gains_t, directions)
    scaled = optax.tree.cast_like(directions, state.prev_direction)
    eta = _numerics.scalar_or_schedule(learning_rate, state.count)
    if scale == "per_leaf":
      steps = jax.tree.map(lambda s, m: -eta * s * m, scale_t, scaled)
    else:
      steps = optax.tree.scale(-eta * scale_t, scaled)
    grad_ema = g if rule == "su" else optax.tree.update_moment(g, state.grad_ema, beta, 1)
    gain_mean, gain_min, gain_max = _gain_statistics(gains_t)
    new_state = EGStepSizeState(
        count=optax.safe_increment(state.count), base_state=base_state, gains=gains_t,
        grad_ema=grad_ema, prev_direction=scaled,
        lr_scale=optax.tree.cast(scale_t, jnp.float32), gain_mean=gain_mean,
        gain_min=gain_min, gain_max=gain_max)
    return optax.tree.cast_like(steps, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class HypergradientDescentState(NamedTuple):
  """State of :func:`hypergradient_descent`.

  Attributes:
    base_state: the base direction's state.
    prev_direction: the previous unit-learning-rate direction ``d_{t-1}``.
    current_learning_rate: the current learning rate ``α_t`` (for logging; not called
      ``learning_rate``, which under ``optax.inject_hyperparams`` is ``α_0``).
  """

  base_state: optax.OptState
  prev_direction: optax.Updates
  current_learning_rate: chex.Array


# Without min_lr, log-space rates stay above the smallest normal float32 (never 0, never
# denormal: XLA on CPU flushes denormals to zero); without max_lr, below float32's max.
_LOG_TINY = float(np.log(np.finfo(np.float32).tiny)) + 1e-3
_LOG_HUGE = float(np.log(np.finfo(np.float32).max)) - 1e-3


def _check_lr_bounds(learning_rate: chex.Numeric, min_lr: chex.Numeric | None,
                     max_lr: chex.Numeric | None) -> None:
  """``0 < min_lr <= learning_rate <= max_lr`` where given (all plain numbers)."""
  for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
    if value is not None:
      _checks.check_positive(name, value, allow_schedule=False)
  # Injected (traced) bounds are not checked here: they are only known inside jit.
  low = -math.inf if min_lr is None else _checks.concrete_scalar(min_lr)
  high = math.inf if max_lr is None else _checks.concrete_scalar(max_lr)
  if low is None or high is None:
    return
  if low > high:
    raise ValueError(f"min_lr must be <= max_lr, got min_lr={min_lr!r} and max_lr={max_lr!r}")
  lr = _checks.concrete_scalar(learning_rate)
  if lr is not None and not low <= lr <= high:
    raise ValueError(f"learning_rate must lie in [min_lr, max_lr] = [{min_lr!r}, {max_lr!r}] "
                     f"(it is α_0), got {learning_rate!r}")


def _new_rate(alpha: jax.Array, signal: jax.Array, *, hyper_lr: chex.Numeric, log_space: bool,
              multiplicative: bool, min_lr: chex.Numeric | None,
              max_lr: chex.Numeric | None) -> jax.Array:
  """``α_t`` from ``α_{t-1}`` and the hypergradient signal (``g·d`` or the cosine)."""
  if log_space:
    low = _LOG_TINY if min_lr is None else jnp.log(min_lr)
    high = _LOG_HUGE if max_lr is None else jnp.log(max_lr)
    log_alpha = jnp.clip(jnp.log(alpha) + hyper_lr * signal, low, high)
    # An inf signal (an inf gradient) is a failure, not a rate at the bound: NaN, visible.
    return jnp.where(jnp.isinf(signal), jnp.nan, jnp.exp(log_alpha))
  alpha = alpha * (1 + hyper_lr * signal) if multiplicative else alpha + hyper_lr * signal
  if min_lr is not None or max_lr is not None:
    alpha = jnp.clip(alpha, min_lr, max_lr)
  return alpha


def hypergradient_descent(
    base: optax.GradientTransformation,
    *,
    learning_rate: chex.Numeric,
    hyper_lr: chex.Numeric,
    multiplicative: bool = False,
    log_space: bool = True,
    min_lr: chex.Numeric | None = None,
    max_lr: chex.Numeric | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Hypergradient descent (Baydin et al.): the learning rate descends its own gradient.

  With ``d_t`` the base direction (SGD: ``g_t``; Adam: ``m̂/(√v̂+ε)``), the hypergradient
  is ``∂L(θ_t)/∂α_{t-1} = -g_t · d_{t-1}``, and the signal ``h_t`` is ``g_t · d_{t-1}``
  (or, with ``multiplicative=True``, the scale-free ``cos(g_t, d_{t-1})``), over the whole
  pytree. The default, ``log_space=True``, moves ``log α``:

  .. math::
    \log \alpha_t = \mathrm{clip}\big(\log \alpha_{t-1} + \beta\, h_t,\;
      \log \alpha_{\min},\; \log \alpha_{\max}\big), \qquad u_t = -\alpha_t\, d_t

  so ``α`` stays positive by construction, whatever ``β`` and however long the run (and
  without ``min_lr`` it stays above the smallest normal float32, so it can always come
  back). ``log_space=False`` is the paper's rule, on ``α`` itself:

  .. math::
    \text{additive: } \alpha_t = \alpha_{t-1} + \beta\, g_t \cdot d_{t-1}, \qquad
    \text{multiplicative: } \alpha_t = \alpha_{t-1}\big(1 + \beta \cos(g_t, d_{t-1})\big)

  clipped to ``[min_lr, max_lr]`` where given; without ``min_lr``, nothing keeps the
  additive ``α`` positive (the negative learning rates users of the paper's rule report).

  ``β`` means different things in the two spaces: in log space ``β h_t`` is the
  *relative* change of ``α`` per step, so ``β_log ≈ β_additive / α_0`` gives the same first
  step (Adam-HD's ``β = 1e-7`` at ``α_0 = 1e-3`` is ``β_log ≈ 1e-4``); with the cosine,
  ``α`` moves by at most ``e^{±β}`` per step. ``g · d`` sums over every coordinate, so the
  additive signal grows with the model (``≈ ‖g‖₁`` for Adam's directions): prefer
  ``multiplicative=True`` when the gradient scale is unknown. ``max_lr`` bounds the other
  failure users report, a rate that rises without bound.

  ``learning_rate`` is only ``α_0``: ``α_t`` lives in the state, so under
  ``optax.inject_hyperparams`` list it in ``static_args`` (changing it later has no
  effect). A NaN/inf gradient makes ``α`` NaN (propagated, visible in the state's
  ``current_learning_rate``). Params and updates must hold real floating arrays (integer
  and complex leaves are refused, naming their paths). A meta-gradient through unrolled
  steps is finite, the first (zero) cosine included.

  Args:
    base: the base direction, a transformation (not a factory), e.g.
      ``optax.identity()`` (SGD-HD) or ``optax.scale_by_adam()`` (Adam-HD).
    learning_rate: the initial ``α_0`` > 0 (inside ``[min_lr, max_lr]``).
    hyper_lr: ``β`` > 0.
    multiplicative: use the cosine ``cos(g_t, d_{t-1})`` as the signal.
    log_space: update ``log α`` (positive by construction; the default) or, with
      ``False``, ``α`` itself (the paper's rules).
    min_lr: optional lower bound ``α_min`` > 0 of ``α_t``.
    max_lr: optional upper bound ``α_max`` >= ``min_lr`` of ``α_t``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` giving the full update; state
    :class:`HypergradientDescentState`.

  Example:
    >>> import jax.numpy as jnp, optax, gradtx
    >>> tx = gradtx.hypergradient_descent(optax.identity(), learning_rate=0.1,
    ...                                   hyper_lr=0.01, log_space=False)
    >>> params = {"w": jnp.array([4.0])}
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(params, state, params)  # gradient of ½ w²
    ...   params = optax.apply_updates(params, updates)
    >>> round(float(state.current_learning_rate), 4)   # 0.1 + 0.01 · (3.6 · 4.0)
    0.244
    >>> tx = gradtx.hypergradient_descent(optax.identity(), learning_rate=0.1,
    ...                                   hyper_lr=0.01)   # log space: 0.1 · e^{0.01 · 14.4}
    >>> params = {"w": jnp.array([4.0])}
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update(params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> round(float(state.current_learning_rate), 4)
    0.1155

  References:
    Baydin, Cornish, Martínez Rubio, Schmidt, Wood, "Online learning rate adaptation
    with hypergradient descent", ICLR 2018, arXiv:1703.04782.
  """
  _checks.check_positive("learning_rate", learning_rate, allow_schedule=False)
  _checks.check_positive("hyper_lr", hyper_lr, allow_schedule=False)
  _checks.check_bool("multiplicative", multiplicative)
  _checks.check_bool("log_space", log_space)
  _check_lr_bounds(learning_rate, min_lr, max_lr)
  base = _checked_base(base)
  rate = functools.partial(_new_rate, hyper_lr=hyper_lr, log_space=log_space,
                           multiplicative=multiplicative, min_lr=min_lr, max_lr=max_lr)

  def init_fn(params: optax.Params) -> HypergradientDescentState:
    _checks.check_float_leaves("params", params)
    return HypergradientDescentState(
        base_state=base.init(params), prev_direction=_zeros(params),
        current_learning_rate=jnp.asarray(learning_rate, jnp.float32))

  def update_fn(updates: optax.Updates, state: HypergradientDescentState,
                params: optax.Params | None = None,
                **extra_args: Any) -> tuple[optax.Updates, HypergradientDescentState]:
    _checks.check_float_leaves("updates", updates)
    directions, base_state = base.update(updates, state.base_state, params, **extra_args)
    g = optax.tree.cast_like(updates, state.prev_direction)
    signal = (_cosine if multiplicative else _vdot)(g, state.prev_direction)
    alpha = rate(state.current_learning_rate, signal).astype(jnp.float32)
    new_updates = jax.tree.map(lambda d, u: (-alpha * d).astype(u.dtype), directions, updates)
    prev = optax.tree.cast_like(directions, state.prev_direction)
    return new_updates, HypergradientDescentState(
        base_state=base_state, prev_direction=prev, current_learning_rate=alpha)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
