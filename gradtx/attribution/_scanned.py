r"""One iteration of a scanned layer (linen ``nn.scan``, nnx ``nnx.scan`` over a stack).

A scanned layer is one module whose variables are stacked along a layer axis; its call is
traced once for every iteration, so the iteration a call runs is a traced value that the
call itself cannot see. It is recovered from the variables: iteration ``k`` is the one
whose slice of the stacked variables is (bitwise) slice ``k`` of the variables the model
holds. Both are available without touching the model: the model's variables before the
scan (linen: the variables of the calling module; nnx: the stacked module's state), and
the per-iteration slice inside the call. So, with ``hit = (slice == stacked[k])``:

* replace: the layer returns ``where(hit, replacement, output)``; every other iteration,
  and the rest of the scan, run on the real inputs;
* record: the output of iteration ``k`` has to leave the scan, which only its carry and
  outputs do. It leaves through a gradient instead: ``_tap(output, probe, hit)`` is the
  identity whose derivative in ``probe`` is defined as ``where(hit, output, 0)``, so one
  vector-Jacobian product in ``probe`` returns the output of iteration ``k`` (summed over
  the iterations, of which only ``k`` is non-zero).

Iterations with bitwise-equal variables cannot be told apart: a concrete model with such
a duplicate raises; under ``jit`` (traced variables) the recorded output is NaN instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradtx import _paths


def flat_variables(variables: Any) -> dict[str, Any]:
  """``{path: leaf}`` of a variable tree (linen collections, an nnx state)."""
  paths, _ = _paths.leaf_paths_and_treedef(variables)
  return dict(zip(paths, jax.tree.leaves(variables), strict=True))


class Stacking(NamedTuple):
  """How a layer's variables are stacked: per stacked path its layer axis, and the length."""

  axes: dict[str, int]
  length: int
  example: str  # one stacked variable and its shape, for the messages


def _axes_of(outer: tuple[int, ...], inner: tuple[int, ...]) -> list[int]:
  """The axes ``a`` with ``outer`` = ``inner`` with one more axis at ``a``."""
  if len(outer) != len(inner) + 1:
    return []
  return [a for a in range(len(outer)) if outer[:a] + outer[a + 1:] == inner]


def stacking(layer: str, outer: dict[str, Any], inner: dict[str, Any]) -> Stacking | None:
  """The stacking of ``layer``'s variables (``None``: none of them is stacked).

  A variable whose shape inside the call equals its shape in the model is shared by
  every iteration (broadcast); one with an extra axis is stacked. The axis common to
  every stacked variable is preferred (axis 0 first) where a shape allows several.
  """
  candidates = {p: _axes_of(np.shape(outer[p]), np.shape(v))
                for p, v in inner.items() if p in outer}
  candidates = {p: c for p, c in candidates.items() if c}
  if not candidates:
    return None
  common = set.intersection(*(set(c) for c in candidates.values()))
  axes = {p: min(common) if common else c[0] for p, c in candidates.items()}
  lengths = {p: np.shape(outer[p])[a] for p, a in axes.items()}
  if len(set(lengths.values())) > 1:
    listed = ", ".join(f"{p!r}: {np.shape(outer[p])} (axis {axes[p]})" for p in axes)
    raise ValueError(f"layer {layer!r}: its stacked variables have different lengths along "
                     f"their layer axis ({listed}); cannot tell the scan's length")
  path = next(iter(axes))
  return Stacking(axes, lengths[path], f"{path!r} of shape {np.shape(outer[path])} is "
                                       f"stacked on axis {axes[path]}")


def check_layer_index(layer: str, layer_index: object, found: Stacking | None) -> int | None:
  """``layer_index`` against the layer's stacking, made non-negative."""
  if layer_index is None:
    if found is not None:
      raise ValueError(
          f"layer {layer!r} is scanned ({found.length} iterations; its variable "
          f"{found.example}): pass layer_index, the iteration to attribute, an int in "
          f"[-{found.length}, {found.length})")
    return None
  if isinstance(layer_index, bool) or not isinstance(layer_index, int | np.integer):
    raise TypeError(f"layer_index must be an int (the iteration of a scanned layer), got "
                    f"{layer_index!r}")
  if found is None:
    raise ValueError(
        f"layer_index is only for a scanned layer (linen nn.scan, nnx.scan over a stacked "
        f"module), but layer {layer!r} is not scanned: its variables have the same shapes "
        f"inside its call as in the model; got layer_index={layer_index}, leave it None")
  if not -found.length <= layer_index < found.length:
    raise ValueError(
        f"layer_index must be in [-{found.length}, {found.length}) for layer {layer!r}, "
        f"scanned over {found.length} iterations (its variable {found.example}), got "
        f"{layer_index}")
  return int(layer_index) % found.length


@jax.custom_vjp
def _tap(output: Any, probe: Any, hit: jax.Array) -> Any:
  del probe, hit
  return output


def _tap_fwd(output, probe, hit):
  del probe
  return output, (output, hit)


def _tap_bwd(residual, cotangent):
  output, hit = residual
  recorded = jax.tree.map(lambda o: jnp.where(hit, o, jnp.zeros_like(o)), output)
  return cotangent, recorded, None


_tap.defvjp(_tap_fwd, _tap_bwd)


class ScanCut:
  """The cut at iteration ``index`` of a scanned layer: discover, record or replace.

  ``mode``: ``"discover"`` records the shapes of the variables and outputs seen (run under
  ``jax.eval_shape``); ``"record"`` taps the output (``value`` is the probe); ``"replace"``
  returns ``value`` at iteration ``index``. ``set_outer`` is called, outside the scan,
  with the layer's variables as the model holds them.
  """

  def __init__(self, layer: str, mode: str, index: int | None = None,
               found: Stacking | None = None, value: Any = None):
    self.layer, self.mode, self.index, self.found, self.value = layer, mode, index, found, value
    self.calls = 0
    self.outer: dict[str, Any] | None = None
    self.inner: dict[str, Any] | None = None
    self.output: Any = None
    self.reference: dict[str, jax.Array] = {}
    self.unique: Any = True

  def set_outer(self, outer: dict[str, Any]) -> None:
    self.outer = outer
    if self.mode == "discover":
      return
    found, index = self.found, self.index
    assert found is not None and index is not None, "record and replace are given both"
    take = lambda p, i: jnp.take(jnp.asarray(outer[p]), i, axis=found.axes[p])
    self.reference = {p: take(p, index) for p in found.axes}
    others = [j for j in range(found.length) if j != index]
    if self.mode != "record" or not others:
      return
    equal = lambda j: jnp.all(jnp.array([jnp.array_equal(take(p, j), r)
                                         for p, r in self.reference.items()]))
    same = jnp.array([equal(j) for j in others])
    if not isinstance(same, jax.core.Tracer) and np.any(same):
      raise ValueError(
          f"layer {self.layer!r}: iteration {index} of the scan cannot be told apart "
          f"from iterations {[j for j, s in zip(others, same, strict=True) if s]}, whose "
          f"variables are equal to its own; layer_index identifies an iteration by its "
          f"slice of the stacked variables")
    self.unique = jnp.logical_not(jnp.any(same))

  def __call__(self, compute: Callable[[], Any], variables: Callable[[], Any]) -> Any:
    self.calls += 1
    self.inner = flat_variables(variables())
    out = compute()
    if self.mode == "discover":
      self.inner = {p: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for p, v in self.inner.items()}
      self.output = jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype), out)
      return out
    hit = jnp.all(jnp.array([jnp.array_equal(self.inner[p], r)
                             for p, r in self.reference.items()]))
    if self.mode == "record":
      return _tap(out, self.value, hit)
    return jax.tree.map(lambda r, o: jnp.where(hit, r.astype(o.dtype), o), self.value, out)
