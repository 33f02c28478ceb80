r"""Evolution strategies and SPSA: :func:`es_gradient`, its options and its strategies.

One estimate is two pieces: the population's fitness ``f(θ + sσε_j)`` and the weighted
sum of the noise ``Σ_j c_j ε_j``. A strategy computes both for a share of the draws:

- *all at once* (the default): the population's noise is drawn once and vmapped, for the
  fitness and the sum; when the leaves fit one flat vector the fitness runs on slices of
  one flat population (:func:`_flat_fitness`);
- *in chunks* (``batch_size``; ``lean=True`` is chunks of one): ``chunk`` draws live at a
  time (:mod:`gradtx._chunking`) and the sum regenerates their noise from the key;
- *on a mesh*: each device runs one of the above on its share of the draws; the fitness
  is all-gathered so that shaping and baselines see the whole population.

Every draw's noise depends only on the key, its index and the leaf's path, so every
strategy gives the same estimate for the same key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gradtx import _checks, _chunking, _numerics, _paths, _random
from gradtx.estimators import _common, _noise

SHAPINGS = (None, "centered_rank", "standardize")
BASELINES = ("f0", "mean", None)


@dataclasses.dataclass(frozen=True)
class ESOptions:
  """The options of :func:`es_gradient`, checked when built; the one place their defaults live.

  :func:`es_gradient` and ``gradtx.zeroth_order("es", ...)`` both build one, so both
  check the same things and share these defaults. The attributes are
  :func:`es_gradient`'s keyword arguments.
  """

  sigma: Any
  num_samples: int
  antithetic: bool = True
  noise: str = "gaussian"
  shaping: str | None = None
  baseline: str | None = "f0"
  batch_size: int | None = None
  lean: bool = False
  mesh: jax.sharding.Mesh | None = None
  axis_name: str | None = None
  mask: Any = None
  rank: int | None = None
  subspace_key: Any = None

  def __post_init__(self):
    _checks.check_positive("sigma", self.sigma, allow_schedule=False)
    for name in ("num_samples", "batch_size"):  # shapes and loop lengths
      _checks.check_static(name, getattr(self, name))
    _checks.check_int("num_samples", self.num_samples, minimum=1)
    _checks.check_bool("antithetic", self.antithetic)
    _checks.check_bool("lean", self.lean)
    if self.antithetic and int(self.num_samples) % 2:
      raise ValueError(f"num_samples must be even with antithetic=True (mirrored pairs "
                       f"±ε), got {self.num_samples!r}")
    _checks.check_choice("noise", self.noise, _common.NOISES)
    _checks.check_choice("shaping", self.shaping, SHAPINGS)
    _checks.check_choice("baseline", self.baseline, BASELINES)
    if (self.baseline == "mean" and int(self.num_samples) < 2 and self.shaping is None
        and not self.antithetic):
      raise ValueError("baseline='mean' needs num_samples >= 2 (a leave-one-out mean)")
    if self.batch_size is not None:
      _checks.check_int("batch_size", self.batch_size, minimum=1)
    if self.rank is not None:
      _checks.check_static("rank", self.rank)
      _checks.check_int("rank", self.rank, minimum=1)
    if self.mesh is not None or self.axis_name is not None:
      self._check_mesh()

  def _check_mesh(self):
    if (self.mesh is None) != (self.axis_name is None):
      raise ValueError("pass both mesh and axis_name (the population's mesh axis), or "
                       f"neither; got mesh={self.mesh!r}, axis_name={self.axis_name!r}")
    assert self.mesh is not None  # both are given (checked just above)
    if self.axis_name not in self.mesh.axis_names:
      raise ValueError(f"axis_name must be an axis of mesh {tuple(self.mesh.axis_names)}, "
                       f"got {self.axis_name!r}")
    devices = self.mesh.shape[self.axis_name]
    if self.draws % devices:
      raise ValueError(f"the number of noise draws ({self.draws}: num_samples, halved "
                       f"when antithetic) must be divisible by the {devices} devices of "
                       f"mesh axis {self.axis_name!r}")

  @property
  def draws(self) -> int:
    """The number of noise draws: N, or N/2 mirrored pairs."""
    return int(self.num_samples) // 2 if self.antithetic else int(self.num_samples)

  @property
  def signs(self) -> tuple[float, ...]:
    return (1.0, -1.0) if self.antithetic else (1.0,)

  def estimate(self, fn: Callable[[Any], jax.Array], params: Any, key: jax.Array) -> Any:
    """The ES estimate of ``∇ fn`` at ``params`` with these options (:func:`es_gradient`)."""
    return _estimate(self, fn, params, key)


def es_gradient(
    fn: Callable[[Any], jax.Array],
    params: Any,
    key: jax.Array,
    *,
    sigma: float,
    num_samples: int,
    antithetic: bool = ESOptions.antithetic,
    noise: str = ESOptions.noise,
    shaping: str | None = ESOptions.shaping,
    baseline: str | None = ESOptions.baseline,
    batch_size: int | None = ESOptions.batch_size,
    lean: bool = ESOptions.lean,
    mesh: jax.sharding.Mesh | None = ESOptions.mesh,
    axis_name: str | None = ESOptions.axis_name,
    mask: Any = ESOptions.mask,
    rank: int | None = ESOptions.rank,
    subspace_key: jax.Array | None = ESOptions.subspace_key,
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
  Within a leaf, entry ``k`` (row-major) is a counter hash of ``k``,
  ``h_k = T(T(k (s_1 | 1) + s_0) ⊕ s_1)`` with Wellons' ``triple32`` mixer ``T`` and
  ``(s_0, s_1) = jax.random.bits(leaf_key, (2,))``, mapped to a Gaussian by
  ``jax.random.normal``'s transform (``√2 erfinv`` of a uniform on (-1, 1) from 23 bits,
  in float32) or to ``±1`` by its top bit: no generator state, so XLA fuses the draw into
  ``θ + σε`` and never materialises the noise where it is used once.

  The perturbed members ``θ + sσε`` are rounded to each leaf's dtype before ``fn`` sees
  them. ``σ`` must be at least the spacing of that dtype at every ``|θ_k|``
  (``jnp.spacing``; for bfloat16 ``|θ| ≈ 1`` that is 2⁻⁷ ≈ 0.0078), else the perturbation
  rounds away and the estimate would be a fraction of the gradient: with concrete
  ``params`` and ``sigma`` that is a ``ValueError`` naming the leaf and the spacing; under
  ``jit`` those coordinates of the estimate are NaN.

  Args:
    fn: ``fn(params) -> scalar`` (need not be differentiable).
    params: the point ``θ``, any pytree of float arrays.
    key: a ``jax.random`` key.
    sigma: the smoothing scale ``σ`` > 0 (a number, or an array inside ``jit``, e.g.
      injected by ``optax.inject_hyperparams``).
    num_samples: the population size N (function evaluations, ``f0`` aside); static.
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
    mask: perturb only where ``mask`` is True (Sparse MeZO): a boolean pytree like
      ``params`` (a scalar bool per leaf, or an array of the leaf's shape), or a rule
      ``mask(params) -> boolean pytree`` such as :func:`gradtx.magnitude_mask`; a
      ``gradtx.fisher_mask`` works as is. Entries outside the mask get a zero estimate; a
      leaf whose mask is ``False`` draws no noise at all.
    rank: draw matrix leaves (two or more axes, the last one ``n``) as ``ε = U Vᵀ/√r``
      (LOZO); ``None`` = dense. At most every matrix leaf's ``min(m, n)``.
    subspace_key: the key of the ``V`` factors with ``rank`` (keep it for several steps
      for LOZO's lazy subspace); ``None`` = a fresh ``V`` from each member's key.

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
    Salimans, Ho, Chen, Sidor, Sutskever, "Evolution strategies as a scalable
    alternative to reinforcement learning", 2017, arXiv:1703.03864. Spall, "Multivariate
    stochastic approximation using a simultaneous perturbation gradient approximation",
    IEEE TAC 37(3), 1992 (SPSA). Malladi et al., "Fine-tuning language models with just
    forward passes", 2023, arXiv:2305.17333 (MeZO).
  """
  options = ESOptions(sigma=sigma, num_samples=num_samples, antithetic=antithetic,
                      noise=noise, shaping=shaping, baseline=baseline,
                      batch_size=batch_size, lean=lean, mesh=mesh, axis_name=axis_name,
                      mask=mask, rank=rank, subspace_key=subspace_key)
  return options.estimate(fn, params, key)


class _Member(NamedTuple):
  """A population member's pieces: its noise from its index, its fitness at ``θ + sσε``."""

  fn: Callable[[Any], jax.Array]
  params: Any
  key: jax.Array
  noise: str
  steps: jax.Array  # (S,): s·σ for each sign s
  shape: Any = None  # _noise.Shaping: mask, rank
  sequential: bool = False  # the signs one after the other (lean)

  def noise_of(self, index: jax.Array) -> Any:
    return _common.member_noise(self.key, index, self.params, self.noise, self.shape)

  def value_at(self, step: jax.Array, eps: Any) -> jax.Array:
    """``f(θ + step·ε)``, the member rounded to each leaf's dtype, as float32."""
    perturbed = jax.tree.map(lambda p, e: (p.astype(e.dtype) + step * e).astype(p.dtype),
                             self.params, eps)
    return _common.scalar_output("fn", self.fn(perturbed)).astype(jnp.float32)

  def fitness_at(self, eps: Any) -> jax.Array:
    """``[f(θ + sσε) for each sign s]``, shape (S,), as one vectorised evaluation."""
    return jax.vmap(lambda step: self.value_at(step, eps))(self.steps)

  def fitness(self, index: jax.Array) -> jax.Array:
    if self.sequential:
      # One perturbed copy at a time, its noise regenerated (and fused) for each sign.
      return jax.lax.map(lambda step: self.value_at(step, self.noise_of(index)), self.steps)
    return self.fitness_at(self.noise_of(index))


class _Strategy(NamedTuple):
  """How a share of the draws is evaluated: its fitness, then its weighted noise."""

  fitness: Callable[[], jax.Array]  # () -> (draws, S)
  noise_sum: Callable[[jax.Array], Any]  # c (draws,) -> Σ_j c_j ε_j


def _strategy(options: ESOptions, member: _Member, indices: jax.Array) -> _Strategy:
  chunk = 1 if options.lean else options.batch_size
  if chunk is not None and chunk < indices.shape[0]:
    return _chunked(member, indices, chunk)
  return _vmapped(member, indices)


def _contract(c: jax.Array, eps: Any) -> Any:
  """``Σ_j c_j ε_j`` for a stacked noise ``eps`` (leading axis j)."""
  return jax.tree.map(lambda e: jnp.tensordot(c.astype(e.dtype), e, axes=1), eps)


def _vmapped(member: _Member, indices: jax.Array) -> _Strategy:
  """Every draw at once: the noise is drawn once, for the fitness and for the sum."""
  eps = jax.vmap(member.noise_of)(indices)

  def fitness():
    if _flattenable(member.params):
      return _flat_fitness(member, eps)
    # axis_size: an empty tree has no leaf to vmap over.
    return jax.vmap(member.fitness_at, axis_size=indices.shape[0])(eps)

  return _Strategy(fitness, lambda c: _contract(c, eps))


def _chunked(member: _Member, indices: jax.Array, chunk: int) -> _Strategy:
  """``chunk`` draws at a time; the sum regenerates each chunk's noise from the key."""
  def chunk_sum(jc):
    j, c = jc
    return _contract(c, jax.vmap(member.noise_of)(j))

  return _Strategy(
      lambda: _chunking.map_chunks(jax.vmap(member.fitness), indices, chunk),
      lambda c: _chunking.sum_chunks(chunk_sum, (indices, c), chunk))


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


def _flat_fitness(member: _Member, eps: Any) -> jax.Array:
  """``member.fitness_at`` for every draw, on the leaves raveled into one vector.

  The same perturbed values (the same :meth:`_Member.fitness_at` on a one-leaf tree),
  built as one (draws, S, D) population whose slices are the leaves: XLA:CPU runs a
  vectorised model faster this way than on per-leaf perturbations (measured by
  ``benchmarks/zeroth_order.py``; see ``benchmarks/results/zeroth_order.md``).
  """
  flat, unravel = ravel_pytree(member.params)
  flat_eps = jax.vmap(lambda e: ravel_pytree(e)[0])(eps)
  fn = member.fn
  flat_member = member._replace(fn=lambda x: fn(unravel(x)), params=flat)
  return jax.vmap(flat_member.fitness_at)(flat_eps)


def _resolution_masks(params: Any, sigma: Any) -> Any | None:
  """Where ``σ`` is at least the spacing of each leaf's dtype at ``|θ|``, or ``None``.

  Concrete ``params`` and ``sigma`` are checked in numpy (no device work): ``None`` if
  ``σ`` resolves every coordinate, else an error naming ``sigma``, the leaf and the
  spacing. Under ``jit`` the masks are returned, for the caller to put NaN where the
  perturbation would round away.
  """
  paths, treedef = _paths.leaf_paths_and_treedef(params)
  leaves = jax.tree.leaves(params)
  if any(isinstance(x, jax.core.Tracer) for x in [sigma, *leaves]):
    return jax.tree.unflatten(treedef, [
        jnp.spacing(jnp.abs(p)).astype(_numerics.compute_dtype(p)) <= sigma for p in leaves])
  for path, leaf in zip(paths, leaves, strict=True):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and leaf.size:
      # Sharded over other processes' devices too: the spacing grows with |θ|, so the
      # largest |θ| decides; a global reduction every process reads whole.
      leaf = jnp.max(jnp.abs(leaf))
    magnitude = np.abs(np.asarray(leaf)).reshape(-1)
    spacing = np.spacing(magnitude).astype(np.float64)
    if spacing.size and spacing.max() > float(sigma):
      worst = int(np.argmax(spacing))
      raise ValueError(
          f"sigma={float(sigma):g} is below the resolution of params leaf "
          f"{path or '<root>'!r} ({jnp.result_type(leaf)}: spacing {spacing[worst]:g} at "
          f"|θ| = {float(magnitude[worst]):g}); the perturbation σε would round away and "
          f"the estimate would be a fraction of the gradient. Use sigma >= "
          f"{spacing[worst]:g}, or a wider dtype for this leaf")
  return None


def _estimate(options: ESOptions, fn: Callable[[Any], jax.Array], params: Any,
              key: Any) -> Any:
  _checks.check_callable("fn", fn, call="fn(params) -> scalar")
  key = _common.check_inputs(params, key)
  # A Python number stays one (folded into the program); a traced sigma (e.g. under
  # optax.inject_hyperparams) is used as an array.
  sigma = options.sigma
  sigma = float(sigma) if isinstance(sigma, (int, float)) else jnp.asarray(sigma, jnp.float32)
  resolved = _resolution_masks(params, sigma)
  subspace_key = (None if options.subspace_key is None
                  else _random.as_key(options.subspace_key, argname="subspace_key"))
  shape = _noise.shaping(params, mask=options.mask, rank=options.rank,
                         subspace_key=subspace_key)
  signs = np.array(options.signs, np.float32)  # a constant, not an array of the mesh
  # Mirrored pairs cancel any constant baseline; shaping replaces it.
  baseline = None if options.antithetic or options.shaping is not None else options.baseline
  f0 = (_common.scalar_output("fn", fn(params)).astype(jnp.float32)
        if baseline == "f0" else None)
  # Every array the population needs, passed (never closed over) into a shard_map.
  arrays = (params, key, jnp.asarray(signs) * sigma, f0, shape.arrays)

  def coefficients(fitness, f0):
    """Per noise draw ``c_j = Σ_s s · w_{j,s}`` from the global (draws, signs) fitness."""
    w = _common.weights(fitness.reshape(-1), f0, options.shaping, baseline)
    return jnp.sum(w.reshape(fitness.shape) * signs, axis=1)

  def local_sum(indices, coefficients_of, arrays):
    """``Σ_j c_j ε_j`` over ``indices``; ``coefficients_of`` maps their fitness to ``c``."""
    params, key, steps, f0, shape_arrays = arrays
    member = _Member(fn, params, key, options.noise, steps, shape.with_arrays(shape_arrays),
                     options.lean)
    strategy = _strategy(options, member, indices)
    return strategy.noise_sum(coefficients_of(strategy.fitness(), f0))

  if options.mesh is None:
    total = local_sum(jnp.arange(options.draws, dtype=jnp.uint32), coefficients, arrays)
  else:
    total = _on_mesh(options, coefficients, local_sum, arrays)
  scale = int(options.num_samples) * sigma

  def finish(t, p, ok=None):
    g = (t / scale).astype(jnp.result_type(p))
    g = g if ok is None else jnp.where(ok, g, jnp.nan)
    # The population's noise is replicated; the estimate is laid out like the params.
    return _numerics.sharded_like(g, p)

  if resolved is None:
    return jax.tree.map(finish, total, params)
  return jax.tree.map(finish, total, params, resolved)


def _on_mesh(options: ESOptions, coefficients: Callable, local_sum: Callable,
             arrays: Any) -> Any:
  """``Σ_j c_j ε_j`` with the draws split over the mesh axis ``options.axis_name``.

  Each device evaluates its share with its own strategy; the fitness is all-gathered so
  that the weights (ranks, baselines) are those of the whole population. ``arrays``
  (params, key, steps, ...) enter ``shard_map`` as arguments, replicated: a ``shard_map``
  cannot close over arrays sharded on Explicit axes (created under ``jax.set_mesh``).
  """
  from jax.sharding import PartitionSpec as P

  mesh, axis_name = options.mesh, options.axis_name
  assert mesh is not None  # _on_mesh runs only with a mesh (ESOptions checks both)

  def local(indices, arrays):
    def mine(fitness, f0):
      everyone = jax.lax.all_gather(fitness, axis_name, tiled=True)
      start = jax.lax.axis_index(axis_name) * indices.shape[0]
      return jax.lax.dynamic_slice_in_dim(coefficients(everyone, f0), start,
                                          indices.shape[0])

    return jax.tree.map(lambda t: jax.lax.psum(t, axis_name), local_sum(indices, mine, arrays))

  indices = jnp.arange(options.draws, dtype=jnp.uint32)
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    # Sharding in types: the inputs must already be laid out as in_specs say.
    indices = jax.sharding.reshard(indices, jax.sharding.NamedSharding(mesh, P(axis_name)))
    arrays = jax.tree.map(
        lambda x: jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, P())), arrays)
  try:
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis_name), P()), out_specs=P(),
                         check_vma=False)(indices, arrays)
  except NotImplementedError as err:
    if "Closing over inputs to shard_map" not in str(err):
      raise
    raise ValueError(
        "es_gradient(..., mesh=...): fn closes over an array sharded on the mesh's "
        "Explicit axes (created under jax.set_mesh), which shard_map cannot close over. "
        "Create fn's data outside jax.set_mesh, or pass a mesh with Auto axes "
        "(jax.make_mesh(..., axis_types=(AxisType.Auto,)))") from err
