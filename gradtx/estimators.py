r"""Gradients without backpropagation: evolution strategies, SPSA, forward gradients, REINFORCE.

(The module is not called ``zeroth_order``: that name is the transformation
``gradtx.zeroth_order``, which a submodule of the same name would shadow.)

The zeroth-order (ES) estimate of the gradient of the smoothed objective
``f_σ(θ) = E_ε f(θ + σε)`` is

.. math::
  \hat g = \frac{1}{N \sigma} \sum_{i=1}^{N} \big(f(\theta + \sigma \varepsilon_i) - b\big)
    \varepsilon_i, \qquad \mathbb{E}\,\varepsilon = 0,\ \mathrm{Cov}\,\varepsilon = I

with Gaussian ``ε`` (OpenAI ES) or Rademacher ``ε`` (SPSA), mirrored pairs ``±ε``
(antithetic: ``(f(θ+σε) - f(θ-σε)) / (2σ) · ε``), a baseline ``b`` and optional fitness
shaping. The policy gradient (score function) ``∇ E_{y~p_θ} r(y) = E[(r(y) - b) ∇ log
p_θ(y)]`` is the same estimator with the Gaussian search distribution as the policy
(Su): ``∇_θ log N(θ + σε; θ, σ²I) = ε / σ``.

Every member's noise is regenerated from ``fold_in(key, member)`` (and the leaf's path),
so the population never has to exist at once: ``lean=True`` evaluates it one member at
a time (MeZO-style: memory of one inference plus one parameter-sized accumulator),
``batch_size`` vmaps chunks, and the default vmaps the whole population. All three, and
a population sharded over a device mesh, give the same estimate for the same key.

References:
  Salimans, Ho, Chen, Sidor, Sutskever, "Evolution strategies as a scalable alternative
  to reinforcement learning", 2017, arXiv:1703.03864.
  Spall, "Multivariate stochastic approximation using a simultaneous perturbation
  gradient approximation", IEEE TAC 37(3), 1992 (SPSA).
  Malladi et al., "Fine-tuning language models with just forward passes", NeurIPS 2023,
  arXiv:2305.17333 (MeZO).
  Baydin, Pearlmutter, Syme, Wood, Torr, "Gradients without backpropagation", 2022,
  arXiv:2202.08587 (forward gradients).
  Williams, "Simple statistical gradient-following algorithms for connectionist
  reinforcement learning", Machine Learning 8, 1992 (REINFORCE).
  Su, "Policy gradient and zeroth-order optimisation are the same",
  kexue.fm/archives/7737.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradtx import _checks, _numerics, _paths, _random

NOISES = ("gaussian", "rademacher")
SHAPINGS = (None, "centered_rank", "standardize")
BASELINES = ("f0", "mean", None)
ESTIMATORS = ("es", "forward")


def _noise(key: jax.Array, index: jax.Array, params: Any, noise: str) -> Any:
  """The noise ``ε`` of one population member: a pytree like ``params`` (float32+)."""
  paths, treedef = _paths.leaf_paths_and_treedef(params)
  if not paths:
    return params
  keys = _random.leaf_keys(jax.random.fold_in(key, index), paths)
  draws = []
  for leaf_key, leaf in zip(keys, jax.tree.leaves(params), strict=True):
    dtype = _numerics.compute_dtype(leaf)
    # Drawn flat and reshaped: the same values as drawing the shape (threefry counts
    # elements in row-major order) and faster on XLA:CPU.
    size = (int(np.prod(jnp.shape(leaf), dtype=np.int64)),)
    if noise == "gaussian":
      draw = jax.random.normal(leaf_key, size, dtype)
    else:
      draw = jax.random.rademacher(leaf_key, size, dtype)
    draws.append(draw.reshape(jnp.shape(leaf)))
  return jax.tree.unflatten(treedef, draws)


def _perturbed(params: Any, eps: Any, step: jax.Array) -> Any:
  return jax.tree.map(lambda p, e: (p.astype(e.dtype) + step * e).astype(p.dtype), params, eps)


def _flattenable(params: Any) -> bool:
  """Leaves share one compute dtype and carry no explicit-mesh sharding (so one flat
  vector can hold them)."""
  leaves = jax.tree.leaves(params)
  if not leaves or len({_numerics.compute_dtype(p) for p in leaves}) != 1:
    return False
  for p in leaves:
    sharding = getattr(jax.typeof(p), "sharding", None)
    if sharding is not None and not sharding.mesh.empty:
      return False
  return True


def _flat_population_fitness(fn: Callable, params: Any, eps: Any, steps: list[Any]
                             ) -> jax.Array:
  """``f(θ + s ε_j)`` for every draw j (rows of ``eps``) and step s, shape (P, S).

  The same perturbed values as :func:`_perturbed`, built as one (P, S, D) population of
  flat vectors whose slices are the leaves: XLA:CPU runs the vectorised model ~1.4x faster
  this way than on per-leaf perturbations (digits MLP, ``benchmarks/zeroth_order.py``).
  """
  leaves, treedef = jax.tree.flatten(params)
  dtype = _numerics.compute_dtype(leaves[0])
  draws = jax.tree.leaves(eps)[0].shape[0]
  flat = jnp.concatenate([p.astype(dtype).reshape(-1) for p in leaves])
  flat_eps = jnp.concatenate([e.reshape(draws, -1) for e in jax.tree.leaves(eps)], axis=1)
  steps = jnp.stack([jnp.asarray(v, dtype) for v in steps])
  population = flat + steps[None, :, None] * flat_eps[:, None, :]
  bounds = np.cumsum([0] + [p.size for p in leaves]).tolist()

  def unflatten(x):
    return jax.tree.unflatten(treedef, [
        x[a:b].reshape(p.shape).astype(p.dtype)
        for p, a, b in zip(leaves, bounds[:-1], bounds[1:], strict=True)])

  evaluate = lambda x: jnp.asarray(fn(unflatten(x)), jnp.float32)  # noqa: E731
  return jax.vmap(jax.vmap(evaluate))(population)


def _map(fn: Callable, xs: jax.Array, *, lean: bool, batch_size: int | None) -> Any:
  """``fn`` over the rows of ``xs``: one at a time (lean), in chunks, or all at once."""
  if lean:
    return jax.lax.map(fn, xs)
  if batch_size is not None and batch_size < xs.shape[0]:
    return jax.lax.map(fn, xs, batch_size=batch_size)
  return jax.vmap(fn)(xs)


def _centered_ranks(values: jax.Array) -> jax.Array:
  """``rank / (N - 1) - 0.5`` (OpenAI ES, evosax), ranks from 0.

  Tied values share their average rank (as evosax and ``scipy.stats.rankdata``), so a
  plateau of equal fitness (e.g. accuracy) gets weight 0 on average instead of an order
  by position; NaN ranks as the largest value (the worst loss).
  """
  n = values.shape[0]
  rankable = jnp.where(jnp.isnan(values), jnp.inf, values)
  ranks = jax.scipy.stats.rankdata(rankable, method="average") - 1.0
  return ranks.astype(values.dtype) / max(n - 1, 1) - 0.5


def _weights(fitness: jax.Array, f0: jax.Array | None, shaping: str | None,
             baseline: str | None) -> jax.Array:
  """Per-member weights ``w_i`` (members in order, shape (N,))."""
  n = fitness.shape[0]
  if shaping == "centered_rank":
    return _centered_ranks(fitness)
  if shaping == "standardize":
    std = jnp.std(fitness)
    return (fitness - jnp.mean(fitness)) / jnp.where(std > 0, std, 1.0)
  if baseline == "f0":
    return fitness - f0
  if baseline == "mean":  # leave-one-out mean: unbiased
    return (fitness - jnp.mean(fitness)) * (n / max(n - 1, 1))
  return fitness


def _check_es_args(sigma, num_samples, antithetic, noise, shaping, baseline, batch_size):
  _checks.check_positive("sigma", sigma, allow_schedule=False)
  _checks.check_int("num_samples", num_samples, minimum=1)
  if not isinstance(antithetic, bool):
    raise TypeError(f"antithetic must be a bool, got {antithetic!r}")
  if antithetic and int(num_samples) % 2:
    raise ValueError(f"num_samples must be even with antithetic=True (mirrored pairs "
                     f"±ε), got {num_samples!r}")
  _checks.check_choice("noise", noise, NOISES)
  _checks.check_choice("shaping", shaping, SHAPINGS)
  _checks.check_choice("baseline", baseline, BASELINES)
  if baseline == "mean" and int(num_samples) < 2 and shaping is None and not antithetic:
    raise ValueError("baseline='mean' needs num_samples >= 2 (a leave-one-out mean)")
  if batch_size is not None:
    _checks.check_int("batch_size", batch_size, minimum=1)


def es_gradient(
    fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    sigma: float,
    num_samples: int,
    antithetic: bool = True,
    noise: str = "gaussian",
    shaping: str | None = None,
    baseline: str | None = "f0",
    batch_size: int | None = None,
    lean: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    axis_name: str | None = None,
) -> Any:
  r"""Zeroth-order (ES / SPSA) estimate of ``∇_θ E_ε f(θ + σε)``.

  .. math::
    \hat g = \frac{1}{N \sigma} \sum_{i=1}^{N} w_i\, \varepsilon_i

  with ``w_i = f(θ + σε_i) - b`` (``baseline``: ``"f0"`` = ``f(θ)``, one extra
  evaluation; ``"mean"`` = the leave-one-out mean of the other members, unbiased;
  ``None`` = 0), or shaped fitness (``"centered_rank"``: ``rank/(N-1) - 0.5``, ties sharing
  their average rank, NaN ranked last;
  ``"standardize"``: ``(f - mean)/std``; these estimate a direction, not the gradient's
  scale). With ``antithetic``, members come in pairs ``±ε_j`` and the baseline cancels:
  ``ĝ = (1/(2σP)) Σ_j (f(θ+σε_j) - f(θ-σε_j)) ε_j`` for P = N/2 pairs.

  Member ``i`` (pair ``j`` when antithetic) draws its noise from
  ``fold_in(key, i)`` then ``fold_in(·, crc32(leaf path) & 0x7FFFFFFF)``: same key, same
  estimate, whichever of ``lean``, ``batch_size`` or ``mesh`` evaluates the population.

  Args:
    fn: ``fn(params) -> scalar`` (need not be differentiable).
    params: the point ``θ``, any pytree of float arrays.
    key: a ``jax.random`` key.
    sigma: the smoothing scale ``σ`` > 0 (a number, or an array inside ``jit``, e.g.
      injected by ``optax.inject_hyperparams``).
    num_samples: the population size N (function evaluations, ``f0`` aside).
    antithetic: mirrored sampling (N must be even).
    noise: ``"gaussian"`` or ``"rademacher"`` (SPSA).
    shaping: ``None``, ``"centered_rank"`` or ``"standardize"``.
    baseline: ``"f0"``, ``"mean"`` or ``None`` (ignored with shaping or antithetic).
    batch_size: members evaluated at once (vmapped chunks); ``None`` = all.
    lean: evaluate one member at a time and regenerate its noise when accumulating
      (MeZO-style memory: one evaluation plus one parameter-sized accumulator).
    mesh: a device mesh whose ``axis_name`` axis splits the population (the number of
      noise draws, N or N/2, must divide evenly); ``params`` are replicated.
    axis_name: the mesh axis for the population.

  Returns:
    A pytree like ``params`` (dtypes kept).

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> f = lambda p: jnp.sum(p["w"] * jnp.array([1.0, -2.0, 3.0]))   # linear
    >>> g = gradtx.es_gradient(f, {"w": jnp.zeros(3)}, jax.random.key(0), sigma=0.1,
    ...                        num_samples=20000)
    >>> bool(jnp.allclose(g["w"], jnp.array([1.0, -2.0, 3.0]), atol=0.15))
    True

  References:
    Salimans et al., "Evolution strategies as a scalable alternative to reinforcement
    learning", 2017, arXiv:1703.03864. Spall, IEEE TAC 37(3), 1992 (SPSA).
  """
  _check_es_args(sigma, num_samples, antithetic, noise, shaping, baseline, batch_size)
  if (mesh is None) != (axis_name is None):
    raise ValueError("pass both mesh and axis_name (the population's mesh axis), or neither")
  n = int(num_samples)
  pairs = n // 2 if antithetic else n
  sign_values = (1.0, -1.0) if antithetic else (1.0,)
  signs = jnp.array(sign_values, jnp.float32)
  # A Python number stays one (folded into the program); a traced sigma (e.g. under
  # optax.inject_hyperparams) is used as an array.
  sigma = float(sigma) if isinstance(sigma, (int, float)) else jnp.asarray(sigma, jnp.float32)

  def fitness_at(eps):
    """``[f(θ + sσε), ...]`` over the signs, as one vectorised evaluation."""
    return jax.vmap(lambda s: jnp.asarray(fn(_perturbed(params, eps, s * sigma)),
                                          jnp.float32))(signs)

  def fitness_of(j):
    return fitness_at(_noise(key, j, params, noise))

  def population_noise(indices):
    return jax.vmap(lambda i: _noise(key, i, params, noise))(indices)

  def contract(c, eps):
    """``Σ_j c_j ε_j`` for a stacked noise ``eps`` (leading axis j)."""
    return jax.tree.map(lambda e: jnp.tensordot(c.astype(e.dtype), e, axes=1), eps)

  def weighted_sum(indices, coefficients):
    """``Σ_j c_j ε_j`` over ``indices``, regenerating each ``ε_j``."""
    zero = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _numerics.compute_dtype(p)), params)

    def add(total, jc):
      j, c = jc
      eps = _noise(key, j, params, noise)
      return jax.tree.map(lambda t, e: t + c.astype(e.dtype) * e, total, eps), None

    if lean:
      return jax.lax.scan(add, zero, (indices, coefficients))[0]
    chunk = batch_size
    full = indices.shape[0] // chunk * chunk

    def add_chunk(total, jc):
      j, c = jc
      return jax.tree.map(jnp.add, total, contract(c, population_noise(j))), None

    shaped = lambda a: a[:full].reshape((full // chunk, chunk) + a.shape[1:])  # noqa: E731
    total = jax.lax.scan(add_chunk, zero, (shaped(indices), shaped(coefficients)))[0]
    if full < indices.shape[0]:
      total = add_chunk(total, (indices[full:], coefficients[full:]))[0]
    return total

  # Mirrored pairs cancel any constant baseline; shaping replaces it.
  baseline = None if antithetic or shaping is not None else baseline
  f0 = jnp.asarray(fn(params), jnp.float32) if baseline == "f0" else None

  def coefficients(fitness):
    """Per noise draw ``c_j = Σ_s s · w_{j,s}`` from the global (pairs, signs) fitness."""
    w = _weights(fitness.reshape(-1), f0, shaping, baseline).reshape(fitness.shape)
    return jnp.sum(w * signs, axis=1)

  def local_sum(indices, coefficients_of):
    """This shard's ``Σ_j c_j ε_j``; ``coefficients_of`` maps local to global weights."""
    if lean or (batch_size is not None and batch_size < indices.shape[0]):
      fitness = _map(fitness_of, indices, lean=lean, batch_size=batch_size)
      return weighted_sum(indices, coefficients_of(fitness))
    # The whole population at once: draw its noise once, for the fitness and the sum.
    eps = population_noise(indices)
    if _flattenable(params):
      fitness = _flat_population_fitness(fn, params, eps, [v * sigma for v in sign_values])
    else:
      fitness = jax.vmap(lambda _, e: fitness_at(e))(indices, eps)  # indices: the axis size
    return contract(coefficients_of(fitness), eps)

  if mesh is None:
    total = local_sum(jnp.arange(pairs, dtype=jnp.uint32), coefficients)
  else:
    total = _sharded_sum(mesh, axis_name, pairs, coefficients, local_sum)
  # The population's noise is replicated; the estimate is laid out like the params.
  return jax.tree.map(
      lambda t, p: _numerics.sharded_like((t / (n * sigma)).astype(jnp.result_type(p)), p),
      total, params)


def _sharded_sum(mesh, axis_name, pairs, coefficients, local_sum):
  """``Σ_j c_j ε_j`` with the noise draws split over ``mesh``'s ``axis_name``."""
  from jax.sharding import PartitionSpec as P

  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name must be an axis of mesh {tuple(mesh.axis_names)}, got "
                     f"{axis_name!r}")
  devices = mesh.shape[axis_name]
  if pairs % devices:
    raise ValueError(f"the number of noise draws ({pairs}: num_samples, halved when "
                     f"antithetic) must be divisible by the {devices} devices of mesh axis "
                     f"{axis_name!r}")

  def local(indices):
    def mine(fitness):
      everyone = jax.lax.all_gather(fitness, axis_name, tiled=True)
      start = jax.lax.axis_index(axis_name) * indices.shape[0]
      return jax.lax.dynamic_slice_in_dim(coefficients(everyone), start, indices.shape[0])

    return jax.tree.map(lambda t: jax.lax.psum(t, axis_name), local_sum(indices, mine))

  indices = jnp.arange(pairs, dtype=jnp.uint32)
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    # Sharding in types: the index vector must already be split as in_specs says.
    indices = jax.sharding.reshard(indices, jax.sharding.NamedSharding(mesh, P(axis_name)))
  return jax.shard_map(local, mesh=mesh, in_specs=P(axis_name), out_specs=P(),
                       check_vma=False)(indices)


def forward_gradient(
    fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    num_directions: int = 1,
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
    params: the point ``θ``.
    key: a ``jax.random`` key.
    num_directions: K >= 1.

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
  _checks.check_int("num_directions", num_directions, minimum=1)

  def one(k):
    v = _noise(key, k, params, "gaussian")
    tangent = jax.tree.map(lambda p, e: e.astype(jnp.result_type(p)), params, v)
    slope = jax.jvp(fn, (params,), (tangent,))[1]
    return jax.tree.map(lambda e: slope.astype(e.dtype) * e, v)

  draws = jax.vmap(one)(jnp.arange(int(num_directions), dtype=jnp.uint32))
  return jax.tree.map(
      lambda d, p: _numerics.sharded_like(jnp.mean(d, 0).astype(jnp.result_type(p)), p),
      draws, params)


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
    params: the policy's parameters ``θ``.
    key: a ``jax.random`` key.
    sample_fn: ``sample_fn(params, key) -> y``, a draw from ``p_θ``.
    num_samples: N >= 1 (>= 2 with ``baseline="mean"``).
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
  _checks.check_int("num_samples", num_samples, minimum=1)
  _checks.check_choice("baseline", baseline, ("mean", None))
  n = int(num_samples)
  if baseline == "mean" and n < 2:
    raise ValueError(f"num_samples must be >= 2 with baseline='mean' (a leave-one-out "
                     f"mean), got {num_samples!r}")
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n, dtype=jnp.uint32))
  samples = jax.vmap(sample_fn, in_axes=(None, 0))(params, keys)
  samples = jax.lax.stop_gradient(samples)
  rewards = jax.vmap(reward_fn)(samples).astype(jnp.float32)
  weights = _weights(rewards, None, None, baseline)

  def surrogate(p):
    log_probs = jax.vmap(log_prob_fn, in_axes=(None, 0))(p, samples)
    return jnp.sum(jax.lax.stop_gradient(weights).astype(log_probs.dtype) * log_probs) / n

  return jax.grad(surrogate)(params)


def fill_masked(tree: Any, full: Any) -> Any:
  """``tree`` with its ``optax.MaskedNode`` leaves taken from ``full`` (same structure).

  Inside ``optax.masked`` / ``optax.partition`` / ``gradtx.by_path`` a transformation sees
  the params it owns and ``MaskedNode()`` elsewhere; a ``loss_fn`` for
  :func:`zeroth_order` rebuilds the whole tree with ``fill_masked(p, params)``.

  Example:
    >>> import optax, gradtx
    >>> gradtx.fill_masked({"a": 1.0, "b": optax.MaskedNode()}, {"a": 0.0, "b": 2.0})
    {'a': 1.0, 'b': 2.0}
  """
  return jax.tree.map(lambda t, f: f if isinstance(t, optax.MaskedNode) else t, tree, full,
                      is_leaf=lambda x: isinstance(x, optax.MaskedNode))


class ZerothOrderState(NamedTuple):
  """State of :func:`zeroth_order`.

  Attributes:
    count: number of estimates so far.
    rng_key: raw key data (uint32) for the next estimate.
  """

  count: chex.Array
  rng_key: chex.Array


def zeroth_order(
    estimator: str | Callable[..., Any] = "es",
    *,
    key: jax.Array,
    sigma: float | jax.Array | None = None,
    num_samples: int | None = None,
    num_directions: int | None = None,
    **estimator_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  r"""Replaces the incoming updates by a zeroth-order estimate of ``∇ loss_fn(params)``.

  .. math::
    u = \hat\nabla_\theta\, \mathrm{loss\_fn}(\theta)

  so ``optax.chain(gradtx.zeroth_order("es", key=k, sigma=0.01, num_samples=64),
  optax.adam(1e-3))`` trains an objective with no usable gradient, its ``update`` called
  as ``tx.update(updates, state, params, loss_fn=loss_fn)`` (``updates`` only supply the
  structure; zeros do). Inside ``optax.masked`` / ``gradtx.by_path`` only the owned
  leaves are perturbed: ``loss_fn`` then receives a tree with ``optax.MaskedNode()`` at the
  others — rebuild it with :func:`fill_masked`. The key is split every step.

  ``sigma``, ``num_samples`` and ``num_directions`` are named arguments so that
  ``optax.inject_hyperparams(gradtx.zeroth_order, static_args=("estimator", "key",
  "num_samples"))`` can inject (and schedule) ``sigma``; ``num_samples`` and
  ``num_directions`` are shapes and must stay static.

  Args:
    estimator: ``"es"`` (:func:`es_gradient`), ``"forward"`` (:func:`forward_gradient`),
      or a callable ``estimator(fn, params, key, **estimator_kwargs) -> grads``.
    key: a ``jax.random`` key.
    sigma: ES's smoothing scale (required with ``"es"``).
    num_samples: ES's population size (required with ``"es"``).
    num_directions: the forward gradient's number of directions (default 1).
    **estimator_kwargs: the estimator's other options (``antithetic``, ``shaping``,
      ``lean``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params`` and
    ``loss_fn``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, gradtx
    >>> loss = lambda p: jnp.sum(jnp.round(p["w"] * 100) ** 2)   # piecewise constant
    >>> tx = optax.chain(gradtx.zeroth_order("es", key=jax.random.key(0), sigma=0.1,
    ...                                      num_samples=32), optax.sgd(1e-5))
    >>> params = {"w": jnp.array([1.0, -1.0])}
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda p, s: tx.update(p, s, p, loss_fn=loss))
    >>> for _ in range(20):
    ...   u, state = step(params, state)
    ...   params = optax.apply_updates(params, u)
    >>> bool(loss(params) < 2e4)
    True

  References:
    Salimans et al., 2017, arXiv:1703.03864. Su, kexue.fm/archives/7737.
  """
  # optax.inject_hyperparams re-calls a factory with its bound arguments, so the
  # ``**estimator_kwargs`` dict arrives as one keyword of that name.
  nested = estimator_kwargs.pop("estimator_kwargs", None)
  if isinstance(nested, dict):
    estimator_kwargs = {**nested, **estimator_kwargs}
  named = dict(sigma=sigma, num_samples=num_samples, num_directions=num_directions)
  estimator_kwargs = {**{k: v for k, v in named.items() if v is not None},
                      **estimator_kwargs}
  if isinstance(estimator, str):
    _checks.check_choice("estimator", estimator, ESTIMATORS)
    estimate = es_gradient if estimator == "es" else forward_gradient
  elif callable(estimator):
    estimate = estimator
  else:
    raise TypeError(f"estimator must be 'es', 'forward' or a callable, got {estimator!r}")
  try:  # options are checked now, not at the first update inside jit
    inspect.signature(estimate).bind(None, None, None, **estimator_kwargs)
  except TypeError as err:
    raise TypeError(f"zeroth_order({estimator!r}, ...): bad estimator options "
                    f"{sorted(estimator_kwargs)}: {err}") from None
  if estimate is es_gradient:
    options = dict(antithetic=True, noise="gaussian", shaping=None, baseline="f0",
                   batch_size=None)
    options.update({k: v for k, v in estimator_kwargs.items() if k in options})
    _check_es_args(estimator_kwargs["sigma"], estimator_kwargs["num_samples"], **options)
  elif estimate is forward_gradient and "num_directions" in estimator_kwargs:
    _checks.check_int("num_directions", estimator_kwargs["num_directions"], minimum=1)
  typed = _random.as_key(key)
  impl = jax.random.key_impl(typed)

  def init_fn(params):
    del params
    return ZerothOrderState(jnp.zeros((), jnp.int32), jax.random.key_data(typed))

  def update_fn(updates, state, params=None, *, loss_fn=None, **extra_args):
    del extra_args
    if loss_fn is None:
      raise ValueError("zeroth_order needs the objective: call update(updates, state, "
                       "params, loss_fn=loss_fn) with loss_fn(params) -> scalar")
    if params is None:
      raise ValueError("zeroth_order needs the params: call update(updates, state, params, "
                       "loss_fn=...)")
    next_key, step_key = _random.split_state_key(state.rng_key, impl)
    grads = estimate(loss_fn, params, step_key, **estimator_kwargs)
    grads = jax.tree.map(lambda g, u: g.astype(jnp.result_type(u)), grads, updates)
    return grads, ZerothOrderState(optax.safe_increment(state.count), next_key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
