"""Tests of gradtx/contrastive/_blockwise.py: the streaming loss equals the dense one.

Row losses are checked against a float64 numpy re-implementation written here; the
public losses (values and gradients w.r.t. both inputs and a learnable temperature)
against the dense path, which is plain autodiff over the full matrix. The memory claim
is checked by compiling (not running) the blockwise gradient at B = 65536.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.contrastive import _blockwise, _losses
from gradtx.contrastive._blockwise import blockwise_row_losses

RTOL = 1e-5
ATOL = 1e-6


# ----------------------------------------------------------------------------- references


def np_row_losses(q, k, q_labels, k_labels, inv_temperature, *, exclude_self):
  """ℓ_i = logsumexp_{A(i)} s_ij - mean_{P(i)} s_ij in float64 numpy, row by row."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  s = q @ k.T * float(inv_temperature)
  losses, has_positive = [], []
  for i in range(q.shape[0]):
    allowed = [j for j in range(k.shape[0]) if not (exclude_self and j == i)]
    positives = [j for j in allowed if k_labels[j] == q_labels[i]]
    has_positive.append(bool(positives))
    if not positives:
      losses.append(0.0)
      continue
    m = max(s[i, j] for j in allowed)
    lse = m + np.log(sum(np.exp(s[i, j] - m) for j in allowed))
    losses.append(lse - np.mean([s[i, j] for j in positives]))
  return np.array(losses), np.array(has_positive)


def data(batch, dim=8, seed=0):
  key_a, key_b = jax.random.split(jax.random.key(seed))
  return jax.random.normal(key_a, (batch, dim)), jax.random.normal(key_b, (batch, dim))


# ------------------------------------------------------------------------------ row level


@pytest.mark.parametrize(
    ("num_rows", "num_cols", "block_size", "exclude_self"),
    [(10, 10, 3, False), (10, 10, 3, True), (7, 10, 4, True), (10, 7, 4, False), (5, 5, 1, True)],
)
def test_row_losses_match_numpy(num_rows, num_cols, block_size, exclude_self):
  q, _ = data(num_rows, seed=1)
  _, k = data(num_cols, seed=2)
  q_labels = jnp.arange(num_rows) % 3
  k_labels = jnp.arange(num_cols) % 4  # label 3 only among k: some rows lack positives
  q_labels = q_labels.at[0].set(7)  # a row with no positive at all
  rows = jax.jit(functools.partial(blockwise_row_losses, exclude_self=exclude_self,
                                   block_size=block_size))
  loss, has_positive = rows(q, k, q_labels, k_labels, 2.0)
  want_loss, want_has = np_row_losses(q, k, np.asarray(q_labels), np.asarray(k_labels), 2.0,
                                      exclude_self=exclude_self)
  assert loss.shape == (num_rows,) and loss.dtype == jnp.float32
  np.testing.assert_array_equal(has_positive, want_has)
  np.testing.assert_allclose(loss, want_loss, rtol=RTOL, atol=ATOL)


def test_row_vjp_matches_dense_with_arbitrary_cotangent():
  q, k = data(11, seed=3)
  labels = jnp.arange(11) % 4
  cot = jax.random.normal(jax.random.key(4), (11,))

  def total(fn, q, k, inv_t, **kw):
    loss, _ = fn(q, k, labels, labels, inv_t, exclude_self=True, **kw)
    return jnp.sum(loss * cot)

  args = (q, k, jnp.float32(1.7))
  want = jax.jit(jax.grad(lambda *a: total(_losses.dense_row_losses, *a),
                          argnums=(0, 1, 2)))(*args)
  got = jax.jit(jax.grad(lambda *a: total(blockwise_row_losses, *a, block_size=4),
                         argnums=(0, 1, 2)))(*args)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("num_rows", "num_cols", "block_size"), [(10, 7, 4), (7, 10, 3)])
def test_two_sided_columns_match_numpy_and_their_vjp_matches_dense(num_rows, num_cols,
                                                                   block_size):
  """One pass gives the rows' losses of q→k and k→q (the columns of the same scores)."""
  q, _ = data(num_rows, seed=8)
  _, k = data(num_cols, seed=9)
  q_labels, k_labels = jnp.arange(num_rows) % 3, jnp.arange(num_cols) % 4
  two_sided = lambda q, k, inv_t: _blockwise.tiled_losses(
      _blockwise.Softmax, q, k, q_labels, k_labels, inv_t, exclude_self=False,
      block_size=block_size, mode="both")
  (rows, rows_ok), (cols, cols_ok) = jax.jit(two_sided)(q, k, 2.0)
  labels = np.asarray(q_labels), np.asarray(k_labels)
  for (got, got_ok), (x, y, lx, ly) in [((rows, rows_ok), (q, k) + labels),
                                        ((cols, cols_ok), (k, q) + labels[::-1])]:
    want, want_ok = np_row_losses(x, y, lx, ly, 2.0, exclude_self=False)
    np.testing.assert_array_equal(got_ok, want_ok)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

  c_rows = jax.random.normal(jax.random.key(1), (num_rows,))
  c_cols = jax.random.normal(jax.random.key(2), (num_cols,))

  def dense(q, k, inv_t):
    forward = _losses.dense_row_losses(q, k, q_labels, k_labels, inv_t, exclude_self=False)
    backward = _losses.dense_row_losses(k, q, k_labels, q_labels, inv_t, exclude_self=False)
    return jnp.sum(forward[0] * c_rows) + jnp.sum(backward[0] * c_cols)

  def tiled(q, k, inv_t):
    (rows, _), (cols, _) = two_sided(q, k, inv_t)
    return jnp.sum(rows * c_rows) + jnp.sum(cols * c_cols)

  args = (q, k, jnp.float32(1.3))
  want = jax.jit(jax.grad(dense, argnums=(0, 1, 2)))(*args)
  got = jax.jit(jax.grad(tiled, argnums=(0, 1, 2)))(*args)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("block_size", [4, 11])
def test_self_pairs_vjp_matches_dense_with_arbitrary_cotangent(block_size):
  """``mode="self"`` (k is q): the travelling rows' share lands on the local rows."""
  z, _ = data(11, seed=10)
  labels = (jnp.arange(11) % 4).at[3].set(9)  # row 3 has no positive
  cot = jax.random.normal(jax.random.key(5), (11,))

  def self_pairs(z, inv_t):
    (loss, counted), = _blockwise.tiled_losses(
        _blockwise.Softmax, z, None, labels, None, inv_t, exclude_self=True,
        block_size=block_size, mode="self")
    return jnp.sum(loss * cot), counted

  def dense(z, inv_t):
    loss, counted = _losses.dense_row_losses(z, z, labels, labels, inv_t, exclude_self=True)
    return jnp.sum(loss * cot), counted

  args = (z, jnp.float32(1.7))
  (want, want_ok), want_grads = jax.jit(jax.value_and_grad(dense, argnums=(0, 1),
                                                           has_aux=True))(*args)
  (got, got_ok), grads = jax.jit(jax.value_and_grad(self_pairs, argnums=(0, 1),
                                                    has_aux=True))(*args)
  np.testing.assert_array_equal(got_ok, want_ok)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  for g, w in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_rows_without_positive_give_zero_loss_and_zero_gradient():
  z, _ = data(6)
  labels = jnp.arange(6)  # every label unique: no anchor has a positive
  loss, grad = jax.jit(jax.value_and_grad(
      lambda z: gradtx.supervised_contrastive(z, labels, temperature=0.5, block_size=4)))(z)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, jnp.zeros_like(z))


def test_float64_inputs_compute_in_float64():
  with jax.enable_x64(True):
    q, k = (x.astype(jnp.float64) for x in data(9, seed=5))
    labels = jnp.arange(9) % 2
    total = lambda q: blockwise_row_losses(
        q, k, labels, labels, 3.0, exclude_self=False, block_size=4)[0].sum()
    loss, grad = jax.jit(jax.value_and_grad(total))(q)
    want, _ = np_row_losses(q, k, np.asarray(labels), np.asarray(labels), 3.0,
                            exclude_self=False)
    assert loss.dtype == jnp.float64 and grad.dtype == jnp.float64
    np.testing.assert_allclose(loss, want.sum(), rtol=1e-12)


# --------------------------------------------------------------------------- public losses


def _info_nce(a, b, temperature, block_size):
  return gradtx.info_nce(a, b, temperature=temperature, block_size=block_size)


def _info_nce_labels(a, b, temperature, block_size):
  labels = jnp.arange(a.shape[0]) % 3  # several positives per row
  return gradtx.info_nce(a, b, temperature=temperature, labels=labels,
                         block_size=block_size)


def _info_nce_one_way(a, b, temperature, block_size):
  return gradtx.info_nce(a, b, temperature=temperature, symmetric=False, normalize=False,
                         block_size=block_size)


def _nt_xent(a, b, temperature, block_size):
  return gradtx.nt_xent(a, b, temperature=temperature, block_size=block_size)


def _supcon(a, b, temperature, block_size):
  z = jnp.concatenate([a, b])
  labels = jnp.arange(z.shape[0]) % 5
  return gradtx.supervised_contrastive(z, labels, temperature=temperature,
                                       block_size=block_size)


LOSSES = {
    "info_nce": _info_nce,
    "info_nce_labels": _info_nce_labels,
    "info_nce_one_way": _info_nce_one_way,
    "nt_xent": _nt_xent,
    "supervised_contrastive": _supcon,
}


# (loss, block_size) over a batch of 12 (24 rows for the one-tower losses): every loss
# with a ragged last block; block sizes 1, equal to a divisor and larger than the batch.
CASES = [
    ("info_nce", 5), ("info_nce", 64),
    ("info_nce_labels", 5), ("info_nce_labels", 1),
    ("info_nce_one_way", 4),
    ("nt_xent", 5), ("nt_xent", 1),
    ("supervised_contrastive", 7), ("supervised_contrastive", 64),
]
_DENSE = {}


def _value_and_grads(name, block_size):
  a, b = data(12, seed=6)
  log_tau = jnp.log(jnp.float32(0.3))
  fn = lambda a, b, log_tau: LOSSES[name](a, b, jnp.exp(log_tau), block_size)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(a, b, log_tau)


@pytest.mark.parametrize(("name", "block_size"), CASES)
def test_public_loss_and_gradients_match_dense(name, block_size):
  if name not in _DENSE:
    _DENSE[name] = _value_and_grads(name, None)
  want_value, want_grads = _DENSE[name]
  value, grads = _value_and_grads(name, block_size)
  np.testing.assert_allclose(value, want_value, rtol=RTOL)
  for got, want in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  assert float(jnp.abs(grads[2])) > 0  # the temperature really is learned through it


def test_jitted_value_matches_eager_dense():
  a, b = data(10, seed=7)
  jitted = jax.jit(lambda a, b: gradtx.nt_xent(a, b, temperature=0.2, block_size=3))
  dense = jax.jit(lambda a, b: gradtx.nt_xent(a, b, temperature=0.2))
  np.testing.assert_allclose(jitted(a, b), dense(a, b), rtol=RTOL)


def test_nan_input_propagates_visibly():
  a, b = data(6)
  a = a.at[2, 0].set(jnp.nan)
  loss = jax.jit(lambda a, b: gradtx.info_nce(a, b, temperature=0.1, normalize=False,
                                             block_size=4))(a, b)
  assert jnp.isnan(loss)


def test_bad_block_size_is_rejected():
  a, b = data(4)
  with pytest.raises(ValueError, match="block_size"):
    gradtx.info_nce(a, b, temperature=0.1, block_size=0)


# ---------------------------------------------------------------------------------- memory


def test_value_and_grad_at_65536_needs_under_1_gib_of_temporaries():
  """Compiled only: the dense matrix alone would be 16 GiB (dense needs far more)."""
  shape = jax.ShapeDtypeStruct((65536, 128), jnp.float32)

  def temp_bytes(block_size):
    fn = lambda a, b: gradtx.info_nce(a, b, temperature=0.1, block_size=block_size)
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(shape, shape).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  blockwise = temp_bytes(1024)
  assert blockwise < 2**30, f"{blockwise / 2**20:.0f} MiB"
  assert temp_bytes(None) > 16 * 2**30  # the measurement does see the dense matrix
