"""Layer Integrated Gradients at one iteration of a scanned layer (issue #20).

The reference is the same transformer written unrolled (``blocks_0 … blocks_3``) with the
same weights: layer IG of scanned iteration 2 must equal layer IG of ``blocks_2`` of the
unrolled model, and both must equal a hand-cut reference — the unrolled model split by
hand at block 2 (``h = blocks_2(…(embed(ids)))``, ``g = head(blocks_3(h))``) with the path
integral written as a loop of ``jax.grad`` over numpy's Gauss–Legendre nodes in float64.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _attribution_models import NnxStack
from flax import nnx

import gradtx

VOCAB, DIM, HEADS, LAYERS, CLASSES, TOKENS = 11, 8, 2, 4, 3, 5
STEPS, LAYER = 8, 2


def _ids(seed=0, batch=2):
  return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, (batch, TOKENS)), jnp.int32)


def _reference_lig(g, h, h0, target):
  """``(h - h0) ⊙ Σ_k w_k ∇g_target(h0 + α_k (h - h0))`` (float64 sum) and the change of g."""
  alphas, weights = np.polynomial.legendre.leggauss(STEPS)
  alphas, weights = (alphas + 1) / 2, weights / 2
  scalar = lambda z: g(z)[:, target]
  grad = jax.jit(jax.grad(lambda z: jnp.sum(scalar(z))))
  h64, h064 = np.asarray(h, np.float64), np.broadcast_to(np.asarray(h0, np.float64), h.shape)
  total = np.zeros_like(h64)
  for alpha, weight in zip(alphas, weights, strict=True):
    total += weight * np.asarray(grad(jnp.asarray(h064 + alpha * (h64 - h064), jnp.float32)))
  return (h64 - h064) * total, np.asarray(scalar(h) - scalar(jnp.broadcast_to(h0, h.shape)))


# --------------------------------------------------------------------------------------
# linen: the block is a scan body (carry, xs) -> (carry, ys)


class _Block(nn.Module):

  @nn.compact
  def __call__(self, h, _):
    mask = nn.make_causal_mask(jnp.ones(h.shape[:2]))
    h = h + nn.MultiHeadDotProductAttention(HEADS, deterministic=True)(nn.LayerNorm()(h), mask=mask)
    h = h + nn.Dense(DIM)(nn.gelu(nn.Dense(2 * DIM)(nn.LayerNorm()(h))))
    return h, None


class _Unrolled(nn.Module):

  def setup(self):
    self.embed = nn.Embed(VOCAB, DIM)
    self.blocks = [_Block(name=f"blocks_{i}") for i in range(LAYERS)]
    self.head = nn.Dense(CLASSES)

  def upto(self, ids, k):
    """The output of block ``k``."""
    h = self.embed(ids)
    for block in self.blocks[:k + 1]:
      h = block(h, None)[0]
    return h

  def after(self, h, k):
    """The rest of the model after block ``k``."""
    for block in self.blocks[k + 1:]:
      h = block(h, None)[0]
    return self.head(h.mean(axis=1))

  def __call__(self, ids):
    return self.after(self.upto(ids, LAYERS - 1), LAYERS - 1)


class _Scanned(nn.Module):

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(VOCAB, DIM, name="embed")(ids)
    blocks = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=LAYERS)
    h, _ = blocks(name="blocks")(h, None)
    return nn.Dense(CLASSES, name="head")(h.mean(axis=1))


def _stack(trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _linen_pair():
  ids = _ids()
  unrolled = _Unrolled().init(jax.random.key(0), ids)
  p = unrolled["params"]
  scanned = {"params": {"embed": p["embed"], "head": p["head"],
                        "blocks": _stack([p[f"blocks_{i}"] for i in range(LAYERS)])}}
  return unrolled, scanned, ids


def test_linen_scanned_layer_equals_unrolled_and_hand_cut():
  unrolled, scanned, ids = _linen_pair()
  np.testing.assert_allclose(jax.jit(_Scanned().apply)(scanned, ids),
                             jax.jit(_Unrolled().apply)(unrolled, ids), rtol=1e-5, atol=1e-6)
  pad = jnp.full((TOKENS,), 3, jnp.int32)
  target = jnp.array([2, 0])
  attr_s, delta_s = gradtx.layer_integrated_gradients(
      lambda i: _Scanned().apply(scanned, i), ids, "blocks", layer_index=LAYER, steps=STEPS,
      target=target, baseline=pad, return_delta=True)
  attr_u, delta_u = gradtx.layer_integrated_gradients(
      lambda i: _Unrolled().apply(unrolled, i), ids, f"blocks_{LAYER}", steps=STEPS,
      target=target, baseline=pad, return_delta=True)
  # a scan body returns (carry, ys): so does the unrolled block, and so do the attributions
  assert isinstance(attr_s, tuple) and attr_s[1] is None and attr_u[1] is None
  np.testing.assert_allclose(attr_s[0], attr_u[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(delta_s, delta_u, atol=1e-5)

  upto = jax.jit(lambda i: _Unrolled().apply(unrolled, i, LAYER, method=_Unrolled.upto))
  g = lambda h: _Unrolled().apply(unrolled, h, LAYER, method=_Unrolled.after)
  h, h0 = upto(ids), upto(jnp.broadcast_to(pad, ids.shape))
  for n in range(ids.shape[0]):   # one target per example: one reference per example
    ref, change = _reference_lig(g, h[n:n + 1], h0[n:n + 1], int(target[n]))
    np.testing.assert_allclose(attr_s[0][n:n + 1], ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(delta_s[n], ref.sum() - change[0], atol=1e-5)


def test_linen_scanned_under_jit_and_negative_index():
  unrolled, scanned, ids = _linen_pair()

  @jax.jit
  def attribute(variables, ids):
    return gradtx.layer_integrated_gradients(
        lambda i: _Scanned().apply(variables, i), ids, "blocks", layer_index=LAYER - LAYERS,
        steps=STEPS, target=1, layer_baseline=0.0, batch_size=3)

  attr_u = gradtx.layer_integrated_gradients(
      lambda i: _Unrolled().apply(unrolled, i), ids, f"blocks_{LAYER}", steps=STEPS,
      target=1, layer_baseline=0.0)
  np.testing.assert_allclose(attribute(scanned, ids)[0], attr_u[0], rtol=1e-4, atol=1e-6)


class _Collecting(nn.Module):
  """A scan body with per-iteration outputs ys that the model uses."""

  @nn.compact
  def __call__(self, h, _):
    h = h + jnp.tanh(nn.Dense(DIM)(h))
    return h, jnp.sin(h).sum(axis=-1)


class _Nested(nn.Module):
  """The scan inside a submodule (path "encoder/blocks"), its ys summed into the output."""

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(_Collecting, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=LAYERS)
    h, ys = blocks(name="blocks")(x, None)      # ys: (L, N)
    return h.sum(axis=-1) + ys.sum(axis=0)


class _Outer(nn.Module):

  @nn.compact
  def __call__(self, x):
    return _Nested(name="encoder")(nn.Dense(DIM, name="inp")(x))


def test_linen_nested_scan_with_ys_is_complete_and_matches_hand_cut():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4)), jnp.float32)
  variables = _Outer().init(jax.random.key(1), x)
  fn = lambda z: _Outer().apply(variables, z)
  attr, delta = gradtx.layer_integrated_gradients(
      fn, x, "encoder/blocks", layer_index=1, steps=STEPS, layer_baseline=0.0,
      return_delta=True)
  carry_attr, ys_attr = attr
  assert carry_attr.shape == (3, DIM) and ys_attr.shape == (3,)
  # by hand: iteration 1's (carry, y) replaced by (h, y); the rest of the scan and the sum
  p = variables["params"]
  dense = lambda h, i: h @ p["encoder"]["blocks"]["Dense_0"]["kernel"][i] + p["encoder"][
      "blocks"]["Dense_0"]["bias"][i]
  step = lambda h, i: h + jnp.tanh(dense(h, i))
  h = x @ p["inp"]["kernel"] + p["inp"]["bias"]
  ys = []
  for i in range(2):
    h = step(h, i)
    ys.append(jnp.sin(h).sum(-1))

  def g(hy):
    h, y1 = hy[:, :DIM], hy[:, DIM]
    out = ys[0] + y1
    for i in range(2, LAYERS):
      h = step(h, i)
      out = out + jnp.sin(h).sum(-1)
    return (h.sum(-1) + out)[:, None]

  hy = jnp.concatenate([h, ys[1][:, None]], axis=1)
  ref, change = _reference_lig(g, hy, jnp.zeros(()), 0)
  np.testing.assert_allclose(carry_attr, ref[:, :DIM], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(ys_attr, ref[:, DIM], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(delta, ref.sum(1) - change, atol=1e-5)


# --------------------------------------------------------------------------------------
# nnx: an nnx.vmap-built stack run by nnx.scan (tree mode), against an nnx.List


class _NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.norm1 = nnx.LayerNorm(DIM, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(DIM, rngs=rngs)
    self.up = nnx.Linear(DIM, 2 * DIM, rngs=rngs)
    self.down = nnx.Linear(2 * DIM, DIM, rngs=rngs)

  def __call__(self, h):
    mask = nnx.make_causal_mask(jnp.ones(h.shape[:2]))
    h = h + self.attn(self.norm1(h), mask=mask, deterministic=True)
    return h + self.down(nnx.gelu(self.up(self.norm2(h))))




class _NnxScanned(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _NnxBlock(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(DIM, CLASSES, rngs=rngs)

  def __call__(self, ids):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, graph=False)
    def body(h, block):
      return block(h)

    return self.head(body(self.embed(ids), self.blocks).mean(axis=1))


def _nnx_pair():
  unrolled = NnxStack(VOCAB, DIM, CLASSES, _NnxBlock, LAYERS, nnx.Rngs(0))
  scanned = _NnxScanned(nnx.Rngs(1))
  nnx.update(scanned.embed, nnx.state(unrolled.embed))
  nnx.update(scanned.head, nnx.state(unrolled.head))
  nnx.update(scanned.blocks, _stack([nnx.state(b) for b in unrolled.blocks]))
  return unrolled, scanned, _ids(seed=3)


def test_nnx_scanned_layer_equals_unrolled_and_hand_cut():
  unrolled, scanned, ids = _nnx_pair()
  forward = lambda m: jax.jit(lambda i: m(i))(ids)
  np.testing.assert_allclose(forward(scanned), forward(unrolled), rtol=1e-5, atol=1e-6)
  pad = jnp.full((TOKENS,), 4, jnp.int32)
  attr_s, delta_s = gradtx.layer_integrated_gradients(
      scanned, ids, "blocks", layer_index=LAYER, steps=STEPS, target=1, baseline=pad,
      return_delta=True)
  attr_u, delta_u = gradtx.layer_integrated_gradients(
      unrolled, ids, f"blocks/{LAYER}", steps=STEPS, target=1, baseline=pad,
      return_delta=True)
  np.testing.assert_allclose(attr_s, attr_u, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(delta_s, delta_u, atol=1e-5)

  @jax.jit
  def upto(i):
    h = unrolled.embed(i)
    for block in unrolled.blocks[:LAYER + 1]:
      h = block(h)
    return h

  def g(h):
    for block in unrolled.blocks[LAYER + 1:]:
      h = block(h)
    return unrolled.head(h.mean(axis=1))

  ref, change = _reference_lig(g, upto(ids), upto(jnp.broadcast_to(pad, ids.shape)), 1)
  np.testing.assert_allclose(attr_s, ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(delta_s, ref.sum((1, 2)) - change, atol=1e-5)


def test_nnx_scanned_under_jit_reduced():
  unrolled, scanned, ids = _nnx_pair()
  attribute = jax.jit(lambda i: gradtx.layer_integrated_gradients(
      scanned, i, "blocks", layer_index=-1, steps=STEPS, target=0, layer_baseline=0.0,
      reduce="sum"))
  ref = gradtx.layer_integrated_gradients(unrolled, ids, f"blocks/{LAYERS - 1}", steps=STEPS,
                                          target=0, layer_baseline=0.0, reduce="sum")
  assert attribute(ids).shape == ids.shape
  np.testing.assert_allclose(attribute(ids), ref, rtol=1e-4, atol=1e-6)


def test_equal_iterations_under_jit_give_nan():
  _, scanned, ids = _linen_pair()
  blocks = scanned["params"]["blocks"]
  twins = {"params": {**scanned["params"],
                      "blocks": jax.tree.map(lambda a: a.at[3].set(a[2]), blocks)}}
  attribute = jax.jit(lambda v: gradtx.layer_integrated_gradients(
      lambda i: _Scanned().apply(v, i), ids, "blocks", layer_index=2, steps=2, target=0,
      layer_baseline=0.0)[0])
  assert bool(jnp.all(jnp.isnan(attribute(twins))))
  assert not bool(jnp.any(jnp.isnan(attribute(scanned))))
