"""ChildTuning: the cost of its masks in an AdamW step, and fine-tuning on digits.

Claims:

1. *Overhead.* ``optax.chain(gradtx.child_tuning_f(0.3, key=k), optax.adamw(lr))`` (the
   default ``prng="hash"``) costs at most 1.3x a plain AdamW train step of a
   5M-parameter model; and the reason the default is a counter hash rather than
   ``jax.random``: on CPU, threefry masks cost several AdamW updates.
2. *Fine-tuning.* How ChildTuning-F and -D, with the mask on the gradient (the paper)
   or on the update (Su), compare with vanilla AdamW when a network pretrained on digits
   0-4 is fine-tuned on 50 examples per class of digits 5-9. Whatever the result is.

Overhead set-up: the MLP of ``benchmarks/overhead.py`` (784 → 1024×5 → 10, 5.0M
parameters, batch 128 of fixed synthetic data), one jit-compiled train step (forward,
backward, optimizer update, ``optax.apply_updates``) with ``optax.adamw(1e-3)`` and with
each ChildTuning variant (``reserve_p = 0.3``):

- F, gradient placement, ``prng="hash"`` (the default);
- F, gradient placement, ``prng="jax"`` with a threefry key (``jax.random.key(0)``);
- F, gradient placement, ``prng="jax"`` with an rbg key
  (``jax.random.key(0, impl="rbg")``);
- F, update placement (``chain(adamw, child_tuning_f)``), ``prng="hash"``;
- D, gradient placement, a fixed mask from ``fisher_mask`` (hidden blocks only).

Every variant is timed in interleaved rounds with the plain AdamW step
(``_common.time_interleaved``); the ratio is the median over rounds of the same-round
ratios, with a bootstrap 95% confidence interval. The same rounds also time AdamW's
update alone (gradients given: ``adamw.update`` + ``apply_updates``), so that the extra
time of a variant's step, ``(step - AdamW step) / AdamW update`` (same round), says what
its masks cost in AdamW updates; XLA's static cost analysis of the compiled steps (bytes
accessed) is reported as a deterministic check on memory traffic.

Fine-tuning set-up (``gradtx.tour.load_data``: sklearn digits, a fixed stratified
70/30 split, standardised): an MLP ``embed`` → ``layer_0..2`` → ``head`` (width 256,
ReLU) is pretrained with Adam on the digits 0-4 of the train split. Each seed then draws
50 train examples of each digit 5-9 (250 in all), a new 5-way head (fresh init: the
head of a 5-way classifier cannot be reused for other classes) and the mask key, and
fine-tunes all parameters for a fixed number of minibatch steps with
``optax.adamw(lr)`` (weight decay 1e-4) and:

- vanilla AdamW;
- ChildTuning-F, gradient placement (the paper): ``chain(child_tuning_f(0.3), adamw)``;
- ChildTuning-F, update placement (Su): ``chain(adamw, child_tuning_f(0.3))``;
- ChildTuning-D, gradient placement: ``chain(child_tuning_d(mask), adamw)`` with
  ``mask = fisher_mask(fisher_information(loss, params, batches, clip_norm=1.0), 0.3,
  include=r"params/layer_\\d+/.*")`` — the Fisher over the seed's 250 fine-tuning
  examples (batches of 10, every tensor's gradient clipped to norm 1, at the pretrained
  body and the seed's new head), the mask over the hidden layers only: ``embed`` and
  ``head`` train freely, as the original leaves BERT's embeddings and classifier out;
- ChildTuning-D, update placement: ``chain(adamw, child_tuning_d(mask))``.

Each method gets its best learning rate from a small grid, chosen by the mean (over
seeds) accuracy on a validation split: the digits 5-9 of the train split that are not
in the seed's fine-tuning set (the smallest such lr on ties). The table reports the test
accuracy on the digits 5-9 of the test split at that lr, after the last step (no early
stopping): mean ± standard deviation over seeds, and the mean paired difference to
vanilla AdamW (same seed: same examples, same head init).

``--quick``: a 0.12M-parameter MLP and 5 timing rounds; a width-32 network, 2 seeds, one
learning rate and a few dozen steps; and XLA's slower but faster-compiling CPU code
(``QUICK_XLA_FLAGS``: compilation is most of a smoke run's time): a smoke run whose
numbers mean little.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import compile_step, gradtx_step, init_mlp, loss_fn
from tqdm.auto import tqdm

import gradtx
from gradtx.tour import MLP, load_data

NAME = "child_tuning"
RESERVE_P = 0.3  # the original's default
BATCH = 128  # overhead: synthetic batch
NUM_BLOCKS = 4  # overhead: hidden 1024 → 1024 blocks, as in benchmarks/overhead.py
LEARNING_RATE = 1e-3  # overhead (does not change the cost)
TARGET = {"default_vs_adamw_max": 1.3}
# --quick is mostly compilation: these flags halve XLA's CPU compile time (slower code).
QUICK_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")

PRETRAIN_CLASSES, FINETUNE_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
PER_CLASS = 50  # fine-tuning examples per class
FT_BATCH = 25  # fine-tuning minibatch
FISHER_BATCH = 10  # batches of the Fisher pass
FISHER_CLIP = 1.0  # per-tensor gradient clipping in the Fisher pass (the original's 1.0)
WEIGHT_DECAY = 1e-4
D_INCLUDE = r"params/layer_\d+/.*"  # ChildTuning-D selects among the hidden layers
METHODS = {  # name: (technique, placement)
    "AdamW": ("—", "—"),
    "ChildTuning-F (gradient)": ("F", "gradient"),
    "ChildTuning-F (update)": ("F", "update"),
    "ChildTuning-D (gradient)": ("D", "gradient"),
    "ChildTuning-D (update)": ("D", "update"),
}


def config(quick: bool) -> dict[str, Any]:
  if quick:
    return {"width": 128, "num_blocks": 1, "repeats": 5, "warmup": 1,
            "ft_width": 32, "ft_layers": 1, "pretrain_steps": 50, "finetune_steps": 30,
            "seeds": 2, "lr_grid": [1e-3]}
  return {"width": 1024, "num_blocks": NUM_BLOCKS, "repeats": 60, "warmup": 3,
          "ft_width": 256, "ft_layers": 3, "pretrain_steps": 1000, "finetune_steps": 300,
          "seeds": 8, "lr_grid": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}


# ----------------------------------------------------------------------- overhead


def update_only(tx):
  """The optimizer update alone, gradients given (what the masks are added to)."""
  @jax.jit
  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def overhead_cases(grads) -> list[tuple[str, str, optax.GradientTransformation]]:
  adamw = optax.adamw(LEARNING_RATE)
  threefry, rbg = jax.random.key(0), jax.random.key(0, impl="rbg")
  # ChildTuning-D's cost does not depend on which coordinates its fixed mask keeps: the
  # Fisher of the one synthetic batch (its squared gradient), the hidden blocks only.
  fisher = jax.tree.map(lambda g: np.square(np.asarray(g)), grads)
  mask = gradtx.fisher_mask(fisher, RESERVE_P, include=r"block_\d+/.*")
  return [
      ("F, hash (default)", "chain(child_tuning_f(0.3), adamw)",
       optax.chain(gradtx.child_tuning_f(RESERVE_P, key=threefry), adamw)),
      ("F, jax threefry", 'chain(child_tuning_f(0.3, prng="jax"), adamw)',
       optax.chain(gradtx.child_tuning_f(RESERVE_P, key=threefry, prng="jax"), adamw)),
      ("F, jax rbg", 'chain(child_tuning_f(0.3, prng="jax", key=key(0, impl="rbg")), adamw)',
       optax.chain(gradtx.child_tuning_f(RESERVE_P, key=rbg, prng="jax"), adamw)),
      ("F, hash, update placement", "chain(adamw, child_tuning_f(0.3))",
       optax.chain(adamw, gradtx.child_tuning_f(RESERVE_P, key=threefry))),
      ("D (fixed Fisher mask)", "chain(child_tuning_d(mask), adamw)",
       optax.chain(gradtx.child_tuning_d(mask), adamw)),
  ]


def measure_overhead(cfg) -> tuple[list[dict[str, Any]], int]:
  params = jax.jit(init_mlp, static_argnums=(1, 2))(jax.random.PRNGKey(0), cfg["width"],
                                                     cfg["num_blocks"])
  num_params = sum(p.size for p in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((BATCH, 784), np.float32))
  y = jnp.asarray(rng.integers(0, 10, BATCH, np.int32))
  grads = jax.jit(jax.grad(loss_fn))(params, x, y)

  adamw = optax.adamw(LEARNING_RATE)
  adamw_state = adamw.init(params)
  adamw_step, adamw_cost = compile_step(gradtx_step(adamw), params, adamw_state, x, y)
  adamw_update = update_only(adamw).lower(grads, adamw_state, params).compile()
  all_cases = overhead_cases(grads)
  rows = []
  with tqdm(total=len(all_cases) * (cfg["repeats"] + cfg["warmup"]), desc=f"{NAME} overhead",
            unit="round") as bar:
    for label, chain, tx in all_cases:
      state = tx.init(params)
      step, cost = compile_step(gradtx_step(tx), params, state, x, y)
      density = float(optax.tree_utils.tree_get(step(params, state, x, y)[1], "mask_density"))
      times = _common.time_interleaved(
          {"step": functools.partial(step, params, state, x, y),
           "adamw_step": functools.partial(adamw_step, params, adamw_state, x, y),
           "adamw_update": functools.partial(adamw_update, grads, adamw_state, params)},
          repeats=cfg["repeats"], warmup=cfg["warmup"], seed=len(rows), on_round=bar.update)
      rows.append({
          "variant": label,
          "optimizer": chain,
          "vs_adamw": _common.paired_ratio(times["step"], times["adamw_step"]),
          # (step - AdamW step) / AdamW update, same round: the masks' cost in AdamW updates
          "extra_in_adamw_updates": _common.paired_ratio(
              times["step"] - times["adamw_step"], times["adamw_update"]),
          "median_ms": {k: float(np.median(v) * 1e3) for k, v in times.items()},
          "mask_density": density,
          "xla_cost": {"variant": cost, "adamw": adamw_cost},
          "xla_bytes_ratio": cost["bytes_accessed"] / adamw_cost["bytes_accessed"],
      })
  return rows, num_params


# --------------------------------------------------------------------- fine-tuning


def classes(x, y, wanted):
  keep = np.isin(np.asarray(y), wanted)
  return np.asarray(x)[keep], np.searchsorted(np.asarray(wanted), np.asarray(y)[keep])


def xent(model, params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()


def accuracy(model, params, x, y):
  return jnp.mean(jnp.argmax(model.apply(params, x), -1) == y)


def pretrain(model, init, x, y, steps, seed=0):
  """Adam(1e-3) on all parameters, minibatches of 64 drawn with replacement."""
  tx = optax.adam(1e-3)
  params = init(jax.random.key(seed), x[:1])
  order = np.random.default_rng(seed).integers(0, len(x), (steps, 64))

  @jax.jit
  def run(params, order):
    def body(carry, idx):
      params, state = carry
      grads = jax.grad(functools.partial(xent, model))(params, x[idx], y[idx])
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    return jax.lax.scan(body, (params, tx.init(params)), order)[0][0]

  return run(params, jnp.asarray(order))


def make_tx(method, lr, key, mask):
  # The lr lives in the state (inject_hyperparams), as do the F key and the D mask: a
  # compiled run reads all three from its opt_state argument, so one compilation serves
  # every lr and seed.
  adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=WEIGHT_DECAY)
  technique, placement = METHODS[method]
  if technique == "F":
    child = gradtx.child_tuning_f(RESERVE_P, key=key)
  elif technique == "D":
    child = gradtx.child_tuning_d(mask)
  else:
    return adamw
  return optax.chain(child, adamw) if placement == "gradient" else optax.chain(adamw, child)


def compiled_finetune(model, method, template_params):
  """A jitted, vmapped fine-tuning run: (params, opt_state, data) per run → accuracies."""
  template_mask = jax.tree.map(lambda p: np.ones(p.shape, bool), template_params)
  tx = make_tx(method, 1.0, jax.random.key(0), template_mask)  # update needs only the state
  loss = functools.partial(xent, model)

  def run(params, opt_state, order, x, y, x_val, y_val, x_test, y_test):
    def body(carry, idx):
      params, state = carry
      updates, state = tx.update(jax.grad(loss)(params, x[idx], y[idx]), state, params)
      return (optax.apply_updates(params, updates), state), None

    params = jax.lax.scan(body, (params, opt_state), order)[0][0]
    return (accuracy(model, params, x_val, y_val), accuracy(model, params, x_test, y_test),
            loss(params, x, y))

  return jax.jit(jax.vmap(run, in_axes=(0,) * 7 + (None, None)))


def seed_setup(init, body, x_pool, y_pool, seed, steps):
  """One seed's fine-tuning set, validation set, new head, mask key and batch order."""
  rng = np.random.default_rng(1000 + seed)
  chosen = np.concatenate([rng.choice(np.flatnonzero(y_pool == c), PER_CLASS, replace=False)
                           for c in range(len(FINETUNE_CLASSES))])
  chosen = rng.permutation(chosen)
  rest = np.setdiff1d(np.arange(len(y_pool)), chosen)
  head_key, mask_key = jax.random.split(jax.random.key(seed))
  fresh = init(head_key, x_pool[:1])
  params = {"params": {**body["params"], "head": fresh["params"]["head"]}}
  epochs = -(-steps * FT_BATCH // len(chosen))
  order = np.concatenate([rng.permutation(len(chosen)) for _ in range(epochs)])
  order = order[:steps * FT_BATCH].reshape(steps, FT_BATCH)
  return {"params": params, "x": x_pool[chosen], "y": y_pool[chosen], "mask_key": mask_key,
          "order": order, "x_val": x_pool[rest], "y_val": y_pool[rest]}


def fisher_d_mask(model, setup):
  """ChildTuning-D's mask: top-30% Fisher coordinates of the hidden layers."""
  batches = (setup["x"].reshape(-1, FISHER_BATCH, setup["x"].shape[-1]),
             setup["y"].reshape(-1, FISHER_BATCH))
  fisher = gradtx.fisher_information(lambda p, b: xent(model, p, *b), setup["params"],
                                     batches, clip_norm=FISHER_CLIP)
  return gradtx.fisher_mask(fisher, RESERVE_P, include=D_INCLUDE)


def stack(trees):
  """Trees stacked along a new leading axis (on the host: no compilation per shape)."""
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(a) for a in leaves]), *trees)


def mean_std(values) -> dict[str, float]:
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()),
          "std": float(values.std(ddof=1)) if values.size > 1 else 0.0}


def measure_finetune(cfg) -> dict[str, Any]:
  data = load_data()
  x_pre, y_pre = classes(data.x_train, data.y_train, PRETRAIN_CLASSES)
  x_pre_test, y_pre_test = classes(data.x_test, data.y_test, PRETRAIN_CLASSES)
  x_pool, y_pool = classes(data.x_train, data.y_train, FINETUNE_CLASSES)
  x_test, y_test = classes(data.x_test, data.y_test, FINETUNE_CLASSES)
  model = MLP(width=cfg["ft_width"], num_layers=cfg["ft_layers"],
              num_classes=len(FINETUNE_CLASSES))
  init = jax.jit(model.init)

  start = time.perf_counter()
  body = pretrain(model, init, jnp.asarray(x_pre), jnp.asarray(y_pre), cfg["pretrain_steps"])
  pretrain_acc = float(jax.jit(functools.partial(accuracy, model))(body, x_pre_test,
                                                                     y_pre_test))
  seeds = list(range(cfg["seeds"]))
  setups = [seed_setup(init, body, x_pool, y_pool, s, cfg["finetune_steps"]) for s in seeds]
  masks = [fisher_d_mask(model, s) for s in setups]
  grid = cfg["lr_grid"]
  runs = [(lr, s) for lr in grid for s in seeds]  # lr-major: runs[i * len(seeds) + s]

  def per_run(name):
    return stack([setups[s][name] for _, s in runs])

  shared = [stack([setups[s]["params"] for _, s in runs]), None, per_run("order"),
            per_run("x"), per_run("y"), per_run("x_val"), per_run("y_val"), x_test, y_test]
  results = {}
  for method in tqdm(METHODS, desc=f"{NAME} fine-tuning", unit="method"):
    states = stack([make_tx(method, lr, setups[s]["mask_key"], masks[s]).init(
        setups[s]["params"]) for lr, s in runs])
    args = list(shared)
    args[1] = states
    val, test, train_loss = compiled_finetune(model, method, body)(*args)
    shape = (len(grid), len(seeds))
    results[method] = {"val": np.asarray(val).reshape(shape),
                       "test": np.asarray(test).reshape(shape),
                       "train_loss": np.asarray(train_loss).reshape(shape)}

  rows = []
  vanilla = None
  for method, (technique, placement) in METHODS.items():
    res = results[method]
    best = int(np.argmax(res["val"].mean(axis=1)))  # first (smallest) lr among ties
    test = res["test"][best]
    if vanilla is None:
      vanilla = test
    rows.append({
        "method": method,
        "technique": technique,
        "placement": placement,
        "best_lr": grid[best],
        "val_accuracy": mean_std(res["val"][best]),
        "test_accuracy": {**mean_std(test), "per_seed": [float(a) for a in test]},
        "diff_vs_adamw": mean_std(test - vanilla),
        "final_train_loss": mean_std(res["train_loss"][best]),
        "grid": [{"lr": lr, "val_accuracy": mean_std(res["val"][i]),
                  "test_accuracy": mean_std(res["test"][i])} for i, lr in enumerate(grid)],
    })
  density = [float(np.mean(np.concatenate(
      [np.asarray(m).ravel() for p, m in zip(gradtx.tree_paths(mask), jax.tree.leaves(mask),
                                             strict=True) if "layer_" in p])))
      for mask in masks]
  return {
      "rows": rows,
      "pretrain_test_accuracy_0_4": pretrain_acc,
      "num_params": int(sum(p.size for p in jax.tree.leaves(body))),
      "sizes": {"pretrain": int(len(y_pre)), "finetune": PER_CLASS * len(FINETUNE_CLASSES),
                "validation": int(len(y_pool)) - PER_CLASS * len(FINETUNE_CLASSES),
                "test": int(len(y_test))},
      "d_mask_density_hidden_layers": mean_std(density),
      "seeds": seeds,
      "lr_grid": grid,
      "wall_s": time.perf_counter() - start,
  }


# ------------------------------------------------------------------------ reporting


def plot(rows, num_params, finetune, out_dir):
  plt = _common.pyplot()
  fig, axes = plt.subplots(2, 2, figsize=(15, 10), gridspec_kw={"wspace": 0.22})
  labels = [row["variant"] for row in rows][::-1]
  y = np.arange(len(rows))
  for ax, key, left, title, xlabel in [
      (axes[0, 0], "vs_adamw", 1.0,
       f"train step / AdamW train step ({num_params / 1e6:.2f}M parameters)",
       "time ratio (median over rounds; bars: 95% CI)"),
      (axes[0, 1], "extra_in_adamw_updates", 0.0,
       "extra step time, in AdamW updates", "(step − AdamW step) / AdamW update")]:
    med = np.array([row[key]["median"] for row in rows])[::-1]
    lo = np.array([row[key]["ci_low"] for row in rows])[::-1]
    hi = np.array([row[key]["ci_high"] for row in rows])[::-1]
    ax.barh(y, med - left, left=left, xerr=[med - lo, hi - med], color="tab:blue",
            alpha=0.75, capsize=3)
    ax.axvline(left, color="black", lw=1)
    if key == "vs_adamw":
      ax.axvline(TARGET["default_vs_adamw_max"], color="tab:red", ls="--", lw=1,
                 label=f"target {TARGET['default_vs_adamw_max']} (default)")
      ax.legend(loc="lower right")
    ax.set_yticks(y, labels if key == "vs_adamw" else [])
    ax.set_title(title)
    ax.set_xlabel(xlabel)

  ax = axes[1, 0]
  ft = finetune["rows"]
  x = np.arange(len(ft))
  means = [row["test_accuracy"]["mean"] for row in ft]
  stds = [row["test_accuracy"]["std"] for row in ft]
  ax.bar(x, means, yerr=stds, color="tab:green", alpha=0.7, capsize=4)
  for i, row in enumerate(ft):
    seeds = row["test_accuracy"]["per_seed"]
    ax.scatter(np.full(len(seeds), i) + np.linspace(-0.2, 0.2, len(seeds)), seeds, s=8,
               color="black", zorder=3)
  low = min(min(row["test_accuracy"]["per_seed"]) for row in ft)
  ax.set_ylim(max(0.0, low - 0.03), 1.0)
  ax.set_xticks(x, [row["method"].replace(" (", "\n(") for row in ft], fontsize=8)
  ax.set_ylabel("test accuracy, digits 5-9")
  ax.set_title(f"Fine-tuning: mean ± std over {len(finetune['seeds'])} seeds (best lr each)")

  ax = axes[1, 1]
  for row in ft:
    grid = [g["lr"] for g in row["grid"]]
    val = [g["val_accuracy"]["mean"] for g in row["grid"]]
    ax.plot(grid, val, marker="o", label=row["method"])
  ax.set_xscale("log")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("validation accuracy (mean over seeds)")
  ax.set_title("Learning-rate grid (validation split)")
  ax.legend(fontsize=8)
  fig.suptitle(f"ChildTuning (reserve_p = {RESERVE_P}): overhead and fine-tuning on digits")
  _common.save_figure(fig, out_dir, NAME)


def pct(stats, key="mean"):
  return f"{100 * stats[key]:.1f}"


def report(cfg, quick, rows, num_params, finetune, load) -> str:
  by = {row["variant"]: row for row in rows}
  default = by["F, hash (default)"]
  threefry, rbg = by["F, jax threefry"], by["F, jax rbg"]
  met = default["vs_adamw"]["median"] <= TARGET["default_vs_adamw_max"]
  ci_met = default["vs_adamw"]["ci_high"] <= TARGET["default_vs_adamw_max"]
  overhead_table = _common.markdown_table(
      ["variant", "optimizer", "step / AdamW step", "95% CI", "extra time in AdamW updates",
       "95% CI (extra)", "XLA bytes / AdamW", "mask density"],
      [[row["variant"], f"`{row['optimizer']}`", _common.fmt_ratio(row["vs_adamw"]),
        _common.fmt_ci(row["vs_adamw"]), _common.fmt_ratio(row["extra_in_adamw_updates"], 2),
        _common.fmt_ci(row["extra_in_adamw_updates"], 2),
        f"{row['xla_bytes_ratio']:.3f}", f"{row['mask_density']:.3f}"] for row in rows])
  ms = default["median_ms"]
  extra = lambda row: row["extra_in_adamw_updates"]["median"]
  ft_rows = finetune["rows"]
  ft_table = _common.markdown_table(
      ["method", "technique", "mask on", "best lr (validation)", "validation acc. %",
       "test acc. % (mean ± std)", "Δ test vs AdamW (paired, pp)", "final train loss"],
      [[row["method"], row["technique"], row["placement"], f"{row['best_lr']:g}",
        f"{pct(row['val_accuracy'])} ± {pct(row['val_accuracy'], 'std')}",
        f"{pct(row['test_accuracy'])} ± {pct(row['test_accuracy'], 'std')}",
        "—" if row["method"] == "AdamW" else
        f"{100 * row['diff_vs_adamw']['mean']:+.1f} ± {100 * row['diff_vs_adamw']['std']:.1f}",
        f"{row['final_train_loss']['mean']:.3g}"] for row in ft_rows])
  vanilla = ft_rows[0]
  best = max(ft_rows, key=lambda row: row["test_accuracy"]["mean"])
  worst = min(ft_rows, key=lambda row: row["test_accuracy"]["mean"])
  spread = best["test_accuracy"]["mean"] - worst["test_accuracy"]["mean"]
  beats = [row["method"] for row in ft_rows[1:]
           if row["diff_vs_adamw"]["mean"] > row["diff_vs_adamw"]["std"]
           / np.sqrt(len(finetune["seeds"])) * 2]
  loses = [row["method"] for row in ft_rows[1:]
           if -row["diff_vs_adamw"]["mean"] > row["diff_vs_adamw"]["std"]
           / np.sqrt(len(finetune["seeds"])) * 2]
  grid_text = ", ".join(f"{lr:g}" for lr in finetune["lr_grid"])
  sizes = finetune["sizes"]
  quick_note = " (quick: smoke-run sizes, the numbers mean little)" if quick else ""
  env = _common.environment()
  return "\n".join([
      f"# ChildTuning: overhead and fine-tuning{quick_note}",
      "",
      "## Overhead in an AdamW train step",
      "",
      f"MLP 784 → {cfg['width']}×{cfg['num_blocks'] + 1} → 10 ({num_params / 1e6:.2f}M "
      f"parameters), batch {BATCH}, jit-compiled forward + backward + update + "
      f"`apply_updates` on {env['device']} ({jax.default_backend()}, {env['cpu_count']} "
      f"cores, shared). `reserve_p = {RESERVE_P}`. Ratios are medians over {cfg['repeats']} "
      f"interleaved rounds (after {cfg['warmup']} warm-up) of same-round time ratios against "
      "plain `optax.adamw`; 95% CI: bootstrap of the median. *Extra time in AdamW updates*: "
      "(step − AdamW step) / AdamW update, per round, where *AdamW update* is AdamW alone "
      f"(gradients given: `update` + `apply_updates`, median {ms['adamw_update']:.1f} ms). "
      "XLA bytes: compiled memory traffic (static cost analysis, deterministic). Load "
      f"average after the timings (1 / 5 / 15 min): {load[0]:.1f} / {load[1]:.1f} / "
      f"{load[2]:.1f}.",
      "",
      overhead_table,
      "",
      f"**Target (default `prng=\"hash\"`, train step ≤ {TARGET['default_vs_adamw_max']}x "
      f"AdamW): {'met' if met else 'NOT met'}** — "
      f"{default['vs_adamw']['median']:.3f}x (95% CI "
      f"{default['vs_adamw']['ci_low']:.3f}–{default['vs_adamw']['ci_high']:.3f}"
      f"{', entirely below the target' if ci_met else ', reaching above the target'}); "
      f"median step {ms['step']:.1f} ms vs {ms['adamw_step']:.1f} ms.",
      "",
      "Why the default is a hash: a ChildTuning-F mask needs one random number per "
      "parameter every step. Drawn with `jax.random` and the default threefry key, the "
      f"masks cost {extra(threefry):.1f} AdamW updates and make the train step "
      f"{threefry['vs_adamw']['median']:.2f}x AdamW's; an rbg key (XLA's RngBitGenerator, "
      f"meant for accelerators) makes it {rbg['vs_adamw']['median']:.2f}x on this CPU. The "
      "counter hash (two rounds of `lowbias32` per pair of elements: a few integer ops per "
      f"element) costs {extra(default):.1f} AdamW updates "
      f"({extra(threefry) / max(extra(default), 1e-9):.1f}x less than threefry), and XLA "
      f"estimates its step's memory traffic at {default['xla_bytes_ratio']:.2f}x AdamW's "
      f"against {threefry['xla_bytes_ratio']:.2f}x for threefry. This measurement is the "
      "evidence for the choice.",
      "",
      "## Fine-tuning on digits",
      "",
      f"MLP 64 → {cfg['ft_width']}×{cfg['ft_layers'] + 1} → 5 "
      f"({finetune['num_params'] / 1e3:.0f}k parameters) "
      f"pretrained with Adam on digits 0–4 ({sizes['pretrain']} train examples, "
      f"{cfg['pretrain_steps']} steps; test accuracy on 0–4: "
      f"{100 * finetune['pretrain_test_accuracy_0_4']:.1f}%), then fine-tuned on digits "
      f"5–9: {PER_CLASS} train examples per class ({sizes['finetune']}), a new 5-way head "
      f"(fresh init), all parameters trained, {cfg['finetune_steps']} AdamW steps "
      f"(batch {FT_BATCH}, weight decay {WEIGHT_DECAY:g}), `reserve_p = {RESERVE_P}`. "
      f"{len(finetune['seeds'])} seeds; a seed fixes the fine-tuning subset, the head init "
      "and the mask key. ChildTuning-D's mask: `fisher_information` over the seed's "
      f"{sizes['finetune']} examples (batches of {FISHER_BATCH}, each tensor's gradient "
      f"clipped to norm {FISHER_CLIP:g}), `fisher_mask(..., {RESERVE_P}, "
      f"include=r\"{D_INCLUDE}\")`: the hidden layers only (kept fraction "
      f"{100 * finetune['d_mask_density_hidden_layers']['mean']:.1f}%); `embed` and "
      "`head` train freely, as the original leaves the embeddings and the classifier out. "
      f"Learning rate: each method's best of {{{grid_text}}} by mean validation accuracy "
      f"({sizes['validation']} held-out train examples of 5–9, not in the seed's subset). "
      f"Test: the {sizes['test']} test-split examples of 5–9, after the last step. Δ: mean "
      "± std over seeds of the same-seed difference to AdamW, in percentage points.",
      "",
      ft_table,
      "",
      f"Result: mean test accuracies from {pct(worst['test_accuracy'])}% "
      f"({worst['method']}) to {pct(best['test_accuracy'])}% ({best['method']}), a spread "
      f"of {100 * spread:.2f} pp against a seed-to-seed std of "
      f"{100 * vanilla['test_accuracy']['std']:.1f} pp for AdamW "
      f"({pct(vanilla['test_accuracy'])}%). "
      f"Paired differences larger than twice their standard error: "
      f"{'better than AdamW: ' + ', '.join(beats) if beats else 'none better than AdamW'}; "
      f"{'worse: ' + ', '.join(loses) if loses else 'none worse'}. "
      "The JSON holds every seed and the whole learning-rate grid.",
      "",
      "The two D placements can only differ through weight decay: with a fixed mask, "
      "Adam's moments of the masked coordinates stay zero, so in gradient placement those "
      "coordinates move by AdamW's weight decay alone, and in update placement not at all. "
      "F's placements differ in earnest: masking the gradient feeds Adam's moments a "
      "rescaled, sparse gradient (Su: in the long run a learning rate × √p), masking the "
      "update leaves the moments as AdamW's.",
  ])


def main():
  args = _common.parse_args(__doc__.splitlines()[0])
  if args.quick:  # before the first computation creates the backend (it reads XLA_FLAGS)
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *QUICK_XLA_FLAGS])
  cfg = config(args.quick)
  rows, num_params = measure_overhead(cfg)
  load = os.getloadavg()
  finetune = measure_finetune(cfg)
  markdown = report(cfg, args.quick, rows, num_params, finetune, load)
  _common.write_results(args.out, NAME, markdown=markdown, payload={
      "quick": args.quick,
      "config": {**cfg, "num_params": num_params, "batch": BATCH, "reserve_p": RESERVE_P,
                 "learning_rate": LEARNING_RATE, "per_class": PER_CLASS,
                 "finetune_batch": FT_BATCH, "fisher_batch": FISHER_BATCH,
                 "fisher_clip": FISHER_CLIP, "weight_decay": WEIGHT_DECAY,
                 "d_include": D_INCLUDE},
      "target": TARGET,
      "load_average": list(load),
      "rows": rows,
      "finetune": finetune,
  })
  plot(rows, num_params, finetune, args.out)


if __name__ == "__main__":
  main()
