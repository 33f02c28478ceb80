"""Part ``contrastive``: SimCLR on the digits at batch 1024, encoded in chunks of 128;
SigLIP's sigmoid loss at the same batch next to it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradtx
from gradtx.tour._data import raw_digits
from gradtx.tour._registry import TEST_ACC, Column, Context, PartResult, Row, number, part
from gradtx.tour._report import Figure, Panel, direction, smooth
from gradtx.tour._training import _COMPILER_OPTIONS

_TEMPERATURE = 0.1
_MAX_SHIFT = 2  # pixels, each direction
_NOISE = 0.2  # std of the pixel noise, on intensities in [0, 1]
_LR = 1e-3
_SHOTS = 5  # labels per class of the few-label probes
_LABEL_DRAWS = 5  # independent few-label subsets per encoder
_PROBE_STEPS = 200
_PROBE_L2 = 1e-3
_SIGLIP_T, _SIGLIP_BIAS = 10.0, -10.0  # the paper's initial logit scale and bias


@dataclasses.dataclass(frozen=True)
class _Sizes:
  small: int  # the batch that fits in memory (= the chunk)
  large: int  # the batch the cached gradient makes affordable
  steps: int  # pre-training steps, the same for every method
  checkpoints: int  # probes along the way


def _sizes(quick: bool) -> _Sizes:
  return _Sizes(128, 512, 60, 1) if quick else _Sizes(128, 1024, 300, 5)


_CONTRASTIVE_ABOUT = f"""
Su (kexue.fm/archives/8471) and GradCache (Gao et al. 2021): a contrastive loss couples
the samples of a batch, so the gradients of small batches do not add up to the large
batch's gradient; but with `G = ∂L/∂h` computed once from all the representations,
`∇θ L = ∇θ Σ_i <h_i, sg(G_i)>` splits per sample. `gradtx.cached_value_and_grad` encodes
the batch chunk by chunk twice (without, then with gradients) and returns the exact
large-batch gradient at one chunk's activation memory. Setting: SimCLR on the training
images (labels unused): an MLP encoder (64 → 256 → 128 features) with a projection head
(128 → 128 → 64), two views per image (random shifts of up to {_MAX_SHIFT} pixels of the
8×8 image, gaussian pixel noise σ = {_NOISE:g} on intensities in [0, 1]), `gradtx.nt_xent`
at τ = {_TEMPERATURE:g}, Adam (lr {_LR:g}), the same number of steps for every method:
the small batch alone (128 images: what fits, say); a batch of 1024 (512 with `--quick`)
as naive accumulation (the mean of the chunk losses' gradients: negatives only from the
same chunk of 128); and the exact gradient of the large batch's loss with
`gradtx.cached_value_and_grad(chunk_size=128)`; and SigLIP (Zhai et al. 2023,
`gradtx.sigmoid_contrastive`: each pair its own binary classification, no softmax over
the batch) with the same exact cached gradient at the large batch, its logit scale
`t = exp(t')` and bias `b` learnt with the encoder from the paper's initialisation
t = {_SIGLIP_T:g}, b = {_SIGLIP_BIAS:g}. The encoders are then frozen and
*linear probes* (softmax regression, {_PROBE_STEPS} Adam steps on standardised 128-d
features) are trained on all training labels ("test acc") and on {_SHOTS} labels per
class ({_LABEL_DRAWS} random draws per encoder); a randomly initialised encoder and the
raw pixels are probed the same way. "probe loss" is the all-label probe's cross-entropy;
"NT-Xent @B" is the loss of a fixed set of B (the large batch) augmented pairs at the end.
"""


class Encoder(nn.Module):
  """``layer_0 → layer_1`` (the features a probe reads) ``→ proj_0 → proj_1`` (the loss's)."""

  width: int = 256
  features: int = 128
  projection: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, project: bool = True) -> jax.Array:
    h = nn.relu(nn.Dense(self.width, name="layer_0")(x))
    h = nn.relu(nn.Dense(self.features, name="layer_1")(h))
    if not project:
      return h
    z = nn.relu(nn.Dense(self.features, name="proj_0")(h))
    return nn.Dense(self.projection, name="proj_1")(z)


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """Random shifts of up to ``_MAX_SHIFT`` pixels (zero fill) plus gaussian noise."""
  n = images.shape[0]
  shift_key, noise_key = jax.random.split(key)
  m = _MAX_SHIFT
  padded = jnp.pad(images.reshape(n, 8, 8), ((0, 0), (m, m), (m, m)))
  offsets = jax.random.randint(shift_key, (n, 2), 0, 2 * m + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1]), (8, 8))
  shifted = jax.vmap(crop)(padded, offsets).reshape(n, 64)
  return shifted + _NOISE * jax.random.normal(noise_key, shifted.shape)


def _views(key: jax.Array, images: jax.Array) -> dict[str, jax.Array]:
  k1, k2 = jax.random.split(key)
  return {"a": augment(k1, images), "b": augment(k2, images)}


def _gradient_fn(model: Encoder, method: str, sizes: _Sizes) -> tuple[int, Callable]:
  """The batch size and ``(params, views) -> (loss, grads)`` of one method."""

  def encode(params, views, rng):
    del rng  # no dropout: the views carry the randomness
    return {name: model.apply(params, x) for name, x in views.items()}

  def loss_fn(params, reps):
    del params  # fixed temperature: no loss-side parameters
    return gradtx.nt_xent(reps["a"], reps["b"], temperature=_TEMPERATURE)

  def plain(params, views):
    return jax.value_and_grad(lambda p: loss_fn(p, encode(p, views, None)))(params)

  if method == "small":
    return sizes.small, plain
  if method in ("cached", "siglip"):
    loss = _siglip_loss if method == "siglip" else loss_fn
    return sizes.large, gradtx.cached_value_and_grad(encode, loss, chunk_size=sizes.small)

  def naive(params, views):  # the mean of the chunks' own gradients: a different loss
    chunks = jax.tree.map(lambda x: x.reshape(-1, sizes.small, x.shape[-1]), views)
    losses, grads = jax.lax.map(lambda c: plain(params, c), chunks)
    return losses.mean(), jax.tree.map(lambda g: g.mean(0), grads)

  return sizes.large, naive


def _siglip_loss(params: Any, reps: dict[str, jax.Array]) -> jax.Array:
  """SigLIP with the learnable ``t'`` (``τ = exp(−t')``) and bias in ``params["siglip"]``."""
  loss_params = params["siglip"]
  return gradtx.sigmoid_contrastive(reps["a"], reps["b"],
                                    temperature=jnp.exp(-loss_params["t_prime"]),
                                    bias=loss_params["bias"])


def _start(method: str, params: Any, opt_state: Any) -> tuple[Any, Any]:
  """The initial encoders (the same for every method); SigLIP's also hold its loss
  parameters (a variable collection the encoder does not read) at their initial values."""
  if method != "siglip":
    return params, opt_state
  runs = jax.tree.leaves(params)[0].shape[0]
  params = {**params, "siglip": {"t_prime": jnp.full((runs,), np.log(_SIGLIP_T), jnp.float32),
                                 "bias": jnp.full((runs,), _SIGLIP_BIAS, jnp.float32)}}
  return params, jax.vmap(optax.adam(_LR).init)(params)


_SEED = 7


def _init(model: Encoder, seeds: np.ndarray) -> tuple[Any, Any]:
  """Parameters and Adam state of one encoder per seed, stacked."""

  def one(seed):
    params = model.init(jax.random.fold_in(jax.random.key(_SEED), seed),
                        jnp.zeros((1, 64), jnp.float32))
    return params, optax.adam(_LR).init(params)

  return jax.vmap(one)(seeds)


def _eval_loss(model: Encoder, params: Any, images: jax.Array, sizes: _Sizes) -> jax.Array:
  """NT-Xent of fixed augmented pairs of the first ``sizes.large`` images."""
  views = _views(jax.random.key(_SEED + 2), images[: sizes.large])
  reps = {k: cast(jax.Array, model.apply(params, v)) for k, v in views.items()}
  return gradtx.nt_xent(reps["a"], reps["b"], temperature=_TEMPERATURE)


def _pretrain_segment(model: Encoder, method: str, sizes: _Sizes, steps: int) -> Callable:
  """``(params, opt_state, seeds, segment, images) -> (params, opt_state, losses, eval)``.

  ``steps`` updates of every run (runs on the leading axis; the run's seed and the
  segment index choose the batches and views), then the large-batch NT-Xent of fixed
  augmented pairs of the first ``sizes.large`` images.
  """
  tx = optax.adam(_LR)
  batch, value_and_grad = _gradient_fn(model, method, sizes)

  def one(params, opt_state, seed, segment, images):
    def step(carry, step_key):
      params, opt_state = carry
      pick_key, view_key = jax.random.split(step_key)
      idx = jax.random.permutation(pick_key, images.shape[0])[:batch]
      loss, grads = value_and_grad(params, _views(view_key, images[idx]))
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(_SEED + 1), seed), segment)
    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                               jax.random.split(key, steps))
    return params, opt_state, losses, _eval_loss(model, params, images, sizes)

  return jax.vmap(one, in_axes=(0, 0, 0, None, None))


def _probe(train_x, train_y, test_x, test_y, mean, std):
  """Softmax regression on standardised features: (train cross-entropy, test accuracy)."""
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  tx = optax.adam(0.05)
  w = {"w": jnp.zeros((train_x.shape[-1], 10)), "b": jnp.zeros((10,))}

  def cross_entropy(w):
    logits = train_x @ w["w"] + w["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean()

  def step(carry, _):
    w, state = carry
    grads = jax.grad(lambda w: cross_entropy(w) + _PROBE_L2 * jnp.sum(w["w"] ** 2))(w)
    updates, state = tx.update(grads, state, w)
    return (optax.apply_updates(w, updates), state), None

  (w, _), _ = jax.lax.scan(step, (w, tx.init(w)), None, length=_PROBE_STEPS)
  accuracy = jnp.mean(jnp.argmax(test_x @ w["w"] + w["b"], -1) == test_y)
  return cross_entropy(w), accuracy


def _probes(model: Encoder, params: Any, x_train, y_train, x_test, y_test, shots_idx, *,
            pixels: bool):
  """Probes of ``R`` encoders (params stacked): few-label accuracies ``[R, draws]``.

  With ``pixels``, also the all-label probes (train cross-entropy, accuracy: ``[R]``
  each), and the same three for the raw pixels appended as an ``R+1``-th encoder.
  """

  def one(f_train, f_test, full=True):
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6  # unlabelled statistics
    few = jax.vmap(lambda idx: _probe(f_train[idx], y_train[idx], f_test, y_test,
                                      mean, std)[1])(shots_idx)
    if not full:
      return few
    return few, *_probe(f_train, y_train, f_test, y_test, mean, std)

  features = jax.vmap(lambda p: (model.apply(p, x_train, project=False),
                                 model.apply(p, x_test, project=False)))(params)
  if not pixels:
    return jax.vmap(lambda a, b: one(a, b, full=False))(*features)
  encoders = jax.vmap(one)(*features)
  raw = one(x_train, x_test)
  return jax.tree.map(lambda e, r: jnp.concatenate([e, r[None]]), encoders, raw)


def _shots(y_train: np.ndarray, seed: int = 0) -> np.ndarray:
  """``[_LABEL_DRAWS, 10 * _SHOTS]`` indices: ``_SHOTS`` random training images per class."""
  rng = np.random.default_rng(seed)
  return np.stack([
      np.concatenate([rng.choice(np.flatnonzero(y_train == c), _SHOTS, replace=False)
                      for c in range(10)])
      for _ in range(_LABEL_DRAWS)
  ])


_METHODS = {
    "small": "nt_xent, small batch",
    "naive": "nt_xent, naive accumulation",
    "cached": "cached_value_and_grad",
    "siglip": "sigmoid_contrastive (SigLIP)",
}


@part("contrastive", "Contrastive pre-training at a large batch, in chunks",
      _CONTRASTIVE_ABOUT)
def _contrastive(ctx: Context) -> PartResult:
  """Pre-training by segments, probes along the way, then every final probe.

  Longer than 60 lines: a part reads top to bottom (data, runs, table, figure); its
  pieces share the runs' arrays, which smaller functions would pass around by the dozen.
  """
  cfg, data = ctx.config, ctx.data
  sizes = _sizes(cfg.quick)
  # Quick runs are dominated by compilation, full runs by the steps (see _training).
  options = _COMPILER_OPTIONS if cfg.quick else None
  methods = [m for m in _METHODS if not (cfg.quick and m == "naive")]
  x_train, _, x_test, _ = (jnp.asarray(np.asarray(a, np.float32)) for a in raw_digits(data))
  y_train, y_test = data.y_train, data.y_test
  shots = jnp.asarray(_shots(np.asarray(y_train)))
  model = Encoder()
  seeds = np.arange(cfg.seeds)
  segment = sizes.steps // sizes.checkpoints
  checkpoints = [0] + [segment * (i + 1) for i in range(sizes.checkpoints)]
  params0, opt_state0 = jax.jit(_init, static_argnums=0, compiler_options=options)(
      model, seeds)
  probe = jax.jit(_probes, static_argnums=0, static_argnames="pixels",
                  compiler_options=options)
  probe_args = (x_train, y_train, x_test, y_test, shots)

  eval0 = np.asarray(jax.jit(jax.vmap(lambda p: _eval_loss(model, p, x_train, sizes)),
                             compiler_options=options)(params0))
  losses: dict[str, np.ndarray] = {}
  evals: dict[str, list[np.ndarray]] = {}
  few_points: dict[str, list[np.ndarray]] = {}  # the probes between checkpoints
  final_params: dict[str, Any] = {}
  learnt: dict[str, Any] = {}  # SigLIP's final t' and b
  for method in ctx.track(methods):
    run = jax.jit(_pretrain_segment(model, method, sizes, segment), compiler_options=options)
    params, opt_state = _start(method, params0, opt_state0)
    curve, evals[method], few_points[method] = [], [eval0], []
    for c in range(sizes.checkpoints):
      params, opt_state, loss, eval_loss = run(params, opt_state, seeds, c, x_train)
      curve.append(np.asarray(loss))
      evals[method].append(np.asarray(eval_loss))
      encoder = {k: v for k, v in params.items() if k != "siglip"}  # without SigLIP's t, b
      if c < sizes.checkpoints - 1:  # the last checkpoint is probed with the others below
        few = probe(model, encoder, *probe_args, pixels=False)
        few_points[method].append(np.asarray(few).mean(-1))
    losses[method] = np.concatenate(curve, axis=1)
    final_params[method] = encoder
    learnt = jax.device_get(params["siglip"]) if method == "siglip" else learnt

  # Every final probe in one program: random encoders, trained encoders, raw pixels.
  groups = ["random", *methods]
  stacked = jax.tree.map(lambda *p: jnp.concatenate(p),
                         params0, *(final_params[m] for m in methods))
  few_all, ce_all, acc_all = jax.device_get(probe(model, stacked, *probe_args, pixels=True))
  n = cfg.seeds
  per = lambda i: slice(i * n, (i + 1) * n)
  final = {g: (few_all[per(i)], ce_all[per(i)], acc_all[per(i)]) for i, g in enumerate(groups)}
  final["pixels"] = (few_all[-1:], ce_all[-1:], acc_all[-1:])
  few_curve = {method: np.stack([final["random"][0].mean(-1), *few_points[method],
                                 final[method][0].mean(-1)], axis=1)  # [seeds, points]
               for method in methods}

  names = {**_METHODS, "random": "random encoder (no pre-training)",
           "pixels": "raw pixels (no encoder)"}
  settings = {
      "small": f"batch {sizes.small}",
      "naive": f"batch {sizes.large} = {sizes.large // sizes.small} chunks × {sizes.small}",
      "cached": f"batch {sizes.large}, chunk_size={sizes.small}",
      "siglip": f"batch {sizes.large}, chunk_size={sizes.small}, learnt t and b",
      "random": "-",
      "pixels": "-",
  }
  rows = [
      _probe_row(names[g], settings[g], *final[g], steps=sizes.steps if g in methods else 0,
                 eval_loss={"random": eval0, **{m: evals[m][-1] for m in methods}}.get(g),
                 large=sizes.large)
      for g in ["random", *methods, "pixels"]
  ]

  labels = {m: f"{names[m]} ({settings[m]})" for m in methods}
  nt_xent_runs = [m for m in methods if m != "siglip"]  # SigLIP's loss is another scale
  window = max(1, sizes.steps // 30)
  figure = Figure("contrastive", f"SimCLR on the digits, batch {sizes.small} vs {sizes.large} "
                  f"(same number of steps); means over {n} seeds", [
      Panel("NT-Xent pre-training loss of each run's own batch (chance: log(2B - 1))",
            {labels[m]: smooth(losses[m].mean(0), window) for m in nt_xent_runs}, logy=False,
            vlines=checkpoints[1:]),
      Panel(f"NT-Xent of {sizes.large} fixed augmented pairs (the large-batch objective)",
            {labels[m]: np.mean(evals[m], axis=1) for m in methods}, x=checkpoints,
            logy=False),
      Panel(f"linear probe on {_SHOTS} labels per class: test accuracy",
            {**{labels[m]: few_curve[m].mean(0) for m in methods},
             "raw pixels": np.full(len(checkpoints), float(np.mean(final["pixels"][0])))},
            x=checkpoints, ylabel="test accuracy", logy=False),
  ])
  siglip = {"t": float(np.mean(np.exp(learnt["t_prime"]))), "b": float(np.mean(learnt["bias"]))}
  return PartResult(_columns(sizes.large), rows, [figure], _findings(rows, sizes, siglip))


def _probe_row(technique: str, setting: str, few: Any, train_ce: Any, acc: Any, *,
               steps: int, eval_loss: Any, large: int) -> Row:
  few_acc = np.asarray(few).mean(-1)  # per encoder, over the label draws
  return Row(technique, setting, {
      "probe_loss": float(np.mean(train_ce)), "test_acc": float(np.mean(acc)),
      "test_acc_std": float(np.std(acc)), "few_acc": float(few_acc.mean()),
      "few_acc_std": float(few_acc.std()),
      "nt_xent_large": None if eval_loss is None else float(np.mean(eval_loss)),
      "steps": steps})


def _columns(large: int) -> list[Column]:
  return [Column("probe_loss", "probe loss"), TEST_ACC,
          Column("few_acc", f"probe acc, {_SHOTS} labels/class", ".3f", spread="few_acc_std"),
          Column("nt_xent_large", f"NT-Xent @{large}", ".3f"),
          Column("steps", "pre-training steps", "d")]


def _findings(rows: list[Row], sizes: _Sizes, siglip: dict[str, float]) -> list[str]:
  by = {r.technique: r.values for r in rows}
  few = lambda v: f"{v['few_acc']:.3f} ± {v['few_acc_std']:.3f}"
  random, pixels = by["random encoder (no pre-training)"], by["raw pixels (no encoder)"]
  trained = [(name, by[label]) for name, label in [
      (f"batch {sizes.small}", _METHODS["small"]), ("naive accumulation", _METHODS["naive"]),
      (f"exact cached gradient at {sizes.large}", _METHODS["cached"]),
      (f"SigLIP at {sizes.large}", _METHODS["siglip"])] if label in by]
  accs = [number(v, "test_acc") for v in by.values()]
  lower = direction(number(by[_METHODS["cached"]], "nt_xent_large"),
                    number(by[_METHODS["small"]], "nt_xent_large"))
  lines = [
      f"- Linear probe on {_SHOTS} labels per class: random encoder {few(random)}, raw "
      f"pixels {few(pixels)}; after {sizes.steps} pre-training steps: "
      + ", ".join(f"{name} {few(v)}" for name, v in trained) + ".",
      f"- With all labels the probes' test accuracy spans {min(accs):.3f} to "
      f"{max(accs):.3f}.",
      f"- The large-batch objective (NT-Xent of {sizes.large} fixed pairs) after "
      "pre-training: " + ", ".join(f"{name} {v['nt_xent_large']:.3f}" for name, v in trained)
      + f"; the exact cached gradient ends {lower} than the small batch. Naive "
      "accumulation minimises the mean of the chunk losses, a different objective "
      "(negatives only from the same chunk); "
      "`cached_value_and_grad` returns the gradient of the large batch's loss itself, to "
      "float rounding (the check is in `colabs/contrastive_grad_accumulation.ipynb`).",
      _siglip_finding(by, sizes, siglip),
  ]
  return lines


def _siglip_finding(by: dict[str, Any], sizes: _Sizes, siglip: dict[str, float]) -> str:
  """SigLIP against NT-Xent, both with the exact cached gradient at the large batch."""
  sig, nce = by[_METHODS["siglip"]], by[_METHODS["cached"]]

  def compare(key: str) -> str:
    a, b = number(sig, key), number(nce, key)
    spread = max(number(sig, f"{key}_std"), number(nce, f"{key}_std"))
    noise = " (within the spread over seeds)" if abs(a - b) <= spread else ""
    return (f"{direction(a, b)} ({a:.3f} ± {sig[f'{key}_std']:.3f} vs "
            f"{b:.3f} ± {nce[f'{key}_std']:.3f}){noise}")

  return (
      f"- SigLIP (`sigmoid_contrastive`, the exact cached gradient at {sizes.large}) "
      f"against NT-Xent with the same gradient and steps: its probe accuracy with "
      f"{_SHOTS} labels per class is {compare('few_acc')}, with all labels "
      f"{compare('test_acc')}; its NT-Xent @{sizes.large}, an objective it does not "
      f"minimise, is {sig['nt_xent_large']:.3f} (NT-Xent's {nce['nt_xent_large']:.3f}). Its "
      f"logit scale and bias moved from t = {_SIGLIP_T:g}, b = {_SIGLIP_BIAS:g} to "
      f"t = {siglip['t']:.3f}, b = {siglip['b']:.3f} (means over seeds).")
