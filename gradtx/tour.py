"""The gradtx tour: every technique trains small real models on ``load_digits``.

Run it with ``python -m gradtx.tour`` (a few minutes on a laptop CPU) or
``python -m gradtx.tour --quick`` (under a minute). It prints a results table and writes
``tour_report/`` (``--out``): ``report.md`` with the tables and a short explanation per
part, ``results.json`` with every number, and one PNG of curves per figure.

The data is scikit-learn's offline copy of the UCI handwritten digits (1797 8×8 images,
10 classes), standardised with the training split's statistics; nothing is downloaded.

The tour is a registry of *parts*. A part is a function ``run(ctx) -> PartResult``
registered with :func:`part`; it trains what it wants with :func:`train` (one
jit-compiled ``lax.scan`` per transformation, ``vmap``-ed over seeds and scenarios)
and returns table rows and figures. Adding a technique to the tour means adding one
more part::

  @part("my_technique", "Title", "What the part shows, in markdown.")
  def _my_technique(ctx: Context) -> PartResult:
    ...

``--only NAME`` runs a subset of the parts; ``--list`` names them.

Importing this module has no side effects: the data, scikit-learn and matplotlib are
loaded only when a part runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradtx

# --------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------


class Dataset(NamedTuple):
  """Standardised digits: float32 images (n, 64) and int32 labels, split in two."""

  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array


def load_data(*, test_size: float = 0.3, seed: int = 0) -> Dataset:
  """``sklearn.datasets.load_digits``, a fixed stratified split, standardised per pixel.

  Mean and standard deviation come from the training split only; pixels that are
  constant there (the image border) are centred and left unscaled.
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  x, y = load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_size, random_state=seed, stratify=y
  )
  mean, std = x_train.mean(axis=0), x_train.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  as_x = lambda a: jnp.asarray((a - mean) / std, jnp.float32)
  as_y = lambda a: jnp.asarray(a, jnp.int32)
  return Dataset(as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test))


class MLP(nn.Module):
  """``embed`` → ``layer_0 … layer_{L-1}`` → ``head``: ReLU Dense layers named by depth.

  The names make the parameter paths (``params/layer_1/kernel``) that the path rules of
  :func:`gradtx.layerwise_lr_decay` and :func:`gradtx.scale_by_path` match.
  """

  width: int = 64
  num_layers: int = 3
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(self.width, name="embed")(x))
    for i in range(self.num_layers):
      x = nn.relu(nn.Dense(self.width, name=f"layer_{i}")(x))
    return nn.Dense(self.num_classes, name="head")(x)


#: Depth rules for :class:`MLP` with ``num_layers=3`` (embed 0, layer_i i+1, head 4).
MLP_DEPTH_RULES = {"params/embed/.*": 0, r"params/layer_(\d+)/.*": 1, "params/head/.*": 4}


def init_params(model: nn.Module, keys: jax.Array) -> Any:
  """One set of parameters per key, stacked along a leading axis."""
  return jax.vmap(lambda k: model.init(k, jnp.zeros((1, 64), jnp.float32)))(keys)


# --------------------------------------------------------------------------------------
# Training: one compiled program per transformation, vmapped over runs
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runs:
  """What :func:`train` returns; every array has a leading axis of runs ``R``.

  Attributes:
    loss: ``[R, steps]`` minibatch loss at each step, before the update.
    grad_norm: ``[R, steps]`` global norm of the gradient handed to the optimizer
      (after any injected spike, before any clipping).
    clip_scale: ``[R, steps]`` the smallest ``clip_scale`` found in the optimizer state
      after the step (``optax.tree_utils``; NaN when the transformation has none).
    train_loss: ``[R]`` full-batch loss on each run's training set after the last step.
    test_acc: ``[R]`` accuracy on the test split after the last step.
    params: the final parameters, stacked over runs.
  """

  loss: np.ndarray
  grad_norm: np.ndarray
  clip_scale: np.ndarray
  train_loss: np.ndarray
  test_acc: np.ndarray
  params: Any

  def clipped(self) -> np.ndarray:
    """``[R, steps]`` bool: the steps whose gradient was scaled down by clipping."""
    return np.nan_to_num(self.clip_scale, nan=1.0) < 1.0 - 1e-6


def _cross_entropy(apply_fn: Callable, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  logits = apply_fn(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


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


def train(
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    params: Any,
    data: Dataset,
    *,
    steps: int,
    keys: jax.Array,
    batch_size: int = 64,
    train_idx: Any = None,
    spike_factor: Any = None,
    spike_every: int = 0,
) -> Runs:
  """Trains ``R`` runs of one transformation in a single jit-compiled program.

  Each run minimises the cross-entropy of ``apply_fn`` on its own training examples
  with minibatches drawn (with replacement) from its own key; the loop over steps is a
  ``lax.scan`` and the runs are ``vmap``-ed, so the whole call compiles once.

  Args:
    apply_fn: ``(params, x) -> logits``.
    tx: the optax transformation (optimizer and techniques) under study.
    params: initial parameters stacked over runs (leading axis ``R``).
    data: the dataset; labels may be any integer task.
    steps: number of updates.
    keys: ``[R]`` PRNG keys that draw the minibatches.
    batch_size: minibatch size.
    train_idx: ``[R, n]`` indices of each run's training examples (default: all).
    spike_factor: ``[R]`` gradient multipliers injected every ``spike_every`` steps
      (steps ``spike_every - 1``, ``2 * spike_every - 1``, ...); 1 means no spikes.
    spike_every: spike period; 0 disables spikes.

  Returns:
    :class:`Runs` with numpy arrays.
  """
  num_runs = keys.shape[0]
  if train_idx is None:
    train_idx = jnp.arange(data.x_train.shape[0])
  train_idx = jnp.broadcast_to(jnp.asarray(train_idx, jnp.int32),
                               (num_runs, jnp.shape(train_idx)[-1]))
  if spike_factor is None:
    spike_factor = jnp.ones((num_runs,), jnp.float32)
  spike_factor = jnp.asarray(spike_factor, jnp.float32)
  loss_fn = lambda p, x, y: _cross_entropy(apply_fn, p, x, y)

  def one_run(params, key, idx, factor):
    x, y = data.x_train[idx], data.y_train[idx]

    def step(carry, inputs):
      params, opt_state = carry
      t, step_key = inputs
      batch = jax.random.randint(step_key, (batch_size,), 0, idx.shape[0])
      loss, grads = jax.value_and_grad(loss_fn)(params, x[batch], y[batch])
      if spike_every:
        spike = (t + 1) % spike_every == 0
        scale = jnp.where(spike, factor, 1.0)
        grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
      grad_norm = gradtx.global_norm(grads)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), (loss, grad_norm, min_clip_scale(opt_state))

    inputs = (jnp.arange(steps), jax.random.split(key, steps))
    (params, _), (loss, grad_norm, clip) = jax.lax.scan(step, (params, tx.init(params)), inputs)
    train_loss = loss_fn(params, x, y)
    test_acc = jnp.mean(jnp.argmax(apply_fn(params, data.x_test), -1) == data.y_test)
    return loss, grad_norm, clip, train_loss, test_acc, params

  out = jax.device_get(jax.jit(jax.vmap(one_run))(params, keys, train_idx, spike_factor))
  return Runs(*(np.asarray(a) for a in out[:5]), params=out[5])


# --------------------------------------------------------------------------------------
# Parts: registry, results, context
# --------------------------------------------------------------------------------------


_SPIKE_EVERY = 50


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the tour; ``quick`` shrinks every part to run in under a minute."""

  quick: bool = False
  seeds: int = 3
  steps: int = 1500
  pretrain_steps: int = 1000
  finetune_steps: int = 400
  batch_size: int = 64
  spike_every: int = _SPIKE_EVERY

  @classmethod
  def make(cls, quick: bool, seeds: int | None = None) -> Config:
    if quick:
      return cls(quick=True, seeds=seeds or 2, steps=300, pretrain_steps=300,
                 finetune_steps=150)
    return cls(seeds=seeds or 3)


@dataclasses.dataclass
class Row:
  """One line of a results table: means over seeds (``*_std``: their spread).

  ``clipped_steps`` is the mean number of steps with ``clip_scale < 1`` (``None`` when
  the transformation has no ``clip_scale``); ``clean`` says whether the run saw only
  the plain task (no injected faults), ``chance`` is the accuracy of guessing.
  ``extras`` are more columns, shown in the part's own table in ``report.md``.
  """

  technique: str
  setting: str
  train_loss: float
  test_acc: float
  test_acc_std: float = 0.0
  clipped_steps: float | None = None
  steps: int = 0
  clean: bool = True
  chance: float = 0.1
  extras: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Panel:
  """One axes of a figure: named curves over steps (``[steps]`` arrays)."""

  title: str
  curves: dict[str, np.ndarray]
  ylabel: str = "loss"
  logy: bool = True
  vlines: Sequence[float] = ()


@dataclasses.dataclass
class Figure:
  """A PNG: ``name`` is the file stem; panels are laid out in a row."""

  name: str
  title: str
  panels: list[Panel]


@dataclasses.dataclass
class PartResult:
  """What a part returns: rows for the tables, figures, and findings in markdown."""

  rows: list[Row]
  figures: list[Figure] = dataclasses.field(default_factory=list)
  findings: str = ""


@dataclasses.dataclass
class Context:
  """What a part receives: the configuration, the data and a progress wrapper."""

  config: Config
  data: Dataset
  progress: bool = True
  part_name: str = ""

  def track(self, items: Sequence[Any], unit: str = "run") -> Iterable[Any]:
    """``tqdm`` over the part's runs (silent with ``--no-progress``)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=self.part_name, unit=unit, disable=not self.progress,
                leave=False)


@dataclasses.dataclass(frozen=True)
class Part:
  """A registered part of the tour."""

  name: str
  title: str
  about: str
  run: Callable[[Context], PartResult]


PARTS: dict[str, Part] = {}


def part(name: str, title: str, about: str) -> Callable:
  """Registers ``run(ctx) -> PartResult`` as a part of the tour, in definition order."""

  def register(run: Callable[[Context], PartResult]) -> Callable[[Context], PartResult]:
    if name in PARTS:
      raise ValueError(f"a tour part named {name!r} is already registered")
    PARTS[name] = Part(name, title, about.strip(), run)
    return run

  return register


def _mean_std(values: np.ndarray) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(np.mean(values)), float(np.std(values))


def _row(technique: str, setting: str, runs: Runs, sel: Any = slice(None), *, clean: bool = True,
         chance: float = 0.1, extras: dict[str, str] | None = None) -> Row:
  """A row from the runs ``sel`` selects (the seeds of one setting)."""
  acc, acc_std = _mean_std(runs.test_acc[sel])
  has_clip = not np.all(np.isnan(runs.clip_scale[sel]))
  return Row(
      technique=technique,
      setting=setting,
      train_loss=_mean_std(runs.train_loss[sel])[0],
      test_acc=acc,
      test_acc_std=acc_std,
      clipped_steps=float(runs.clipped()[sel].sum(-1).mean()) if has_clip else None,
      steps=int(runs.loss.shape[-1]),
      clean=clean,
      chance=chance,
      extras=dict(extras or {}),
  )


def smooth(curve: np.ndarray, window: int) -> np.ndarray:
  """Trailing moving average (the first points average what exists so far).

  Example:
    >>> from gradtx.tour import smooth
    >>> smooth([1.0, 3.0, 5.0, 7.0], 2).tolist()
    [1.0, 2.0, 4.0, 6.0]
  """
  curve = np.asarray(curve, np.float64)
  cumsum = np.concatenate([[0.0], np.cumsum(curve)])
  idx = np.arange(1, len(curve) + 1)
  start = np.maximum(idx - window, 0)
  return (cumsum[idx] - cumsum[start]) / (idx - start)


def _loss_curve(runs: Runs, sel: Any, steps: int) -> np.ndarray:
  """The minibatch loss averaged over the selected runs, smoothed over ~2% of the steps."""
  return smooth(np.mean(runs.loss[sel], axis=0), max(1, steps // 50))


# --------------------------------------------------------------------------------------
# Part: layer-wise learning rates
# --------------------------------------------------------------------------------------

_LAYERWISE_ABOUT = """
Su's "free gradient" view: reparametrising ``θ = λφ`` turns Adam's learning rate into
``λη`` for that layer, so a per-layer learning rate is a per-leaf multiplier on the
update, chosen by the parameter's path. The natural use is fine-tuning: keep what a
pretrained body knows while a fresh head learns. Setting: an MLP (``embed``, 3 hidden
``layer_i``, ``head``) is pretrained on 10-class digits using half of the training
split; then a new head is fitted on a *different* task, the parity of the digit, from
only a few labelled images per digit taken from the other half, with Adam (lr 3e-3).
Compared: training from scratch, plain fine-tuning, ``gradtx.layerwise_lr_decay(0.5)``
(ELECTRA/BEiT; depth rules ``params/layer_(\\d+)/.*`` by path: head ×1, layer_2 ×0.5,
..., embed ×0.0625) and ``gradtx.scale_by_path`` (body ×0.1, head ×1; and body ×0, a
linear probe). Test accuracy is parity accuracy on the whole test split (chance 0.5).
"""


@part("layerwise", "Layer-wise learning rates for fine-tuning", _LAYERWISE_ABOUT)
def _layerwise(ctx: Context) -> PartResult:
  cfg, data = ctx.config, ctx.data
  model = MLP()
  n_train = int(data.x_train.shape[0])
  y_train = np.asarray(data.y_train)
  seeds = np.arange(cfg.seeds)
  shots = 5
  lr = 3e-3

  # Upstream half (pretraining) and downstream half (few-shot fine-tuning), per seed.
  upstream, subsets = [], []
  for seed in seeds:
    rng = np.random.default_rng(1000 + seed)
    perm = rng.permutation(n_train)
    up, down = perm[: n_train // 2], perm[n_train // 2:]
    upstream.append(up)
    subsets.append(np.concatenate(
        [rng.choice(down[y_train[down] == c], shots, replace=False) for c in range(10)]
    ))
  upstream, subsets = np.stack(upstream), np.stack(subsets)
  parity = data._replace(y_train=data.y_train % 2, y_test=data.y_test % 2)

  keys = jax.random.split(jax.random.key(0), (4, cfg.seeds))
  init = init_params(model, keys[0])
  fresh = init_params(model, keys[1])

  body = "params/(embed|layer_.*)/.*"
  methods = [
      ("adam, from scratch", fresh, optax.adam(lr)),
      ("adam, fine-tune", None, optax.adam(lr)),
      ("layerwise_lr_decay(0.5)", None, optax.chain(
          optax.adam(lr),
          gradtx.layerwise_lr_decay(0.5, num_layers=3, depth_rules=MLP_DEPTH_RULES))),
      ("scale_by_path(body ×0.1)", None, optax.chain(
          optax.adam(lr), gradtx.scale_by_path({body: 0.1}))),
      ("scale_by_path(body ×0): probe", None, optax.chain(
          optax.adam(lr), gradtx.scale_by_path({body: 0.0}))),
  ]
  jobs = [("pretrain", None, optax.adam(1e-3))] + methods
  rows, curves, pretrained = [], {}, None
  for name, start, tx in ctx.track(jobs):
    if name == "pretrain":
      runs = train(model.apply, tx, init, data, steps=cfg.pretrain_steps, keys=keys[2],
                   batch_size=cfg.batch_size, train_idx=upstream)
      pretrained = runs.params
      pre_acc, pre_std = _mean_std(runs.test_acc)
      continue
    if start is None:  # the pretrained body under a fresh head
      start = {"params": dict(pretrained["params"], head=fresh["params"]["head"])}
    runs = train(model.apply, tx, start, parity, steps=cfg.finetune_steps, keys=keys[3],
                 batch_size=cfg.batch_size, train_idx=subsets)
    rows.append(_row(name, f"parity, {shots * 10} shots", runs, chance=0.5))
    curves[name] = _loss_curve(runs, slice(None), cfg.finetune_steps)

  best = max(rows, key=lambda r: r.test_acc)
  scratch, plain = rows[0], rows[1]
  findings = (
      f"Pretraining (10 digits, {upstream.shape[1]} images, {cfg.pretrain_steps} steps) "
      f"reaches test accuracy {pre_acc:.3f} ± {pre_std:.3f}. On the few-shot parity task "
      f"plain fine-tuning scores {plain.test_acc:.3f} against {scratch.test_acc:.3f} from "
      f"scratch; the best is {best.technique} at {best.test_acc:.3f}. Slowing the body "
      "down trades fit to the few labelled images (higher train loss) for keeping the "
      "pretrained features (higher test accuracy)."
  )
  figure = Figure("layerwise", "Few-shot fine-tuning: minibatch loss (mean over seeds)",
                  [Panel("fine-tuning on parity", curves)])
  return PartResult(rows, [figure], findings)


# --------------------------------------------------------------------------------------
# Part: clipping, on clean gradients and with injected spikes
# --------------------------------------------------------------------------------------

_CLIP_MAX_NORM = 1.0
_NUM_LEAVES = 10  # MLP with 5 Dense layers: a kernel and a bias each.
_SPIKE_FACTORS = {"sgd": 100.0, "adam": 1000.0}

_CLIPPING_ABOUT = f"""
Zhang et al. (ICLR 2020): under (L0, L1)-smoothness the best step shrinks as the gradient
grows, ``η* = 1/(L0 + L1‖g‖)``, which is what clipping does. Setting: the MLP on the
10-class task, trained by SGD (lr 0.05, momentum 0.9) and by Adam (lr 1e-3) with each
clipping rule chained in front of the optimizer: none; ``gradtx.clip_by_global_norm``
hard and soft (γ = {_CLIP_MAX_NORM}); ``gradtx.clip_by_leaf_norm`` (γ = {_CLIP_MAX_NORM}/√10
per tensor); ``gradtx.auto_clip`` (10th percentile of all past norms) and
``gradtx.zscore_clip`` (ZClip defaults). Every run is trained twice from the same
initialisation and minibatches: on clean gradients, and with *injected gradient
spikes* — every {_SPIKE_EVERY}th gradient multiplied by {_SPIKE_FACTORS["sgd"]:g} (SGD) or
{_SPIKE_FACTORS["adam"]:g} (Adam), a stand-in for a corrupted batch or a loss spike.
"Clipped steps" counts the steps with ``clip_scale < 1``, read from the optimizer state
with ``optax.tree_utils``; "spike ×" is the size of a spiked step after clipping
relative to a typical step (the median over spike steps of ``‖g‖·clip_scale`` divided
by its median over the other steps): without clipping it is roughly the spike factor,
a rule that neutralises spikes brings it near 1.
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


def _spike_gain(runs: Runs, sel: Any, every: int) -> float:
  """Median post-clip norm on spike steps over its median on the other steps."""
  scale = np.nan_to_num(runs.clip_scale[sel], nan=1.0)
  applied = runs.grad_norm[sel] * scale
  spike = (np.arange(applied.shape[-1]) + 1) % every == 0
  gains = np.median(applied[:, spike], axis=1) / np.median(applied[:, ~spike], axis=1)
  return float(np.mean(gains))


@part("clipping", "Gradient clipping, clean and with injected spikes", _CLIPPING_ABOUT)
def _clipping(ctx: Context) -> PartResult:
  cfg, data = ctx.config, ctx.data
  model = MLP()
  seeds, steps, every = cfg.seeds, cfg.steps, cfg.spike_every
  keys = jax.random.split(jax.random.key(1), (2, seeds))
  # Runs [clean seeds..., spiked seeds...]: same init and minibatches, paired.
  init = init_params(model, jnp.concatenate([keys[0], keys[0]]))
  batch_keys = jnp.concatenate([keys[1], keys[1]])
  clean, spiked = slice(0, seeds), slice(seeds, 2 * seeds)
  optimizers = {"sgd": lambda: optax.sgd(0.05, momentum=0.9), "adam": lambda: optax.adam(1e-3)}

  jobs = [(opt, name, clip) for opt in optimizers for name, clip in _clip_rules(steps)]
  rows, figures = [], []
  curves = {(opt, kind): {} for opt in optimizers for kind in ("clean", "spikes", "clipped")}
  for opt, name, clip in ctx.track(jobs):
    tx = optimizers[opt]() if clip is None else optax.chain(clip, optimizers[opt]())
    factor = _SPIKE_FACTORS[opt]
    factors = jnp.concatenate([jnp.ones(seeds), jnp.full(seeds, factor)])
    runs = train(model.apply, tx, init, data, steps=steps, keys=batch_keys,
                 batch_size=cfg.batch_size, spike_factor=factors, spike_every=every)
    gain = f"{_spike_gain(runs, spiked, every):.3g}"
    rows.append(_row(name, f"{opt}, clean", runs, clean, extras={"spike ×": "-"}))
    rows.append(_row(name, f"{opt}, spikes ×{factor:g}", runs, spiked, clean=False,
                     extras={"spike ×": gain}))
    curves[opt, "clean"][name] = _loss_curve(runs, clean, steps)
    curves[opt, "spikes"][name] = _loss_curve(runs, spiked, steps)
    if clip is not None:
      curves[opt, "clipped"][name] = np.cumsum(runs.clipped()[spiked].mean(0))

  spike_steps = [s for s in range(steps) if (s + 1) % every == 0]
  for opt in optimizers:
    figures.append(Figure(f"clipping_{opt}", f"{opt}: minibatch loss (mean over seeds) and "
                          "clipped steps", [
        Panel(f"{opt}, clean gradients", curves[opt, "clean"]),
        Panel(f"{opt}, spikes ×{_SPIKE_FACTORS[opt]:g} every {every} steps",
              curves[opt, "spikes"], vlines=spike_steps),
        Panel(f"{opt}, spikes: cumulative clipped steps", curves[opt, "clipped"],
              ylabel="clipped steps", logy=False, vlines=spike_steps),
    ]))

  lines = []
  for opt in optimizers:
    by = {(r.technique, r.clean): r for r in rows if r.setting.startswith(opt)}
    base, base_clean = by["none", False], by["none", True]
    clipped_spiked = [r for (t, c), r in by.items() if not c and t != "none"]
    worst = max(clipped_spiked, key=lambda r: _finite(r.train_loss))
    lines.append(
        f"- {opt}: spikes take the unclipped run from train loss {base_clean.train_loss:.3g} "
        f"(test acc {base_clean.test_acc:.3f}) to {base.train_loss:.3g} (test acc "
        f"{base.test_acc:.3f}); with clipping the worst spiked run ends at "
        f"{worst.train_loss:.3g} ({worst.technique}, test acc {worst.test_acc:.3f})."
    )
  lines.append(
      "- The fixed thresholds clip the large early gradients as well as the spikes; soft "
      "clipping scales every step; AutoClip clips ~90% of steps by construction (10th "
      "percentile); ZClip clips (almost) only the spikes, after its 25-step warm-up."
  )
  return PartResult(rows, figures, "\n".join(lines))


def _finite(x: float) -> float:
  return x if math.isfinite(x) else math.inf


# --------------------------------------------------------------------------------------
# Report: console table, markdown, JSON, PNGs
# --------------------------------------------------------------------------------------


def _fmt_loss(x: float) -> str:
  return f"{x:.4g}" if math.isfinite(x) else "nan (diverged)"


def _fmt_clipped(row: Row) -> str:
  return "-" if row.clipped_steps is None else f"{row.clipped_steps:.0f}/{row.steps}"


def format_table(rows: Sequence[Row], *, part_names: Sequence[str] | None = None,
                 extras: bool = False) -> str:
  """A markdown table of rows (optionally a leading ``part`` column and the extras).

  Example:
    >>> from gradtx.tour import Row, format_table
    >>> print(format_table([Row("adam", "clean", 0.01, 0.95, steps=100)]))
    | technique | setting | train loss | test acc | clipped steps |
    |---|---|---|---|---|
    | adam | clean | 0.01 | 0.950 ± 0.000 | - |
  """
  extra_keys = list(dict.fromkeys(k for r in rows for k in r.extras)) if extras else []
  header = (["part"] if part_names else []) + [
      "technique", "setting", "train loss", "test acc", "clipped steps"] + extra_keys
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for i, row in enumerate(rows):
    cells = ([part_names[i]] if part_names else []) + [
        row.technique, row.setting, _fmt_loss(row.train_loss),
        f"{row.test_acc:.3f} ± {row.test_acc_std:.3f}", _fmt_clipped(row),
    ] + [row.extras.get(k, "") for k in extra_keys]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _plot(figure: Figure, path: str) -> None:
  """Writes one figure as a PNG with matplotlib's Agg canvas (no pyplot, no GUI)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure as MplFigure

  n = len(figure.panels)
  fig = MplFigure(figsize=(5.2 * n, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, n, squeeze=False)[0]
  for ax, panel in zip(axes, figure.panels, strict=True):
    for x in panel.vlines:
      ax.axvline(x, color="0.85", lw=0.6, zorder=0)
    for i, (label, curve) in enumerate(panel.curves.items()):
      style = "--" if i >= 10 else "-"
      ax.plot(np.arange(len(curve)), curve, style, lw=1.3, label=label)
    if panel.logy:
      ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if panel.curves:
      ax.legend(fontsize=7)
  fig.suptitle(figure.title, fontsize=11)
  fig.savefig(path, dpi=110)


def write_report(out: str, config: Config, results: dict[str, PartResult],
                 seconds: dict[str, float], data: Dataset) -> None:
  """Writes ``report.md``, ``results.json`` and the PNGs into ``out``."""
  import os

  os.makedirs(out, exist_ok=True)
  mode = "quick" if config.quick else "full"
  md = [
      "# gradtx tour",
      "",
      f"`python -m gradtx.tour{' --quick' if config.quick else ''}` ({mode} mode, "
      f"{config.seeds} seeds per run, gradtx {gradtx.__version__}, jax {jax.__version__}, "
      f"optax {optax.__version__}). Data: `sklearn.datasets.load_digits`, "
      f"{data.x_train.shape[0]} training / {data.x_test.shape[0]} test images, standardised. "
      "Numbers are means over seeds (test accuracy ± its standard deviation); train loss "
      "is the full-batch loss on the run's training set after the last step.",
      "",
  ]
  for name, result in results.items():
    p = PARTS[name]
    md += [f"## {p.title} (`--only {name}`, {seconds[name]:.0f} s)", "", p.about, "", format_table(result.rows, extras=True), ""]
    if result.findings:
      md += [result.findings, ""]
    for figure in result.figures:
      _plot(figure, os.path.join(out, f"{figure.name}.png"))
      md += [f"![{figure.title}]({figure.name}.png)", ""]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(md))
  payload = {
      "config": dataclasses.asdict(config),
      "parts": {
          name: {"seconds": seconds[name], "findings": result.findings,
                 "figures": [f"{fig.name}.png" for fig in result.figures],
                 "rows": [dataclasses.asdict(r) for r in result.rows]}
          for name, result in results.items()
      },
  }
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(payload, f, indent=1, allow_nan=True)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m gradtx.tour",
      description="Train small models on sklearn's digits with every gradtx technique.",
  )
  parser.add_argument("--quick", action="store_true", help="fewer steps and seeds (< 1 min)")
  parser.add_argument("--out", default="tour_report", help="report folder (default: %(default)s)")
  parser.add_argument("--only", action="append", metavar="PART",
                      help="run only these parts (repeat or comma-separate); see --list")
  parser.add_argument("--seeds", type=int, default=None, help="seeds per run")
  parser.add_argument("--list", action="store_true", help="list the parts and exit")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, PartResult]:
  """Runs the tour; returns the results by part (also written to ``--out``)."""
  args = _parse(argv)
  if args.list:
    for p in PARTS.values():
      print(f"{p.name:12s} {p.title}")
    return {}
  names = list(PARTS)
  if args.only:
    names = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
      raise SystemExit(f"--only: unknown part(s) {unknown}; the parts are {list(PARTS)}")
  if args.seeds is not None and args.seeds < 1:
    raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
  config = Config.make(args.quick, args.seeds)
  start = time.perf_counter()
  data = load_data()
  results, seconds = {}, {}
  for name in names:
    t0 = time.perf_counter()
    ctx = Context(config, data, progress=not args.no_progress, part_name=name)
    results[name] = PARTS[name].run(ctx)
    seconds[name] = time.perf_counter() - t0
    print(f"[{name}] done in {seconds[name]:.1f} s", flush=True)
  write_report(args.out, config, results, seconds, data)
  rows = [row for name in names for row in results[name].rows]
  part_names = [name for name in names for _ in results[name].rows]
  print(format_table(rows, part_names=part_names))
  print(f"\nReport: {args.out}/report.md ({time.perf_counter() - start:.1f} s in all)")
  return results


if __name__ == "__main__":
  main()
