"""Argument validation: the one place that raises gradtx's clear errors.

Every message names the argument, the value it got and what is allowed. Checks run in
Python at construction time; values that are only known inside ``jit`` (tracers,
schedules, arrays injected by ``optax.inject_hyperparams``) are left alone, because a
traced value cannot raise.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np


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


def check_positive(name: str, value: Any, *, allow_schedule: bool = True) -> None:
  """``value`` > 0 (and finite) when it is a concrete number."""
  if callable(value) and not allow_schedule:
    raise TypeError(f"{name} must be a number, not a schedule, got {value!r}")
  x = concrete_scalar(value)
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
  x = concrete_scalar(value)
  if x is None:
    return
  above = x > low if low_open else x >= low
  below = x < high if high_open else x <= high
  if not (above and below and math.isfinite(x)):
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
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


def as_key(key: Any) -> jax.Array:
  """A single typed ``jax.random`` key from a typed key or a raw ``PRNGKey`` (uint32)."""
  if isinstance(key, jax.Array) and jax.numpy.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"key must be a single key (shape ()), got shape {key.shape}")
    return key
  arr = key if isinstance(key, (jax.Array, np.ndarray)) else None  # may be a tracer
  if arr is None or arr.dtype != np.uint32 or arr.ndim != 1:
    raise TypeError(f"key must be a jax.random key (jax.random.key(seed) or "
                    f"jax.random.PRNGKey(seed)), got {key!r}")
  return jax.random.wrap_key_data(key)


def scalar_or_schedule(value: Any, count: jax.Array) -> jax.Array:
  """A hyperparameter's float32 value at update ``count`` (it may be a schedule)."""
  return jax.numpy.asarray(value(count) if callable(value) else value, jax.numpy.float32)
