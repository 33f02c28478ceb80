"""Overhead of gradtx's clipping and layer-wise transformations in a real train step.

Claim: chaining a gradtx transformation into ``optax.adam`` costs no more than writing
the same math by hand inside the step (target: step-time ratio <= 1.05).

Set-up: one jit-compiled Adam train step (forward, backward, update) of an MLP
784 → 1024 → 1024 → 1024 → 1024 → 1024 → 10 (5.0M parameters; ReLU, softmax
cross-entropy, batch 128 of fixed synthetic data). For every transformation three steps
are compiled:

- *gradtx*: ``optax.chain(<transformation>, optax.adam(1e-3))`` (clipping goes before
  Adam; the learning-rate multipliers of ``scale_by_path``/``layerwise_lr_decay`` after
  it, as their docstrings prescribe);
- *hand-written*: plain ``optax.adam(1e-3)`` with the same math written inline in the
  step with ``jnp`` (the global norm and the scale, the per-leaf multipliers, the
  AutoClip ring buffer and percentile, the ZClip statistics), carrying any statistics
  in the step's own state;
- *adam*: plain ``optax.adam(1e-3)``, for context.

They are timed in interleaved rounds (``_common.time_interleaved``) and reported as the
median over rounds of the same-round ratios gradtx / hand-written and gradtx / adam,
with a bootstrap confidence interval of the former's median (the JSON also holds
the quartiles, the ratio of medians and the median times). Before timing, both versions run a few
steps from the same start and must reach the same parameters (the ``max |Δθ|`` column),
which shows that the hand-written step computes the same thing; and XLA's static cost
analysis of the two compiled steps (bytes accessed, FLOPs) is compared, a deterministic
check that no extra memory traffic was compiled in.

``--quick``: one hidden block of width 128 (0.12M parameters) and 5 rounds instead of 100:
a smoke run whose ratios mean little (the step is too small to hide dispatch noise).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import compile_step, gradtx_step, init_mlp, layer_names, loss_fn
from tqdm.auto import tqdm

import gradtx

NAME = "overhead"
LEARNING_RATE = 1e-3
BATCH = 128
NUM_BLOCKS = 4  # hidden width → width layers between "embed" and "head"
GAMMA = 1.0  # clipping threshold (whether it is active does not change the cost)
CHECK_STEPS = 4  # steps run by both versions to compare their parameters


# --------------------------------------------------------------------------- model


# ---------------------------------------------------------- hand-written equivalents


class Hand(NamedTuple):
  """The same math written inline: ``pre`` acts on gradients, ``post`` on Adam's updates."""

  init: Callable[[Any], Any] = lambda params: ()
  pre: Callable[[Any, Any], tuple[Any, Any]] = lambda grads, extra: (grads, extra)
  post: Callable[[Any], Any] = lambda updates: updates


def _norm(tree):
  """The L2 norm as a careful hand-written step computes it: one pass of squares, and a
  second pass on ``g · 2^∓64`` only when the float32 sum overflowed or underflowed (so a
  finite gradient is never taken for an infinite one). XLA's cost analysis counts the
  bytes of both branches of the ``lax.cond``, so the baseline has the same guard."""
  leaves = jax.tree.leaves(tree)
  total = sum(jnp.sum(jnp.square(g)) for g in leaves)
  finfo = jnp.finfo(total.dtype)
  trusted_from = sum(g.size for g in leaves) * float(finfo.tiny) / float(finfo.eps)

  def rescaled(total):
    factor = jnp.where(total == jnp.inf, 2.0 ** -64, 2.0 ** 64).astype(total.dtype)
    return jnp.sqrt(sum(jnp.sum(jnp.square(g * factor)) for g in leaves)) / factor

  return jax.lax.cond((total < trusted_from) | (total == jnp.inf), rescaled, jnp.sqrt, total)


def _hand_global(mode):
  def pre(grads, extra):
    norm = _norm(grads)
    scale = GAMMA / jnp.maximum(norm, GAMMA) if mode == "hard" else GAMMA / (norm + GAMMA)
    return jax.tree.map(lambda g: g * scale, grads), extra
  return Hand(pre=pre)


def _hand_leaf():
  def pre(grads, extra):
    return jax.tree.map(lambda g: g * (GAMMA / jnp.maximum(_norm(g), GAMMA)), grads), extra
  return Hand(pre=pre)


AUTO_PERCENTILE, AUTO_HISTORY = 10.0, 1000


def _hand_auto_clip():
  def init(params):
    return jnp.zeros((AUTO_HISTORY,)), jnp.zeros((), jnp.int32)

  def pre(grads, extra):
    history, count = extra
    norm = _norm(grads)
    finite = jnp.isfinite(norm)
    history = jnp.where(finite, history.at[count % AUTO_HISTORY].set(norm), history)
    count = count + finite.astype(jnp.int32)
    valid = jnp.minimum(count, AUTO_HISTORY)
    ordered = jnp.sort(jnp.where(jnp.arange(AUTO_HISTORY) < valid, history, jnp.inf))
    position = AUTO_PERCENTILE / 100.0 * (valid - 1).astype(jnp.float32)
    low = jnp.floor(position).astype(jnp.int32)
    high = jnp.minimum(low + 1, valid - 1)
    threshold = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    scale = threshold / jnp.maximum(norm, threshold)
    return jax.tree.map(lambda g: g * scale, grads), (history, count)
  return Hand(init=init, pre=pre)


Z_ALPHA, Z_THRESH, Z_WARMUP, Z_EPS = 0.97, 2.5, 2, 1e-6


def _hand_zscore_clip():
  def init(params):
    return jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.zeros(())

  def pre(grads, extra):
    count, mean, var = extra
    norm = _norm(grads)
    warming_up = count < Z_WARMUP
    n = (count + 1).astype(jnp.float32)
    warm_mean = mean + (norm - mean) / n
    warm_var = ((n - 1) * var + (norm - mean) * (norm - warm_mean)) / n
    std = jnp.sqrt(var)
    z = (norm - mean) / (std + Z_EPS)
    spike = z > Z_THRESH
    clipped = jnp.where(spike, mean + Z_THRESH * std / (z / Z_THRESH), norm)
    ema_mean = Z_ALPHA * mean + (1 - Z_ALPHA) * clipped
    ema_var = Z_ALPHA * var + (1 - Z_ALPHA) * jnp.square(clipped - ema_mean)
    target = jnp.where(warming_up, norm, clipped)
    scale = jnp.where(norm > 0, target / norm, 1.0)
    extra = (count + 1, jnp.where(warming_up, warm_mean, ema_mean),
             jnp.where(warming_up, warm_var, ema_var))
    return jax.tree.map(lambda g: g * scale, grads), extra
  return Hand(init=init, pre=pre)


PATH_MULTIPLIERS = {"embed": 0.1, "head": 3.0}


def _hand_scale_by_path(num_blocks):
  multiplier = {name: PATH_MULTIPLIERS.get(name, 1.0) for name in layer_names(num_blocks)}

  def post(updates):
    return {layer: jax.tree.map(lambda u, m=multiplier[layer]: u * m, leaves)
            for layer, leaves in updates.items()}
  return Hand(post=post)


LLRD_DECAY = 0.75


def _hand_layerwise_lr_decay(num_blocks):
  depth = {name: d for d, name in enumerate(layer_names(num_blocks))}
  multiplier = {name: LLRD_DECAY ** (num_blocks + 1 - d) for name, d in depth.items()}

  def post(updates):
    return {layer: jax.tree.map(lambda u, m=multiplier[layer]: u * m, leaves)
            for layer, leaves in updates.items()}
  return Hand(post=post)


def _hand_by_path(num_blocks):
  """Embedding soft-clipped by its own norm, all blocks hard-clipped jointly, head as is."""
  blocks = layer_names(num_blocks)[1:-1]

  def pre(grads, extra):
    grads = dict(grads)
    embed_scale = GAMMA / (_norm(grads["embed"]) + GAMMA)
    grads["embed"] = jax.tree.map(lambda g: g * embed_scale, grads["embed"])
    block_scale = GAMMA / jnp.maximum(_norm([grads[b] for b in blocks]), GAMMA)
    for b in blocks:
      grads[b] = jax.tree.map(lambda g: g * block_scale, grads[b])
    return grads, extra
  return Hand(pre=pre)


def cases(num_blocks: int) -> list[tuple[str, optax.GradientTransformation, Hand]]:
  """(label, gradtx optimizer, hand-written equivalent) for every transformation."""
  adam = optax.adam(LEARNING_RATE)
  before = lambda tx: optax.chain(tx, adam)
  after = lambda tx: optax.chain(adam, tx)
  return [
      ("clip_by_global_norm (hard)",
       before(gradtx.clip_by_global_norm(GAMMA, mode="hard")), _hand_global("hard")),
      ("clip_by_global_norm (soft)",
       before(gradtx.clip_by_global_norm(GAMMA, mode="soft")), _hand_global("soft")),
      ("clip_by_leaf_norm (hard)", before(gradtx.clip_by_leaf_norm(GAMMA)), _hand_leaf()),
      ("auto_clip (p=10, history 1000)",
       before(gradtx.auto_clip(AUTO_PERCENTILE, history=AUTO_HISTORY)), _hand_auto_clip()),
      ("zscore_clip",
       before(gradtx.zscore_clip(alpha=Z_ALPHA, z_thresh=Z_THRESH, warmup_steps=Z_WARMUP,
                                 eps=Z_EPS)), _hand_zscore_clip()),
      ("scale_by_path (2 rules)",
       after(gradtx.scale_by_path({f"{k}/.*": v for k, v in PATH_MULTIPLIERS.items()})),
       _hand_scale_by_path(num_blocks)),
      ("layerwise_lr_decay (0.75)",
       after(gradtx.layerwise_lr_decay(
           LLRD_DECAY, num_layers=num_blocks,
           depth_rules={"embed/.*": 0, r"block_(\d+)/.*": 1, "head/.*": num_blocks + 1})),
       _hand_layerwise_lr_decay(num_blocks)),
      ("by_path (2 clip groups + identity)",
       before(gradtx.by_path({"embed/.*": gradtx.clip_by_global_norm(GAMMA, mode="soft"),
                              r"block_\d+/.*": gradtx.clip_by_global_norm(GAMMA)},
                             default=optax.identity())), _hand_by_path(num_blocks)),
  ]


# ------------------------------------------------------------------------ the steps


def hand_step(hand: Hand):
  adam = optax.adam(LEARNING_RATE)

  @jax.jit
  def step(params, state, x, y):
    adam_state, extra = state
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    grads, extra = hand.pre(grads, extra)
    updates, adam_state = adam.update(grads, adam_state, params)
    updates = hand.post(updates)
    return optax.apply_updates(params, updates), (adam_state, extra), loss
  return step, lambda params: (adam.init(params), hand.init(params))


def run_steps(step, params, state, x, y, num_steps):
  for _ in range(num_steps):
    params, state, _ = step(params, state, x, y)
  return params


def max_abs_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(u - v))) for u, v in
             zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ------------------------------------------------------------------------- reporting


def plot(rows, num_params, out_dir):
  plt = _common.pyplot()
  labels = [row["transformation"] for row in rows][::-1]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  y = np.arange(len(rows))
  for ax, key, title in [(axes[0], "vs_hand", "gradtx / hand-written (same math inline)"),
                         (axes[1], "vs_adam", "gradtx / plain optax.adam")]:
    med = np.array([row[key]["median"] for row in rows])[::-1]
    lo = np.array([row[key]["ci_low"] for row in rows])[::-1]
    hi = np.array([row[key]["ci_high"] for row in rows])[::-1]
    ax.barh(y, med - 1.0, left=1.0, xerr=[med - lo, hi - med], color="tab:blue", alpha=0.7,
            capsize=3)
    ax.axvline(1.0, color="black", lw=1)
    if key == "vs_hand":
      ax.axvline(1.05, color="tab:red", ls="--", lw=1, label="target 1.05")
      ax.legend(loc="lower right")
    ax.set_title(title)
    ax.set_xlabel("step-time ratio (median over rounds; bars: 95% CI)")
  axes[0].set_yticks(y, labels)
  fig.suptitle(f"Adam train step of a {num_params / 1e6:.2g}M-parameter MLP: overhead of "
               "each transformation")
  _common.save_figure(fig, out_dir, NAME)


def main():
  args = _common.parse_args(__doc__.splitlines()[0])
  width, num_blocks = (128, 1) if args.quick else (1024, NUM_BLOCKS)
  repeats, warmup = (5, 1) if args.quick else (100, 3)

  key_params, key_x, key_y = jax.random.split(jax.random.PRNGKey(0), 3)
  params = init_mlp(key_params, width, num_blocks)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  x = jax.random.normal(key_x, (BATCH, 784))
  y = jax.random.randint(key_y, (BATCH,), 0, 10)

  plain_tx = optax.adam(LEARNING_RATE)
  plain_state = plain_tx.init(params)
  plain, _ = compile_step(gradtx_step(plain_tx), params, plain_state, x, y)

  all_cases = cases(num_blocks)
  rows = []
  with tqdm(total=len(all_cases) * (repeats + warmup), desc=NAME, unit="round") as bar:
    for label, tx, hand in all_cases:
      ours_state = tx.init(params)
      ours, ours_cost = compile_step(gradtx_step(tx), params, ours_state, x, y)
      theirs, hand_init = hand_step(hand)
      theirs_state = hand_init(params)
      theirs, theirs_cost = compile_step(theirs, params, theirs_state, x, y)
      diff = max_abs_diff(run_steps(ours, params, ours_state, x, y, CHECK_STEPS),
                          run_steps(theirs, params, theirs_state, x, y, CHECK_STEPS))
      times = _common.time_interleaved(
          {"gradtx": functools.partial(ours, params, ours_state, x, y),
           "hand": functools.partial(theirs, params, theirs_state, x, y),
           "adam": functools.partial(plain, params, plain_state, x, y)},
          repeats=repeats, warmup=warmup, seed=len(rows), on_round=bar.update)
      rows.append({
          "transformation": label,
          "vs_hand": _common.paired_ratio(times["gradtx"], times["hand"]),
          "vs_adam": _common.paired_ratio(times["gradtx"], times["adam"]),
          "hand_vs_adam": _common.paired_ratio(times["hand"], times["adam"]),
          "median_ms": {k: float(np.median(v) * 1e3) for k, v in times.items()},
          "max_abs_param_diff": diff,
          "xla_cost": {"gradtx": ours_cost, "hand": theirs_cost},
          "xla_bytes_ratio": ours_cost["bytes_accessed"] / theirs_cost["bytes_accessed"],
          "xla_flops_ratio": ours_cost["flops"] / theirs_cost["flops"],
      })

  table = _common.markdown_table(
      ["transformation", "gradtx / hand-written", "95% CI", "gradtx / adam", "hand / adam",
       "XLA bytes gradtx / hand", f"max \\|Δθ\\| after {CHECK_STEPS} steps"],
      [[row["transformation"], _common.fmt_ratio(row["vs_hand"]),
        _common.fmt_ci(row["vs_hand"]), _common.fmt_ratio(row["vs_adam"]),
        _common.fmt_ratio(row["hand_vs_adam"]),
        f"{row['xla_bytes_ratio']:.4f}", f"{row['max_abs_param_diff']:.1e}"] for row in rows])
  worst = max(rows, key=lambda row: row["vs_hand"]["median"])
  quick = " (quick)" if args.quick else ""
  load = os.getloadavg()
  markdown = "\n".join([
      f"# Overhead of gradtx transformations in an Adam train step{quick}",
      "",
      f"MLP 784 → {width}×{num_blocks + 1} → 10 ({num_params / 1e6:.2f}M parameters), "
      f"batch {BATCH}, jit-compiled forward + backward + update on "
      f"{_common.environment()['device']} ({jax.default_backend()}). Ratios are medians over "
      f"{repeats} interleaved rounds (after {warmup} warm-up round(s)) of same-round step-time "
      "ratios; 95% CI: bootstrap confidence interval of the median gradtx / hand-written "
      "(resampling rounds). XLA bytes: ratio of the compiled steps' memory traffic as "
      "estimated by XLA's cost analysis (deterministic). Target: "
      f"gradtx / hand-written ≤ 1.05. Load average at the end (1 / 5 / 15 min): "
      f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores.",
      "",
      table,
      "",
      f"Worst: {worst['transformation']} at {worst['vs_hand']['median']:.3f}; "
      f"{sum(row['vs_hand']['median'] <= 1.05 for row in rows)}/{len(rows)} within target.",
  ])
  _common.write_results(args.out, NAME, markdown=markdown, payload={
      "quick": args.quick,
      "config": {"width": width, "num_blocks": num_blocks, "num_params": num_params,
                 "batch": BATCH, "repeats": repeats, "warmup": warmup,
                 "learning_rate": LEARNING_RATE, "gamma": GAMMA, "check_steps": CHECK_STEPS},
      "target": {"vs_hand_max": 1.05},
      "load_average": list(load),
      "rows": rows,
  })
  plot(rows, num_params, args.out)


if __name__ == "__main__":
  main()
