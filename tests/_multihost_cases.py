"""Multi-process part of ``test_multihost.py``: every case on a mesh spanning processes.

Launched by ``tests/_multiprocess.py`` as N joined ``jax.distributed`` processes (2 × 2
CPU devices in CI): ``python tests/_multihost_cases.py CHECKPOINT_DIR [CASE ...]``. Each
case builds the same global data on every process, runs gradtx on arrays laid out over
the global mesh (FSDP: every parameter leaf split over all devices; or the batch /
population split over them), fetches the result and compares it with the result of the
same call on this process's first device alone (rtol 1e-5; ``assert_array_equal`` where
the maths is order-independent), and with numpy float64 where a closed form exists. It
returns a few numbers (a global norm, a mask's hash), which the pytest side checks are
identical on every process: a rank-local statistic would differ.

Meshes: ``auto`` has ``AxisType.Auto`` axes (jit propagates the layout); ``explicit`` has
``AxisType.Explicit`` axes and its inputs are created under ``jax.set_mesh``.
"""

import sys
import zlib

import _multidevice  # tests/, on sys.path when run as a script
import _multiprocess

jax = _multiprocess.init_worker()

import chex  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gradtx  # noqa: E402

N = jax.device_count()
RTOL, ATOL = 1e-5, 1e-6
MESHES = {kind: jax.make_mesh((N,), ("fsdp",), axis_types=(t,))
          for kind, t in (("auto", AxisType.Auto), ("explicit", AxisType.Explicit))}
DATA_MESHES = {kind: jax.make_mesh((N,), ("data",), axis_types=(t,))
               for kind, t in (("auto", AxisType.Auto), ("explicit", AxisType.Explicit))}
CHECKPOINT_DIR = sys.argv[1] if len(sys.argv) > 1 else None


# --- global data, layouts, fetching ----------------------------------------------------

def _tree(seed, scale=1.0):
  """The same float32 tree on every process: FSDP-shardable leaves and a scalar."""
  r = np.random.default_rng(seed)
  shapes = {"dense": {"kernel": (4 * N, 6), "bias": (2 * N,)}, "head": {"kernel": (2 * N, 3)},
            "scale": ()}
  return jax.tree.map(lambda s: (scale * r.standard_normal(s)).astype(np.float32), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def put(value, mesh, spec):
  """A global array on ``mesh`` from the host value every process holds."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, NamedSharding(mesh, spec),
                                      lambda index: value[index])


def fsdp(tree, mesh):
  """Every leaf split along axis 0 over all devices of all processes (0-d: replicated)."""
  return jax.tree.map(lambda x: put(x, mesh, P(mesh.axis_names[0]) if np.ndim(x) else P()),
                      tree)


def replicated(tree, mesh):
  return jax.tree.map(lambda x: put(x, mesh, P()), tree)


def one_device(tree):
  """The reference layout: this process's first device alone."""
  return jax.device_put(jax.tree.map(np.asarray, tree), jax.local_devices()[0])


def fetch(tree):
  """The global value of every leaf, on the host of this process."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def digest(tree):
  """A hash of the exact bits of a tree (equal on every process iff the bits are)."""
  leaves = [np.ascontiguousarray(x).tobytes() for x in jax.tree.leaves(fetch(tree))]
  return zlib.crc32(b"".join(leaves))


def close(got, want, rtol=RTOL, atol=ATOL):
  chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


def numpy_global_norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                           for x in jax.tree.leaves(tree))))


class _Layout:
  """Where a case's arrays live: one device, or a mesh (under ``jax.set_mesh`` if Explicit)."""

  def __init__(self, kind, meshes=MESHES, spread=fsdp):
    self.kind = kind
    self.mesh = None if kind == "one_device" else meshes[kind]
    self.spread = spread

  def __call__(self, tree):
    return one_device(tree) if self.mesh is None else self.spread(tree, self.mesh)

  def __enter__(self):
    self._ctx = (jax.set_mesh(self.mesh) if self.kind == "explicit"
                 else __import__("contextlib").nullcontext())
    return self._ctx.__enter__()

  def __exit__(self, *exc):
    return self._ctx.__exit__(*exc)


LAYOUTS = ("one_device", "auto", "explicit")


def run_tx(tx, layout, steps, jit_init=True):
  """``steps`` jit-compiled updates of ``tx`` on gradients ``_tree(100 + t)``."""
  with layout:
    p = layout(_tree(0))
    state = jax.jit(tx.init)(p) if jit_init else tx.init(p)
    update = jax.jit(tx.update)
    updates = []
    for t in range(steps):
      u, state = update(layout(_tree(100 + t, scale=0.5 + t)), state, p)
      updates.append(u)
    return updates, state


def compare_tx(tx, steps, exact=False, jit_init=True):
  """``tx`` on FSDP params of both meshes against one device; the last states, fetched.

  ``tx`` may be a function of the layout's kind (to build it under ``jax.set_mesh``).
  """
  make = tx if callable(tx) else lambda kind: tx
  ref_updates, ref_state = fetch(run_tx(make("one_device"), _Layout("one_device"), steps))
  states = {}
  for kind in ("auto", "explicit"):
    layout = _Layout(kind)
    with layout:
      tx = make(kind)
    updates, state = run_tx(tx, layout, steps, jit_init)
    for leaf in jax.tree.leaves(state):  # statistics: the same full value on every device
      if leaf.ndim == 0:
        assert leaf.sharding.is_fully_replicated, (kind, leaf.sharding)
    updates, states[kind] = fetch((updates, state))
    if exact:
      chex.assert_trees_all_equal(updates, ref_updates)
    else:
      close(updates, ref_updates)
    close(states[kind], ref_state)
    if kind == "auto":
      auto_digest = digest(updates)
  return states["auto"], auto_digest


# --- clipping ----------------------------------------------------------------------------

def case_clip_by_global_norm():
  out = {}
  for mode in ("hard", "soft"):
    state = compare_tx(gradtx.clip_by_global_norm(1.0, mode=mode), steps=2)
    np.testing.assert_allclose(state.grad_norm, numpy_global_norm(_tree(101, 1.5)),
                               rtol=RTOL)
    out[mode] = float(state.grad_norm)
  return out


def case_clip_by_leaf_norm():
  state, _ = compare_tx(gradtx.clip_by_leaf_norm(0.5), steps=2)
  want = jax.tree.map(lambda g: numpy_global_norm([g]), _tree(101, 1.5))
  close(jax.tree.map(np.float64, state.grad_norm), want)
  return jax.tree.map(float, state.grad_norm)


def case_auto_clip_and_zscore_clip():
  auto, _ = compare_tx(gradtx.auto_clip(50.0, history=4), steps=4)
  zscore, _ = compare_tx(gradtx.zscore_clip(warmup_steps=2, z_thresh=0.5), steps=4)
  norms = [numpy_global_norm(_tree(100 + t, 0.5 + t)) for t in range(4)]
  np.testing.assert_allclose(auto.norm_history, norms, rtol=RTOL)
  np.testing.assert_allclose(zscore.grad_norm, norms[-1], rtol=RTOL)
  return [float(auto.max_norm), float(zscore.z_score), float(zscore.norm_mean)]


def case_clip_then_adam():
  state, _ = compare_tx(optax.chain(gradtx.clip_by_global_norm(1.0), optax.adam(1e-2)), steps=2)
  return float(state[0].grad_norm)


# --- child tuning ------------------------------------------------------------------------

def case_child_tuning_f_masks_are_global():
  """The same Bernoulli mask whatever the layout: the updates are bit-identical."""
  # Under "explicit" the key is created under jax.set_mesh, as modern JAX code does.
  _, updates_digest = compare_tx(
      lambda kind: gradtx.child_tuning_f(0.3, key=jax.random.key(7)), steps=2, exact=True)
  return updates_digest


def _mask(seed):
  return jax.tree.map(lambda x: x > 0.3, _tree(seed))


def case_child_tuning_d_mask_from_one_device():
  """A mask built on the host (``fisher_mask``'s output): laid out like the FSDP params."""
  tx = gradtx.child_tuning_d(jax.tree.map(jnp.asarray, _mask(5)), rescale=True)
  state, _ = compare_tx(tx, steps=1, exact=True)
  return float(state.mask_density)


def _sharded_mask_tx(kind):
  mask = _mask(5) if kind == "one_device" else fsdp(_mask(5), MESHES[kind])
  return gradtx.child_tuning_d(mask, rescale=True)


def case_child_tuning_d_sharded_mask():
  """A mask sharded like the params (e.g. computed by a sharded program); eager init."""
  return compare_tx(_sharded_mask_tx, steps=1, exact=True, jit_init=False)[1]


def case_child_tuning_d_sharded_mask_jit_init_is_a_clear_error():
  """A jit-compiled init cannot close over an array of other processes' devices."""
  tx = _sharded_mask_tx("auto")
  _raises(ValueError, r"mask is sharded over other processes' devices.*call tx.init\(params\) "
                      r"outside jit", lambda: jax.jit(tx.init)(fsdp(_tree(0), MESHES["auto"])))


# --- meta step sizes ---------------------------------------------------------------------

def case_eg_step_size_cosine_is_global():
  tx = gradtx.eg_step_size(optax.scale_by_adam(), learning_rate=0.1, gain_lr=0.05,
                           scale_lr=0.05)
  state, _ = compare_tx(tx, steps=3)
  return [float(state.lr_scale), float(state.gain_mean)]


def case_hypergradient_descent_dot_is_global():
  tx = gradtx.hypergradient_descent(optax.scale_by_adam(), learning_rate=0.01,
                                    hyper_lr=1e-3)
  state, _ = compare_tx(tx, steps=3)
  return float(state.current_learning_rate)


# --- contrastive: the batch split over processes ----------------------------------------

def _clip_problem():
  r = np.random.default_rng(3)
  params = {"w": (r.standard_normal((5, 4)) / 2).astype(np.float32),
            "tau": np.float32(0.3)}
  x = r.standard_normal((4 * N, 5)).astype(np.float32)  # pairs (2i, 2i + 1)

  def encode(p, x, rng):
    del rng
    return gradtx.l2_normalize(jnp.tanh(x @ p["w"]))

  def loss(p, h):
    return gradtx.nt_xent(h[::2], h[1::2], temperature=p["tau"])

  def reference(p, x):
    return jax.value_and_grad(lambda p: loss(p, encode(p, x, None)))(p)

  return params, x, encode, loss, reference


def case_sharded_cached_value_and_grad():
  """Global negatives with the batch split over the processes; inputs made either way."""
  params, x, encode, loss, reference = _clip_problem()
  want = fetch(jax.jit(reference)(*one_device((params, x))))
  values = {}
  for kind in ("auto", "explicit"):
    mesh = DATA_MESHES[kind]
    f = gradtx.sharded_cached_value_and_grad(encode, loss, mesh=mesh, chunk_size=2)
    with _Layout(kind, DATA_MESHES):
      got = jax.jit(f)(replicated(params, mesh), put(x, mesh, P("data")))
    got = fetch(got)
    close(got, want)
    values[kind] = float(got[0])
  return values


def case_sharded_cached_ring_loss():
  params, x, encode, _, reference = _clip_problem()
  mesh = DATA_MESHES["auto"]
  r = np.random.default_rng(4)
  y = r.standard_normal(x.shape).astype(np.float32)  # the second tower's inputs

  def towers(p, xy, rng):
    return {"a": encode(p, xy["x"], rng), "b": encode(p, xy["y"], rng)}

  def ring(p, h):
    return gradtx.info_nce(h["a"], h["b"], temperature=p["tau"], axis_name="data")

  def dense(p, xy):
    h = towers(p, xy, None)
    return gradtx.info_nce(h["a"], h["b"], temperature=p["tau"])

  xy = {"x": x, "y": y}
  want = fetch(jax.jit(jax.value_and_grad(dense))(*one_device((params, xy))))
  f = gradtx.sharded_cached_value_and_grad(towers, ring, mesh=mesh, chunk_size=2,
                                           loss_comm="ring")
  got = fetch(jax.jit(f)(replicated(params, mesh), fsdp(xy, mesh)))
  close(got, want)
  return float(got[0])


# --- estimators: the population split over processes ------------------------------------

def _es_problem():
  def loss(p):
    return jnp.sum(jnp.tanh(p["a"] @ p["b"]) ** 2) + jnp.sum(jnp.round(p["a"] * 4.0))

  params = {"a": np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4),
            "b": np.linspace(0.5, -0.5, 8, dtype=np.float32).reshape(4, 2)}
  return loss, params


ES = dict(sigma=0.1, num_samples=4 * N, shaping="centered_rank")


def case_es_gradient_population_over_processes():
  loss, params = _es_problem()
  want = fetch(jax.jit(lambda p: gradtx.es_gradient(loss, p, jax.random.key(4), **ES))(
      one_device(params)))
  out = {}
  for kind in ("auto", "explicit"):
    mesh = jax.make_mesh((N,), ("pop",), axis_types=(MESHES[kind].axis_types[0],))
    with _Layout(kind, {kind: mesh}, replicated):
      key = jax.random.key(4)  # under set_mesh for "explicit"
      p = replicated(params, mesh)
      est = jax.jit(lambda p, k, mesh=mesh: gradtx.es_gradient(
          loss, p, k, mesh=mesh, axis_name="pop", **ES))(p, key)
    est = fetch(est)
    close(est, want)
    out[kind] = digest(est)
  return out


def case_es_gradient_eager_on_replicated_params():
  """Outside jit (the sigma-resolution check reads the params on the host)."""
  loss, params = _es_problem()
  want = fetch(gradtx.es_gradient(loss, one_device(params), jax.random.key(4), **ES))
  mesh = jax.make_mesh((N,), ("pop",), axis_types=(AxisType.Auto,))
  est = gradtx.es_gradient(loss, replicated(params, mesh), jax.random.key(4), mesh=mesh,
                           axis_name="pop", **ES)
  close(fetch(est), want)


def case_zeroth_order_population_over_processes():
  loss, params = _es_problem()
  mesh = jax.make_mesh((N,), ("pop",), axis_types=(AxisType.Auto,))

  def steps(tx, p):
    state = tx.init(p)
    update = jax.jit(lambda u, s, p: tx.update(u, s, p, loss_fn=loss))
    for _ in range(2):
      u, state = update(jax.tree.map(jnp.zeros_like, p), state, p)
      p = optax.apply_updates(p, u)
    return p

  want = fetch(steps(gradtx.zeroth_order("es", key=jax.random.key(1), **ES),
                     one_device(params)))
  got = fetch(steps(gradtx.zeroth_order("es", key=jax.random.key(1), mesh=mesh,
                                        axis_name="pop", **ES), replicated(params, mesh)))
  close(got, want)
  return digest(got)


# --- attribution: data-parallel Integrated Gradients ------------------------------------

def _ig_problem():
  r = np.random.default_rng(6)
  w1 = (r.standard_normal((5, 8)) / 2).astype(np.float32)
  w2 = (r.standard_normal((8, 3)) / 2).astype(np.float32)
  x = r.uniform(-1, 1, (2 * N, 5)).astype(np.float32)
  fn = lambda z: jnp.tanh(z @ w1) @ w2
  return fn, x


def case_integrated_gradients_data_parallel():
  fn, x = _ig_problem()
  ig = lambda z: gradtx.integrated_gradients(fn, z, target=1, steps=8, return_delta=True)
  want = fetch(jax.jit(ig)(one_device(x)))
  for kind in ("auto", "explicit"):
    mesh = DATA_MESHES[kind]
    with _Layout(kind, DATA_MESHES):
      xs = put(x, mesh, P("data"))
      jitted = jax.jit(ig)(xs)
      mapped = jax.jit(jax.shard_map(ig, mesh=mesh, in_specs=P("data"),
                                     out_specs=P("data")))(xs)
    assert jitted[0].sharding.spec[0] == "data", jitted[0].sharding
    for got in (jitted, mapped):
      close(fetch(got), want)
  return float(np.abs(want[1]).max())


# --- a checkpoint of a sharded optimizer state ------------------------------------------

def case_orbax_checkpoint_then_training_continues_bit_exactly():
  import orbax.checkpoint as ocp

  mesh = MESHES["auto"]
  tx = optax.chain(gradtx.clip_by_global_norm(1.0), optax.adam(1e-2))
  target = _tree(9)
  loss = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in
                       zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True))

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  p = fsdp(_tree(0), mesh)
  s = jax.jit(tx.init)(p)
  for _ in range(2):
    p, s = step(p, s)
  path = f"{CHECKPOINT_DIR}/state"
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, {"params": p, "opt_state": s})
  ckpt_tree = {"params": p, "opt_state": s}
  for _ in range(2):
    p, s = step(p, s)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, ckpt_tree)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(path, abstract)
  chex.assert_trees_all_equal(fetch(restored), fetch(ckpt_tree))
  rp, rs = restored["params"], restored["opt_state"]
  assert rp["dense"]["kernel"].sharding.is_equivalent_to(p["dense"]["kernel"].sharding, 2)
  for _ in range(2):
    rp, rs = step(rp, rs)
  chex.assert_trees_all_equal(fetch((rp, rs)), fetch((p, s)))
  return digest(rp)


# --- bad input across processes ---------------------------------------------------------

def _raises(error, match, fn):
  import pytest

  with pytest.raises(error, match=match):
    fn()


def case_bad_batch_not_divisible_by_all_processes_devices():
  params, x, encode, loss, _ = _clip_problem()
  mesh = DATA_MESHES["auto"]
  f = gradtx.sharded_cached_value_and_grad(encode, loss, mesh=mesh, chunk_size=1)
  x = x[: 4 * N - 2]
  _raises(ValueError, rf"{x.shape[0]} rows, which is not divisible by the {N} devices of "
                      r"mesh axis 'data'",
          lambda: f(replicated(params, mesh), put(x, mesh, P())))


def case_bad_fisher_mask_of_a_sharded_fisher():
  """``fisher_mask`` needs the whole Fisher on the host (a global quantile): a clear error
  naming the leaves; the gathered Fisher gives the single-process mask."""
  fisher = jax.tree.map(np.abs, _tree(8))
  sharded = fsdp(fisher, MESHES["auto"])
  _raises(ValueError, rf"fisher must be readable whole on this process \({jax.process_index()} "
                      rf"of {jax.process_count()}\).*'dense/kernel' \(shape \({4 * N}, 6\), "
                      r"P\('fsdp',\) over \d+ devices\).*process_allgather",
          lambda: gradtx.fisher_mask(sharded, 0.3))
  gathered = multihost_utils.process_allgather(sharded, tiled=True)
  chex.assert_trees_all_equal(fetch(gradtx.fisher_mask(gathered, 0.3)),
                              fetch(gradtx.fisher_mask(fisher, 0.3)))


def case_bad_es_gradient_on_fsdp_params_eagerly():
  """ES perturbs replicated params; FSDP-sharded ones are gathered (or refused clearly)."""
  loss, params = _es_problem()
  mesh = jax.make_mesh((N,), ("pop",), axis_types=(AxisType.Auto,))
  want = fetch(gradtx.es_gradient(loss, one_device(params), jax.random.key(4), **ES))
  sharded = {"a": put(params["a"], mesh, P(None, "pop")), "b": put(params["b"], mesh, P("pop"))}
  est = gradtx.es_gradient(loss, sharded, jax.random.key(4), mesh=mesh, axis_name="pop", **ES)
  close(fetch(est), want)


def case_exponentiated_gradient_init_on_fsdp_params():
  """EG's init checks positivity on the host: FSDP params of other processes."""
  params = jax.tree.map(np.abs, _tree(2))
  tx = gradtx.exponentiated_gradient(0.1)
  state = fetch(jax.jit(tx.init)(fsdp(params, MESHES["auto"])))  # traced: no host check
  del state
  tx.init(fsdp(params, MESHES["auto"]))  # eager: the host check


CASES = _multidevice.cases_of(globals())

if __name__ == "__main__":
  names = sys.argv[2:] or list(CASES)
  _multiprocess.report({name: CASES[name] for name in names})
