"""Part ``zeroth_order``: optimising digits accuracy directly with ES, next to backprop."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradtx
from gradtx.tour._data import Dataset
from gradtx.tour._registry import TEST_ACC, Column, Context, PartResult, Row, number, part
from gradtx.tour._report import Figure, Panel, direction
from gradtx.tour._training import run_compiled

_SIGMA = 0.5  # ES smoothing scale (the weights of the linear classifier grow to O(1))
_ES_LR = 0.1
_BP_LR = 0.03
_TARGET = 0.9  # the test accuracy the "evals to 90%" column waits for
_MEZO_SIGMA = 1e-3  # MeZO's perturbation scale
_MEZO_LR = 0.03  # its SGD learning rate


@dataclasses.dataclass(frozen=True)
class _Sizes:
  steps: int
  population: int  # ES members per step (antithetic pairs: population / 2 noise draws)


def _sizes(quick: bool) -> _Sizes:
  return _Sizes(100, 20) if quick else _Sizes(400, 40)


_ZEROTH_ORDER_ABOUT = f"""
Su (kexue.fm/archives/7737): the zeroth-order gradient `E_ε[(f(θ + σε) − f(θ))/σ · ε]`
is the policy gradient of `E f(θ + σε)` with the Gaussian search distribution
`N(θ, σ²I)` as the policy (`∇_θ log N(θ + σε; θ, σ²I) = ε/σ`) and `f(θ)` as the baseline;
so an objective with no gradient at all, like the accuracy of an argmax classifier, can
be optimised directly. Setting: a linear classifier (64 → 10, 650 parameters) on the
digits, full-batch (every evaluation sees all training images), both runs with
`optax.adam`. ES: `gradtx.zeroth_order("es", sigma={_SIGMA:g}, num_samples=N,
shaping="centered_rank")` (mirrored pairs ±ε, OpenAI-ES fitness shaping) chained before
`adam({_ES_LR:g})`, on the training *error rate* `1 − mean(argmax = label)`: piecewise
constant, its gradient zero almost everywhere; N = {_sizes(True).population} (`--quick`)
or {_sizes(False).population}. Backprop: `adam({_BP_LR:g})` on the cross-entropy, the
usual differentiable surrogate. Both train as many steps ({_sizes(True).steps} with
`--quick`, else {_sizes(False).steps}). "train error" is the training error rate (the
0-1 loss ES optimises) for both rows. One "evaluation" is one pass over the
training set: N forward passes per ES step, one forward and backward pass per backprop
step (about three forwards' worth of arithmetic, counted as one). "evals to
{_TARGET:.0%}" is the first evaluation count at which the seed-mean test accuracy
reaches {_TARGET:g} (`-`: not reached).

The third row is ZO fine-tuning's in-place step, MeZO: `gradtx.zo_sgd_step` (one mirrored
pair a step, σ = {_MEZO_SIGMA:g}, SGD {_MEZO_LR:g}) on the cross-entropy, at the ES row's
budget of evaluations (2 a step). "step temp / materialised" is the compiled memory
(`memory_analysis()` temporaries) of that step jitted with the params donated, over the
same step built from the materialised estimate (`es_gradient(num_samples=2)` then SGD).
"""


def _apply(params: Any, x: jax.Array) -> jax.Array:
  return x @ params["w"] + params["b"]


def _accuracy(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(_apply(params, x), -1) == y)


def _cross_entropy(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(_apply(params, x), y).mean()


def _program(data: Dataset, steps: int, method: str, population: int) -> Callable:
  """``(keys [R], w0 [R, 64, 10]) -> (final train accuracy [R], test accuracy [R, steps])``."""
  x, y = data.x_train, data.y_train

  def one(key, w0):
    params = {"w": w0, "b": jnp.zeros(10, jnp.float32)}
    if method == "es":  # the key differs per run, so the transformation is built inside vmap
      tx = optax.chain(
          gradtx.zeroth_order("es", key=key, sigma=_SIGMA, num_samples=population,
                              shaping="centered_rank"),
          optax.adam(_ES_LR))
    else:
      tx = optax.adam(_BP_LR)

    def error(p):
      return 1.0 - _accuracy(p, x, y)

    def step(carry, _):
      params, state = carry
      if method == "es":  # the incoming updates only supply the structure: zeros do
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, state = tx.update(zeros, state, params, loss_fn=error)
      else:
        updates, state = tx.update(jax.grad(_cross_entropy)(params, x, y), state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), _accuracy(params, data.x_test, data.y_test)

    (params, _), curve = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return _accuracy(params, x, y), curve

  return jax.vmap(one)


def _mezo_program(data: Dataset, steps: int) -> Callable:
  """``(keys [R], w0 [R, 64, 10]) -> (final train accuracy [R], test accuracy [R, steps],
  final cross-entropy [R])`` for MeZO's in-place step."""
  x, y = data.x_train, data.y_train

  def one(key, w0):
    def step(params, step_key):
      params, _ = gradtx.zo_sgd_step(lambda p: _cross_entropy(p, x, y), params, step_key,
                                     sigma=_MEZO_SIGMA, learning_rate=_MEZO_LR)
      return params, _accuracy(params, data.x_test, data.y_test)

    params = {"w": w0, "b": jnp.zeros(10, jnp.float32)}
    params, curve = jax.lax.scan(step, params, jax.random.split(key, steps))
    return _accuracy(params, x, y), curve, _cross_entropy(params, x, y)

  return jax.vmap(one)


def _mezo_memory(data: Dataset) -> dict[str, float]:
  """Compiled temporaries of one donated step: in place, and materialised."""
  x, y = data.x_train, data.y_train
  loss = functools.partial(_cross_entropy, x=x, y=y)

  def in_place(params, key):
    return gradtx.zo_sgd_step(loss, params, key, sigma=_MEZO_SIGMA, learning_rate=_MEZO_LR)

  def materialised(params, key):
    g = gradtx.es_gradient(loss, params, key, sigma=_MEZO_SIGMA, num_samples=2)
    return jax.tree.map(lambda p, d: p - _MEZO_LR * d, params, g), loss(params)

  params = {"w": jax.ShapeDtypeStruct((64, 10), jnp.float32),
            "b": jax.ShapeDtypeStruct((10,), jnp.float32)}
  def temp_bytes(fn: Callable[..., Any]) -> int:
    compiled = jax.jit(fn, donate_argnums=0).lower(params, jax.random.key(0)).compile()
    analysis = compiled.memory_analysis()
    assert analysis is not None, "this backend reports no compiled memory"
    return int(analysis.temp_size_in_bytes)

  temp = {"in_place": temp_bytes(in_place), "materialised": temp_bytes(materialised)}
  return {"step_temp_ratio": temp["in_place"] / temp["materialised"],
          "step_temp_bytes": float(temp["in_place"])}


def _evals_to(curve: np.ndarray, per_step: int, target: float) -> int | None:
  hit = np.flatnonzero(curve >= target)
  return int((hit[0] + 1) * per_step) if hit.size else None


@part("zeroth_order", "Zeroth-order optimisation: digits accuracy without gradients",
      _ZEROTH_ORDER_ABOUT)
def _zeroth_order(ctx: Context) -> PartResult:
  cfg, data = ctx.config, ctx.data
  sizes = _sizes(cfg.quick)
  keys = jax.random.split(jax.random.key(11), cfg.seeds)  # the ES noise of each run
  w0 = 0.01 * np.random.default_rng(11).standard_normal((cfg.seeds, 64, 10)).astype(np.float32)
  methods = {  # name: (method, evaluations per step, setting)
      "zeroth_order('es') + adam": (
          "es", sizes.population,
          f"accuracy (argmax), N={sizes.population} antithetic, σ={_SIGMA:g}, centered ranks"),
      "backprop + adam": ("backprop", 1, "cross-entropy, exact gradient"),
      "zo_sgd_step (MeZO, in place)": (
          "mezo", 2, f"cross-entropy, one pair ±σz, σ={_MEZO_SIGMA:g}, sgd({_MEZO_LR:g})"),
  }
  mezo_steps = sizes.steps * sizes.population // 2  # the ES row's evaluations
  rows, curves = [], {}
  for name in ctx.track(list(methods)):
    method, per_step, setting = methods[name]
    extra = {}
    if method == "mezo":
      train_acc, curve, cross_entropy = run_compiled(_mezo_program(data, mezo_steps), keys, w0)
      extra = {"cross_entropy": float(np.mean(cross_entropy)), **_mezo_memory(data)}
    else:
      train_acc, curve = run_compiled(_program(data, sizes.steps, method, sizes.population),
                                      keys, w0)
    train_acc, curve = np.asarray(train_acc, np.float64), np.asarray(curve, np.float64)
    mean_curve = curve.mean(0)
    reached = _evals_to(mean_curve, per_step, _TARGET)
    rows.append(Row(name, f"{setting}, linear 64→10", {
        "train_error": float(1 - train_acc.mean()), "test_acc": float(curve[:, -1].mean()),
        "test_acc_std": float(curve[:, -1].std()), "evaluations": len(mean_curve) * per_step,
        "evals_to_target": reached, **extra}))
    curves[name] = (mean_curve, per_step)

  figure = Figure("zeroth_order", f"Digits, linear classifier: test accuracy (mean over "
                  f"{cfg.seeds} seeds); ES optimises the accuracy itself", [
      Panel("test accuracy vs step", {n: c for n, (c, _) in curves.items()},
            ylabel="test accuracy", logy=False),
      Panel("test accuracy vs evaluations",
            {n: (per_step * np.arange(1, len(c) + 1), c) for n, (c, per_step) in curves.items()},
            ylabel="test accuracy", logy=False, logx=True,
            xlabel="evaluations (passes over the training set, log scale)"),
  ])
  es, bp, mezo = (r.values for r in rows)
  findings = [
      f"- ES on the argmax accuracy alone (no gradient anywhere) reaches test accuracy "
      f"{es['test_acc']:.3f} (chance 0.1) after {sizes.steps} steps, "
      f"{direction(number(es, 'test_acc'), number(bp, 'test_acc'))} than backprop on the "
      f"cross-entropy ({bp['test_acc']:.3f}). Training error: ES {es['train_error']:.3f}, backprop "
      f"{bp['train_error']:.3f}.",
      f"- The price is evaluations: ES spends {sizes.population} per step, "
      f"{es['evaluations']} in all against {bp['evaluations']}; evaluations to "
      f"{_TARGET:.0%} test accuracy: ES {es['evals_to_target'] or 'not reached'}, backprop "
      f"{bp['evals_to_target'] or 'not reached'}.",
      f"- MeZO's in-place step (`zo_sgd_step`, donated params) on the cross-entropy, at the "
      f"ES row's {mezo['evaluations']} evaluations: test accuracy {mezo['test_acc']:.3f}, "
      f"{direction(number(mezo, 'test_acc'), number(es, 'test_acc'), 'below', 'above', 'equal to')}"
      f" ES on the accuracy; cross-entropy {mezo['cross_entropy']:.3f}. Its compiled step needs "
      f"{mezo['step_temp_ratio']:.2f}× the temporaries of the materialised one-pair step "
      f"({float(mezo['step_temp_bytes'] or 0) / 1024:.1f} KiB): the noise is never stored, "
      f"so what is left is one perturbed copy of the params and the forward pass.",
      "- 650 parameters is a small search space; the estimator's variance grows with the "
      "dimension, so ES is best kept to few parameters (with `optax.partition` and "
      "`gradtx.fill_masked`, next to true gradients for the rest: see "
      "`colabs/policy_gradient_and_zeroth_order.ipynb`).",
  ]
  columns = [Column("train_error", "train error", ".3f"), TEST_ACC,
             Column("evaluations", "evaluations", "d"),
             Column("evals_to_target", f"evals to {_TARGET:.0%}", "d"),
             Column("cross_entropy", "cross-entropy", ".3f"),
             Column("step_temp_ratio", "step temp / materialised", ".2f")]
  return PartResult(columns, rows, [figure], findings)
