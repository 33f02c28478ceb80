"""Sharded part of ``test_contract.py``: every entry with params sharded over 4 CPU devices.

Run as ``python tests/_sharded_contract.py`` (``test_contract.py`` does, once per session):
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is
imported, so this needs a process of its own. For every entry of
``test_contract.TRANSFORMATIONS`` it runs jitted steps of ``optax.chain(tx, finish(entry))``
(``optax.sgd``, or ``optax.scale`` after a full update) on the entry's problem, with params
and gradients sharded along their leading dim over a 4-device mesh and unsharded, and
prints one JSON line ``{"name", "ok", "error"}``: the updates must agree (the entry's
rtol, at least 1e-6) and keep the params' sharding.
"""

import functools
import importlib.util
import os
import sys

import _multidevice  # tests/, on sys.path when run as a script


def _load_contract():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_contract.py")
  spec = importlib.util.spec_from_file_location("_gradtx_test_contract", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up here
  spec.loader.exec_module(module)
  return module


def _check_entry(contract, entry, mesh):
  import jax
  import optax
  from jax.sharding import NamedSharding, PartitionSpec

  tx = optax.chain(entry.make(), contract.finish(entry))
  step = jax.jit(contract.make_step(tx, entry))
  params = entry.problem.params()
  shardings = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec("data")), params)
  sharded = jax.device_put(params, shardings)
  for x in jax.tree.leaves(sharded):
    assert len(x.sharding.device_set) == 4 and not x.is_fully_replicated, x.sharding
  init = jax.jit(tx.init)
  p, s, reference = params, init(params), []
  for _ in range(3):
    p, s, u = step(p, s)
    reference.append(u)
  with jax.set_mesh(mesh):  # the state's scalars live on the mesh: no second compile
    ps, ss = sharded, init(sharded)
    for i, u in enumerate(reference):
      ps, ss, us = step(ps, ss)
      contract.assert_trees_close(us, u, rtol=max(1e-6, entry.rtol), atol=entry.sharded_atol,
                                  msg=f"updates, step {i}")
      for name, leaf in us.items():
        assert leaf.sharding.is_equivalent_to(shardings[name], leaf.ndim), (
            f"step {i}: update {name!r} has sharding {leaf.sharding}, params "
            f"{shardings[name]}")
  contract.assert_trees_close(ps, p, rtol=max(1e-6, entry.rtol), atol=entry.sharded_atol,
                              msg="params after 3 steps")


def main():
  _multidevice.force_host_devices()
  contract = _load_contract()
  import jax

  assert jax.device_count() == _multidevice.NUM_DEVICES, jax.devices()
  mesh = jax.make_mesh((_multidevice.NUM_DEVICES,), ("data",))
  cases = {entry.name: functools.partial(_check_entry, contract, entry)
           for entry in contract.TRANSFORMATIONS}
  _multidevice.report(cases, mesh)


if __name__ == "__main__":
  main()
