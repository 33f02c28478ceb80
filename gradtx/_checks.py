"""Argument validation: the checks behind gradtx's clear errors, and nothing else.

Every message names the argument, the value it got and what is allowed. Checks run in
Python at construction time; values that are only known inside ``jit`` (tracers,
schedules, arrays injected by ``optax.inject_hyperparams``) are left alone, because a
traced value cannot raise — except where the value must be static (:func:`check_static`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import optax

from gradtx import _paths


def concrete_scalar(value: Any) -> float | None:
  """The value as a Python float if it is a concrete number, else ``None``.

  Schedules (callables), tracers and non-scalar arrays give ``None``: they are checked
  where they are evaluated, not here.
  """
  if isinstance(value, bool):
    return float(value)
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, jax.core.Tracer) or callable(value):
    return None
  if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
    return float(value)
  return None


def _scalar(name: str, value: Any, allowed: str) -> float | None:
  """``concrete_scalar`` that refuses what can never be a scalar hyperparameter.

  ``None``, strings, non-scalar arrays and complex numbers raise, naming ``name``;
  tracers and schedules give ``None`` (checked where they are evaluated).
  """
  if value is None or isinstance(value, (str, bytes, complex)):
    raise TypeError(f"{name} must be {allowed}, got {value!r}")
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    if np.ndim(value) != 0:
      raise ValueError(f"{name} must be a scalar ({allowed}), got an array of shape "
                       f"{np.shape(value)}")
    if not isinstance(value, jax.core.Tracer) and not np.issubdtype(
        np.asarray(value).dtype, np.number):
      raise TypeError(f"{name} must be {allowed}, got an array of dtype {value.dtype}")
  if not (callable(value) or isinstance(value, (numbers.Real, np.ndarray, np.generic,
                                                 jax.Array))):
    raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
  return concrete_scalar(value)


def check_positive(name: str, value: Any, *, allow_schedule: bool = True) -> None:
  """``value`` > 0 (and finite) when it is a concrete number."""
  if callable(value) and not allow_schedule:
    raise TypeError(f"{name} must be a number, not a schedule, got {value!r}")
  x = _scalar(name, value, "a finite number > 0" + (" or a schedule" if allow_schedule else ""))
  if x is not None and not (x > 0 and math.isfinite(x)):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_in_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
  """``value`` lies in the interval ``[low, high]`` (ends open as requested)."""
  interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
  x = _scalar(name, value, f"a number in {interval}")
  if x is None:
    return
  above = x > low if low_open else x >= low
  below = x < high if high_open else x <= high
  if not (above and below and math.isfinite(x)):
    raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_int(name: str, value: Any, *, minimum: int) -> None:
  """``value`` is an integer (not bool) >= ``minimum``.

  A 0-d integer array counts (``optax.inject_hyperparams`` passes those); a tracer is
  left alone.
  """
  if isinstance(value, jax.core.Tracer):
    return
  is_int_array = (
      isinstance(value, (np.ndarray, np.generic, jax.Array))
      and np.ndim(value) == 0
      and np.issubdtype(np.asarray(value).dtype, np.integer)
  )
  if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or is_int_array):
    raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
  if int(value) < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
  """``value`` is one of ``choices``."""
  choices = tuple(choices)
  if value not in choices:
    allowed = ", ".join(repr(c) for c in choices)
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def common_leading_size(argname: str, named_leaves: Iterable[tuple[str, Any]], *,
                        what: str = "batch size") -> int:
  """The size of axis 0 shared by every leaf, or an error naming the offending leaves.

  Args:
    argname: the argument the leaves belong to (``"inputs"``).
    named_leaves: ``(name, leaf)`` pairs; ``name`` is how a message shows the leaf.
    what: what axis 0 means, for the messages.
  """
  named_leaves = list(named_leaves)
  for name, leaf in named_leaves:
    if np.ndim(leaf) == 0:
      raise ValueError(
          f"every leaf of {argname} must have a batch axis (axis 0); the leaf at {name} is "
          "a scalar"
      )
  sizes = {np.shape(leaf)[0] for _, leaf in named_leaves}
  if len(sizes) != 1:
    by_leaf = ", ".join(f"{name}: {np.shape(leaf)[0]}" for name, leaf in named_leaves)
    raise ValueError(
        f"every leaf of {argname} must have the same {what} (axis 0), got sizes "
        f"{sorted(sizes)} ({by_leaf})"
    )
  return sizes.pop()


def check_bool(name: str, value: Any) -> None:
  """``value`` is a Python bool (or a numpy bool scalar)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {value!r}")


def check_static(name: str, value: Any) -> None:
  """``value`` is not traced: it sets a shape or a loop length, so it must be static."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{name} must be a static Python value (it sets a shape or a loop length), but it "
        f"is traced under jit: pass it as a Python number, close over it, or list it in "
        f"jax.jit(..., static_argnames=...) / optax.inject_hyperparams(..., static_args=...)"
    )


def check_float_leaves(argname: str, tree: Any, *, allow_complex: bool = False,
                       hint: str = "Cast them (e.g. x.astype(jnp.float32)) or leave them "
                                   "out of the transformation (optax.masked).") -> None:
  """Every leaf of ``tree`` is a real (or, if allowed, complex) floating array.

  Integer and boolean leaves would be truncated by the arithmetic; the message names
  the first offending paths.
  """
  paths, _ = _paths.leaf_paths_and_treedef(tree)
  bad = []
  for path, leaf in zip(paths, jax.tree.leaves(tree), strict=True):
    dtype = np.result_type(getattr(leaf, "dtype", None) or np.asarray(leaf).dtype)
    ok = np.issubdtype(dtype, np.floating) or (
        allow_complex and np.issubdtype(dtype, np.complexfloating))
    if jax.numpy.issubdtype(dtype, jax.numpy.floating):  # bfloat16 and friends
      ok = True
    if not ok:
      bad.append(f"{path or '<root>'} ({dtype})")
  if bad:
    allowed = "floating or complex" if allow_complex else "floating"
    raise TypeError(
        f"{argname} must hold {allowed} arrays; these leaves are not: {', '.join(bad[:8])}"
        + (f", ... ({len(bad) - 8} more)" if len(bad) > 8 else "")
        + f". {hint}"
    )


def check_same_structure(name: str, tree: Any, ref_name: str, ref: Any, *,
                         shapes: bool = True) -> None:
  """``tree`` has the leaf paths (and shapes) of ``ref``; else an error naming the paths."""
  paths = _paths.tree_paths(tree)
  ref_paths = _paths.tree_paths(ref)
  if paths != ref_paths:
    missing = [p for p in ref_paths if p not in set(paths)]
    extra = [p for p in paths if p not in set(ref_paths)]
    detail = "; ".join(part for part in (
        f"missing {missing[:8]}" if missing else "",
        f"not in {ref_name}: {extra[:8]}" if extra else "",
    ) if part) or "the same paths in another order or nesting"
    raise ValueError(f"{name} must have the structure of {ref_name}: {detail}")
  if shapes:
    bad = [f"{p or '<root>'}: {np.shape(a)} vs {np.shape(b)}" for p, a, b in zip(
        paths, jax.tree.leaves(tree), jax.tree.leaves(ref), strict=True)
           if np.shape(a) != np.shape(b)]
    if bad:
      raise ValueError(f"{name} must have the leaf shapes of {ref_name}; these differ: "
                       + ", ".join(bad[:8]))


def check_transformation(name: str, value: Any, *, example: str | None = None) -> None:
  """``value`` is an optax transformation, not the factory that makes one.

  ``example`` is what to write instead (``"optax.scale_by_adam()"``); by default the
  factory called with a learning rate.
  """
  if isinstance(value, optax.GradientTransformation):
    return
  hint = ""
  if callable(value):
    label = getattr(value, "__name__", type(value).__name__)
    hint = f"; it is the factory {label}: call it, e.g. {example or label + '(learning_rate=...)'}"
  raise TypeError(f"{name} must be an optax.GradientTransformation{hint}, got {value!r}")


def check_non_negative(name: str, value: Any, *, allow_schedule: bool = True) -> None:
  """``value`` >= 0 (and finite) when it is a concrete number (a damping, a weight decay)."""
  if callable(value) and not allow_schedule:
    raise TypeError(f"{name} must be a number >= 0, not a schedule, got {value!r}")
  x = _scalar(name, value, "a finite number >= 0" + (" or a schedule" if allow_schedule else ""))
  if x is not None and not (x >= 0 and math.isfinite(x)):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_finite(name: str, value: Any, *, allow_schedule: bool = True) -> None:
  """``value`` is a finite number of any sign (a multiplier), or, where allowed, a schedule.

  With ``allow_schedule=False`` a callable is refused: the value is used where only a
  fixed number makes sense (a percentile, an EMA factor).
  """
  if callable(value) and not isinstance(value, jax.Array):
    if allow_schedule:
      return
    raise TypeError(f"{name} must be a number, not a schedule (only a fixed number is "
                    f"allowed here), got {value!r}")
  x = _scalar(name, value, "a number or a schedule" if allow_schedule else "a number")
  if x is not None and not math.isfinite(x):
    raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_callable(name: str, value: Any, *, call: str = "") -> None:
  """``value`` is callable; ``call`` shows how it will be called (``"fn(batch)"``)."""
  if not callable(value):
    got = (f"an array of shape {np.shape(value)}"
           if isinstance(value, (np.ndarray, jax.Array)) else repr(value))
    how = f" called as {call}" if call else ""
    raise TypeError(f"{name} must be a function{how}, got {got}")


def check_addressable(name: str, tree: Any, *, needs: str, hint: str) -> None:
  """Every array of ``tree`` can be read whole by this process, or a clear error.

  In a multi-process run (``jax.distributed``) an array sharded over the devices of
  several processes holds only this process's shards here; a function that needs its
  full values on the host (``needs``: what for) cannot read it. Replicated arrays and
  tracers pass. The message names the paths, shapes and layouts, this process, and what
  to do (``hint``).
  """
  bad = []
  for path, leaf in zip(_paths.tree_paths(tree), jax.tree.leaves(tree), strict=True):
    if (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
        and not leaf.is_fully_addressable and not leaf.is_fully_replicated):
      layout = getattr(leaf.sharding, "spec", leaf.sharding)
      bad.append(f"{path or '<root>'!r} (shape {leaf.shape}, {layout} over "
                 f"{len(leaf.sharding.device_set)} devices)")
  if bad:
    raise ValueError(
        f"{name} must be readable whole on this process ({jax.process_index()} of "
        f"{jax.process_count()}): {needs}; sharded over other processes' devices: "
        f"{', '.join(bad)}. {hint}")
