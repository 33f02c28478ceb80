"""Tests of ``sigmoid_contrastive`` (SigLIP) on one device, and of ``loss_inputs=``.

The reference is big_vision's formula written here in float64 numpy (value) and its
closed-form gradient ``g_ij = −z_ij σ(−z_ij s_ij) / B`` (w.r.t. ``a``, ``b``, ``τ``,
``β``). The ring versions are checked on 4 and 8 devices in ``test_contrastive_ring*.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx

RTOL, ATOL = 1e-5, 1e-6


def np_siglip(a, b, tau, bias, labels=None, normalize=True):
  """big_vision's ``-sum(log_sigmoid(z * logits)) / B`` and its gradient, float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if normalize:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
  n = a.shape[0]
  labels = np.arange(n) if labels is None else np.asarray(labels)
  z = np.where(labels[:, None] == labels[None, :], 1.0, -1.0)
  raw = a @ b.T
  s = raw / tau + bias
  loss = np.sum(np.logaddexp(0.0, -z * s)) / n  # -log σ(x) = log(1 + e^{-x})
  g = -z / (1.0 + np.exp(z * s)) / n  # ∂L/∂s = -z σ(-z s) / B
  grads = (g @ b / tau, g.T @ a / tau, -np.sum(g * raw) / tau**2, np.sum(g))
  return loss, grads


def data(batch, dim=6, seed=0):
  r = np.random.default_rng(seed)
  a = r.standard_normal((batch, dim)).astype(np.float32)
  return jnp.asarray(a), jnp.asarray(a + r.standard_normal((batch, dim)).astype(np.float32))


def _value_and_grads(a, b, tau, bias, **kwargs):
  fn = lambda a, b, t, c: gradtx.sigmoid_contrastive(a, b, temperature=t, bias=c, **kwargs)
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(a, b, jnp.float32(tau),
                                                                 jnp.float32(bias))


@pytest.mark.parametrize("block_size", [None, 4, 1, 64])
@pytest.mark.parametrize("with_labels", [False, True])
def test_value_and_gradients_match_numpy(block_size, with_labels):
  a, b = data(13)  # 13 rows: ragged last tile for blocks of 4
  labels = jnp.arange(13) % 4 if with_labels else None
  value, grads = _value_and_grads(a, b, 0.3, -2.0, labels=labels, normalize=False,
                                  block_size=block_size)
  want_value, want_grads = np_siglip(a, b, 0.3, -2.0, labels, normalize=False)
  np.testing.assert_allclose(value, want_value, rtol=RTOL)
  for got, want in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("block_size", [None, 5])
def test_normalized_value_matches_numpy(block_size):
  a, b = data(11, seed=1)
  value = gradtx.sigmoid_contrastive(a, b, temperature=0.1, bias=-10.0, block_size=block_size)
  np.testing.assert_allclose(value, np_siglip(a, b, 0.1, -10.0)[0], rtol=RTOL)


def test_paper_initialisation_closed_form():
  """t' = log 10, β = −10, identical orthonormal pairs: s = 10 − 10 = 0 on the diagonal."""
  t_prime, beta = jnp.log(10.0), -10.0
  a = jnp.eye(4)
  loss = gradtx.sigmoid_contrastive(a, a, temperature=jnp.exp(-t_prime), bias=beta)
  # diagonal: −log σ(0) = log 2; off-diagonal s = −10: −log σ(10) = log(1 + e^{−10}).
  want = (4 * np.log(2.0) + 12 * np.log1p(np.exp(-10.0))) / 4
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_normalisation_is_by_batch_not_pairs():
  """Doubling the batch with copies of every pair (labels keep them positive) doubles L."""
  a, b = data(5, seed=2)
  labels = jnp.arange(5)
  one = gradtx.sigmoid_contrastive(a, b, temperature=0.5, bias=0.0, labels=labels)
  two = gradtx.sigmoid_contrastive(jnp.concatenate([a, a]), jnp.concatenate([b, b]),
                                   temperature=0.5, bias=0.0,
                                   labels=jnp.concatenate([labels, labels]))
  np.testing.assert_allclose(two, 2 * one, rtol=1e-5)


def test_bf16_inputs_compute_in_float32():
  """bf16 representations are upcast: equal to float64 of the rounded inputs (1e-5)."""
  a, b = data(12, seed=3)
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  for block_size in (None, 5):
    value, grads = jax.value_and_grad(
        lambda a, b, bs=block_size: gradtx.sigmoid_contrastive(
            a, b, temperature=0.2, bias=-1.0, block_size=bs, normalize=False),
        argnums=(0, 1))(a16, b16)
    want, want_grads = np_siglip(a16.astype(np.float32), b16.astype(np.float32), 0.2, -1.0,
                                 normalize=False)
    assert value.dtype == jnp.float32 and grads[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(value, want, rtol=RTOL)
    # the gradient is rounded to bf16 (8 bits of mantissa): 1% relative.
    np.testing.assert_allclose(grads[0].astype(np.float32), want_grads[0], rtol=1e-2,
                               atol=1e-3)


def test_float64_inputs_compute_in_float64():
  with jax.enable_x64(True):
    a, b = (x.astype(jnp.float64) for x in data(9, seed=4))
    value = gradtx.sigmoid_contrastive(a, b, temperature=0.3, bias=-2.0, block_size=4)
    assert value.dtype == jnp.float64
    np.testing.assert_allclose(value, np_siglip(a, b, 0.3, -2.0)[0], rtol=1e-12)


def test_traced_nonpositive_temperature_gives_nan():
  a, b = data(4)
  for block_size in (None, 2):
    loss = jax.jit(lambda t, bs=block_size: gradtx.sigmoid_contrastive(
        a, b, temperature=t, bias=0.0, block_size=bs))(jnp.float32(-1.0))
    assert np.isnan(float(loss))


def test_blockwise_value_and_grad_at_65536_needs_under_1_gib():
  """Compiled only: the dense B × B logits alone would be 16 GiB."""
  shape = jax.ShapeDtypeStruct((65536, 128), jnp.float32)
  fn = lambda a, b: gradtx.sigmoid_contrastive(a, b, temperature=0.1, bias=-10.0,
                                               block_size=1024)
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(shape, shape).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < 2**30


def test_trains_siglip_parameters_to_separate_pairs():
  """Adam steps on t' and β alone lower the loss (both gradients live, tiled, jitted)."""
  import optax

  a, b = data(16, seed=5)
  params = {"t_prime": jnp.log(10.0), "bias": jnp.float32(-10.0)}
  loss = lambda p: gradtx.sigmoid_contrastive(a, b, temperature=jnp.exp(-p["t_prime"]),
                                              bias=p["bias"], block_size=8)
  tx = optax.adam(0.1)
  state = tx.init(params)
  step = jax.jit(lambda p, s: (lambda g: (optax.apply_updates(p, tx.update(g, s)[0]),
                                          tx.update(g, s)[1]))(jax.grad(loss)(p)))
  first = float(loss(params))
  for _ in range(20):
    params, state = step(params, state)
  assert float(loss(params)) < 0.9 * first


# ------------------------------------------------------------- labels under caching


def test_cached_value_and_grad_with_loss_inputs_labels_equals_autodiff():
  """SupCon and InfoNCE with labels= passed per call (loss_inputs) through the two passes."""
  r = np.random.default_rng(6)
  params = {"w": jnp.asarray(r.standard_normal((5, 4)), jnp.float32), "tau": jnp.float32(0.3)}
  x = jnp.asarray(r.standard_normal((14, 5)), jnp.float32)
  labels = jnp.asarray(r.integers(0, 3, 14), jnp.int32)
  encode = lambda p, x, rng: jnp.tanh(x @ p["w"])

  def loss(p, h, labels):
    supcon = gradtx.supervised_contrastive(h, labels, temperature=p["tau"], block_size=4)
    return supcon + gradtx.info_nce(h[:7], h[7:], labels=labels[:7], temperature=p["tau"])

  f = jax.jit(gradtx.cached_value_and_grad(encode, loss, chunk_size=4))
  got = f(params, x, loss_inputs=labels)
  want = jax.value_and_grad(lambda p: loss(p, encode(p, x, None), labels))(params)
  import chex

  chex.assert_trees_all_close(got, want, rtol=RTOL, atol=ATOL)
  # New labels, same compiled f (no retrace): still exact.
  other = (labels + 1) % 3
  want = jax.value_and_grad(lambda p: loss(p, encode(p, x, None), other))(params)
  chex.assert_trees_all_close(f(params, x, loss_inputs=other), want, rtol=RTOL, atol=ATOL)
