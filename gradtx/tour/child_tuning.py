"""Part ``child_tuning``: ChildTuning-F/D fine-tuning on digits, in both placements."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradtx
from gradtx.tour._data import MLP
from gradtx.tour._registry import TEST_ACC, TRAIN_LOSS, Column, Context, PartResult, Row, part
from gradtx.tour._report import Figure, Panel, direction, mean_curve, mean_std
from gradtx.tour._training import init_params, run_compiled, train

_SHOTS = 50  # fine-tuning images per new digit
_P = 0.3  # reserve_p of both F and D
_LR = 2e-3
_WEIGHT_DECAY = 1e-2
_BODY = r"params/(embed|layer_\d+)/.*"  # D selects among these; the fresh head trains freely
_FISHER_BATCH = 25
_LAYERS = ("embed", "layer_0", "layer_1", "layer_2", "head")

_CHILD_TUNING_ABOUT = f"""
ChildTuning (Xu et al., EMNLP 2021) fine-tunes only a "child" subset of a pretrained
model's coordinates: **F** draws a fresh Bernoulli(p) mask every step and rescales,
`u = g ⊙ M / p` (`gradtx.child_tuning_f`); **D** keeps the top-p coordinates of the
empirical Fisher information `F = mean_b(clip(g_b)²)`, thresholded globally at its
(1 − p) percentile, fixed for the run, `u = g ⊙ M` (`gradtx.fisher_information`,
`gradtx.fisher_mask`, `gradtx.child_tuning_d`). Either mask can sit before AdamW (the
paper: it masks the *gradient*) or after it (Su's "incre drop": it masks the *update*).
Su's analysis: before Adam, gradient dropout acts like a learning rate × √p and moves
every coordinate through the moments. Setting: the MLP is pretrained with Adam on the
digits 0–4 of the training split; a fresh head is then fine-tuned on the digits 5–9 from
{_SHOTS} images per digit (each seed its own images, head and minibatches) with AdamW
(lr {_LR:g}, weight decay {_WEIGHT_DECAY:g}), p = {_P:g}; D selects among the body
(`embed`, `layer_*`), the head trains freely. Test accuracy is on the 5–9 test images
(chance 0.2). "mask density" is `mask_density` from the optimizer state, averaged over
steps (all parameters counted); "body moved" is the fraction of body coordinates that
ended anywhere but where fine-tuning started. All methods and seeds train in one
compiled program: every method is the same chain `child_tuning_d → child_tuning_f →
adamw → child_tuning_d → child_tuning_f` with all-True masks and p = 1 where it has no
mask (exact identities), `reserve_p` and the learning rate injected into the state with
`optax.inject_hyperparams`, and the states of all runs stacked and `vmap`-ed.
"""


def _methods(mask: Any) -> list[tuple[str, str, dict[str, Any]]]:
  """(name, setting, :func:`_chain` settings) of every method; ``mask``: the seed's D mask."""
  p = _P
  return [
      ("adamw", "chain(adamw)", {}),
      ("child_tuning_f, gradient", f"chain(child_tuning_f({p:g}), adamw)", {"pre_p": p}),
      ("child_tuning_f, update", f"chain(adamw, child_tuning_f({p:g}))", {"post_p": p}),
      ("child_tuning_d, gradient", f"chain(child_tuning_d(fisher_mask(·, {p:g})), adamw)",
       {"pre_mask": mask}),
      ("child_tuning_d, update", f"chain(adamw, child_tuning_d(fisher_mask(·, {p:g})))",
       {"post_mask": mask}),
      ("adamw, lr × √p", f"chain(adamw(lr × √{p:g}))", {"lr": _LR * np.sqrt(p)}),
  ]


def _chain(ones: Any, key: jax.Array, *, pre_mask: Any = None, pre_p: float = 1.0,
           post_mask: Any = None, post_p: float = 1.0,
           lr: float = _LR) -> optax.GradientTransformation:
  """The one chain every method is: absent masks are all-True and p = 1 (identities)."""
  inject_f = optax.inject_hyperparams(gradtx.child_tuning_f, static_args=("key",))
  pre_key, post_key = jax.random.split(key)
  return optax.chain(
      gradtx.child_tuning_d(ones if pre_mask is None else pre_mask),
      inject_f(reserve_p=pre_p, key=pre_key),
      optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=_WEIGHT_DECAY),
      gradtx.child_tuning_d(ones if post_mask is None else post_mask),
      inject_f(reserve_p=post_p, key=post_key),
  )


def _min_density(state: Any) -> jax.Array:
  """The smallest ``mask_density`` in a state (the identity masks report 1)."""
  found = optax.tree_utils.tree_get_all_with_path(state, "mask_density")
  return jnp.min(jnp.stack([jnp.asarray(v, jnp.float32) for _, v in found]))


def _loss(apply_fn: Any, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y).mean()


def _finetune(apply_fn: Any, tx: optax.GradientTransformation, params: Any, states: Any,
              x: jax.Array, y: jax.Array, keys: jax.Array, test_x: jax.Array,
              test_y: jax.Array, *, steps: int, batch_size: int) -> tuple[np.ndarray, ...]:
  """Runs ``R`` fine-tunings (leading axis) of one chain with per-run states, compiled once.

  Returns ``[R, steps]`` minibatch loss and mask density, ``[R]`` full-batch train loss,
  test accuracy and fraction of body coordinates moved.
  """

  def loss_fn(params, x, y):
    return _loss(apply_fn, params, x, y)

  def one_run(params, state, x, y, key):
    start = params

    def step(carry, k):
      params, state = carry
      idx = jax.random.randint(k, (batch_size,), 0, x.shape[0])
      loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), (loss, _min_density(state))

    (params, _), (loss, density) = jax.lax.scan(
        step, (params, state), jax.random.split(jax.random.wrap_key_data(key), steps))
    body = [(a != b).astype(jnp.float32) for name in _LAYERS[:-1]
            for a, b in zip(jax.tree.leaves(params["params"][name]),
                            jax.tree.leaves(start["params"][name]), strict=True)]
    moved = sum(jnp.sum(m) for m in body) / sum(m.size for m in body)
    accuracy = jnp.mean(jnp.argmax(apply_fn(params, test_x), -1) == test_y)
    return loss, density, loss_fn(params, x, y), accuracy, moved

  out = run_compiled(jax.vmap(one_run), params, states, x, y, keys)
  return tuple(np.asarray(a) for a in jax.device_get(out))


def _stack(trees: list[Any]) -> Any:
  """Stacks pytrees of small arrays on the host (no XLA program per leaf shape)."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _take(tree: Any, i: Any) -> Any:
  """Entry (or entries) ``i`` of every leaf's leading axis, on the host."""
  return jax.tree.map(lambda a: np.asarray(a)[i], tree)


@part("child_tuning", "ChildTuning-F/D fine-tuning on digits", _CHILD_TUNING_ABOUT)
def _child_tuning(ctx: Context) -> PartResult:
  """Pretraining, Fisher masks and every fine-tuning in one compiled program.

  Longer than 60 lines: a part reads top to bottom (data, runs, table, figure); its
  pieces share the runs' arrays, which smaller functions would pass around by the dozen.
  """
  cfg, data = ctx.config, ctx.data
  model, seeds = MLP(), cfg.seeds
  y_train, y_test = np.asarray(data.y_train), np.asarray(data.y_test)
  keys = jax.random.split(jax.random.key(5), (4, seeds))

  # Pretraining on the digits 0-4 (one pretrained model per seed), tested on 0-4.
  old, old_test = np.flatnonzero(y_train < 5), y_test < 5
  pre = train(model.apply, optax.adam(1e-3), init_params(model, keys[0]),
              data._replace(x_test=data.x_test[old_test], y_test=data.y_test[old_test]),
              steps=cfg.pretrain_steps, keys=keys[1], batch_size=cfg.batch_size,
              train_idx=old)

  # Fine-tuning data: each seed's own 50 images of each digit 5-9; test on 5-9 only.
  rng = np.random.default_rng(5)
  idx = np.stack([np.concatenate([
      rng.choice(np.flatnonzero(y_train == c), _SHOTS, replace=False) for c in range(5, 10)])
      for _ in range(seeds)])
  x, y = jnp.asarray(np.asarray(data.x_train)[idx]), jnp.asarray(y_train[idx])
  new_test = y_test >= 5
  test_x, test_y = data.x_test[new_test], data.y_test[new_test]
  fresh = init_params(model, keys[2])
  starts = {"params": dict(pre.params["params"], head=fresh["params"]["head"])}

  # ChildTuning-D: the Fisher information of each seed's start on its own images.
  def fisher(params, x, y):
    batches = (x.reshape(-1, _FISHER_BATCH, x.shape[-1]), y.reshape(-1, _FISHER_BATCH))
    return gradtx.fisher_information(lambda p, b: _loss(model.apply, p, *b), params, batches,
                                     clip_norm=1.0)

  fishers = jax.vmap(fisher)(starts, x, y)
  masks = [gradtx.fisher_mask(_take(fishers, s), _P, include=_BODY) for s in range(seeds)]

  # One run per (method, seed): stacked states, one compiled program.
  ones = jax.tree.map(lambda a: jnp.ones(a.shape[1:], bool), starts)
  methods = _methods(masks[0])
  runs = [(m, s) for m in range(len(methods)) for s in range(seeds)]
  txs, states = [], []
  for m, s in ctx.track(runs):
    settings = _methods(masks[s])[m][2]
    txs.append(_chain(ones, keys[3][s], **settings))
    states.append(txs[-1].init(_take(starts, s)))
  run_seed = np.array([s for _, s in runs])
  batch_keys = jax.random.key_data(jax.random.split(jax.random.key(6), seeds))
  loss, density, train_loss, acc, moved = _finetune(
      model.apply, txs[0], _take(starts, run_seed), _stack(states), _take(x, run_seed),
      _take(y, run_seed), _take(batch_keys, run_seed), test_x, test_y,
      steps=cfg.finetune_steps, batch_size=cfg.batch_size)

  rows, losses, densities = [], {}, {}
  for m, (name, setting, settings) in enumerate(methods):
    sel = slice(m * seeds, (m + 1) * seeds)
    acc_mean, acc_std = mean_std(acc[sel])
    has_mask = any(k != "lr" for k in settings)
    rows.append(Row(name, setting, {
        "train_loss": mean_std(train_loss[sel])[0], "test_acc": acc_mean,
        "test_acc_std": acc_std,
        "mask_density": float(density[sel].mean()) if has_mask else None,
        "body_moved": float(moved[sel].mean())}, chance=0.2))
    losses[name] = mean_curve(loss[sel])
    if has_mask:
      densities[name] = density[sel][0]

  layer_density = {leaf: np.mean([[np.mean(mk["params"][layer][leaf]) for layer in _LAYERS]
                                   for mk in masks], axis=0) for leaf in ("kernel", "bias")}
  findings = _findings({r.technique: r.values for r in rows}, layer_density,
                       pre.test_acc.mean(), len(old), cfg.pretrain_steps)
  figure = Figure("child_tuning", f"Fine-tuning on 5–9 from {_SHOTS} images per digit "
                  "(mean over seeds)", [
      Panel("minibatch loss", losses),
      Panel("mask_density from the optimizer state (seed 0)", densities,
            ylabel="mask_density", logy=False),
      Panel(f"D mask: fraction kept per layer (p = {_P:g})", layer_density,
            ylabel="fraction kept", logy=False, x=range(len(_LAYERS)), xlabel="layer",
            xticklabels=_LAYERS),
  ])
  columns = [TRAIN_LOSS, TEST_ACC, Column("mask_density", "mask density", ".3f"),
             Column("body_moved", "body moved", ".3f")]
  return PartResult(columns, rows, [figure], findings)


def _findings(by: dict[str, dict[str, Any]], layer_density: dict[str, np.ndarray],
              pre_acc: float, pre_images: int, pre_steps: int) -> list[str]:
  """The findings, worded from the rows' values (``by`` technique)."""
  f_grad, f_upd, plain, slow = (by[n] for n in (
      "child_tuning_f, gradient", "child_tuning_f, update", "adamw", "adamw, lr × √p"))
  d_grad, d_upd = by["child_tuning_d, gradient"], by["child_tuning_d, update"]
  masked = {n: v for n, v in by.items() if v["mask_density"] is not None}
  best = max(masked, key=lambda n: masked[n]["test_acc"])
  spread = max(v["test_acc_std"] for v in by.values())
  verdict = (f"{best} beats it by more than that"
             if masked[best]["test_acc"] > plain["test_acc"] + spread
             else "no mask beats plain AdamW by more than that")
  gap = lambda a, b: abs(np.log(a["train_loss"] / b["train_loss"]))
  hidden = layer_density["kernel"][1:-1]
  return [
      f"- Pretraining on 0–4 ({pre_images} images, {pre_steps} steps) reaches test "
      f"accuracy {pre_acc:.3f} on 0–4. Fine-tuned on 5–9 from {_SHOTS * 5} images, plain "
      f"AdamW scores {plain['test_acc']:.3f} ± {plain['test_acc_std']:.3f} and the masked "
      f"rows {min(v['test_acc'] for v in masked.values()):.3f}–"
      f"{masked[best]['test_acc']:.3f} (largest seed spread ± {spread:.3f}): {verdict}.",
      f"- ChildTuning-F before AdamW ends at train loss {f_grad['train_loss']:.3g}, "
      f"{direction(gap(f_grad, slow), gap(f_grad, plain), 'closer to', 'farther from')} "
      f"AdamW with the learning rate × √{_P:g} ({slow['train_loss']:.3g}) than to plain "
      f"AdamW ({plain['train_loss']:.3g}) (Su's √p). After AdamW it ends at "
      f"{f_upd['train_loss']:.3g}, {direction(f_upd['train_loss'], plain['train_loss'])} "
      "than plain AdamW.",
      f"- Body moved: before AdamW, F moves {f_grad['body_moved']:.3f} of the body's "
      f"coordinates; D after AdamW {d_upd['body_moved']:.3f} (its mask keeps {_P:g}), D "
      f"before AdamW {d_grad['body_moved']:.3f} "
      f"({direction(d_grad['body_moved'], d_upd['body_moved'], 'less', 'more')} than "
      "after): a zero gradient gives a zero Adam step, but not a zero weight decay.",
      f"- The D mask keeps {layer_density['kernel'][0]:.2f} of `embed/kernel`, "
      f"{min(hidden):.2f}–{max(hidden):.2f} of the hidden kernels and "
      f"{np.mean(layer_density['bias'][:-1]):.2f} of the body's biases: one global "
      "threshold over the body, not one per layer.",
  ]
