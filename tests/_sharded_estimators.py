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


def case_population_not_divisible(mesh):
  import jax.numpy as jnp
  import pytest

  import gradtx

  with pytest.raises(ValueError, match=r"noise draws \(3.*divisible by the 4 devices"):
    gradtx.es_gradient(lambda p: jnp.sum(p), jnp.ones(2), __import__("jax").random.key(0),
                       sigma=0.1, num_samples=6, mesh=mesh, axis_name="pop")


def main():
  _multidevice.force_host_devices()
  import jax

  assert jax.device_count() == NUM_DEVICES, jax.devices()
  mesh = jax.make_mesh((NUM_DEVICES,), ("pop",))
  _multidevice.report(_multidevice.cases_of(globals()), mesh)


if __name__ == "__main__":
  main()
