"""The attribution family against independent references.

Saliency and gradient × input against closed forms; SmoothGrad / SmoothGrad² / VarGrad
against their closed-form expectations on a quadratic (statistically) and PAIR saliency's
``GetSmoothedMask``; Guided IG and Blur IG against PAIR saliency's numpy implementations
(``saliency.core``, optional: skipped with the reason when absent) in float64, and
their completeness; the blur against ``scipy.ndimage.gaussian_filter``; Integrated
Hessians against the closed form on a quadratic and a float64 loop of ``jax.hessian``
over the quadrature points; pictures drawn with matplotlib's Agg backend.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

import gradtx

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((16, 12))
W2 = RNG.standard_normal((12, 3))


def _mlp(x):
  """A smooth 16 → 12 → 3 model (float64 weights cast to the input's dtype)."""
  return jnp.tanh(x @ W1.astype(x.dtype)) @ W2.astype(x.dtype)


def _pair():
  """PAIR saliency's numpy core, with numpy 2's ``quantile(method=)`` for Guided IG."""
  core = pytest.importorskip("saliency.core", reason="PAIR saliency (pip install saliency) "
                             "is the optional reference of Guided IG, Blur IG, SmoothGrad")
  return core


@pytest.fixture
def pair(monkeypatch):
  core = _pair()
  quantile = np.quantile
  monkeypatch.setattr(np, "quantile", lambda a, q, interpolation="linear", **kw: quantile(
      a, q, method=interpolation, **kw))
  return core


def _call_model(core, fn, target):
  """PAIR's ``call_model_function`` for one target: gradients of a batch of examples."""
  grad = jax.jit(jax.grad(lambda z: fn(z[None])[0, target]))

  def call(batch, call_model_args=None, expected_keys=None):
    with jax.enable_x64(batch.dtype == np.float64):  # PAIR computes in float64
      grads = np.stack([np.asarray(grad(jnp.asarray(v))) for v in batch])
    return {core.base.INPUT_OUTPUT_GRADIENTS: grads}

  return call


# ------------------------------------------------------------------ saliency, grad × input


def test_saliency_and_gradient_x_input_of_a_linear_model():
  w = RNG.standard_normal((5, 4)).astype(np.float32)
  x = RNG.standard_normal((3, 5)).astype(np.float32)
  target = np.array([0, 3, 1])
  sal = gradtx.saliency(lambda z: z @ w, x, target=target)
  np.testing.assert_allclose(sal, w[:, target].T, rtol=1e-6)
  np.testing.assert_allclose(gradtx.saliency(lambda z: z @ w, x, target=target, absolute=True),
                             np.abs(w[:, target].T), rtol=1e-6)
  gxi = gradtx.gradient_x_input(lambda z: z @ w, x, target=target)
  np.testing.assert_allclose(gxi, x * w[:, target].T, rtol=1e-6)
  # complete for a linear model without bias: Σ x ⊙ ∇F = F(x) - F(0)
  np.testing.assert_allclose(np.asarray(gxi).sum(1), (x @ w)[np.arange(3), target], rtol=1e-5)


def test_saliency_pytree_inputs_and_jit():
  fn = lambda t: jnp.sum(jnp.sin(t["a"]), axis=1) + jnp.sum(t["b"] ** 2, axis=(1, 2))
  x = {"a": jnp.asarray(RNG.standard_normal((2, 3)), jnp.float32),
       "b": jnp.asarray(RNG.standard_normal((2, 2, 2)), jnp.float32)}
  sal = jax.jit(lambda z: gradtx.saliency(fn, z))(x)
  chex.assert_trees_all_close(sal, {"a": jnp.cos(x["a"]), "b": 2 * x["b"]}, rtol=1e-6)


# ------------------------------------------------------------------------------ SmoothGrad


QUAD_C = np.array([0.5, -1.0, 2.0, 1.5])


def _quadratic(x):
  return jnp.sum(QUAD_C.astype(np.float32) * x ** 2, axis=1)  # gradient 2 c x


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smooth_grad_matches_closed_form_expectation(kind):
  x = np.array([[1.0, -2.0, 0.5, 3.0], [0.2, 0.1, -0.3, 0.4]], np.float32)
  samples, stdev = 4000, 0.2
  sigma = stdev * (x.max(1) - x.min(1))[:, None]   # relative to each example's range
  out = gradtx.smooth_grad(functools.partial(gradtx.saliency, _quadratic), x,
                           key=jax.random.key(1), samples=samples, stdev=stdev, kind=kind,
                           batch_size=512)
  g, c2 = 2 * QUAD_C * x, (2 * QUAD_C) ** 2
  expected = {"smoothgrad": g, "smoothgrad_sq": g ** 2 + c2 * sigma ** 2,
              "vargrad": c2 * sigma ** 2 + 0 * x}[kind]
  # standard errors of the means over `samples` Gaussian draws (4 standard errors)
  std = {"smoothgrad": np.sqrt(c2) * sigma,
         "smoothgrad_sq": np.sqrt(c2 * sigma ** 2 * (4 * g ** 2 + 2 * c2 * sigma ** 2)),
         "vargrad": np.sqrt(2) * c2 * sigma ** 2}[kind]
  assert np.all(np.abs(np.asarray(out) - expected) <= 4 * std / np.sqrt(samples) + 1e-6)


def test_smooth_grad_absolute_noise_and_batch_size_invariance():
  x = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
  attr = functools.partial(gradtx.saliency, _quadratic)
  run = lambda **kw: gradtx.smooth_grad(attr, x, key=jax.random.key(3), samples=37,
                                        stdev=0.5, relative=False, kind="vargrad", **kw)
  # the draws depend on the key and the sample index only, not on the chunking
  np.testing.assert_allclose(run(batch_size=5), run(), rtol=1e-5, atol=1e-6)
  # absolute noise: Var[2 c (x + e)] = 4 c^2 0.25 (loose: 37 samples)
  np.testing.assert_allclose(run(), (2 * QUAD_C) ** 2 * 0.25 * np.ones_like(x), rtol=0.6)
  # no noise: the attribution itself
  np.testing.assert_allclose(gradtx.smooth_grad(attr, x, key=jax.random.key(0), samples=3,
                                                stdev=0.0), 2 * QUAD_C * x, rtol=1e-6)


def test_smooth_grad_over_integrated_gradients_averages_every_leaf():
  x = jnp.asarray(RNG.standard_normal((2, 16)), jnp.float32)
  ig = lambda z: gradtx.integrated_gradients(_mlp, z, steps=8, target=1, return_delta=True)
  attr, delta = gradtx.smooth_grad(ig, x, key=jax.random.key(0), samples=6, batch_size=4)
  # reference: the same noise drawn by hand (per sample s: fold_in(key, s), the root path)
  from gradtx import _random

  sigma = 0.15 * (x.max(1) - x.min(1))[:, None]
  draws = [ig(x + sigma * _random.per_leaf(jax.random.fold_in(jax.random.key(0), s), x,
                                          lambda k, v: jax.random.normal(k, v.shape)))
           for s in range(6)]
  np.testing.assert_allclose(attr, np.mean([d[0] for d in draws], 0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(delta, np.mean([d[1] for d in draws], 0), atol=1e-5)


def test_smooth_grad_agrees_with_pair_statistically(pair):
  x = RNG.standard_normal((1, 16))
  ref = pair.GradientSaliency().GetSmoothedMask(
      x[0], _call_model(pair, _mlp, 2), stdev_spread=0.15, nsamples=2000, magnitude=False)
  ours = gradtx.smooth_grad(functools.partial(gradtx.saliency, _mlp, target=2),
                            jnp.asarray(x, jnp.float32), key=jax.random.key(0),
                            samples=2000, stdev=0.15, batch_size=500)
  corr = np.corrcoef(ref, np.asarray(ours)[0])[0, 1]
  assert corr > 0.99, corr
  np.testing.assert_allclose(np.asarray(ours)[0], ref, atol=0.1 * np.abs(ref).max())


# ------------------------------------------------------------------------------ Guided IG


@pytest.mark.parametrize("fraction, max_dist", [(0.25, 0.02), (0.1, 0.1), (1.0, 1.0)])
def test_guided_ig_equals_pair_in_float64(pair, fraction, max_dist):
  x = RNG.standard_normal((3, 16))
  base = 0.1 * RNG.standard_normal(16)
  target = np.array([0, 2, 1])
  with jax.enable_x64(True):
    ours = np.asarray(gradtx.guided_integrated_gradients(
        _mlp, jnp.asarray(x), baseline=jnp.asarray(base), steps=30, fraction=fraction,
        max_dist=max_dist, target=target))
  for i in range(3):
    ref = pair.GuidedIG().GetMask(x[i], _call_model(pair, _mlp, int(target[i])), x_steps=30,
                                  x_baseline=base, fraction=fraction, max_dist=max_dist)
    np.testing.assert_allclose(ours[i], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_guided_ig_is_complete_and_max_dist_zero_is_left_riemann_ig():
  x = jnp.asarray(RNG.standard_normal((4, 16)), jnp.float32)
  target = jnp.array([0, 1, 2, 0])
  rows = np.arange(4)
  change = np.asarray(_mlp(x)[rows, target] - _mlp(jnp.zeros_like(x))[rows, target])
  errors = []
  for steps in (16, 64, 256):
    attr, delta = jax.jit(lambda z, s=steps: gradtx.guided_integrated_gradients(
        _mlp, z, steps=s, target=target, return_delta=True))(x)
    np.testing.assert_allclose(np.asarray(attr).sum(1) - change, delta, atol=1e-4)
    errors.append(np.mean(np.abs(np.asarray(delta)) / np.abs(change)))
  assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02, errors
  # max_dist = 0: every feature stays on the straight line: Σ_k (d/n) ∇F(k d / n)
  gig = gradtx.guided_integrated_gradients(_mlp, x, steps=12, max_dist=0.0, target=target)
  grad = jax.grad(lambda z: jnp.sum(_mlp(z)[rows, target]))
  left = sum(np.asarray(grad(x * k / 12), np.float64) for k in range(12)) / 12
  np.testing.assert_allclose(gig, np.asarray(x) * left, rtol=1e-4, atol=1e-5)


def test_guided_ig_pytree_input_is_one_path():
  fn = lambda t: _mlp(jnp.concatenate([t["a"], t["b"].reshape(-1, 10)], axis=1))
  x = jnp.asarray(RNG.standard_normal((2, 16)), jnp.float32)
  tree = {"a": x[:, :6], "b": x[:, 6:].reshape(2, 5, 2)}
  flat = gradtx.guided_integrated_gradients(_mlp, x, steps=10, target=1)
  parts = gradtx.guided_integrated_gradients(fn, tree, steps=10, target=1)
  chex.assert_trees_all_close(parts, {"a": flat[:, :6], "b": flat[:, 6:].reshape(2, 5, 2)},
                              rtol=1e-5, atol=1e-6)


def test_guided_ig_input_equal_to_baseline_is_zero():
  x = jnp.ones((2, 16))
  attr = gradtx.guided_integrated_gradients(_mlp, x, baseline=x[0], steps=4, target=0)
  np.testing.assert_array_equal(attr, 0.0)


# --------------------------------------------------------------------------------- Blur IG


def test_gaussian_blur_equals_scipy():
  img = RNG.random((2, 9, 7, 2))
  blur = jax.jit(lambda x, s: gradtx.attribution.gaussian_blur(x, s, max_sigma=50.0))
  for sigma in (0.0, 0.3, 1.0, 2.7, 50.0):
    with jax.enable_x64(True):
      ours = np.asarray(blur(jnp.asarray(img), sigma))
    ref = np.stack([ndimage.gaussian_filter(i, (sigma, sigma, 0), mode="constant")
                    if sigma else i for i in img])
    np.testing.assert_allclose(ours, ref, atol=1e-12)


W_IMG = RNG.standard_normal((9 * 7 * 2, 3))


def _img_model(z):
  return jnp.tanh(z.reshape(z.shape[0], -1) @ W_IMG.astype(z.dtype))


@pytest.mark.parametrize("sqrt", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_blur_ig_equals_pair_in_float64(pair, sqrt):
  img = RNG.random((2, 9, 7, 2))
  with jax.enable_x64(True):
    ours = np.asarray(gradtx.blur_integrated_gradients(
        _img_model, jnp.asarray(img), steps=20, max_sigma=5.0, sqrt=sqrt, target=1,
        batch_size=7))
  for i in range(2):
    ref = pair.BlurIG().GetMask(img[i], _call_model(pair, _img_model, 1), steps=20,
                                max_sigma=5.0, sqrt=sqrt)
    np.testing.assert_allclose(ours[i], ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_blur_ig_completeness_with_the_exact_derivative():
  img = jnp.asarray(np.random.default_rng(5).random((3, 9, 7, 2)), jnp.float32)
  rows = np.arange(3)
  start = gradtx.attribution.gaussian_blur(img, 4.0)
  change = np.asarray(_img_model(img)[rows, 0] - _img_model(start)[rows, 0])
  errors = {}
  for grad_step, steps in ((0.01, 128), (None, 16), (None, 128)):
    attr, delta = gradtx.blur_integrated_gradients(
        _img_model, img, max_sigma=4.0, steps=steps, grad_step=grad_step, target=0,
        return_delta=True)
    np.testing.assert_allclose(np.asarray(attr).reshape(3, -1).sum(1) - change, delta,
                               atol=2e-5)
    errors[grad_step, steps] = np.mean(np.abs(np.asarray(delta)) / np.abs(change))
  # left Riemann in σ: the error falls like 1/steps (8x the steps: below a quarter)
  assert errors[None, 128] < errors[None, 16] / 4 and errors[None, 128] < 0.03, errors


# ---------------------------------------------------------------------- Integrated Hessians


def test_integrated_hessians_closed_form_on_a_quadratic():
  a = RNG.standard_normal((5, 5))
  a = a + a.T
  b = RNG.standard_normal(5)
  fn = lambda x: 0.5 * jnp.einsum("ni,ij,nj->n", x, a, x) + x @ b
  x, base = RNG.standard_normal((2, 5)), RNG.standard_normal(5)
  with jax.enable_x64(True):
    gamma, delta = gradtx.integrated_hessians(fn, jnp.asarray(x), baseline=jnp.asarray(base),
                                              steps=2, return_delta=True)
  d = x - base
  grad0 = base @ a + b
  ref = d[:, :, None] * d[:, None, :] * a / 4
  ref += np.einsum("ni,ij->nij", d * (grad0 + (d @ a) / 4), np.eye(5))
  np.testing.assert_allclose(gamma, ref, rtol=1e-12, atol=1e-12)
  ig = d * (grad0 + (d @ a) / 2)   # exact IG of a quadratic
  np.testing.assert_allclose(np.asarray(gamma).sum(2), ig, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(delta, 0.0, atol=1e-12)


def test_integrated_hessians_matches_a_hessian_loop_and_chunking():
  x = jnp.asarray(RNG.standard_normal((2, 16)) * 0.5, jnp.float32)
  steps, target = 3, 2
  gamma = gradtx.integrated_hessians(_mlp, x, steps=steps, target=target, batch_size=4,
                                     row_batch_size=5)
  nodes, weights = np.polynomial.legendre.leggauss(steps)
  nodes, weights = (nodes + 1) / 2, weights / 2
  scalar = lambda v: _mlp(v[None])[0, target]
  with jax.enable_x64(True):
    hess, grad = jax.jit(jax.hessian(scalar)), jax.jit(jax.grad(scalar))
    for n in range(2):
      d = np.asarray(x[n], np.float64)
      ref = np.zeros((16, 16))
      for a, wa in zip(nodes, weights, strict=True):
        for b, wb in zip(nodes, weights, strict=True):
          p = jnp.asarray(a * b * d)
          ref += wa * wb * (a * b * np.outer(d, d) * np.asarray(hess(p))
                            + np.diag(d * np.asarray(grad(p))))
      np.testing.assert_allclose(gamma[n], ref, rtol=2e-4, atol=2e-5)
  # rows add up to Integrated Gradients (a fine rule: the quadrature errors differ)
  fine = gradtx.integrated_hessians(_mlp, x, steps=12, target=target)
  ig = gradtx.integrated_gradients(_mlp, x, steps=64, target=target)
  np.testing.assert_allclose(np.asarray(fine).sum(2), ig, rtol=1e-3, atol=1e-4)


def test_integrated_hessians_shapes():
  img = jnp.asarray(RNG.random((2, 3, 3, 1)), jnp.float32)
  fn = lambda z: jnp.sum(jnp.tanh(z) ** 2, axis=(1, 2, 3))
  assert gradtx.integrated_hessians(fn, img, steps=2).shape == (2, 3, 3, 1, 3, 3, 1)
  tree = {"a": img[:, 0, :, 0], "b": img[:, 1:].reshape(2, 6)}
  tfn = lambda t: jnp.sum(jnp.tanh(t["a"]) ** 2, 1) + jnp.sum(jnp.tanh(t["b"]) ** 2, 1)
  assert gradtx.integrated_hessians(tfn, tree, steps=2).shape == (2, 9, 9)


# -------------------------------------------------------------------------------- pictures


def test_plots_draw_with_agg():
  matplotlib = pytest.importorskip("matplotlib")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig = gradtx.attribution.plot_image(RNG.standard_normal((3, 8, 8, 1)),
                                      RNG.random((3, 8, 8, 1)), scale="per_image")
  assert len(fig.axes) == 6   # three images, three colour bars
  fig2 = gradtx.attribution.plot_tokens(list("abc"), [1.0, -1.0, 0.0], title="t")
  assert [t.get_text() for t in fig2.axes[0].texts] == ["a", "b", "c"]
  plt.close("all")
  with pytest.raises(ValueError, match=r"scores must be one score per token, shape \(3,\)"):
    gradtx.attribution.plot_tokens(list("abc"), [1.0])
  with pytest.raises(ValueError, match=r"scale must be one of 'shared', 'per_image'"):
    gradtx.attribution.plot_image(np.zeros((1, 2, 2)), scale="global")
