"""Part ``layerwise``: layer-wise learning rates for few-shot fine-tuning."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

import gradtx
from gradtx.tour import _registry as registry
from gradtx.tour._data import MLP, MLP_DEPTH_RULES
from gradtx.tour._report import Figure, Panel, direction, mean_curve, mean_std, run_values
from gradtx.tour._training import init_params, train

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
started, `‖W − W₀‖ / ‖W₀‖`; "Δembed" and "Δhead" are its values for those two layers.
"""

# The embed layer's learning-rate multiplier of each fine-tuning method (from scratch: none).
_EMBED_SCALE = {"adam, fine-tune": 1.0, "scale_by_path(body ×0.1)": 0.1,
                "layerwise_lr_decay(0.5)": 0.5 ** 4, "scale_by_path(body ×0): probe": 0.0}


def _relative_change(start: Any, end: Any) -> np.ndarray:
  """``[R, layers]``: ‖W − W₀‖ / ‖W₀‖ of each layer's kernel."""
  out = []
  for layer in _LAYERS:
    w0 = np.asarray(start["params"][layer]["kernel"])
    w1 = np.asarray(end["params"][layer]["kernel"])
    axes = tuple(range(1, w0.ndim))
    out.append(np.sqrt(((w1 - w0) ** 2).sum(axes) / (w0 ** 2).sum(axes)))
  return np.stack(out, axis=-1)


@registry.part("layerwise", "Layer-wise learning rates for fine-tuning", _LAYERWISE_ABOUT)
def _layerwise(ctx: registry.Context) -> registry.PartResult:
  """Pretraining on one half, then each fine-tuning method on few-shot parity.

  Longer than 60 lines: a part reads top to bottom (data, runs, table, figure); its
  pieces share the runs' arrays, which smaller functions would pass around by the dozen.
  """
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
  rows: list[registry.Row] = []
  losses: dict[str, np.ndarray] = {}
  accs: dict[str, np.ndarray] = {}
  moved: dict[str, np.ndarray] = {}
  pretrained = None
  for name, tx in ctx.track([("pretrain", optax.adam(1e-3))] + methods):
    if name == "pretrain":
      runs = train(model.apply, tx, init_params(model, keys[0]), data,
                   steps=cfg.pretrain_steps, keys=keys[2], batch_size=cfg.batch_size,
                   train_idx=np.stack(upstream))
      pretrained, (pre_acc, pre_std) = runs.params, mean_std(runs.test_acc)
      continue
    assert pretrained is not None  # the first job, "pretrain", has set it
    start = fresh if "scratch" in name else {
        "params": dict(pretrained["params"], head=fresh["params"]["head"])}
    runs = train(model.apply, tx, start, parity, steps=cfg.finetune_steps, keys=keys[3],
                 batch_size=cfg.batch_size, train_idx=np.stack(subsets), track_test=True)
    change = _relative_change(start, runs.params).mean(0)
    rows.append(registry.Row(name, f"parity, {_SHOTS * 10} shots", {
        **run_values(runs), "moved_embed": float(change[0]), "moved_head": float(change[-1])},
        chance=0.5))
    losses[name] = mean_curve(runs.loss)
    assert runs.test_curve is not None  # track_test=True
    accs[name] = mean_curve(runs.test_curve)
    moved[name] = change

  by = {r.technique: r.values for r in rows}
  scratch, plain = by["adam, from scratch"], by["adam, fine-tune"]
  best = max(rows, key=lambda r: registry.number(r.values, "test_acc"))
  order = sorted(_EMBED_SCALE, key=lambda n: _EMBED_SCALE[n], reverse=True)  # body lr, high to low
  moves = [registry.number(by[n], "moved_embed") for n in order]
  fits = [registry.number(by[n], "train_loss") for n in order]
  moves_less = bool(np.all(np.diff(moves) <= 0))
  fits_less = bool(np.all(np.diff(fits) >= 0))
  findings = [
      f"- Pretraining (10 digits, {len(upstream[0])} images, {cfg.pretrain_steps} steps) "
      f"reaches test accuracy {pre_acc:.3f} ± {pre_std:.3f}. On few-shot parity, plain "
      f"fine-tuning scores {plain['test_acc']:.3f}, "
      f"{direction(registry.number(plain, 'test_acc'), registry.number(scratch, 'test_acc'))} "
      f"than training from scratch ({scratch['test_acc']:.3f}); the "
      f"best is {best.technique} ({best.values['test_acc']:.3f}).",
      f"- From the largest body learning rate to the smallest ({', '.join(order)}), the "
      f"embed kernel moves {' → '.join(f'{m:.2f}' for m in moves)} "
      f"({'monotonically less' if moves_less else 'not monotonically less'}) and the "
      f"final training loss on the {_SHOTS * 10} images goes "
      f"{' → '.join(f'{f:.3g}' for f in fits)} "
      f"({'monotonically up' if fits_less else 'not monotonically up'}): a slower body "
      "keeps its features instead of fitting them to the few labels.",
  ]
  figure = Figure("layerwise", "Few-shot fine-tuning on parity (mean over seeds)", [
      Panel("minibatch loss", losses),
      Panel("test accuracy (parity)", accs, ylabel="accuracy", logy=False),
      Panel("how far each layer moved", moved, ylabel="‖W − W₀‖ / ‖W₀‖", logy=False,
            x=range(len(_LAYERS)), xlabel="layer", xticklabels=_LAYERS),
  ])
  columns = [registry.TRAIN_LOSS, registry.TEST_ACC,
             registry.Column("moved_embed", "Δembed", ".2f"),
             registry.Column("moved_head", "Δhead", ".2f")]
  return registry.PartResult(columns, rows, [figure], findings)
