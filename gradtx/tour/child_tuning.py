"""Part ``child_tuning``: ChildTuning-F/D fine-tuning on digits, in both placements."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradtx
from gradtx.tour._data import MLP
from gradtx.tour._registry import Context, Figure, Panel, PartResult, Row, part
from gradtx.tour._report import _mean_curve, _mean_std
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
    acc_mean, acc_std = _mean_std(acc[sel])
    has_mask = any(k != "lr" for k in settings)
    rows.append(Row(
        technique=name, setting=setting, train_loss=_mean_std(train_loss[sel])[0],
        test_acc=acc_mean, test_acc_std=acc_std, steps=cfg.finetune_steps, chance=0.2,
        extras={"mask density": f"{density[sel].mean():.3f}" if has_mask else "-",
                "body moved": f"{moved[sel].mean():.3f}"}))
    losses[name] = _mean_curve(loss[sel])
    if has_mask:
      densities[name] = density[sel][0]

  layer_density = {leaf: np.mean([[np.mean(mk["params"][layer][leaf]) for layer in _LAYERS]
                                   for mk in masks], axis=0) for leaf in ("kernel", "bias")}
  hidden = layer_density["kernel"][1:-1]
  by = {r.technique: r for r in rows}
  f_grad, f_upd, plain, slow = (by[n] for n in (
      "child_tuning_f, gradient", "child_tuning_f, update", "adamw", "adamw, lr × √p"))
  masked = [r for r in rows if r.extras["mask density"] != "-"]
  best = max(masked, key=lambda r: r.test_acc)
  spread = max(r.test_acc_std for r in rows)
  verdict = (f"{best.technique} beats it by more than that" if
             best.test_acc > plain.test_acc + spread else "no mask beats plain AdamW here")
  gap = lambda a, b: abs(np.log(a.train_loss / b.train_loss))  # noqa: E731
  closer = "closer to" if gap(f_grad, slow) < gap(f_grad, plain) else "not closer to"
  findings = "\n".join([
      f"- Pretraining on 0–4 ({len(old)} images, {cfg.pretrain_steps} steps) reaches test "
      f"accuracy {pre.test_acc.mean():.3f} on 0–4. Fine-tuned on 5–9 from {_SHOTS * 5} "
      f"images, plain AdamW scores {plain.test_acc:.3f} ± {plain.test_acc_std:.3f} and the "
      f"masked rows {min(r.test_acc for r in masked):.3f}–{best.test_acc:.3f} (largest "
      f"seed spread ± {spread:.3f}): {verdict}.",
      f"- ChildTuning-F before AdamW ends at train loss {f_grad.train_loss:.3g}, {closer} "
      f"AdamW with the learning rate × √{_P:g} ({slow.train_loss:.3g}) than to plain "
      f"AdamW ({plain.train_loss:.3g}): Su's √p. After AdamW it keeps AdamW's step on "
      f"average (train loss {f_upd.train_loss:.3g}).",
      f"- Body moved: before AdamW, F moves every coordinate ({f_grad.extras['body moved']})"
      f"; D after AdamW freezes all but its {_P:g} of the body "
      f"({by['child_tuning_d, update'].extras['body moved']}), while D before AdamW lets "
      "AdamW's weight decay move the masked coordinates "
      f"({by['child_tuning_d, gradient'].extras['body moved']}): a zero gradient gives a "
      "zero Adam step, but not a zero decay.",
      f"- The D mask keeps {layer_density['kernel'][0]:.2f} of `embed/kernel`, "
      f"{min(hidden):.2f}–{max(hidden):.2f} of the hidden kernels and "
      f"{np.mean(layer_density['bias'][:-1]):.2f} of the body's biases: one global "
      "threshold over the body, not one per layer.",
  ])
  figure = Figure("child_tuning", f"Fine-tuning on 5–9 from {_SHOTS} images per digit "
                  "(mean over seeds)", [
      Panel("minibatch loss", losses),
      Panel("mask_density from the optimizer state (seed 0)", densities,
            ylabel="mask_density", logy=False),
      Panel(f"D mask: fraction kept per layer (p = {_P:g})", layer_density,
            ylabel="fraction kept", logy=False, x=range(len(_LAYERS)), xlabel="layer",
            xticklabels=_LAYERS),
  ])
  return PartResult(rows, [figure], findings)
