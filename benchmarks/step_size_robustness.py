r"""Does a learned step size make the initial learning rate matter less? Digits, MLP and CNN.

Amid, Anil, Fifty & Warmuth (arXiv:2202.00145). A step-size adapter starts from the
learning rate it is given and corrects it from the hypergradient ``-g_t · d_{t-1}``
(Baydin et al.'s hypergradient descent, additively) or from sign agreement between
successive gradients (EGDD, multiplicatively, as ``gradtx.eg_step_size``). If it works, the
final loss after a fixed budget should depend much less on the initial rate than a
fixed-rate optimizer's does. This script measures it on ``load_digits`` (the tour's
standardised 70/30 split: 1257 train, 540 test) for two flax linen models:

* ``mlp``: the tour's MLP (64 → 4 × 64 ReLU → 10, 17k parameters);
* ``cnn``: two 3×3 stride-2 convolutions (8 and 16 channels, ReLU) and a linear head
  (1.9k parameters). Each convolution is a ``Dense`` layer applied to the 3×3 patches
  (the same function as ``nn.Conv``): vmapped over runs it is a batched matmul, while
  ``lax.conv`` with per-run kernels is far slower on CPU.

Initial parameters: flax's default initialisation (LeCun-normal kernels, zero biases),
drawn with numpy per seed.

Training: minibatches of 128 drawn with replacement (the same index sequence for every
method and learning rate of a seed), ``steps`` updates (200 ≈ 20 epochs; 50 with
``--quick``), from the seed's initial parameters. Reported per initial learning rate η0
(13 values log-spaced over [1e-4, 1], 3 per decade; 5 with ``--quick``): the final
full-training-set cross-entropy and the test accuracy, both averaged over seeds (5; 1
with ``--quick``). A run whose loss is not finite counts as diverged (no value).

Methods (all from η0):

* ``adam``: ``optax.adam(η0)``, the fixed-rate baseline; ``sgdm``:
  ``optax.sgd(η0, momentum=0.9)``, a second fixed-rate reference;
* ``adam_hd``: ``gradtx.hypergradient_descent(optax.scale_by_adam(), learning_rate=η0,
  hyper_lr=1e-7, log_space=False)`` (the paper's additive rule and its Adam-HD β);
* ``adam_hd_log``: the log-space cosine rule, ``multiplicative=True, hyper_lr=0.02``
  (the rate moves by at most e^{±0.02} per step, whatever the gradient scale);
* ``adam_eg``: ``gradtx.eg_step_size(optax.scale_by_adam(), learning_rate=η0)`` with its
  defaults (EGDD: per-coordinate gains, global scale, ``gain_lr=0.01``,
  ``scale_lr=0.001``); ``adam_eg_per_leaf``: the same with ``gains="per_leaf",
  scale="per_leaf"``;
* ``adam_eg_fast``: ``gain_lr=0.03, scale_lr=0.02, scale_range=(0.01, 100)``;
  ``adam_eg_faster``: ``gain_lr=0.05, scale_lr=0.05, scale_range=(1e-3, 1e3)`` (a 100×
  correction is within ``e^{0.1 T}`` at T = 200); ``adam_eg_warm``: the latter with a
  warm start ``initial_scale=0.01``;
* optax.contrib's parameter-free optimizers, η0 in the role their API gives an initial
  rate: ``prodigy(estim_lr0=η0)``, ``dog(init_step=("learning_rate", η0))``,
  ``mechanize(optax.adam(η0))`` and ``schedule_free_adamw(η0)`` (scored at
  ``schedule_free_eval_params``).

All methods train side by side in one program per model (``lax.scan`` over steps,
``vmap`` over learning rates and seeds, one ``vmap``-ed gradient for the stacked
parameters of every method). Every optimizer but the per-leaf one sees a single flat
parameter vector (``jax.flatten_util.ravel_pytree``): the same mathematics (Adam, the
global dot product and cosine, per-coordinate gains do not see leaf boundaries), far
fewer XLA ops to compile; the per-leaf one sees the parameter tree.

What the defaults can do at all: in T steps a gain grows by at most ``e^{0.01 T}`` and
the scale by at most ``e^{0.001 T}``, so EGDD can raise a rate by at most
``e^{0.011 T}`` (9.0× at T = 200) and lower it by as much; a rate 100× too small cannot
be fully corrected within the budget.

Target (set before the run; reported, not tuned for): with ``adam_eg``, every initial
rate in ``[η*/100, 10 η*]`` ends within 10% of ``L*``, where ``L*`` is the best
fixed-rate Adam final loss over the grid and ``η*`` its rate. The effective final rate
(``η0 · s · mean gain`` for EG, ``α_T`` for HD, prodigy's ``estim_lr``) shows how far each
adapter moved. Ours vs theirs: the most robust of our methods against the most robust of
optax.contrib's, by three measures (rates within 10% of L*; the worst loss / L* over
[η*/100, 10η*]; rates whose test accuracy is within 1 point of the best Adam's).
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

import gradtx
from gradtx.tour import MLP, load_data

NAME = "step_size_robustness"
BATCH = 128
HYPER_LR = 1e-7
TOLERANCE = 0.10  # within 10% of the best fixed-rate Adam loss
LOW_FACTOR, HIGH_FACTOR = 100.0, 10.0  # the target range [η*/100, 10 η*]
TARGET_METHOD = "adam_eg"
# Quick runs are compile-bound: XLA's backend optimisations cost more than they save.
QUICK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _patches(x: jax.Array) -> jax.Array:
  """``[..., H, W, C] -> [..., H/2, W/2, 9 C]``: 3×3 neighbourhoods at stride 2, zero-padded."""
  h, w = x.shape[-3:-1]
  padded = jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)])
  return jnp.concatenate([padded[..., i:i + h:2, j:j + w:2, :] for i in range(3)
                          for j in range(3)], axis=-1)


class CNN(nn.Module):
  """8×8 image → conv 3×3/2 (8) → conv 3×3/2 (16) → ``head`` (10), ReLU in between.

  A convolution is a ``Dense`` layer on the 3×3 patches (``conv_0``, ``conv_1``), the same
  function as ``nn.Conv(features, (3, 3), strides=2, padding=1)``.
  """

  channels: tuple[int, ...] = (8, 16)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[:-1] + (8, 8, 1))
    for i, channels in enumerate(self.channels):
      x = nn.relu(nn.Dense(channels, name=f"conv_{i}")(_patches(x)))
    return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[:-3] + (-1,)))


MODELS = {"mlp": MLP(), "cnn": CNN()}


def _fixed_lr(lr, state):
  del state
  return lr


def _hd_lr(lr, state):
  del lr
  return optax.tree_utils.tree_get(state, "current_learning_rate")


def _eg_lr(lr, state):
  scales = jax.tree.leaves(optax.tree_utils.tree_get(state, "lr_scale"))
  return lr * jnp.mean(jnp.stack(scales)) * optax.tree_utils.tree_get(state, "gain_mean")


def _nan_lr(lr, state):
  del state
  return jnp.nan * lr


def _prodigy_lr(lr, state):
  del lr
  return optax.tree_utils.tree_get(state, "estim_lr")


class Method(NamedTuple):
  key: str
  label: str
  make: Callable[[Any], optax.GradientTransformation]
  effective_lr: Callable[[Any, Any], jax.Array]
  flat: bool  # the optimizer sees one raveled vector (exactly the same mathematics)
  eval_params: Callable[[Any, Any], Any] | None = None  # (state, params) -> params to score


# eg_step_size with a horizon long enough to cover a 100x error in T = 200 steps: gains
# can move e^{0.03 T} = 403x, the scale e^{0.02 T} = 55x within a range of 1e4.
EG_FAST = dict(gain_lr=0.03, scale_lr=0.02, scale_range=(0.01, 100.0))
EG_FASTER = dict(gain_lr=0.05, scale_lr=0.05, scale_range=(1e-3, 1e3))
HD_LOG_BETA = 0.02  # log-space cosine rule: α moves by at most e^{±0.02} per step

METHODS = (
    Method("adam", "Adam (fixed η0)", optax.adam, _fixed_lr, True),
    Method("sgdm", "SGD-momentum 0.9 (fixed η0)",
           lambda lr: optax.sgd(lr, momentum=0.9), _fixed_lr, True),
    Method("adam_hd", f"Adam + hypergradient_descent (additive, β={HYPER_LR:g})",
           lambda lr: gradtx.hypergradient_descent(optax.scale_by_adam(), learning_rate=lr,
                                                   hyper_lr=HYPER_LR, log_space=False),
           _hd_lr, True),
    Method("adam_hd_log", f"Adam + hypergradient_descent (log space, cosine, β={HD_LOG_BETA:g})",
           lambda lr: gradtx.hypergradient_descent(optax.scale_by_adam(), learning_rate=lr,
                                                   hyper_lr=HD_LOG_BETA, multiplicative=True),
           _hd_lr, True),
    Method("adam_eg", "Adam + eg_step_size (defaults)",
           lambda lr: gradtx.eg_step_size(optax.scale_by_adam(), learning_rate=lr), _eg_lr,
           True),
    Method("adam_eg_per_leaf", "Adam + eg_step_size (per-leaf gains, scale)",
           lambda lr: gradtx.eg_step_size(optax.scale_by_adam(), learning_rate=lr,
                                          gains="per_leaf", scale="per_leaf"), _eg_lr, False),
    Method("adam_eg_fast", "Adam + eg_step_size (gain_lr 0.03, scale_lr 0.02, scale 1e-2..1e2)",
           lambda lr: gradtx.eg_step_size(optax.scale_by_adam(), learning_rate=lr, **EG_FAST),
           _eg_lr, True),
    Method("adam_eg_faster", "Adam + eg_step_size (gain_lr 0.05, scale_lr 0.05, scale 1e-3..1e3)",
           lambda lr: gradtx.eg_step_size(optax.scale_by_adam(), learning_rate=lr,
                                          **EG_FASTER), _eg_lr, True),
    Method("adam_eg_warm", "Adam + eg_step_size (as above, warm start initial_scale 0.01)",
           lambda lr: gradtx.eg_step_size(optax.scale_by_adam(), learning_rate=lr,
                                          initial_scale=0.01, **EG_FASTER), _eg_lr, True),
    Method("prodigy", "optax.contrib.prodigy (estim_lr0 = η0)",
           lambda lr: optax.contrib.prodigy(estim_lr0=lr), _prodigy_lr, True),
    Method("dog", "optax.contrib.dog (init_step = η0)",
           lambda lr: optax.contrib.dog(init_step=("learning_rate", lr)), _nan_lr, True),
    Method("mechanize", "optax.contrib.mechanize(adam(η0))",
           lambda lr: optax.contrib.mechanize(optax.adam(lr)), _nan_lr, True),
    Method("schedule_free", "optax.contrib.schedule_free_adamw(η0), eval params",
           lambda lr: optax.contrib.schedule_free_adamw(lr), _fixed_lr, True,
           optax.contrib.schedule_free_eval_params),
)
OURS = ("adam_hd", "adam_hd_log", "adam_eg", "adam_eg_per_leaf", "adam_eg_fast",
        "adam_eg_faster", "adam_eg_warm")
THEIRS = ("prodigy", "dog", "mechanize", "schedule_free")


def _cross_entropy(model, params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()


def make_model_fn(model: nn.Module) -> Callable:
  """``(lrs [L], params0 [S, ...], batches [S, T, B], data) -> {method: results [L, S]}``.

  All methods train side by side in one ``lax.scan``: their parameters are stacked flat
  vectors, and one ``vmap``-ed gradient serves them all, so the model is compiled once
  per program, not once per method. Each optimizer sees the flat vector, or for a
  per-leaf method (``flat=False``) the parameter tree.
  """

  def one_run(lr, params0, batches, data):
    start, unravel = ravel_pytree(params0)
    txs = [method.make(lr) for method in METHODS]
    view = lambda method, flat: flat if method.flat else unravel(flat)
    unview = lambda method, tree: tree if method.flat else ravel_pytree(tree)[0]
    loss_fn = lambda flat, x, y: _cross_entropy(model, unravel(flat), x, y)
    states = tuple(tx.init(view(m, start)) for m, tx in zip(METHODS, txs, strict=True))
    params = jnp.stack([start] * len(METHODS))

    def step(carry, batch):
      params, states = carry
      grads = jax.vmap(jax.grad(loss_fn), in_axes=(0, None, None))(
          params, data.x_train[batch], data.y_train[batch])
      new_params, new_states = [], []
      for i, (method, tx) in enumerate(zip(METHODS, txs, strict=True)):
        updates, state = tx.update(view(method, grads[i]), states[i], view(method, params[i]))
        new_params.append(params[i] + unview(method, updates))
        new_states.append(state)
      return (jnp.stack(new_params), tuple(new_states)), None

    (params, states), _ = jax.lax.scan(step, (params, states), batches)

    def evaluate(flat):
      final = unravel(flat)
      test_acc = jnp.mean(jnp.argmax(model.apply(final, data.x_test), -1) == data.y_test)
      return _cross_entropy(model, final, data.x_train, data.y_train), test_acc

    params = jnp.stack([
        m.eval_params(states[i], params[i]) if m.eval_params else params[i]
        for i, m in enumerate(METHODS)])
    losses, accs = jax.vmap(evaluate)(params)
    return {method.key: {"loss": losses[i], "test_acc": accs[i],
                         "effective_lr": method.effective_lr(lr, states[i])}
            for i, method in enumerate(METHODS)}

  over_seeds = jax.vmap(one_run, in_axes=(None, 0, 0, None))
  return jax.vmap(over_seeds, in_axes=(0, None, None, None))


def init_params(model: nn.Module, seeds: list[int]) -> Any:
  """Flax's default initialisation (LeCun-normal kernels, zero biases), drawn with numpy.

  Stacked over seeds. numpy rather than ``model.init``: compiling the PRNG code costs more
  than the rest of a quick run's setup.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64))))

  def draw(rng, path, leaf):
    if path[-1].key == "bias":
      return np.zeros(leaf.shape, np.float32)
    # variance_scaling(1, "fan_in", "truncated_normal"): N(0, 1) truncated to [-2, 2],
    # rescaled to unit variance, times 1/sqrt(fan_in).
    z = rng.standard_normal(leaf.shape)
    while np.any(bad := np.abs(z) > 2):
      z[bad] = rng.standard_normal(int(bad.sum()))
    return (z / 0.87962566103423978 / np.sqrt(leaf.shape[0])).astype(np.float32)

  per_seed = []
  for seed in seeds:
    rng = np.random.default_rng(seed)
    per_seed.append(jax.tree_util.tree_map_with_path(functools.partial(draw, rng), shapes))
  return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *per_seed)


def _none_if_nan(values):
  return [None if not np.isfinite(v) else float(v) for v in np.asarray(values).ravel()]


def _finite_mean(per_seed: np.ndarray) -> np.ndarray:
  """Mean over seeds (last axis); NaN when any seed diverged."""
  per_seed = np.where(np.isfinite(per_seed), per_seed, np.nan)
  return per_seed.mean(axis=-1)


def _contiguous(ok: np.ndarray, around: int) -> tuple[int, int] | None:
  if around < 0 or not ok[around]:
    return None
  lo = hi = around
  while lo > 0 and ok[lo - 1]:
    lo -= 1
  while hi < ok.size - 1 and ok[hi + 1]:
    hi += 1
  return lo, hi


def analyse(lrs: np.ndarray, loss: np.ndarray, acc: np.ndarray, best_loss: float,
            best_lr: float) -> dict:
  """Where a method's mean final loss is within TOLERANCE of the best fixed-rate Adam."""
  threshold = (1 + TOLERANCE) * best_loss
  ok = np.isfinite(loss) & (np.nan_to_num(loss, nan=np.inf) <= threshold)
  own_best = int(np.nanargmin(loss)) if np.any(np.isfinite(loss)) else -1
  run = _contiguous(ok, own_best)
  low, high = best_lr / LOW_FACTOR, best_lr * HIGH_FACTOR
  in_range = (lrs >= low * (1 - 1e-6)) & (lrs <= high * (1 + 1e-6))
  ratios = np.where(np.isfinite(loss), loss / best_loss, np.inf)[in_range]
  covered = bool(lrs.min() <= low * (1 + 1e-6) and lrs.max() >= high * (1 - 1e-6))
  return {
      "threshold": float(threshold),
      "ok": ok.tolist(),
      "range": None if run is None else {
          "low": float(lrs[run[0]]), "high": float(lrs[run[1]]),
          "decades": float(np.log10(lrs[run[1]] / lrs[run[0]])),
          "num_rates": int(run[1] - run[0] + 1)},
      "target_range": {"low": float(low), "high": float(high), "covered_by_grid": covered,
                       "num_rates": int(in_range.sum())},
      "worst_ratio_in_target_range": (None if not np.all(np.isfinite(ratios))
                                      else float(ratios.max())),
      "diverged_in_target_range": bool(not np.all(np.isfinite(ratios))),
      "worst_test_acc_in_target_range": (None if not np.all(np.isfinite(ratios))
                                         else float(acc[in_range].min())),
      "target_met": bool(covered and np.all(ok[in_range])),
  }


def simulate(models: list[str], lrs: np.ndarray, seeds: list[int], steps: int, data,
             compiler_options: dict) -> dict[str, dict]:
  """Every model's program, traced here and compiled and run in one thread per model.

  XLA compiles and runs without the GIL, so the two models use both cores.
  """
  num_train = data.x_train.shape[0]
  batches = np.stack([np.random.default_rng(s).integers(0, num_train, (steps, BATCH))
                      for s in seeds]).astype(np.int32)
  lrs32 = jnp.asarray(lrs, jnp.float32)

  def compile_and_run(program, args):
    return jax.device_get(program.compile()(*args))

  with tqdm(total=len(models), desc=NAME, unit="model") as progress:
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
      futures = {}
      for name in models:  # tracing holds the GIL; the previous model compiles meanwhile
        args = (lrs32, init_params(MODELS[name], seeds), batches, data)
        fn = jax.jit(make_model_fn(MODELS[name]), compiler_options=compiler_options)
        futures[name] = pool.submit(compile_and_run, fn.lower(*args), args)
      for _ in concurrent.futures.as_completed(futures.values()):
        progress.update()
  return {name: future.result() for name, future in futures.items()}


def summarise(model_name: str, lrs: np.ndarray, out: dict) -> list[dict]:
  adam_loss = _finite_mean(np.asarray(out["adam"]["loss"], np.float64))
  best_index = int(np.nanargmin(adam_loss))
  best_loss, best_lr = float(adam_loss[best_index]), float(lrs[best_index])
  rows = []
  for method in METHODS:
    res = {k: np.asarray(v, np.float64) for k, v in out[method.key].items()}
    loss = _finite_mean(res["loss"])
    acc = np.where(np.isfinite(loss), res["test_acc"].mean(axis=-1), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
      eff = np.where(np.isfinite(loss), np.exp(np.log(res["effective_lr"]).mean(axis=-1)),
                     np.nan)
    own = int(np.nanargmin(loss)) if np.any(np.isfinite(loss)) else None
    rows.append({
        "model": model_name, "method": method.key, "label": method.label,
        "lrs": lrs.tolist(), "final_loss": _none_if_nan(loss),
        "final_loss_per_seed": [_none_if_nan(r) for r in res["loss"]],
        "test_acc": _none_if_nan(acc),
        "effective_lr": _none_if_nan(eff),
        "best": None if own is None else {"lr": float(lrs[own]), "final_loss": float(loss[own]),
                                          "test_acc": float(acc[own])},
        "adam_best": {"lr": best_lr, "final_loss": best_loss},
        **analyse(lrs, loss, acc, best_loss, best_lr),
    })
  return rows


def _fmt_range(r):
  if r is None:
    return "none"
  return f"{r['low']:.2g} – {r['high']:.2g} ({r['decades']:.2g} dec.)"


def _fmt_loss(x):
  return "div." if x is None else f"{x:.3g}"


def plot(rows, models, out_dir):
  plt = _common.pyplot()
  fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 9), squeeze=False)
  styles = {"adam": ("tab:gray", "o-"), "sgdm": ("tab:brown", "v:"),
            "adam_hd": ("tab:blue", "s--"), "adam_hd_log": ("tab:cyan", "s-"),
            "adam_eg": ("tab:orange", "D-"), "adam_eg_per_leaf": ("tab:green", "^-"),
            "adam_eg_fast": ("tab:red", "D-"), "adam_eg_faster": ("darkred", "d--"),
            "adam_eg_warm": ("gold", "o-"),
            "prodigy": ("tab:purple", "x:"), "dog": ("tab:pink", "+:"),
            "mechanize": ("tab:olive", "*:"),
            "schedule_free": ("black", "P:")}
  for col, model_name in enumerate(models):
    mine = [r for r in rows if r["model"] == model_name]
    best = mine[0]["adam_best"]
    ax_loss, ax_lr = axes[0, col], axes[1, col]
    for r in mine:
      color, fmt = styles[r["method"]]
      lrs = np.asarray(r["lrs"])
      loss = np.asarray([np.nan if v is None else v for v in r["final_loss"]])
      eff = np.asarray([np.nan if v is None else v for v in r["effective_lr"]])
      ax_loss.plot(lrs, loss, fmt, color=color, label=r["label"], ms=4)
      if r["method"] not in ("adam", "sgdm", "schedule_free") and np.any(np.isfinite(eff)):
        ax_lr.plot(lrs, eff, fmt, color=color, label=r["label"], ms=4)
    low, high = best["lr"] / LOW_FACTOR, best["lr"] * HIGH_FACTOR
    for ax in (ax_loss, ax_lr):
      ax.axvspan(low, high, color="tab:orange", alpha=0.08, lw=0)
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("initial learning rate η0")
    ax_loss.axhline((1 + TOLERANCE) * best["final_loss"], color="black", lw=0.8, ls="--",
                    label=f"1.1 × best fixed-rate Adam ({best['final_loss']:.3g})")
    ax_loss.set_ylabel("final training loss (mean over seeds)")
    ax_loss.set_title(f"{model_name}: final loss vs initial rate (shaded: [η*/100, 10η*])")
    ax_loss.legend(fontsize=7)
    ax_lr.plot(lrs, lrs, color="tab:gray", lw=0.8, ls=":", label="η0 (no adaptation)")
    ax_lr.set_ylabel("effective final rate (geo. mean over seeds)")
    ax_lr.set_title(f"{model_name}: where the adapters moved the rate")
    ax_lr.legend(fontsize=7)
  fig.suptitle("Learned step sizes on digits: sensitivity to the initial learning rate")
  _common.save_figure(fig, out_dir, NAME)


ACC_POINTS = 0.01  # "as good": test accuracy within 1 point of the best fixed-rate Adam's


def _measures(row: dict, best_acc: float) -> dict:
  """Three robustness measures over the grid / the target range [η*/100, 10η*]."""
  acc = np.asarray([np.nan if v is None else v for v in row["test_acc"]])
  worst = row["worst_ratio_in_target_range"]
  return {"within_10pct": int(np.sum(row["ok"])),
          "worst_ratio": np.inf if worst is None else worst,
          "acc_rates": int(np.sum(np.nan_to_num(acc, nan=0.0) >= best_acc - ACC_POINTS))}


def _ours_vs_theirs(rows: list[dict], model_name: str) -> dict:
  """Our best method against optax.contrib's best, by each measure separately."""
  mine = {r["method"]: r for r in rows if r["model"] == model_name}
  adam = mine["adam"]
  best_acc = adam["test_acc"][int(np.argmin(
      [np.inf if v is None else v for v in adam["final_loss"]]))]
  m = {k: _measures(mine[k], best_acc) for k in OURS + THEIRS}
  verdicts, parts = {}, []
  for measure, better, text in (
      ("within_10pct", max, "rates within 10% of L*"),
      ("worst_ratio", min, "worst loss / L* in [η*/100, 10η*]"),
      ("acc_rates", max, f"rates with test acc ≥ Adam's best − {ACC_POINTS:.0%}")):
    ours = better(OURS, key=lambda k, measure=measure: m[k][measure])
    theirs = better(THEIRS, key=lambda k, measure=measure: m[k][measure])
    a, b = m[ours][measure], m[theirs][measure]
    at_least = a >= b if better is max else a <= b
    verdicts[measure] = {"ours": ours, "theirs": theirs, "ours_value": float(a),
                         "theirs_value": float(b), "at_least_as_robust": bool(at_least)}
    fmt = (lambda v: f"{v:.3g}") if measure == "worst_ratio" else (lambda v: f"{int(v)}")
    parts.append(f"{text}: ours {ours} {fmt(a)} vs theirs {theirs} {fmt(b)} "
                 f"({'ours at least as robust' if at_least else 'theirs more robust'})")
  line = f"- **{model_name}**: " + "; ".join(parts) + "."
  return {"model": model_name, "measures": verdicts, "line": line}


def main():
  args = _common.parse_args(__doc__.splitlines()[0])
  quick = args.quick
  steps = 50 if quick else 200
  lrs = np.logspace(-4, 0, 5 if quick else 13)
  seeds = [0] if quick else [0, 1, 2, 3, 4]
  compiler_options = QUICK_COMPILER_OPTIONS if quick else {}
  data = load_data()
  models = list(MODELS)
  results = simulate(models, lrs, seeds, steps, data, compiler_options)
  rows = [row for name in models for row in summarise(name, lrs, results[name])]

  table = _common.markdown_table(
      ["model", "method", "best η0", "its final loss", "its test acc",
       "η0 within 10% of L* (contiguous)", "worst loss / L* in [η*/100, 10η*]",
       "worst test acc there", "target met"],
      [[r["model"], r["label"], f"{r['best']['lr']:.2g}" if r["best"] else "—",
        f"{r['best']['final_loss']:.3g}" if r["best"] else "—",
        f"{r['best']['test_acc']:.3f}" if r["best"] else "—", _fmt_range(r["range"]),
        ("diverged" if r["diverged_in_target_range"]
         else f"{r['worst_ratio_in_target_range']:.3g}"),
        ("—" if r["worst_test_acc_in_target_range"] is None
         else f"{r['worst_test_acc_in_target_range']:.3f}"),
        "yes" if r["target_met"] else "no"] for r in rows])
  per_lr_rows = []
  for model_name in models:
    mine = {r["method"]: r for r in rows if r["model"] == model_name}
    for i, lr in enumerate(lrs):
      per_lr_rows.append({"model": model_name, "lr": float(lr),
                          **{k: mine[k]["final_loss"][i] for k in mine}})
  per_lr_table = _common.markdown_table(
      ["model", "η0"] + [m.key for m in METHODS],
      [[r["model"], f"{r['lr']:.2g}"] + [_fmt_loss(r[m.key]) for m in METHODS]
       for r in per_lr_rows])

  verdicts = []
  for model_name in models:
    target = next(r for r in rows if r["model"] == model_name and r["method"] == TARGET_METHOD)
    adam = next(r for r in rows if r["model"] == model_name and r["method"] == "adam")
    best = target["adam_best"]
    tr = target["target_range"]
    coverage = "" if tr["covered_by_grid"] else " (the grid does not cover all of it)"
    verdicts.append(
        f"- **{model_name}**: target **{'met' if target['target_met'] else 'not met'}**. "
        f"L* = {best['final_loss']:.3g} at η* = {best['lr']:.2g} (10% of L* is "
        f"{TOLERANCE * best['final_loss']:.2g} in absolute terms); required range "
        f"[{tr['low']:.2g}, {tr['high']:.2g}]{coverage}. Rates within 10% of L*: "
        f"adam_eg {_fmt_range(target['range'])}; fixed-rate Adam {_fmt_range(adam['range'])}; "
        f"worst adam_eg loss in the range = "
        + ("diverged" if target["diverged_in_target_range"]
           else f"{target['worst_ratio_in_target_range']:.3g} × L*") + ".")
  comparison = [_ours_vs_theirs(rows, model_name) for model_name in models]
  title_quick = " (quick)" if quick else ""
  markdown = "\n".join([
      f"# Learned step sizes: robustness to the initial learning rate{title_quick}",
      "",
      f"load_digits (1257 train / 540 test), MLP (64-4×64-10) and a small CNN; minibatches "
      f"of {BATCH} drawn with replacement, {steps} steps (same batches for every method), "
      f"{len(lrs)} initial rates η0 log-spaced over [1e-4, 1], {len(seeds)} seed(s) (initial "
      "parameters and batch order), "
      "final full-training-set loss and test accuracy averaged over seeds ('div.' = a seed "
      "diverged). Methods: fixed-rate Adam and SGD-momentum; Adam + gradtx."
      f"hypergradient_descent (the paper's additive rule, β = {HYPER_LR:g}; and the log-space "
      f"cosine rule, β = {HD_LOG_BETA:g}); Adam + gradtx.eg_step_size (defaults: "
      "per-coordinate gains, global scale; per-leaf gains and scale; and two faster "
      "settings); optax.contrib's prodigy (η0 as its initial step estimate estim_lr0), dog "
      "(η0 as its first step), mechanize (around adam(η0)) and schedule_free_adamw(η0) "
      "(its loss and accuracy at the evaluation params).",
      "",
      f"**Target**: with adam_eg (eg_step_size, defaults), every initial rate in "
      f"[η*/{LOW_FACTOR:g}, {HIGH_FACTOR:g}·η*] ends within {TOLERANCE:.0%} of L*, the best "
      "fixed-rate Adam final loss over the grid (η* its rate). 'target met' is the same "
      "test applied to every method. With its defaults (gain_lr 0.01, scale_lr 0.001) EGDD "
      f"can change a rate by at most e^(0.011·T) = {math.exp(0.011 * steps):.3g}× in "
      f"T = {steps} steps.",
      "",
      table,
      "",
      *verdicts,
      "",
      "**Ours vs optax.contrib**, the best of each side by three measures of robustness "
      f"(of {len(lrs)} grid rates):",
      "",
      *[c["line"] for c in comparison],
      "",
      "Mean final training loss per initial rate:",
      "",
      per_lr_table,
  ])
  _common.write_results(args.out, NAME, markdown=markdown, payload={
      "quick": quick,
      "config": {"batch_size": BATCH, "steps": steps, "lrs": lrs.tolist(), "seeds": seeds,
                 "hyper_lr": HYPER_LR, "tolerance": TOLERANCE, "minibatch": True,
                 "models": models, "methods": {m.key: m.label for m in METHODS}},
      "target": {"method": TARGET_METHOD, "tolerance": TOLERANCE,
                 "range": [f"eta*/{LOW_FACTOR:g}", f"{HIGH_FACTOR:g}*eta*"],
                 "met": {m: next(r["target_met"] for r in rows if r["model"] == m
                                 and r["method"] == TARGET_METHOD) for m in models}},
      "ours_vs_theirs": comparison,
      "rows": rows,
      "per_lr": {"rows": per_lr_rows},
  })
  plot(rows, models, args.out)


if __name__ == "__main__":
  main()
