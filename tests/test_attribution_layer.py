"""Layer Integrated Gradients (linen and nnx) against references written by hand.

Every reference cuts the model by hand: the layer output ``h`` is computed from the
parameters directly (``embedding[ids]``, ``tanh(h @ kernel + bias)``), the rest of the
model ``g(h)`` is written again in plain ``jnp`` with the same parameters, and the path
integral is a loop over the quadrature nodes (``numpy.polynomial.legendre.leggauss``
mapped to [0, 1], or the Riemann rules written out) with one ``jax.grad`` per node.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _attribution_models import NnxStack
from flax import nnx

import gradtx

VOCAB, DIM, HIDDEN, CLASSES = 11, 4, 6, 3
RTOL, ATOL = 1e-5, 1e-6


_RIEMANN_OFFSETS = {"riemann_left": 0.0, "riemann_middle": 0.5, "riemann_right": 1.0}


def _rule(method, n):
  """Nodes in [0, 1] and weights (summing to 1), independently of gradtx: the trapezoid
  weights are numpy's ``trapezoid`` rule applied to each unit vector."""
  if method == "gausslegendre":
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1.0) / 2.0, w / 2.0
  if method == "riemann_trapezoid":
    nodes = np.linspace(0.0, 1.0, n)
    return nodes, np.trapezoid(np.eye(n), nodes, axis=1)
  return (np.arange(n) + _RIEMANN_OFFSETS[method]) / n, np.full(n, 1.0 / n)


def _pick(out, target):
  """``out[n, target[n]]`` for (N, C) outputs; ``target`` an int or (N,)."""
  rows = jnp.arange(out.shape[0])
  return out[rows, jnp.broadcast_to(jnp.asarray(target), rows.shape)]


def _reference_lig(g, h, h0, method, steps, target):
  """``(h - h0) * Σ_k w_k ∇g_t(h0 + α_k (h - h0))`` and its delta, one ``jax.grad`` per node.

  ``g`` maps the batch's layer outputs (N, ...) to (N, C) and ``g_t`` picks ``target``;
  examples are independent, so the gradient of the summed outputs is every example's own.
  """
  scalar = lambda z: _pick(g(z), target)
  grad = jax.jit(jax.grad(lambda z: jnp.sum(scalar(z))))
  h = np.asarray(h, np.float64)
  h0 = np.broadcast_to(np.asarray(h0, np.float64), h.shape)
  total = np.zeros_like(h)
  for alpha, weight in zip(*_rule(method, steps), strict=True):
    point = jnp.asarray(h0 + alpha * (h - h0), jnp.float32)
    total += weight * np.asarray(grad(point), np.float64)
  attr = (h - h0) * total
  change = np.asarray(scalar(jnp.asarray(h, jnp.float32)) - scalar(jnp.asarray(h0, jnp.float32)))
  delta = attr.reshape(attr.shape[0], -1).sum(1) - change
  return attr, delta


# --------------------------------------------------------------------------------------
# linen: Embed -> Dense -> tanh -> mean over tokens -> Dense


class _TextModel(nn.Module):

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(VOCAB, DIM)(ids)                        # (N, T, D)
    z = jnp.tanh(nn.Dense(HIDDEN)(h))                    # (N, T, H)
    return nn.Dense(CLASSES)(z.mean(axis=1))             # (N, C)


def _text_problem(seed=0, batch=3, tokens=5):
  ids = jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, (batch, tokens)), jnp.int32)
  variables = _TextModel().init(jax.random.key(seed), ids)
  fn = lambda i: _TextModel().apply(variables, i)
  return fn, variables["params"], ids


def _text_embed(p, ids):
  return p["Embed_0"]["embedding"][ids]


def _text_rest(p):
  """The model after the embedding, by hand: ``g(h)`` (N, T, D) -> (N, C)."""
  d0, d1 = p["Dense_0"], p["Dense_1"]
  return lambda h: jnp.tanh(h @ d0["kernel"] + d0["bias"]).mean(axis=1) @ d1["kernel"] + d1["bias"]


def _layer_baseline(kind, p, ids):
  """``(kwargs for gradtx, h0 for the reference)`` for each kind of baseline."""
  n, t = ids.shape
  if kind == "none":  # input baseline of zeros: token 0 everywhere
    return {}, _text_embed(p, jnp.zeros_like(ids))
  if kind == "pad_ids":  # one input baseline shared by every example: pad id 2
    pad = jnp.full((t,), 2, jnp.int32)
    return {"baseline": pad}, _text_embed(p, jnp.broadcast_to(pad, ids.shape))
  if kind == "per_example_ids":
    pad = jnp.asarray(np.random.default_rng(7).integers(0, VOCAB, (n, t)), jnp.int32)
    return {"baseline": pad}, _text_embed(p, pad)
  if kind == "zero":
    return {"layer_baseline": 0.0}, jnp.zeros((n, t, DIM))
  if kind == "per_example_layer":
    h0 = jnp.asarray(0.3 * np.random.default_rng(8).standard_normal((n, t, DIM)), jnp.float32)
    return {"layer_baseline": h0}, h0
  raise AssertionError(kind)


@pytest.mark.parametrize("method, kind", [
    ("gausslegendre", "none"),
    ("gausslegendre", "pad_ids"),
    ("gausslegendre", "per_example_ids"),
    ("gausslegendre", "zero"),
    ("gausslegendre", "per_example_layer"),
    ("riemann_trapezoid", "pad_ids"),
    ("riemann_trapezoid", "zero"),
    ("riemann_right", "per_example_layer"),
])
def test_linen_embedding_matches_hand_cut_reference(method, kind):
  fn, p, ids = _text_problem()
  kwargs, h0 = _layer_baseline(kind, p, ids)
  target = 1 if kind in ("none", "zero") else jnp.array([2, 0, 1])
  attr = gradtx.layer_integrated_gradients(fn, ids, "Embed_0", steps=6, method=method,
                                           target=target, **kwargs)
  ref, _ = _reference_lig(_text_rest(p), _text_embed(p, ids), h0, method, 6, target)
  assert attr.shape == ids.shape + (DIM,) and attr.dtype == jnp.float32
  np.testing.assert_allclose(attr, ref, rtol=RTOL, atol=ATOL)


def test_linen_reduce_sum_and_delta_match_reference():
  fn, p, ids = _text_problem(seed=1)
  kwargs, h0 = _layer_baseline("pad_ids", p, ids)
  target = jnp.array([0, 2, 1])
  g = _text_rest(p)
  scores, delta = gradtx.layer_integrated_gradients(
      fn, ids, "Embed_0", steps=6, method="riemann_middle", target=target, reduce="sum",
      return_delta=True, **kwargs)
  ref, _ = _reference_lig(g, _text_embed(p, ids), h0, "riemann_middle", 6, target)
  assert scores.shape == ids.shape
  np.testing.assert_allclose(scores, ref.sum(-1), rtol=RTOL, atol=ATOL)
  # delta = Σ attr - (g(h) - g(h')), with g(h) the model's real output
  change = np.asarray(_pick(fn(ids), target) - _pick(g(h0), target), np.float64)
  np.testing.assert_allclose(delta, ref.sum((1, 2)) - change, atol=1e-5)
  # the unreduced call returns the same delta
  _, delta_full = gradtx.layer_integrated_gradients(
      fn, ids, "Embed_0", steps=6, method="riemann_middle", target=target,
      return_delta=True, **kwargs)
  np.testing.assert_allclose(delta_full, delta, atol=1e-6)


def test_linen_completeness_at_50_gauss_legendre_steps():
  fn, p, ids = _text_problem(seed=2)
  target = jnp.array([0, 1, 2])
  scores, delta = jax.jit(lambda i, t: gradtx.layer_integrated_gradients(
      fn, i, "Embed_0", layer_baseline=0.0, steps=50, target=t, reduce="sum",
      return_delta=True))(ids, target)
  change = np.asarray(_pick(fn(ids), target) - _pick(_text_rest(p)(jnp.zeros((3, 5, DIM))),
                                                     target))
  assert np.all(np.abs(change) > 1e-2), change
  np.testing.assert_allclose(np.asarray(scores).sum(1), change, rtol=1e-4, atol=1e-5)
  assert np.max(np.abs(np.asarray(delta))) < 1e-5, delta
  # with a crude rule the quadrature error is visible, and delta reports exactly it
  _, delta_left = gradtx.layer_integrated_gradients(
      fn, ids, "Embed_0", layer_baseline=0.0, steps=6, method="riemann_left", target=target,
      return_delta=True)
  _, ref_delta = _reference_lig(_text_rest(p), _text_embed(p, ids), 0.0, "riemann_left", 6,
                                target)
  assert np.max(np.abs(ref_delta)) > 1e-3, ref_delta
  np.testing.assert_allclose(delta_left, ref_delta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 4, 6])  # 6 chunks; 1 chunk + 2 more; all at once
def test_batch_size_chunking_matches_unchunked(batch_size):
  fn, _, ids = _text_problem(seed=3)
  kwargs = dict(steps=6, target=jnp.array([1, 2, 0]), return_delta=True)
  full, delta = gradtx.layer_integrated_gradients(fn, ids, "Embed_0", **kwargs)
  chunked, chunked_delta = gradtx.layer_integrated_gradients(fn, ids, "Embed_0",
                                                             batch_size=batch_size, **kwargs)
  np.testing.assert_allclose(chunked, full, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(chunked_delta, delta, atol=1e-6)


# --------------------------------------------------------------------------------------
# a layer deep inside a linen model, named by setup attributes


class _Encoder(nn.Module):

  @nn.compact
  def __call__(self, h):
    return jnp.tanh(nn.Dense(HIDDEN)(h))


class _NestedModel(nn.Module):

  def setup(self):
    self.embed = nn.Embed(VOCAB, DIM)
    self.encoder = _Encoder()
    self.head = nn.Dense(CLASSES)

  def __call__(self, ids):
    return self.head(self.encoder(self.embed(ids)).mean(axis=1))


def test_linen_nested_layer_path():
  ids = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (3, 5)), jnp.int32)
  variables = _NestedModel().init(jax.random.key(4), ids)
  p = variables["params"]
  fn = lambda i: _NestedModel().apply(variables, i)
  enc, head = p["encoder"]["Dense_0"], p["head"]
  pre = lambda h: h @ enc["kernel"] + enc["bias"]   # the output of encoder/Dense_0
  rest = lambda u: jnp.tanh(u).mean(axis=1) @ head["kernel"] + head["bias"]
  h = p["embed"]["embedding"][ids]
  h0 = p["embed"]["embedding"][jnp.zeros_like(ids)]

  attr = gradtx.layer_integrated_gradients(fn, ids, "encoder/Dense_0", steps=6, target=2)
  ref, _ = _reference_lig(rest, pre(h), pre(h0), "gausslegendre", 6, 2)
  assert attr.shape == (3, 5, HIDDEN)
  np.testing.assert_allclose(attr, ref, rtol=RTOL, atol=ATOL)

  # the setup-named embedding and the whole encoder are layers too
  attr = gradtx.layer_integrated_gradients(fn, ids, "embed", steps=6, target=2)
  ref, _ = _reference_lig(lambda e: rest(pre(e)), h, h0, "gausslegendre", 6, 2)
  np.testing.assert_allclose(attr, ref, rtol=RTOL, atol=ATOL)
  attr = gradtx.layer_integrated_gradients(fn, ids, "encoder", steps=6, target=2,
                                           layer_baseline=0.0)
  ref, _ = _reference_lig(lambda z: z.mean(axis=1) @ head["kernel"] + head["bias"],
                          jnp.tanh(pre(h)), 0.0, "gausslegendre", 6, 2)
  np.testing.assert_allclose(attr, ref, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------
# pytree inputs: the layer sees only the ids, the rest of the model the real mask


class _MaskedModel(nn.Module):

  @nn.compact
  def __call__(self, batch):
    h = nn.Embed(VOCAB, DIM)(batch["ids"])
    z = jnp.tanh(nn.Dense(HIDDEN)(h))
    mask = batch["mask"][..., None]
    pooled = (z * mask).sum(axis=1) / (mask.sum(axis=1) + 1.0)
    return nn.Dense(CLASSES)(pooled)


def test_pytree_inputs_layer_sees_one_leaf_rest_sees_real_mask():
  r = np.random.default_rng(5)
  batch = {"ids": jnp.asarray(r.integers(1, VOCAB, (3, 5)), jnp.int32),
           "mask": jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
                               jnp.float32)}
  variables = _MaskedModel().init(jax.random.key(5), batch)
  p = variables["params"]
  fn = lambda b: _MaskedModel().apply(variables, b)
  d0, d1 = p["Dense_0"], p["Dense_1"]
  mask = np.asarray(batch["mask"])[..., None]

  def rest(h):  # the real mask, whatever the layer output is
    z = jnp.tanh(h @ d0["kernel"] + d0["bias"])
    return ((z * mask).sum(axis=1) / (mask.sum(axis=1) + 1.0)) @ d1["kernel"] + d1["bias"]

  emb = p["Embed_0"]["embedding"]
  target = jnp.array([2, 1, 0])
  # an input-space baseline for the whole pytree: pad ids; the mask baseline is unused
  baseline = {"ids": jnp.full((5,), 3, jnp.int32), "mask": jnp.zeros((5,))}
  scores, delta = gradtx.layer_integrated_gradients(
      fn, batch, "Embed_0", baseline=baseline, steps=6, target=target, reduce="sum",
      return_delta=True)
  h0 = emb[jnp.full((3, 5), 3)]
  ref, ref_delta = _reference_lig(rest, emb[batch["ids"]], h0, "gausslegendre", 6, target)
  np.testing.assert_allclose(scores, ref.sum(-1), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(delta, ref_delta, atol=1e-5)
  # masked-out tokens only act through the layer, so the path to them is flat
  np.testing.assert_allclose(np.asarray(scores)[mask[..., 0] == 0], 0.0, atol=1e-7)
  # baseline=None: zeros for both leaves; h0 is token 0's embedding, the mask stays real
  attr = gradtx.layer_integrated_gradients(fn, batch, "Embed_0", steps=6, target=target)
  ref, _ = _reference_lig(rest, emb[batch["ids"]], emb[jnp.zeros((3, 5), jnp.int32)],
                          "gausslegendre", 6, target)
  np.testing.assert_allclose(attr, ref, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------
# nnx: Embed -> List of (Linear, tanh) blocks -> mean -> Linear


class _Block(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(DIM, DIM, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


def _nnx_text(rngs):
  return NnxStack(VOCAB, DIM, CLASSES, _Block, 2, rngs)


def _nnx_by_hand(model):
  """``(embed(ids), block(i, h), head_of_mean(h))`` in plain jnp from the model's params."""
  emb = model.embed.embedding[...]
  lin = [(b.linear.kernel[...], b.linear.bias[...]) for b in model.blocks]
  hk, hb = model.head.kernel[...], model.head.bias[...]
  embed = lambda ids: emb[ids]
  block = lambda i, h: jnp.tanh(h @ lin[i][0] + lin[i][1])
  head = lambda h: h.mean(axis=1) @ hk + hb
  return embed, block, head


def _nnx_problem(seed=6):
  model = _nnx_text(nnx.Rngs(seed))
  ids = jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, (3, 5)), jnp.int32)
  return model, ids


def _assert_model_intact(model, ids, before):
  assert type(model.embed) is nnx.Embed
  assert type(model.blocks[0]) is _Block and type(model.blocks[1]) is _Block
  np.testing.assert_array_equal(model(ids), before)


@pytest.mark.parametrize("as_lambda", [False, True])
def test_nnx_embed_layer_matches_reference(as_lambda):
  model, ids = _nnx_problem()
  before = model(ids)
  embed, block, head = _nnx_by_hand(model)
  rest = lambda h: head(block(1, block(0, h)))
  target = jnp.array([1, 0, 2])
  fn, kwargs = ((lambda i: model(i)), {"model": model}) if as_lambda else (model, {})
  attr, delta = gradtx.layer_integrated_gradients(
      fn, ids, "embed", steps=6, method="riemann_trapezoid", target=target, return_delta=True,
      **kwargs)
  ref, ref_delta = _reference_lig(rest, embed(ids), embed(jnp.zeros_like(ids)),
                                  "riemann_trapezoid", 6, target)
  np.testing.assert_allclose(attr, ref, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(delta, ref_delta, atol=1e-5)
  _assert_model_intact(model, ids, before)


def test_nnx_block_in_list_matches_reference():
  model, ids = _nnx_problem(seed=7)
  before = model(ids)
  embed, block, head = _nnx_by_hand(model)
  h0 = jnp.asarray(0.2 * np.random.default_rng(9).standard_normal((5, DIM)), jnp.float32)  # shared
  attr = gradtx.layer_integrated_gradients(model, ids, "blocks/0", layer_baseline=h0,
                                           steps=6, target=0)
  ref, _ = _reference_lig(lambda u: head(block(1, u)), block(0, embed(ids)), h0,
                          "gausslegendre", 6, 0)
  np.testing.assert_allclose(attr, ref, rtol=RTOL, atol=ATOL)
  # a layer nested in a list entry
  attr = gradtx.layer_integrated_gradients(model, ids, "blocks/1/linear", layer_baseline=0.0,
                                           steps=6, target=0)
  k, b = model.blocks[1].linear.kernel[...], model.blocks[1].linear.bias[...]
  ref, _ = _reference_lig(lambda u: head(jnp.tanh(u)), block(0, embed(ids)) @ k + b, 0.0,
                          "gausslegendre", 6, 0)
  np.testing.assert_allclose(attr, ref, rtol=RTOL, atol=ATOL)
  _assert_model_intact(model, ids, before)


def test_nnx_under_jit():
  model, ids = _nnx_problem(seed=8)
  before = model(ids)
  embed, block, head = _nnx_by_hand(model)
  target = jnp.array([2, 2, 1])

  @jax.jit
  def closed_over(ids, target):
    return gradtx.layer_integrated_gradients(model, ids, "embed", steps=6, target=target,
                                             batch_size=4, reduce="sum")

  graphdef, state = nnx.split(model)

  @jax.jit
  def merged(state, ids, target):
    return gradtx.layer_integrated_gradients(nnx.merge(graphdef, state), ids, "embed",
                                             steps=6, target=target, reduce="sum")

  ref, _ = _reference_lig(lambda h: head(block(1, block(0, h))), embed(ids),
                          embed(jnp.zeros_like(ids)), "gausslegendre", 6, target)
  np.testing.assert_allclose(closed_over(ids, target), ref.sum(-1), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(merged(state, ids, target), ref.sum(-1), rtol=RTOL, atol=ATOL)
  _assert_model_intact(model, ids, before)


def test_nnx_class_restored_when_fn_raises():
  model, ids = _nnx_problem()
  before = model(ids)

  def fn(i):
    model(i)
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    gradtx.layer_integrated_gradients(fn, ids, "embed", model=model, target=0)
  _assert_model_intact(model, ids, before)


# --------------------------------------------------------------------------------------
# errors


class _Twice(nn.Module):

  @nn.compact
  def __call__(self, ids):
    dense = nn.Dense(DIM)
    return dense(dense(nn.Embed(VOCAB, DIM)(ids))).mean(axis=(1, 2))


class _IntLayer(nn.Module):

  @nn.compact
  def __call__(self, ids):
    return ids + 1


class _IntThenEmbed(nn.Module):

  @nn.compact
  def __call__(self, ids):
    return nn.Embed(VOCAB + 1, DIM)(_IntLayer()(ids)).sum(axis=(1, 2))


def _linen_fn(module, ids):
  variables = module.init(jax.random.key(0), ids)
  return lambda i: module.apply(variables, i)


def test_errors():
  fn, _, ids = _text_problem()
  lig = gradtx.layer_integrated_gradients
  with pytest.raises(ValueError, match=r"layer 'Dense_9' exactly once.*called 0 times.*"
                                       r"paths fn called are \[.*'Dense_0', 'Dense_1', "
                                       r"'Embed_0'\]"):
    lig(fn, ids, "Dense_9", target=0)
  with pytest.raises(ValueError, match=r"layer 'Dense_0' exactly once.*called 2 times"):
    lig(_linen_fn(_Twice(), ids), ids, "Dense_0")
  with pytest.raises(TypeError, match=r"layer must be a module path string.*got 0"):
    lig(fn, ids, 0, target=0)
  with pytest.raises(TypeError, match=r"layer must be a module path string.*got \('Embed_0',\)"):
    lig(fn, ids, ("Embed_0",), target=0)
  with pytest.raises(ValueError, match=r"reduce must be one of None, 'sum', got 'mean'"):
    lig(fn, ids, "Embed_0", target=0, reduce="mean")
  with pytest.raises(ValueError, match=r"at most one of baseline .* and layer_baseline"):
    lig(fn, ids, "Embed_0", target=0, baseline=jnp.zeros_like(ids), layer_baseline=0.0)
  with pytest.raises(ValueError, match=r"layer_baseline must have the per-example shape "
                                       r"\(5, 4\) of the output of layer 'Embed_0'.*"
                                       r"got shape \(3,\)"):
    lig(fn, ids, "Embed_0", target=0, layer_baseline=jnp.zeros(DIM - 1))
  with pytest.raises(ValueError, match=r"layer_baseline must have the per-example shape.*"
                                       r"got shape \(2, 5, 4\)"):
    lig(fn, ids, "Embed_0", target=0, layer_baseline=jnp.zeros((2, 5, DIM)))
  with pytest.raises(ValueError, match=r"baseline\b.*per-example shape \(5,\).*got shape \(4,\)"):
    lig(fn, ids, "Embed_0", target=0, baseline=jnp.zeros(4, jnp.int32))
  with pytest.raises(TypeError, match=r"model must be a flax.nnx.Module.*got _TextModel"):
    lig(fn, ids, "Embed_0", target=0, model=_TextModel())
  with pytest.raises(TypeError, match=r"output of layer '_IntLayer_0' must be floating-point"
                                      r".*got int32"):
    lig(_linen_fn(_IntThenEmbed(), ids), ids, "_IntLayer_0")
  with pytest.raises(ValueError, match=r"fn returns 3 outputs per example.*pass target"):
    lig(fn, ids, "Embed_0")
  with pytest.raises(ValueError, match=r"target must be in \[0, 3\).*got 3"):
    lig(fn, ids, "Embed_0", target=3)


def test_nnx_layer_class_is_restored_when_fn_raises():
  """The layer's class is swapped for the call only, also when fn raises inside it (the
  error rows of nnx layer IG are in tests/bad_inputs_attribution.py)."""
  model, ids = _nnx_problem()

  def fn(i):
    assert type(model.embed) is not nnx.Embed   # intercepted during the call
    model(i)
    raise RuntimeError("inside fn")

  with pytest.raises(RuntimeError, match="inside fn"):
    gradtx.layer_integrated_gradients(fn, ids, "embed", model=model, target=0)
  assert type(model.embed) is nnx.Embed


def test_one_embedding_vector_as_layer_baseline_broadcasts_over_tokens():
  """A (D,) layer baseline (say, the padding embedding) is that vector at every token."""
  fn, p, ids = _text_problem(seed=3)
  pad = _text_embed(p, 0)
  h, g = _text_embed(p, ids), _text_rest(p)
  got = gradtx.layer_integrated_gradients(fn, ids, "Embed_0", target=1, layer_baseline=pad,
                                          steps=8)
  want, _ = _reference_lig(g, h, jnp.broadcast_to(pad, h.shape), "gausslegendre", 8, 1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
