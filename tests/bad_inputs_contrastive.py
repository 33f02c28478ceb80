"""Bad-input rows of gradtx.contrastive: the losses, the cached and sharded gradients.

Every row is cheap: arrays of a few rows, errors raised at construction, at the start of
a call or while tracing (nothing is compiled, except the one ``check`` row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from _bad_inputs import Case

import gradtx

Z = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)
W = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2)), jnp.float32)


def _encode(p, x, rng):
  return x @ p


def _dropout_encode(p, x, rng):
  return jnp.where(jax.random.bernoulli(rng, 0.5, x.shape), x, 0.0) @ p


def _loss(p, h):
  return gradtx.nt_xent(h[::2], h[1::2], temperature=0.5)


def _cached(encode=_encode, loss=_loss, **kwargs):
  return gradtx.cached_value_and_grad(encode, loss, **{"chunk_size": 2, **kwargs})


def _sharded(encode=_encode, **kwargs):
  kwargs = {"mesh": jax.make_mesh((1,), ("data",)), "chunk_size": 2, **kwargs}
  return gradtx.sharded_cached_value_and_grad(encode, _loss, **kwargs)


def _check_nan(value):
  assert np.isnan(float(value)), value


def _check_plain_autodiff(result):
  # One chunk larger than the batch: the remainder is the whole batch, exactly autodiff.
  value, grads = result
  ref_value, ref_grads = jax.value_and_grad(lambda p: _loss(p, Z @ p))(W)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  np.testing.assert_allclose(grads, ref_grads, rtol=1e-5, atol=1e-6)


CASES = [
    # --- the losses: temperature (#13: a 1-D temperature broadcast per column)
    Case("contrastive-info_nce-temperature-1d",
         lambda: gradtx.info_nce(Z, Z, temperature=jnp.full(4, 0.1)),
         ValueError, r"temperature must be a scalar.*shape \(4,\)"),
    Case("contrastive-info_nce-temperature-1d-traced",
         lambda: jax.jit(lambda t: gradtx.info_nce(Z, Z, temperature=t))(jnp.full(4, 0.1)),
         ValueError, r"temperature must be a scalar.*shape \(4,\)"),
    Case("contrastive-info_nce-temperature-zero",
         lambda: gradtx.info_nce(Z, Z, temperature=0.0),
         ValueError, r"temperature must be a finite number > 0, got 0\.0"),
    Case("contrastive-nt_xent-temperature-negative",
         lambda: gradtx.nt_xent(Z, Z, temperature=-1),
         ValueError, r"temperature must be a finite number > 0, got -1"),
    Case("contrastive-supcon-temperature-none",
         lambda: gradtx.supervised_contrastive(Z, jnp.arange(4), temperature=None),
         TypeError, r"temperature must be .*got None"),
    Case("contrastive-info_nce-temperature-schedule",
         lambda: gradtx.info_nce(Z, Z, temperature=lambda count: 0.1),
         TypeError, r"temperature must be a number, not a schedule"),
    Case("contrastive-info_nce-temperature-traced-negative",
         lambda: jax.jit(lambda t: gradtx.info_nce(Z, Z, temperature=t))(jnp.float32(-0.5)),
         check=_check_nan),
    Case("contrastive-nt_xent-temperature-traced-zero-blockwise",
         lambda: jax.jit(lambda t: gradtx.nt_xent(Z, Z, temperature=t, block_size=2))(
             jnp.float32(0.0)),
         check=_check_nan),
    # --- block_size, flags, shapes, dtypes
    Case("contrastive-nt_xent-block_size-traced",
         lambda: jax.jit(lambda b: gradtx.nt_xent(Z, Z, temperature=0.5, block_size=b))(2),
         TypeError, r"block_size must be a static Python value"),
    Case("contrastive-supcon-block_size-zero",
         lambda: gradtx.supervised_contrastive(Z, jnp.arange(4), temperature=0.5,
                                               block_size=0),
         ValueError, r"block_size must be an int >= 1, got 0"),
    Case("contrastive-info_nce-block_size-float",
         lambda: gradtx.info_nce(Z, Z, temperature=0.5, block_size=2.0),
         TypeError, r"block_size must be an int >= 1, got 2\.0"),
    Case("contrastive-info_nce-symmetric-string",
         lambda: gradtx.info_nce(Z, Z, temperature=0.5, symmetric="yes"),
         TypeError, r"symmetric must be a bool, got 'yes'"),
    Case("contrastive-info_nce-normalize-none",
         lambda: gradtx.info_nce(Z, Z, temperature=0.5, normalize=None),
         TypeError, r"normalize must be a bool, got None"),
    Case("contrastive-info_nce-complex",
         lambda: gradtx.info_nce(Z.astype(jnp.complex64), Z, temperature=0.5),
         TypeError, r"a must be a real array, got dtype complex64"),
    Case("contrastive-info_nce-labels-float",
         lambda: gradtx.info_nce(Z, Z, temperature=0.5, labels=jnp.zeros(4)),
         ValueError, r"labels must be an integer array of shape \(4,\), got float32"),
    Case("contrastive-supcon-labels-length",
         lambda: gradtx.supervised_contrastive(Z, jnp.arange(3), temperature=0.5),
         ValueError, r"labels must be an integer array of shape \(4,\).*shape \(3,\)"),
    Case("contrastive-nt_xent-views-differ",
         lambda: gradtx.nt_xent(Z, Z[:3], temperature=0.5),
         ValueError, r"z1 and z2 must have the same shape.*\(4, 3\).*\(3, 3\)"),
    Case("contrastive-supcon-z-1d",
         lambda: gradtx.supervised_contrastive(Z[0], jnp.arange(3), temperature=0.5),
         ValueError, r"z must be a 2-D array \(batch, features\), got shape \(3,\)"),
    Case("contrastive-l2_normalize-eps-zero",
         lambda: gradtx.l2_normalize(Z, eps=0.0),
         ValueError, r"eps must be a finite number > 0, got 0\.0"),
    # --- representation_grad / surrogate_loss (#13: a transposed G)
    Case("contrastive-surrogate_loss-transposed",
         lambda: gradtx.surrogate_loss({"h": Z @ W}, {"h": (Z @ W).T}),
         ValueError, r"reps_grad must have the leaf shapes of reps; these differ: "
                     r"h: \(2, 4\) vs \(4, 2\)"),
    Case("contrastive-surrogate_loss-missing-leaf",
         lambda: gradtx.surrogate_loss({"a": Z, "b": Z}, {"a": Z}),
         ValueError, r"reps_grad must have the structure of reps: missing \['b'\]"),
    Case("contrastive-surrogate_loss-scale-zero",
         lambda: gradtx.surrogate_loss(Z, Z, scale=0),
         ValueError, r"scale must be a finite number > 0, got 0"),
    Case("contrastive-representation_grad-int-reps",
         lambda: gradtx.representation_grad(_loss, W, {"h": jnp.ones((4, 2), jnp.int32)}),
         TypeError, r"reps must hold floating arrays.*h \(int32\)"),
    Case("contrastive-representation_grad-has_aux-string",
         lambda: gradtx.representation_grad(_loss, W, Z, has_aux="no"),
         TypeError, r"has_aux must be a bool, got 'no'"),
    # --- cached_value_and_grad: construction
    Case("contrastive-cached-encode_fn-without-rng",
         lambda: _cached(encode=lambda p, x: x @ p),
         TypeError, r"encode_fn must take three positional arguments \(params, inputs_chunk, "
                    r"rng\).*\(p, x\).*def encode_fn\(params, inputs, rng\)"),
    Case("contrastive-cached-encode_fn-keyword-only-rng",
         lambda: _cached(encode=lambda p, x, *, rng: x @ p),
         TypeError, r"encode_fn must take three positional arguments.*\(p, x, \*, rng\)"),
    Case("contrastive-cached-encode_fn-not-callable",
         lambda: _cached(encode=None),
         TypeError, r"encode_fn must be a function encode_fn\(params, inputs_chunk, rng\)"),
    Case("contrastive-cached-loss_fn-not-callable",
         lambda: _cached(loss="info_nce"),
         TypeError, r"loss_fn must be a function.*got 'info_nce'"),
    Case("contrastive-cached-chunk_size-zero",
         lambda: _cached(chunk_size=0),
         ValueError, r"chunk_size must be an int >= 1, got 0"),
    Case("contrastive-cached-chunk_size-traced",
         lambda: jax.jit(lambda c: _cached(chunk_size=c)(W, Z)[0])(2),
         TypeError, r"chunk_size must be a static Python value"),
    Case("contrastive-cached-method-unknown",
         lambda: _cached(method="gradcache"),
         ValueError, r"method must be one of 'two_pass', 'remat', got 'gradcache'"),
    Case("contrastive-cached-has_aux-string",
         lambda: _cached(has_aux="yes"),
         TypeError, r"has_aux must be a bool, got 'yes'"),
    # --- cached_value_and_grad: the call (#13: keys, a positional key, a missing key)
    Case("contrastive-cached-rng-positional",
         lambda: _cached(encode=_dropout_encode)(W, Z, jax.random.key(0)),
         TypeError, r"pass the random key by keyword: f\(params, inputs, rng=key\)"),
    Case("contrastive-cached-rng-missing",
         lambda: _cached(encode=_dropout_encode)(W, Z),
         TypeError, r"encode_fn uses its rng, but no key was passed.*"
                    r"f\(params, inputs, rng=jax\.random\.key\(0\)\)"),
    Case("contrastive-cached-rng-missing-remat",
         lambda: _cached(encode=_dropout_encode, method="remat")(W, Z),
         TypeError, r"encode_fn uses its rng, but no key was passed"),
    Case("contrastive-cached-rng-int",
         lambda: _cached(encode=_dropout_encode)(W, Z, rng=0),
         TypeError, r"rng must be a jax\.random key .*got 0"),
    Case("contrastive-cached-rng-float-array",
         lambda: _cached(encode=_dropout_encode)(W, Z, rng=jnp.zeros(2)),
         TypeError, r"rng must be a jax\.random key .*float32"),
    Case("contrastive-cached-rng-batch-of-keys",
         lambda: _cached(encode=_dropout_encode)(W, Z, rng=jax.random.split(
             jax.random.key(0))),
         ValueError, r"rng must be a single key \(shape \(\)\), got shape \(2,\)"),
    Case("contrastive-cached-inputs-empty",
         lambda: _cached()(W, Z[:0]),
         ValueError, r"inputs must have at least one row"),
    Case("contrastive-cached-inputs-no-leaves",
         lambda: _cached()(W, {}),
         ValueError, r"inputs must hold at least one array"),
    Case("contrastive-cached-inputs-batch-sizes",
         lambda: _cached(encode=lambda p, x, rng: x["a"] @ p)(W, {"a": Z, "b": Z[:3]}),
         ValueError, r"every leaf of inputs must have the same batch size.*"
                     r"\['a'\]: 4.*\['b'\]: 3"),
    Case("contrastive-cached-reps-1d",
         lambda: _cached(encode=lambda p, x, rng: {"h": (x @ p)[:, 0]})(W, Z),
         ValueError, r"encode_fn must return 2-D representations.*\['h'\] has shape \(2,\)"),
    Case("contrastive-cached-reps-int",
         lambda: _cached(encode=lambda p, x, rng: {"h": (x @ p).astype(jnp.int32)})(W, Z),
         TypeError, r"representations returned by encode_fn.*h \(int32\)"),
    Case("contrastive-cached-chunk-larger-than-batch",
         lambda: jax.jit(_cached(chunk_size=8))(W, Z),
         check=_check_plain_autodiff),
    # --- sharded_cached_value_and_grad (#13: no mesh)
    Case("contrastive-sharded-no-mesh",
         lambda: gradtx.sharded_cached_value_and_grad(_encode, _loss, chunk_size=2),
         TypeError, r"needs mesh=.*mesh=jax\.make_mesh\(\(jax\.device_count\(\),\), "
                    r"\('data',\)\).*cached_value_and_grad"),
    Case("contrastive-sharded-mesh-devices",
         lambda: _sharded(mesh=jax.devices()),
         TypeError, r"mesh must be a jax\.sharding\.Mesh .*got list"),
    Case("contrastive-sharded-batch_axis-unknown",
         lambda: _sharded(batch_axis="batch"),
         ValueError, r"batch_axis must be an axis of the mesh, one of \('data',\), got 'batch'"),
    Case("contrastive-sharded-encode_fn-without-rng",
         lambda: _sharded(encode=lambda p, x: x @ p),
         TypeError, r"encode_fn must take three positional arguments"),
    Case("contrastive-sharded-chunk_size-negative",
         lambda: _sharded(chunk_size=-1),
         ValueError, r"chunk_size must be an int >= 1, got -1"),
    Case("contrastive-sharded-rng-positional",
         lambda: _sharded(encode=_dropout_encode)(W, Z, jax.random.key(0)),
         TypeError, r"pass the random key by keyword: f\(params, inputs, rng=key\)"),
    Case("contrastive-sharded-rng-int",
         lambda: _sharded(encode=_dropout_encode)(W, Z, rng=7),
         TypeError, r"rng must be a jax\.random key .*got 7"),
    # --- sigmoid_contrastive and the ring losses (#16)
    Case("contrastive-sigmoid-bias-1d",
         lambda: gradtx.sigmoid_contrastive(Z, Z, temperature=0.1, bias=jnp.zeros(4)),
         ValueError, r"bias must be a scalar.*shape \(4,\)"),
    Case("contrastive-sigmoid-bias-1d-traced",
         lambda: jax.jit(lambda c: gradtx.sigmoid_contrastive(Z, Z, temperature=0.1, bias=c))(
             jnp.zeros((1,))),
         ValueError, r"bias must be a scalar.*shape \(1,\)"),
    Case("contrastive-sigmoid-bias-none",
         lambda: gradtx.sigmoid_contrastive(Z, Z, temperature=0.1, bias=None),
         TypeError, r"bias must be .*got None"),
    Case("contrastive-sigmoid-bias-nan",
         lambda: gradtx.sigmoid_contrastive(Z, Z, temperature=0.1, bias=float("nan")),
         ValueError, r"bias must be a finite number, got nan"),
    Case("contrastive-sigmoid-temperature-2d",
         lambda: gradtx.sigmoid_contrastive(Z, Z, temperature=jnp.ones((1, 1)), bias=0.0),
         ValueError, r"temperature must be a scalar.*shape \(1, 1\)"),
    Case("contrastive-sigmoid-temperature-zero",
         lambda: gradtx.sigmoid_contrastive(Z, Z, temperature=0, bias=-10.0),
         ValueError, r"temperature must be a finite number > 0, got 0"),
    Case("contrastive-sigmoid-temperature-negative-blockwise",
         lambda: gradtx.sigmoid_contrastive(Z, Z, temperature=-0.1, bias=-10.0, block_size=2),
         ValueError, r"temperature must be a finite number > 0, got -0\.1"),
    Case("contrastive-sigmoid-towers-batch",
         lambda: gradtx.sigmoid_contrastive(Z, Z[:3], temperature=0.1, bias=0.0),
         ValueError, r"a and b must have the same batch size.*\(4, 3\).*\(3, 3\)"),
    Case("contrastive-sigmoid-labels-shape",
         lambda: gradtx.sigmoid_contrastive(Z, Z, temperature=0.1, bias=0.0,
                                            labels=jnp.arange(3)),
         ValueError, r"labels must be an integer array of shape \(4,\)"),
    Case("contrastive-ring-axis_name-unbound",
         lambda: gradtx.info_nce(Z, Z, temperature=0.1, axis_name="data"),
         ValueError, r"axis_name='data' is not bound.*jax\.shard_map"),
    Case("contrastive-ring-sigmoid-axis_name-unbound-in-jit",
         lambda: jax.jit(lambda a: gradtx.sigmoid_contrastive(
             a, a, temperature=0.1, bias=0.0, axis_name="batch"))(Z),
         ValueError, r"axis_name='batch' is not bound"),
    Case("contrastive-ring-axis_name-wrong-axis",
         lambda: _in_shard_map(lambda a, b: gradtx.nt_xent(a, b, temperature=0.1,
                                                           axis_name="model"), Z, Z),
         ValueError, r"axis_name='model' is not bound"),
    Case("contrastive-ring-axis_name-tuple",
         lambda: gradtx.info_nce(Z, Z, temperature=0.1, axis_name=("data",)),
         TypeError, r"axis_name must be None or the name \(a str\)"),
    Case("contrastive-ring-local-batches-differ",
         lambda: _in_shard_map(lambda a, b: gradtx.sigmoid_contrastive(
             a, b, temperature=0.1, bias=0.0, axis_name="data"), Z, Z[:3]),
         ValueError, r"a and b must have the same batch size \(towers are paired row by "
                     r"row\) \(the local batches .*'data'.*a\.shape=\(4, 3\).*"
                     r"b\.shape=\(3, 3\)"),
    Case("contrastive-sharded-loss_comm-unknown",
         lambda: _sharded(loss_comm="reduce_scatter"),
         ValueError, r"loss_comm.*'all_gather', 'ring'.*reduce_scatter"),
    Case("contrastive-cached-loss_inputs-rows",
         lambda: _cached(loss=lambda p, h, labels: _loss(p, h))(W, Z, loss_inputs=jnp.arange(3)),
         ValueError, r"loss_inputs must have one row per sample.*4 rows.*got 3"),
]


def _in_shard_map(fn, a, b):
  """``fn(a, b)`` inside a one-device shard_map (``a`` sharded, ``b`` replicated)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((1,), ("data",))
  a = jax.device_put(a, NamedSharding(mesh, P("data")))
  b = jax.device_put(b, NamedSharding(mesh, P()))
  return jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P()), out_specs=P())(a, b)
