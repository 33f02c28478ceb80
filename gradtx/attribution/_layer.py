r"""Layer Integrated Gradients: attribute to the output of one layer of a Flax model.

A model ``F(x) = g(h(x))`` is cut at a layer ``h`` (named by its module path); the path
integral runs in the layer's output space, between ``h(x')`` and ``h(x)``:

.. math::
  \mathrm{LIG}(x) = \big(h(x) - h(x')\big) \odot \int_0^1 \nabla_h\, g\big(h(x') +
    \alpha\, (h(x) - h(x'))\big)\, d\alpha

This is how token attributions of a text model are computed: token ids are integers,
so the path runs through the token *embeddings*; summing over the embedding dimension
gives one score per token. The cut is made without touching the model's code: the
layer's ``__call__`` is intercepted while ``fn`` runs, once to record ``h`` and then to
return the interpolated value instead of computing it. Everything else in the model
sees the real inputs (so an attention mask built from token ids stays that of ``x``).

* Flax linen: through :func:`flax.linen.intercept_methods`; the layer path is the
  module's scope path inside ``apply`` joined by ``"/"`` (``"Embed_0"``,
  ``"encoder/layers_1/attn"``).
* Flax nnx: the layer object is found by its attribute path in the root ``model``
  (``"embed"``, ``"blocks/0/mlp"``; list indices are path parts) and, for the duration
  of the call, its ``__call__`` is intercepted (see ``_nnx_cut``).
* Scanned layers (``layer_index=``): one iteration of a linen ``nn.scan`` or an nnx
  ``nnx.scan`` over a stacked module, recognised by its slice of the stacked variables
  (``_scanned``).

References:
  Sundararajan, Taly, Yan, "Axiomatic attribution for deep networks", ICML 2017,
  arXiv:1703.01365.
  Captum's ``LayerIntegratedGradients`` (same definition, for PyTorch hooks).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from gradtx import _checks, _paths
from gradtx.attribution import _integrated, _scanned
from gradtx.attribution._integrated import _name, resolve_baseline

REDUCTIONS = (None, "sum")


def _path_str(parts: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in parts)


class _Cut:
  """What to do when the layer is called: record its output, or replace it.

  It also keeps the layer's variables inside the call (``inner``) and as the model holds
  them (``outer``), by which a scanned layer is recognised (``_scanned``).
  """

  def __init__(self, replacement: Any = None):
    self.replacement = replacement
    self.outputs: list[Any] = []
    self.outer: dict[str, Any] | None = None
    self.inner: dict[str, Any] | None = None

  @property
  def calls(self) -> int:
    """How many times the layer was called."""
    return len(self.outputs)

  def set_outer(self, outer: dict[str, Any]) -> None:
    self.outer = outer

  def __call__(self, compute: Callable[[], Any], variables: Callable[[], Any]) -> Any:
    self.inner = {p: jax.ShapeDtypeStruct(jnp.shape(v), v.dtype)
                  for p, v in _scanned.flat_variables(variables()).items()}
    if self.replacement is None:
      out = compute()
      self.outputs.append(out)
      return out
    self.outputs.append(self.replacement)
    return self.replacement


def _linen_outer(module: nn.Module, rest: tuple[str, ...]) -> dict[str, Any] | None:
  """The variables at ``rest`` below ``module``, per collection (``None``: not there)."""
  found = {}
  for collection, tree in module.variables.items():
    for part in rest:
      if not isinstance(tree, Mapping) or part not in tree:
        break
      tree = tree[part]
    else:
      found[collection] = tree
  return _scanned.flat_variables(found) if found else None


@contextlib.contextmanager
def _linen_cut(layer: str, cut: _LayerCut, called: list[str]) -> Iterator[None]:
  parts = tuple(layer.split("/"))

  def interceptor(next_fun, args, kwargs, context):
    path = tuple(str(p) for p in context.module.path)
    if (cut.outer is None and path != parts and parts[:len(path)] == path
        and not context.method_name.startswith("<")):
      # a module above the layer, outside any lifted transform of the layer
      outer = _linen_outer(context.module, parts[len(path):])
      if outer is not None:
        cut.set_outer(outer)
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    called.append("/".join(path))
    if path != parts:
      return next_fun(*args, **kwargs)
    return cut(lambda: next_fun(*args, **kwargs), lambda: context.module.variables)

  with nn.intercept_methods(interceptor):
    yield


_NNX_ACTIVE = threading.local()  # the _Cut of the nnx call in progress, per thread
_NNX_CLASSES: dict[type, type] = {}  # one intercepting subclass per layer class


def _intercepting_class(cls: type) -> type:
  if cls not in _NNX_CLASSES:

    def __call__(self, *args, **kwargs):
      return _NNX_ACTIVE.cut(lambda: cls.__call__(self, *args, **kwargs),
                             lambda: nnx.state(self))

    _NNX_CLASSES[cls] = type(cls.__name__, (cls,), {
        "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__})
  return _NNX_CLASSES[cls]


def _nnx_layer(model: nnx.Module, layer: str) -> nnx.Module:
  paths = {}
  for parts, module in nnx.iter_modules(model):
    paths[_path_str(parts)] = module
  if layer not in paths or not layer:
    available = sorted(p for p in paths if p)
    raise ValueError(
        f"layer must be the path of a submodule of model, got {layer!r}; the submodule "
        f"paths of {type(model).__name__} are {available}")
  return paths[layer]


@contextlib.contextmanager
def _nnx_cut(module: nnx.Module, cut: _LayerCut) -> Iterator[None]:
  original = type(module)
  cut.set_outer(_scanned.flat_variables(nnx.state(module)))
  previous = getattr(_NNX_ACTIVE, "cut", None)
  _NNX_ACTIVE.cut = cut
  # nnx (0.12) offers no supported way to replace a submodule's output from outside the
  # model: no counterpart of linen's intercept_methods; Module.perturb needs a line in the
  # model and adds to the value; nnx.capture(method_outputs=) only records; split/merge
  # with a replaced submodule changes a copy, not the model fn calls; and setting the
  # parent's attribute raises TraceContextError under jit when fn closes over the model.
  # So this one instance's class is swapped (bypassing nnx's __setattr__) for a cached
  # subclass (each new nnx class registers a graph-node type) that reads the thread-local.
  object.__setattr__(module, "__class__", _intercepting_class(original))
  try:
    yield
  finally:
    object.__setattr__(module, "__class__", original)
    _NNX_ACTIVE.cut = previous


def _call_count_error(layer: str, count: int, called: list[str], nnx_model: bool) -> str:
  message = (f"layer: fn must call the layer {layer!r} exactly once per call, but it "
             f"was called {count} times")
  if nnx_model:
    return message + ("; is fn calling model itself (not a copy made by nnx.merge or an nnx "
                      "transform)?")
  if called:
    return message + f"; the linen module paths fn called are {sorted(set(called) - {''})}"
  return message + "; fn called no linen module (for an nnx model, pass model=)"


_NNX_TRACE_HINT = (
    "model: calling the nnx model under a JAX transform failed (attribution differentiates "
    "and vmaps fn): its nnx.scan/nnx.vmap runs in graph mode, which refuses a model closed "
    "over by a JAX transform; write the scan with graph=False (tree mode), e.g. "
    "nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, graph=False). nnx said: ")


_LayerCut = _Cut | _scanned.ScanCut
_Run = Callable[..., tuple[Any, Any]]  # run(inputs, replacement=None) -> (fn(inputs), h)


def _call_with_cut(fn: Callable[[Any], Any], layer: str, target: nnx.Module | None,
                   layer_index: int | None, inputs: Any,
                   cut: _LayerCut) -> tuple[Any, _scanned.Stacking | None]:
  """``fn(inputs)`` with ``cut`` at the layer, and the stacking of the layer's variables.

  Checks that ``fn`` called the layer (exactly once unless it is scanned) and, without
  ``layer_index``, that the layer is not scanned.
  """
  called = list[str]()
  context = _linen_cut(layer, cut, called) if target is None else _nnx_cut(target, cut)
  try:
    with context:
      out = fn(inputs)
  except ValueError as error:
    if target is None or "different trace level" not in str(error):
      raise
    raise ValueError(_NNX_TRACE_HINT + str(error).split("\n")[0]) from error
  found = (_scanned.stacking(layer, cut.outer or {}, cut.inner)
           if cut.inner is not None else None)
  if layer_index is None:
    _scanned.check_layer_index(layer, None, found)
  count = cut.calls
  if count == 0 or (layer_index is None and count != 1):
    raise ValueError(_call_count_error(layer, count, called, target is not None))
  return out, found


def _plain_run(call: Callable[[Any, _LayerCut], tuple[Any, Any]]) -> _Run:
  """``run`` for a layer that is not scanned: its one call is recorded or replaced."""

  def run(inputs: Any, replacement: Any = None) -> tuple[Any, Any]:
    cut = _Cut(replacement)
    out, _ = call(inputs, cut)
    return out, cut.outputs[0]

  return run


class _Discovered(NamedTuple):
  """What a first, shape-only call finds out about a scanned layer."""

  found: _scanned.Stacking  # the stacking of its variables
  iteration: int  # the iteration attributed, non-negative
  output: Any  # the shapes and dtypes of one iteration's output


class _ScannedRun:
  """``run`` for one iteration of a scanned layer (``_scanned``).

  The first call discovers the stacking (under ``jax.eval_shape``); a replacement is
  returned at the iteration, and without one the iteration's output is recorded through
  the gradient of a probe (one vector-Jacobian product).
  """

  def __init__(self, call: Callable[[Any, _LayerCut], tuple[Any, Any]], layer: str,
               layer_index: int):
    self.call, self.layer, self.layer_index = call, layer, layer_index
    self.discovered: _Discovered | None = None

  def _discover(self, inputs: Any) -> _Discovered:
    cut = _scanned.ScanCut(self.layer, "discover")
    jax.eval_shape(lambda x: self.call(x, cut)[0], inputs)
    assert cut.inner is not None, "call checked that the layer was called"
    found = _scanned.stacking(self.layer, cut.outer or {}, cut.inner)
    index = _scanned.check_layer_index(self.layer, self.layer_index, found)
    assert found is not None and index is not None, "check_layer_index raised otherwise"
    return _Discovered(found, index, cut.output)

  def _record(self, inputs: Any, discovered: _Discovered) -> tuple[Any, Any]:
    found, index = discovered.found, discovered.iteration

    def tapped(probe: Any) -> tuple[Any, jax.Array]:
      cut = _scanned.ScanCut(self.layer, "record", index, found, probe)
      return self.call(inputs, cut)[0], jnp.asarray(cut.unique)

    probe = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), discovered.output)
    out, vjp, unique = jax.vjp(tapped, probe, has_aux=True)
    (h,) = vjp(jax.tree.map(_zero_cotangent, out))
    return out, jax.tree.map(lambda a: jnp.where(unique, a, jnp.nan), h)

  def __call__(self, inputs: Any, replacement: Any = None) -> tuple[Any, Any]:
    if self.discovered is None:
      self.discovered = self._discover(inputs)
    discovered = self.discovered
    if replacement is not None:
      cut = _scanned.ScanCut(self.layer, "replace", discovered.iteration, discovered.found,
                             replacement)
      return self.call(inputs, cut)[0], replacement
    return self._record(inputs, discovered)


def _cut_fn(fn: Callable[[Any], Any], layer: str, model: nnx.Module | None,
            layer_index: int | None = None) -> _Run:
  """``run(inputs, replacement)`` -> ``(fn(inputs), the layer's output)``.

  With ``layer_index`` the layer is a scanned one and the output is that of one iteration
  (``_scanned``); without, a scanned layer is an error that says to pass it.
  """
  target = None if model is None else _nnx_layer(model, layer)
  call = functools.partial(_call_with_cut, fn, layer, target, layer_index)
  if layer_index is None:
    return _plain_run(call)
  return _ScannedRun(call, layer, layer_index)


def _zero_cotangent(x: jax.Array) -> jax.Array | np.ndarray:
  """A zero cotangent for ``x``: float0 for an integer or boolean leaf."""
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


def _check_lig_args(fn: Any, layer: Any, model: Any, baseline: Any, layer_baseline: Any,
                    reduce: Any) -> nnx.Module | None:
  """Checks the arguments of :func:`layer_integrated_gradients`; returns the nnx model."""
  _checks.check_callable("fn", fn, call="fn(inputs) -> (N,) or (N, C) outputs")
  if not isinstance(layer, str):
    raise TypeError(f"layer must be a module path string such as 'Embed_0', got {layer!r}")
  _checks.check_choice("reduce", reduce, REDUCTIONS)
  if baseline is not None and layer_baseline is not None:
    raise ValueError("pass at most one of baseline (input space) and layer_baseline "
                     "(layer output space), got both")
  if model is None and isinstance(fn, nnx.Module):
    model = fn
  if model is not None and not isinstance(model, nnx.Module):
    raise TypeError(f"model must be a flax.nnx.Module (or None for linen), got "
                    f"{type(model).__name__}")
  return model


def layer_integrated_gradients(
    fn: Callable[[Any], jax.Array],
    inputs: Any,
    layer: str,
    *,
    layer_index: int | None = None,
    model: nnx.Module | None = None,
    baseline: Any = None,
    layer_baseline: Any = None,
    layer_noise: Callable[[Any], Any] | None = None,
    steps: int = 50,
    method: str = "gausslegendre",
    batch_size: int | None = None,
    target: ArrayLike | None = None,
    reduce: str | None = None,
    return_delta: bool = False,
) -> Any:
  r"""Integrated Gradients with respect to the output of one layer of a Flax model.

  .. math::
    \mathrm{LIG}(x) = \big(h(x) - h(x')\big) \odot \sum_{k=1}^{n} w_k\,
      \nabla_h\, g\big(h(x') + \alpha_k (h(x) - h(x'))\big)

  where ``h`` is the output of ``layer`` and ``g`` is the rest of ``fn`` run on the real
  ``inputs`` with the layer's output replaced; nodes and weights as in
  :func:`integrated_gradients`. The completeness delta is
  ``Σ LIG - (g(h(x)) - g(h(x')))``. Affine layers right after ``layer`` (a dense or
  convolutional layer and its bias) run once per example, not once per step, as in
  :func:`integrated_gradients` (``hoist_affine``).

  Put models in inference mode first (``deterministic=True``, ``model.eval()`` for
  nnx): dropout's random state cannot advance inside the traced path.

  SmoothGrad at the layer: token ids cannot take Gaussian noise, their embeddings can.
  With ``layer_noise`` the attributed point is ``h̃ = layer_noise(h(x))`` instead of
  ``h(x)`` (the path runs from ``h(x')`` to ``h̃``; the delta is ``Σ LIG − (g(h̃) −
  g(h(x')))``). ``smooth_grad(..., noise_at="layer")`` passes it: one Gaussian draw per
  noise sample, ``h + σ ε``.

  Scanned layers (a linen ``nn.scan``, an nnx stack built with ``nnx.vmap`` and run by
  ``nnx.scan``): ``layer`` names the scanned module and ``layer_index`` the iteration;
  ``h`` is the output of that iteration's call and every other iteration runs on the
  real inputs, so the result equals layer IG at the same block of the unrolled model.
  The iteration is recognised by its slice of the stacked variables (two iterations with
  equal variables raise; under ``jit`` they give NaN). For a linen ``nn.scan`` the
  layer's output is the body's ``(carry, ys)``, and so are the attributions (the carry's
  are ``attributions[0]``). Recording ``h(x)`` costs one extra forward-backward pass.
  An nnx scan must run in tree mode (``nnx.scan(..., graph=False)``): graph mode refuses
  a model closed over by a JAX transform.

  Args:
    fn: maps the batch ``inputs`` to (N,) or (N, C) outputs, calling the layer exactly
      once. For linen, e.g. ``lambda ids: model.apply(variables, ids)``; for nnx, a
      function calling ``model`` (or ``model`` itself).
    inputs: the batch (N, ...) or pytree of batches; may be integers (token ids).
    layer: the layer's module path, parts joined by ``"/"``. Linen: the scope path
      inside ``apply`` (``"Embed_0"``, ``"encoder/block_1"``); nnx: the attribute path in
      ``model`` (``"embed"``, ``"blocks/0"``).
    layer_index: for a scanned ``layer``, the iteration whose output is attributed, an
      int in [-L, L) for a scan of length L (negative counts from the end); ``None``
      (the default) for a layer that is not scanned.
    model: for nnx, the root module that ``layer`` is a path in; ``None`` for linen.
      When ``fn`` is itself an ``nnx.Module`` it is the default.
    baseline: input-space baseline ``x'`` whose layer output is ``h(x')`` (as in
      :func:`integrated_gradients`; ``None`` = zeros, e.g. the padding token id 0).
    layer_baseline: or the layer-space baseline ``h(x')`` itself: with the layer
      output's structure, per leaf the full shape or one that broadcasts to the
      per-example shape (``0.0`` = a zero embedding; a (D,) vector = one embedding at
      every token); a Python scalar applies to every leaf. At most one of ``baseline``
      and ``layer_baseline``.
    layer_noise: ``None``, or a function ``h -> h̃`` of the layer output (the
      structure, shapes and dtypes kept) whose result is attributed instead of ``h(x)``;
      what :func:`smooth_grad` passes with ``noise_at="layer"``.
    steps: number of quadrature nodes.
    method: quadrature, as in :func:`integrated_gradients`.
    batch_size: interpolation points evaluated at once; ``None`` = all ``steps``.
    target: with (N, C) outputs, an int or one int per example.
    reduce: ``None`` = attributions shaped like the layer output; ``"sum"`` = summed
      over its last axis (one score per token for an embedding (N, T, D) -> (N, T)).
    return_delta: also return the per-example completeness delta (N,).

  Returns:
    Attributions shaped like the layer output (or reduced), and with ``return_delta``
    the pair ``(attributions, delta)``.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, gradtx
    >>> class Bag(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, ids):
    ...     h = nn.Embed(10, 4)(ids)                      # (N, T, 4)
    ...     return nn.Dense(1)(jnp.tanh(h).mean(1))[:, 0]  # (N,)
    >>> ids = jnp.array([[3, 1, 4, 1]])
    >>> variables = Bag().init(jax.random.key(0), ids)
    >>> fn = lambda ids: Bag().apply(variables, ids)
    >>> scores, delta = gradtx.layer_integrated_gradients(
    ...     fn, ids, "Embed_0", layer_baseline=0.0, reduce="sum", return_delta=True)
    >>> scores.shape, bool(abs(delta[0]) < 1e-5)
    ((1, 4), True)

  References:
    Sundararajan, Taly, Yan, "Axiomatic attribution for deep networks", ICML 2017,
    arXiv:1703.01365.
  """
  result = attribute(fn, inputs, layer, layer_index=layer_index, model=model,
                     baseline=baseline, layer_baseline=layer_baseline,
                     layer_noise=layer_noise, steps=steps, method=method,
                     batch_size=batch_size, target=target, reduce=reduce,
                     return_delta=return_delta)
  return (result.attributions, result.delta) if return_delta else result.attributions


class Attributed(NamedTuple):
  """What :func:`attribute` returns."""

  attributions: Any  # shaped like the layer output, or reduced
  delta: jax.Array | None  # (N,) completeness delta, with return_delta
  output: Any  # with_output: fn(inputs) with the layer output replaced by the attributed h


def _layer_output(run: _Run, inputs: Any, layer: str) -> Any:
  """``h(x)``, checked: floating-point leaves with the batch axis of ``inputs`` first."""
  in_paths = _paths.leaf_paths_and_treedef(inputs)[0]
  in_leaves = jax.tree.leaves(inputs)
  if not in_leaves:
    raise ValueError("inputs must hold at least one array, got an empty pytree")
  batch = _checks.common_leading_size(
      "inputs", [(_name("inputs", p), x) for p, x in zip(in_paths, in_leaves, strict=True)])
  _, h_x = run(inputs)
  for path, h in zip(_paths.leaf_paths_and_treedef(h_x)[0], jax.tree.leaves(h_x),
                     strict=True):
    where = f"the output of layer {layer!r}" + (f" at {path!r}" if path else "")
    if not jnp.issubdtype(h.dtype, jnp.floating):
      raise TypeError(f"{where} must be floating-point to be attributed, got {h.dtype}")
    if h.shape[:1] != (batch,):
      raise ValueError(f"{where} must have the batch axis N={batch} first, got shape "
                       f"{h.shape}")
  return h_x


def _layer_baseline(run: _Run, inputs: Any, layer: str, h_x: Any, baseline: Any,
                    layer_baseline: Any) -> Any:
  """``h(x')``: the layer output of ``baseline``, or ``layer_baseline`` broadcast."""
  if layer_baseline is None:
    in_paths, in_treedef = _paths.leaf_paths_and_treedef(inputs)
    base_inputs = resolve_baseline(baseline, in_paths, jax.tree.leaves(inputs), in_treedef)
    return run(jax.tree.unflatten(in_treedef, base_inputs))[1]
  h_paths, h_treedef = _paths.leaf_paths_and_treedef(h_x)
  h_leaves = jax.tree.leaves(h_x)
  if isinstance(layer_baseline, int | float) and h_treedef.num_nodes > 1:
    layer_baseline = jax.tree.unflatten(h_treedef, [layer_baseline] * len(h_leaves))
  return jax.tree.unflatten(h_treedef, resolve_baseline(
      layer_baseline, h_paths, h_leaves, h_treedef, argname="layer_baseline",
      of=f"the output of layer {layer!r}"))


def _perturbed(layer_noise: Callable[[Any], Any], h_x: Any, layer: str) -> Any:
  """``layer_noise(h(x))``, which must keep the structure, shapes and dtypes of ``h(x)``."""
  out = layer_noise(h_x)
  of = f"the output of layer {layer!r}"
  _checks.check_same_structure("layer_noise(h)", out, of, h_x)
  bad = [f"{p or '<root>'}: {jnp.result_type(a)} vs {b.dtype}" for p, a, b in zip(
      _paths.tree_paths(h_x), jax.tree.leaves(out), jax.tree.leaves(h_x), strict=True)
         if jnp.result_type(a) != b.dtype]
  if bad:
    raise TypeError(f"layer_noise(h) must keep the dtypes of {of}; these differ: "
                    + ", ".join(bad))
  return out


def attribute(fn: Callable[[Any], jax.Array], inputs: Any, layer: str, *,
              layer_index: int | None, model: nnx.Module | None, baseline: Any,
              layer_baseline: Any, layer_noise: Callable[[Any], Any] | None, steps: int,
              method: str, batch_size: int | None, target: ArrayLike | None,
              reduce: str | None, return_delta: bool, with_output: bool = False) -> Attributed:
  """:func:`layer_integrated_gradients`, checked; ``with_output``: also ``fn`` at ``h``."""
  model = _check_lig_args(fn, layer, model, baseline, layer_baseline, reduce)
  _integrated.check_options(steps, return_delta, method=method, batch_size=batch_size)
  if layer_noise is not None:
    _checks.check_callable("layer_noise", layer_noise, call="layer_noise(h) -> h + noise")
  run = _cut_fn(fn, layer, model, layer_index)
  h_x = _layer_output(run, inputs, layer)
  h_base = _layer_baseline(run, inputs, layer, h_x, baseline, layer_baseline)
  if layer_noise is not None:
    h_x = _perturbed(layer_noise, h_x, layer)
  attrs = _integrated.integrated_gradients(
      lambda h: run(inputs, h)[0], h_x, baseline=h_base, steps=steps, method=method,
      batch_size=batch_size, target=target, return_delta=return_delta)
  attrs, delta = attrs if return_delta else (attrs, None)
  if reduce is not None:
    attrs = jax.tree.map(lambda a: jnp.sum(a, axis=-1), attrs)
  return Attributed(attrs, delta, run(inputs, h_x)[0] if with_output else None)
