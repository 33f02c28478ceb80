r"""Diagonal Newton steps: the bridge between gradient descent and EM.

Minimising the local quadratic model of ``L`` at every step gives Newton's
``θ ← θ - H⁻¹ g``; replacing the Hessian by a constant ``1/η`` gives gradient descent. In
between lies the *diagonal* Newton step ``θ ← θ - g / diag(H)``: one step size per
coordinate, read off the curvature. For K-means, ``L = Σ_ij C_ij ‖x_i - c_j‖²`` with the
assignments ``C`` held fixed (EM's E-step), ``diag(H)`` is ``2 Σ_i C_ij`` for every
coordinate of centroid ``j`` and the diagonal Newton step is exactly Lloyd's update
``c_j ← Σ_i C_ij x_i / Σ_i C_ij`` (hard or soft assignments alike).

``diag(H)`` comes from Hessian-vector products of a ``loss_fn`` passed to ``update``
(Hutchinson's estimator ``E[z ⊙ Hz]`` with Rademacher ``z``: exact, with one sample, when
``H`` is diagonal), from the model's logits (Sophia's Gauss–Newton–Bartlett estimator
``B ĝ ⊙ ĝ`` with labels drawn from the model's own softmax, for classifiers and language
models), from a function of the caller's, or directly from a ``curvature`` the caller
passes; refreshed every ``k`` steps and smoothed by an EMA, it is Sophia's
preconditioner, and :func:`sophia` is Sophia itself (Algorithm 1 of the paper).

Migrating from optax's deprecated ``optax.second_order`` (removed in optax 0.2.9):
``hessian_diag(loss, params, inputs, targets)`` built the exact diagonal from one
Hessian-vector product per parameter (``O(n)`` passes) and returned a flat vector; call
``hutchinson_diagonal(lambda p: loss(p, inputs, targets), params, key, samples=k)``
instead (a pytree like ``params``, ``k`` passes, unbiased, exact for a diagonal Hessian).
``fisher_diag(nll, params, inputs, targets)`` was the *empirical* Fisher, the squared
gradient at the true targets, flattened; the Fisher (= Gauss–Newton for softmax
cross-entropy) is estimated without bias by ``gnb_diagonal(logits_fn, params, inputs,
key)``, which draws the labels from the model; ``jax.tree.map(jnp.square,
jax.grad(nll)(params, inputs, targets))`` reproduces the old value if you need it.

References:
  Liu, Li, Hall, Liang, Ma, "Sophia: a scalable stochastic second-order optimizer for
  language model pre-training", ICLR 2024, arXiv:2305.14342 (GNB, Sophia-G/H).
  Bekas, Kokiopoulou, Saad, "An estimator for the diagonal of a matrix", Applied
  Numerical Mathematics 57(11), 2007 (Hutchinson-type diagonal estimator).
  Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, "AdaHessian", AAAI 2021,
  arXiv:2006.00719.
  Su, "Gradient descent and EM are one idea", kexue.fm/archives/4277.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from gradtx import _checks, _numerics, _random

ESTIMATORS = ("hutchinson", "gnb")
# "hutchinson", "gnb", or estimator(params, key, **update_kwargs) -> a pytree like params.
Estimator = str | Callable[..., chex.ArrayTree]
DAMPING_MODES = ("add", "max")


def _rademacher(key: jax.Array, tree: optax.Params) -> optax.Updates:
  """±1 per coordinate; a leaf's draw depends only on the key and its path."""
  return _random.per_leaf(
      key, tree, lambda leaf_key, leaf: jax.random.rademacher(leaf_key, jnp.shape(leaf),
                                                               leaf.dtype))


def _check_samples(samples: Any) -> None:
  _checks.check_static("samples", samples)
  _checks.check_int("samples", samples, minimum=1)


def hutchinson_diagonal(loss_fn: Callable[[optax.Params], jax.Array], params: optax.Params,
                        key: jax.Array, samples: int = 1) -> chex.ArrayTree:
  r"""Hutchinson's estimate of the Hessian diagonal, ``(1/S) Σ_s z_s ⊙ H z_s``.

  ``z_s`` are Rademacher (±1) vectors, so ``E[z ⊙ Hz] = diag(H)``; when ``H`` is diagonal
  every sample is exact (``z ⊙ (h ⊙ z) = h``). Coordinate ``i`` of one sample is
  ``H_ii + Σ_{j≠i} H_ij z_i z_j``, so the estimate's variance is

  .. math::
    \mathrm{Var}\big[\hat h_i\big] = \frac{1}{S} \sum_{j \ne i} H_{ij}^2

  (``1/S`` of one probe's; Gaussian probes, as in the Sophia paper, add ``2 H_ii² / S``).
  Each sample is one Hessian-vector product (forward-over-reverse, ``jax.jvp`` of
  ``jax.grad``); the ``S`` samples run in one vectorised (``vmap``) pass, so memory grows
  with ``S``. Each leaf's probe is drawn from a key folded with its path, so the
  estimate of a leaf does not change when other leaves are added; sharded params give
  a sharded estimate with their layout.

  Args:
    loss_fn: ``loss_fn(params) -> scalar``.
    params: where to evaluate the Hessian (floating leaves; integer ones are refused,
      naming their paths).
    key: a ``jax.random`` key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``).
    samples: the number S >= 1 of probe vectors; static (a Python int, not traced).

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 2.0, 3.0]) * p["w"] ** 2)
    >>> d = gradtx.hutchinson_diagonal(loss, {"w": jnp.ones(3)}, jax.random.key(0))
    >>> d["w"].tolist()
    [2.0, 4.0, 6.0]

  Migrating from ``optax.second_order.hessian_diag(loss, params, inputs, targets)``
  (deprecated; exact, one pass per parameter, a flat vector): ``hutchinson_diagonal(
  lambda p: loss(p, inputs, targets), params, key, samples=k)``.

  References:
    Bekas, Kokiopoulou, Saad, "An estimator for the diagonal of a matrix", 2007.
  """
  _check_samples(samples)
  key = _random.as_key(key, argname="key")
  _checks.check_float_leaves("params", params)
  grad = jax.grad(loss_fn)

  def one(sample_key: jax.Array) -> chex.ArrayTree:
    z = _rademacher(sample_key, params)
    hz = jax.jvp(grad, (params,), (z,))[1]
    return jax.tree.map(jnp.multiply, z, hz)

  draws = jax.vmap(one)(jax.random.split(key, samples))
  return jax.tree.map(lambda d: jnp.mean(d, axis=0), draws)


def _checked_logits(logits_fn: Callable[[optax.Params, Any], jax.Array], params: optax.Params,
                    inputs: Any, mask: ArrayLike | None) -> jax.ShapeDtypeStruct:
  """The logits' shape, checked: ``(batch, classes)`` or ``(batch, ..., classes)``, float."""
  _checks.check_callable("logits_fn", logits_fn, call="logits_fn(params, inputs)")
  out = jax.eval_shape(logits_fn, params, inputs)
  if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) < 2 or out.shape[-1] < 2:
    got = (f"shape {out.shape}" if isinstance(out, jax.ShapeDtypeStruct)
           else f"a {type(out).__name__}")
    raise ValueError(
        "logits_fn(params, inputs) must return logits of shape (batch, classes) (or (batch, "
        f"..., classes), e.g. a language model's (batch, sequence, vocabulary)) with at "
        f"least 2 classes, got {got}")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"logits_fn(params, inputs) must return floating logits, got {out.dtype}")
  if mask is not None and jnp.shape(mask) != out.shape[:-1]:
    raise ValueError(f"mask must have the logits' leading shape {out.shape[:-1]} (one entry "
                     f"per example or token), got shape {jnp.shape(mask)}")
  return out


def _gnb_from_labels(logits_fn: Callable[[optax.Params, Any], jax.Array], params: optax.Params,
                     inputs: Any, labels: jax.Array,
                     mask: ArrayLike | None = None) -> chex.ArrayTree:
  """``B ĝ ⊙ ĝ``, ``ĝ`` the gradient of the mean cross-entropy at the given labels."""
  if mask is None:
    weights = jnp.ones(labels.shape)
  else:
    weights = jnp.asarray(mask).astype(jnp.result_type(float))
  count = jnp.sum(weights)

  def sampled_loss(p: optax.Params) -> jax.Array:
    logits = logits_fn(p, inputs)
    logits = logits.astype(_numerics.compute_dtype(logits))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(weights * losses) / jnp.maximum(count, 1.0)

  grads = jax.grad(sampled_loss)(params)
  return jax.tree.map(
      lambda g: (count * jnp.square(g.astype(_numerics.compute_dtype(g)))).astype(
          _numerics.compute_dtype(g)), grads)


def gnb_diagonal(logits_fn: Callable[[optax.Params, Any], jax.Array], params: optax.Params,
                 inputs: Any, key: jax.Array, *,
                 mask: ArrayLike | None = None) -> chex.ArrayTree:
  r"""Sophia's Gauss–Newton–Bartlett estimate of the Gauss–Newton (Fisher) diagonal.

  For a softmax cross-entropy loss ``L = (1/B) Σ_b ℓ(f(θ, x_b), y_b)``, draw labels from
  the model itself, ``ŷ_b ~ softmax(f(θ, x_b))``, and take the gradient ``ĝ`` of the loss
  at those labels:

  .. math::
    \hat h = B\, \hat g \odot \hat g, \qquad
    \mathbb{E}_{\hat y}\big[\hat h\big] = \operatorname{diag}\Big(\frac{1}{B} \sum_b
      J_b^\top \big(\operatorname{diag}(p_b) - p_b p_b^\top\big) J_b\Big)

  the diagonal of the Gauss–Newton matrix of the mean loss (``J_b = ∂f(θ, x_b)/∂θ``,
  ``p_b = softmax(f(θ, x_b))``), which for softmax cross-entropy is also the Fisher
  information; the expectation holds because the per-example terms ``p_b - e_{ŷ_b}``
  have mean zero and are independent (Bartlett's identity). It is positive (a sum of
  squares), needs one forward and one backward pass, and no labels: the data's labels
  never enter. Every axis of the logits but the last counts as an example, so a language
  model's ``(batch, sequence, vocabulary)`` logits use ``B = batch × sequence`` tokens,
  as in Sophia-G; ``mask`` leaves out padding (``B`` is then the number of ``True``
  entries). Labels are drawn with ``jax.random.categorical(key, logits)``; the result is
  a pytree like ``params`` in their compute dtype (at least float32), with their sharding
  when the params and inputs are sharded.

  Args:
    logits_fn: ``logits_fn(params, inputs) -> logits`` of shape ``(batch, classes)`` or
      ``(batch, ..., classes)`` (e.g. ``lambda p, x: model.apply(p, x)``).
    params: where to estimate (floating leaves; others are refused, naming their paths).
    inputs: the model's inputs (any pytree ``logits_fn`` accepts).
    key: a ``jax.random`` key for the labels.
    mask: optional boolean array of the logits' leading shape, ``True`` where an example
      (token) counts.

  Returns:
    A pytree like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> logits_fn = lambda p, x: x @ p["w"]
    >>> params, x = {"w": jnp.zeros((3, 4))}, jnp.eye(3)
    >>> h = gradtx.gnb_diagonal(logits_fn, params, x, jax.random.key(0))
    >>> h["w"].shape, bool(jnp.all(h["w"] >= 0))
    ((3, 4), True)

  Migrating from ``optax.second_order.fisher_diag(nll, params, inputs, targets)``
  (deprecated; the *empirical* Fisher, squared gradients at the data's targets, a flat
  vector): ``gnb_diagonal`` estimates the true Fisher without bias; the old value is
  ``jax.tree.map(jnp.square, jax.grad(nll)(params, inputs, targets))``.

  References:
    Liu, Li, Hall, Liang, Ma, "Sophia: a scalable stochastic second-order optimizer for
    language model pre-training", ICLR 2024, arXiv:2305.14342 (Algorithm 2).
  """
  key = _random.as_key(key, argname="key")
  _checks.check_float_leaves("params", params)
  _checked_logits(logits_fn, params, inputs, mask)
  logits = jax.lax.stop_gradient(logits_fn(params, inputs)).astype(jnp.float32)
  labels = jax.random.categorical(key, logits, axis=-1)
  return _gnb_from_labels(logits_fn, params, inputs, labels, mask)


class ScaleByDiagNewtonState(NamedTuple):
  """State of :func:`scale_by_diag_newton`.

  Attributes:
    count: updates so far (the curvature is refreshed when ``count % every == 0``).
    rng_key: raw key data (uint32) for the next probes or labels; split every update
      into the next state's key and this update's key.
    curvature: the (smoothed) ``diag(H)`` the last update divided by, like the params.
  """

  count: chex.Array
  rng_key: chex.Array
  curvature: optax.Updates


def _estimate(estimator: Estimator, samples: int,
              params: optax.Params | None, key: jax.Array,
              extra_args: dict[str, Any]) -> chex.ArrayTree:
  """A fresh curvature estimate ``ĥ`` at ``params`` from the update's keyword arguments."""
  if params is None:
    what = {"hutchinson": "loss_fn", "gnb": "estimator='gnb'"}.get(
        estimator if isinstance(estimator, str) else "", "a custom estimator")
    raise ValueError(f"scale_by_diag_newton with {what} needs the params: call "
                     "update(updates, state, params, ...)")
  if callable(estimator):
    return estimator(params, key, **extra_args)
  if estimator == "gnb":
    logits_fn, inputs = extra_args.get("logits_fn"), extra_args.get("inputs")
    if logits_fn is None or inputs is None:
      raise ValueError(
          "scale_by_diag_newton(estimator='gnb') needs logits_fn=((params, inputs) -> "
          "logits of shape (batch, classes)) and inputs= passed to update(...), or "
          "curvature=(a pytree like params)")
    return gnb_diagonal(logits_fn, params, inputs, key, mask=extra_args.get("mask"))
  loss_fn = extra_args.get("loss_fn")
  if loss_fn is None:
    raise ValueError(
        "scale_by_diag_newton needs the curvature: pass loss_fn=(params -> scalar loss) "
        "or curvature=(a pytree like params) to update(...)")
  return hutchinson_diagonal(loss_fn, params, key, samples)


def _direction(g: jax.Array, h: jax.Array, damping: chex.Numeric, damping_mode: str) -> jax.Array:
  """``g / (max(h, 0) + λ)`` or ``g / max(h, λ)``; an infinite ``h`` gives NaN."""
  # An infinite curvature is a failed estimate: NaN, not g/inf = 0 (or g/λ for -inf).
  h = jnp.where(jnp.isinf(h), jnp.nan, h)
  denominator = jnp.maximum(h, damping) if damping_mode == "max" else jnp.maximum(h, 0) + damping
  return (g / denominator).astype(g.dtype)


def _check_estimator(estimator: Any) -> None:
  if not callable(estimator) and estimator not in ESTIMATORS:
    raise ValueError("estimator must be 'hutchinson', 'gnb' or a function estimator(params, "
                     f"key, **update_kwargs) -> curvature like params, got {estimator!r}")


def scale_by_diag_newton(
    *,
    damping: chex.Numeric = 1e-4,
    estimator: Estimator = "hutchinson",
    samples: int = 1,
    key: jax.Array,
    every: chex.Numeric = 1,
    ema: chex.Numeric = 0.0,
    damping_mode: str = "add",
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions by the (smoothed, periodically refreshed) Hessian diagonal.

  Every ``k = every`` updates (the first included) a fresh estimate ``ĥ_t`` is taken at
  the current params and smoothed; in between, the last one is reused:

  .. math::
    h_t = \begin{cases} \beta\, h_{t-1} + (1 - \beta)\, \hat h_t & t \bmod k = 0 \\
      h_{t-1} & \text{otherwise} \end{cases}, \qquad
    d_t = \frac{g_t}{\max(h_t, 0) + \lambda} \;\;\text{or}\;\;
      \frac{g_t}{\max(h_t, \lambda)}\;(\texttt{damping\_mode="max"})

  with ``h_{-1} = 0`` (no bias correction, as in Sophia; ``β = ema = 0`` uses the fresh
  estimate as it is). ``ĥ`` is Hutchinson's estimate from the ``loss_fn`` passed to
  ``update`` (:func:`hutchinson_diagonal`), Sophia's Gauss–Newton–Bartlett estimate from
  the ``logits_fn`` and ``inputs`` passed to ``update`` (:func:`gnb_diagonal`), a
  function of yours, or a ``curvature`` passed to ``update`` (then ``every`` and ``ema``
  apply to it alike). Negative curvature is clipped (at 0, or at ``λ``) so the step never
  ascends; ``λ = damping`` keeps flat directions finite (``λ = 0`` only when the
  curvature is known to be positive, as for K-means, where an empty cluster has zero
  curvature and gets a NaN centroid). A NaN/inf gradient or curvature gives NaN/inf
  directions (propagated; an infinite curvature gives NaN, not a silent zero step).

  Like every optax ``scale_by_*`` transformation this returns a direction, not a step:
  ``optax.chain(gradtx.scale_by_diag_newton(key=k), optax.sgd(1.0))`` (or
  :func:`diag_newton`) applies the Newton step ``u = -g / (diag(H) + λ)``.

  Sophia (Liu et al., Algorithm 1) is this transformation between an EMA of gradients
  and a per-coordinate clip: :func:`sophia`.

  Args:
    damping: ``λ >= 0`` (a number, not a schedule).
    estimator: ``"hutchinson"`` (Rademacher probes of Hessian-vector products; needs
      ``loss_fn=`` in ``update``), ``"gnb"`` (needs ``logits_fn=`` and ``inputs=``, and
      takes an optional ``mask=``), or a function ``estimator(params, key, **kwargs) ->
      pytree like params`` that receives every keyword argument given to ``update``.
    samples: Hutchinson probes per refresh, S >= 1; static (under
      ``optax.inject_hyperparams`` list it in ``static_args``).
    key: a ``jax.random`` key; the state carries it forward, split every step.
    every: refresh the curvature every ``k >= 1`` updates (Sophia: 10); between
      refreshes no estimator runs (``lax.cond``).
    ema: the curvature EMA's ``β`` in [0, 1) (Sophia: 0.99).
    damping_mode: ``"add"`` (``max(h, 0) + λ``) or ``"max"`` (``max(h, λ)``, Sophia's).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params,
    *, loss_fn=None, logits_fn=None, inputs=None, mask=None, curvature=None)`` needs what
    the estimator reads, or ``curvature`` (a pytree with the paths and leaf shapes of
    ``updates``; a mismatch is an error naming the paths). ``updates`` must be floating
    (integer leaves are refused, naming their paths).

  Example:
    >>> import jax, jax.numpy as jnp, optax, gradtx
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 10.0]) * (p["w"] - 3.0) ** 2)
    >>> tx = gradtx.diag_newton(1.0, damping=0.0, key=jax.random.key(0))
    >>> params = {"w": jnp.zeros(2)}
    >>> updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params, loss_fn=loss)
    >>> optax.apply_updates(params, updates)["w"].tolist()   # one step to the minimum
    [3.0, 3.0]

  Migrating from optax's deprecated ``hessian_diag`` / ``fisher_diag``: see
  :func:`hutchinson_diagonal` and :func:`gnb_diagonal`; this transformation calls them.

  References:
    Liu, Li, Hall, Liang, Ma, "Sophia", ICLR 2024, arXiv:2305.14342.
    Yao et al., "AdaHessian", AAAI 2021, arXiv:2006.00719 (Hutchinson diagonal).
    Su, "Gradient descent and EM are one idea", kexue.fm/archives/4277.
  """
  _checks.check_non_negative("damping", damping, allow_schedule=False)
  _check_estimator(estimator)
  _check_samples(samples)
  _checks.check_int("every", every, minimum=1)
  _checks.check_in_interval("ema", ema, 0.0, 1.0, high_open=True)
  _checks.check_choice("damping_mode", damping_mode, DAMPING_MODES)
  typed = _random.as_key(key)
  impl = jax.random.key_impl(typed)

  def init_fn(params: optax.Params) -> ScaleByDiagNewtonState:
    return ScaleByDiagNewtonState(
        count=jnp.zeros((), jnp.int32), rng_key=jax.random.key_data(typed),
        curvature=jax.tree.map(lambda p: _numerics.sharded_like(
            jnp.zeros(jnp.shape(p), _numerics.compute_dtype(p)), p), params))

  def update_fn(updates: optax.Updates, state: ScaleByDiagNewtonState,
                params: optax.Params | None = None, *, curvature: optax.Updates | None = None,
                **extra_args: Any) -> tuple[optax.Updates, ScaleByDiagNewtonState]:
    _checks.check_float_leaves("updates", updates)  # g / (h + λ) would be truncated
    next_key, step_key = _random.split_state_key(state.rng_key, impl)
    refresh = state.count % every == 0
    if curvature is None:
      # Like the state's curvature: its dtype and (explicit-mesh) layout.
      def fresh() -> optax.Updates:
        estimate = optax.tree.cast_like(
            _estimate(estimator, samples, params, step_key, extra_args), state.curvature)
        return jax.tree.map(_numerics.sharded_like, estimate, state.curvature)

      if isinstance(every, int) and every == 1:
        estimate = fresh()
      else:  # no estimator runs between refreshes
        estimate = jax.lax.cond(refresh, fresh, lambda: state.curvature)
    else:
      _checks.check_same_structure("curvature", curvature, "the updates", updates)
      estimate = optax.tree.cast_like(curvature, state.curvature)
    smoothed = jax.tree.map(
        lambda h, e: jnp.where(ema == 0, e, ema * h + (1 - ema) * e).astype(h.dtype),
        state.curvature, estimate)
    new_curvature = jax.tree.map(lambda s, h: jnp.where(refresh, s, h), smoothed,
                                 state.curvature)
    directions = jax.tree.map(
        lambda g, h: _direction(g, h.astype(_numerics.compute_dtype(g)), damping,
                                damping_mode), updates, new_curvature)
    return directions, ScaleByDiagNewtonState(
        count=optax.safe_increment(state.count), rng_key=next_key, curvature=new_curvature)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def diag_newton(learning_rate: optax.ScalarOrSchedule = 1.0, *, key: jax.Array,
                damping: chex.Numeric = 1e-4, estimator: Estimator = "hutchinson",
                samples: int = 1, every: chex.Numeric = 1, ema: chex.Numeric = 0.0,
                damping_mode: str = "add") -> optax.GradientTransformationExtraArgs:
  r"""The diagonal Newton step ``u = -η g / (max(diag(H), 0) + λ)``.

  ``optax.chain(scale_by_diag_newton(...), optax.scale_by_learning_rate(η))``; see
  :func:`scale_by_diag_newton` for the arguments and the ``loss_fn`` / ``curvature``
  update arguments. With ``η = 1`` and ``λ = 0`` it is Newton's step on a loss with a
  diagonal Hessian, and EM's M-step for K-means.

  Args:
    learning_rate: ``η`` > 0, or a schedule.
    damping: ``λ >= 0``.
    estimator: ``"hutchinson"``, ``"gnb"`` or a function (see
      :func:`scale_by_diag_newton`).
    samples: Hutchinson probes per refresh.
    key: a ``jax.random`` key.
    every: refresh the curvature every ``every`` updates.
    ema: the curvature EMA's ``β`` in [0, 1).
    damping_mode: ``"add"`` or ``"max"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> tx = gradtx.diag_newton(0.5, damping=0.0, key=jax.random.key(0))
    >>> g = {"w": jnp.array([2.0])}
    >>> tx.update(g, tx.init(g), g, curvature={"w": jnp.array([4.0])})[0]["w"].tolist()
    [-0.25]

  References:
    Su, "Gradient descent and EM are one idea", kexue.fm/archives/4277.
  """
  _checks.check_positive("learning_rate", learning_rate)
  return optax.chain(
      scale_by_diag_newton(damping=damping, estimator=estimator, samples=samples, key=key,
                           every=every, ema=ema, damping_mode=damping_mode),
      optax.scale_by_learning_rate(learning_rate))


class SophiaClipState(NamedTuple):
  """State of the per-coordinate clip in :func:`sophia`'s chain.

  Attributes:
    clip_fraction: the fraction of coordinates whose preconditioned momentum
      ``m / max(γ h, ε)`` exceeded the threshold in the last update (float32; 0 before
      the first). Near 1, Sophia is sign descent on the momentum.
  """

  clip_fraction: jax.Array


def _clip_coordinates(threshold: chex.Numeric) -> optax.GradientTransformation:
  """``clip(u, -threshold, threshold)`` per coordinate, logging the clipped fraction."""

  def init_fn(params: optax.Params) -> SophiaClipState:
    del params
    return SophiaClipState(clip_fraction=jnp.zeros((), jnp.float32))

  def update_fn(updates: optax.Updates, state: SophiaClipState,
                params: optax.Params | None = None) -> tuple[optax.Updates, SophiaClipState]:
    del state, params
    clipped = optax.tree.sum(jax.tree.map(
        lambda u: jnp.sum(jnp.abs(u) > threshold, dtype=jnp.float32), updates))
    fraction = clipped / max(optax.tree.size(updates), 1)
    updates = jax.tree.map(lambda u: jnp.clip(u, -threshold, threshold).astype(u.dtype),
                           updates)
    return updates, SophiaClipState(clip_fraction=jnp.asarray(fraction, jnp.float32))

  return optax.GradientTransformation(init_fn, update_fn)


def sophia(learning_rate: optax.ScalarOrSchedule, *, key: jax.Array,
           estimator: Estimator = "gnb", b1: chex.Numeric = 0.965, b2: chex.Numeric = 0.99,
           gamma: chex.Numeric = 0.01, eps: chex.Numeric = 1e-12,
           weight_decay: chex.Numeric = 1e-4, weight_decay_mask: Any = None,
           every: chex.Numeric = 10, samples: int = 1, clip_threshold: chex.Numeric = 1.0,
           ) -> optax.GradientTransformationExtraArgs:
  r"""Sophia: clipped diagonal-Newton steps on the momentum (Liu et al., Algorithm 1).

  With ``m`` an EMA of the gradients and ``h`` an EMA of a diagonal curvature estimate
  ``ĥ`` refreshed every ``k = every`` steps (the first included; no bias correction):

  .. math::
    m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
    h_t = \beta_2 h_{t-k} + (1 - \beta_2) \hat h_t \;\; (t \bmod k = 0),

    \theta_{t+1} = \theta_t - \eta_t \operatorname{clip}\Big(\frac{m_t}{\max(\gamma h_t,
      \epsilon)}, \rho\Big) - \eta_t \lambda \theta_t

  (``clip`` per coordinate to ``[-ρ, ρ]``, ``ρ = clip_threshold``, the paper's 1;
  ``λ = weight_decay``, decoupled). ``estimator="gnb"`` is Sophia-G (Gauss–Newton–
  Bartlett from the model's logits, :func:`gnb_diagonal`; pass ``logits_fn=`` and
  ``inputs=`` to ``update``), ``"hutchinson"`` is Sophia-H (Hessian-vector products,
  :func:`hutchinson_diagonal`; pass ``loss_fn=``). It is the chain::

    optax.chain(optax.ema(b1, debias=False),
                scale_by_diag_newton(estimator=estimator, every=every, ema=b2,
                                     damping=eps / gamma, damping_mode="max", key=key),
                optax.scale(1 / gamma), <clip to ±clip_threshold>,
                optax.add_decayed_weights(weight_decay, weight_decay_mask),
                optax.scale_by_learning_rate(learning_rate))

  since ``m / max(γh, ε) = (1/γ) m / max(h, ε/γ)``. The state holds ``curvature`` (``h``)
  and ``clip_fraction`` (the fraction of coordinates clipped in the last step), both
  readable with ``optax.tree.get(state, name)``. ``h`` starts at 0: with ``b2 = 0.99``
  and ``every = 10`` it reaches 90% of the estimate only after 2,300 steps, and until
  then most coordinates are clipped (watch ``clip_fraction``); for short runs lower
  ``b2`` and ``every`` or raise ``gamma``.

  Args:
    learning_rate: ``η`` > 0, or a schedule.
    key: a ``jax.random`` key for the estimator's labels or probes.
    estimator: ``"gnb"`` (Sophia-G), ``"hutchinson"`` (Sophia-H) or a function
      ``estimator(params, key, **update_kwargs) -> pytree like params``.
    b1: the momentum's ``β1`` in [0, 1).
    b2: the curvature EMA's ``β2`` in [0, 1).
    gamma: ``γ`` > 0 (the paper: 0.01–0.05 for GPT-2).
    eps: ``ε`` > 0, the floor of ``γ h``.
    weight_decay: ``λ >= 0`` (decoupled: scaled by ``η``, not by the preconditioner).
    weight_decay_mask: optional pytree of bools (or a function of the params returning
      one) choosing the leaves to decay, as ``optax.adamw``'s ``mask``; under
      ``optax.inject_hyperparams`` list a function in ``static_args``.
    every: refresh the curvature every ``k >= 1`` steps.
    samples: Hutchinson probes per refresh (static).
    clip_threshold: ``ρ`` > 0.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (the full update, learning rate
    included) whose ``update(updates, state, params, **kwargs)`` takes what the estimator
    reads (see :func:`scale_by_diag_newton`).

  Example:
    >>> import jax, jax.numpy as jnp, optax, gradtx
    >>> logits_fn = lambda p, x: x @ p["w"]
    >>> x, y = jnp.eye(4)[:, :3], jnp.array([0, 1, 2, 0])
    >>> loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
    ...     logits_fn(p, x), y).mean()
    >>> params = {"w": jnp.zeros((3, 3))}
    >>> tx = gradtx.sophia(0.1, key=jax.random.key(0))                  # Sophia-G
    >>> state = tx.init(params)
    >>> for _ in range(20):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                              logits_fn=logits_fn, inputs=x)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 0.6 * loss({"w": jnp.zeros((3, 3))}))
    True
    >>> float(optax.tree.get(state, "clip_fraction"))   # h still near 0: all clipped
    1.0

  References:
    Liu, Li, Hall, Liang, Ma, "Sophia: a scalable stochastic second-order optimizer for
    language model pre-training", ICLR 2024, arXiv:2305.14342 (Algorithm 1).
  """
  _checks.check_positive("learning_rate", learning_rate)
  for name, value in (("b1", b1), ("b2", b2)):
    _checks.check_in_interval(name, value, 0.0, 1.0, high_open=True)
  for name, value in (("gamma", gamma), ("eps", eps), ("clip_threshold", clip_threshold)):
    _checks.check_positive(name, value, allow_schedule=False)
  _checks.check_non_negative("weight_decay", weight_decay, allow_schedule=False)
  return optax.chain(
      optax.ema(b1, debias=False),
      scale_by_diag_newton(estimator=estimator, every=every, ema=b2, damping=eps / gamma,
                           damping_mode="max", samples=samples, key=key),
      optax.scale(1 / gamma),
      _clip_coordinates(clip_threshold),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate))
