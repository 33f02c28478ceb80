"""Part ``clipping``: gradient clipping, on clean gradients and with injected spikes."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradtx
from gradtx.tour import _registry as registry
from gradtx.tour._data import MLP
from gradtx.tour._report import Figure, Panel, direction, finite, fmt_loss, mean_curve, run_values
from gradtx.tour._training import Runs, init_params, train

_SPIKE_EVERY = 50
_CLIP_MAX_NORM = 1.0
_NUM_LEAVES = 10  # the MLP's 5 Dense layers, a kernel and a bias each
_SPIKE_FACTORS = {"sgd": 100.0, "adam": 1000.0}
_OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(1e-3),
}

_CLIPPING_ABOUT = f"""
Zhang et al. (ICLR 2020): under (L0, L1)-smoothness the best step shrinks as the
gradient grows, `η* = 1/(L0 + L1‖g‖)`, which is what clipping does. Setting: the MLP
on the 10-digit task, trained by SGD (lr 0.05, momentum 0.9) and, in full mode, by
Adam (lr 1e-3), with each clipping rule chained in front of the optimizer: none;
`gradtx.clip_by_global_norm` hard and soft (γ = {_CLIP_MAX_NORM:g});
`gradtx.clip_by_leaf_norm` (γ = {_CLIP_MAX_NORM:g}/√{_NUM_LEAVES} per tensor);
`gradtx.auto_clip` (10th percentile of all past norms) and `gradtx.zscore_clip` (ZClip
defaults). Every run is trained twice from the same initialisation and minibatches:
on clean gradients, and with *injected gradient spikes*: every {_SPIKE_EVERY}th gradient
is multiplied by {_SPIKE_FACTORS["sgd"]:g} (SGD) or {_SPIKE_FACTORS["adam"]:g} (Adam),
a stand-in for a corrupted batch (Adam only in full mode). "Clipped steps" counts the
steps with `clip_scale < 1`, read from the optimizer state with `optax.tree_utils`
(`-` without clipping); "spikes clipped" counts the spiked steps among them; "mean
scale" is the mean `clip_scale` over steps (soft clipping scales every step by
`γ / (γ + ‖g‖)`, so it counts every step as clipped; the scale says by how much); "spike
×" is how much larger a spiked
step was than a typical one after clipping (median of `‖g‖·clip_scale` over spike steps
divided by its median over the others): about the spike factor without clipping, near 1
when a rule neutralises spikes.
"""


def _clip_rules(steps: int) -> list[tuple[str, optax.GradientTransformation | None]]:
  return [
      ("none", None),
      ("clip_by_global_norm hard", gradtx.clip_by_global_norm(_CLIP_MAX_NORM)),
      ("clip_by_global_norm soft", gradtx.clip_by_global_norm(_CLIP_MAX_NORM, mode="soft")),
      ("clip_by_leaf_norm", gradtx.clip_by_leaf_norm(_CLIP_MAX_NORM / math.sqrt(_NUM_LEAVES))),
      ("auto_clip(10)", gradtx.auto_clip(10.0, history=steps)),
      ("zscore_clip", gradtx.zscore_clip()),
  ]


def _optimizers(quick: bool) -> tuple[str, ...]:
  return ("sgd",) if quick else ("sgd", "adam")


def min_clip_scale(opt_state: Any) -> jax.Array:
  """The smallest ``clip_scale`` anywhere in an optimizer state (NaN if there is none).

  Reads every field named ``clip_scale`` (``optax.tree_utils.tree_get_all_with_path``),
  so it works for chains, per-leaf clipping (a tree of scales) and ``by_path``.
  """
  found = optax.tree_utils.tree_get_all_with_path(opt_state, "clip_scale")
  scales = [jnp.min(leaf) for _, value in found for leaf in jax.tree.leaves(value)]
  if not scales:
    return jnp.full((), jnp.nan, jnp.float32)
  return jnp.min(jnp.stack(scales)).astype(jnp.float32)


def _spike(grads: Any, t: jax.Array, factor: jax.Array) -> Any:
  """Multiplies the gradient by the run's ``factor`` at every ``_SPIKE_EVERY``-th step."""
  scale = jnp.where((t + 1) % _SPIKE_EVERY == 0, factor, 1.0)
  return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)


def _logs(grads: Any, opt_state: Any) -> dict[str, jax.Array]:
  return {"grad_norm": gradtx.global_norm(grads), "clip_scale": min_clip_scale(opt_state)}


def _clip_values(runs: Runs, sel: Any, spikes: bool) -> dict[str, float | None]:
  """Clipped steps, mean scale and, for spiked runs, spikes clipped and residual spike size."""
  scale = runs.logs["clip_scale"][sel]
  spike = (np.arange(scale.shape[-1]) + 1) % _SPIKE_EVERY == 0
  applied = runs.logs["grad_norm"][sel] * np.nan_to_num(scale, nan=1.0)
  gain = np.mean(np.median(applied[:, spike], 1) / np.median(applied[:, ~spike], 1))
  clipped = scale < 1.0 - 1e-6
  has_clip = not np.all(np.isnan(scale))
  return {"clipped_steps": float(clipped.sum(-1).mean()) if has_clip else None,
          "spikes_clipped": float(clipped[:, spike].sum(-1).mean())
          if has_clip and spikes else None,
          "mean_scale": float(scale.mean()) if has_clip else None,
          "spike_gain": float(gain) if spikes else None}


@registry.part("clipping", "Gradient clipping, clean and with injected spikes", _CLIPPING_ABOUT)
def _clipping(ctx: registry.Context) -> registry.PartResult:
  cfg, data = ctx.config, ctx.data
  model = MLP()
  seeds, steps = cfg.seeds, cfg.steps
  keys = jax.random.split(jax.random.key(1), (2, seeds))
  # Runs are [clean seeds..., spiked seeds...]: same init and minibatches, paired.
  init = jax.tree.map(lambda a: jnp.concatenate([a, a]), init_params(model, keys[0]))
  batch_keys = jnp.concatenate([keys[1], keys[1]])
  clean, spiked = slice(0, seeds), slice(seeds, 2 * seeds)
  optimizers = _optimizers(cfg.quick)

  jobs = [(opt, name, clip) for opt in optimizers for name, clip in _clip_rules(steps)]
  rows: list[registry.Row] = []
  curves: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  for opt, name, clip in ctx.track(jobs):
    tx = _OPTIMIZERS[opt]() if clip is None else optax.chain(clip, _OPTIMIZERS[opt]())
    factor = _SPIKE_FACTORS[opt]
    factors = jnp.asarray(np.concatenate([np.ones(seeds), np.full(seeds, factor)]),
                          jnp.float32)
    runs = train(model.apply, tx, init, data, steps=steps, keys=batch_keys,
                 batch_size=cfg.batch_size, per_run=factors, grad_hook=_spike, log_fn=_logs)
    for sel, setting, is_clean in ((clean, "clean", True),
                                   (spiked, f"spikes ×{factor:g}", False)):
      values = {**run_values(runs, sel), **_clip_values(runs, sel, spikes=not is_clean)}
      rows.append(registry.Row(name, f"{opt}, {setting}", values, clean=is_clean))
    curves.setdefault((opt, "clean"), {})[name] = mean_curve(runs.loss, clean)
    curves.setdefault((opt, "spikes"), {})[name] = mean_curve(runs.loss, spiked)
    if clip is not None:
      clipped = runs.logs["clip_scale"][spiked] < 1.0 - 1e-6
      curves.setdefault((opt, "clipped"), {})[name] = np.cumsum(clipped.mean(0))

  spike_steps = [s for s in range(steps) if (s + 1) % _SPIKE_EVERY == 0]
  figures = [Figure(f"clipping_{opt}", f"{opt}: minibatch loss (mean over seeds) and "
                    "clipped steps; grey lines mark the spikes", [
      Panel(f"{opt}, clean gradients", curves[opt, "clean"]),
      Panel(f"{opt}, spikes ×{_SPIKE_FACTORS[opt]:g} every {_SPIKE_EVERY} steps",
            curves[opt, "spikes"], vlines=spike_steps, ymax=20.0),
      Panel(f"{opt}, spikes: cumulative clipped steps", curves[opt, "clipped"],
            ylabel="clipped steps", logy=False, vlines=spike_steps),
  ]) for opt in optimizers]
  columns = [registry.TRAIN_LOSS, registry.TEST_ACC,
             registry.Column("clipped_steps", f"clipped steps (of {steps})", ".0f"),
             registry.Column("spikes_clipped", f"spikes clipped (of {len(spike_steps)})", ".0f"),
             registry.Column("mean_scale", "mean scale", ".3f"),
             registry.Column("spike_gain", "spike ×")]
  findings = [line for opt in optimizers for line in _findings(rows, opt, steps)]
  return registry.PartResult(columns, rows, figures, findings)


def _findings(rows: list[registry.Row], opt: str, steps: int) -> list[str]:
  """The findings for one optimizer, worded from its rows."""
  by = {(r.technique, r.clean): r.values for r in rows if r.setting.startswith(opt + ",")}
  base, base_clean = by["none", False], by["none", True]
  rules = [t for (t, c) in by if not c and t != "none"]

  def spiked(technique: str, key: str) -> float:
    return registry.number(by[technique, False], key)

  worst = max(rules, key=lambda t: finite(spiked(t, "train_loss")))
  every = [t for t in rules if spiked(t, "clipped_steps") >= steps - 0.5]
  spikes_only = [t for t in rules if t not in every
                 and spiked(t, "spike_gain") < 0.1 * spiked("none", "spike_gain")]
  counts = ", ".join(f"{t} {by[t, False]['clipped_steps']:.0f} "
                     f"({by[t, False]['spikes_clipped']:.0f} spikes, mean scale "
                     f"{by[t, False]['mean_scale']:.2f})" for t in rules)
  factor = _SPIKE_FACTORS[opt]
  return [
      f"- {opt}: spikes ×{factor:g} take the unclipped run from train loss "
      f"{fmt_loss(registry.number(base_clean, 'train_loss'))} (test acc "
      f"{base_clean['test_acc']:.3f}) to {fmt_loss(spiked('none', 'train_loss'))} (test acc "
      f"{base['test_acc']:.3f}); with clipping, the worst spiked run ends at "
      f"{fmt_loss(spiked(worst, 'train_loss'))} ({worst}, "
      f"test acc {by[worst, False]['test_acc']:.3f}), "
      f"{direction(spiked(worst, 'train_loss'), spiked('none', 'train_loss'))} "
      "than without.",
      f"- {opt}, clipped steps out of {steps} with spikes: {counts}.",
      f"- {opt}: rules that scale every step: {', '.join(every) or 'none'}; rules that "
      f"shrink the spikes more than 10× below the unclipped spike × "
      f"({base['spike_gain']:.3g}) while leaving some steps alone: "
      f"{', '.join(spikes_only) or 'none'}.",
  ]
