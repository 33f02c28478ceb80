"""A small transformer written three times with the same weights: the reference for scanned layers.

* :class:`UnrolledLM` (linen): ``blocks_0 … blocks_{L-1}``, one submodule per block — the
  reference every per-layer technique is compared against.
* :class:`ScannedLM` (linen): the same blocks under ``nn.scan``; every block weight is one
  leaf ``params/blocks/<...>`` with a leading layer axis of length L.
* :class:`NnxScannedLM` (nnx): the blocks created by ``nnx.vmap`` and applied with
  ``nnx.scan``; its ``nnx.Param`` state has the paths ``blocks/<...>``, stacked on axis 0.

:func:`scanned_params` and :func:`unrolled_params` convert between the linen layouts
(stack / unstack axis 0), and :func:`nnx_model` builds the nnx model holding given linen
scanned weights, so the three models compute the same function. Shared with the tests of
other engineers (layer attribution over a scan); keep it small and dependency-free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from gradtx import tree_paths

VOCAB, DIM, HEADS, LAYERS, SEQ = 11, 8, 2, 4, 5


def _attention(q, k, v, heads):
  """Causal multi-head dot-product attention on (batch, seq, dim) projections."""
  b, s, d = q.shape
  split = lambda x: x.reshape(b, s, heads, d // heads)
  logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / np.sqrt(d // heads)
  logits = jnp.where(jnp.tril(jnp.ones((s, s), bool)), logits, -1e9)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), split(v)).reshape(b, s, d)


class Block(nn.Module):
  """Pre-LN transformer block: attention and a GELU MLP, each with a residual."""

  dim: int = DIM
  heads: int = HEADS

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln1")(x)
    # No key bias: attention is invariant to it, its gradient is rounding noise that Adam
    # would blow up into updates that differ between two float orders of the same model.
    q, k, v = (nn.Dense(self.dim, use_bias=n != "key", name=n)(h)
               for n in ("query", "key", "value"))
    x = x + nn.Dense(self.dim, name="out")(_attention(q, k, v, self.heads))
    h = nn.LayerNorm(name="ln2")(x)
    return x + nn.Dense(self.dim, name="mlp_out")(nn.gelu(nn.Dense(4 * self.dim,
                                                                   name="mlp_in")(h)))


class _ScanBlock(Block):
  """:class:`Block` with ``nn.scan``'s ``(carry, x) -> (carry, y)`` signature."""

  def __call__(self, x, _):  # pylint: disable=arguments-differ
    return super().__call__(x), None


class UnrolledLM(nn.Module):
  """Embedding, ``layers`` blocks ``blocks_0 …``, final LayerNorm and head."""

  layers: int = LAYERS

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, DIM, name="embed")(tokens)
    for i in range(self.layers):
      x = Block(name=f"blocks_{i}")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))


class ScannedLM(nn.Module):
  """:class:`UnrolledLM` with its blocks under ``nn.scan`` (leaves ``params/blocks/...``)."""

  layers: int = LAYERS

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, DIM, name="embed")(tokens)
    stack = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=self.layers)
    x, _ = stack(name="blocks")(x, None)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))


class NnxBlock(nnx.Module):
  """:class:`Block` in nnx, with the same parameter names."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.ln1, self.ln2 = nnx.LayerNorm(DIM, rngs=rngs), nnx.LayerNorm(DIM, rngs=rngs)
    for name in ("query", "key", "value", "out", "mlp_out"):
      setattr(self, name, nnx.Linear(4 * DIM if name == "mlp_out" else DIM, DIM,
                                     use_bias=name != "key", rngs=rngs))
    self.mlp_in = nnx.Linear(DIM, 4 * DIM, rngs=rngs)

  def __call__(self, x):
    h = self.ln1(x)
    x = x + self.out(_attention(self.query(h), self.key(h), self.value(h), HEADS))
    return x + self.mlp_out(nn.gelu(self.mlp_in(self.ln2(x))))


class NnxScannedLM(nnx.Module):
  """:class:`ScannedLM` in nnx: blocks made by ``nnx.vmap``, applied by ``nnx.scan``."""

  def __init__(self, layers: int = LAYERS, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return NnxBlock(rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.ln_f = nnx.LayerNorm(DIM, rngs=rngs)
    self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return self.head(self.ln_f(forward(self.embed(tokens), self.blocks)))


def tokens(seed: int = 0, batch: int = 3) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, SEQ)), jnp.int32)


def unrolled_params(seed: int = 0, layers: int = LAYERS) -> dict:
  """Random weights of :class:`UnrolledLM` (biases and LayerNorms perturbed too)."""
  params = UnrolledLM(layers).init(jax.random.key(seed), tokens())
  rng = np.random.default_rng(seed + 1)
  return jax.tree.map(
      lambda x: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), params)


def scanned_params(unrolled: dict, layers: int = LAYERS) -> dict:
  """:class:`ScannedLM` weights from :class:`UnrolledLM` ones: ``blocks_i`` is slice i."""
  p = dict(unrolled["params"])
  blocks = [p.pop(f"blocks_{i}") for i in range(layers)]
  return {"params": {**p, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}}


def unrolled_like(scanned: dict, layers: int = LAYERS) -> dict:
  """The inverse of :func:`scanned_params` (any tree with the scanned layout, e.g. grads)."""
  p = dict(scanned["params"])
  blocks = p.pop("blocks")
  return {"params": {**p, **{f"blocks_{i}": jax.tree.map(lambda x, i=i: x[i], blocks)
                             for i in range(layers)}}}


def nnx_model(scanned: dict, layers: int = LAYERS) -> NnxScannedLM:
  """An :class:`NnxScannedLM` holding the linen :class:`ScannedLM` weights ``scanned``."""
  model = NnxScannedLM(layers, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  by_path = dict(zip(tree_paths(scanned), jax.tree.leaves(scanned), strict=True))
  values = [by_path["params/" + path] for path in tree_paths(state)]
  nnx.update(model, jax.tree.unflatten(jax.tree.structure(state), values))
  return model
