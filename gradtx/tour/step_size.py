"""Part ``step_size``: learned step sizes against a wrongly set initial learning rate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradtx
from gradtx.tour._data import MLP, Dataset
from gradtx.tour._registry import TEST_ACC, TRAIN_LOSS, Column, Context, PartResult, Row, part
from gradtx.tour._report import Figure, Panel, direction, finite, fmt_loss, smooth
from gradtx.tour._training import init_params, run_compiled

_REFERENCE_LR = 1e-3  # Adam's usual learning rate: the rows at this lr are the clean ones
_HD_BETA = 1e-7  # Baydin et al.'s hypergradient rate for Adam-HD
_HD = "hypergradient_descent(scale_by_adam)"
_EG = "eg_step_size(scale_by_adam)"
_SOPHIA = "sophia (gnb)"
_METHODS: dict[str, Callable[[Any], optax.GradientTransformation]] = {
    "adam": lambda lr: optax.adam(lr),
    _HD: lambda lr: gradtx.hypergradient_descent(
        optax.scale_by_adam(), learning_rate=lr, hyper_lr=_HD_BETA, log_space=False),
    _EG: lambda lr: gradtx.eg_step_size(
        optax.scale_by_adam(), learning_rate=lr),
    # Sophia-G: its GNB curvature reads the model's logits (update's logits_fn, inputs).
    _SOPHIA: lambda lr: gradtx.sophia(lr, key=jax.random.key(0), every=10),
}


def _lrs(quick: bool) -> np.ndarray:
  """Initial learning rates around Adam's usual 1e-3: two decades quick, four in full."""
  return np.logspace(-4, -2, 3) if quick else np.logspace(-5, -1, 5)


def _methods(quick: bool) -> list[str]:
  """Adam, EGDD and Sophia-G; the hypergradient baseline too in full mode."""
  return [n for n in _METHODS if not (quick and n == _HD)]


_STEP_SIZE_ABOUT = f"""
Amid, Anil, Fifty & Warmuth (arXiv:2202.00145), read by Su (kexue.fm/archives/8968): the
loss after a step depends on the step size through the hypergradient `-g_t · d_(t-1)`,
so the step size can be learned online; as it is positive, by exponentiated gradient.
Setting: the MLP on the 10-digit task, minibatch training from the same initialisations
and minibatches, with the *initial* learning rate spread over four decades
(1e-5, 1e-4, …, 1e-1; `--quick`: 1e-4, 1e-3, 1e-2), every learning rate and seed in
one `vmap`-ed program per method: `optax.adam(lr)` alone; `gradtx.eg_step_size(
optax.scale_by_adam(), learning_rate=lr)` (EGDD with lingvo's defaults: per-coordinate
gains in [0.01, 100] driven by sign agreement with an EMA of past gradients, a global
scale in [0.1, 10] driven by the cosine with the last step); in full mode also
`gradtx.hypergradient_descent(optax.scale_by_adam(), learning_rate=lr,
hyper_lr={_HD_BETA:g}, log_space=False)` (Baydin et al.'s additive rule and their β for
Adam); `gradtx.sophia(lr, key=..., every=10)` (Sophia-G, Liu et al. arXiv:2305.14342:
the momentum divided by a Gauss–Newton–Bartlett curvature refreshed every 10 steps,
clipped per coordinate, so no coordinate moves by more than lr a step).
The rows at lr {_REFERENCE_LR:g} (Adam's usual value) are the clean runs; the
others are runs with a wrongly set learning rate. "final lr" is the step size at the end
(mean over seeds): the hypergradient's learned rate, EGDD's `lr · lr_scale · gain_mean`
(read from the state); "÷ adam" is the row's final train loss divided by Adam's at the
same initial lr.
"""


def _effective_lr(state: Any, lr: jax.Array) -> jax.Array:
  """The step size the state implies now (Adam: the constant ``lr``)."""
  learned = optax.tree_utils.tree_get(state, "current_learning_rate")
  if learned is not None:
    return learned
  scale = optax.tree_utils.tree_get(state, "lr_scale")
  if scale is not None:
    return lr * scale * optax.tree_utils.tree_get(state, "gain_mean")
  return lr * jnp.ones((), jnp.float32)


def _sweep(make_tx: Callable[[Any], optax.GradientTransformation], lrs: np.ndarray,
           params: Any, keys: jax.Array, data: Dataset, steps: int,
           batch_size: int) -> tuple[np.ndarray, ...]:
  """Trains every (lr, seed) pair of one method in one compiled program.

  Returns ``[L, R]`` final full-batch train loss and test accuracy, and ``[L, R, steps]``
  minibatch losses and effective learning rates.
  """
  model = MLP()

  def xent(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

  def one(lr, params, key, x, y, x_test, y_test):
    tx = make_tx(lr)

    def step(carry, step_key):
      params, state = carry
      batch = jax.random.randint(step_key, (batch_size,), 0, x.shape[0])
      loss, grads = jax.value_and_grad(xent)(params, x[batch], y[batch])
      # Sophia-G's curvature needs the logits; the other methods ignore these arguments.
      updates, state = tx.update(grads, state, params, logits_fn=model.apply,
                                 inputs=x[batch])
      return (optax.apply_updates(params, updates), state), (loss, _effective_lr(state, lr))

    carry = (params, tx.init(params))
    (params, _), (losses, step_sizes) = jax.lax.scan(step, carry, jax.random.split(key, steps))
    logits = cast(jax.Array, model.apply(params, x_test))
    acc = jnp.mean(jnp.argmax(logits, -1) == y_test)
    return xent(params, x, y), acc, losses, step_sizes

  over_seeds = jax.vmap(one, in_axes=(None, 0, 0, None, None, None, None))
  over_lrs = jax.vmap(over_seeds, in_axes=(0, None, None, None, None, None, None))
  out = run_compiled(over_lrs, jnp.asarray(lrs, jnp.float32), params, keys, data.x_train,
                     data.y_train, data.x_test, data.y_test)
  return tuple(np.asarray(a, np.float64) for a in jax.device_get(out))


@part("step_size", "Learned step sizes: robustness to the initial learning rate",
      _STEP_SIZE_ABOUT)
def _step_size(ctx: Context) -> PartResult:
  """Every method over the grid of initial learning rates: rows, figure, findings."""
  cfg, data = ctx.config, ctx.data
  lrs = _lrs(cfg.quick)
  keys = jax.random.split(jax.random.key(7), (2, cfg.seeds))
  params = init_params(MLP(), keys[0])

  methods = _methods(cfg.quick)  # "adam" first: the other rows compare with it
  rows, finals, final_lrs, lr_curves, low_lr_losses = [], {}, {}, {}, {}
  for name in ctx.track(methods):
    loss, acc, minibatch, step_sizes = _sweep(_METHODS[name], lrs, params, keys[1], data,
                                              cfg.steps, cfg.batch_size)
    finals[name] = loss.mean(1)
    final_lrs[name] = step_sizes[:, :, -1].mean(1)
    for i, lr in enumerate(lrs):
      reference = bool(np.isclose(lr, _REFERENCE_LR))
      rows.append(Row(name, f"initial lr {lr:.0e}" + ("" if reference else " (mis-set)"), {
          "train_loss": float(loss[i].mean()), "test_acc": float(acc[i].mean()),
          "test_acc_std": float(acc[i].std()), "initial_lr": float(lr),
          "final_lr": float(final_lrs[name][i]),
          "vs_adam": float(finite(finals[name][i]) / finite(finals["adam"][i]))},
          clean=reference))
    for i in (0, len(lrs) - 1):
      lr_curves[f"{name}, from {lrs[i]:.0e}"] = np.abs(step_sizes[i].mean(0))
    low_lr_losses[name] = smooth(minibatch[0].mean(0), max(1, cfg.steps // 50))

  figure = _figure(lrs, finals, lr_curves, low_lr_losses, cfg.steps)
  lines = _findings(lrs, methods, finals, final_lrs)
  columns = [TRAIN_LOSS, TEST_ACC, Column("initial_lr", "initial lr", ".0e"),
             Column("final_lr", "final lr", ".2e"), Column("vs_adam", "÷ adam")]
  return PartResult(columns, rows, [figure], lines)


def _figure(lrs: np.ndarray, finals: dict[str, np.ndarray], lr_curves: dict[str, np.ndarray],
            low_lr_losses: dict[str, np.ndarray], steps: int) -> Figure:
  """Final loss against the initial learning rate; the step sizes; the smallest lr's run."""
  decades = np.log10(lrs)
  labels = [f"{lr:.0e}" for lr in lrs]
  return Figure("step_size", "Final loss against the initial learning rate, and the "
                "learned step sizes (mean over seeds)", [
      Panel(f"final train loss after {steps} steps", finals, x=decades,
            xticklabels=labels, xlabel="initial learning rate", legend_below=True),
      Panel("step size over training, from the smallest and largest lr",
            {k: np.maximum(v, 1e-12) for k, v in lr_curves.items()}, ylabel="step size",
            legend_below=True),
      Panel(f"minibatch loss from initial lr {lrs[0]:.0e}", low_lr_losses, legend_below=True),
  ])


def _findings(lrs: np.ndarray, methods: list[str], finals: dict[str, np.ndarray],
              final_lrs: dict[str, np.ndarray]) -> list[str]:
  """The findings, worded from the final losses and step sizes of every method."""
  worst = {name: max(map(finite, f)) for name, f in finals.items()}
  best = {name: min(map(finite, f)) for name, f in finals.items()}
  eg, adam, sophia = finals[_EG], finals["adam"], finals[_SOPHIA]
  better = int(np.sum(eg < adam))
  ratio = np.array([finite(e) / finite(a) for e, a in zip(eg, adam, strict=True)])
  most = int(np.nanargmin(np.where(np.isnan(ratio), np.inf, ratio)))
  lines = [
      f"- Worst final train loss over the {len(lrs)} initial learning rates: "
      + ", ".join(f"{name} {fmt_loss(worst[name])}" for name in methods)
      + "; best: " + ", ".join(f"{name} {fmt_loss(best[name])}" for name in methods) + ".",
      f"- From lr {lrs[0]:.0e} ({_REFERENCE_LR / lrs[0]:g}× too small), Adam ends at train "
      f"loss {fmt_loss(adam[0])}, EGDD {direction(eg[0], adam[0])} at {fmt_loss(eg[0])}"
      + (f", the hypergradient at {fmt_loss(finals[_HD][0])}" if _HD in finals else "")
      + f"; EGDD ends lower than Adam at {better} of the {len(lrs)} learning rates, most "
      f"so (÷ adam {ratio[most]:.3g}) from lr {lrs[most]:.0e}.",
  ]
  worse = [i for i in range(len(lrs)) if finite(eg[i]) > 10 * finite(adam[i])]
  if worse:
    lines.append("- EGDD ends more than 10× above Adam from " + ", ".join(
        f"lr {lrs[i]:.0e} (loss {fmt_loss(eg[i])} against {fmt_loss(adam[i])}; its step "
        f"size went to {final_lrs[_EG][i]:.2e})" for i in worse)
        + ": growing a step that is already near the largest stable one breaks training.")
  sophia_better = [f"{lr:.0e}" for lr, so, a in zip(lrs, sophia, adam, strict=True)
                   if finite(so) < finite(a)]
  lines.append(
      f"- Sophia-G ends at train loss {', '.join(fmt_loss(v) for v in sophia)} from lr "
      f"{', '.join(f'{lr:.0e}' for lr in lrs)} (Adam: {', '.join(fmt_loss(v) for v in adam)})"
      f"; lower than Adam at {len(sophia_better)} of the {len(lrs)} learning rates"
      + (f" ({', '.join(sophia_better)})" if sophia_better else "")
      + ". Its per-coordinate clip caps each step at lr, so a too-small lr stays too small; "
      "it adapts the direction, not the step size.")
  lines.append(
      "- EGDD's gains grow where successive gradients agree in sign and shrink where they "
      "alternate; the clip ranges bound the correction (gains 100×, scale 10×) and the "
      "default rates (`gain_lr=0.01`, `scale_lr=0.001`) need hundreds of steps to use it. "
      "The additive hypergradient is unbounded and its β must match the scale of `g · d`.")
  return lines
