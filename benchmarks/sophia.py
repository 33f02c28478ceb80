r"""Sophia-style training with gradtx's curvature estimators vs Adam, digits CNN, equal steps.

Liu et al. (arXiv:2305.14342): ``θ ← θ - η clip(m / max(γ h, ε), 1)``, ``h`` an EMA of a
diagonal curvature estimate refreshed every ``k`` steps: ``gradtx.sophia(η, estimator=...,
every=k, b2=β2, gamma=γ)``, an optax chain of an EMA of the gradients,
``gradtx.scale_by_diag_newton`` and a per-coordinate clip.

Settings for a run of a few hundred steps: ``every=5``, ``β2 = 0.95``, ``γ = 1``. The
paper's ``every=10``, ``β2 = 0.99``, ``γ = 0.01–0.05`` are for 10⁵ steps: ``h`` starts at 0
without bias correction (after ``n`` refreshes it is ``(1 - β2^n)`` of the estimate), and
on this model ``|g| / ĥ`` has a median of about 3, so with them nearly every coordinate
is clipped for hundreds of steps (sign descent on the momentum); ``optax_sophia`` keeps
its defaults and shows that regime.

Methods, every one at the same number of steps and on the same minibatches:

* ``adam``: ``optax.adam(η)``;
* ``sophia_g``: ``gradtx.sophia`` with ``estimator="gnb"`` (Gauss–Newton–Bartlett on the
  minibatch: labels drawn from the model's softmax);
* ``sophia_h``: ``gradtx.sophia`` with ``estimator="hutchinson"`` (one Rademacher probe);
* ``optax_sophia``: ``optax.contrib.sophia(η)`` with its defaults (Hutchinson every 10
  steps, γ = 0.01, weight decay 1e-4), for reference.

Data and model: ``load_digits`` (the tour's 70/30 split: 1257 train, 540 test), a CNN of
two 3×3 stride-2 ``nn.Conv`` layers (8 and 16 channels, ReLU) and a linear head (1.9k
parameters); minibatches of 128 drawn with replacement, ``steps`` steps (400; 60 with
``--quick``), seeds 0–2 (one with ``--quick``). Each method gets its best η from the same
grid (the best mean final training loss over seeds); the table reports the final
full-training-set loss and test accuracy at that η, and the loss after a quarter and half
of the steps. Cost: the time of 20 training steps (four curvature refreshes for the
curvature methods) as a paired, interleaved median ratio to Adam's, and the compiled
step's temporary memory (``memory_analysis()``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import gradtx
from gradtx.tour import load_data

NAME = "sophia"
BATCH = 128
GAMMA, EPS, EVERY, B1, B2 = 1.0, 1e-12, 5, 0.965, 0.95


class ConvNet(nn.Module):
  """8×8 digit → conv 3×3/2 (8) → conv 3×3/2 (16) → dense (10), ReLU in between."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[:-1] + (8, 8, 1))
    for channels in (8, 16):
      x = nn.relu(nn.Conv(channels, (3, 3), strides=2, padding=1)(x))
    return nn.Dense(10)(x.reshape(x.shape[:-3] + (-1,)))


MODEL = ConvNet()


def logits_fn(params: Any, x: jax.Array) -> jax.Array:
  return MODEL.apply(params, x)


def loss_at(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()


def sophia(learning_rate: float, estimator: str) -> optax.GradientTransformationExtraArgs:
  """``gradtx.sophia`` with this benchmark's settings (no weight decay, as for Adam here)."""
  return gradtx.sophia(learning_rate, estimator=estimator, b1=B1, b2=B2, gamma=GAMMA, eps=EPS,
                       weight_decay=0.0, every=EVERY, key=jax.random.key(0))


METHODS: dict[str, tuple[str, Callable[[float], Any]]] = {
    "adam": ("Adam", optax.adam),
    "sophia_g": (f"Sophia-G (gradtx gnb, every {EVERY}, γ {GAMMA:g})",
                 lambda lr: sophia(lr, "gnb")),
    "sophia_h": (f"Sophia-H (gradtx hutchinson, every {EVERY}, γ {GAMMA:g})",
                 lambda lr: sophia(lr, "hutchinson")),
    "optax_sophia": ("optax.contrib.sophia (defaults)", optax.contrib.sophia),
}


def make_step(tx: Any) -> Callable:
  """One training step; every method gets what its curvature needs as update kwargs."""

  def step(carry, batch):
    params, state = carry
    x, y = batch
    loss_fn = lambda p: loss_at(p, x, y)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, loss_fn=loss_fn, obj_fn=loss_fn,
                               logits_fn=logits_fn, inputs=x)
    return (optax.apply_updates(params, updates), state), loss

  return step


def train(method: str, lr: float, params0: Any, xs: jax.Array, ys: jax.Array, data) -> dict:
  """``len(xs)`` steps from ``params0``: per-step minibatch losses, final loss and accuracy."""
  tx = METHODS[method][1](lr)
  (params, _), losses = jax.lax.scan(make_step(tx), (params0, tx.init(params0)), (xs, ys))
  final = loss_at(params, data.x_train, data.y_train)
  acc = jnp.mean(jnp.argmax(logits_fn(params, data.x_test), -1) == data.y_test)
  return {"losses": losses, "final_loss": final, "test_acc": acc}


def run_grid(method: str, lrs: np.ndarray, seeds: list[int], steps: int, data) -> dict:
  """Every (lr, seed) of one method in one program (vmap over both)."""
  params0 = jax.vmap(lambda k: MODEL.init(k, data.x_train[:1]))(
      jnp.stack([jax.random.key(s) for s in seeds]))
  idx = np.stack([np.random.default_rng(s).integers(0, data.x_train.shape[0], (steps, BATCH))
                  for s in seeds])
  xs, ys = data.x_train[idx], data.y_train[idx]  # [S, T, B, ...]
  over_seeds = jax.vmap(lambda lr, p, x, y: train(method, lr, p, x, y, data),
                        in_axes=(None, 0, 0, 0))
  fn = jax.jit(jax.vmap(over_seeds, in_axes=(0, None, None, None)))
  return jax.device_get(fn(jnp.asarray(lrs, jnp.float32), params0, xs, ys))


def cost(best_lrs: dict[str, float], data, repeats: int) -> dict[str, dict]:
  """Paired time ratio to Adam of 20 steps, and the compiled step's temporary memory."""
  params = MODEL.init(jax.random.key(0), data.x_train[:1])
  idx = np.random.default_rng(0).integers(0, data.x_train.shape[0], (20, BATCH))
  batch = (data.x_train[idx], data.y_train[idx])
  fns, memory = {}, {}
  for method, lr in best_lrs.items():
    tx = METHODS[method][1](lr)
    state = tx.init(params)
    run20 = jax.jit(lambda p, s, b, tx=tx: jax.lax.scan(make_step(tx), (p, s), b)[0])
    fns[method] = lambda run20=run20, state=state: run20(params, state, batch)
    one = jax.jit(lambda c, b, tx=tx: make_step(tx)(c, b)).lower(
        (params, state), (batch[0][0], batch[1][0])).compile().memory_analysis()
    memory[method] = None if one is None else int(one.temp_size_in_bytes)
  with tqdm(total=repeats + 2, desc=f"{NAME} timing", unit="round") as progress:
    times = _common.time_interleaved(fns, repeats=repeats, on_round=progress.update)
  return {m: {"time_ratio": _common.paired_ratio(times[m], times["adam"]),
              "temp_bytes": memory[m]} for m in best_lrs}


def summarise(results: dict, lrs: np.ndarray, steps: int) -> dict[str, dict]:
  rows = {}
  for method, res in results.items():
    final = np.asarray(res["final_loss"], np.float64)  # [L, S]
    mean = np.where(np.all(np.isfinite(final), axis=1), final.mean(1), np.inf)
    best = int(np.argmin(mean))
    curve = np.asarray(res["losses"], np.float64)[best].mean(0)  # minibatch loss per step
    rows[method] = {
        "label": METHODS[method][0], "best_lr": float(lrs[best]),
        "final_loss": float(mean[best]), "final_loss_per_lr": [
            None if not np.isfinite(v) else float(v) for v in mean],
        "test_acc": float(np.asarray(res["test_acc"])[best].mean()),
        "loss_quarter": float(curve[steps // 4 - 1]), "loss_half": float(curve[steps // 2 - 1]),
        "curve": curve.tolist()}
  return rows


def plot(rows: dict, out_dir) -> None:
  plt = _common.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for row in rows.values():
    curve = np.asarray(row["curve"])
    window = max(1, len(curve) // 20)
    smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(smooth.size) + window, smooth,
            label=f"{row['label']}, η={row['best_lr']:.2g}")
  _common.label_axes(ax, title="Digits CNN: Sophia-style (gradtx) vs Adam, each at its best η",
                     xlabel="step", ylabel="minibatch loss (mean over seeds, moving average)",
                     yscale="log", legend_fontsize=7)
  _common.save_figure(fig, out_dir, NAME)


def main():
  args = _common.parse_args(__doc__.splitlines()[0])
  quick = args.quick
  steps = 60 if quick else 400
  seeds = [0] if quick else [0, 1, 2]
  lrs = np.array([3e-3, 3e-2]) if quick else np.logspace(-3, -1, 5)
  data = load_data()
  results = {}
  for method in tqdm(METHODS, desc=NAME, unit="method"):
    results[method] = run_grid(method, lrs, seeds, steps, data)
  rows = summarise(results, lrs, steps)
  costs = cost({m: r["best_lr"] for m, r in rows.items()}, data, 5 if quick else 30)
  load = os.getloadavg()
  table = _common.markdown_table(
      ["method", "best η", f"loss @ {steps // 4}", f"loss @ {steps // 2}",
       f"final train loss @ {steps}", "test acc", "time / Adam (20 steps)",
       "step temp memory"],
      [[r["label"], f"{r['best_lr']:.2g}", f"{r['loss_quarter']:.3g}",
        f"{r['loss_half']:.3g}", f"{r['final_loss']:.3g}", f"{r['test_acc']:.3f}",
        f"{_common.fmt_ratio(costs[m]['time_ratio'], 2)} "
        f"({_common.fmt_ci(costs[m]['time_ratio'], 2)})",
        "—" if costs[m]["temp_bytes"] is None else f"{costs[m]['temp_bytes'] / 1024:.0f} KiB"]
       for m, r in rows.items()])
  per_lr = _common.markdown_table(
      ["η"] + list(rows), [[f"{lr:.2g}"] + [
          "div." if r["final_loss_per_lr"][i] is None else f"{r['final_loss_per_lr'][i]:.3g}"
          for r in rows.values()] for i, lr in enumerate(lrs)])
  markdown = "\n".join([
      f"# Sophia-style training vs Adam on the digits CNN{' (quick)' if quick else ''}",
      "",
      f"load_digits, a 2-conv CNN (1.9k parameters), minibatches of {BATCH}, {steps} steps, "
      f"{len(seeds)} seed(s), η from {{{', '.join(f'{v:.2g}' for v in lrs)}}} (each "
      "method's best mean final training loss). 'loss @ t': minibatch loss at step t (mean "
      "over seeds); final train loss on the full training set. Time: median ratio to Adam "
      "of 20 jit-compiled steps, paired and interleaved (95% CI); load average "
      f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores.",
      "",
      table,
      "",
      "Final training loss per η (mean over seeds):",
      "",
      per_lr,
  ])
  _common.write_results(args.out, NAME, markdown=markdown, payload={
      "quick": quick,
      "config": {"batch_size": BATCH, "steps": steps, "seeds": seeds, "lrs": lrs.tolist(),
                 "gamma": GAMMA, "eps": EPS, "every": EVERY, "b1": B1, "b2": B2},
      "load_average": list(load),
      "rows": rows, "cost": costs})
  plot(rows, args.out)


if __name__ == "__main__":
  main()
