"""Bad inputs of multi-host setups that one process can show (rows of ``tests/test_bad_inputs.py``).

A mesh whose axis names do not match the arguments. The mistakes that need several
processes (a batch not divisible by every process's devices, params sharded over other
processes where full values are needed) are cases of ``tests/_multihost_cases.py``, run
by ``tests/test_multihost.py`` on real processes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from _bad_inputs import Case

import gradtx

KEY = jax.random.key(0)


def _mesh(*names):
  return jax.make_mesh((1,) * len(names), names)


def _sharded(mesh, **kw):
  encode = lambda p, x, rng: x * p
  loss = lambda p, h: gradtx.info_nce(h[::2], h[1::2], temperature=0.1)
  return gradtx.sharded_cached_value_and_grad(encode, loss, mesh=mesh, chunk_size=1, **kw)


def _es(mesh, axis_name):
  return gradtx.es_gradient(lambda p: jnp.sum(p ** 2), jnp.ones(3), KEY, sigma=0.1,
                            num_samples=4, mesh=mesh, axis_name=axis_name)


CASES = [
    Case("multihost-sharded-batch-axis-not-in-2d-mesh",
         lambda: _sharded(_mesh("replica", "fsdp")),
         ValueError, r"batch_axis must be an axis of the mesh, one of \('replica', 'fsdp'\), "
                     r"got 'data'"),
    Case("multihost-es-axis-name-not-in-mesh",
         lambda: _es(_mesh("data"), "pop"),
         ValueError, r"axis_name must be an axis of mesh \('data',\), got 'pop'"),
    Case("multihost-zeroth-order-axis-name-not-in-2d-mesh",
         lambda: gradtx.zeroth_order("es", key=KEY, sigma=0.1, num_samples=4,
                                     mesh=_mesh("data", "model"), axis_name="pop"),
         ValueError, r"axis_name must be an axis of mesh \('data', 'model'\), got 'pop'"),
    Case("multihost-es-mesh-without-axis-name",
         lambda: _es(_mesh("pop"), None),
         ValueError, r"pass both mesh and axis_name .*axis_name=None"),
]
