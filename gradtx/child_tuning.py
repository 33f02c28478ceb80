r"""ChildTuning: train a random or Fisher-chosen "child" subset of the parameters.

ChildTuning fine-tunes a large pretrained model by letting only some coordinates move:

* **ChildTuning-F** (task-free): every step, an independent Bernoulli(p) mask per
  element, ``u = g ⊙ M / p`` (unbiased: ``E[u] = g``).
* **ChildTuning-D** (task-driven): one fixed mask, the coordinates whose empirical
  Fisher information ``F = mean_b(g_b²)`` is in the top ``p`` fraction; ``u = g ⊙ M``.

Both are gradient transformations, so where they sit in an ``optax.chain`` decides what
they mask: before the optimizer they mask the *gradient* (the paper, which patches
AdamW: ``chain(child_tuning_f(p, key=k), optax.adamw(lr))``); after it they mask the
*update* (Su's "incre drop": ``chain(optax.adamw(lr), child_tuning_f(p, key=k))``).
Su's analysis of the first placement: Adam's moments keep the masked coordinates moving,
and in the long run gradient dropout acts on Adam like a learning rate times ``√p``.

The F masks need ``numel(params)`` random bits every step. On CPU, JAX's threefry
generator costs several AdamW updates' worth of time for the same number of parameters
(``benchmarks/child_tuning.py``; measured in ``benchmarks/results/child_tuning.md``), so
the default ``prng="hash"`` draws them from a counter-based integer hash instead: two
rounds of Wellons' ``lowbias32`` mixer over ``(counter, 64 seed bits)``, the seed coming
from the state's key, the step and the leaf's path; each 32-bit hash gives two 16-bit
uniforms, so ``p`` is rounded to a multiple of 2^-16 (the rescale uses that rounded ``p``,
so the update stays unbiased). That is a few fused integer ops per element, and
statistically fine for masks (the tests check density, independence across leaves and
steps, and unbiasedness); ``prng="jax"`` uses ``jax.random.bernoulli`` with the key's own
implementation (pass a ``jax.random.key(seed, impl="rbg")`` key for the faster XLA
generator on accelerators).

References:
  Xu, Luo, Zhang, Tan, Chang, Huang, Huang, "Raise a child in large language model:
  towards effective and generalizable fine-tuning", EMNLP 2021, arXiv:2109.05687.
  Su, "ChildTuning: dropout on gradients", kexue.fm/archives/8764, 2021.
  Wellons, "Hash function prospector" (lowbias32), 2018.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradtx import _checks, _numerics, _paths, _random, clipping

PRNGS = ("hash", "jax")
SCOPES = ("global", "per_leaf")

# --------------------------------------------------------------------------------------
# Random masks.


def _hash_mask(seed: jax.Array, shape: tuple[int, ...], threshold: jax.Array) -> jax.Array:
  """Bernoulli(threshold / 2^16) mask from a counter hash keyed by two uint32 words.

  Each 32-bit hash gives two 16-bit uniforms (elements 2i and 2i + 1), so the mask costs
  half a hash per element.
  """
  size = int(np.prod(shape))
  index = jax.lax.iota(jnp.uint32, (size + 1) // 2)
  bits = _random.counter_hash(index, seed[0], seed[1], "lowbias32")
  pairs = jnp.stack([(bits & jnp.uint32(0xFFFF)) < threshold, (bits >> 16) < threshold], -1)
  return pairs.reshape(-1)[:size].reshape(shape)


def _hash_threshold(p: jax.Array) -> jax.Array:
  """``p`` as a count of 2^-16 steps in [1, 2^16]: the hash mask keeps w.p. count / 2^16."""
  return jnp.clip(jnp.round(p * 65536.0), 1.0, 65536.0).astype(jnp.uint32)


def _bernoulli_masks(step_key: jax.Array, tree: Any, p: jax.Array, prng: str) -> Any:
  """One Bernoulli(p) mask per leaf; a leaf's mask depends on the key and its path only.

  With ``prng="hash"``, ``p`` must already be a multiple of 2^-16 (see ``_hash_threshold``);
  the hash takes its two seed words from the leaf key's data.
  """
  if prng == "hash":
    threshold = _hash_threshold(p)

    def draw(leaf_key, leaf):
      seed = jax.random.key_data(leaf_key).reshape(-1)[:2].astype(jnp.uint32)
      return _hash_mask(seed, jnp.shape(leaf), threshold)
  else:

    def draw(leaf_key, leaf):
      return jax.random.bernoulli(leaf_key, p, jnp.shape(leaf))

  return _random.per_leaf(step_key, tree, draw)


def _masked_count_and_size(masks: Any) -> tuple[jax.Array, int]:
  leaves = jax.tree.leaves(masks)
  kept = sum((jnp.sum(m, dtype=jnp.float32) for m in leaves), jnp.zeros((), jnp.float32))
  return kept, sum(int(np.size(m)) for m in leaves)


def _density(masks: Any) -> jax.Array:
  kept, size = _masked_count_and_size(masks)
  return kept / max(size, 1)


def _apply_mask(updates: Any, masks: Any, scale: jax.Array | None,
                invalid: jax.Array | None = None) -> Any:
  """``u ⊙ M`` (times ``scale``); every entry NaN where ``invalid`` (a bad traced ``p``)."""
  def leaf(u, m):
    kept = u if scale is None else (u * scale).astype(u.dtype)
    out = jnp.where(_numerics.sharded_like(m, u), kept, jnp.zeros_like(u))
    return out if invalid is None else jnp.where(invalid, jnp.asarray(jnp.nan, u.dtype), out)

  return jax.tree.map(leaf, updates, masks)


class ChildTuningFState(NamedTuple):
  """State of :func:`child_tuning_f`.

  Attributes:
    count: number of updates so far (drives a ``reserve_p`` schedule).
    rng_key: the raw key data (uint32) the next step's masks are drawn from.
    mask_density: the fraction of coordinates the last mask kept (≈ ``reserve_p``).
  """

  count: chex.Array
  rng_key: chex.Array
  mask_density: chex.Array


def child_tuning_f(
    reserve_p: optax.ScalarOrSchedule,
    *,
    key: jax.Array,
    rescale: bool = True,
    prng: str = "hash",
) -> optax.GradientTransformationExtraArgs:
  r"""ChildTuning-F: a fresh Bernoulli(p) mask on every coordinate, every step.

  .. math::
    u = \frac{g \odot M}{p}, \qquad M_{ij} \sim \mathrm{Bernoulli}(p)
    \text{ i.i.d. over elements, leaves and steps}

  so ``E[u] = g`` (with ``rescale=False``, ``u = g ⊙ M``). Chain it before the optimizer
  to mask the gradient, as the paper does, or after it to mask the update (Su).

  The masks are reproducible: the same ``key`` gives the same masks, and a leaf's mask
  depends only on the key, the step and the leaf's path (so wrapping the transformation
  in ``optax.masked`` does not change the masks of the leaves it still sees).
  A NaN/inf gradient entry stays NaN/inf where the mask keeps it and becomes 0 where it
  drops it; the state holds no gradient statistics, so nothing is poisoned. Integer or
  boolean updates are refused, naming their paths, when they would be divided by ``p``
  (``rescale=True``, or a scheduled ``p``): the result would be truncated.

  Args:
    reserve_p: the keep probability ``p`` in (0, 1], or a schedule ``count -> p``. A
      schedule (or a traced value) whose ``p`` falls outside (0, 1] at some step makes
      that step's updates and ``mask_density`` all NaN (visible, not a plausible wrong
      mask); a constant is checked at construction.
    key: a ``jax.random`` key; the state carries it forward, split every step. Under
      ``optax.inject_hyperparams`` list ``"key"`` in ``static_args``.
    rescale: divide kept coordinates by ``p`` (the paper's unbiased estimator; with
      ``prng="hash"``, ``p`` rounded to a multiple of 2^-16, the mask's exact rate).
    prng: ``"hash"`` (default: a counter-based hash, cheap enough to hide in an AdamW
      step; see the module docstring) or ``"jax"`` (``jax.random.bernoulli`` with the
      key's implementation).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is :class:`ChildTuningFState`
    (``mask_density`` for logging).

  Example:
    >>> import jax, jax.numpy as jnp, optax, gradtx
    >>> tx = optax.chain(gradtx.child_tuning_f(0.3, key=jax.random.key(0)),
    ...                  optax.adamw(1e-3))
    >>> params = {"w": jnp.ones((100, 100))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> density = optax.tree_utils.tree_get(state, "mask_density")
    >>> bool(abs(density - 0.3) < 0.02)
    True

  References:
    Xu et al., "Raise a child in large language model: towards effective and
    generalizable fine-tuning", EMNLP 2021, arXiv:2109.05687.
  """
  _checks.check_in_interval("reserve_p", reserve_p, 0.0, 1.0, low_open=True)
  _checks.check_choice("prng", prng, PRNGS)
  _checks.check_bool("rescale", rescale)
  typed_key = _random.as_key(key)
  impl = jax.random.key_impl(typed_key)
  # A constant p was checked above; a schedule's (or a traced) p is checked in the step.
  checked = _checks.concrete_scalar(reserve_p) is not None

  def init_fn(params):
    del params
    return ChildTuningFState(
        count=jnp.zeros((), jnp.int32),
        rng_key=jax.random.key_data(typed_key),
        mask_density=jnp.ones((), jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if rescale or not checked:  # 1/p and the NaN of a bad p need floats
      _checks.check_float_leaves("updates", updates)
    p = _numerics.scalar_or_schedule(reserve_p, state.count)
    invalid = None if checked else ~((p > 0) & (p <= 1))
    if prng == "hash":  # the probability the hash mask really keeps with
      p = _hash_threshold(p).astype(jnp.float32) / 65536.0
    next_key, step_key = _random.split_state_key(state.rng_key, impl)
    masks = _bernoulli_masks(step_key, updates, p, prng)
    new_updates = _apply_mask(updates, masks, 1.0 / p if rescale else None, invalid)
    density = _density(masks)
    new_state = ChildTuningFState(
        count=optax.safe_increment(state.count),
        rng_key=next_key,
        mask_density=density if invalid is None else jnp.where(invalid, jnp.nan, density),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------
# Fisher information and the fixed mask.


def _clip(grads: Any, clip_norm: float | None, clip_scope: str) -> Any:
  """Hard clipping of one gradient, by its global norm or every leaf by its own norm."""
  if clip_norm is None:
    return grads
  if clip_scope == "global":
    factor = clipping.clip_scale(clipping.global_norm(grads), clip_norm, "hard")
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)
  return jax.tree.map(
      lambda g: g * clipping.clip_scale(clipping.leaf_norm(g), clip_norm, "hard").astype(g.dtype),
      grads)


def _is_sequence_of_batches(batches: Any) -> bool:
  if isinstance(batches, list):
    return True
  if isinstance(batches, (tuple, Mapping, jax.Array, np.ndarray)):
    return False
  return isinstance(batches, Iterable)


def fisher_information(
    loss_fn: Callable[[optax.Params, Any], jax.Array],
    params: optax.Params,
    batches: Any,
    *,
    clip_norm: float | None = None,
    clip_scope: str = "per_leaf",
    per_example: bool = False,
) -> Any:
  r"""The empirical Fisher information (diagonal): mean squared gradient per coordinate.

  .. math::
    F = \frac{1}{B} \sum_{b=1}^{B} \mathrm{clip}(\nabla_\theta L(\theta; b))^{\odot 2}

  over batches ``b`` (the ChildTuning-D recipe), or with ``per_example=True`` over the
  examples of every batch, each with its own gradient (``vmap``; the textbook empirical
  Fisher).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``; with ``per_example=True`` it is called
      on batches of one example (leading axis 1).
    params: the pytree to differentiate.
    batches: a ``list`` or any iterable that is not a pytree (a generator, a data
      loader) of batches, accumulated one jit-compiled step at a time; or a *stacked*
      pytree (array, dict, tuple) whose leaves share a leading axis of batches, reduced
      inside one ``lax.scan``.
    clip_norm: clip each gradient (per batch, or per example) to this L2 norm before
      squaring; ``None`` = no clipping.
    clip_scope: ``"per_leaf"`` (the original code clips every tensor by its own norm) or
      ``"global"`` (the norm of the whole gradient pytree).
    per_example: average over examples rather than batches.

  Returns:
    A pytree like ``params`` (float32 or wider) of non-negative Fisher values.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> loss = lambda p, b: jnp.sum(p["w"] * b)
    >>> batches = jnp.array([[1.0, 2.0], [3.0, 0.0]])     # 2 batches
    >>> gradtx.fisher_information(loss, {"w": jnp.zeros(2)}, batches)["w"].tolist()
    [5.0, 2.0]

  References:
    Xu et al., "Raise a child in large language model: towards effective and
    generalizable fine-tuning", EMNLP 2021, arXiv:2109.05687 (ChildTuning-D's Fisher
    pass).
  """
  if clip_norm is not None:
    _checks.check_positive("clip_norm", clip_norm, allow_schedule=False)
  _checks.check_choice("clip_scope", clip_scope, ("per_leaf", "global"))
  _checks.check_bool("per_example", per_example)
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable as loss_fn(params, batch), got {loss_fn!r}")
  _checks.check_float_leaves("params", params)
  grad = jax.grad(loss_fn)

  def square(x):
    return jnp.square(x.astype(_numerics.compute_dtype(x)))

  def squared(batch):
    """(sum of squared clipped gradients, number of terms) of one batch."""
    if not per_example:
      return jax.tree.map(square, _clip(grad(params, batch), clip_norm, clip_scope)), 1.0
    one = lambda example: _clip(
        grad(params, jax.tree.map(lambda a: a[None], example)), clip_norm, clip_scope)
    per = jax.vmap(one)(batch)
    n = jax.tree.leaves(batch)[0].shape[0]
    return jax.tree.map(lambda x: jnp.sum(square(x), 0), per), n

  zero = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _numerics.compute_dtype(p)), params)

  @jax.jit
  def add(total, count, batch):
    sq, n = squared(batch)
    return jax.tree.map(jnp.add, total, sq), count + n

  total, count = _sum_over_batches(add, zero, batches)
  return jax.tree.map(lambda t: t / count.astype(t.dtype), total)


def _sum_over_batches(add: Callable[..., Any], zero: Any, batches: Any) -> tuple[Any, Any]:
  """``add(total, count, batch)`` folded over the batches: one jitted step per batch of a
  sequence, or one ``lax.scan`` over a stacked pytree."""
  count = jnp.zeros((), jnp.float32)
  if _is_sequence_of_batches(batches):
    total, seen = zero, 0
    for batch in batches:
      total, count = add(total, count, batch)
      seen += 1
    if not seen:
      raise ValueError("batches must yield at least one batch, got none")
    return total, count
  leaves = jax.tree.leaves(batches)
  if not leaves:
    raise ValueError("batches must hold at least one array, got an empty pytree")
  num_batches = _checks.common_leading_size("batches", [
      (p or "batches", x) for p, x in zip(_paths.tree_paths(batches), leaves, strict=True)],
      what="number of batches")
  if not num_batches:
    raise ValueError("batches must yield at least one batch, got none")

  @jax.jit
  def scan(stacked):
    return jax.lax.scan(lambda carry, batch: (add(*carry, batch), None), (zero, count),
                        stacked)[0]

  return scan(batches)


def fisher_mask(
    fisher: Any,
    reserve_p: float,
    *,
    include: str | Iterable[str] | None = None,
    scope: str = "global",
    stacked: _paths.Rules[int] | None = None,
) -> Any:
  r"""ChildTuning-D's mask: keep the coordinates with the largest Fisher information.

  .. math::
    M = F \ge \mathrm{percentile}_{100 (1 - p)}\big(\{F_i : i \text{ included}\}\big)

  with ``numpy.percentile``'s default (linear) interpolation, computed in float64 on
  the host, as the original code does. ``scope="global"`` thresholds all included
  values together (the original); ``"per_leaf"`` thresholds every tensor by itself.
  Leaves that are not included get an all-True mask (they train freely, as the
  original's embeddings and head do). A NaN or inf Fisher value in an included leaf is
  an error naming the leaf (it has no rank; ``numpy.percentile`` would make the threshold
  NaN and silently freeze every included leaf).

  Scanned layers: with ``scope="per_leaf"``, a leaf named in ``stacked={regex: axis}``
  (L layers along ``axis``, as ``nn.scan`` and ``nnx.vmap`` store them) gets one
  percentile per slice, so each layer keeps its own top ``p`` fraction, as the unrolled
  model's per-layer leaves would. (``scope="global"`` pools every value, so ``stacked``
  would change nothing there: it is refused.)

  Args:
    fisher: a pytree of non-negative arrays (:func:`fisher_information`), finite in the
      included leaves.
    reserve_p: the fraction ``p`` in (0, 1] of included coordinates to keep.
    include: path regexes (``re.fullmatch`` on the paths of ``gradtx.tree_paths``) of
      the leaves to select among; ``None`` = all leaves. The original selects the
      encoder layers, e.g. ``r".*layer.*"``. Every regex must match some leaf.
    scope: ``"global"`` or ``"per_leaf"``.
    stacked: ``{regex: axis}`` naming the stacked leaves (``scope="per_leaf"`` only), or
      ``None``. An axis out of range for a matched leaf or leaves of different lengths
      under one rule are errors naming the path and the sizes.

  Returns:
    A boolean pytree like ``fisher``, for :func:`child_tuning_d`.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> fisher = {"head": jnp.array([0.0, 1.0]), "layer": jnp.array([1.0, 4.0, 2.0, 3.0])}
    >>> mask = gradtx.fisher_mask(fisher, 0.5, include=["layer"])
    >>> mask["head"].tolist(), mask["layer"].tolist()
    ([True, True], [False, True, False, True])

    Two layers stacked on axis 0, each keeping its own top half:

    >>> fisher = {"blocks": jnp.array([[1.0, 4.0, 2.0, 3.0], [10.0, 0.0, 30.0, 20.0]])}
    >>> gradtx.fisher_mask(fisher, 0.5, scope="per_leaf",
    ...                    stacked={"blocks": 0})["blocks"].astype(int).tolist()
    [[0, 1, 0, 1], [0, 0, 1, 1]]

  References:
    Xu et al., "Raise a child in large language model: towards effective and
    generalizable fine-tuning", EMNLP 2021, arXiv:2109.05687.
  """
  _checks.check_in_interval("reserve_p", reserve_p, 0.0, 1.0, low_open=True)
  if _checks.concrete_scalar(reserve_p) is None:
    raise TypeError(f"reserve_p must be a number in (0, 1], got {reserve_p!r}")
  _checks.check_choice("scope", scope, SCOPES)
  if stacked is not None and scope != "per_leaf":
    raise ValueError(f"stacked={stacked!r} needs scope='per_leaf' (one percentile per "
                     f"slice); scope={scope!r} pools every value, so it would change nothing")
  stacks = _paths.resolve_stacked(fisher, stacked)
  paths, treedef = _paths.leaf_paths_and_treedef(fisher)
  _checks.check_addressable(
      "fisher", fisher, needs="fisher_mask takes percentiles of its values on the host",
      hint="Gather it first: fisher = jax.experimental.multihost_utils.process_allgather("
           "fisher, tiled=True) (the mask it gives can be passed to child_tuning_d as is; "
           "init lays it out like the params).")
  values = [np.asarray(x, np.float64) for x in jax.tree.leaves(fisher)]
  if include is None:
    selected = [True] * len(paths)
  else:
    patterns = [include] if isinstance(include, str) else list(include)
    if not patterns:
      raise ValueError("include must hold at least one path regex (None selects every "
                       "leaf), got an empty sequence")
    rules = [(pattern, True) for pattern in patterns]
    # Every rule must claim a leaf; leaves no rule claims are simply not included.
    matches = _paths.match_rules(paths, rules, argname="include", has_default=True)
    selected = [m is not None for m in matches]
  not_finite = [f"{path} ({int(np.sum(~np.isfinite(v)))} of {v.size})"
                for path, v, s in zip(paths, values, selected, strict=True)
                if s and not np.all(np.isfinite(v))]
  if not_finite:
    raise ValueError(
        "fisher must be finite where a mask is chosen (a NaN or inf Fisher value has no "
        "rank: it would freeze every included leaf); not finite at: "
        f"{', '.join(not_finite[:8])}. Check the Fisher pass (NaN gradients, overflow) or "
        "leave those leaves out of include")
  q = 100.0 * (1.0 - float(reserve_p))
  if scope == "global":
    chosen = [v.ravel() for v, s in zip(values, selected, strict=True) if s]
    pool = np.concatenate(chosen) if chosen else np.zeros(0)
    threshold = np.percentile(pool, q) if pool.size else np.inf
    thresholds = [threshold] * len(values)
  else:
    thresholds = [_leaf_percentile(v, q, stack) for v, stack in zip(values, stacks, strict=True)]
  masks = [v >= t if s else np.ones(v.shape, bool)
           for v, t, s in zip(values, thresholds, selected, strict=True)]
  return jax.tree.unflatten(treedef, [jnp.asarray(m) for m in masks])


def _leaf_percentile(v: np.ndarray, q: float, stack: _paths.StackedLeaf | None) -> Any:
  """The ``q``-th percentile of ``v``, or of every slice of a stacked ``v`` (broadcastable)."""
  if not v.size:
    return np.inf
  if stack is None:
    return np.percentile(v, q)
  per_slice = np.percentile(np.moveaxis(v, stack.axis, 0).reshape(stack.length, -1), q, axis=1)
  return stack.along(per_slice, v.ndim)


def _align_mask(mask_by_path: dict[str, Any], params: Any) -> Any:
  """The mask laid out like ``params`` (keeping its ``None``/``MaskedNode`` placeholders)."""
  paths, treedef = _paths.leaf_paths_and_treedef(params)
  missing, wrong, out = [], [], []
  for path, leaf in zip(paths, jax.tree.leaves(params), strict=True):
    if path not in mask_by_path:
      missing.append(path)
    elif mask_by_path[path].shape != jnp.shape(leaf):
      wrong.append(f"{path!r}: mask {mask_by_path[path].shape} vs params {jnp.shape(leaf)}")
    else:
      out.append(mask_by_path[path])
  if missing:
    raise ValueError(f"mask has no leaf for the params paths {missing}; the mask's paths "
                     f"are {sorted(mask_by_path)}")
  if wrong:
    raise ValueError(f"mask and params shapes differ at {', '.join(wrong)}")
  return jax.tree.unflatten(treedef, out)


class ChildTuningDState(NamedTuple):
  """State of :func:`child_tuning_d`.

  Attributes:
    mask: the fixed boolean mask, laid out like the params (an input of the compiled
      step, not a constant baked into it; shardable like the params).
    mask_density: the fraction of the params' coordinates the mask keeps.
  """

  mask: Any
  mask_density: chex.Array


def _on_device_only(x: Any) -> bool:
  """A tracer, or an array sharded over devices of other processes too."""
  return isinstance(x, jax.core.Tracer) or (
      isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated)


def child_tuning_d(mask: Any, *, rescale: bool = False) -> optax.GradientTransformationExtraArgs:
  r"""ChildTuning-D: a fixed mask, typically the top-p Fisher coordinates.

  .. math::
    u = g \odot M \qquad (\text{or } g \odot M / \rho \text{ with } ``rescale``,
    \ \rho = \text{the fraction of coordinates } M \text{ keeps})

  The original does not rescale. The mask is matched to the params by path at ``init``:
  every params leaf needs a mask leaf of its shape; mask leaves for paths the params
  do not have (e.g. leaves ``optax.masked`` hides) are ignored. A NaN/inf gradient entry
  stays where the mask keeps it and becomes 0 where it drops it.

  Args:
    mask: a boolean pytree, e.g. from :func:`fisher_mask`.
    rescale: divide the kept coordinates by the mask's density (then the updates must
      be floating: integer leaves are refused, naming their paths).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is :class:`ChildTuningDState`.

  Example:
    >>> import jax.numpy as jnp, optax, gradtx
    >>> mask = {"w": jnp.array([True, False, True])}
    >>> tx = gradtx.child_tuning_d(mask)
    >>> g = {"w": jnp.array([1.0, 2.0, 3.0])}
    >>> tx.update(g, tx.init(g))[0]["w"].tolist()
    [1.0, 0.0, 3.0]

  References:
    Xu et al., "Raise a child in large language model: towards effective and
    generalizable fine-tuning", EMNLP 2021, arXiv:2109.05687.
  """
  _checks.check_bool("rescale", rescale)
  paths = _paths.tree_paths(mask)
  leaves = jax.tree.leaves(mask)
  not_bool = [f"{p!r} ({jnp.result_type(x)})" for p, x in zip(paths, leaves, strict=True)
              if jnp.result_type(x) != jnp.bool_]
  if not_bool:
    raise TypeError(f"mask must be a pytree of boolean arrays; not boolean: "
                    f"{', '.join(not_bool)}")
  # A concrete mask is copied to the host (a snapshot); a traced one (e.g. vmapped over
  # per-seed masks) stays traced, and one sharded over other processes' devices (a
  # multi-process run) stays as it is laid out: this process cannot read it whole.
  mask_by_path = {p: x if _on_device_only(x) else np.asarray(x)
                  for p, x in zip(paths, leaves, strict=True)}

  def init_fn(params):
    if (any(isinstance(p, jax.core.Tracer) for p in jax.tree.leaves(params))
        and any(_on_device_only(m) and not isinstance(m, jax.core.Tracer)
                for m in mask_by_path.values())):
      raise ValueError(
          "child_tuning_d: mask is sharded over other processes' devices, which a "
          "jit-compiled init cannot close over; call tx.init(params) outside jit (it lays "
          "the mask out like the params), or pass a mask every process holds whole (e.g. "
          "fisher_mask's output)")
    aligned = jax.tree.map(lambda m, p: _numerics.sharded_like(jnp.asarray(m), p),
                           _align_mask(mask_by_path, params), params)
    return ChildTuningDState(mask=aligned, mask_density=_density(aligned))

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    if rescale:  # the division by the density needs floats
      _checks.check_float_leaves("updates", updates)
    scale = 1.0 / jnp.maximum(state.mask_density, 1e-12) if rescale else None
    return _apply_mask(updates, state.mask, scale), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
