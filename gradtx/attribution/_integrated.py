r"""Integrated Gradients and Expected Gradients: attributions that add up to the output.

Integrated Gradients (IG) attributes the change of a model's output between a baseline
``x'`` and the input ``x`` to the input's features by integrating the gradient along the
straight path between them:

.. math::
  \mathrm{IG}_i(x) = (x_i - x'_i) \int_0^1 \partial_i F\big(x' + \alpha (x - x')\big)\,
    d\alpha \approx (x_i - x'_i) \sum_{k=1}^{n} w_k\, \partial_i F\big(x' + \alpha_k (x - x')\big)

By the fundamental theorem of calculus the attributions are *complete*:
``Σ_i IG_i(x) = F(x) - F(x')``; the quadrature error shows up as the completeness
delta. Gauss–Legendre nodes make the rule exact for polynomials of degree 2n - 1 in α,
so it reaches a given delta with far fewer steps than the Riemann rules. Every rule here
has weights that sum to exactly 1 (unlike Captum's ``riemann_trapezoid``, whose weights
sum to (n - 1)/n), so IG of a linear model is exact for every method and step count.

Expected Gradients (EG) replaces the single baseline by baselines drawn from data and
the integral by a Monte-Carlo draw of α:
``EG_i(x) = E_{x' ~ D, α ~ U(0, 1)}[(x_i - x'_i) ∂_i F(x' + α (x - x'))]``.

The interpolation points run vectorised (``vmap``) in chunks of ``batch_size`` inside a
``lax.scan``, so memory grows with ``batch_size``, not with ``steps``; the whole call is
jittable.

References:
  Sundararajan, Taly, Yan, "Axiomatic attribution for deep networks", ICML 2017,
  arXiv:1703.01365 (Integrated Gradients).
  Erion, Janizek, Sturmfels, Lundberg, Lee, "Improving performance of deep learning
  models with axiomatic attribution priors and expected gradients", Nature Machine
  Intelligence 2021, arXiv:1906.10670 (Expected Gradients).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import PyTreeDef
from jax.typing import ArrayLike

from gradtx import _checks, _chunking, _paths, _random
from gradtx.attribution import _affine_prefix

METHODS = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)


def _quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Nodes ``α_k`` in [0, 1] and weights ``w_k`` (summing to 1), float64 numpy arrays."""
  n = steps
  if method == "riemann_left":
    return np.arange(n) / n, np.full(n, 1.0 / n)
  if method == "riemann_right":
    return np.arange(1, n + 1) / n, np.full(n, 1.0 / n)
  if method == "riemann_middle":
    return (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)
  if method == "riemann_trapezoid":
    weights = np.full(n, 1.0 / (n - 1))
    weights[[0, -1]] *= 0.5
    return np.linspace(0.0, 1.0, n), weights
  nodes, weights = np.polynomial.legendre.leggauss(n)
  return (nodes + 1.0) / 2.0, weights / 2.0


_NO_METHOD = object()  # check_options: the function has no quadrature rule to choose


def _check_batch_size(batch_size: Any, name: str = "batch_size") -> None:
  if batch_size is not None:
    _checks.check_static(name, batch_size)
    _checks.check_int(name, batch_size, minimum=1)


def check_options(steps: Any, return_delta: Any, *, method: Any = _NO_METHOD,
                  **sizes: Any) -> None:
  """The options every path method shares, checked in Python.

  ``steps`` a static int >= 1 (>= 2 for ``method='riemann_trapezoid'``), ``method`` one of
  :data:`METHODS` when the function has one, every chunk size in ``sizes`` (named by its
  keyword) ``None`` or a static int >= 1, and ``return_delta`` a bool.
  """
  _checks.check_static("steps", steps)
  _checks.check_int("steps", steps, minimum=1)
  if method is not _NO_METHOD:
    _checks.check_choice("method", method, METHODS)
    if method == "riemann_trapezoid" and steps < 2:
      raise ValueError(
          f"steps must be an int >= 2 for method='riemann_trapezoid' (it evaluates both "
          f"ends of the path), got {steps!r}"
      )
  for name, size in sizes.items():
    _check_batch_size(size, name)
  _checks.check_bool("return_delta", return_delta)


def _name(argname: str, path: str) -> str:
  return f"{argname}[{path!r}]" if path else argname


def _check_inputs(inputs: Any) -> tuple[list[str], list[jax.Array], Any, int]:
  """Paths, leaves, treedef and the common batch size of a floating-point ``inputs``."""
  paths, treedef = _paths.leaf_paths_and_treedef(inputs)
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError("inputs must hold at least one array, got an empty pytree")
  try:
    _checks.check_float_leaves("inputs", inputs)
  except TypeError as error:
    raise TypeError(
        f"{error} Attributions need floating-point inputs (they are interpolated and "
        f"differentiated); attribute integer inputs such as token ids at their embedding "
        f"with layer_integrated_gradients.") from None
  batch = _checks.common_leading_size(
      "inputs", [(_name("inputs", p), x) for p, x in zip(paths, leaves, strict=True)])
  return paths, leaves, treedef, batch


def _output_shape(fn: Any, inputs: Any) -> tuple[int, ...]:
  """The shape of ``fn(inputs)``, which must be one floating-point array."""
  _checks.check_callable("fn", fn, call="fn(inputs) -> (N,) or (N, C) outputs")
  out = jax.eval_shape(fn, inputs)
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise TypeError(f"fn must return one array of shape (N,) or (N, C), got the pytree "
                    f"{jax.tree.structure(out)}")
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(f"fn must return real floating-point outputs (they are "
                    f"differentiated), got dtype {out.dtype}")
  return tuple(out.shape)


def _broadcasts(shape: tuple[int, ...], to: tuple[int, ...]) -> bool:
  try:
    return np.broadcast_shapes(shape, to) == to
  except ValueError:
    return False


def resolve_baseline(baseline: Any, paths: Sequence[str], leaves: Sequence[jax.Array],
                     treedef: PyTreeDef, *, argname: str = "baseline",
                     of: str = "inputs") -> list[jax.Array]:
  """Per-leaf baselines broadcast to each leaf's full (N, ...) shape (``of`` names them)."""
  if baseline is None:
    return [jnp.zeros_like(x) for x in leaves]
  _checks.check_same_structure(argname, baseline, of, jax.tree.unflatten(treedef, leaves),
                               shapes=False)
  out = []
  for path, x, b in zip(paths, leaves, jax.tree.leaves(baseline), strict=True):
    b = jnp.asarray(b)
    if b.shape != x.shape and not _broadcasts(b.shape, x.shape[1:]):
      raise ValueError(
          f"{_name(argname, path)} must have the per-example shape {x.shape[1:]} of "
          f"{of} (or a shape that broadcasts to it, e.g. a scalar), or one per example "
          f"{x.shape}, got shape {b.shape}")
    if jnp.issubdtype(b.dtype, jnp.inexact) and not jnp.issubdtype(x.dtype, jnp.inexact):
      raise TypeError(
          f"{_name(argname, path)} must hold {x.dtype} values like {of} (token ids are "
          f"not interpolated, a float would be truncated), got dtype {b.dtype}; for a zero "
          f"embedding pass layer_baseline=0.0")
    out.append(jnp.broadcast_to(b.astype(x.dtype), x.shape))
  return out


def _check_target(target: Any, out_shape: tuple[int, ...],
                  batch: int) -> tuple[int | jax.Array | None, jax.Array | None]:
  """``target`` checked against ``fn``'s output shape, as an int or array, and its bad rows.

  A traced target cannot be checked in Python: the second value is then the (N,) mask of
  examples whose target is outside [0, C), which :func:`_nan_rows` makes visible (NaN);
  for a concrete target it is ``None`` (an out-of-range value raises here).
  """
  if len(out_shape) == 1 and out_shape[0] == batch:
    if target is not None:
      raise ValueError(
          f"target must be None when fn returns one scalar per example (shape "
          f"{out_shape}), got {target!r}")
    return None, None
  if len(out_shape) != 2 or out_shape[0] != batch:
    raise ValueError(
        f"fn must map a batch of {batch} examples to shape ({batch},) or ({batch}, C), "
        f"got output shape {out_shape}")
  num_classes = out_shape[1]
  if target is None:
    raise ValueError(
        f"fn returns {num_classes} outputs per example (shape {out_shape}), not a scalar: "
        f"pass target (an int in [0, {num_classes}), or one per example) to choose one")
  if isinstance(target, jax.core.Tracer):
    if target.shape not in ((), (batch,)):
      raise ValueError(f"target must be an int or have shape ({batch},), got {target.shape}")
    if not jnp.issubdtype(target.dtype, jnp.integer):
      raise TypeError(f"target must be an integer array, got dtype {target.dtype}")
    bad = (target < 0) | (target >= num_classes)
    return target, jnp.broadcast_to(bad, (batch,))
  arr = np.asarray(target)
  if arr.shape not in ((), (batch,)) or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
        f"target must be an int or an integer array of shape ({batch},), got {target!r}")
  out_of_range = (arr < 0) | (arr >= num_classes)
  if np.any(out_of_range):
    raise ValueError(
        f"target must be in [0, {num_classes}) (fn returns {num_classes} outputs per "
        f"example), got {arr[out_of_range].tolist() if arr.ndim else int(arr)}")
  return (int(arr) if arr.ndim == 0 else jnp.asarray(arr)), None


def _nan_rows(bad: jax.Array | None, arrays: list[jax.Array]) -> list[jax.Array]:
  """NaN in every row (example) of ``arrays`` that ``bad`` marks; as is without a mask."""
  if bad is None:
    return arrays
  return [jnp.where(bad.reshape(bad.shape + (1,) * (a.ndim - 1)), jnp.nan, a) for a in arrays]


def _scalar_fn(fn: Callable[[Any], jax.Array], treedef: PyTreeDef,
               target: int | jax.Array | None) -> Callable[[list[jax.Array]], jax.Array]:
  """Maps a list of leaves to the per-example scalar outputs, shape (N,)."""

  def scalar(leaves: list[jax.Array]) -> jax.Array:
    out = fn(jax.tree.unflatten(treedef, leaves))
    if target is None:
      return out
    if isinstance(target, int):
      return out[:, target]
    return jnp.take_along_axis(out, target.astype(jnp.int32)[:, None], axis=1)[:, 0]

  return scalar


class Checked(NamedTuple):
  """``inputs`` and ``target`` checked against ``fn``: what every gradient method needs."""

  paths: list[str]
  leaves: list[jax.Array]
  treedef: PyTreeDef
  batch: int
  scalar: Callable[[list[jax.Array]], jax.Array]  # list of leaves -> (N,) target outputs
  bad_target: jax.Array | None  # (N,) examples whose traced target is out of range


def prepare(fn: Callable[[Any], jax.Array], inputs: Any, target: ArrayLike | None) -> Checked:
  """Checks ``inputs`` (floating, sharing N), ``fn``'s output and ``target``."""
  paths, leaves, treedef, batch = _check_inputs(inputs)
  target, bad_target = _check_target(target, _output_shape(fn, inputs), batch)
  return Checked(paths, leaves, treedef, batch, _scalar_fn(fn, treedef, target), bad_target)


def prepare_path(fn: Callable[[Any], jax.Array], inputs: Any, target: ArrayLike | None,
                 baseline: Any) -> tuple[Checked, list[jax.Array]]:
  """:func:`prepare`, and the baseline of every leaf at its full (N, ...) shape."""
  checked = prepare(fn, inputs, target)
  return checked, resolve_baseline(baseline, checked.paths, checked.leaves, checked.treedef)


def _sum_over_steps(step_fn: Callable, step_args: Any, num_steps: int,
                    batch_size: int | None) -> Any:
  """``Σ_k step_fn(step_args[k])``, vmapped over at most ``batch_size`` steps at once."""
  vstep = jax.vmap(step_fn)
  chunk_sum = lambda args: jax.tree.map(lambda g: jnp.sum(g, axis=0), vstep(args))
  return _chunking.sum_chunks(chunk_sum, step_args, min(batch_size or num_steps, num_steps))


def _path_gradient(scalar: Callable[[list[jax.Array]], jax.Array], start: list[jax.Array],
                   diffs: list[jax.Array], *, steps: int, method: str,
                   batch_size: int | None, node_dtype: Any) -> list[jax.Array]:
  """``Σ_k w_k ∇ Σ_n scalar(start + α_k diffs)_n`` over the nodes of ``method``."""
  grad = jax.grad(lambda z: jnp.sum(scalar(z)))
  alphas, weights = _quadrature(method, steps)

  def at(alpha):
    return grad([s + alpha.astype(s.dtype) * d for s, d in zip(start, diffs, strict=True)])

  def chunk_sum(args):
    # The weighted sum over the chunk's steps as a contraction, not a weighted
    # jnp.sum(axis=0): XLA:CPU runs it as a dot product, faster than that reduction.
    alpha, weight = args
    return [jnp.tensordot(weight.astype(g.dtype), g, axes=1) for g in jax.vmap(at)(alpha)]

  step_args = (jnp.asarray(alphas, node_dtype), jnp.asarray(weights, node_dtype))
  return _chunking.sum_chunks(chunk_sum, step_args, min(batch_size or steps, steps))


def _check_baselines(baselines: Any, paths: Sequence[str], leaves: Sequence[jax.Array],
                     treedef: PyTreeDef) -> list[jax.Array]:
  """Expected Gradients' reference data: per leaf a batch (M, ...) with a common M >= 1."""
  if baselines is None:
    raise TypeError("baselines must be the reference data (with the structure of inputs, "
                    "every leaf a batch (M, ...)), got None")
  _checks.check_same_structure("baselines", baselines, "inputs",
                               jax.tree.unflatten(treedef, leaves), shapes=False)
  data = [jnp.asarray(b) for b in jax.tree.leaves(baselines)]
  for path, x, b in zip(paths, leaves, data, strict=True):
    if b.ndim != x.ndim or b.shape[1:] != x.shape[1:] or b.shape[0] < 1:
      raise ValueError(
          f"{_name('baselines', path)} must be a batch (M, ...) of the input's "
          f"per-example shape {x.shape[1:]}, got shape {b.shape}")
  _checks.common_leading_size(
      "baselines", [(_name("baselines", p), b) for p, b in zip(paths, data, strict=True)],
      what="number of rows M")
  return [b.astype(x.dtype) for x, b in zip(leaves, data, strict=True)]


def _expand(a: jax.Array, x: jax.Array) -> jax.Array:
  """A per-example (N,) array shaped to broadcast against the batch ``x``."""
  return a.astype(x.dtype).reshape(a.shape + (1,) * (x.ndim - 1))


def integrated_gradients(
    fn: Callable[[Any], jax.Array],
    inputs: Any,
    *,
    baseline: Any = None,
    steps: int = 50,
    method: str = "gausslegendre",
    batch_size: int | None = None,
    target: ArrayLike | None = None,
    return_delta: bool = False,
    hoist_affine: bool = True,
) -> Any:
  r"""Integrated Gradients of ``fn`` for every example of a batch.

  .. math::
    \mathrm{IG}(x) = (x - x') \odot \sum_{k=1}^{n} w_k\,
      \nabla F\big(x' + \alpha_k (x - x')\big), \qquad
    \delta = \sum_i \mathrm{IG}_i(x) - \big(F(x) - F(x')\big)

  with nodes ``α_k`` and weights ``w_k`` (summing to 1) from ``method``:
  ``riemann_left`` ``k/n`` (k = 0..n-1), ``riemann_right`` ``k/n`` (k = 1..n),
  ``riemann_middle`` ``(k + ½)/n``, all weighted ``1/n``; ``riemann_trapezoid`` n
  equally spaced nodes including 0 and 1, weighted ``1/(n-1)`` (halved at the ends);
  ``gausslegendre`` the Gauss–Legendre rule of ``numpy.polynomial.legendre.leggauss``
  mapped to [0, 1].

  ``fn`` must treat examples independently (no batch statistics): the gradient of the
  summed outputs is then every example's own gradient.

  When ``fn`` starts with layers that are affine in its inputs, ``F = S ∘ A`` with
  ``A(x) = Lx + c`` (a convolution or dense layer, its bias, reshapes), those layers
  run once per example rather than once per step (``hoist_affine``): on the straight
  line ``A(x_k) = A(x') + α_k (A(x) - A(x'))`` and
  ``Σ_k w_k ∇F(x_k) = Lᵀ Σ_k w_k ∇S(A(x_k))``, the same sum rearranged. They are found
  in ``fn``'s jaxpr (matrix products and convolutions whose other operand does not
  depend on the inputs, with sums, reshapes, slices and casts around them); a ``fn``
  without one is evaluated as is. Sharding: inputs sharded over
  examples (``jit`` or ``jax.shard_map``) give the one-device result. On a mesh with
  *Explicit* axes (``jax.make_mesh``'s default), convolutions need ``batch_size=1``:
  their batching rule would fold several vmapped steps into the sharded batch axis.

  Args:
    fn: maps a batch (the structure of ``inputs``, leading axis N) to one scalar per
      example, shape (N,), or to (N, C) outputs from which ``target`` picks one.
    inputs: a floating-point batch (N, ...), or a pytree of such batches sharing N
      (a multi-input model).
    baseline: ``x'``. ``None`` = zeros; else, with the structure of ``inputs``, per
      leaf an array of the per-example shape or one that broadcasts to it (shared by
      every example; a scalar), or of the full (N, ...) shape (one per example).
    steps: number of quadrature nodes n >= 1 (>= 2 for ``riemann_trapezoid``).
    method: ``"gausslegendre"`` (default), ``"riemann_left"``, ``"riemann_right"``,
      ``"riemann_middle"`` or ``"riemann_trapezoid"``.
    batch_size: how many interpolation points (each a whole batch of N examples) are
      evaluated at once; ``None`` = all ``steps``. Memory scales with it, not ``steps``.
    target: with (N, C) outputs, the output to attribute: an int, or one int per
      example (N,). Must be ``None`` for (N,) outputs. A concrete target outside
      [0, C) raises; a traced one (under ``jit``) cannot, so an example whose target is
      outside [0, C) gets NaN attributions (and a NaN delta) instead.
    return_delta: also return the per-example completeness delta ``δ`` (N,).
    hoist_affine: evaluate ``fn``'s leading affine layers once per example instead of
      once per step (above); ``False`` evaluates ``fn`` at every point as is. Both
      give the same attributions up to float rounding.

  Returns:
    Attributions with the structure, shapes and dtypes of ``inputs``; with
    ``return_delta``, the pair ``(attributions, delta)``.

  Example:
    >>> import jax.numpy as jnp, gradtx
    >>> w = jnp.array([1.0, -2.0, 3.0])
    >>> fn = lambda x: jnp.tanh(x) @ w
    >>> x = jnp.array([[0.5, 1.0, -1.0]])
    >>> attr, delta = gradtx.integrated_gradients(fn, x, steps=16, return_delta=True)
    >>> bool(jnp.allclose(attr.sum(), fn(x)[0] - fn(jnp.zeros_like(x))[0]))
    True
    >>> bool(abs(delta[0]) < 1e-5)
    True

  References:
    Sundararajan, Taly, Yan, "Axiomatic attribution for deep networks", ICML 2017,
    arXiv:1703.01365.
  """
  check_options(steps, return_delta, method=method, batch_size=batch_size)
  _checks.check_bool("hoist_affine", hoist_affine)
  checked, base = prepare_path(fn, inputs, target, baseline)
  leaves, scalar, batch = checked.leaves, checked.scalar, checked.batch
  diffs = [x - b for x, b in zip(leaves, base, strict=True)]
  node_dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
  path = functools.partial(_path_gradient, steps=steps, method=method,
                           batch_size=batch_size, node_dtype=node_dtype)
  # With one or two steps the prefix would run as often hoisted as not.
  split = _affine_prefix.split(scalar, list(leaves)) if hoist_affine and steps > 2 else None
  if split is None:
    mean_grad = path(scalar, base, diffs)
  else:
    cut_base = split.prefix(base)
    cut_x, pull_back = jax.vjp(split.prefix, list(leaves))  # A is affine: Lᵀ anywhere
    cut_diffs = [a - b for a, b in zip(cut_x, cut_base, strict=True)]
    mean_grad = pull_back(path(split.suffix, cut_base, cut_diffs))[0]
  attrs = _nan_rows(checked.bad_target,
                    [d * g for d, g in zip(diffs, mean_grad, strict=True)])
  result = jax.tree.unflatten(checked.treedef, attrs)
  if not return_delta:
    return result
  total = sum(jnp.sum(a.reshape(batch, -1).astype(node_dtype), axis=1) for a in attrs)
  delta = total - (scalar(list(leaves)) - scalar(base))
  return result, delta


def expected_gradients(
    fn: Callable[[Any], jax.Array],
    inputs: Any,
    baselines: Any,
    *,
    key: jax.Array,
    samples: int,
    batch_size: int | None = None,
    target: ArrayLike | None = None,
) -> Any:
  r"""Expected Gradients: Integrated Gradients averaged over baselines drawn from data.

  For each example ``x`` and each of ``S = samples`` draws, a baseline ``x'_s`` is picked
  uniformly from the M rows of ``baselines`` and a point ``α_s ~ U(0, 1)`` on the path:

  .. math::
    \mathrm{EG}(x) = \frac{1}{S} \sum_{s=1}^{S} (x - x'_s) \odot
      \nabla F\big(x'_s + \alpha_s (x - x'_s)\big)

  an unbiased estimate of ``E_{x' ~ D}[IG(x; x')]``, so ``E[Σ_i EG_i(x)] = F(x) -
  E_{x'}[F(x')]``. The draws are ``k_idx, k_alpha = jax.random.split(key)``,
  ``idx = jax.random.randint(k_idx, (S, N), 0, M)``,
  ``alpha = jax.random.uniform(k_alpha, (S, N))``: draw s of example n uses baseline
  row ``idx[s, n]`` and ``alpha[s, n]``. Same key, same attributions.

  Args:
    fn: as in :func:`integrated_gradients`: a batch to (N,) or (N, C) outputs.
    inputs: a floating-point batch (N, ...) or a pytree of batches sharing N.
    baselines: the reference data: with the structure of ``inputs``, every leaf a batch
      (M, ...) with the input's per-example shape and a common M >= 1.
    key: a ``jax.random`` key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``).
    samples: number of draws S >= 1 per example.
    batch_size: how many draws (each a whole batch of N examples) are evaluated at
      once; ``None`` = all ``samples``.
    target: with (N, C) outputs, an int or one int per example (a traced target
      outside [0, C) gives that example NaN attributions, as in
      :func:`integrated_gradients`).

  Returns:
    Attributions with the structure, shapes and dtypes of ``inputs``.

  Example:
    >>> import jax, jax.numpy as jnp, gradtx
    >>> w = jnp.array([1.0, -2.0])
    >>> x = jnp.array([[1.0, 1.0]])
    >>> data = jnp.array([[0.0, 0.0], [2.0, 0.0]])
    >>> attr = gradtx.expected_gradients(lambda z: z @ w, x, data,
    ...                                  key=jax.random.key(0), samples=4)
    >>> attr.shape
    (1, 2)

  References:
    Erion, Janizek, Sturmfels, Lundberg, Lee, "Improving performance of deep learning
    models with axiomatic attribution priors and expected gradients", Nature Machine
    Intelligence 2021, arXiv:1906.10670.
  """
  _checks.check_static("samples", samples)
  _checks.check_int("samples", samples, minimum=1)
  _check_batch_size(batch_size)
  key = _random.as_key(key, argname="key")
  paths, leaves, treedef, batch = _check_inputs(inputs)
  data = _check_baselines(baselines, paths, leaves, treedef)
  target, bad_target = _check_target(target, _output_shape(fn, inputs), batch)
  scalar = _scalar_fn(fn, treedef, target)
  grad = jax.grad(lambda z: jnp.sum(scalar(z)))

  k_idx, k_alpha = jax.random.split(key)
  idx = jax.random.randint(k_idx, (samples, batch), 0, data[0].shape[0])
  alpha = jax.random.uniform(k_alpha, (samples, batch))

  def step(args):
    rows, a = args
    base = [jnp.take(b, rows, axis=0) for b in data]
    diffs = [x - b for x, b in zip(leaves, base, strict=True)]
    point = [b + _expand(a, b) * d for b, d in zip(base, diffs, strict=True)]
    return [d * g / samples for d, g in zip(diffs, grad(point), strict=True)]

  attrs = _sum_over_steps(step, (idx, alpha), samples, batch_size)
  return jax.tree.unflatten(treedef, _nan_rows(bad_target, attrs))
