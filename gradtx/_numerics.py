"""Numbers the transformations compute with: compute dtype, hyperparameter values, layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def compute_dtype(x: jax.typing.ArrayLike | jax.typing.DTypeLike) -> np.dtype:
  """The dtype to compute in for ``x``: at least float32 (bf16 sums and exps lose too much)."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def scalar_or_schedule(value: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """A hyperparameter's float32 value at update ``count`` (it may be a schedule)."""
  return jnp.asarray(value(count) if callable(value) else value, jnp.float32)


def sharded_like(x: jax.Array, ref: jax.Array) -> jax.Array:
  """``x`` with the sharding of ``ref`` (under an explicit mesh, or for concrete arrays)."""
  if isinstance(ref, jax.Array) and not isinstance(ref, jax.core.Tracer):
    # Only a multi-device layout is copied: committing to one device would change how
    # jit caches the step (its first call would see committed and uncommitted inputs).
    return jax.device_put(x, ref.sharding) if len(ref.sharding.device_set) > 1 else x
  sharding = jax.typeof(ref).sharding
  if sharding.mesh.empty or not sharding.mesh.are_all_axes_explicit:
    return x  # the compiler propagates shardings itself
  return jax.sharding.reshard(x, sharding.spec)
