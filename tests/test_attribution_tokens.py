"""Token attribution for causal language models (linen and nnx) against direct evaluation.

The references are the model itself: the target's log-probability computed from the
logits with ``numpy`` (float64 log-softmax), at the input and at the baseline token ids,
so completeness ``Σ scores = log p(x) − log p(x')`` is checked against numbers gradtx
does not produce; causality (tokens after the position score exactly 0); and the
compiled memory at T = 2048 against the naive all-steps-at-once program
(``memory_analysis``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gradtx

VOCAB, DIM, HEADS = 13, 8, 2


class _LinenLM(nn.Module):
  """Embed -> causal self-attention block -> vocabulary logits."""

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(VOCAB, DIM, name="embed")(ids)
    mask = nn.make_causal_mask(ids)
    h = h + nn.MultiHeadDotProductAttention(HEADS, deterministic=True)(h, h, mask=mask)
    h = h + nn.Dense(DIM)(jnp.tanh(nn.Dense(2 * DIM)(nn.LayerNorm()(h))))
    return nn.Dense(VOCAB)(h)


class _NnxLM(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, rngs=rngs)
    self.out = nnx.Linear(DIM, VOCAB, rngs=rngs)

  def __call__(self, ids):
    h = self.embed(ids)
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
