"""Zeroth-order and policy-gradient estimators against closed forms and plain autodiff.

The statistical checks use bounds of 5 standard errors (a false alarm has probability
< 1e-6 per coordinate); the variance checks compare a sample variance over many
independent estimates with its closed form within a chi-square-based band.
"""

import dataclasses
import inspect
import zlib

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from test_estimators_zo import documented_draw

import gradtx
from gradtx import estimators
from gradtx.estimators import _common, _es


def _reference_noise(key, index, shapes, noise="gaussian"):
  """The documented draw: ``fold_in(key, i)``, then ``fold_in(·, crc32(path) & 0x7FFFFFFF)``."""
  member = jax.random.fold_in(key, index)
  out = {}
  for path, shape in shapes.items():
    leaf_key = jax.random.fold_in(member, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    out[path] = documented_draw(leaf_key, shape, noise)
  return out


W = np.array([1.0, -2.0, 0.5, 3.0])


def _linear(p):
  return jnp.dot(p["w"], jnp.asarray(W, p["w"].dtype))


# --------------------------------------------------------------------------------------
# The estimate equals a numpy computation from the same documented noise.


@pytest.mark.parametrize("antithetic,baseline,shaping,noise", [
    (False, "f0", None, "gaussian"),
    (False, "mean", None, "gaussian"),
    (False, None, None, "rademacher"),
    (True, "f0", None, "gaussian"),
    (False, None, "centered_rank", "gaussian"),
    (True, None, "centered_rank", "rademacher"),
    (False, None, "standardize", "gaussian"),
])
def test_es_gradient_equals_numpy_reference(antithetic, baseline, shaping, noise):
  f = lambda p: jnp.sum(jnp.sin(p["a"])) + jnp.sum(p["b"] ** 2)
  params = {"a": jnp.linspace(-1.0, 1.0, 6), "b": jnp.array([[0.5, -0.2], [0.1, 0.3]])}
  shapes = {"a": (6,), "b": (2, 2)}
  key, n, sigma = jax.random.key(3), 8, 0.1
  got = gradtx.es_gradient(f, params, key, sigma=sigma, num_samples=n, antithetic=antithetic,
                           noise=noise, shaping=shaping, baseline=baseline)
  np_f = lambda p: np.sum(np.sin(p["a"])) + np.sum(p["b"] ** 2)
  base = {k: np.asarray(v, np.float64) for k, v in params.items()}
  draws = n // 2 if antithetic else n
  eps = [_reference_noise(key, j, shapes, noise) for j in range(draws)]
  signs = (1.0, -1.0) if antithetic else (1.0,)
  members = [(e, s) for e in eps for s in signs]
  fitness = np.array([np_f({k: base[k] + s * sigma * e[k] for k in base}) for e, s in members])
  if shaping == "centered_rank":
    w = _average_ranks(fitness) / (n - 1) - 0.5
  elif shaping == "standardize":
    w = (fitness - fitness.mean()) / fitness.std()
  elif antithetic or baseline is None:
    w = fitness
  elif baseline == "f0":
    w = fitness - np_f(base)
  else:  # leave-one-out mean
    w = np.array([f - np.delete(fitness, i).mean() for i, f in enumerate(fitness)])
  for k in base:
    want = sum(wi * s * e[k] for wi, (e, s) in zip(w, members, strict=True)) / (n * sigma)
    np.testing.assert_allclose(np.asarray(got[k]), want, rtol=2e-4, atol=1e-5, err_msg=k)


def _average_ranks(values):
  """0-based ranks, ties sharing the mean of the positions they span (numpy loop)."""
  values = np.asarray(values, np.float64)
  order = np.sort(values)
  return np.array([np.mean(np.flatnonzero(order == v)) for v in values])


def test_centered_ranks_match_numpy():
  values = jnp.array([0.3, -1.0, 2.0, 0.0, 5.0, -3.0])
  want = np.argsort(np.argsort(np.asarray(values))) / 5 - 0.5
  np.testing.assert_allclose(_common.centered_ranks(values), want, rtol=1e-6)
  assert float(_common.centered_ranks(values).sum()) == pytest.approx(0.0, abs=1e-7)


def test_centered_ranks_average_ties_and_rank_nan_last():
  values = np.array([0.5, 0.25, 0.5, 1.0, 0.25, 0.5, np.nan, 0.75])
  want = _average_ranks(np.where(np.isnan(values), np.inf, values)) / 7 - 0.5
  # 0.25 ×2 share ranks 0, 1 → 0.5; 0.5 ×3 share 2, 3, 4 → 3; NaN is last (7).
  np.testing.assert_allclose(want * 7 + 3.5, [3, 0.5, 3, 6, 0.5, 3, 7, 5])
  np.testing.assert_allclose(_common.centered_ranks(jnp.asarray(values, jnp.float32)),
                             want, rtol=1e-6)


def test_centered_ranks_on_a_plateau_give_zero_estimate():
  # A flat objective (every member ties) gives no direction, not a position artefact.
  flat = lambda p: jnp.floor(jnp.sum(p["w"]) * 0.0)
  g = gradtx.es_gradient(flat, {"w": jnp.ones(5)}, jax.random.key(0), sigma=0.1,
                         num_samples=16, shaping="centered_rank")
  np.testing.assert_array_equal(np.asarray(g["w"]), np.zeros(5))


# --------------------------------------------------------------------------------------
# Unbiasedness and the closed-form variances.


def _many(estimate, reps=400):
  keys = jax.random.split(jax.random.key(11), reps)
  return np.asarray(jax.jit(jax.vmap(estimate))(keys), np.float64)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_es_mean_is_the_gradient_of_a_linear_function(noise):
  n = 64
  draws = _many(lambda k: gradtx.es_gradient(_linear, {"w": jnp.zeros(4)}, k, sigma=0.3,
                                             num_samples=n, antithetic=False, noise=noise)["w"])
  # Per estimate: (1/N) Σ ε εᵀ w; coordinate variance (‖w‖² + w_k²)/N (Gaussian) or
  # (‖w‖² - w_k²)/N (Rademacher).
  var = (W @ W + W**2) / n if noise == "gaussian" else (W @ W - W**2) / n
  se = np.sqrt(var / draws.shape[0])
  assert np.all(np.abs(draws.mean(0) - W) < 5 * se + 1e-6), (draws.mean(0), W, se)


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_antithetic_variance_on_a_quadratic_has_the_closed_form(noise):
  a = jnp.array([1.0, 2.0, 0.5, 3.0])
  theta = jnp.array([0.5, -1.0, 2.0, 0.1])
  f = lambda p: 0.5 * jnp.sum(a * p["w"] ** 2) + jnp.sum(p["w"])
  g = np.asarray(a * theta + 1.0, np.float64)
  pairs = 4
  draws = _many(lambda k: gradtx.es_gradient(f, {"w": theta}, k, sigma=0.5,
                                             num_samples=2 * pairs, noise=noise)["w"], reps=2000)
  # Mirrored pairs cancel the quadratic term exactly: each pair gives (∇f·ε) ε.
  var = (g @ g + g**2) / pairs if noise == "gaussian" else (g @ g - g**2) / pairs
  m = draws.shape[0]
  assert np.all(np.abs(draws.mean(0) - g) < 5 * np.sqrt(var / m))
  ratio = draws.var(0, ddof=1) / var
  # Sample variance / true variance: mean 1, sd ≈ sqrt((κ - 1)/m) with a heavy-ish tail.
  assert np.all((ratio > 0.75) & (ratio < 1.3)), ratio


def test_forward_gradient_is_unbiased_with_the_closed_form_variance():
  f = lambda p: jnp.sum(jnp.sin(p["w"]))
  theta = jnp.array([0.1, 1.0, -2.0])
  g = np.cos(np.asarray(theta, np.float64))
  k = 2
  draws = _many(lambda key: gradtx.forward_gradient(f, {"w": theta}, key,
                                                    num_directions=k)["w"], reps=3000)
  var = (g @ g + g**2) / k
  assert np.all(np.abs(draws.mean(0) - g) < 5 * np.sqrt(var / draws.shape[0]))
  ratio = draws.var(0, ddof=1) / var
  assert np.all((ratio > 0.75) & (ratio < 1.3)), ratio


def test_score_function_matches_the_analytic_policy_gradient():
  rewards = jnp.array([1.0, 0.0, 2.0, -1.0])
  logits = jnp.array([0.2, -0.5, 1.0, 0.0])
  pi = np.asarray(jax.nn.softmax(logits), np.float64)
  r = np.asarray(rewards, np.float64)
  exact = pi * (r - pi @ r)  # ∇_logits Σ_y π_y r_y
  est = gradtx.score_function_gradient(
      lambda p, y: jax.nn.log_softmax(p["logits"])[y], lambda y: rewards[y],
      {"logits": logits}, jax.random.key(5),
      sample_fn=lambda p, k: jax.random.categorical(k, p["logits"]), num_samples=200_000)
  np.testing.assert_allclose(np.asarray(est["logits"]), exact, atol=0.01)


def test_policy_gradient_and_zeroth_order_agree_on_smoothed_accuracy():
  """Su's equivalence, on a softmax-smoothed argmax accuracy of a linear classifier.

  ``A(W) = mean_x softmax(x W)[label]`` is the expected accuracy of the policy that
  samples a class from the softmax. Its policy gradient (REINFORCE with the 0/1 reward)
  and its zeroth-order gradient (antithetic ES, σ = 0.05) estimate the same ∇A; both are
  compared with autodiff of ``A`` and with each other (cosine > 0.97: the ES estimate also
  carries the O(σ²) smoothing bias and both carry Monte-Carlo noise).
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(32, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 32))
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)) * 0.5, jnp.float32)}
  accuracy = lambda p: jnp.mean(jax.nn.softmax(x @ p["w"])[jnp.arange(32), labels])
  exact = np.asarray(jax.grad(accuracy)(params)["w"]).ravel()
  policy = gradtx.score_function_gradient(
      lambda p, y: jnp.sum(jax.nn.log_softmax(x @ p["w"])[jnp.arange(32), y]) / 32,
      lambda y: jnp.sum(y == labels).astype(jnp.float32),
      params, jax.random.key(1),
      sample_fn=lambda p, k: jax.random.categorical(k, x @ p["w"]), num_samples=20_000)
  zeroth = gradtx.es_gradient(accuracy, params, jax.random.key(2), sigma=0.05,
                              num_samples=20_000)
  cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
  policy, zeroth = np.asarray(policy["w"]).ravel(), np.asarray(zeroth["w"]).ravel()
  assert cos(policy, exact) > 0.97 and cos(zeroth, exact) > 0.97
  assert cos(policy, zeroth) > 0.95
  np.testing.assert_allclose(np.linalg.norm(zeroth), np.linalg.norm(exact), rtol=0.1)


# --------------------------------------------------------------------------------------
# Reproducibility and the evaluation modes.


def test_same_key_same_estimate_and_modes_agree():
  f = lambda p: jnp.sum(jnp.tanh(p["a"] @ p["b"]))
  params = {"a": jnp.ones((3, 4)) * 0.3, "b": jnp.linspace(-1, 1, 8).reshape(4, 2)}
  kw = dict(sigma=0.05, num_samples=10)
  key = jax.random.key(9)
  full = gradtx.es_gradient(f, params, key, **kw)
  again = gradtx.es_gradient(f, params, key, **kw)
  other = gradtx.es_gradient(f, params, jax.random.key(10), **kw)
  lean = jax.jit(lambda p: gradtx.es_gradient(f, p, key, lean=True, **kw))(params)
  chunked = gradtx.es_gradient(f, params, key, batch_size=2, **kw)  # 5 pairs: 2 + 2 + 1
  for name in params:
    np.testing.assert_array_equal(again[name], full[name])
    assert not np.allclose(other[name], full[name])
    np.testing.assert_allclose(lean[name], full[name], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(chunked[name], full[name], rtol=1e-5, atol=1e-7)


def test_traced_sigma_equals_a_python_sigma():
  """``sigma`` may be an array inside jit (e.g. injected by ``optax.inject_hyperparams``)."""
  params = {"w": jnp.linspace(-1.0, 1.0, 4)}
  key = jax.random.key(2)
  for mode in (dict(), dict(lean=True), dict(batch_size=3)):
    want = gradtx.es_gradient(_linear, params, key, sigma=0.1, num_samples=8, **mode)
    got = jax.jit(lambda s, mode=mode: gradtx.es_gradient(
        _linear, params, key, sigma=s, num_samples=8, **mode))(jnp.float32(0.1))
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5, atol=1e-6, err_msg=str(mode))
  injected = optax.inject_hyperparams(gradtx.zeroth_order, static_args=(
      "estimator", "key", "num_samples"))(estimator="es", key=key, sigma=0.1, num_samples=8,
                                          shaping="centered_rank")
  state = injected.init(params)
  assert float(state.hyperparams["sigma"]) == pytest.approx(0.1)
  updates, _ = jax.jit(lambda s: injected.update(params, s, params, loss_fn=_linear))(state)
  plain = gradtx.zeroth_order("es", key=key, sigma=0.1, num_samples=8,
                              shaping="centered_rank")
  want, _ = plain.update(params, plain.init(params), params, loss_fn=_linear)
  np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-5, atol=1e-6)


def test_flat_and_per_leaf_populations_give_the_same_estimate(monkeypatch):
  """The default strategy's flat population (one raveled vector, for XLA:CPU's speed) and
  its per-leaf population evaluate the same perturbed members."""
  f = lambda p: jnp.sum(jnp.tanh(p["a"] @ p["b"])) + jnp.sum(p["c"] ** 3)
  params = {"a": jnp.ones((3, 4)) * 0.3, "b": jnp.linspace(-1, 1, 8).reshape(4, 2),
            "c": jnp.array(0.7)}
  key = jax.random.key(1)
  def estimate(p):
    return gradtx.es_gradient(f, p, key, sigma=0.05, num_samples=6, shaping="standardize")

  assert _es._flattenable(params)
  flat = jax.jit(estimate)(params)
  asked = []
  monkeypatch.setattr(_es, "_flattenable", lambda p: asked.append(p) and False)
  per_leaf = jax.jit(lambda p: estimate(p))(params)  # a new function: traced again
  assert asked
  chex.assert_trees_all_close(flat, per_leaf, rtol=1e-6, atol=1e-7)


def test_es_gradient_and_zeroth_order_share_one_set_of_defaults():
  parameters = inspect.signature(gradtx.es_gradient).parameters
  defaults = {name: p.default for name, p in parameters.items()
              if p.default is not inspect.Parameter.empty}
  fields = {f.name: f.default for f in dataclasses.fields(estimators.ESOptions)
            if f.default is not dataclasses.MISSING}
  assert defaults == fields
  forward = inspect.signature(gradtx.forward_gradient).parameters["num_directions"].default
  assert forward == estimators.ForwardOptions().num_directions == 1


# --------------------------------------------------------------------------------------
# Low-precision params: the members are rounded to the leaf's dtype.


def _bf16_reference(fn_np, theta, key, sigma, n):
  """The documented antithetic estimate on members rounded to bfloat16 (numpy, float64)."""
  steps = np.float32(sigma) * np.array([1.0, -1.0], np.float32)
  total = np.zeros(theta.shape, np.float64)
  for j in range(n // 2):
    eps = _reference_noise(key, j, {"w": theta.shape})["w"].astype(np.float32)
    members = [(theta.astype(np.float32) + s * eps).astype(ml_dtypes.bfloat16) for s in steps]
    plus, minus = (fn_np(m.astype(np.float64)) for m in members)
    total += (plus - minus) * eps
  return total / (n * sigma)


def test_es_on_bfloat16_params_equals_the_numpy_reference_on_rounded_members():
  c = np.array([1.0, -2.0, 0.5, 3.0])
  theta = np.array([0.01, -0.3, 1.0, 2.5]).astype(ml_dtypes.bfloat16)
  params = {"w": jnp.asarray(theta)}
  f = lambda p: jnp.sum(jnp.sin(p["w"].astype(jnp.float32)) * jnp.asarray(c, jnp.float32))
  key, sigma, n = jax.random.key(5), 0.02, 8  # spacing at 2.5: 2^-6 = 0.0156 <= sigma
  want = _bf16_reference(lambda m: np.sum(np.sin(m) * c), theta, key, sigma, n)
  for got in (gradtx.es_gradient(f, params, key, sigma=sigma, num_samples=n),
              jax.jit(lambda p: gradtx.es_gradient(f, p, key, sigma=sigma, num_samples=n))(
                  params)):
    assert got["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got["w"], np.float64), want, rtol=1e-2, atol=1e-3)


def test_es_on_bfloat16_params_at_the_spacing_is_unbiased():
  """σ equal to the largest spacing: the mean estimate of a linear function is its
  gradient (below the spacing it would be a fraction of it, hence the error and NaN)."""
  theta = jnp.asarray(np.array([0.02, -0.6, 1.5, 3.0]), jnp.bfloat16)
  sigma = float(np.max(np.spacing(np.abs(np.asarray(theta)))))  # 2^-6 at 3.0
  pairs = 8
  draws = _many(lambda k: gradtx.es_gradient(
      lambda p: jnp.dot(p["w"].astype(jnp.float32), jnp.asarray(W, jnp.float32)),
      {"w": theta}, k, sigma=sigma, num_samples=2 * pairs)["w"].astype(jnp.float32))
  se = np.sqrt((W @ W + W**2) / pairs / draws.shape[0])
  assert np.all(np.abs(draws.mean(0) - W) < 5 * se + 0.01 * np.abs(W)), (draws.mean(0), se)


# --------------------------------------------------------------------------------------
# The transformation.


def test_zeroth_order_trains_a_piecewise_constant_objective():
  loss = lambda p: jnp.sum(jnp.round(p["w"] * 10) ** 2)  # gradient 0 a.e.
  tx = optax.chain(gradtx.zeroth_order("es", key=jax.random.key(0), sigma=0.2,
                                       num_samples=32), optax.adam(0.1))
  params = {"w": jnp.array([2.0, -1.5, 1.0])}
  assert float(jnp.abs(jax.grad(loss)(params)["w"]).sum()) == 0.0
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(params, state, params, loss_fn=loss)
    return optax.apply_updates(params, updates), state

  start = float(loss(params))
  for _ in range(60):
    params, state = step(params, state)
  assert float(loss(params)) < 0.05 * start


def test_zeroth_order_on_a_subset_next_to_true_gradients():
  """``optax.partition``: ES on the head, true gradients on the body; masked leaves are
  never perturbed and ``fill_masked`` rebuilds the tree for ``loss_fn``."""
  x = jnp.linspace(-1, 1, 12).reshape(6, 2)
  y = jnp.array([0.0, 1.0, 0.5, -0.5, 1.0, 0.0])
  full_loss = lambda p: jnp.mean((jnp.tanh(x @ p["body"]) @ p["head"] - y) ** 2)
  params = {"body": jnp.ones((2, 3)) * 0.1, "head": jnp.ones(3) * 0.2}
  seen = []

  def make_head_loss(params):
    def head_loss(p):
      seen.append(jax.tree.map(lambda v: isinstance(v, optax.MaskedNode), p,
                               is_leaf=lambda v: isinstance(v, optax.MaskedNode)))
      return full_loss(gradtx.fill_masked(p, params))
    return head_loss

  tx = optax.partition(
      {"es": gradtx.zeroth_order("es", key=jax.random.key(0), sigma=0.01, num_samples=4000),
       "sgd": optax.identity()}, {"body": "sgd", "head": "es"})
  grads = jax.grad(full_loss)(params)
  updates, _ = tx.update(grads, tx.init(params), params, loss_fn=make_head_loss(params))
  assert seen and seen[0] == {"body": True, "head": False}
  np.testing.assert_array_equal(updates["body"], grads["body"])  # true gradient untouched
  np.testing.assert_allclose(updates["head"], grads["head"], rtol=0.1, atol=2e-3)


def test_fill_masked():
  tree = {"a": jnp.ones(2), "b": optax.MaskedNode()}
  full = {"a": jnp.zeros(2), "b": jnp.full(3, 7.0)}
  out = gradtx.fill_masked(tree, full)
  np.testing.assert_array_equal(out["a"], jnp.ones(2))
  np.testing.assert_array_equal(out["b"], full["b"])


# --------------------------------------------------------------------------------------
# Errors.


def test_errors():
  es = gradtx.es_gradient
  p = {"w": jnp.zeros(3)}
  k = jax.random.key(0)
  with pytest.raises(ValueError, match=r"sigma must be a finite number > 0, got 0"):
    es(_linear, p, k, sigma=0.0, num_samples=4)
  with pytest.raises(ValueError, match=r"sigma must be a finite number > 0, got -1"):
    es(_linear, p, k, sigma=-1.0, num_samples=4)
  with pytest.raises(ValueError, match=r"num_samples must be even with antithetic=True.*got 5"):
    es(_linear, p, k, sigma=0.1, num_samples=5)
  with pytest.raises(ValueError, match=r"noise must be one of 'gaussian', 'rademacher', "
                                       r"got 'uniform'"):
    es(_linear, p, k, sigma=0.1, num_samples=4, noise="uniform")
  with pytest.raises(ValueError, match=r"shaping must be one of None, 'centered_rank', "
                                       r"'standardize', got 'rank'"):
    es(_linear, p, k, sigma=0.1, num_samples=4, shaping="rank")
  with pytest.raises(ValueError, match=r"baseline must be one of .*got 'median'"):
    es(_linear, p, k, sigma=0.1, num_samples=4, baseline="median")
  with pytest.raises(ValueError, match=r"num_samples must be an int >= 1, got 0"):
    es(_linear, p, k, sigma=0.1, num_samples=0)
  with pytest.raises(ValueError, match=r"pass both mesh and axis_name"):
    es(_linear, p, k, sigma=0.1, num_samples=4, axis_name="data")
  with pytest.raises(ValueError, match=r"num_directions must be an int >= 1, got 0"):
    gradtx.forward_gradient(_linear, p, k, num_directions=0)
  with pytest.raises(ValueError, match=r"num_samples must be >= 2 with baseline='mean'"):
    gradtx.score_function_gradient(lambda p, y: 0.0, lambda y: 0.0, p, k,
                                   sample_fn=lambda p, k: 0, num_samples=1)
  with pytest.raises(ValueError, match=r"estimator must be one of 'es', 'forward', 'hizoo', "
                                       r"'sign', got 'cma'"):
    gradtx.zeroth_order("cma", key=k)
  with pytest.raises(TypeError, match=r"bad estimator options.*sigmaa"):
    gradtx.zeroth_order("es", key=k, sigmaa=0.1, num_samples=4)
  with pytest.raises(ValueError, match=r"sigma must be a finite number > 0"):
    gradtx.zeroth_order("es", key=k, sigma=0.0, num_samples=4)
  with pytest.raises(ValueError, match=r"num_samples must be even"):
    gradtx.zeroth_order("es", key=k, sigma=0.1, num_samples=3)
  with pytest.raises(TypeError, match=r"key must be a jax.random key .*got 0"):
    gradtx.zeroth_order("es", key=0, sigma=0.1, num_samples=4)
  tx = gradtx.zeroth_order("es", key=k, sigma=0.1, num_samples=4)
  with pytest.raises(ValueError, match=r"zeroth_order needs the objective: .*loss_fn"):
    tx.update(p, tx.init(p), p)
  with pytest.raises(ValueError, match=r"zeroth_order needs the params"):
    tx.update(p, tx.init(p), loss_fn=_linear)
