"""Integrated Gradients with the model's affine first layers hoisted out of the steps.

References: IG from plain ``jax.grad`` at every point of the path (the model as the
user wrote it), the affine layers written out by hand with ``lax``, and XLA's FLOP count
against the closed form of the convolution that no longer runs per step.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradtx
from gradtx.attribution import _affine_prefix

STEPS = 16


def _plain_ig(fn, x, baseline, target, steps=STEPS):
  """Σ_k w_k ∇F(x' + α_k (x - x')) by jax.grad at each Gauss–Legendre node, times x - x'."""
  nodes, weights = np.polynomial.legendre.leggauss(steps)
  scalar = lambda z: jnp.sum(fn(z)[jnp.arange(len(z)), target])
  total = 0.0
  for a, w in zip((nodes + 1) / 2, weights / 2, strict=True):
    total = total + w * jax.grad(scalar)(baseline + a * (x - baseline))
  return (x - baseline) * total


class _ConvNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(6, (3, 3))(x))
    x = nn.softplus(nn.Conv(4, (3, 3), strides=(2, 2))(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def _conv_net():
  model = _ConvNet()
  x = jax.random.uniform(jax.random.key(0), (5, 8, 8, 1))
  params = model.init(jax.random.key(1), x)
  return (lambda z: model.apply(params, z)), x


def _weights(*shapes):
  keys = jax.random.split(jax.random.key(2), len(shapes))
  return [jax.random.normal(k, s) / np.sqrt(s[0]) for k, s in zip(keys, shapes, strict=True)]


def _residual():
  w1, w2 = _weights((6, 6), (6, 3))
  # the input feeds the dense layer and, directly, the nonlinear sum
  return (lambda x: jnp.tanh(x + x @ w1) @ w2), jax.random.normal(jax.random.key(3), (4, 6))


def _nested_jit_and_casts():
  w1, w2 = _weights((6, 5), (5, 3))
  first = jax.jit(lambda x: jnp.pad(x, ((0, 0), (1, 0)))[:, 1:] @ w1 / 2.0 - 1.0)
  fn = lambda x: jnp.sin(jnp.concatenate([first(x), jnp.ones((len(x), 1))], 1))[:, :5] @ w2
  return fn, jax.random.normal(jax.random.key(4), (4, 6))


def _linear():
  (w,) = _weights((6, 3))
  return (lambda x: 3.0 * (x @ w) + 1.0), jax.random.normal(jax.random.key(5), (4, 6))


def _stop_gradient():
  w1, w2, w3 = _weights((6, 4), (4, 3), (6, 3))
  # the gradient does not flow through the first product: hoisting must not revive it
  fn = lambda x: jnp.tanh(jax.lax.stop_gradient(x @ w1)) @ w2 + jnp.tanh(x @ w3)
  return fn, jax.random.normal(jax.random.key(11), (4, 6))


MODELS = {"conv_net": _conv_net, "residual": _residual,
          "nested_jit_and_casts": _nested_jit_and_casts, "linear": _linear,
          "stop_gradient": _stop_gradient}


@pytest.mark.parametrize("batch_size", [None, 5])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_hoisted_ig_matches_plain_autodiff(name, batch_size):
  fn, x = MODELS[name]()
  baseline = 0.1 * jax.random.normal(jax.random.key(6), x.shape)
  target = jnp.arange(len(x)) % 3
  assert _affine_prefix.split(lambda leaves: fn(leaves[0]), [x]) is not None
  attr, delta = gradtx.integrated_gradients(fn, x, baseline=baseline, steps=STEPS,
                                            target=target, batch_size=batch_size,
                                            return_delta=True)
  ref = _plain_ig(fn, x, baseline, target)
  np.testing.assert_allclose(attr, ref, rtol=2e-4, atol=2e-6 * float(jnp.abs(ref).max()))
  if name == "stop_gradient":
    return  # its gradient is not F's, so the attributions do not add up to F(x) - F(x')
  # completeness holds for the hoisted sum too (smooth models, 16 nodes)
  outputs = lambda z: fn(z)[jnp.arange(len(z)), target]
  np.testing.assert_allclose(attr.reshape(len(x), -1).sum(1), outputs(x) - outputs(baseline),
                             rtol=1e-3, atol=1e-4)
  assert np.all(np.abs(delta) < 1e-3)


def test_pytree_inputs_hoist_one_leaf():
  (w,) = _weights((4, 3))
  fn = lambda t: jnp.tanh(t["tab"] @ w) * jnp.cos(t["img"]).sum(1, keepdims=True)
  x = {"img": jax.random.normal(jax.random.key(7), (3, 5)),
       "tab": jax.random.normal(jax.random.key(8), (3, 4))}
  attr = gradtx.integrated_gradients(fn, x, steps=STEPS, target=1)
  nodes, weights = np.polynomial.legendre.leggauss(STEPS)
  scalar = lambda img, tab: jnp.sum(fn({"img": img, "tab": tab})[:, 1])
  ref_img = ref_tab = 0.0
  for a, weight in zip((nodes + 1) / 2, weights / 2, strict=True):
    g_img, g_tab = jax.grad(scalar, argnums=(0, 1))(a * x["img"], a * x["tab"])
    ref_img, ref_tab = ref_img + weight * g_img, ref_tab + weight * g_tab
  np.testing.assert_allclose(attr["img"], x["img"] * ref_img, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(attr["tab"], x["tab"] * ref_tab, rtol=1e-4, atol=1e-6)


def test_prefix_is_the_first_convolution_and_its_bias():
  fn, x = _conv_net()
  split = _affine_prefix.split(lambda leaves: fn(leaves[0]), [x])
  (cut,) = split.prefix([x])
  variables = _ConvNet().init(jax.random.key(1), x)["params"]["Conv_0"]  # fn's own
  expected = jax.lax.conv_general_dilated(
      x, variables["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + variables["bias"]
  np.testing.assert_allclose(cut, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(split.suffix([cut]), fn(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [
    lambda x: jnp.tanh(x).sum(1),                     # nothing affine before the tanh
    lambda x: jnp.sum((x + 1.0) * 2.0, 1),            # affine, but no product to hoist
    lambda x: (x * x) @ jnp.ones((3, 2)),             # x * x is not affine
    lambda x: (1.0 / x) @ jnp.ones((3, 2)),           # nor is the reciprocal
], ids=["nonlinear", "no_heavy_op", "square", "reciprocal"])
def test_nothing_to_hoist(fn):
  x = jnp.ones((2, 3))
  assert _affine_prefix.split(lambda leaves: fn(leaves[0]), [x]) is None


def test_effects_are_not_split():
  fn = lambda x: jax.debug.print("{}", 0) or jnp.tanh(x @ jnp.ones((3, 2)))
  assert _affine_prefix.split(lambda leaves: fn(leaves[0]), [jnp.ones((2, 3))]) is None


def test_hoisting_removes_the_per_step_convolution():
  fn, x = _conv_net()
  baseline = jnp.full(x.shape[1:], 0.5)  # not zeros, which XLA could fold away
  flops = {}
  for hoist in (True, False):
    run = jax.jit(lambda z, h=hoist: gradtx.integrated_gradients(
        fn, z, baseline=baseline, steps=STEPS, target=0, hoist_affine=h))
    flops[hoist] = run.lower(x).compile().cost_analysis()["flops"]
  # The first convolution (1 -> 6 channels, 3x3, 'SAME' on 8x8): 3 * 8 - 2 = 22 kernel
  # taps per axis fall inside the image, each a multiply and an add, forward or
  # transposed. Unhoisted it runs 2 * STEPS times, hoisted 3 times (A(x), A(x'), Lᵀ);
  # the interpolation in the 6-channel cut instead of the input costs a little back.
  conv_flops = 2 * x.shape[0] * 22 ** 2 * 6 * 1
  saved = (2 * STEPS - 3) * conv_flops
  assert flops[False] - flops[True] >= 0.8 * saved, (flops, saved)


def test_nnx_model_is_hoisted_and_exact():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
      self.head = nnx.Linear(8 * 8 * 4, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.tanh(self.conv(x)).reshape((x.shape[0], -1)))

  graph, state = nnx.split(Net(nnx.Rngs(0)))
  fn = lambda z: nnx.merge(graph, state)(z)
  x = jax.random.uniform(jax.random.key(9), (3, 8, 8, 1))
  target = jnp.array([0, 2, 1])
  assert _affine_prefix.split(lambda leaves: fn(leaves[0]), [x]) is not None
  attr = jax.jit(lambda z: gradtx.integrated_gradients(fn, z, steps=STEPS, target=target))(x)
  ref = _plain_ig(fn, x, jnp.zeros_like(x), target)
  np.testing.assert_allclose(attr, ref, rtol=2e-4, atol=2e-6 * float(jnp.abs(ref).max()))


def test_float64_hoisting_is_exact_to_rounding():
  with jax.enable_x64(True):
    fn, x = _conv_net()
    x = x.astype(jnp.float64)
    fn64 = lambda z: fn(z).astype(jnp.float64)
    hoisted, plain = (gradtx.integrated_gradients(fn64, x, steps=STEPS, target=1,
                                                  hoist_affine=h) for h in (True, False))
    assert hoisted.dtype == jnp.float64
    np.testing.assert_allclose(hoisted, _plain_ig(fn64, x, jnp.zeros_like(x), 1),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(hoisted, plain, rtol=1e-5, atol=1e-7)


def test_bfloat16_model_keeps_its_precision():
  (w1, w2) = _weights((6, 8), (8, 3))
  w1, w2 = w1.astype(jnp.bfloat16), w2.astype(jnp.bfloat16)
  # float32 inputs cast to the model's bfloat16: the cut is a bfloat16 activation
  fn = lambda x: (jnp.tanh(x.astype(jnp.bfloat16) @ w1) @ w2).astype(jnp.float32)
  x = jax.random.normal(jax.random.key(10), (4, 6))
  assert _affine_prefix.split(lambda leaves: fn(leaves[0]), [x]) is not None
  hoisted = gradtx.integrated_gradients(fn, x, steps=STEPS, target=0)
  assert hoisted.dtype == jnp.float32
  # both round the model's activations to bfloat16 (8 bits of mantissa), at other points
  ref = _plain_ig(fn, x, jnp.zeros_like(x), jnp.zeros(len(x), jnp.int32))
  np.testing.assert_allclose(hoisted, ref, atol=0.03 * float(jnp.abs(ref).max()))
