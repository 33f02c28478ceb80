"""Multi-device part of ``test_contrastive_ring.py``: the ring losses on forced CPU devices.

Run as ``python tests/_sharded_contrastive_ring.py`` (4 devices; ``GRADTX_RING_DEVICES=8``
for 8, as ``_sharded_contrastive_ring8.py`` does): the device count must be forced before
jax is imported, so this needs a process of its own. Every case prints one JSON line
``{"name", "ok", "error"}``. The references are the single-device dense losses and plain
``jax.value_and_grad`` of the whole batch (float32, rtol 1e-5); the dense losses
themselves are checked against numpy float64 in ``test_contrastive_sigmoid.py`` and
``test_contrastive.py``.
"""

import collections
import os
import re

import _multidevice  # tests/, on sys.path when run as a script

NUM_DEVICES = int(os.environ.get("GRADTX_RING_DEVICES", _multidevice.NUM_DEVICES))
RTOL, ATOL = 1e-5, 1e-6
LOCAL = 10  # rows per device: not divisible by the block of 4 (ragged tiles on every hop)
BLOCK = 4
DIM = 6


def _assert_close(actual, expected, what):
  import chex

  try:
    chex.assert_trees_all_close(actual, expected, rtol=RTOL, atol=ATOL)
  except AssertionError as e:
    raise AssertionError(f"{what}: {e}") from None


def _data():
  import jax.numpy as jnp
  import numpy as np

  r = np.random.default_rng(0)
  batch = NUM_DEVICES * LOCAL
  a = jnp.asarray(r.standard_normal((batch, DIM)), jnp.float32)
  b = jnp.asarray(a + 0.5 * r.standard_normal((batch, DIM)), jnp.float32)
  labels = jnp.asarray(r.integers(0, 5, batch), jnp.int32)
  return a, b, labels, jnp.float32(0.3), jnp.float32(-2.0)


def _losses(a, b, labels, tau, bias, *, axis_name, block_size):
  """Every ring loss at once (one compilation): ``{name: scalar}``."""
  import gradtx

  kw = dict(temperature=tau, block_size=block_size, axis_name=axis_name)
  return {
      "info_nce": gradtx.info_nce(a, b, **kw),
      "info_nce_labels": gradtx.info_nce(a, b, labels=labels, **kw),  # both sides, one ring
      "info_nce_labels_one_way": gradtx.info_nce(a, b, labels=labels, symmetric=False,
                                                 normalize=False, **kw),
      "nt_xent": gradtx.nt_xent(a, b, **kw),
      "supervised_contrastive": gradtx.supervised_contrastive(a, labels, **kw),
      "sigmoid": gradtx.sigmoid_contrastive(a, b, bias=bias, **kw),
      "sigmoid_labels": gradtx.sigmoid_contrastive(a, b, bias=bias, labels=labels, **kw),
  }


def _value_and_grads(fn):
  """``a, b, labels, tau, bias -> ({name: (value, (da, db, dtau, dbias))})``."""
  import jax

  def all_losses(a, b, labels, tau, bias):
    out = {}
    for name in _losses(a, b, labels, tau, bias, axis_name=None, block_size=None):
      one = lambda a, b, tau, bias, name=name: fn(a, b, labels, tau, bias)[name]
      out[name] = jax.value_and_grad(one, argnums=(0, 1, 2, 3))(a, b, tau, bias)
    return out

  return all_losses


_DENSE = {}


def _dense_reference():
  import jax

  if not _DENSE:
    dense = lambda *args: _losses(*args, axis_name=None, block_size=None)
    _DENSE.update(jax.jit(_value_and_grads(dense))(*_data()))
  return _DENSE


def _ring_in_shard_map(mesh, block_size, check_vma):
  """Differentiated inside ``shard_map``: local rows in, local gradient rows out."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  ring = lambda *args: _losses(*args, axis_name="data", block_size=block_size)
  grads_spec = (P("data"), P("data"), P(), P())
  names = _dense_reference().keys()
  out_specs = {name: (P(), grads_spec) for name in names}
  fn = jax.jit(jax.shard_map(_value_and_grads(ring), mesh=mesh,
                             in_specs=(P("data"), P("data"), P("data"), P(), P()),
                             out_specs=out_specs, check_vma=check_vma))
  a, b, labels, tau, bias = _data()
  sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  a, b, labels = jax.device_put((a, b, labels), sharded)
  tau, bias = jax.device_put((tau, bias), replicated)
  return fn(a, b, labels, tau, bias)


def case_ring_losses_equal_dense_tiled(mesh):
  """All losses, tiles of 4 over 10 local rows, check_vma=True, gradients inside."""
  got = _ring_in_shard_map(mesh, BLOCK, check_vma=True)
  for name, want in _dense_reference().items():
    _assert_close(got[name], want, f"{name} (block {BLOCK}) vs dense")


def case_ring_losses_equal_dense_one_tile_per_hop(mesh):
  """``block_size=None``: one tile per hop; check_vma=False (as in the cached variant).

  Only with ``GRADTX_SLOW=1`` (another compilation of every loss).
  """
  got = _ring_in_shard_map(mesh, None, check_vma=False)
  for name, want in _dense_reference().items():
    _assert_close(got[name], want, f"{name} (one tile per hop) vs dense")


def case_grad_outside_shard_map_explicit_mesh(mesh):
  """``jax.grad`` of a shard_map'd ring loss; inputs made under ``jax.set_mesh`` (Explicit)."""
  import jax
  from jax.sharding import AxisType
  from jax.sharding import PartitionSpec as P

  import gradtx

  explicit = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
  a, b, labels, tau, bias = _data()
  with jax.set_mesh(explicit):
    a, b, labels = (jax.device_put(x, P("data")) for x in (a, b, labels))
    tau, bias = jax.device_put(tau, P()), jax.device_put(bias, P())

    def loss(a, b, labels, tau, bias):
      siglip = gradtx.sigmoid_contrastive(a, b, temperature=tau, bias=bias, labels=labels,
                                          block_size=BLOCK, axis_name="data")
      return siglip + gradtx.info_nce(a, b, temperature=tau, block_size=BLOCK,
                                      axis_name="data")

    sharded = jax.shard_map(loss, in_specs=(P("data"), P("data"), P("data"), P(), P()),
                            out_specs=P())
    got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 3, 4)))(a, b, labels, tau, bias)
  dense = _dense_reference()
  want_value = dense["sigmoid_labels"][0] + dense["info_nce"][0]
  g_sig, g_nce = dense["sigmoid_labels"][1], dense["info_nce"][1]
  want_grads = (g_sig[0] + g_nce[0], g_sig[1] + g_nce[1], g_sig[2] + g_nce[2], g_sig[3])
  _assert_close(got, (want_value, want_grads), "grad through shard_map (Explicit mesh)")


def case_ring_never_gathers_the_batch(mesh):
  """The ring's jaxpr: no all_gather, no (B, d) array, ppermutes in a scan."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import gradtx

  a, b, _, tau, _ = _data()

  def local(a, b):
    return jax.value_and_grad(
        lambda a, b: gradtx.info_nce(a, b, temperature=tau, block_size=BLOCK,
                                     axis_name="data"), argnums=(0, 1))(a, b)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                     out_specs=(P(), (P("data"), P("data"))))
  a, b = jax.device_put((a, b), NamedSharding(mesh, P("data")))
  text = str(jax.make_jaxpr(fn)(a, b))
  assert "all_gather" not in text, "the ring must not all-gather"
  batch = NUM_DEVICES * LOCAL
  inside = text[text.index("jaxpr={"):]  # the outer signature has the global (B, d) inputs
  assert not re.search(rf"\[{batch},{DIM}\]", inside), "a (B, d) array inside the ring"
  assert re.search(rf"f32\[{LOCAL},{DIM}\]", inside), inside[:2000]
  assert "ppermute" in text and "scan" in text, text[:2000]


def case_ring_temporaries_are_a_few_local_batches(mesh):
  """Compiled, not run: ``value_and_grad`` of a ring loss needs at most 7 local batches of
  temporaries (``contrastive_scaling``'s claim, ≤ 2 GiB = 8 local batches of 2^17 × 512 at
  B = 2^20 on 8 devices; the two-ring InfoNCE needed 11): the symmetric InfoNCE's two
  directions share one ring, NT-Xent's backward sends no ``k̄``."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import gradtx

  local, dim = 4096, 256
  kw = dict(temperature=0.1, block_size=256, axis_name="data")
  losses = {
      "info_nce": (lambda a, b: gradtx.info_nce(a, b, **kw), 1),
      "nt_xent": (lambda a, b: gradtx.nt_xent(a, b, **kw), 2),  # z = [z1; z2]: 2 × local
      "sigmoid": (lambda a, b: gradtx.sigmoid_contrastive(a, b, bias=-10.0, **kw), 1),
  }
  shape = jax.ShapeDtypeStruct((NUM_DEVICES * local, dim), jnp.float32,
                               sharding=NamedSharding(mesh, P("data")))
  for name, (loss, rows) in losses.items():
    step = jax.shard_map(lambda a, b, loss=loss: jax.value_and_grad(loss, argnums=(0, 1))(a, b),
                         mesh=mesh, in_specs=(P("data"), P("data")),
                         out_specs=(P(), (P("data"), P("data"))), check_vma=False)
    temp = jax.jit(step).lower(shape, shape).compile().memory_analysis().temp_size_in_bytes
    batches = temp / (rows * local * dim * 4)
    assert batches <= 7, f"{name}: {batches:.2f} local batches of temporaries"


def _two_tower(batch):
  import jax.numpy as jnp
  import numpy as np

  r = np.random.default_rng(1)
  normal = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
  params = {"img": normal(6, 5), "txt": normal(7, 5), "log_tau": jnp.log(jnp.float32(0.2)),
            "bias": jnp.float32(-1.0)}
  inputs = {"img": normal(batch, 6), "txt": normal(batch, 7)}
  labels = jnp.asarray(r.integers(0, 3, batch), jnp.int32)
  return params, inputs, labels


def _encode(p, x, rng):
  import jax
  import jax.numpy as jnp

  keep = jax.random.bernoulli(rng, 0.8, x["img"].shape)
  img = jnp.where(keep, x["img"] / 0.8, 0.0)
  return {"a": jnp.tanh(img @ p["img"]), "b": x["txt"] @ p["txt"]}


def _cached_losses(axis_name):
  """Three losses of the cached variant: ``{name: loss_fn(params, reps, labels)}``."""
  import jax.numpy as jnp

  import gradtx

  def siglip(p, h, labels):
    return gradtx.sigmoid_contrastive(h["a"], h["b"], temperature=jnp.exp(p["log_tau"]),
                                      bias=p["bias"], block_size=3, axis_name=axis_name)

  def info_nce_labels(p, h, labels):
    return gradtx.info_nce(h["a"], h["b"], temperature=jnp.exp(p["log_tau"]), labels=labels,
                           block_size=3, axis_name=axis_name)

  def supcon(p, h, labels):
    z = jnp.concatenate([h["a"], h["b"]])
    return gradtx.supervised_contrastive(z, jnp.concatenate([labels, labels]),
                                         temperature=jnp.exp(p["log_tau"]),
                                         axis_name=axis_name)

  return {"siglip": siglip, "info_nce_labels": info_nce_labels, "supcon": supcon}


def case_sharded_cached_ring_and_labels_equal_autodiff(mesh):
  """``loss_comm="ring"`` and ``"all_gather"`` with ``loss_inputs=labels`` vs plain autodiff."""
  import jax
  import jax.numpy as jnp

  import gradtx

  chunk = 2
  batch = NUM_DEVICES * 2 * chunk
  params, inputs, labels = _two_tower(batch)
  rng = jax.random.key(3)

  def reference(loss):
    def total(p):
      reps = [_encode(p, jax.tree.map(lambda x, s=s: x[s:s + chunk], inputs),
                      jax.random.fold_in(rng, i))
              for i, s in enumerate(range(0, batch, chunk))]
      return loss(p, jax.tree.map(lambda *r: jnp.concatenate(r), *reps), labels)

    return jax.jit(jax.value_and_grad(total))(params)

  for name, dense_loss in _cached_losses(None).items():
    want = reference(dense_loss)
    for comm, loss in (("ring", _cached_losses("data")[name]), ("all_gather", dense_loss)):
      f = gradtx.sharded_cached_value_and_grad(_encode, loss, mesh=mesh, chunk_size=chunk,
                                               loss_comm=comm)
      _assert_close(f(params, inputs, rng=rng, loss_inputs=labels), want, f"{name} {comm}")
    single = gradtx.cached_value_and_grad(_encode, dense_loss, chunk_size=chunk)
    _assert_close(jax.jit(single)(params, inputs, rng=rng, loss_inputs=labels), want,
                  f"{name} cached_value_and_grad")


def case_sharded_cached_explicit_mesh(mesh):
  """Params and inputs created under ``jax.set_mesh`` with an Explicit axis."""
  import jax
  from jax.sharding import AxisType
  from jax.sharding import PartitionSpec as P

  import gradtx

  explicit = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
  batch = NUM_DEVICES * 4
  params, inputs, labels = _two_tower(batch)
  rng = jax.random.key(4)
  loss = _cached_losses("data")["siglip"]
  want = gradtx.sharded_cached_value_and_grad(_encode, loss, mesh=mesh, chunk_size=2,
                                              loss_comm="ring")(params, inputs, rng=rng,
                                                                loss_inputs=labels)
  with jax.set_mesh(explicit):
    params = jax.device_put(params, P())
    inputs, labels = jax.device_put((inputs, labels), P("data"))
    f = gradtx.sharded_cached_value_and_grad(_encode, loss, mesh=explicit, chunk_size=2,
                                             loss_comm="ring")
    got = jax.jit(f)(params, inputs, rng=rng, loss_inputs=labels)
  _assert_close(got, want, "explicit mesh vs auto mesh")


def case_ring_loss_fn_without_axis_name_is_refused(mesh):
  import jax

  import gradtx

  params, inputs, labels = _two_tower(NUM_DEVICES * 2)
  f = gradtx.sharded_cached_value_and_grad(_encode, _cached_losses(None)["siglip"], mesh=mesh,
                                           chunk_size=2, loss_comm="ring")
  try:
    f(params, inputs, rng=jax.random.key(0), loss_inputs=labels)
  except ValueError as e:
    assert "loss_comm='ring'" in str(e) and "axis_name='data'" in str(e), str(e)
  else:
    raise AssertionError("no error for a ring loss_fn without axis_name")


def main():
  _multidevice.force_host_devices(NUM_DEVICES)
  import jax

  assert jax.device_count() == NUM_DEVICES, jax.devices()
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  cases = _multidevice.cases_of(globals())
  if not os.environ.get("GRADTX_SLOW"):
    cases.pop("ring_losses_equal_dense_one_tile_per_hop")
  only = os.environ.get("GRADTX_RING_CASES")
  if only:
    cases = {name: fn for name, fn in cases.items() if name in only.split(",")}
  _multidevice.report(collections.OrderedDict(cases), mesh)


if __name__ == "__main__":
  main()
