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
import os
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


# The programs here are tiny: LLVM's optimisation passes cost far more than they save
# (initialisers and PRNG code compile ~10x faster without them); the runs are short.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def run_compiled(fn: Callable, *args: Any) -> Any:
  """``jax.jit(fn)(*args)``, compiled with XLA's backend optimisations off."""
  return jax.jit(fn, compiler_options=_COMPILER_OPTIONS)(*args)


def _init_params(model: nn.Module, keys: jax.Array) -> Any:
  return jax.vmap(lambda k: model.init(k, jnp.zeros((1, 64), jnp.float32)))(keys)


_init_params_jit = jax.jit(_init_params, static_argnums=0, compiler_options=_COMPILER_OPTIONS)


def init_params(model: nn.Module, keys: jax.Array) -> Any:
  """One set of parameters per key, stacked along a leading axis (compiled once per model)."""
  return _init_params_jit(model, keys)


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
    test_curve: ``[R, steps]`` test accuracy after every step (``track_test=True``).
  """

  loss: np.ndarray
  grad_norm: np.ndarray
  clip_scale: np.ndarray
  train_loss: np.ndarray
  test_acc: np.ndarray
  params: Any
  test_curve: np.ndarray | None = None

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


def _accuracy(apply_fn: Callable, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y)


def _evaluate(apply_fn: Callable, params: Any, x: jax.Array, y: jax.Array, x_test: jax.Array,
              y_test: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per run: full-batch training loss and test accuracy (runs on the leading axis)."""

  def one(p, x, y):
    return _cross_entropy(apply_fn, p, x, y), _accuracy(apply_fn, p, x_test, y_test)

  return jax.vmap(one)(params, x, y)


# Compiled once per model (``apply_fn`` is static), shared by every transformation.
_evaluate_jit = jax.jit(_evaluate, static_argnums=0, compiler_options=_COMPILER_OPTIONS)


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
    track_test: bool = False,
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
    track_test: also record the test accuracy after every step (costs a test-set
      forward pass per step).

  Returns:
    :class:`Runs` with numpy arrays.
  """
  num_runs = keys.shape[0]
  if train_idx is None:
    train_idx = np.arange(data.x_train.shape[0])
  train_idx = np.broadcast_to(np.asarray(train_idx), (num_runs, np.shape(train_idx)[-1]))
  x = jnp.asarray(np.asarray(data.x_train)[train_idx])
  y = jnp.asarray(np.asarray(data.y_train)[train_idx])
  if spike_factor is None:
    spike_factor = np.ones((num_runs,), np.float32)
  spike_factor = jnp.asarray(spike_factor, jnp.float32)
  loss_fn = lambda p, x, y: _cross_entropy(apply_fn, p, x, y)

  def one_run(params, key, x, y, factor):
    def step(carry, inputs):
      params, opt_state = carry
      t, step_key = inputs
      batch = jax.random.randint(step_key, (batch_size,), 0, x.shape[0])
      loss, grads = jax.value_and_grad(loss_fn)(params, x[batch], y[batch])
      if spike_every:
        scale = jnp.where((t + 1) % spike_every == 0, factor, 1.0)
        grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
      grad_norm = gradtx.global_norm(grads)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      logs = (loss, grad_norm, min_clip_scale(opt_state))
      if track_test:
        logs += (_accuracy(apply_fn, params, data.x_test, data.y_test),)
      return (params, opt_state), logs

    inputs = (jnp.arange(steps), jax.random.split(key, steps))
    (params, _), logs = jax.lax.scan(step, (params, tx.init(params)), inputs)
    return params, logs

  args = (params, keys, x, y, spike_factor)
  params, logs = run_compiled(jax.vmap(one_run), *args)
  train_loss, test_acc = _evaluate_jit(apply_fn, params, x, y, data.x_test, data.y_test)
  logs, train_loss, test_acc = jax.device_get((logs, train_loss, test_acc))
  loss, grad_norm, clip = (np.asarray(a) for a in logs[:3])
  test_curve = np.asarray(logs[3]) if track_test else None
  return Runs(loss, grad_norm, clip, np.asarray(train_loss), np.asarray(test_acc), params,
              test_curve)


# --------------------------------------------------------------------------------------
# Parts: registry, results, context
# --------------------------------------------------------------------------------------

_SPIKE_EVERY = 50


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes of the tour; ``quick`` shrinks every part to run in well under a minute."""

  quick: bool = False
  seeds: int = 3
  steps: int = 1500
  pretrain_steps: int = 1000
  finetune_steps: int = 400
  batch_size: int = 64
  spike_every: int = _SPIKE_EVERY
  optimizers: tuple[str, ...] = ("sgd", "adam")

  @classmethod
  def make(cls, quick: bool, seeds: int | None = None) -> Config:
    if quick:
      return cls(quick=True, seeds=seeds or 2, steps=300, pretrain_steps=300,
                 finetune_steps=150, optimizers=("sgd",))
    return cls(seeds=seeds or 3)


@dataclasses.dataclass
class Row:
  """One line of a results table: means over seeds (``test_acc_std``: their spread).

  ``clipped_steps`` is the mean number of steps with ``clip_scale < 1`` (``None`` when
  the transformation has no ``clip_scale``); ``clean`` says whether the run saw only
  the plain task (no injected faults); ``chance`` is the accuracy of guessing.
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
  """One axes of a figure: named curves, over steps unless ``x`` is given."""

  title: str
  curves: dict[str, np.ndarray]
  ylabel: str = "loss"
  logy: bool = True
  vlines: Sequence[float] = ()
  x: Sequence[float] | None = None
  xlabel: str = "step"
  xticklabels: Sequence[str] | None = None
  ymax: float | None = None


@dataclasses.dataclass
class Figure:
  """A PNG: ``name`` is the file stem; panels are laid out in a row.

  A label keeps its colour across the panels of a figure.
  """

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

  def track(self, items: Sequence[Any]) -> Iterable[Any]:
    """``tqdm`` over the part's runs (silent with ``--no-progress``)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=self.part_name, unit="run", disable=not self.progress,
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


def _mean_curve(curves: np.ndarray, sel: Any = slice(None)) -> np.ndarray:
  """A ``[R, steps]`` log averaged over the selected runs, smoothed over 2% of the steps."""
  curves = np.asarray(curves)[sel]
  return smooth(np.mean(curves, axis=0), max(1, curves.shape[-1] // 50))


# --------------------------------------------------------------------------------------
# Part: layer-wise learning rates
# --------------------------------------------------------------------------------------

_LAYERS = ("embed", "layer_0", "layer_1", "layer_2", "head")
_SHOTS = 5  # labelled images per digit for fine-tuning
_FINETUNE_LR = 3e-3

_LAYERWISE_ABOUT = f"""
Su's "free gradient" view: reparametrising `θ = λφ` turns Adam's learning rate into
`λη` for that layer, so a per-layer learning rate is a per-leaf multiplier on the
update, chosen by the parameter's path. Its classic use is fine-tuning: keep what a
pretrained body knows while a fresh head learns. Setting: an MLP (`embed`, hidden
`layer_0..2`, `head`, width 64) is pretrained with Adam on the 10-digit task using half
of the training split; then a fresh head is fitted to a *different* task, the parity of
the digit, from only {_SHOTS} labelled images per digit taken from the other half, with
Adam (lr {_FINETUNE_LR:g}). Compared: training from scratch, plain fine-tuning,
`gradtx.layerwise_lr_decay(0.5)` (ELECTRA/BEiT; depth by path,
`params/layer_(\\d+)/.*` → 1 + i: head ×1, layer_2 ×0.5, layer_1 ×0.25, layer_0 ×0.125,
embed ×0.0625) and `gradtx.scale_by_path` (body ×0.1, head ×1; and body ×0, which
is a linear probe). Test accuracy is parity accuracy on the whole test split (chance
0.5). The right panel shows how far each layer's kernel moved from where fine-tuning
started, `‖W − W₀‖ / ‖W₀‖`.
"""


def _relative_change(start: Any, end: Any) -> np.ndarray:
  """``[R, layers]``: ‖W − W₀‖ / ‖W₀‖ of each layer's kernel."""
  out = []
  for layer in _LAYERS:
    w0 = np.asarray(start["params"][layer]["kernel"])
    w1 = np.asarray(end["params"][layer]["kernel"])
    axes = tuple(range(1, w0.ndim))
    out.append(np.sqrt(((w1 - w0) ** 2).sum(axes) / (w0 ** 2).sum(axes)))
  return np.stack(out, axis=-1)


@part("layerwise", "Layer-wise learning rates for fine-tuning", _LAYERWISE_ABOUT)
def _layerwise(ctx: Context) -> PartResult:
  cfg, data = ctx.config, ctx.data
  model = MLP()
  n_train = int(data.x_train.shape[0])
  y_train = np.asarray(data.y_train)

  # Per seed: an upstream half (pretraining) and a few-shot subset of the other half.
  upstream, subsets = [], []
  for seed in range(cfg.seeds):
    rng = np.random.default_rng(1000 + seed)
    perm = rng.permutation(n_train)
    up, down = perm[: n_train // 2], perm[n_train // 2:]
    upstream.append(up)
    subsets.append(np.concatenate(
        [rng.choice(down[y_train[down] == c], _SHOTS, replace=False) for c in range(10)]))
  parity = data._replace(y_train=data.y_train % 2, y_test=data.y_test % 2)

  keys = jax.random.split(jax.random.key(0), (4, cfg.seeds))
  fresh = init_params(model, keys[1])
  body = "params/(embed|layer_.*)/.*"
  lr = _FINETUNE_LR
  methods = [
      ("adam, from scratch", optax.adam(lr)),
      ("adam, fine-tune", optax.adam(lr)),
      ("layerwise_lr_decay(0.5)", optax.chain(
          optax.adam(lr),
          gradtx.layerwise_lr_decay(0.5, num_layers=3, depth_rules=MLP_DEPTH_RULES))),
      ("scale_by_path(body ×0.1)", optax.chain(
          optax.adam(lr), gradtx.scale_by_path({body: 0.1}))),
      ("scale_by_path(body ×0): probe", optax.chain(
          optax.adam(lr), gradtx.scale_by_path({body: 0.0}))),
  ]
  rows, losses, accs, moved = [], {}, {}, {}
  pretrained = None
  for name, tx in ctx.track([("pretrain", optax.adam(1e-3))] + methods):
    if name == "pretrain":
      runs = train(model.apply, tx, init_params(model, keys[0]), data,
                   steps=cfg.pretrain_steps, keys=keys[2], batch_size=cfg.batch_size,
                   train_idx=np.stack(upstream))
      pretrained, (pre_acc, pre_std) = runs.params, _mean_std(runs.test_acc)
      continue
    start = fresh if "scratch" in name else {
        "params": dict(pretrained["params"], head=fresh["params"]["head"])}
    runs = train(model.apply, tx, start, parity, steps=cfg.finetune_steps, keys=keys[3],
                 batch_size=cfg.batch_size, train_idx=np.stack(subsets), track_test=True)
    change = _relative_change(start, runs.params).mean(0)
    rows.append(_row(name, f"parity, {_SHOTS * 10} shots", runs, chance=0.5, extras={
        "Δembed": f"{change[0]:.2f}", "Δhead": f"{change[-1]:.2f}"}))
    losses[name] = _mean_curve(runs.loss)
    accs[name] = _mean_curve(runs.test_curve)
    moved[name] = change

  scratch, plain = rows[0], rows[1]
  best = max(rows, key=lambda r: r.test_acc)
  findings = (
      f"Pretraining (10 digits, {len(upstream[0])} images, {cfg.pretrain_steps} steps) "
      f"reaches test accuracy {pre_acc:.3f} ± {pre_std:.3f}. On few-shot parity, plain "
      f"fine-tuning scores {plain.test_acc:.3f} and training from scratch "
      f"{scratch.test_acc:.3f}; the best is {best.technique} ({best.test_acc:.3f}). The "
      "smaller the body's learning rate, the less its layers move (Δ columns: relative "
      "change of the embed and head kernels) and the higher the final training loss on "
      "the 50 images: the body's features are kept instead of fitted to the few labels."
  )
  figure = Figure("layerwise", "Few-shot fine-tuning on parity (mean over seeds)", [
      Panel("minibatch loss", losses),
      Panel("test accuracy (parity)", accs, ylabel="accuracy", logy=False),
      Panel("how far each layer moved", moved, ylabel="‖W − W₀‖ / ‖W₀‖", logy=False,
            x=range(len(_LAYERS)), xlabel="layer", xticklabels=_LAYERS),
  ])
  return PartResult(rows, [figure], findings)


# --------------------------------------------------------------------------------------
# Part: clipping, on clean gradients and with injected spikes
# --------------------------------------------------------------------------------------

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
a stand-in for a corrupted batch. "Clipped steps" counts the steps with
`clip_scale < 1`, read from the optimizer state with `optax.tree_utils`; "spikes
clipped" counts the spiked steps among them; "spike ×" is how much larger a spiked
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


def _spike_stats(runs: Runs, sel: Any, every: int) -> dict[str, str]:
  """Extras for a spiked row: spiked steps clipped, and the residual spike size."""
  steps = runs.loss.shape[-1]
  spike = (np.arange(steps) + 1) % every == 0
  applied = runs.grad_norm[sel] * np.nan_to_num(runs.clip_scale[sel], nan=1.0)
  gain = np.mean(np.median(applied[:, spike], 1) / np.median(applied[:, ~spike], 1))
  caught = runs.clipped()[sel][:, spike].sum(-1).mean()
  has_clip = not np.all(np.isnan(runs.clip_scale[sel]))
  return {"spikes clipped": f"{caught:.0f}/{spike.sum()}" if has_clip else "-",
          "spike ×": f"{gain:.3g}"}


@part("clipping", "Gradient clipping, clean and with injected spikes", _CLIPPING_ABOUT)
def _clipping(ctx: Context) -> PartResult:
  cfg, data = ctx.config, ctx.data
  model = MLP()
  seeds, steps, every = cfg.seeds, cfg.steps, cfg.spike_every
  keys = jax.random.split(jax.random.key(1), (2, seeds))
  # Runs are [clean seeds..., spiked seeds...]: same init and minibatches, paired.
  init = jax.tree.map(lambda a: jnp.concatenate([a, a]), init_params(model, keys[0]))
  batch_keys = jnp.concatenate([keys[1], keys[1]])
  clean, spiked = slice(0, seeds), slice(seeds, 2 * seeds)

  jobs = [(opt, name, clip) for opt in cfg.optimizers for name, clip in _clip_rules(steps)]
  rows, curves = [], {}
  for opt, name, clip in ctx.track(jobs):
    tx = _OPTIMIZERS[opt]() if clip is None else optax.chain(clip, _OPTIMIZERS[opt]())
    factor = _SPIKE_FACTORS[opt]
    factors = np.concatenate([np.ones(seeds), np.full(seeds, factor)])
    runs = train(model.apply, tx, init, data, steps=steps, keys=batch_keys,
                 batch_size=cfg.batch_size, spike_factor=factors, spike_every=every)
    rows.append(_row(name, f"{opt}, clean", runs, clean))
    rows.append(_row(name, f"{opt}, spikes ×{factor:g}", runs, spiked, clean=False,
                     extras=_spike_stats(runs, spiked, every)))
    curves.setdefault((opt, "clean"), {})[name] = _mean_curve(runs.loss, clean)
    curves.setdefault((opt, "spikes"), {})[name] = _mean_curve(runs.loss, spiked)
    if clip is not None:
      curves.setdefault((opt, "clipped"), {})[name] = np.cumsum(runs.clipped()[spiked].mean(0))

  spike_steps = [s for s in range(steps) if (s + 1) % every == 0]
  figures, lines = [], []
  for opt in cfg.optimizers:
    factor = _SPIKE_FACTORS[opt]
    figures.append(Figure(f"clipping_{opt}", f"{opt}: minibatch loss (mean over seeds) and "
                          "clipped steps; grey lines mark the spikes", [
        Panel(f"{opt}, clean gradients", curves[opt, "clean"]),
        Panel(f"{opt}, spikes ×{factor:g} every {every} steps", curves[opt, "spikes"],
              vlines=spike_steps, ymax=20.0),
        Panel(f"{opt}, spikes: cumulative clipped steps", curves[opt, "clipped"],
              ylabel="clipped steps", logy=False, vlines=spike_steps),
    ]))
    by = {(r.technique, r.clean): r for r in rows if r.setting.startswith(opt + ",")}
    base, base_clean = by["none", False], by["none", True]
    clipped = [r for (t, c), r in by.items() if not c and t != "none"]
    worst = max(clipped, key=lambda r: _finite(r.train_loss))
    counts = ", ".join(f"{r.technique} {r.clipped_steps:.0f} ({r.extras['spikes clipped']} "
                       "spikes)" for r in clipped)
    lines += [
        f"- {opt}: spikes ×{factor:g} take the unclipped run from train loss "
        f"{_fmt_loss(base_clean.train_loss)} (test acc {base_clean.test_acc:.3f}) to "
        f"{_fmt_loss(base.train_loss)} (test acc {base.test_acc:.3f}); with any clipping "
        f"rule the worst spiked run ends at {_fmt_loss(worst.train_loss)} "
        f"({worst.technique}, test acc {worst.test_acc:.3f}).",
        f"- {opt}, clipped steps out of {steps} with spikes: {counts}.",
    ]
  lines.append(
      "- A fixed γ cannot tell a spike from a large gradient: it clips the large gradients "
      "of early training, and lets through late spikes of gradients that have shrunk "
      "(harmless here: the damaging spike is the first, early one). Soft clipping scales "
      "every step; AutoClip clips whatever exceeds the 10th percentile of past norms (most "
      "steps, spikes included); ZClip, after its 25-step warm-up, clips the spikes and "
      "little else."
  )
  return PartResult(rows, figures, "\n".join(lines))


def _finite(x: float) -> float:
  return x if math.isfinite(x) else math.inf


# --------------------------------------------------------------------------------------
# Report: console table, markdown, JSON, PNGs
# --------------------------------------------------------------------------------------


def _fmt_loss(x: float) -> str:
  return f"{x:.3g}" if math.isfinite(x) else "nan (diverged)"


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
    ] + [row.extras.get(k, "-") for k in extra_keys]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _plot(figure: Figure, path: str) -> None:
  """Writes one figure as a PNG with matplotlib's Agg canvas (no pyplot, no GUI)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure as MplFigure

  labels = list(dict.fromkeys(label for p in figure.panels for label in p.curves))
  colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
  n = len(figure.panels)
  fig = MplFigure(figsize=(5.2 * n, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, n, squeeze=False)[0]
  for ax, panel in zip(axes, figure.panels, strict=True):
    for x in panel.vlines:
      ax.axvline(x, color="0.88", lw=0.6, zorder=0)
    for label, curve in panel.curves.items():
      curve = np.asarray(curve, np.float64)
      xs = np.arange(len(curve)) if panel.x is None else np.asarray(panel.x)
      text = label
      if panel.ymax is not None and np.any(~(curve <= panel.ymax)):
        first = int(np.argmax(~(curve <= panel.ymax)))
        text = f"{label} (off the chart from {panel.xlabel} {xs[first]:g})"
      style = "-" if panel.x is None else "o-"
      ax.plot(xs, curve, style, lw=1.3, ms=4, label=text, color=colours[label])
    if panel.logy:
      ax.set_yscale("log")
    if panel.ymax is not None:
      ax.set_ylim(top=panel.ymax)
    if panel.xticklabels is not None:
      ax.set_xticks(np.asarray(panel.x), list(panel.xticklabels))
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if panel.curves:
      ax.legend(fontsize=7)
  fig.suptitle(figure.title, fontsize=11)
  fig.savefig(path, dpi=110)


def write_report(out: str, config: Config, results: dict[str, PartResult],
                 seconds: dict[str, float], data: Dataset) -> None:
  """Writes ``report.md``, ``results.json`` (non-finite numbers as ``null``) and the PNGs."""
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
      "is the full-batch loss on the run's training set after the last step."
      + (" Quick mode trains fewer steps and seeds, and only SGD in the clipping part."
         if config.quick else ""),
      "",
  ]
  for name, result in results.items():
    p = PARTS[name]
    md += [f"## {p.title} (`--only {name}`, {seconds[name]:.0f} s)", "", p.about, "",
           format_table(result.rows, extras=True), ""]
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
                 "rows": [_finite_or_none(dataclasses.asdict(r)) for r in result.rows]}
          for name, result in results.items()
      },
  }
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(payload, f, indent=1, allow_nan=False)


def _finite_or_none(tree: Any) -> Any:
  """Replaces NaN/inf floats in nested dicts by ``None`` (strict JSON)."""
  if isinstance(tree, dict):
    return {k: _finite_or_none(v) for k, v in tree.items()}
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree


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
    names = list(dict.fromkeys(
        n.strip() for item in args.only for n in item.split(",") if n.strip()))
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
