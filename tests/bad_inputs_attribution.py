"""Bad inputs of the attribution area: integrated_gradients, expected_gradients and
layer_integrated_gradients (rows of the table in ``tests/test_bad_inputs.py``).

The models are tiny (a linear map, a 2-token linen text model, a one-layer nnx model),
built on first use; most rows fail before any gradient is taken.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _bad_inputs import Case
from flax import nnx

import gradtx

ig = gradtx.integrated_gradients
eg = gradtx.expected_gradients
lig = gradtx.layer_integrated_gradients

W = np.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25]], np.float32)  # 3 features, 2 classes
X = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]], np.float32)     # 2 examples
linear = lambda x: x @ W                                            # (N, 2)
summed = lambda x: x.sum(axis=1)                                    # (N,)
tree_fn = lambda t: t["a"].sum(axis=1) + t["b"].sum(axis=1)
KEY = jax.random.key(0)


class _Text(nn.Module):

  @nn.compact
  def __call__(self, ids):
    return nn.Dense(2)(jnp.tanh(nn.Embed(5, 3)(ids)).mean(axis=1))


@functools.cache
def _text():
  ids = jnp.array([[1, 2], [3, 4]], jnp.int32)
  variables = _Text().init(jax.random.key(0), ids)
  return (lambda i: _Text().apply(variables, i)), ids


class _Nnx(nnx.Module):

  def __init__(self):
    self.embed = nnx.Embed(5, 3, rngs=nnx.Rngs(0))

  def __call__(self, ids):
    return self.embed(ids).sum(axis=(1, 2))


def _lig_text(**kwargs):
  fn, ids = _text()
  return lig(fn, ids, kwargs.pop("layer", "Embed_0"), **{"target": 0, **kwargs})


def _traced(fn):
  """Calls ``fn(value)`` with ``value`` traced under jit (a static argument made dynamic)."""
  return lambda value: jax.jit(fn)(value)


def _check_nan_rows(bad_rows, reference):
  """The rows in ``bad_rows`` are NaN, the others equal ``reference`` (numpy)."""

  def check(result):
    result = np.asarray(result)
    assert np.all(np.isnan(result[bad_rows])), result
    good = [i for i in range(result.shape[0]) if i not in bad_rows]
    np.testing.assert_allclose(result[good], reference[good], rtol=1e-5, atol=1e-6)

  return check


def _check_equal(expected_fn):
  return lambda result: np.testing.assert_array_equal(np.asarray(result), expected_fn())


# IG of a linear model is exact: (x - x') * W[:, t] for every method and step count.
_LINEAR_IG = X * W[:, [0, 1]].T  # rows: target 0 for example 0, target 1 for example 1

CASES = [
    # integrated_gradients: the counts are static ints
    Case("attribution-ig-steps-zero", lambda: ig(linear, X, steps=0, target=0),
         ValueError, r"steps must be an int >= 1, got 0"),
    Case("attribution-ig-steps-float", lambda: ig(linear, X, steps=8.0, target=0),
         TypeError, r"steps must be an int >= 1, got 8\.0"),
    Case("attribution-ig-steps-traced",
         lambda: _traced(lambda s: ig(linear, X, steps=s, target=0))(8),
         TypeError, r"steps must be a static Python value.*traced under jit"),
    Case("attribution-ig-batch_size-traced",
         lambda: _traced(lambda b: ig(linear, X, steps=4, batch_size=b, target=0))(2),
         TypeError, r"batch_size must be a static Python value"),
    Case("attribution-ig-batch_size-zero", lambda: ig(linear, X, batch_size=0, target=0),
         ValueError, r"batch_size must be an int >= 1, got 0"),
    Case("attribution-ig-method-unknown", lambda: ig(linear, X, method="simpson", target=0),
         ValueError, r"method must be one of 'riemann_left'.*got 'simpson'"),
    Case("attribution-ig-trapezoid-one-step",
         lambda: ig(linear, X, steps=1, method="riemann_trapezoid", target=0),
         ValueError, r"steps must be an int >= 2 for method='riemann_trapezoid'.*got 1"),
    Case("attribution-ig-return_delta-string",
         lambda: ig(linear, X, target=0, return_delta="yes"),
         TypeError, r"return_delta must be a bool, got 'yes'"),
    Case("attribution-ig-hoist_affine-int",
         lambda: ig(linear, X, target=0, hoist_affine=1),
         TypeError, r"hoist_affine must be a bool, got 1"),
    # inputs: floating batches sharing N
    Case("attribution-ig-inputs-int", lambda: ig(summed, X.astype(np.int32)),
         TypeError, r"inputs must hold floating arrays.*<root> \(int32\).*floating-point.*"
                    r"layer_integrated_gradients"),
    Case("attribution-ig-inputs-int-leaf-path",
         lambda: ig(tree_fn, {"a": X, "b": X.astype(np.int32)}),
         TypeError, r"inputs must hold floating arrays; these leaves are not: b \(int32\)"),
    Case("attribution-ig-inputs-bool", lambda: ig(summed, X > 0),
         TypeError, r"inputs must hold floating arrays.*<root> \(bool\)"),
    Case("attribution-ig-inputs-complex", lambda: ig(summed, X.astype(np.complex64)),
         TypeError, r"inputs must hold floating arrays.*<root> \(complex64\)"),
    Case("attribution-ig-inputs-empty", lambda: ig(summed, {}),
         ValueError, r"inputs must hold at least one array, got an empty pytree"),
    Case("attribution-ig-inputs-python-list", lambda: ig(summed, [1.0, 2.0]),
         ValueError, r"every leaf of inputs must have a batch axis.*inputs\['0'\] is a scalar"),
    Case("attribution-ig-inputs-batch-mismatch", lambda: ig(tree_fn, {"a": X, "b": X[:1]}),
         ValueError, r"same batch size.*inputs\['a'\]: 2, inputs\['b'\]: 1"),
    # baseline: the structure of inputs, a broadcastable shape
    Case("attribution-ig-baseline-missing-leaf",
         lambda: ig(tree_fn, {"a": X, "b": X}, baseline={"a": 0.0}),
         ValueError, r"baseline must have the structure of inputs: missing \['b'\]"),
    Case("attribution-ig-baseline-extra-leaf",
         lambda: ig(tree_fn, {"a": X, "b": X}, baseline={"a": 0.0, "b": 0.0, "c": 0.0}),
         ValueError, r"baseline must have the structure of inputs: not in inputs: \['c'\]"),
    Case("attribution-ig-baseline-shape", lambda: ig(linear, X, baseline=np.zeros(2), target=0),
         ValueError, r"baseline must have the per-example shape \(3,\).*got shape \(2,\)"),
    Case("attribution-ig-baseline-leaf-shape",
         lambda: ig(tree_fn, {"a": X, "b": X}, baseline={"a": 0.0, "b": np.zeros(4)}),
         ValueError, r"baseline\['b'\] must have the per-example shape \(3,\).*\(4,\)"),
    # fn: a function to one float array (N,) or (N, C)
    Case("attribution-ig-fn-not-callable", lambda: ig(W, X, target=0),
         TypeError, r"fn must be a function called as fn\(inputs\).*array of shape \(3, 2\)"),
    Case("attribution-ig-fn-returns-tuple", lambda: ig(lambda x: (summed(x), x), X),
         TypeError, r"fn must return one array of shape \(N,\) or \(N, C\), got the pytree"),
    Case("attribution-ig-fn-returns-int", lambda: ig(lambda x: jnp.argmax(x, axis=1), X),
         TypeError, r"fn must return real floating-point outputs.*got dtype int32"),
    Case("attribution-ig-fn-output-rank-3", lambda: ig(lambda x: x[:, :, None], X, target=0),
         ValueError, r"fn must map a batch of 2 examples to shape \(2,\) or \(2, C\), got "
                     r"output shape \(2, 3, 1\)"),
    # target: required for (N, C), in [0, C), integer
    Case("attribution-ig-target-missing", lambda: ig(linear, X),
         ValueError, r"fn returns 2 outputs per example.*pass target"),
    Case("attribution-ig-target-for-scalar-output", lambda: ig(summed, X, target=0),
         ValueError, r"target must be None when fn returns one scalar per example"),
    Case("attribution-ig-target-out-of-range", lambda: ig(linear, X, target=2),
         ValueError, r"target must be in \[0, 2\).*got 2"),
    Case("attribution-ig-target-negative", lambda: ig(linear, X, target=np.array([0, -1])),
         ValueError, r"target must be in \[0, 2\).*got \[-1\]"),
    Case("attribution-ig-target-float", lambda: ig(linear, X, target=1.0),
         ValueError, r"target must be an int or an integer array of shape \(2,\), got 1\.0"),
    Case("attribution-ig-target-traced-float",
         lambda: _traced(lambda t: ig(linear, X, target=t, steps=2))(np.array([0.0, 1.0])),
         TypeError, r"target must be an integer array, got dtype float32"),
    Case("attribution-ig-target-traced-out-of-range",
         lambda: _traced(lambda t: ig(linear, X, target=t, steps=3))(np.array([0, 5])),
         check=_check_nan_rows([1], _LINEAR_IG)),
    Case("attribution-ig-target-traced-negative",
         lambda: _traced(lambda t: ig(linear, X, target=t, steps=3))(np.array([-1, 1])),
         check=_check_nan_rows([0], _LINEAR_IG)),
    Case("attribution-ig-target-traced-out-of-range-delta",
         lambda: _traced(lambda t: ig(linear, X, target=t, steps=3, return_delta=True)[1])(
             np.array([0, 2])),
         check=_check_nan_rows([1], np.zeros(2))),
    # expected_gradients: key, samples, baselines
    Case("attribution-eg-key-int", lambda: eg(linear, X, X, key=0, samples=2, target=0),
         TypeError, r"key must be a jax\.random key .*got 0"),
    Case("attribution-eg-key-float-array",
         lambda: eg(linear, X, X, key=np.zeros(2, np.float32), samples=2, target=0),
         TypeError, r"key must be a jax\.random key .*dtype float32"),
    Case("attribution-eg-key-batch",
         lambda: eg(linear, X, X, key=jax.random.split(KEY, 2), samples=2, target=0),
         ValueError, r"key must be a single key \(shape \(\)\), got shape \(2,\)"),
    Case("attribution-eg-key-raw-prngkey",
         lambda: eg(linear, X, X, key=jax.random.PRNGKey(3), samples=2, target=1),
         check=_check_equal(lambda: np.asarray(
             eg(linear, X, X, key=jax.random.key(3), samples=2, target=1)))),
    Case("attribution-eg-samples-traced",
         lambda: _traced(lambda s: eg(linear, X, X, key=KEY, samples=s, target=0))(4),
         TypeError, r"samples must be a static Python value"),
    Case("attribution-eg-samples-zero", lambda: eg(linear, X, X, key=KEY, samples=0, target=0),
         ValueError, r"samples must be an int >= 1, got 0"),
    Case("attribution-eg-samples-missing", lambda: eg(linear, X, X, key=KEY, samples=None,
                                                      target=0),
         TypeError, r"samples must be an int >= 1, got None"),
    Case("attribution-eg-baselines-none", lambda: eg(linear, X, None, key=KEY, samples=2,
                                                     target=0),
         TypeError, r"baselines must be the reference data.*got None"),
    Case("attribution-eg-baselines-one-row",
         lambda: eg(linear, X, X[0], key=KEY, samples=2, target=0),
         ValueError, r"baselines must be a batch \(M, \.\.\.\) of the input's per-example "
                     r"shape \(3,\), got shape \(3,\)"),
    Case("attribution-eg-baselines-structure",
         lambda: eg(tree_fn, {"a": X, "b": X}, {"a": X}, key=KEY, samples=2),
         ValueError, r"baselines must have the structure of inputs: missing \['b'\]"),
    Case("attribution-eg-baselines-rows-mismatch",
         lambda: eg(tree_fn, {"a": X, "b": X}, {"a": X, "b": X[:1]}, key=KEY, samples=2),
         ValueError, r"same number of rows M.*baselines\['b'\]: 1"),
    Case("attribution-eg-inputs-int",
         lambda: eg(summed, X.astype(np.int32), X, key=KEY, samples=2),
         TypeError, r"inputs must hold floating arrays.*<root> \(int32\)"),
    Case("attribution-eg-batch_size-traced",
         lambda: _traced(lambda b: eg(linear, X, X, key=KEY, samples=4, batch_size=b,
                                      target=0))(2),
         TypeError, r"batch_size must be a static Python value"),
    # one baseline row: EG of a linear model is exactly (x - x') * W[:, t] whatever alpha
    Case("attribution-eg-target-traced-out-of-range",
         lambda: _traced(lambda t: eg(linear, X, np.zeros((1, 3), np.float32), key=KEY,
                                      samples=3, target=t))(np.array([3, 1])),
         check=_check_nan_rows([0], _LINEAR_IG)),
    # layer_integrated_gradients
    Case("attribution-lig-layer-not-str", lambda: _lig_text(layer=0),
         TypeError, r"layer must be a module path string such as 'Embed_0', got 0"),
    Case("attribution-lig-layer-missing", lambda: _lig_text(layer="Dense_9"),
         ValueError, r"layer 'Dense_9' exactly once.*called 0 times.*paths fn called are "
                     r"\['Dense_0', 'Embed_0'\]"),
    Case("attribution-lig-reduce-mean", lambda: _lig_text(reduce="mean"),
         ValueError, r"reduce must be one of None, 'sum', got 'mean'"),
    Case("attribution-lig-both-baselines",
         lambda: _lig_text(baseline=np.zeros(2, np.int32), layer_baseline=0.0),
         ValueError, r"at most one of baseline \(input space\) and layer_baseline"),
    Case("attribution-lig-float-baseline-for-ids", lambda: _lig_text(baseline=0.0),
         TypeError, r"baseline must hold int32 values like inputs.*got dtype float32; for a "
                    r"zero embedding pass layer_baseline=0\.0"),
    Case("attribution-lig-layer_baseline-shape", lambda: _lig_text(layer_baseline=np.zeros(2)),
         ValueError, r"layer_baseline must have the per-example shape \(2, 3\) of the output "
                     r"of layer 'Embed_0'.*got shape \(2,\)"),
    Case("attribution-lig-layer_baseline-structure",
         lambda: _lig_text(layer_baseline={"h": 0.0}),
         ValueError, r"layer_baseline must have the structure of the output of layer "
                     r"'Embed_0': missing \[''\]; not in .*\['h'\]"),
    Case("attribution-lig-steps-traced",
         lambda: _traced(lambda s: _lig_text(steps=s))(4),
         TypeError, r"steps must be a static Python value"),
    Case("attribution-lig-return_delta-not-bool", lambda: _lig_text(return_delta=1),
         TypeError, r"return_delta must be a bool, got 1"),
    Case("attribution-lig-fn-not-callable", lambda: lig({"params": {}}, _text()[1], "Embed_0"),
         TypeError, r"fn must be a function called as fn\(inputs\).*got \{'params': \{\}\}"),
    Case("attribution-lig-model-not-nnx", lambda: _lig_text(model=_Text()),
         TypeError, r"model must be a flax\.nnx\.Module \(or None for linen\), got _Text"),
    Case("attribution-lig-nnx-layer-missing",
         lambda: lig(_Nnx(), _text()[1], "embedding"),
         ValueError, r"layer must be the path of a submodule of model, got 'embedding'; the "
                     r"submodule paths of _Nnx are \['embed'\]"),
    Case("attribution-lig-target-traced-out-of-range",
         lambda: _traced(lambda t: _lig_text(target=t, steps=2, reduce="sum"))(
             np.array([0, 7])),
         check=lambda scores: (np.testing.assert_array_equal(np.isnan(scores[1]), True),
                               np.testing.assert_array_equal(np.isfinite(scores[0]), True))),
]

# ------------------------------------------------------------------ the family (issue #17)
sg = gradtx.smooth_grad
gig = gradtx.guided_integrated_gradients
blur = gradtx.blur_integrated_gradients
ih = gradtx.integrated_hessians
_sal = lambda x: gradtx.saliency(summed, x)
IMAGES = np.zeros((2, 4, 4, 1), np.float32)
_image_fn = lambda x: x.sum(axis=(1, 2, 3))


LM_IDS = np.array([[1, 2, 3], [4, 0, 1]], np.int32)


class _Lm(nn.Module):

  @nn.compact
  def __call__(self, ids):
    h = jnp.cumsum(nn.Embed(5, 3, name="embed")(ids), axis=1)
    return jnp.tanh(h) @ (jnp.arange(15.0).reshape(3, 5) / 5)


def _tokens(**kwargs):
  ids = jnp.asarray(LM_IDS)
  variables = _Lm().init(jax.random.key(0), ids)
  fn = kwargs.pop("fn", lambda i: _Lm().apply(variables, i))
  return gradtx.token_attributions(fn, kwargs.pop("ids", ids), "embed",
                                   **{"steps": 2, **kwargs})


CASES += [
    Case("attribution-saliency-absolute-not-bool",
         lambda: gradtx.saliency(summed, X, absolute="yes"),
         TypeError, r"absolute must be a bool, got 'yes'"),
    Case("attribution-saliency-target-out-of-range", lambda: gradtx.saliency(linear, X, target=2),
         ValueError, r"target must be in \[0, 2\).*got 2"),
    Case("attribution-gxi-inputs-int", lambda: gradtx.gradient_x_input(summed, X.astype(np.int32)),
         TypeError, r"inputs must hold floating arrays.*<root> \(int32\)"),
    Case("attribution-smooth-samples-zero", lambda: sg(_sal, X, key=KEY, samples=0),
         ValueError, r"samples must be an int >= 1, got 0"),
    Case("attribution-smooth-samples-traced",
         lambda: _traced(lambda s: sg(_sal, X, key=KEY, samples=s))(4),
         TypeError, r"samples must be a static Python value"),
    Case("attribution-smooth-stdev-negative", lambda: sg(_sal, X, key=KEY, stdev=-0.1),
         ValueError, r"stdev must be a finite number >= 0, got -0\.1"),
    Case("attribution-smooth-kind-unknown", lambda: sg(_sal, X, key=KEY, kind="var"),
         ValueError, r"kind must be one of 'smoothgrad', 'smoothgrad_sq', 'vargrad', got 'var'"),
    Case("attribution-smooth-key-int", lambda: sg(_sal, X, key=0),
         TypeError, r"key must be a jax\.random key .*got 0"),
    Case("attribution-smooth-relative-not-bool", lambda: sg(_sal, X, key=KEY, relative=1),
         TypeError, r"relative must be a bool, got 1"),
    Case("attribution-smooth-fn-not-callable", lambda: sg(W, X, key=KEY),
         TypeError, r"attribution_fn must be a function called as attribution_fn\(inputs\)"),
    Case("attribution-smooth-batch_size-zero", lambda: sg(_sal, X, key=KEY, batch_size=0),
         ValueError, r"batch_size must be an int >= 1, got 0"),
    Case("attribution-gig-fraction-zero", lambda: gig(summed, X, fraction=0.0),
         ValueError, r"fraction must be in \(0\.0, 1\.0\], got 0\.0"),
    Case("attribution-gig-fraction-above-one", lambda: gig(summed, X, fraction=1.5),
         ValueError, r"fraction must be in \(0\.0, 1\.0\], got 1\.5"),
    Case("attribution-gig-max_dist-negative", lambda: gig(summed, X, max_dist=-0.1),
         ValueError, r"max_dist must be in \[0\.0, 1\.0\], got -0\.1"),
    Case("attribution-gig-steps-zero", lambda: gig(summed, X, steps=0),
         ValueError, r"steps must be an int >= 1, got 0"),
    Case("attribution-gig-baseline-shape", lambda: gig(summed, X, baseline=np.zeros(2)),
         ValueError, r"baseline must have the per-example shape \(3,\).*got shape \(2,\)"),
    Case("attribution-blur-images-3d", lambda: blur(_image_fn, IMAGES[0]),
         ValueError, r"images must be one array of images \(N, H, W, C\), got shape "
                     r"\(4, 4, 1\)"),
    Case("attribution-blur-images-pytree", lambda: blur(_image_fn, {"a": IMAGES}),
         ValueError, r"images must be one array of images \(N, H, W, C\), got dict"),
    Case("attribution-blur-max_sigma-zero", lambda: blur(_image_fn, IMAGES, max_sigma=0),
         ValueError, r"max_sigma must be a finite number > 0, got 0"),
    Case("attribution-blur-grad_step-negative", lambda: blur(_image_fn, IMAGES, grad_step=-1.0),
         ValueError, r"grad_step must be a finite number > 0, got -1\.0"),
    Case("attribution-blur-sqrt-not-bool", lambda: blur(_image_fn, IMAGES, sqrt="no"),
         TypeError, r"sqrt must be a bool, got 'no'"),
    Case("attribution-ih-row_batch_size-zero", lambda: ih(summed, X, row_batch_size=0),
         ValueError, r"row_batch_size must be an int >= 1, got 0"),
    Case("attribution-ih-steps-traced", lambda: _traced(lambda s: ih(summed, X, steps=s))(2),
         TypeError, r"steps must be a static Python value"),
    Case("attribution-ih-target-missing", lambda: ih(linear, X),
         ValueError, r"fn returns 2 outputs per example.*pass target"),
    Case("attribution-tokens-position-beyond",
         lambda: _tokens(position=3, target_token=0),
         ValueError, r"position must be in \[-3, 3\) \(a position in sequences of 3 tokens\), "
                     r"got 3"),
    Case("attribution-tokens-position-per-example-beyond",
         lambda: _tokens(position=np.array([0, 7]), target_token=0),
         ValueError, r"position must be in \[-3, 3\).*got \[7\]"),
    Case("attribution-tokens-last-position-needs-target",
         lambda: _tokens(position=2),
         ValueError, r"target_token must be given when position is the last of the 3 tokens"),
    Case("attribution-tokens-target-beyond-vocab",
         lambda: _tokens(position=0, target_token=5),
         ValueError, r"target_token must be in \[0, 5\) \(a vocabulary of 5\), got 5"),
    Case("attribution-tokens-position-float", lambda: _tokens(position=1.0),
         TypeError, r"position must be an int or an integer array of shape \(2,\), got 1\.0"),
    Case("attribution-tokens-ids-float",
         lambda: _tokens(ids=np.zeros((2, 3), np.float32), position=0),
         ValueError, r"ids must be integer token ids of shape \(N, T\), got float32"),
    Case("attribution-tokens-fn-not-logits",
         lambda: _tokens(fn=lambda i: jnp.zeros(i.shape), position=0),
         ValueError, r"fn must map ids \(2, 3\) to floating next-token logits of shape "
                     r"\(2, 3, 'V'\), got float32 of shape \(2, 3\)"),
    Case("attribution-tokens-both-baselines",
         lambda: _tokens(position=0, baseline=np.zeros(3, np.int32), layer_baseline=1.0),
         ValueError, r"at most one of baseline \(token ids\) and layer_baseline"),
    # zero embeddings give zero logits: the baseline log-probability is -log(5)
    Case("attribution-tokens-zero-embedding-baseline",
         lambda: _tokens(position=0, steps=8),
         check=lambda out: np.testing.assert_allclose(
             np.asarray(out.scores).sum(1), out.log_prob + np.log(5.0), atol=1e-4)),
]

# ------------------------------------------------------- scanned layers (issue #20)


class _ScanBody(nn.Module):

  @nn.compact
  def __call__(self, h, _):
    return h + jnp.tanh(nn.Dense(3)(h)), None


class _ScannedText(nn.Module):

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(5, 3)(ids)
    h, _ = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="blocks")(h, None)
    return nn.Dense(2)(h.mean(axis=1))


@functools.cache
def _scanned_text():
  ids = jnp.array([[1, 2], [3, 4]], jnp.int32)
  variables = _ScannedText().init(jax.random.key(0), ids)
  return variables, ids


def _lig_scanned(variables=None, **kwargs):
  default, ids = _scanned_text()
  variables = variables or default
  return lig(lambda i: _ScannedText().apply(variables, i), ids, "blocks",
             **{"target": 0, "steps": 2, **kwargs})


def _twin_iterations():
  variables, _ = _scanned_text()
  params = dict(variables["params"])
  params["blocks"] = jax.tree.map(lambda a: a.at[2].set(a[0]), params["blocks"])
  return {"params": params}


class _NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 3, rngs=rngs)

  def __call__(self, h):
    return h + jnp.tanh(self.linear(h))


class _NnxScanned(nnx.Module):

  def __init__(self, graph):
    rngs = nnx.Rngs(0)
    self.embed = nnx.Embed(5, 3, rngs=rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _NnxBlock(rngs)

    self.blocks = make(rngs)
    self.graph = graph

  def __call__(self, ids):
    body = nnx.scan(lambda h, block: block(h), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                    graph=self.graph)
    return body(self.embed(ids), self.blocks).sum(axis=(1, 2))


CASES += [
    Case("attribution-lig-scan-layer_index-beyond",
         lambda: _lig_scanned(layer_index=3),
         ValueError, r"layer_index must be in \[-3, 3\) for layer 'blocks', scanned over 3 "
                     r"iterations \(its variable 'params/Dense_0/bias' of shape \(3, 3\) is "
                     r"stacked on axis 0\), got 3"),
    Case("attribution-lig-scan-layer_index-below",
         lambda: _lig_scanned(layer_index=-4),
         ValueError, r"layer_index must be in \[-3, 3\) for layer 'blocks'.*got -4"),
    Case("attribution-lig-scan-layer_index-missing", lambda: _lig_scanned(),
         ValueError, r"layer 'blocks' is scanned \(3 iterations; its variable "
                     r"'params/Dense_0/bias' of shape \(3, 3\).*pass layer_index.*\[-3, 3\)"),
    Case("attribution-lig-scan-layer_index-float", lambda: _lig_scanned(layer_index=1.0),
         TypeError, r"layer_index must be an int \(the iteration of a scanned layer\), "
                    r"got 1\.0"),
    Case("attribution-lig-scan-layer_index-not-scanned",
         lambda: _lig_text(layer_index=0),
         ValueError, r"layer_index is only for a scanned layer.*layer 'Embed_0' is not "
                     r"scanned.*got layer_index=0"),
    Case("attribution-lig-scan-equal-iterations",
         lambda: _lig_scanned(_twin_iterations(), layer_index=0),
         ValueError, r"layer 'blocks': iteration 0 of the scan cannot be told apart from "
                     r"iterations \[2\]"),
    Case("attribution-lig-scan-nnx-layer_index-beyond",
         lambda: lig(_NnxScanned(False), _scanned_text()[1], "blocks", layer_index=5),
         ValueError, r"layer_index must be in \[-3, 3\) for layer 'blocks'.*"
                     r"'linear/bias' of shape \(3, 3\).*got 5"),
    Case("attribution-lig-scan-nnx-graph-mode",
         lambda: lig(_NnxScanned(True), _scanned_text()[1], "blocks", layer_index=1),
         ValueError, r"model: calling the nnx model under a JAX transform failed.*graph=False"),
    Case("attribution-lig-scan-nnx-layer_index-1",
         lambda: lig(_NnxScanned(False), _scanned_text()[1], "blocks", layer_index=1,
                     steps=4, layer_baseline=0.0, return_delta=True)[1],
         check=lambda delta: np.testing.assert_array_less(np.abs(delta), 1e-2)),
]

# ------------------------------------------- SmoothGrad with the noise at a layer (#17)
_tokens_at = lambda ids, **kw: _tokens(ids=ids, position=0, **kw)


def _sg_layer(attribution_fn, **kwargs):
  return sg(attribution_fn, jnp.asarray(LM_IDS), key=KEY, samples=2, **kwargs)


CASES += [
    Case("attribution-smooth-noise_at-unknown",
         lambda: _sg_layer(_tokens_at, noise_at="embeddings"),
         ValueError, r"noise_at must be one of 'inputs', 'layer', got 'embeddings'"),
    Case("attribution-smooth-noise-on-token-ids",
         lambda: _sg_layer(_tokens_at),
         TypeError, r"inputs must hold floating arrays.*int32.*attribute integer inputs such "
                    r"as token ids at their embedding"),
    Case("attribution-smooth-layer-fn-without-layer_noise",
         lambda: sg(_sal, X, key=KEY, samples=2, noise_at="layer"),
         TypeError, r"attribution_fn must accept the keyword layer_noise= with "
                    r"noise_at='layer'"),
    Case("attribution-smooth-layer-noise-ignored",
         lambda: _sg_layer(lambda ids, layer_noise: _tokens_at(ids).scores, noise_at="layer"),
         ValueError, r"attribution_fn accepted layer_noise= but never called it"),
    Case("attribution-smooth-layer-position-beyond",
         lambda: _sg_layer(lambda ids, **kw: _tokens(ids=ids, position=3, target_token=0, **kw),
                           noise_at="layer"),
         ValueError, r"position must be in \[-3, 3\) \(a position in sequences of 3 tokens\)"),
    Case("attribution-smooth-layer-stdev-zero-is-token-attributions",
         lambda: (_sg_layer(_tokens_at, stdev=0.0, noise_at="layer").scores,
                  _tokens_at(jnp.asarray(LM_IDS)).scores),
         check=lambda pair: np.testing.assert_allclose(*pair, rtol=1e-6)),
    Case("attribution-lig-layer_noise-not-callable",
         lambda: _lig_text(layer_noise=np.zeros((2, 2, 3))),
         TypeError, r"layer_noise must be a function called as layer_noise\(h\) -> h \+ noise, "
                    r"got an array of shape \(2, 2, 3\)"),
    Case("attribution-lig-layer_noise-shape",
         lambda: _lig_text(layer_noise=lambda h: h[:, :1]),
         ValueError, r"layer_noise\(h\) must have the leaf shapes of the output of layer "
                     r"'Embed_0'; these differ: <root>: \(2, 1, 3\) vs \(2, 2, 3\)"),
    Case("attribution-lig-layer_noise-structure",
         lambda: _lig_text(layer_noise=lambda h: {"h": h}),
         ValueError, r"layer_noise\(h\) must have the structure of the output of layer "
                     r"'Embed_0': missing \[''\]"),
    Case("attribution-lig-layer_noise-dtype",
         lambda: _lig_text(layer_noise=lambda h: h.astype(jnp.float16)),
         TypeError, r"layer_noise\(h\) must keep the dtypes of the output of layer 'Embed_0'; "
                    r"these differ: <root>: float16 vs float32"),
]


def _lig_nnx_copy():
  """fn calls a copy of the model (nnx.merge), never the model the layer is looked up in."""
  model = _Nnx()
  graphdef, state = nnx.split(model)
  return lig(lambda i: nnx.merge(graphdef, state)(i), _text()[1], "embed", model=model)


def _lig_nnx_without_model():
  model = _Nnx()
  return lig(lambda i: model(i), _text()[1], "embed")


CASES += [
    Case("attribution-lig-nnx-layer-empty", lambda: lig(_Nnx(), _text()[1], ""),
         ValueError, r"layer must be the path of a submodule of model, got ''; the submodule "
                     r"paths of _Nnx are \['embed'\]"),
    Case("attribution-lig-nnx-fn-calls-a-copy", _lig_nnx_copy,
         ValueError, r"layer: fn must call the layer 'embed' exactly once per call, but it "
                     r"was called 0 times; is fn calling model itself"),
    Case("attribution-lig-nnx-without-model", _lig_nnx_without_model,
         ValueError, r"called 0 times; fn called no linen module \(for an nnx model, pass "
                     r"model=\)"),
]
