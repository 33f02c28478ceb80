"""Multi-device part of ``test_estimators_sharded.py``: runs on 4 CPU devices.

Run as ``python tests/_sharded_estimators.py`` (the test module does, once):
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is
imported. Every case prints one JSON line ``{"name", "ok", "error"}``: the ES estimate
with the population split over a 4-device mesh (``mesh=``, ``axis_name=``) must equal the
single-device estimate for the same key (rtol 1e-5).
"""

import _multidevice  # tests/, on sys.path when run as a script

NUM_DEVICES = _multidevice.NUM_DEVICES


def _problem():
  import jax.numpy as jnp

  def loss(p):
    return jnp.sum(jnp.tanh(p["a"] @ p["b"]) ** 2) + jnp.sum(jnp.round(p["a"] * 4.0))

  params = {"a": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
            "b": jnp.linspace(0.5, -0.5, 8).reshape(4, 2)}
  return loss, params


def _compare(mesh, **kw):
  import jax
  import numpy as np

  import gradtx

  loss, params = _problem()
  key = jax.random.key(4)
  single = gradtx.es_gradient(loss, params, key, sigma=0.1, **kw)
  sharded = jax.jit(lambda p: gradtx.es_gradient(loss, p, key, sigma=0.1, mesh=mesh,
                                                 axis_name="pop", **kw))(params)
  for name in params:
    np.testing.assert_allclose(sharded[name], single[name], rtol=1e-5, atol=1e-6,
                               err_msg=f"{name} {kw}")


def case_antithetic_gaussian(mesh):
  _compare(mesh, num_samples=16)


def case_plain_f0_baseline_rademacher(mesh):
  _compare(mesh, num_samples=8, antithetic=False, baseline="f0", noise="rademacher")


def case_centered_rank_shaping_is_global(mesh):
  """Ranks need every device's fitness: an all-gather, then each device's own slice."""
  _compare(mesh, num_samples=16, shaping="centered_rank")


def case_leave_one_out_mean_and_chunks(mesh):
  _compare(mesh, num_samples=16, antithetic=False, baseline="mean", batch_size=3)


def case_lean_per_device(mesh):
  _compare(mesh, num_samples=8, lean=True)


def case_per_leaf_population_per_device(mesh):
  """The default strategy without its flat population (leaves that cannot share a vector)."""
  from gradtx.estimators import _es

  flattenable = _es._flattenable
  _es._flattenable = lambda p: False
  try:
    _compare(mesh, num_samples=8, shaping="standardize")
  finally:
    _es._flattenable = flattenable


def _explicit_mesh():
  import jax

  return jax.make_mesh((NUM_DEVICES,), ("pop",),
                       axis_types=(jax.sharding.AxisType.Explicit,))


def _under_set_mesh(mesh, **kw):
  """Key and params created under ``jax.set_mesh`` (Explicit axes): they enter the
  shard_map as arguments, eagerly and under jit, and give the single-device estimate."""
  import jax
  import numpy as np

  import gradtx

  loss, params = _problem()
  single = gradtx.es_gradient(loss, params, jax.random.key(4), sigma=0.1, **kw)
  with jax.set_mesh(mesh):
    key = jax.random.key(4)
    mesh_params = jax.tree.map(lambda x: jax.numpy.asarray(np.asarray(x)), params)
    eager = gradtx.es_gradient(loss, mesh_params, key, sigma=0.1, mesh=mesh,
                               axis_name="pop", **kw)
    jitted = jax.jit(lambda p, k: gradtx.es_gradient(loss, p, k, sigma=0.1, mesh=mesh,
                                                     axis_name="pop", **kw))(mesh_params, key)
  for got in (eager, jitted):
    for name in params:
      np.testing.assert_allclose(got[name], single[name], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{name} {kw}")


def case_inputs_created_under_set_mesh(mesh):
  del mesh
  _under_set_mesh(_explicit_mesh(), num_samples=16, shaping="centered_rank")


def case_inputs_created_under_set_mesh_lean_masked_low_rank(mesh):
  import jax.numpy as jnp

  del mesh
  _under_set_mesh(_explicit_mesh(), num_samples=8, lean=True, rank=2,
                  mask={"a": jnp.arange(12).reshape(3, 4) % 3 == 0, "b": True})


def case_inputs_created_outside_with_explicit_mesh(mesh):
  del mesh
  _compare(_explicit_mesh(), num_samples=8, baseline="f0", antithetic=False)


def case_closure_over_mesh_arrays_is_a_clear_error(mesh):
  import jax
  import jax.numpy as jnp
  import pytest

  import gradtx

  del mesh
  explicit = _explicit_mesh()
  with jax.set_mesh(explicit):
    data = jnp.ones(3)
    with pytest.raises(ValueError, match=r"fn closes over an array sharded on the mesh's "
                                         r"Explicit axes"):
      gradtx.es_gradient(lambda p: jnp.sum(p * data), jnp.ones(3), jax.random.key(0),
                         sigma=0.1, num_samples=8, mesh=explicit, axis_name="pop")


def case_population_not_divisible(mesh):
  import jax.numpy as jnp
  import pytest

  import gradtx

  with pytest.raises(ValueError, match=r"noise draws \(3.*divisible by the 4 devices"):
    gradtx.es_gradient(lambda p: jnp.sum(p), jnp.ones(2), __import__("jax").random.key(0),
                       sigma=0.1, num_samples=6, mesh=mesh, axis_name="pop")


def main():
  _multidevice.run_on_mesh(globals(), "pop")


if __name__ == "__main__":
  main()
