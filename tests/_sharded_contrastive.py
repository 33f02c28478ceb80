"""Multi-device part of ``test_contrastive_sharded.py``: runs on 4 CPU devices.

Run as ``python tests/_sharded_contrastive.py`` (the test module does, once):
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is
imported, so this needs a process of its own. Every case prints one JSON line
``{"name", "ok", "error"}``. ``sharded_cached_value_and_grad`` must equal plain
single-device autodiff of the whole batch (rtol 1e-5) and ``cached_value_and_grad``.
"""

import re

import _multidevice  # tests/, on sys.path when run as a script

NUM_DEVICES = _multidevice.NUM_DEVICES
RTOL, ATOL = 1e-5, 1e-6


def _assert_close(actual, expected, what):
  import chex

  try:
    chex.assert_trees_all_close(actual, expected, rtol=RTOL, atol=ATOL)
  except AssertionError as e:
    raise AssertionError(f"{what}: {e}") from None


def _reference(encode, loss, params, inputs, chunk_size, rng, has_aux=False):
  """Plain ``jax.value_and_grad`` of the whole batch, chunk i encoded with fold_in(rng, i)."""
  import jax
  import jax.numpy as jnp

  batch = jax.tree.leaves(inputs)[0].shape[0]

  def total(p):
    reps = []
    for i, start in enumerate(range(0, batch, chunk_size)):
      chunk = jax.tree.map(lambda x, s=start: x[s:s + chunk_size], inputs)
      reps.append(encode(p, chunk, None if rng is None else jax.random.fold_in(rng, i)))
    return loss(p, jax.tree.map(lambda *r: jnp.concatenate(r, axis=0), *reps))

  return jax.jit(jax.value_and_grad(total, has_aux=has_aux))(params)


def _sharded(encode, loss, params, inputs, chunk_size, rng, mesh, has_aux=False):
  import jax

  import gradtx

  f = gradtx.sharded_cached_value_and_grad(encode, loss, mesh=mesh, chunk_size=chunk_size,
                                           has_aux=has_aux)
  return jax.jit(f)(params, inputs, rng=rng)


def _check_against_references(encode, loss, params, inputs, chunk_size, rng, value, grads,
                              has_aux=False, cached=False):
  """``(value, grads)`` from the sharded function vs plain autodiff (and the cached one)."""
  import jax

  import gradtx

  ref_value, ref_grads = _reference(encode, loss, params, inputs, chunk_size, rng, has_aux)
  _assert_close(value, ref_value, "loss (and aux) vs plain autodiff")
  _assert_close(grads, ref_grads, "grads vs plain autodiff")
  if cached:
    f = gradtx.cached_value_and_grad(encode, loss, chunk_size=chunk_size, has_aux=has_aux)
    c_value, c_grads = jax.jit(f)(params, inputs, rng=rng)
    _assert_close(value, c_value, "loss vs cached_value_and_grad")
    _assert_close(grads, c_grads, "grads vs cached_value_and_grad")
  for leaf in jax.tree.leaves(grads):
    assert leaf.sharding.is_fully_replicated, leaf.sharding


def _dropout(x, rate, key):
  import jax
  import jax.numpy as jnp

  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def _normal(seed):
  """``normal(*shape)``: float32 standard normal samples (numpy: no per-op compiles)."""
  import jax.numpy as jnp
  import numpy as np

  r = np.random.default_rng(seed)
  return lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)


def _two_tower_problem(batch):
  import jax.numpy as jnp

  normal = _normal(0)
  params = {
      "img": {"w": normal(6, 8), "v": normal(8, 5)},
      "txt": {"w": normal(7, 5)},
      "log_tau": jnp.log(jnp.float32(0.3)),
  }
  inputs = {"img": normal(batch, 6), "txt": normal(batch, 7),
            "row": jnp.arange(batch, dtype=jnp.int32)}
  return params, inputs


def _two_tower_encode(chunk_size, seen=None):
  import jax
  import jax.numpy as jnp

  def encode(p, x, rng):
    assert x["img"].shape[0] == chunk_size, x["img"].shape  # a chunk, never the batch
    if seen is not None:  # record which rows this device encodes
      jax.debug.callback(lambda d, r: seen.append((int(d), [int(i) for i in r])),
                         jax.lax.axis_index("data"), x["row"])
    k_img, k_txt = jax.random.split(rng)
    hidden = _dropout(jnp.tanh(x["img"] @ p["img"]["w"]), 0.3, k_img)
    return {"a": hidden @ p["img"]["v"], "b": _dropout(x["txt"], 0.2, k_txt) @ p["txt"]["w"]}

  return encode


def _info_nce_loss(p, h):
  import jax.numpy as jnp

  import gradtx

  return gradtx.info_nce(h["a"], h["b"], temperature=jnp.exp(p["log_tau"]))


_SEEN = []  # (device, rows) per call of encode_fn in case_info_nce_dropout_temperature


def case_info_nce_dropout_temperature(mesh):
  """Two towers, dropout in the encoder, a learnable temperature (counted once).

  Not under an outer jit (``f`` jits its shard_map itself); the sharded encoder also
  records the rows each device encodes, for ``case_each_device_encodes_only_its_rows``.
  """
  import jax

  import gradtx

  batch, chunk = 32, 4  # 8 rows per device, 2 chunks each
  params, inputs = _two_tower_problem(batch)
  rng = jax.random.key(7)
  f = gradtx.sharded_cached_value_and_grad(_two_tower_encode(chunk, _SEEN), _info_nce_loss,
                                           mesh=mesh, chunk_size=chunk)
  value, grads = jax.block_until_ready(f(params, inputs, rng=rng))
  jax.effects_barrier()
  _check_against_references(_two_tower_encode(chunk), _info_nce_loss, params, inputs, chunk,
                            rng, value, grads, cached=True)


def case_nt_xent_one_tower_two_views(mesh):
  """One tower, two views; local batch 6 not divisible by chunk 4 (no rng: allowed)."""
  import jax.numpy as jnp

  import gradtx

  batch, chunk = 24, 4
  normal = _normal(1)
  params = {"w1": normal(5, 8), "w2": normal(8, 4)}
  inputs = {"v1": normal(batch, 5), "v2": normal(batch, 5)}

  def encode(p, x, rng):
    assert rng is None
    tower = lambda v: jnp.tanh(v @ p["w1"]) @ p["w2"]
    return {"z1": tower(x["v1"]), "z2": tower(x["v2"])}

  loss = lambda p, h: gradtx.nt_xent(h["z1"], h["z2"], temperature=0.5)
  value, grads = _sharded(encode, loss, params, inputs, chunk, None, mesh)
  _check_against_references(encode, loss, params, inputs, chunk, None, value, grads)


def case_supervised_contrastive(mesh):
  """Global labels (closed over), dropout, a learnable temperature and has_aux."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import gradtx

  batch, chunk = 16, 2
  normal = _normal(2)
  params = {"w": normal(6, 4), "tau": jnp.float32(0.4)}
  x = normal(batch, 6)
  labels = jnp.asarray(np.random.default_rng(3).integers(0, 3, batch), jnp.int32)

  def encode(p, x, rng):
    return _dropout(x, 0.25, rng) @ p["w"]

  def loss(p, h):
    value = gradtx.supervised_contrastive(h, labels, temperature=p["tau"])
    return value, {"rep_norm": jnp.mean(jnp.linalg.norm(h, axis=1))}

  rng = jax.random.key(5)
  value, grads = _sharded(encode, loss, params, x, chunk, rng, mesh, has_aux=True)
  _check_against_references(encode, loss, params, x, chunk, rng, value, grads, has_aux=True)


def case_each_device_encodes_only_its_rows(mesh):
  """Device d encodes rows [8d, 8d + 8) only, each twice (pass 1 and pass 2)."""
  import collections

  batch, chunk = 32, 4
  local = batch // NUM_DEVICES
  assert _SEEN, "case_info_nce_dropout_temperature recorded nothing"
  counts = collections.Counter()
  for device, rows in _SEEN:
    assert len(rows) == chunk, (device, rows)
    assert all(device * local <= r < (device + 1) * local for r in rows), (device, rows)
    counts.update(rows)
  assert counts == {r: 2 for r in range(batch)}, counts


def case_only_representations_are_gathered(mesh):
  """The all-gathers move (B, d) representations only; gradients meet in a psum."""
  import jax

  import gradtx

  batch, chunk = 32, 4
  params, inputs = _two_tower_problem(batch)
  f = gradtx.sharded_cached_value_and_grad(_two_tower_encode(chunk), _info_nce_loss,
                                           mesh=mesh, chunk_size=chunk)
  text = str(jax.make_jaxpr(lambda p, x: f(p, x, rng=jax.random.key(7)))(params, inputs))
  gathers = re.findall(r"(\S+) = all_gather\[", text)
  assert sorted(g.split(":")[1] for g in gathers) == ["f32[32,5]", "f32[32,5]"], gathers
  assert "psum" in text, text


def case_local_batch_not_divisible_by_chunk_with_rng(mesh):
  import jax

  import gradtx

  params, inputs = _two_tower_problem(24)  # 6 rows per device, chunk 4
  f = gradtx.sharded_cached_value_and_grad(_two_tower_encode(4), _info_nce_loss, mesh=mesh,
                                           chunk_size=4)
  try:
    f(params, inputs, rng=jax.random.key(0))
  except ValueError as e:
    message = str(e)
    assert "(24 rows / 4 devices = 6)" in message and "chunk_size=4" in message, message
  else:
    raise AssertionError("no error for a local batch of 6 with chunk_size=4 and rng")


def case_batch_not_divisible_by_devices(mesh):
  import gradtx

  params, inputs = _two_tower_problem(30)
  f = gradtx.sharded_cached_value_and_grad(_two_tower_encode(3), _info_nce_loss, mesh=mesh,
                                           chunk_size=3)
  try:
    f(params, inputs)
  except ValueError as e:
    message = str(e)
    assert "30 rows" in message and "4 devices" in message and "'data'" in message, message
  else:
    raise AssertionError("no error for a batch of 30 on 4 devices")


def case_unknown_batch_axis(mesh):
  import gradtx

  try:
    gradtx.sharded_cached_value_and_grad(_two_tower_encode(4), _info_nce_loss, mesh=mesh,
                                         chunk_size=4, batch_axis="batch")
  except ValueError as e:
    assert "'batch'" in str(e) and "'data'" in str(e), str(e)
  else:
    raise AssertionError("no error for a batch_axis that is not in the mesh")


def main():
  _multidevice.run_on_mesh(globals(), "data")


if __name__ == "__main__":
  main()
