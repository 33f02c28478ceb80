"""Tests of gradtx.contrastive against independent references.

- The losses are checked against float64 numpy re-implementations written here, plainly
  from the papers' formulas (CLIP's symmetric cross-entropy, SimCLR's NT-Xent over 2B
  rows with the anchor itself excluded, Khosla et al.'s L_out), against closed forms, and
  against finite differences of those references (learnable temperature).
- ``cached_value_and_grad`` is checked against plain ``jax.value_and_grad`` of the
  un-chunked loss; with dropout, against an explicit Python loop that encodes chunk i
  with ``fold_in(rng, i)`` (the documented key scheme) and differentiates the whole.
- ``representation_grad`` + ``surrogate_loss`` under ``optax.MultiSteps`` are checked
  against one full-batch sgd step written out by hand; naive accumulation is shown to
  differ, so the check can fail.

Tolerances: float32 everywhere rtol 1e-5 (atol 1e-6 for values near 0); gradients
against finite differences of the float64 references rtol 1e-4. bfloat16 inputs to the
losses are compared with the reference evaluated on the same rounded values: the loss
upcasts to float32 first, so the value keeps rtol 1e-5; the input gradients come back in
bfloat16 (one rounding: rtol 1e-2, atol 1e-3). bfloat16 representations inside
``cached_value_and_grad`` vs plain autodiff of the same bf16 encoder: measured equal
values and gradients within 4e-6 relative on CPU; asserted at rtol 1e-4 (value) and
rtol 1e-3 / atol 1e-4 (gradients), room for a chunked matmul rounding one
representation to the neighbouring bfloat16 value (a wrong gradient is off by O(1)).
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import gradtx

RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- references


def np_lse(x):
  m = np.max(x)
  return m + math.log(np.sum(np.exp(x - m)))


def np_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_info_nce(a, b, tau, *, symmetric=True, labels=None, normalize=True):
  """CLIP: mean over rows of -(1/|P(i)|) Σ_{p ∈ P(i)} log softmax_j(a_i·b_j/τ)_p."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if normalize:
    a, b = np_normalize(a), np_normalize(b)
  n = a.shape[0]
  labels = np.arange(n) if labels is None else np.asarray(labels)

  def direction(s):
    total = 0.0
    for i in range(n):
      log_softmax = s[i] - np_lse(s[i])
      positives = [j for j in range(n) if labels[j] == labels[i]]
      total += -sum(log_softmax[p] for p in positives) / len(positives)
    return total / n

  s = a @ b.T / tau
  return 0.5 * (direction(s) + direction(s.T)) if symmetric else direction(s)


def np_nt_xent(z1, z2, tau):
  """SimCLR: 2B rows, row i's positive is i ± B, denominator over every j ≠ i."""
  z = np_normalize(np.concatenate([np.asarray(z1), np.asarray(z2)]))
  n = z.shape[0]
  half = n // 2
  s = z @ z.T / tau
  total = 0.0
  for i in range(n):
    others = [j for j in range(n) if j != i]
    total += -(s[i, (i + half) % n] - np_lse(s[i, others]))
  return total / n


def np_supcon(z, labels, tau):
  """Khosla L_out: anchors with no positive left out; 0 when there is no anchor."""
  z = np_normalize(z)
  labels = np.asarray(labels)
  n = z.shape[0]
  s = z @ z.T / tau
  losses = []
  for i in range(n):
    others = [j for j in range(n) if j != i]
    positives = [p for p in others if labels[p] == labels[i]]
    if not positives:
      continue
    log_denominator = np_lse(s[i, others])
    losses.append(-sum(s[i, p] - log_denominator for p in positives) / len(positives))
  return float(np.mean(losses)) if losses else 0.0


def np_grad(f, x, eps=1e-6):
  """Central finite differences of a float64 numpy function."""
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    hi, lo = x.copy(), x.copy()
    hi[idx] += eps
    lo[idx] -= eps
    g[idx] = (f(hi) - f(lo)) / (2 * eps)
  return g


def randn(seed, *shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def jgrad(f, **kwargs):
  return jax.jit(jax.grad(f, **kwargs))


def jvg(f, **kwargs):
  return jax.jit(jax.value_and_grad(f, **kwargs))


def relative_difference(x, y):
  x, y = (np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(t)])
          for t in (x, y))
  return np.linalg.norm(x - y) / np.linalg.norm(y)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_labels", [False, True])
def test_info_nce_matches_numpy(symmetric, normalize, with_labels):
  a, b = randn(0, 7, 5), randn(1, 7, 5)
  labels = jnp.array([0, 1, 0, 2, 1, 3, 0]) if with_labels else None
  loss = gradtx.info_nce(a, b, temperature=0.3, symmetric=symmetric, labels=labels,
                         normalize=normalize)
  assert loss.dtype == jnp.float32
  expected = np_info_nce(a, b, 0.3, symmetric=symmetric, labels=labels, normalize=normalize)
  np.testing.assert_allclose(loss, expected, rtol=RTOL)


def test_info_nce_gradient_matches_finite_differences_of_numpy():
  a, b = randn(2, 5, 3), randn(3, 5, 3)
  labels = jnp.array([0, 1, 1, 2, 0])
  grad_a, grad_b = jgrad(
      lambda a, b: gradtx.info_nce(a, b, temperature=0.5, labels=labels), argnums=(0, 1)
  )(a, b)
  np.testing.assert_allclose(
      grad_a, np_grad(lambda x: np_info_nce(x, b, 0.5, labels=labels), a), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
      grad_b, np_grad(lambda x: np_info_nce(a, x, 0.5, labels=labels), b), rtol=1e-4, atol=1e-6)


def test_info_nce_closed_form():
  # Orthonormal rows: s_ii = 1/τ, s_ij = 0, so each row loses log(e^{1/τ} + (n-1)) - 1/τ.
  for tau in (1.0, 0.25):
    loss = jax.jit(lambda x, t=tau: gradtx.info_nce(x, x, temperature=t))(jnp.eye(4))
    np.testing.assert_allclose(loss, math.log(math.exp(1 / tau) + 3) - 1 / tau, rtol=RTOL)


def test_info_nce_labels_change_the_positives():
  # One label for everybody: every column is a positive of every row.
  a, b = randn(4, 6, 3), randn(5, 6, 3)
  loss = jax.jit(lambda a, b, labels: gradtx.info_nce(a, b, temperature=0.2, labels=labels))
  one_class = loss(a, b, jnp.zeros(6, jnp.int32))
  np.testing.assert_allclose(
      one_class, np_info_nce(a, b, 0.2, labels=np.zeros(6, int)), rtol=RTOL)
  assert abs(float(one_class) - float(loss(a, b, jnp.arange(6)))) > 1e-2


def test_nt_xent_matches_numpy():
  z1, z2 = randn(6, 5, 4), randn(7, 5, 4)
  loss, grad = jvg(lambda z: gradtx.nt_xent(z, z2, temperature=0.2))(z1)
  np.testing.assert_allclose(loss, np_nt_xent(z1, z2, 0.2), rtol=RTOL)
  np.testing.assert_allclose(grad, np_grad(lambda z: np_nt_xent(z, z2, 0.2), z1),
                             rtol=1e-4, atol=1e-6)


def test_nt_xent_closed_form():
  # z1 = z2 = I_2: rows 0..3 = e1, e2, e1, e2; row 0 sees s = [-, 0, 1, 0] (τ = 1).
  loss = jax.jit(lambda z: gradtx.nt_xent(z, z, temperature=1.0))(jnp.eye(2))
  np.testing.assert_allclose(loss, -math.log(math.e / (math.e + 2)), rtol=RTOL)


def test_supervised_contrastive_matches_numpy():
  z = randn(8, 9, 4)
  labels = jnp.array([0, 1, 0, 2, 1, 0, 3, 4, 1])  # labels 2, 3, 4: anchors without positive
  loss, grad = jvg(lambda z: gradtx.supervised_contrastive(z, labels, temperature=0.1))(z)
  np.testing.assert_allclose(loss, np_supcon(z, labels, 0.1), rtol=RTOL)
  # Leaving the positive-less anchors out is not the same as counting them as 0.
  with_all = np_supcon(z, labels, 0.1) * 6 / 9
  assert abs(float(loss) - with_all) > 1e-2
  np.testing.assert_allclose(grad, np_grad(lambda x: np_supcon(x, labels, 0.1), z),
                             rtol=1e-4, atol=1e-5)
  # Rows of anchors without positives still get gradient as negatives of the others.
  assert np.abs(np.asarray(grad[6])).sum() > 0


def test_supervised_contrastive_all_unique_labels_is_zero():
  z = randn(9, 5, 3)
  loss, grad = jvg(
      lambda z: gradtx.supervised_contrastive(z, jnp.arange(5), temperature=0.1))(z)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, np.zeros((5, 3)))


def test_supervised_contrastive_with_two_views_is_nt_xent():
  # Two views per sample, labels = sample index: L_out reduces to NT-Xent (closed relation).
  z1, z2 = randn(10, 4, 3), randn(11, 4, 3)
  z = jnp.concatenate([z1, z2])
  loss = jax.jit(lambda z: gradtx.supervised_contrastive(z, jnp.tile(jnp.arange(4), 2),
                                                         temperature=0.3))(z)
  np.testing.assert_allclose(loss, np_nt_xent(z1, z2, 0.3), rtol=RTOL)


@pytest.mark.parametrize("name", ["info_nce", "nt_xent", "supcon"])
def test_tiny_temperature_is_finite_and_correct(name):
  # τ = 1e-3 puts logits at ±1000: exp overflows float32 unless log-sum-exp is stable.
  a, b = randn(12, 6, 4), randn(13, 6, 4)
  labels = jnp.array([0, 0, 1, 1, 2, 3])
  fns = {
      "info_nce": (lambda a, b: gradtx.info_nce(a, b, temperature=1e-3),
                   np_info_nce(a, b, 1e-3)),
      "nt_xent": (lambda a, b: gradtx.nt_xent(a, b, temperature=1e-3),
                  np_nt_xent(a, b, 1e-3)),
      "supcon": (lambda a, b: gradtx.supervised_contrastive(
          jnp.concatenate([a, b]), jnp.tile(labels, 2), temperature=1e-3),
                 np_supcon(np.concatenate([a, b]), np.tile(labels, 2), 1e-3)),
  }
  fn, expected = fns[name]
  loss, grads = jvg(fn, argnums=(0, 1))(a, b)
  assert np.isfinite(float(loss)) and float(loss) > 1.0
  assert all(np.all(np.isfinite(g)) for g in grads)
  # Logits ~1e3 in float32: the loss (~1e3) is off by ~1e-4 absolute, 1e-7 relative.
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["info_nce", "nt_xent", "supcon"])
def test_learnable_temperature_gradient(name):
  a, b = randn(14, 5, 3), randn(15, 5, 3)
  labels = np.array([0, 1, 0, 2, 2, 0, 1, 3, 2, 1])
  losses = {
      "info_nce": (lambda tau: gradtx.info_nce(a, b, temperature=tau),
                   lambda tau: np_info_nce(a, b, tau)),
      "nt_xent": (lambda tau: gradtx.nt_xent(a, b, temperature=tau),
                  lambda tau: np_nt_xent(a, b, tau)),
      "supcon": (lambda tau: gradtx.supervised_contrastive(
          jnp.concatenate([a, b]), jnp.asarray(labels), temperature=tau),
                 lambda tau: np_supcon(np.concatenate([a, b]), labels, tau)),
  }
  fn, reference = losses[name]
  log_tau = math.log(0.2)
  value, grad = jvg(lambda t: fn(jnp.exp(t)))(jnp.float32(log_tau))
  np.testing.assert_allclose(value, reference(0.2), rtol=RTOL)
  expected = np_grad(lambda t: reference(math.exp(float(t))), log_tau)
  np.testing.assert_allclose(grad, expected, rtol=1e-4)
  assert abs(float(grad)) > 1e-3  # the check is not vacuous


def test_learnable_temperature_gradient_analytic():
  # L = mean_i [lse_j(c_ij/τ) - c_ii/τ]  ⇒  dL/dτ = mean_i [c_ii - Σ_j p_ij c_ij] / τ².
  a, b = randn(16, 6, 4), randn(17, 6, 4)
  c = np_normalize(a) @ np_normalize(b).T
  tau = 0.07
  p = np.exp(c / tau - np.max(c / tau, axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  expected = np.mean(np.diag(c) - np.sum(p * c, axis=1)) / tau**2
  grad = jgrad(lambda t: gradtx.info_nce(a, b, temperature=t, symmetric=False))(
      jnp.float32(tau))
  np.testing.assert_allclose(grad, expected, rtol=1e-4)


@pytest.mark.parametrize("name", ["info_nce", "nt_xent", "supcon"])
def test_bf16_inputs(name):
  a, b = randn(18, 6, 8, dtype=jnp.bfloat16), randn(19, 6, 8, dtype=jnp.bfloat16)
  labels = np.array([0, 1, 2, 0, 1, 2])
  losses = {
      "info_nce": (lambda a, b: gradtx.info_nce(a, b, temperature=0.1),
                   lambda a, b: np_info_nce(a, b, 0.1)),
      "nt_xent": (lambda a, b: gradtx.nt_xent(a, b, temperature=0.1),
                  lambda a, b: np_nt_xent(a, b, 0.1)),
      "supcon": (lambda a, b: gradtx.supervised_contrastive(
          jnp.concatenate([a, b]), jnp.tile(jnp.asarray(labels), 2), temperature=0.1),
                 lambda a, b: np_supcon(np.concatenate([a, b]), np.tile(labels, 2), 0.1)),
  }
  fn, reference = losses[name]
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)  # exact bf16 values
  loss, (grad_a, grad_b) = jvg(fn, argnums=(0, 1))(a, b)
  assert loss.dtype == jnp.float32  # computed in float32, not in bfloat16
  np.testing.assert_allclose(loss, reference(a64, b64), rtol=RTOL)
  assert grad_a.dtype == jnp.bfloat16 and grad_b.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(grad_a, np.float64),
                             np_grad(lambda x: reference(x, b64), a64), rtol=1e-2, atol=1e-3)


# ----------------------------------------------------------------------------- cached: setup

D_IN, D_HIDDEN, D_OUT = 6, 8, 4
KEEP = 0.7


def mlp(p, x, rng):
  """A 2-layer encoder; with a key, inverted dropout on the hidden layer."""
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  if rng is not None:
    h = jnp.where(jax.random.bernoulli(rng, KEEP, h.shape), h / KEEP, 0.0)
  return h @ p["w2"]


def mlp_params(seed, scale=0.5):
  return {"w1": scale * randn(seed, D_IN, D_HIDDEN), "b1": 0.1 * randn(seed + 1, D_HIDDEN),
          "w2": scale * randn(seed + 2, D_HIDDEN, D_OUT)}


def make_case(name, batch=23):
  """(encode_fn, loss_fn, params, inputs) of one contrastive setup."""
  if name == "info_nce":  # one shared encoder, queries vs keys, one direction
    params = {"enc": mlp_params(0), "log_tau": jnp.float32(math.log(0.2))}
    inputs = {"q": randn(100, batch, D_IN), "k": randn(101, batch, D_IN)}

    def encode(p, x, rng):
      keys = (None, None) if rng is None else jax.random.split(rng)
      return {"q": mlp(p["enc"], x["q"], keys[0]), "k": mlp(p["enc"], x["k"], keys[1])}

    def loss(p, h):
      return gradtx.info_nce(h["q"], h["k"], temperature=jnp.exp(p["log_tau"]),
                             symmetric=False)

  elif name == "clip":  # two towers with their own params, symmetric, returns a dict
    params = {"image": mlp_params(10), "text": mlp_params(20),
              "log_tau": jnp.float32(math.log(0.1))}
    inputs = {"image": randn(102, batch, D_IN), "text": randn(103, batch, D_IN)}

    def encode(p, x, rng):
      keys = (None, None) if rng is None else jax.random.split(rng)
      return {"a": mlp(p["image"], x["image"], keys[0]),
              "b": mlp(p["text"], x["text"], keys[1])}

    def loss(p, h):
      return gradtx.info_nce(h["a"], h["b"], temperature=jnp.exp(p["log_tau"]))

  elif name == "nt_xent_dict":  # one tower, the two views as two input leaves
    params = mlp_params(30)
    inputs = {"view1": randn(104, batch, D_IN), "view2": randn(105, batch, D_IN)}

    def encode(p, x, rng):
      keys = (None, None) if rng is None else jax.random.split(rng)
      return {"z1": mlp(p, x["view1"], keys[0]), "z2": mlp(p, x["view2"], keys[1])}

    def loss(p, h):
      return gradtx.nt_xent(h["z1"], h["z2"], temperature=0.5)

  elif name == "nt_xent_stacked":  # one tower, inputs (B, 2, d): the views stacked
    params = mlp_params(40)
    inputs = randn(106, batch, 2, D_IN)

    def encode(p, x, rng):
      z = mlp(p, x.reshape(-1, D_IN), rng).reshape(x.shape[0], 2, D_OUT)
      return (z[:, 0], z[:, 1])

    def loss(p, h):
      return gradtx.nt_xent(h[0], h[1], temperature=0.5)

  elif name == "supcon":
    params = mlp_params(50)
    inputs = randn(107, batch, D_IN)
    labels = jnp.asarray(np.random.default_rng(108).integers(0, 6, batch))

    def encode(p, x, rng):
      return mlp(p, x, rng)

    def loss(p, h):
      return gradtx.supervised_contrastive(h, labels, temperature=0.3)

  else:
    raise AssertionError(name)
  return encode, loss, params, inputs


CASES = ["info_nce", "clip", "nt_xent_dict", "nt_xent_stacked", "supcon"]
METHODS = ["two_pass", "remat"]


def rbg_key(seed):
  # XLA:CPU compiles RngBitGenerator much faster than threefry; the Flax test below
  # uses the default (threefry) key.
  return jax.random.key(seed, impl="rbg")


def reference_value_and_grad(encode, loss, params, inputs, *, chunk_size, rng, has_aux=False):
  """Plain autodiff of the whole loss; chunk i's encoder gets ``fold_in(rng, i)``.

  Without ``rng`` the batch is encoded in one call (no chunking at all). With it, an
  explicit Python loop over consecutive chunks of ``chunk_size`` rows.
  """
  batch = jax.tree.leaves(inputs)[0].shape[0]

  def total(p):
    if rng is None:
      reps = encode(p, inputs, None)
    else:
      pieces = []
      for i, start in enumerate(range(0, batch, chunk_size)):
        chunk = jax.tree.map(lambda x, s=start: x[s:s + chunk_size], inputs)
        pieces.append(encode(p, chunk, jax.random.fold_in(rng, i)))
      reps = jax.tree.map(lambda *xs: jnp.concatenate(xs), *pieces)
    return loss(p, reps)

  return jax.jit(jax.value_and_grad(total, has_aux=has_aux))(params)


@functools.cache
def plain_reference(case, batch=23):
  """The plain full-batch ``value_and_grad`` of a case, shared by several tests."""
  encode, loss, params, inputs = make_case(case, batch)
  return reference_value_and_grad(encode, loss, params, inputs, chunk_size=batch, rng=None)


def with_aux(loss):
  """The loss with an aux output that carries the representations themselves."""
  def loss_and_aux(p, h):
    return loss(p, h), {"reps": h, "mean_norm": sum(
        jnp.mean(jnp.linalg.norm(x, axis=1)) for x in jax.tree.leaves(h))}
  return loss_and_aux


# ----------------------------------------------------------------------------- cached: exact


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_cached_equals_full_batch_gradient(case, method):
  # 23 rows in chunks of 5: four full chunks and a remainder of 3. Supervised
  # contrastive runs eagerly, the others under jit.
  encode, loss, params, inputs = make_case(case)
  f = gradtx.cached_value_and_grad(encode, loss, chunk_size=5, method=method)
  f = f if case == "supcon" else jax.jit(f)
  value, grads = f(params, inputs)
  ref_value, ref_grads = plain_reference(case)
  np.testing.assert_allclose(value, ref_value, rtol=RTOL)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  chex.assert_trees_all_close(grads, ref_grads, rtol=RTOL, atol=ATOL)
  if "log_tau" in params:
    # The loss-side parameter, independently: τ only enters the loss, so its gradient
    # is d/dlogτ of the numpy loss at the (fixed) representations, counted once.
    reps = jax.tree.map(lambda x: np.asarray(x, np.float64), encode(params, inputs, None))
    a, b = (reps["q"], reps["k"]) if case == "info_nce" else (reps["a"], reps["b"])
    symmetric = case == "clip"
    expected = np_grad(lambda t: np_info_nce(a, b, math.exp(float(t)), symmetric=symmetric),
                       float(params["log_tau"]))
    np.testing.assert_allclose(grads["log_tau"], expected, rtol=1e-4)
    assert abs(float(expected)) > 1e-2


@pytest.mark.parametrize("case", ["clip", "supcon"])
def test_cached_with_dropout_aux_under_jit(case):
  # 13 rows in chunks of 5 (remainder 3); chunk i must see the key fold_in(rng, i).
  encode, loss, params, inputs = make_case(case, batch=13)
  rng = rbg_key(7)
  (ref_value, ref_aux), ref_grads = reference_value_and_grad(
      encode, with_aux(loss), params, inputs, chunk_size=5, rng=rng, has_aux=True)
  traces = []

  def counted_loss(p, h):  # a side effect at trace time counts the traces
    traces.append(1)
    return with_aux(loss)(p, h)

  for method in METHODS:
    f = jax.jit(gradtx.cached_value_and_grad(encode, counted_loss, chunk_size=5,
                                             method=method, has_aux=True))
    (value, aux), grads = f(params, inputs, rng=rng)
    traced = len(traces)
    np.testing.assert_allclose(value, ref_value, rtol=RTOL, err_msg=method)
    chex.assert_trees_all_close(aux, ref_aux, rtol=RTOL, atol=ATOL)
    chex.assert_trees_all_close(grads, ref_grads, rtol=RTOL, atol=ATOL)
    # A new key changes the result without recompiling.
    (value2, _), _ = f(params, inputs, rng=rbg_key(8))
    assert float(value2) != float(value)
    assert len(traces) == traced
  # Dropout is really on: the representations differ from the deterministic encoder's.
  deterministic = encode(params, inputs, None)
  for x, y in zip(jax.tree.leaves(aux["reps"]), jax.tree.leaves(deterministic), strict=True):
    assert x.shape == (13, D_OUT)
    assert np.abs(np.asarray(x) - np.asarray(y)).max() > 1e-2


@pytest.mark.parametrize(("batch", "chunk_size"), [(7, 1), (23, 64)])
def test_cached_any_chunk_size(batch, chunk_size):
  # One row per chunk (no remainder); one chunk larger than the batch (only a remainder,
  # which gets key fold_in(rng, 0)).
  encode, loss, params, inputs = make_case("supcon", batch)
  rng = rbg_key(11)
  ref_value, ref_grads = reference_value_and_grad(encode, loss, params, inputs,
                                                  chunk_size=chunk_size, rng=rng)
  for method in METHODS:
    f = jax.jit(gradtx.cached_value_and_grad(encode, loss, chunk_size=chunk_size,
                                             method=method))
    value, grads = f(params, inputs, rng=rng)
    np.testing.assert_allclose(value, ref_value, rtol=RTOL, err_msg=method)
    chex.assert_trees_all_close(grads, ref_grads, rtol=RTOL, atol=ATOL)


def test_cached_bf16_representations():
  encode32, loss, params, inputs = make_case("clip")

  def encode(p, x, rng):
    return jax.tree.map(lambda h: h.astype(jnp.bfloat16), encode32(p, x, rng))

  ref_value, ref_grads = reference_value_and_grad(encode, loss, params, inputs,
                                                  chunk_size=23, rng=None)
  for method in METHODS:
    f = jax.jit(gradtx.cached_value_and_grad(encode, loss, chunk_size=5, method=method))
    value, grads = f(params, inputs)
    assert value.dtype == jnp.float32
    assert jax.tree.map(lambda g: g.dtype, grads) == jax.tree.map(lambda p: p.dtype, params)
    # Measured: value identical, gradients within 4e-6 relative (see module docstring).
    np.testing.assert_allclose(value, ref_value, rtol=1e-4, err_msg=method)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-3, atol=1e-4)


class DropoutEncoder(nn.Module):
  features: int = D_OUT

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.Dropout(rate=0.3, deterministic=False)(x)
    return nn.Dense(self.features)(x)


def test_cached_flax_linen_encoder_with_dropout():
  # NT-Xent, one tower and two views, a learnable temperature, 11 rows in chunks of 4.
  model = DropoutEncoder()
  x = {"view1": randn(200, 11, D_IN), "view2": randn(201, 11, D_IN)}
  params = {"enc": jax.jit(model.init)(jax.random.key(0), x["view1"][:1]),
            "log_tau": jnp.float32(math.log(0.3))}

  def encode(p, inputs, rng):
    k1, k2 = jax.random.split(rng)
    return {"z1": model.apply(p["enc"], inputs["view1"], rngs={"dropout": k1}),
            "z2": model.apply(p["enc"], inputs["view2"], rngs={"dropout": k2})}

  def loss(p, h):
    return gradtx.nt_xent(h["z1"], h["z2"], temperature=jnp.exp(p["log_tau"]))

  rng = jax.random.key(1)  # Flax derives its dropout keys from the default (threefry) key
  ref_value, ref_grads = reference_value_and_grad(encode, loss, params, x, chunk_size=4,
                                                  rng=rng)
  for method in METHODS:
    f = jax.jit(gradtx.cached_value_and_grad(encode, loss, chunk_size=4, method=method))
    value, grads = f(params, x, rng=rng)
    np.testing.assert_allclose(value, ref_value, rtol=RTOL, err_msg=method)
    chex.assert_trees_all_close(grads, ref_grads, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- accumulation


def test_accumulation_across_calls_under_multisteps():
  k, lr, micro_size = 4, 0.1, 4
  encode, loss, params, inputs = make_case("clip", batch=16)
  micro = [jax.tree.map(lambda x, s=s: x[s:s + micro_size], inputs) for s in range(0, 16, 4)]

  # Reference: one sgd step with the plain full-batch gradient, written out by hand.
  full_value, full_grad = jvg(lambda p: loss(p, encode(p, inputs, None)))(params)
  expected = jax.tree.map(lambda p, g: np.asarray(p, np.float64) - lr * np.asarray(g),
                          params, full_grad)

  # Under test: reps once without gradients, G from the whole batch, then one
  # micro-batch per optimizer call (the surrogate scaled by k, the loss-side
  # gradient added unscaled every call).
  opt = optax.MultiSteps(optax.sgd(lr), every_k_schedule=k)

  @jax.jit
  def prepare(p, micro_batches):
    reps = jax.tree.map(lambda *xs: jnp.concatenate(xs),
                        *(encode(p, m, None) for m in micro_batches))
    return gradtx.representation_grad(loss, p, reps)

  @jax.jit
  def micro_step(p, state, m, g_rows, loss_side):
    enc_grad = jax.grad(lambda q: gradtx.surrogate_loss(encode(q, m, None), g_rows,
                                                        scale=k))(p)
    updates, state = opt.update(jax.tree.map(jnp.add, enc_grad, loss_side), state, p)
    return optax.apply_updates(p, updates), state

  value, reps_grad, loss_side = prepare(params, micro)
  np.testing.assert_allclose(value, full_value, rtol=RTOL)
  state, current = opt.init(params), params
  for i, m in enumerate(micro):
    g_rows = jax.tree.map(lambda g, i=i: g[micro_size * i:micro_size * (i + 1)], reps_grad)
    current, state = micro_step(current, state, m, g_rows, loss_side)
    if i < k - 1:
      chex.assert_trees_all_equal(current, params)  # nothing applied yet
  chex.assert_trees_all_close(current, expected, rtol=RTOL, atol=ATOL)
  step = jax.tree.map(jnp.subtract, expected, params)
  assert relative_difference(jax.tree.map(jnp.subtract, current, params), step) < 1e-4

  # Naive accumulation (the mean of each micro-batch's own contrastive loss gradient)
  # is not the same step.
  @jax.jit
  def naive_step(p, state, m):
    updates, state = opt.update(jax.grad(lambda q: loss(q, encode(q, m, None)))(p), state, p)
    return optax.apply_updates(p, updates), state

  state, naive = opt.init(params), params
  for m in micro:
    naive, state = naive_step(naive, state, m)
  assert relative_difference(jax.tree.map(jnp.subtract, naive, params), step) > 0.05


def test_surrogate_loss_gradient_closed_form():
  # d/dθ scale·Σ <x θ, G> = scale · xᵀ G for a linear encoder.
  x, w, g = randn(300, 5, 3), randn(301, 3, 2), randn(302, 5, 2)
  grad = jgrad(lambda w: gradtx.surrogate_loss({"h": x @ w}, {"h": g}, scale=3.0))(w)
  np.testing.assert_allclose(grad, 3.0 * np.asarray(x, np.float64).T @ np.asarray(g),
                             rtol=RTOL, atol=ATOL)
  # G is a constant: no gradient flows into it.
  grad_g = jgrad(lambda g: gradtx.surrogate_loss(x @ w, g))(g)
  np.testing.assert_array_equal(grad_g, np.zeros_like(g))


# ----------------------------------------------------------------------------- errors


def _identity_encode(p, x, rng):
  return x @ p


def _nt_loss(p, h):
  return gradtx.nt_xent(h, h, temperature=0.5)


@pytest.mark.parametrize(("chunk_size", "error"), [(0, ValueError), (-3, ValueError),
                                                   (2.5, TypeError), (True, TypeError),
                                                   ("4", TypeError)])
def test_error_chunk_size(chunk_size, error):
  match = rf"chunk_size must be an int >= 1, got {re.escape(repr(chunk_size))}"
  with pytest.raises(error, match=match):
    gradtx.cached_value_and_grad(_identity_encode, _nt_loss, chunk_size=chunk_size)


def test_error_method():
  with pytest.raises(ValueError, match=r"method must be one of 'two_pass', 'remat', got 'foo'"):
    gradtx.cached_value_and_grad(_identity_encode, _nt_loss, chunk_size=2, method="foo")


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan"), float("inf")])
def test_error_temperature(temperature):
  z = randn(0, 4, 3)
  match = rf"temperature must be a finite number > 0, got {re.escape(repr(temperature))}"
  with pytest.raises(ValueError, match=match):
    gradtx.info_nce(z, z, temperature=temperature)
  with pytest.raises(ValueError, match=match):
    gradtx.nt_xent(z, z, temperature=temperature)
  with pytest.raises(ValueError, match=match):
    gradtx.supervised_contrastive(z, jnp.arange(4), temperature=temperature)


def test_error_tower_batch_sizes():
  with pytest.raises(ValueError, match=r"a and b must have the same batch size.*a\.shape=\(4, 3\)"
                                       r".*b\.shape=\(5, 3\)"):
    gradtx.info_nce(randn(0, 4, 3), randn(1, 5, 3), temperature=0.1)
  with pytest.raises(ValueError, match=r"z1 and z2 must have the same shape.*\(4, 3\).*\(5, 3\)"):
    gradtx.nt_xent(randn(0, 4, 3), randn(1, 5, 3), temperature=0.1)
  with pytest.raises(ValueError, match=r"a and b must have the same feature size"):
    gradtx.info_nce(randn(0, 4, 3), randn(1, 4, 2), temperature=0.1)


def test_error_representations_not_2d():
  with pytest.raises(ValueError, match=r"a must be a 2-D array .*got shape \(4,\)"):
    gradtx.info_nce(jnp.ones(4), jnp.ones((4, 2)), temperature=0.1)
  with pytest.raises(ValueError, match=r"z2 must be a 2-D array .*got shape \(4, 2, 1\)"):
    gradtx.nt_xent(jnp.ones((4, 2)), jnp.ones((4, 2, 1)), temperature=0.1)
  with pytest.raises(ValueError, match=r"z must be a 2-D array .*got shape \(\)"):
    gradtx.supervised_contrastive(jnp.float32(1.0), jnp.arange(1), temperature=0.1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("bad", "shape"), [("0d", "()"), ("1d", "(3,)"), ("3d", "(3, 2, 1)")])
def test_error_encode_fn_not_2d_names_the_leaf(bad, shape, method):
  def encode(p, x, rng):
    h = x @ p
    return {"a": h, "b": {"0d": jnp.sum(h), "1d": h[:, 0], "3d": h[:, :, None]}[bad]}

  def loss(p, h):
    return gradtx.info_nce(h["a"], h["b"], temperature=0.1)

  f = gradtx.cached_value_and_grad(encode, loss, chunk_size=3, method=method)
  match = rf"encode_fn must return 2-D representations.*\['b'\] has shape {re.escape(shape)}"
  with pytest.raises(ValueError, match=match):
    f(jnp.ones((3, 2)), jnp.ones((7, 3)))


@pytest.mark.parametrize("labels", [jnp.zeros(5, jnp.int32), jnp.zeros((4, 1), jnp.int32),
                                    jnp.zeros(4, jnp.float32), jnp.zeros(4, bool)])
def test_error_labels(labels):
  z = randn(0, 4, 3)
  match = (rf"labels must be an integer array of shape \(4,\), got {labels.dtype} array of "
           rf"shape {re.escape(str(labels.shape))}")
  with pytest.raises(ValueError, match=match):
    gradtx.supervised_contrastive(z, labels, temperature=0.1)
  with pytest.raises(ValueError, match=match):
    gradtx.info_nce(z, z, labels=labels, temperature=0.1)


def test_error_inputs_batch_sizes():
  f = gradtx.cached_value_and_grad(lambda p, x, rng: x["x"] @ p, _nt_loss, chunk_size=2)
  with pytest.raises(ValueError, match=r"every leaf of inputs must have the same batch size.*"
                                       r"\[7, 8\].*\['x'\]: 8.*\['y'\]: 7"):
    f(jnp.ones((3, 2)), {"x": jnp.ones((8, 3)), "y": jnp.ones((7, 3))})
  with pytest.raises(ValueError, match=r"every leaf of inputs must have a batch axis.*"
                                       r"\['t'\] is a scalar"):
    f(jnp.ones((3, 2)), {"x": jnp.ones((8, 3)), "t": jnp.float32(1.0)})


# ----------------------------------------------------------------------------- edge inputs


@pytest.mark.parametrize("block_size", [None, 2])
def test_traced_nonpositive_temperature_gives_nan(block_size):
  # A learnable τ that reaches 0 or below is not checked under jit: the loss is NaN
  # (visible), not the loss of flipped similarities. Positive τ: the numpy reference.
  a, b = randn(20, 5, 3), randn(21, 5, 3)
  loss = jax.jit(lambda t: gradtx.info_nce(a, b, temperature=t, block_size=block_size))
  for tau in (0.0, -0.5):
    assert np.isnan(float(loss(jnp.float32(tau))))
  np.testing.assert_allclose(loss(jnp.float32(0.5)), np_info_nce(a, b, 0.5), rtol=RTOL)


def test_raw_prngkey_rng_is_the_same_key():
  # rng=jax.random.PRNGKey(seed) (raw uint32 data) encodes chunk i with fold_in(key, i),
  # as the explicit loop does with the same key.
  encode, loss, params, inputs = make_case("supcon", batch=9)
  raw = jax.random.PRNGKey(3)
  ref_value, ref_grads = reference_value_and_grad(encode, loss, params, inputs,
                                                  chunk_size=4, rng=raw)
  value, grads = jax.jit(gradtx.cached_value_and_grad(encode, loss, chunk_size=4))(
      params, inputs, rng=raw)
  np.testing.assert_allclose(value, ref_value, rtol=RTOL)
  chex.assert_trees_all_close(grads, ref_grads, rtol=RTOL, atol=ATOL)
  no_dropout, _ = plain_reference("supcon", batch=9)
  assert abs(float(value) - float(no_dropout)) > 1e-3  # dropout is on


def test_surrogate_loss_refuses_a_transposed_reps_grad():
  # vdot would flatten both and pair h_ij with G_ji: a wrong gradient without a word.
  h, g = randn(22, 3, 2), randn(23, 3, 2)
  with pytest.raises(ValueError, match=r"reps_grad must have the leaf shapes of reps; "
                                       r"these differ: h: \(2, 3\) vs \(3, 2\)"):
    gradtx.surrogate_loss({"h": h}, {"h": g.T})


def test_integer_representations_are_refused():
  # An encoder that returns integers (argmax, rounding) would get a zero gradient.
  def encode(p, x, rng):
    return jnp.round(x @ p).astype(jnp.int32)

  f = gradtx.cached_value_and_grad(encode, _nt_loss, chunk_size=2)
  with pytest.raises(TypeError, match=r"representations returned by encode_fn.*int32"):
    f(jnp.ones((3, 2)), jnp.ones((4, 3)))
