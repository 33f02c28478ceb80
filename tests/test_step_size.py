"""Tests of gradtx/step_size.py against independent references.

References: numpy implementations of the documented equations -- EGDD (gains
``p ← clip(p ⊙ e^{η_p sign(g) ⊙ sign(ḡ)})``, scale ``s ← clip(s e^{η_s cos(g, m_{t-1})})``,
``u = -η s p ⊙ d``), Su's rule (``ν ← clip(ν ⊙ e^{γ g_{t-1} ⊙ g_t})``) and Baydin et al.'s
hypergradient descent (additive and multiplicative) -- with the base directions (SGD,
momentum, Adam) also written in numpy; numpy gets closed-form gradients, gradtx
``jax.grad``'s. Plus the hypergradient itself by plain autodiff: ``g_t · d_{t-1} =
-∂L(θ_{t-1} - α d_{t-1})/∂α``.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradtx

RNG = np.random.default_rng(1)
SHAPES = {"a": (3, 4), "b": (5,)}
# An ill-conditioned diagonal quadratic: large-curvature coordinates oscillate (gradient
# signs flip), small-curvature ones creep (signs agree), so gains go both ways.
CURVATURE = {k: RNG.uniform(0.2, 6.0, s) for k, s in SHAPES.items()}
TARGET = {k: RNG.normal(size=s) for k, s in SHAPES.items()}
THETA0 = {k: RNG.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
STEPS = 8


def loss(params):
  return sum(0.5 * jnp.sum(CURVATURE[k] * (params[k] - TARGET[k]) ** 2) for k in params)


def np_grad(params):
  return {k: CURVATURE[k] * (params[k] - TARGET[k]) for k in params}


def params32():
  return {k: jnp.asarray(v) for k, v in THETA0.items()}


def run(tx, steps=STEPS):
  """``steps`` jitted steps on the quadratic: the updates and states after each step."""
  update = jax.jit(tx.update)
  params = params32()
  state = tx.init(params)
  updates_seen, states = [], []
  for _ in range(steps):
    updates, state = update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
    updates_seen.append(jax.tree.map(np.asarray, updates))
    states.append(state)
  return updates_seen, states


# ----------------------------------------------------------------------------- numpy bases


class NpIdentity:
  def __call__(self, g):
    return g


class NpTrace:
  """optax.trace(decay): t ← g + decay t."""

  def __init__(self, decay):
    self.decay, self.t = decay, None

  def __call__(self, g):
    self.t = g if self.t is None else {k: g[k] + self.decay * self.t[k] for k in g}
    return self.t


class NpAdam:
  """Adam's direction m̂ / (√v̂ + ε) (Kingma & Ba), optax's defaults."""

  def __init__(self, b1=0.9, b2=0.999, eps=1e-8):
    self.b1, self.b2, self.eps, self.count, self.m, self.v = b1, b2, eps, 0, None, None

  def __call__(self, g):
    if self.m is None:
      self.m = {k: np.zeros_like(x) for k, x in g.items()}
      self.v = {k: np.zeros_like(x) for k, x in g.items()}
    self.count += 1
    self.m = {k: self.b1 * self.m[k] + (1 - self.b1) * g[k] for k in g}
    self.v = {k: self.b2 * self.v[k] + (1 - self.b2) * g[k] ** 2 for k in g}
    return {k: (self.m[k] / (1 - self.b1 ** self.count))
            / (np.sqrt(self.v[k] / (1 - self.b2 ** self.count)) + self.eps) for k in g}


BASES = {
    "sgd": (optax.identity, NpIdentity),
    "momentum": (lambda: optax.trace(0.9), lambda: NpTrace(0.9)),
    "adam": (optax.scale_by_adam, NpAdam),
}


def np_cos(a, b):
  """<a, b> / (‖a‖ ‖b‖) over all the given arrays; 0 when either is 0."""
  dot = sum(np.sum(x * y) for x, y in zip(a, b, strict=True))
  norms = np.sqrt(sum(np.sum(x * x) for x in a) * sum(np.sum(y * y) for y in b))
  return dot / norms if norms > 0 else 0.0


# ----------------------------------------------------------------------------- numpy EGDD / Su


def np_eg_step_size(base, *, learning_rate, gain_lr, scale_lr, beta, gains, scale, gain_range,
                    scale_range, rule, steps=STEPS, theta0=THETA0, initial_scale=1.0):
  """The docstring's equations, step by step; returns per step (u, logged fields)."""
  theta = {k: v.astype(np.float64) for k, v in theta0.items()}
  lr = learning_rate if callable(learning_rate) else (lambda t: learning_rate)
  if rule == "su":
    scale = "none"
  p = {k: np.ones(s) if gains == "per_coordinate" else 1.0 for k, s in SHAPES.items()}
  s = dict.fromkeys(SHAPES, initial_scale) if scale == "per_leaf" else initial_scale
  ema = {k: np.zeros(sh) for k, sh in SHAPES.items()}
  prev = {k: np.zeros(sh) for k, sh in SHAPES.items()}
  out = []
  for t in range(steps):
    g = np_grad(theta)
    d = base(g)
    if gains != "none":
      if rule == "su":
        agree = {k: ema[k] * g[k] for k in g}
      else:
        agree = {k: np.sign(g[k]) * np.sign(ema[k]) for k in g}
      if gains == "per_leaf":
        agree = {k: np.mean(a) for k, a in agree.items()}
      p = {k: np.clip(p[k] * np.exp(gain_lr * agree[k]), *gain_range) for k in g}
    if scale == "global":
      s = np.clip(s * np.exp(scale_lr * np_cos(list(g.values()), list(prev.values()))),
                  *scale_range)
    elif scale == "per_leaf":
      s = {k: np.clip(s[k] * np.exp(scale_lr * np_cos([g[k]], [prev[k]])), *scale_range)
           for k in g}
    m = {k: (p[k] if gains != "none" else 1.0) * d[k] for k in g}
    u = {k: -lr(t) * (s[k] if scale == "per_leaf" else s) * m[k] for k in g}
    ema = g if rule == "su" else {k: beta * ema[k] + (1 - beta) * g[k] for k in g}
    prev = m
    theta = {k: theta[k] + u[k] for k in theta}
    all_gains = (np.concatenate([np.ravel(p[k]) for k in SHAPES]) if gains != "none"
                 else np.ones(1))
    out.append((u, dict(lr_scale=s, gain_mean=all_gains.mean(), gain_min=all_gains.min(),
                        gain_max=all_gains.max())))
  return out


EGDD_CONFIGS = [
    # (base, gains, scale): narrow clip ranges and larger rates so the clips are active.
    ("sgd", "per_coordinate", "global"),
    ("momentum", "per_coordinate", "per_leaf"),
    ("adam", "per_coordinate", "global"),
    ("adam", "per_leaf", "per_leaf"),
    ("momentum", "none", "global"),
    ("sgd", "per_leaf", "none"),
]


# Adam's direction m̂/(√v̂+ε) is a ratio of small numbers where a coordinate's gradient
# crosses 0: float32 (gradtx) and float64 (numpy) drift apart there by ~1e-5 of the step.
ATOL = {"sgd": 1e-6, "momentum": 1e-6, "adam": 1e-5}


def check_against_numpy(kwargs, base_name, *, rtol=2e-5):
  atol = ATOL[base_name]
  make_base, make_np_base = BASES[base_name]
  tx = gradtx.eg_step_size(make_base(), **kwargs)
  got, states = run(tx)
  expected = np_eg_step_size(make_np_base(), **{
      "gain_lr": 0.01, "scale_lr": 0.001, "beta": 0.9, "gains": "per_coordinate",
      "scale": "global", "gain_range": (0.01, 100.0), "scale_range": (0.1, 10.0),
      "rule": "egdd", **kwargs})
  for t, (u, state, (u_np, fields)) in enumerate(zip(got, states, expected, strict=True)):
    for k in SHAPES:
      np.testing.assert_allclose(u[k], u_np[k], rtol=rtol, atol=atol, err_msg=f"u, {t}, {k}")
    for name, value in fields.items():
      got_value = optax.tree_utils.tree_get(state, name)
      if isinstance(value, dict):
        for k in value:
          np.testing.assert_allclose(got_value[k], value[k], rtol=1e-5, err_msg=f"{name} {t}")
      else:
        np.testing.assert_allclose(got_value, value, rtol=1e-5, err_msg=f"{name}, step {t}")
  return expected


# SGD's rate is above 1/curvature for the stiff coordinates, so their gradients flip sign.
BASE_LR = {"sgd": 0.25, "momentum": 0.05, "adam": 0.05}


@pytest.mark.parametrize("base_name,gains,scale", EGDD_CONFIGS)
def test_egdd_matches_numpy(base_name, gains, scale):
  kwargs = dict(learning_rate=BASE_LR[base_name], gain_lr=0.05, scale_lr=0.02, gains=gains,
                scale=scale, gain_range=(0.9, 1.12), scale_range=(0.99, 1.02), beta=0.8)
  expected = check_against_numpy(kwargs, base_name)
  fields = [f for _, f in expected]
  if gains == "per_coordinate":  # the clip was exercised, and gains moved both ways
    assert max(f["gain_max"] for f in fields) == pytest.approx(1.12)
    assert min(f["gain_min"] for f in fields) < 1.0
  elif gains == "per_leaf":  # leaf means of the sign agreement moved the gains
    assert max(abs(f["gain_max"] - 1) + abs(f["gain_min"] - 1) for f in fields) > 0.02
  if scale == "global":
    assert any(f["lr_scale"] in (0.99, 1.02) for f in fields)


def test_egdd_defaults_with_schedule_match_numpy():
  schedule = optax.linear_schedule(0.1, 0.02, transition_steps=STEPS)
  check_against_numpy(dict(learning_rate=schedule), "adam")


@pytest.mark.parametrize("scale", ["global", "per_leaf"])
def test_warm_start_initial_scale_matches_numpy(scale):
  """The benchmark's warm-start setting: the scale starts at 0.01 and learns its way up."""
  kwargs = dict(learning_rate=0.05, gain_lr=0.05, scale_lr=0.05, scale_range=(1e-3, 1e3),
                initial_scale=0.01, scale=scale)
  expected = check_against_numpy(kwargs, "momentum")
  first = expected[0][1]["lr_scale"]
  assert (min(first.values()) if scale == "per_leaf" else first) < 0.02  # it started low


@pytest.mark.parametrize("gains", ["per_coordinate", "per_leaf"])
def test_su_rule_matches_numpy(gains):
  kwargs = dict(learning_rate=0.1, gain_lr=0.2, gains=gains, gain_range=(0.5, 1.5), rule="su",
                scale="per_leaf")  # the rule has no scale: `scale` is ignored
  expected = check_against_numpy(kwargs, "sgd")
  assert all(f["lr_scale"] == 1.0 for _, f in expected)


def test_su_rule_by_hand():
  """ν_1 = 1 (no previous gradient), ν_2 = e^{γ g_1 g_2}: u_2 = -η ν_2 g_2."""
  tx = gradtx.eg_step_size(optax.identity(), learning_rate=0.5, gain_lr=0.1, rule="su")
  params = {"w": jnp.array([1.0, 2.0])}
  state = tx.init(params)
  u1, state = tx.update({"w": jnp.array([2.0, -1.0])}, state, params)
  u2, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
  np.testing.assert_allclose(u1["w"], [-1.0, 0.5], rtol=1e-6)
  nu = np.exp(0.1 * np.array([6.0, -4.0]))
  np.testing.assert_allclose(u2["w"], -0.5 * nu * np.array([3.0, 4.0]), rtol=1e-6)
  np.testing.assert_allclose(state.gains["w"], nu, rtol=1e-6)


# ----------------------------------------------------------------------------- hypergradient


def np_hypergradient(base, *, learning_rate, hyper_lr, multiplicative, steps=STEPS,
                     theta0=THETA0, log_space=False, min_lr=None, max_lr=None):
  theta = {k: v.astype(np.float64) for k, v in theta0.items()}
  alpha, prev = learning_rate, {k: np.zeros(s) for k, s in SHAPES.items()}
  out = []
  for _ in range(steps):
    g = np_grad(theta)
    d = base(g)
    if multiplicative:
      signal = np_cos(list(g.values()), list(prev.values()))
    else:
      signal = sum(np.sum(g[k] * prev[k]) for k in g)
    if log_space:
      alpha = np.exp(np.log(alpha) + hyper_lr * signal)
    elif multiplicative:
      alpha = alpha * (1 + hyper_lr * signal)
    else:
      alpha = alpha + hyper_lr * signal
    if min_lr is not None or max_lr is not None:
      alpha = np.clip(alpha, min_lr, max_lr)
    u = {k: -alpha * d[k] for k in g}
    theta = {k: theta[k] + u[k] for k in theta}
    prev = d
    out.append((u, alpha))
  return out


@pytest.mark.parametrize("base_name", ["sgd", "adam"])
@pytest.mark.parametrize("multiplicative", [False, True])
@pytest.mark.parametrize("log_space", [False, True])
def test_hypergradient_descent_matches_numpy(base_name, multiplicative, log_space):
  make_base, make_np_base = BASES[base_name]
  hyper_lr = 0.02 if multiplicative else (1e-4 if base_name == "sgd" else 1e-3)
  if log_space and not multiplicative:  # a relative change of α: β_log ≈ β / α_0 (or less)
    hyper_lr = 2e-3 if base_name == "sgd" else 5e-3
  tx = gradtx.hypergradient_descent(make_base(), learning_rate=0.05, hyper_lr=hyper_lr,
                                    multiplicative=multiplicative, log_space=log_space)
  got, states = run(tx)
  expected = np_hypergradient(make_np_base(), learning_rate=0.05, hyper_lr=hyper_lr,
                              multiplicative=multiplicative, log_space=log_space)
  for t, (u, state, (u_np, alpha)) in enumerate(zip(got, states, expected, strict=True)):
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "current_learning_rate"), alpha,
                               rtol=1e-5, err_msg=f"alpha, step {t}")
    for k in SHAPES:
      np.testing.assert_allclose(u[k], u_np[k], rtol=2e-5, atol=ATOL[base_name],
                                 err_msg=f"{t} {k}")
  assert abs(expected[-1][1] - 0.05) > 1e-3  # α really adapted


@pytest.mark.parametrize("log_space", [False, True])
def test_hypergradient_bounds_clip_alpha_like_numpy(log_space):
  kwargs = dict(learning_rate=0.05, hyper_lr=0.02 if log_space else 1e-3, min_lr=0.045,
                max_lr=0.06)
  tx = gradtx.hypergradient_descent(optax.scale_by_adam(), log_space=log_space, **kwargs)
  _, states = run(tx)
  expected = np_hypergradient(NpAdam(), multiplicative=False, log_space=log_space, **kwargs)
  alphas = np.array([a for _, a in expected])
  assert np.any(alphas == 0.06) or np.any(alphas == 0.045)  # a bound really bites
  np.testing.assert_allclose([float(s.current_learning_rate) for s in states], alphas,
                             rtol=1e-5)


def long_run_alphas(tx, steps=400):
  """``α_t`` over a long SGD run on the quadratic, under ``lax.scan``."""
  params = params32()

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return (optax.apply_updates(params, updates), state), state.current_learning_rate

  _, alphas = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=steps))(params)
  return np.asarray(alphas)


def test_log_space_rate_stays_positive_with_a_far_too_large_hyper_lr():
  """β = 10 (hundreds of times too large): the additive rule goes negative; in log space α
  is never negative, and with a ceiling (max_lr = 0.3, below SGD's stability limit
  2/6 here) it stays a positive finite number for 400 steps, swinging both ways."""
  additive = long_run_alphas(gradtx.hypergradient_descent(
      optax.identity(), learning_rate=0.05, hyper_lr=10.0, log_space=False))
  assert np.nanmin(additive) < 0  # the paper's failure
  for multiplicative in (False, True):
    unbounded = long_run_alphas(gradtx.hypergradient_descent(
        optax.identity(), learning_rate=0.05, hyper_lr=10.0, multiplicative=multiplicative))
    assert not np.any(unbounded < 0), multiplicative  # (it may run up and diverge: NaN)
    alphas = long_run_alphas(gradtx.hypergradient_descent(
        optax.identity(), learning_rate=0.05, hyper_lr=10.0, multiplicative=multiplicative,
        max_lr=0.3))
    assert np.all(np.isfinite(alphas)) and np.all(alphas > 0), multiplicative
    assert alphas.max() <= 0.3 * (1 + 1e-6)
    assert alphas.min() < 1e-2 and alphas.max() > 0.2, (alphas.min(), alphas.max())
  bounded = long_run_alphas(gradtx.hypergradient_descent(
      optax.identity(), learning_rate=0.05, hyper_lr=10.0, min_lr=1e-3, max_lr=0.2))
  assert bounded.min() >= 1e-3 * (1 - 1e-6) and bounded.max() <= 0.2 * (1 + 1e-6)
  additive_bounded = long_run_alphas(gradtx.hypergradient_descent(
      optax.identity(), learning_rate=0.05, hyper_lr=10.0, log_space=False, min_lr=1e-3,
      max_lr=0.3))
  assert np.all(additive_bounded >= 1e-3 * (1 - 1e-6))
  assert np.all(additive_bounded <= 0.3 * (1 + 1e-6))


def test_additive_hypergradient_is_the_derivative_of_the_loss():
  """α_t - α_{t-1} = -β ∂/∂α L(θ_{t-1} - α d_{t-1}) at α = α_{t-1} (SGD: d = g)."""
  beta = 0.003
  tx = gradtx.hypergradient_descent(optax.identity(), learning_rate=0.05, hyper_lr=beta,
                                    log_space=False)
  params = params32()
  state = tx.init(params)
  previous = None  # (θ_{t-1}, d_{t-1})
  for _ in range(4):
    g = jax.grad(loss)(params)
    alpha_before = float(state.current_learning_rate)
    updates, state = tx.update(g, state, params)
    if previous is not None:
      theta, d = previous
      along = lambda a, theta=theta, d=d: loss({k: theta[k] - a * d[k] for k in theta})
      hyper = float(jax.grad(along)(jnp.float32(alpha_before)))
      np.testing.assert_allclose(float(state.current_learning_rate) - alpha_before, -beta * hyper,
                                 rtol=1e-4)
    previous = params, g
    params = optax.apply_updates(params, updates)


def test_docstring_example_by_hand():
  tx = gradtx.hypergradient_descent(optax.identity(), learning_rate=0.1, hyper_lr=0.01,
                                    log_space=False)
  params = {"w": jnp.array([4.0])}
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(params, state, params)
    params = optax.apply_updates(params, updates)
  # α_1 = 0.1 (no previous direction); w_1 = 3.6; α_2 = 0.1 + 0.01 · 3.6 · 4.0
  np.testing.assert_allclose(state.current_learning_rate, 0.1 + 0.01 * 3.6 * 4.0, rtol=1e-6)
  np.testing.assert_allclose(params["w"], [3.6 - 0.244 * 3.6], rtol=1e-6)


# ----------------------------------------------------------------------------- meta-gradients

META_STEPS = 3
META = {
    # name: (gradtx factory of the learning rate, numpy reference of (lr, θ0), base lr)
    "eg_step_size-adam": (
        lambda lr: gradtx.eg_step_size(optax.scale_by_adam(), learning_rate=lr, gain_lr=0.05,
                                       scale_lr=0.05),
        lambda lr, theta0: np_eg_step_size(
            NpAdam(), learning_rate=lr, gain_lr=0.05, scale_lr=0.05, beta=0.9,
            gains="per_coordinate", scale="global", gain_range=(0.01, 100.0),
            scale_range=(0.1, 10.0), rule="egdd", steps=META_STEPS, theta0=theta0),
        0.05),
    "hypergradient-multiplicative-adam": (
        lambda lr: gradtx.hypergradient_descent(optax.scale_by_adam(), learning_rate=lr,
                                                hyper_lr=0.1, multiplicative=True),
        lambda lr, theta0: np_hypergradient(NpAdam(), learning_rate=lr, hyper_lr=0.1,
                                            multiplicative=True, steps=META_STEPS,
                                            theta0=theta0, log_space=True),
        0.05),
}


def np_loss_after(np_run, lr, theta0):
  """The loss after the numpy reference's unrolled steps from ``theta0`` (float64)."""
  theta = {k: v.astype(np.float64) for k, v in theta0.items()}
  for u, _ in np_run(lr, theta):
    theta = {k: theta[k] + u[k] for k in theta}
  return sum(0.5 * np.sum(CURVATURE[k] * (theta[k] - TARGET[k]) ** 2) for k in theta)


@pytest.mark.parametrize("name", list(META))
def test_meta_gradient_is_finite_and_matches_finite_differences(name):
  """∂L(θ_3)/∂θ_0 and ∂L(θ_3)/∂η through three unrolled steps (the first one's cosine is
  0, whose square root used to make these NaN), against central differences of the
  numpy reference in float64."""
  make_tx, np_run, lr = META[name]

  def unrolled(lr, theta0):
    tx = make_tx(lr)
    params, state = theta0, tx.init(theta0)
    for _ in range(META_STEPS):
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
    return loss(params)

  d_lr, d_theta = jax.jit(jax.grad(unrolled, argnums=(0, 1)))(jnp.float32(lr), params32())
  h = 1e-6
  theta0 = {k: v.astype(np.float64) for k, v in THETA0.items()}
  fd_theta = {}
  for k, v in theta0.items():
    fd_theta[k] = np.zeros(v.shape)
    for i in np.ndindex(v.shape):
      e = np.zeros(v.shape)
      e[i] = h
      fd_theta[k][i] = (np_loss_after(np_run, lr, {**theta0, k: v + e})
                        - np_loss_after(np_run, lr, {**theta0, k: v - e})) / (2 * h)
  fd_lr = (np_loss_after(np_run, lr + h, theta0) - np_loss_after(np_run, lr - h, theta0)) / (2 * h)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(d_theta)) and np.isfinite(d_lr)
  np.testing.assert_allclose(d_lr, fd_lr, rtol=2e-3)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, d_theta), fd_theta, rtol=2e-3,
                              atol=1e-4)


@pytest.mark.parametrize("rule", ["egdd", "su"])
def test_per_leaf_gains_keep_their_dtype_under_x64(rule):
  """float64 params: the per-leaf gains and scales stay float32 (a lax.scan carry must not
  change dtype; they became float64 after one step)."""
  tx = gradtx.eg_step_size(optax.identity(), learning_rate=0.1, gains="per_leaf",
                           scale="per_leaf", rule=rule)
  with jax.enable_x64(True):
    params = {"w": jnp.array([1.0, -2.0], jnp.float64)}

    def step(state, _):
      return tx.update(params, state, params)[1], None

    state, _ = jax.lax.scan(step, tx.init(params), length=2)
  assert state.gains["w"].dtype == jnp.float32
  assert state.grad_ema["w"].dtype == jnp.float64


# ----------------------------------------------------------------------------- errors


def egss(**kwargs):
  return gradtx.eg_step_size(optax.identity(), **{"learning_rate": 0.1, **kwargs})


@pytest.mark.parametrize("name", ["gain_range", "scale_range"])
@pytest.mark.parametrize("value", [(1.5, 2.0), (0.5, 0.9), (0.0, 2.0), (-1.0, 2.0),
                                   (0.5, float("inf"))])
def test_range_must_bracket_one(name, value):
  message = (f"{name} must satisfy 0 < low <= 1 <= high < inf (1 is the initial value), "
             f"got {value!r}")
  with pytest.raises(ValueError, match=re.escape(message)):
    egss(**{name: value})


@pytest.mark.parametrize("name", ["gain_range", "scale_range"])
@pytest.mark.parametrize("value", [0.5, (0.5,), (0.5, 1.0, 2.0), ("a", "b"), None])
def test_range_must_be_a_pair(name, value):
  with pytest.raises(TypeError, match=rf"{name} must be a pair \(low, high\), got "):
    egss(**{name: value})


@pytest.mark.parametrize("name,value,allowed", [
    ("rule", "adam", "'egdd', 'su'"),
    ("gains", "global", "'per_coordinate', 'per_leaf', 'none'"),
    ("scale", "per_coordinate", "'global', 'per_leaf', 'none'"),
])
def test_unknown_choice(name, value, allowed):
  with pytest.raises(ValueError, match=rf"{name} must be one of {allowed}, got '{value}'"):
    egss(**{name: value})


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan")])
def test_beta_in_unit_interval(beta):
  with pytest.raises(ValueError, match=rf"beta must be in \[0\.0, 1\.0\), got {beta}"):
    egss(beta=beta)


@pytest.mark.parametrize("name", ["learning_rate", "gain_lr", "scale_lr"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_eg_step_size_rates_positive(name, value):
  with pytest.raises(ValueError, match=rf"{name} must be a finite number > 0, got {value}"):
    egss(**{name: value})


@pytest.mark.parametrize("name", ["learning_rate", "hyper_lr"])
@pytest.mark.parametrize("value", [0.0, -0.5, float("inf")])
def test_hypergradient_rates_positive(name, value):
  kwargs = {"learning_rate": 0.1, "hyper_lr": 0.01, name: value}
  with pytest.raises(ValueError, match=rf"{name} must be a finite number > 0, got {value}"):
    gradtx.hypergradient_descent(optax.identity(), **kwargs)


def test_hypergradient_rejects_schedules_and_non_bool():
  with pytest.raises(TypeError, match=r"learning_rate must be a number, not a schedule"):
    gradtx.hypergradient_descent(optax.identity(), learning_rate=lambda c: 0.1, hyper_lr=0.01)
  with pytest.raises(TypeError, match=r"multiplicative must be a bool, got 1"):
    gradtx.hypergradient_descent(optax.identity(), learning_rate=0.1, hyper_lr=0.01,
                                 multiplicative=1)


# ----------------------------------------------------------------------------- NaN / inf


def nan_second_step(tx):
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  state = tx.init(params)
  _, state = tx.update(params, state, params)
  return tx.update({"w": jnp.array([np.nan, 1.0, 1.0])}, state, params)


@pytest.mark.parametrize("rule", ["egdd", "su"])
def test_eg_step_size_nan_gradient_is_visible_in_gains(rule):
  u, state = nan_second_step(egss(rule=rule))
  assert np.isnan(u["w"][0])
  assert np.isnan(state.gain_mean) and np.isnan(state.gain_min) and np.isnan(state.gain_max)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_first_step_nan_gradient_is_visible_in_lr_scale(bad):
  """On the first step the previous direction is 0 (cosine 0), yet a NaN/inf still shows."""
  tx = egss(gains="none")
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  _, state = tx.update({"w": jnp.array([bad, 1.0, 1.0])}, tx.init(params), params)
  assert np.isnan(state.lr_scale)


def test_eg_step_size_nan_gradient_is_visible_in_lr_scale():
  u, state = nan_second_step(egss(gains="none"))
  assert np.isnan(u["w"][0])
  assert np.isnan(state.lr_scale)


@pytest.mark.parametrize("log_space", [False, True])
def test_hypergradient_additive_nan_and_inf_are_visible(log_space):
  tx = gradtx.hypergradient_descent(optax.identity(), learning_rate=0.1, hyper_lr=0.01,
                                    log_space=log_space)
  u, state = nan_second_step(tx)
  assert np.isnan(state.current_learning_rate) and np.all(np.isnan(u["w"]))
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  _, state = tx.update(params, tx.init(params), params)
  _, state = tx.update({"w": jnp.array([np.inf, 1.0, 1.0])}, state, params)
  assert not np.isfinite(state.current_learning_rate)


def test_hypergradient_multiplicative_nan_is_visible():
  tx = gradtx.hypergradient_descent(optax.identity(), learning_rate=0.1, hyper_lr=0.01,
                                    multiplicative=True)
  _, state = nan_second_step(tx)
  assert np.isnan(state.current_learning_rate)
