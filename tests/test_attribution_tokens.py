"""Token attribution for causal language models (linen and nnx) against direct evaluation.

The references are the model itself: the target's log-probability computed from the
logits with ``numpy`` (float64 log-softmax), at the input and at the baseline token ids,
so completeness ``Σ scores = log p(x) − log p(x')`` is checked against numbers gradtx
does not produce; causality (tokens after the position score exactly 0); and the
compiled memory at T = 2048 against the naive all-steps-at-once program
(``memory_analysis``).
"""

import functools
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gradtx

VOCAB, DIM, HEADS = 13, 8, 2


class _LinenLM(nn.Module):
  """Embed -> causal self-attention block -> vocabulary logits; ``rest`` from embeddings."""

  def setup(self):
    self.embed = nn.Embed(VOCAB, DIM)
    self.attn = nn.MultiHeadDotProductAttention(HEADS, deterministic=True)
    self.norm, self.up, self.down = nn.LayerNorm(), nn.Dense(2 * DIM), nn.Dense(DIM)
    self.out = nn.Dense(VOCAB)

  def __call__(self, ids):
    return self.rest(self.embed(ids), ids)

  def rest(self, h, ids):
    h = h + self.attn(h, h, mask=nn.make_causal_mask(ids))
    h = h + self.down(jnp.tanh(self.up(self.norm(h))))
    return self.out(h)


class _NnxLM(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, rngs=rngs)
    self.out = nnx.Linear(DIM, VOCAB, rngs=rngs)

  def __call__(self, ids):
    return self.rest(self.embed(ids), ids)

  def rest(self, h, ids):
    h = h + self.attn(h, mask=nnx.make_causal_mask(ids), deterministic=True)
    return self.out(jnp.tanh(h))


def _log_prob(logits, position, token):
  z = np.asarray(logits, np.float64)[np.arange(len(token)), position]
  z = z - z.max(1, keepdims=True)
  return (z - np.log(np.exp(z).sum(1, keepdims=True)))[np.arange(len(token)), token]


IDS = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, (3, 9)), jnp.int32)


def _linen():
  variables = _LinenLM().init(jax.random.key(0), IDS)
  return lambda ids: _LinenLM().apply(variables, ids)


def _by_hand(kind):
  """``(fn, embed(ids), rest(h, ids))``: the model and its two halves called directly."""
  if kind == "nnx":
    model = _NnxLM(nnx.Rngs(0))
    return model, lambda ids: model.embed.embedding[...][ids], model.rest
  variables = _LinenLM().init(jax.random.key(0), IDS)
  table = variables["params"]["embed"]["embedding"]
  rest = lambda h, ids: _LinenLM().apply(variables, h, ids, method=_LinenLM.rest)
  return (lambda ids: _LinenLM().apply(variables, ids)), lambda ids: table[ids], rest


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_completeness_against_the_model_and_causality(kind):
  fn = _linen() if kind == "linen" else _NnxLM(nnx.Rngs(0))
  position, pad = 5, jnp.zeros_like(IDS)
  out = gradtx.token_attributions(fn, IDS, "embed", position=position, baseline=pad,
                                  steps=32)
  token = np.asarray(IDS[:, position + 1])
  lp = _log_prob(fn(IDS), position, token)
  lp0 = _log_prob(fn(pad), position, token)
  np.testing.assert_allclose(out.log_prob, lp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.baseline_log_prob, lp0, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out.scores).sum(1) - (lp - lp0), out.delta, atol=1e-4)
  assert np.max(np.abs(np.asarray(out.delta)) / np.abs(lp - lp0)) < 1e-3
  np.testing.assert_array_equal(out.scores[:, position + 1:], 0.0)   # causal
  assert np.all(np.abs(np.asarray(out.scores[:, :position + 1])) > 0)


def test_per_example_positions_targets_negative_position_and_jit():
  fn = _linen()
  positions, tokens = np.array([2, 8, 4]), np.array([1, 2, 3])
  out = jax.jit(lambda ids: gradtx.token_attributions(
      fn, ids, "embed", position=positions, target_token=tokens, steps=8, batch_size=3))(IDS)
  for n in (1,):  # the last position, with a target token
    one = gradtx.token_attributions(fn, IDS[n:n + 1], "embed", position=int(positions[n]),
                                    target_token=int(tokens[n]), steps=8)
    np.testing.assert_allclose(out.scores[n:n + 1], one.scores, rtol=1e-4, atol=1e-6)
  last = gradtx.token_attributions(fn, IDS, "embed", position=-1, target_token=tokens, steps=8)
  np.testing.assert_allclose(last.log_prob, _log_prob(fn(IDS), 8, tokens), rtol=1e-5)


def test_memory_at_2048_tokens_is_one_pass_not_steps_of_them():
  """Compile only: one forward-backward per step (batch_size=1) vs all 32 steps at once."""
  model = _LinenLM()
  ids = jnp.zeros((1, 2048), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), ids[:, :8]))
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)

  def temp_bytes(batch_size):
    run = lambda v, i: gradtx.token_attributions(
        lambda x: model.apply(v, x), i, "embed", position=100, steps=32,
        batch_size=batch_size).scores
    compiled = jax.jit(run).lower(variables, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  chunked, naive = temp_bytes(1), temp_bytes(None)
  # the attention matrices alone: heads × T² floats per pass
  one_pass = HEADS * 2048 ** 2 * 4
  assert chunked < 8 * one_pass and 16 * chunked < naive, (chunked, naive, one_pass)


def _noisy_embeddings(key, s, h, stdev):
  """Sample ``s`` as smooth_grad documents it: ``h + stdev·(max − min) ε``, with ε drawn
  from ``fold_in(fold_in(key, s), crc32(path))`` (the path of a bare array is ``""``)."""
  leaf_key = jax.random.fold_in(jax.random.fold_in(key, s), zlib.crc32(b"") & 0x7FFFFFFF)
  spread = np.ptp(np.asarray(h).reshape(len(h), -1), axis=1)[:, None, None]
  return h + stdev * spread * jax.random.normal(leaf_key, h.shape, h.dtype)


def _reference_token_ig(rest, ids, h, h0, position, steps):
  """Per-token IG of log p(ids[:, p+1] | rest(h)) from the embeddings ``h0``: a loop over
  Gauss–Legendre nodes with one ``jax.grad`` each; returns ``(scores, log_prob)``."""
  rows, token = np.arange(len(ids)), ids[:, position + 1]
  log_prob = lambda z: jax.nn.log_softmax(rest(z, ids)[:, position], axis=-1)[rows, token]
  grad = jax.jit(jax.grad(lambda z: jnp.sum(log_prob(z))))
  nodes, weights = np.polynomial.legendre.leggauss(steps)
  total = sum(w / 2 * np.asarray(grad(h0 + (h - h0) * (a + 1) / 2), np.float64)
              for a, w in zip(nodes, weights, strict=True))
  return (np.asarray(h - h0, np.float64) * total).sum(-1), _log_prob(rest(h, ids), position,
                                                                     token)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_smooth_grad_of_token_attributions_with_noise_on_the_embeddings(kind):
  """The mean over S explicit noise draws of the embeddings of plain-autodiff token IG;
  every draw complete against log p at the noisy embeddings computed from the model. The
  baseline is the padding token's embedding (a zero embedding is a near-discontinuity of
  LayerNorm at the path's start)."""
  fn, embed, rest = _by_hand(kind)
  key, samples, stdev, position, steps = jax.random.key(7), 3, 0.2, 5, 16
  attribute = functools.partial(gradtx.token_attributions, fn, layer="embed",
                                position=position, baseline=jnp.zeros_like(IDS),
                                layer_baseline=None, steps=steps, batch_size=8)
  out = jax.jit(lambda ids: gradtx.smooth_grad(
      attribute, ids, key=key, samples=samples, stdev=stdev, noise_at="layer",
      batch_size=2))(IDS)
  h, h0 = embed(IDS), embed(jnp.zeros_like(IDS))
  draws = [_reference_token_ig(rest, IDS, _noisy_embeddings(key, s, h, stdev), h0, position,
                               steps) for s in range(samples)]
  scores = np.mean([d[0] for d in draws], axis=0)
  log_prob = np.mean([d[1] for d in draws], axis=0)
  base = _log_prob(rest(h0, IDS), position, np.asarray(IDS[:, position + 1]))
  np.testing.assert_allclose(out.scores, scores, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out.log_prob, log_prob, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.baseline_log_prob, base, rtol=1e-4, atol=1e-4)
  for s, (draw_scores, draw_log_prob) in enumerate(draws):  # complete per draw
    assert np.max(np.abs(draw_scores.sum(1) - (draw_log_prob - base))) < 1e-3 * np.max(
        np.abs(draw_log_prob - base)), s
  assert np.max(np.abs(np.asarray(out.delta))) < 1e-3 * np.max(np.abs(log_prob - base))
  np.testing.assert_array_equal(out.scores[:, position + 1:], 0.0)   # still causal
  unsmoothed = attribute(IDS)
  assert not np.allclose(out.scores, unsmoothed.scores, atol=1e-3)   # the noise did something


class _Bag(nn.Module):
  """Linear in the embeddings: ``Σ_t embed(ids)_t · w``, so layer IG is exact."""

  @nn.compact
  def __call__(self, ids):
    return nn.Dense(1, use_bias=False)(nn.Embed(VOCAB, DIM, name="embed")(ids)).sum((1, 2))


@pytest.mark.parametrize("kind", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_smooth_grad_at_a_layer_has_the_closed_form_statistics(kind):
  """Linear model: token score ``(h_t + σ ε_t)·w`` with ``σ = stdev (max h − min h)`` per
  example, so mean ``h_t·w``, mean square ``(h_t·w)² + σ²|w|²``, variance ``σ²|w|²``."""
  variables = _Bag().init(jax.random.key(1), IDS)
  table = np.asarray(variables["params"]["embed"]["embedding"], np.float64)
  w = np.asarray(variables["params"]["Dense_0"]["kernel"], np.float64)[:, 0]
  h = table[np.asarray(IDS)]
  sigma = 0.3 * np.ptp(h.reshape(len(h), -1), axis=1)[:, None]
  mean, var = h @ w, sigma ** 2 * np.sum(w ** 2)
  expected = {"smoothgrad": mean, "smoothgrad_sq": mean ** 2 + var, "vargrad": var}[kind]
  std_of_estimate = {"smoothgrad": np.sqrt(var), "smoothgrad_sq": np.sqrt(
      4 * mean ** 2 * var + 2 * var ** 2), "vargrad": np.sqrt(2) * var}[kind]
  samples = 4000
  attribute = functools.partial(gradtx.layer_integrated_gradients,
                                lambda i: _Bag().apply(variables, i), layer="embed",
                                layer_baseline=0.0, steps=1, reduce="sum")
  got = gradtx.smooth_grad(attribute, IDS, key=jax.random.key(2), samples=samples,
                           stdev=0.3, kind=kind, noise_at="layer", batch_size=1000)
  assert np.all(np.abs(np.asarray(got) - expected) < 5 * std_of_estimate / np.sqrt(samples))


def test_smooth_grad_at_a_layer_is_memory_bounded():
  """Compile only: noise samples chunked (batch_size=1) hold one token attribution (itself
  one forward-backward per step), not ``samples`` of them."""
  model, ids = _LinenLM(), jnp.zeros((1, 256), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), ids[:, :8]))
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)

  def temp_bytes(samples, batch_size):
    def run(v, i):
      attribute = functools.partial(gradtx.token_attributions, lambda x: model.apply(v, x),
                                    layer="embed", position=100, steps=8)
      if samples is None:
        return attribute(i).scores
      return gradtx.smooth_grad(attribute, i, key=jax.random.key(0), samples=samples,
                                noise_at="layer", batch_size=batch_size).scores
    compiled = jax.jit(run).lower(variables, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  one, chunked, naive = temp_bytes(None, None), temp_bytes(16, 1), temp_bytes(16, None)
  assert chunked < 2 * one and 8 * chunked < naive, (one, chunked, naive)
