"""Multi-device part of ``test_attribution_sharded.py``: runs on 4 CPU devices.

Run as ``python tests/_sharded_attribution.py`` (the test module does, once):
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is
imported, so this needs a process of its own. Every case prints one JSON line
``{"name", "ok", "error"}``. Attributions of a batch sharded over its examples (under
``jax.jit`` or inside ``jax.shard_map``) must equal the single-device ones (rtol 1e-5)
and stay sharded over the examples.

The jit cases use a mesh of ``AxisType.Auto`` axes (sharding propagated by the compiler);
the ``explicit_mesh`` cases use ``jax.make_mesh``'s default in this jax, ``Explicit`` axes
(sharding in the types, checked at trace time).
"""

import _multidevice  # tests/, on sys.path when run as a script

NUM_DEVICES = _multidevice.NUM_DEVICES
RTOL, ATOL = 1e-5, 1e-6
BATCH = 8  # 2 examples per device


def _single_device(x):
  """``x`` committed to device 0 alone: the reference runs on one device."""
  import jax

  return jax.device_put(x, jax.devices()[0])


def _over_examples(mesh, x):
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  return jax.device_put(x, NamedSharding(mesh, P("data")))


def _assert_sharded_over_examples(mesh, out, what):
  """Every leaf of ``out`` is split over 'data' along its first axis, nothing else."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  for leaf in jax.tree.leaves(out):
    expected = NamedSharding(mesh, P("data"))
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim), (what, leaf.sharding)
    assert leaf.sharding.spec[0] == "data", (what, leaf.sharding.spec)
    shard_rows = {s.data.shape[0] for s in leaf.addressable_shards}
    assert shard_rows == {BATCH // NUM_DEVICES}, (what, shard_rows)


def _explicit_mesh():
  import jax

  return jax.make_mesh((NUM_DEVICES,), ("data",),
                       axis_types=(jax.sharding.AxisType.Explicit,))


class _Problems:
  """Small models and batches, built once (after jax is imported with 4 devices)."""

  def __init__(self):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    class SmallCNN(nn.Module):

      @nn.compact
      def __call__(self, x):
        x = jnp.tanh(nn.Conv(4, (3, 3))(x))
        x = nn.softplus(nn.Conv(4, (3, 3), strides=(2, 2))(x))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))

    class Text(nn.Module):

      @nn.compact
      def __call__(self, ids):
        h = nn.Embed(11, 4)(ids)
        return nn.Dense(3)(jnp.tanh(nn.Dense(6)(h)).mean(axis=1))

    r = np.random.default_rng(0)
    self.x = jnp.asarray(r.uniform(0.0, 2.0, (BATCH, 6, 6, 1)), jnp.float32)
    self.data = jnp.asarray(r.uniform(0.0, 2.0, (5, 6, 6, 1)), jnp.float32)
    self.target = jnp.asarray(r.integers(0, 3, BATCH), jnp.int32)
    cnn_vars = SmallCNN().init(jax.random.key(0), self.x)
    self.cnn = lambda z: SmallCNN().apply(cnn_vars, z)
    w = jnp.asarray(r.standard_normal((36, 3)) / 6.0, jnp.float32)
    self.mlp = lambda z: jnp.tanh(z.reshape((z.shape[0], -1)) @ w)
    self.ids = jnp.asarray(r.integers(1, 11, (BATCH, 5)), jnp.int32)
    text_vars = Text().init(jax.random.key(1), self.ids)
    self.text = lambda i: Text().apply(text_vars, i)


_PROBLEMS = []
_REFERENCES = {}


def _problems():
  if not _PROBLEMS:
    _PROBLEMS.append(_Problems())
  return _PROBLEMS[0]


def _ig(fn, x, target, batch_size=None):
  import gradtx

  return gradtx.integrated_gradients(fn, x, target=target, steps=8, batch_size=batch_size,
                                     return_delta=True)


def _ig_reference(name, fn):
  """IG of the batch on one device (computed once per model)."""
  import jax

  if name not in _REFERENCES:
    pr = _problems()
    run = jax.jit(lambda x, t: _ig(fn, x, t))
    _REFERENCES[name] = run(_single_device(pr.x), _single_device(pr.target))
  return _REFERENCES[name]


def case_integrated_gradients_jit_sharded_inputs(mesh):
  """A CNN's IG under jit with the batch (and targets) sharded over 'data'."""
  import chex
  import jax

  pr = _problems()
  ref = _ig_reference("cnn", pr.cnn)
  run = jax.jit(lambda x, t: _ig(pr.cnn, x, t))
  out = run(_over_examples(mesh, pr.x), _over_examples(mesh, pr.target))
  chex.assert_trees_all_close(out, ref, rtol=RTOL, atol=ATOL)
  _assert_sharded_over_examples(mesh, out, "IG under jit")


def case_integrated_gradients_jit_sharded_chunked(mesh):
  """As above with batch_size=3 (a scan over chunks of steps plus a remainder)."""
  import chex
  import jax

  pr = _problems()
  ref = _ig_reference("cnn", pr.cnn)
  run = jax.jit(lambda x, t: _ig(pr.cnn, x, t, batch_size=3))
  out = run(_over_examples(mesh, pr.x), _over_examples(mesh, pr.target))
  chex.assert_trees_all_close(out, ref, rtol=RTOL, atol=ATOL)
  _assert_sharded_over_examples(mesh, out, "chunked IG under jit")


def _shard_map_ig(mesh, batch_size):
  import chex
  import jax
  from jax.sharding import PartitionSpec as P

  pr = _problems()
  ref = _ig_reference("cnn", pr.cnn)
  per_device = lambda x, t: _ig(pr.cnn, x, t, batch_size=batch_size)
  run = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  out = run(_over_examples(mesh, pr.x), _over_examples(mesh, pr.target))
  chex.assert_trees_all_close(out, ref, rtol=RTOL, atol=ATOL)
  _assert_sharded_over_examples(mesh, out, "IG in shard_map")


def case_integrated_gradients_shard_map(mesh):
  """Each device attributes its own 2 examples inside ``jax.shard_map``."""
  _shard_map_ig(mesh, batch_size=None)


def case_integrated_gradients_shard_map_chunked(mesh):
  """``batch_size`` inside ``jax.shard_map`` (the chunk sums are varying over 'data')."""
  _shard_map_ig(mesh, batch_size=3)


def case_layer_integrated_gradients_jit_sharded_ids(mesh):
  """Token attributions at a linen embedding, token ids sharded over 'data'."""
  import chex
  import jax
  import jax.numpy as jnp

  import gradtx

  pr = _problems()

  def lig(ids, target):
    return gradtx.layer_integrated_gradients(
        pr.text, ids, "Embed_0", baseline=jnp.full((5,), 2, jnp.int32), steps=8,
        target=target, reduce="sum", return_delta=True)

  ref = jax.jit(lig)(_single_device(pr.ids), _single_device(pr.target))
  out = jax.jit(lig)(_over_examples(mesh, pr.ids), _over_examples(mesh, pr.target))
  chex.assert_trees_all_close(out, ref, rtol=RTOL, atol=ATOL)
  _assert_sharded_over_examples(mesh, out, "LIG under jit")


def case_expected_gradients_jit_sharded(mesh):
  """Same key, same draws: EG of a sharded batch equals the single-device EG."""
  import chex
  import jax

  import gradtx

  pr = _problems()

  def eg(x, target, data, key):
    return gradtx.expected_gradients(pr.cnn, x, data, key=key, samples=6, batch_size=4,
                                     target=target)

  key = jax.random.key(3)
  ref = jax.jit(eg)(_single_device(pr.x), _single_device(pr.target), _single_device(pr.data),
                    key)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  out = jax.jit(eg)(_over_examples(mesh, pr.x), _over_examples(mesh, pr.target),
                    jax.device_put(pr.data, replicated), key)
  chex.assert_trees_all_close(out, ref, rtol=RTOL, atol=ATOL)
  _assert_sharded_over_examples(mesh, out, "EG under jit")


def _explicit_mesh_ig(name, fn, batch_size):
  import chex
  import jax

  pr = _problems()
  mesh = _explicit_mesh()
  ref = _ig_reference(name, fn)
  run = jax.jit(lambda x, t: _ig(fn, x, t, batch_size=batch_size))
  out = run(_over_examples(mesh, pr.x), _over_examples(mesh, pr.target))
  chex.assert_trees_all_close(out, ref, rtol=RTOL, atol=ATOL)
  _assert_sharded_over_examples(mesh, out, "IG on an Explicit mesh")


def case_integrated_gradients_explicit_mesh_dense(mesh):
  """A dense model on an Explicit mesh, with and without chunking."""
  del mesh
  pr = _problems()
  _explicit_mesh_ig("mlp", pr.mlp, batch_size=None)
  _explicit_mesh_ig("mlp", pr.mlp, batch_size=3)


def case_integrated_gradients_explicit_mesh_conv(mesh):
  """The CNN on an Explicit mesh with ``batch_size=1``, as documented: vmapping several
  steps would make conv's batching rule fold them into the sharded batch axis
  ((steps, N@data, ...) -> (steps*N, ...)), which sharding-in-types rejects."""
  del mesh
  _explicit_mesh_ig("cnn", _problems().cnn, batch_size=1)


def main():
  _multidevice.force_host_devices()
  import jax

  assert jax.device_count() == NUM_DEVICES, jax.devices()
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  _multidevice.report(_multidevice.cases_of(globals()), mesh)


if __name__ == "__main__":
  main()
