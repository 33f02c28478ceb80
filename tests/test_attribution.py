"""Integrated Gradients and Expected Gradients against independent references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.attribution import _integrated as attribution

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
           "gausslegendre")


def _reference_rule(method, n):
  """Nodes and weights written out independently of the module."""
  if method == "riemann_left":
    return [k / n for k in range(n)], [1 / n] * n
  if method == "riemann_right":
    return [k / n for k in range(1, n + 1)], [1 / n] * n
  if method == "riemann_middle":
    return [(k + 0.5) / n for k in range(n)], [1 / n] * n
  if method == "riemann_trapezoid":
    h = 1 / (n - 1)
    return [k * h for k in range(n)], [h / 2] + [h] * (n - 2) + [h / 2]
  x, w = np.polynomial.legendre.leggauss(n)
  return list(0.5 * (x + 1)), list(0.5 * w)


def _mlp_params(key, d_in=5, hidden=7, classes=3):
  k1, k2 = jax.random.split(key)
  return (jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
          jax.random.normal(k2, (hidden, classes)))


def _mlp(params):
  w1, w2 = params
  return lambda x: jnp.tanh(x @ w1) @ w2  # (N, C)


def _loop_ig(fn_single, x, baseline, method, steps):
  """IG example by example, step by step, with plain jax.grad."""
  alphas, weights = _reference_rule(method, steps)
  out = []
  for xi, bi in zip(np.asarray(x), np.asarray(baseline), strict=True):
    avg = np.zeros_like(xi, dtype=np.float64)
    for a, w in zip(alphas, weights, strict=True):
      avg += w * np.asarray(jax.grad(fn_single)(jnp.asarray(bi + a * (xi - bi))), np.float64)
    out.append((xi - bi) * avg)
  return np.stack(out)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps", [2, 7])
def test_linear_model_is_exact(method, steps):
  w = jnp.array([1.5, -2.0, 0.25, 3.0])
  x = jax.random.normal(jax.random.key(0), (6, 4))
  baseline = jax.random.normal(jax.random.key(1), (4,))
  attr, delta = gradtx.integrated_gradients(
      lambda z: z @ w + 1.0, x, baseline=baseline, steps=steps, method=method,
      return_delta=True)
  np.testing.assert_allclose(attr, (x - baseline) * w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(delta, 0.0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps", [2, 5, 50])
def test_rules_match_reference_and_sum_to_one(method, steps):
  alphas, weights = attribution._quadrature(method, steps)
  ref_alphas, ref_weights = _reference_rule(method, steps)
  np.testing.assert_allclose(alphas, ref_alphas, rtol=1e-13, atol=1e-15)
  np.testing.assert_allclose(weights, ref_weights, rtol=1e-13)
  assert abs(weights.sum() - 1.0) < 1e-12
  assert np.all((alphas >= 0) & (alphas <= 1))


def test_gauss_legendre_matches_leggauss():
  for n in (1, 3, 16, 50):
    alphas, weights = attribution._quadrature("gausslegendre", n)
    x, w = np.polynomial.legendre.leggauss(n)
    np.testing.assert_allclose(2 * alphas - 1, x, atol=1e-14)
    np.testing.assert_allclose(2 * weights, w, rtol=1e-13)
    # exact for polynomials of degree 2n - 1 on [0, 1]
    assert abs(np.sum(weights * alphas ** (2 * n - 1)) - 1 / (2 * n)) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_each_method_matches_loop_over_steps(method):
  params = _mlp_params(jax.random.key(2))
  fn = _mlp(params)
  x = jax.random.normal(jax.random.key(3), (3, 5))
  baseline = 0.1 * jax.random.normal(jax.random.key(4), (3, 5))
  target = 1
  attr = gradtx.integrated_gradients(fn, x, baseline=baseline, steps=6, method=method,
                                     target=target)
  ref = _loop_ig(lambda z: fn(z[None])[0, target], x, baseline, method, 6)
  np.testing.assert_allclose(attr, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 50])
def test_batch_size_chunking_matches_unchunked(batch_size):
  fn = _mlp(_mlp_params(jax.random.key(5)))
  x = jax.random.normal(jax.random.key(6), (4, 5))
  full = gradtx.integrated_gradients(fn, x, steps=7, target=2)
  chunked = gradtx.integrated_gradients(fn, x, steps=7, target=2, batch_size=batch_size)
  np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-6)


def test_chunking_bounds_the_vmapped_batch():
  fn = lambda z: jnp.sum(jnp.sin(z), axis=1)
  x = jnp.ones((2, 3))
  # chunk 1, then a scan over chunk 2 (of 4 vmapped steps each), then the remaining 2
  # steps: no (10, 2, 3) array anywhere
  text = str(jax.make_jaxpr(
      lambda v: gradtx.integrated_gradients(fn, v, steps=10, batch_size=4))(x))
  assert "scan" in text and "length=1" in text
  assert "f32[4,2,3]" in text and "f32[10,2,3]" not in text


class _SmallCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = jnp.tanh(x)
    x = nn.Conv(4, (3, 3), strides=(2, 2))(x)
    x = nn.softplus(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(3)(x)


def test_completeness_on_smooth_cnn():
  model = _SmallCNN()
  x = jax.random.uniform(jax.random.key(7), (4, 8, 8, 1)) * 2.0
  params = model.init(jax.random.key(8), x)
  fn = lambda z: model.apply(params, z)
  target = jnp.array([0, 1, 2, 0])
  attr, delta = gradtx.integrated_gradients(fn, x, steps=50, target=target,
                                            return_delta=True)
  out, out0 = fn(x), fn(jnp.zeros_like(x))
  change = np.asarray(out[jnp.arange(4), target] - out0[jnp.arange(4), target])
  assert np.all(np.abs(change) > 1e-3)
  np.testing.assert_allclose(np.asarray(attr).reshape(4, -1).sum(1) - change, delta,
                             atol=1e-5)
  assert np.max(np.abs(np.asarray(delta)) / np.abs(change)) <= 1e-3


def test_pytree_inputs_and_per_leaf_baselines():
  w_a = jnp.array([1.0, -1.0, 2.0])
  w_b = jnp.array([[0.5], [3.0]])

  def fn(batch):
    return jnp.tanh(batch["a"] @ w_a) + jnp.sin(batch["b"].reshape(-1, 2) @ w_b)[:, 0]

  x = {"a": jax.random.normal(jax.random.key(9), (2, 3)),
       "b": jax.random.normal(jax.random.key(10), (2, 2, 1))}
  baseline = {"a": jnp.full((3,), 0.2), "b": jnp.zeros((2, 2, 1))}
  attr, delta = gradtx.integrated_gradients(fn, x, baseline=baseline, steps=8,
                                            method="riemann_middle", return_delta=True)
  assert attr["a"].shape == (2, 3) and attr["b"].shape == (2, 2, 1)
  flat = lambda t: jnp.concatenate([t["a"], t["b"].reshape(-1, 2)], axis=1)
  unflat = lambda v: {"a": v[:, :3], "b": v[:, 3:].reshape(-1, 2, 1)}
  flat_base = flat({"a": jnp.broadcast_to(baseline["a"], (2, 3)), "b": baseline["b"]})
  ref = _loop_ig(lambda v: fn(unflat(v[None]))[0], flat(x), flat_base, "riemann_middle", 8)
  np.testing.assert_allclose(flat(attr), ref, rtol=1e-4, atol=1e-5)
  ref_delta = ref.sum(1) - (fn(x) - fn(unflat(flat_base)))
  np.testing.assert_allclose(delta, ref_delta, atol=1e-5)


def test_per_example_target_and_baseline():
  fn = _mlp(_mlp_params(jax.random.key(11)))
  x = jax.random.normal(jax.random.key(12), (3, 5))
  baseline = jax.random.normal(jax.random.key(13), (3, 5))
  target = jnp.array([2, 0, 1])
  attr = gradtx.integrated_gradients(fn, x, baseline=baseline, target=target, steps=5)
  for i in range(3):
    one = gradtx.integrated_gradients(fn, x[i:i + 1], baseline=baseline[i],
                                      target=int(target[i]), steps=5)
    np.testing.assert_allclose(attr[i:i + 1], one, rtol=1e-5, atol=1e-6)


def test_jit_with_traced_target():
  fn = _mlp(_mlp_params(jax.random.key(14)))
  x = jax.random.normal(jax.random.key(15), (3, 5))
  target = jnp.array([0, 1, 2])

  @jax.jit
  def run(x, target):
    return gradtx.integrated_gradients(fn, x, target=target, steps=9, batch_size=4,
                                       return_delta=True)

  attr, delta = run(x, target)
  eager, eager_delta = gradtx.integrated_gradients(fn, x, target=target, steps=9,
                                                   return_delta=True)
  np.testing.assert_allclose(attr, eager, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(delta, eager_delta, atol=1e-5)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_traced_target_out_of_range_gives_nan_rows(batch_size):
  """Under jit the target cannot be checked: its bad examples are NaN, the rest exact."""
  fn = _mlp(_mlp_params(jax.random.key(25)))
  x = jax.random.normal(jax.random.key(26), (4, 5))
  target = jnp.array([0, 3, 2, -1])  # C = 3: examples 1 and 3 are out of range

  @jax.jit
  def run(x, target):
    return gradtx.integrated_gradients(fn, x, target=target, steps=5, batch_size=batch_size,
                                       return_delta=True)

  attr, delta = map(np.asarray, run(x, target))
  assert np.all(np.isnan(attr[[1, 3]])) and np.all(np.isnan(delta[[1, 3]]))
  for i in (0, 2):
    ref = _loop_ig(lambda z, t=int(target[i]): fn(z[None])[0, t], x[i:i + 1],
                   jnp.zeros((1, 5)), "gausslegendre", 5)
    np.testing.assert_allclose(attr[i:i + 1], ref, rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(delta[[0, 2]]))
  eg = jax.jit(lambda x, t: gradtx.expected_gradients(fn, x, x, key=jax.random.key(0),
                                                      samples=3, target=t))(x, target)
  assert np.all(np.isnan(np.asarray(eg)[[1, 3]])) and np.all(np.isfinite(np.asarray(eg)[[0, 2]]))


def test_expected_gradients_matches_explicit_loop():
  fn = _mlp(_mlp_params(jax.random.key(16)))
  x = jax.random.normal(jax.random.key(17), (3, 5))
  data = jax.random.normal(jax.random.key(18), (6, 5))
  key, samples, target = jax.random.key(19), 5, 1
  attr = gradtx.expected_gradients(fn, x, data, key=key, samples=samples, target=target,
                                   batch_size=2)
  k_idx, k_alpha = jax.random.split(key)
  idx = np.asarray(jax.random.randint(k_idx, (samples, 3), 0, 6))
  alpha = np.asarray(jax.random.uniform(k_alpha, (samples, 3)))
  single = lambda z: fn(z[None])[0, target]
  ref = np.zeros((3, 5))
  for n in range(3):
    for s in range(samples):
      b = np.asarray(data[idx[s, n]])
      xn = np.asarray(x[n])
      ref[n] += (xn - b) * np.asarray(jax.grad(single)(jnp.asarray(b + alpha[s, n] * (xn - b))))
  np.testing.assert_allclose(attr, ref / samples, rtol=1e-4, atol=1e-5)


def test_expected_gradients_averages_ig_over_baselines():
  fn = _mlp(_mlp_params(jax.random.key(20)))
  x = jax.random.normal(jax.random.key(21), (2, 5))
  data = jax.random.normal(jax.random.key(22), (4, 5))
  eg = gradtx.expected_gradients(fn, x, data, key=jax.random.key(23), samples=20000,
                                 target=0, batch_size=5000)
  ig = np.mean([np.asarray(gradtx.integrated_gradients(fn, x, baseline=b, target=0,
                                                       steps=32)) for b in data], axis=0)
  np.testing.assert_allclose(eg, ig, atol=0.05 * np.abs(ig).max())
  # deterministic in the key
  again = gradtx.expected_gradients(fn, x, data, key=jax.random.key(23), samples=20000,
                                    target=0, batch_size=5000)
  np.testing.assert_array_equal(eg, again)


def test_errors():
  fn = _mlp(_mlp_params(jax.random.key(24)))
  x = jnp.ones((2, 5))
  ig = gradtx.integrated_gradients
  with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
    ig(fn, x, steps=0, target=0)
  with pytest.raises(ValueError, match="steps must be an int >= 2.*trapezoid"):
    ig(fn, x, steps=1, method="riemann_trapezoid", target=0)
  with pytest.raises(ValueError, match="method must be one of.*got 'simpson'"):
    ig(fn, x, method="simpson", target=0)
  with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
    ig(fn, x, batch_size=0, target=0)
  with pytest.raises(ValueError, match=r"baseline must have the per-example shape.*\(5,\).*\(3,\)"):
    ig(fn, x, baseline=jnp.zeros(3), target=0)
  tree_fn = lambda t: t["a"].sum(1) + t["b"].sum(1)
  with pytest.raises(ValueError, match=r"baseline\['b'\].*got shape \(4,\)"):
    ig(tree_fn, {"a": x, "b": x}, baseline={"a": jnp.zeros(5), "b": jnp.zeros(4)})
  with pytest.raises(ValueError, match=r"baseline must have the structure of inputs: "
                                       r"missing \['b'\]"):
    ig(tree_fn, {"a": x, "b": x}, baseline={"a": jnp.zeros(5)})
  with pytest.raises(ValueError, match=r"target must be in \[0, 3\).*got 3"):
    ig(fn, x, target=3)
  with pytest.raises(ValueError, match=r"target must be in \[0, 3\).*got \[-1\]"):
    ig(fn, x, target=jnp.array([0, -1]))
  with pytest.raises(ValueError, match=r"target must be an int or an integer array"):
    ig(fn, x, target=jnp.array([0, 1, 2]))
  with pytest.raises(ValueError, match="not a scalar: pass target"):
    ig(fn, x)
  with pytest.raises(ValueError, match="target must be None"):
    ig(lambda z: z.sum(1), x, target=0)
  with pytest.raises(ValueError, match="same batch size"):
    ig(tree_fn, {"a": x, "b": jnp.ones((3, 5))})
  with pytest.raises(TypeError, match="floating-point"):
    ig(lambda z: z.sum(1), jnp.ones((2, 5), jnp.int32))
  eg = gradtx.expected_gradients
  with pytest.raises(ValueError, match="samples must be an int >= 1"):
    eg(fn, x, x, key=jax.random.key(0), samples=0, target=0)
  with pytest.raises(ValueError, match=r"baselines must be a batch \(M, \.\.\.\)"):
    eg(fn, x, jnp.ones(5), key=jax.random.key(0), samples=2, target=0)
  with pytest.raises(ValueError, match=r"target must be in \[0, 3\)"):
    eg(fn, x, x, key=jax.random.key(0), samples=2, target=5)
