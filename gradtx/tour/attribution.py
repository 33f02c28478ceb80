"""Part ``attribution``: Integrated Gradients of a digits classifier, with heatmaps."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradtx
from gradtx.attribution import METHODS
from gradtx.tour._registry import (
    TEST_ACC,
    TRAIN_LOSS,
    Column,
    Context,
    PartResult,
    Row,
    number,
    part,
)
from gradtx.tour._report import Figure, Panel, direction
from gradtx.tour._training import init_params, run_compiled, train

_STEPS = 50  # quadrature nodes of the table's Integrated Gradients (Captum's default)
_CHECK = 1e-3  # the relative completeness delta that IG with 50 Gauss–Legendre nodes must meet
_LR = 3e-3
_SHOW = (0, 2, 3, 5, 7, 9)  # the heatmap figure shows the first test image of these digits


@dataclasses.dataclass(frozen=True)
class _Sizes:
  examples: int  # test images attributed (the first ones of the test split)
  methods: tuple[str, ...]  # quadratures in the table, at _STEPS steps
  sweep: tuple[int, ...]  # step counts of the convergence figure
  sweep_methods: tuple[str, ...]
  eg_samples: int  # draws of Expected Gradients per image
  noise_samples: int  # SmoothGrad's noise samples over Integrated Gradients


def _sizes(quick: bool) -> _Sizes:
  if quick:
    return _Sizes(40, ("riemann_trapezoid", "gausslegendre"), (4, 16, 50),
                  ("riemann_trapezoid", "gausslegendre"), 64, 8)
  return _Sizes(300, METHODS, (2, 4, 8, 16, 32, 50, 100),
                ("riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre"), 512,
                32)


_NOISE = 0.15  # SmoothGrad's noise, a fraction of each image's value range
_MAX_SIGMA = 2.0  # Blur IG's start: the image blurred by σ = 2 pixels


_ATTRIBUTION_ABOUT = f"""
Su (kexue.fm/archives/7533) and Sundararajan et al. (ICML 2017): the gradient term
`(x_i − x'_i) ∂_i F(x)` is the first-order share of feature i in `F(x) − F(x')`, exact
only for a linear F; integrating the gradient along the straight path from the baseline
`x'` to `x` makes it exact, `Σ_i IG_i = F(x) − F(x')` (*completeness*), up to the
quadrature error `δ`. Setting: a smooth MLP (64 → 64 → 64 → 10, softplus) trained by
Adam (lr {_LR:g}) on the digits, one run; the attributed output is the logit of the true
class, the baseline `x'` the black image (every pixel's training minimum). "mean |δ|" is
over the first test images; "relative δ" is mean |δ| / mean |F(x) − F(x')|. Rows:
the plain gradient term `(x − x') ⊙ ∇F(x)` (Su's first-order expansion);
`gradtx.integrated_gradients` with each quadrature at {_STEPS} steps (two with `--quick`);
`gradtx.expected_gradients` (baselines drawn from the training images, α ~ U(0, 1); δ
against `F(x) − mean F(x')`, a Monte-Carlo error); `gradtx.layer_integrated_gradients`
at the first hidden layer (`layer_0`, 64 units); the family: `gradtx.smooth_grad` over
IG ({int(_NOISE * 100)} % noise; δ is the mean of each noisy sample's own δ),
`gradtx.guided_integrated_gradients` (the adaptive path, a Riemann sum: δ falls as
1/steps) and `gradtx.blur_integrated_gradients` (the path of Gaussian blurs from
σ = {_MAX_SIGMA:g} pixels, exact blur derivative; δ against `F(x) − F(blurred x)`), each
with "corr. with IG", the Pearson correlation of its maps with IG's (Gauss–Legendre,
{_STEPS} steps). Train loss and test accuracy are the classifier's, the same on every row.
"""


class SmoothMLP(nn.Module):
  """``layer_0 → layer_1 → head`` with softplus: smooth, so the path integral is too."""

  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(2):
      x = nn.softplus(nn.Dense(self.width, name=f"layer_{i}")(x))
    return nn.Dense(10, name="head")(x)


def _examples(y_test: np.ndarray, count: int) -> np.ndarray:
  """The first test image of each digit in ``_SHOW``, then the first others up to ``count``."""
  shown = [int(np.argmax(y_test == digit)) for digit in _SHOW]
  rest = [i for i in range(len(y_test)) if i not in shown]
  return np.asarray(shown + rest[:max(count - len(shown), 0)])


def _tiles(rows: list[np.ndarray]) -> np.ndarray:
  """One row of 8×8 maps per method (one column per image), each scaled to max |value| 1."""
  cols = len(rows[0])
  image = np.full((9 * len(rows) - 1, 9 * cols - 1), np.nan)  # NaN: blank gaps
  for r, maps in enumerate(rows):
    for c in range(cols):
      tile = np.asarray(maps[c], np.float64).reshape(8, 8)
      scale = np.abs(tile).max()
      image[9 * r:9 * r + 8, 9 * c:9 * c + 8] = tile / scale if scale > 0 else tile
  return image


def _relative(delta: Any, change: np.ndarray) -> float:
  """mean |δ| / mean |F(x) − F(x')| over the attributed images."""
  return float(np.abs(np.asarray(delta, np.float64)).mean() / np.abs(change).mean())


def _stats(delta: Any, change: np.ndarray) -> dict[str, float]:
  return {"mean_delta": float(np.abs(np.asarray(delta, np.float64)).mean()),
          "rel_delta": _relative(delta, change)}


@part("attribution", "Integrated Gradients: attributions that add up", _ATTRIBUTION_ABOUT)
def _attribution(ctx: Context) -> PartResult:
  """The attributions of one trained classifier.

  Longer than 60 lines: a part reads top to bottom (data, runs, table, figure); its
  pieces share the runs' arrays, which smaller functions would pass around by the dozen.
  """
  cfg, data = ctx.config, ctx.data
  sizes = _sizes(cfg.quick)
  model = SmoothMLP()
  keys = jax.random.split(jax.random.key(7), (2, 1))
  runs = train(model.apply, optax.adam(_LR), init_params(model, keys[0]), data,
               steps=cfg.steps, keys=keys[1], batch_size=cfg.batch_size)
  params = jax.tree.map(lambda a: a[0], runs.params)
  # (N, 10) logits; apply returns an array (flax types it with mutable=True's tuple too)
  fn: Callable[[jax.typing.ArrayLike], jax.Array] = (
      lambda z: cast(jax.Array, model.apply(params, z)))

  # Small arrays: the arithmetic outside the compiled calls is numpy (no op-by-op compiles).
  idx = _examples(np.asarray(data.y_test), sizes.examples)
  x, y = np.asarray(data.x_test)[idx], np.asarray(data.y_test)[idx]
  x_train = np.asarray(data.x_train)
  base = x_train.min(axis=0)  # the black image (standardised)

  def logit(z, labels):
    return jnp.take_along_axis(fn(z), labels[:, None], axis=1)[:, 0]

  def first_order(x, y):  # F(x), F(x') and the gradient at x
    grad = jax.grad(lambda z: jnp.sum(logit(z, y)))(x)
    return logit(x, y), logit(jnp.zeros_like(x) + base, y), grad

  f_x, f_base, grad = jax.device_get(run_compiled(first_order, x, y))
  change = f_x - f_base
  times_input = (x - base) * grad
  first_order_delta = times_input.sum(axis=1) - change

  cache: dict[tuple[str, int], Any] = {}

  def ig(method: str, steps: int) -> tuple[jax.Array, np.ndarray]:
    if (method, steps) not in cache:
      cache[method, steps] = run_compiled(
          lambda x, y: gradtx.integrated_gradients(
              fn, x, baseline=base, steps=steps, method=method, target=y, return_delta=True),
          x, y)
    attr, delta = cache[method, steps]
    return attr, np.asarray(delta)

  jobs = [(m, _STEPS) for m in sizes.methods] + [
      (m, s) for m in sizes.sweep_methods for s in sizes.sweep if s != _STEPS]
  for method, steps in ctx.track(jobs):
    ig(method, steps)

  def eg(x, y):  # and E_{x'}[F(x')], the mean over the baselines (the training images)
    attr = gradtx.expected_gradients(fn, x, x_train, key=jax.random.key(0),
                                     samples=sizes.eg_samples, target=y)
    return attr, jnp.mean(fn(x_train)[:, y], axis=0)

  expected, mean_base = jax.device_get(run_compiled(eg, x, y))
  eg_delta = expected.sum(axis=1) - (f_x - mean_base)
  _, layer_delta = run_compiled(
      lambda x, y: gradtx.layer_integrated_gradients(
          fn, x, "layer_0", baseline=base, steps=_STEPS, target=y, return_delta=True), x, y)

  family = jax.device_get(run_compiled(
      functools.partial(_family, fn, base=base, samples=sizes.noise_samples), x, y))
  gl_map = np.asarray(ig("gausslegendre", _STEPS)[0])

  common = {"train_loss": float(runs.train_loss[0]), "test_acc": float(runs.test_acc[0])}
  rows = [Row("gradient × (x − x')", "first-order term at x",
              {**common, **_stats(first_order_delta, change)})]
  for method in sizes.methods:
    rows.append(Row("integrated_gradients", f"{method}, {_STEPS} steps",
                    {**common, **_stats(ig(method, _STEPS)[1], change)}))
  rows.append(Row("expected_gradients", f"{sizes.eg_samples} samples, training images as "
                  "baselines", {**common, **_stats(eg_delta, change)}))
  rows.append(Row("layer_integrated_gradients", f"layer_0 (64 units), gausslegendre, "
                  f"{_STEPS} steps", {**common, **_stats(layer_delta, change)}))
  for technique, setting, key in _FAMILY_ROWS:
    attr, delta, path_change = family[key]
    rows.append(Row(technique, setting.format(samples=sizes.noise_samples), {
        **common, **_stats(delta, np.asarray(path_change)),
        "corr_ig": float(np.corrcoef(np.ravel(attr), gl_map.ravel())[0, 1])}))

  shown = len(_SHOW)
  maps = [x - base, grad, times_input, gl_map, expected] + [
      family[key][0] for _, _, key in _FAMILY_ROWS]
  heatmaps = Figure(
      "attribution_heatmaps", "Attributions of the true class's logit",
      [Panel("rows: x − x', gradient, gradient × (x − x'),\n"
             f"integrated (gausslegendre, {_STEPS} steps), expected ({sizes.eg_samples} draws),"
             "\nSmoothGrad over IG, Guided IG, Blur IG"
             "\nred raises the logit, blue lowers it; each map on its own scale",
             {}, image=_tiles([np.asarray(m)[:shown] for m in maps]),
             x=[9 * c + 3.5 for c in range(shown)], xticklabels=[str(d) for d in _SHOW],
             xlabel="the first test image of each digit", ylabel="")])
  sweep = {m: [_relative(ig(m, s)[1], change) for s in sizes.sweep]
           for m in sizes.sweep_methods}
  convergence = Figure(
      "attribution_completeness", "Integrated Gradients: completeness delta vs quadrature steps",
      [Panel(f"mean |δ| / mean |F(x) − F(x')| over {len(idx)} test images",
             {m: np.asarray(v) for m, v in sweep.items()}, ylabel="relative δ",
             x=list(range(len(sizes.sweep))), xlabel="steps",
             xticklabels=[str(s) for s in sizes.sweep])])

  return PartResult(_COLUMNS, rows, [heatmaps, convergence], _findings(rows, sweep, sizes))


_COLUMNS = [TRAIN_LOSS, TEST_ACC, Column("mean_delta", "mean |δ|", ".1e"),
            Column("rel_delta", "relative δ", ".1e"), Column("corr_ig", "corr. with IG", ".2f")]

# (technique, setting, key of _family's result) of the family's rows
_FAMILY_ROWS = (
    ("smooth_grad", f"over integrated_gradients, {{samples}} samples, "
     f"{int(_NOISE * 100)} % noise", "smooth"),
    ("guided_integrated_gradients", f"{_STEPS} steps, fraction 0.25, max_dist 0.02", "guided"),
    ("blur_integrated_gradients", f"max_sigma {_MAX_SIGMA:g}, {_STEPS} steps", "blur"),
)


def _family(fn: Callable[[jax.Array], jax.Array], x: jax.Array, y: jax.Array, *,
            base: np.ndarray, samples: int) -> dict[str, tuple[jax.Array, ...]]:
  """``{key: (attributions (N, 64), δ (N,), F(x) − F(path start) (N,))}`` of the family."""
  logit = lambda z: jnp.take_along_axis(fn(z), y[:, None], axis=1)[:, 0]
  ig = functools.partial(gradtx.integrated_gradients, fn, baseline=base, steps=_STEPS,
                         target=y, return_delta=True)
  smooth, smooth_delta = gradtx.smooth_grad(ig, x, key=jax.random.key(1), samples=samples,
                                            stdev=_NOISE)
  guided, guided_delta = gradtx.guided_integrated_gradients(
      fn, x, baseline=base, steps=_STEPS, target=y, return_delta=True)
  images = x.reshape(-1, 8, 8, 1)
  flat = lambda im: fn(im.reshape(im.shape[0], -1))
  blur, blur_delta = gradtx.blur_integrated_gradients(
      flat, images, max_sigma=_MAX_SIGMA, steps=_STEPS, grad_step=None, target=y,
      return_delta=True)
  blurred = gradtx.attribution.gaussian_blur(images, _MAX_SIGMA).reshape(x.shape)
  # SmoothGrad's δ is each noisy sample's own: against F at the noisy points, whose mean
  # is Σ SG + mean δ; so its reference change is the attributions' sum less that δ
  return {"smooth": (smooth, smooth_delta, smooth.sum(1) - smooth_delta),
          "guided": (guided, guided_delta, logit(x) - logit(jnp.zeros_like(x) + base)),
          "blur": (blur.reshape(x.shape), blur_delta, logit(x) - logit(blurred))}


def _findings(rows: list[Row], sweep: dict[str, list[float]], sizes: _Sizes) -> list[str]:
  """The findings, worded from the rows' relative deltas and the convergence sweep."""
  rel = {(r.technique, r.setting): number(r.values, "rel_delta") for r in rows}
  gl = rel["integrated_gradients", f"gausslegendre, {_STEPS} steps"]
  trap = rel["integrated_gradients", f"riemann_trapezoid, {_STEPS} steps"]
  first = number(rows[0].values, "rel_delta")
  layer = rel["layer_integrated_gradients",
              f"layer_0 (64 units), gausslegendre, {_STEPS} steps"]
  fam = {r.technique: r.values for r in rows[-len(_FAMILY_ROWS):]}
  smooth, guided, blur = (fam[t] for t, _, _ in _FAMILY_ROWS)
  corr = {t: number(fam[t], "corr_ig") for t, _, _ in _FAMILY_ROWS}
  best = max(corr, key=corr.__getitem__)
  return [
      f"- Completeness: with {_STEPS} Gauss–Legendre nodes the attributions add up to "
      f"F(x) − F(x') within relative δ {gl:.1e} (≤ {_CHECK:g}: "
      f"{'yes' if gl <= _CHECK else 'NO'}); the trapezoid rule's δ at {_STEPS} steps is "
      f"{trap:.1e}, {direction(trap, gl, 'smaller', 'larger')} than Gauss–Legendre's; the "
      f"first-order term `(x − x') ⊙ ∇F(x)` misses by {first:.2g} of the change, "
      f"{direction(first, trap, 'less', 'more')} than the trapezoid rule: the gradient at x "
      "alone does not account for the change from a distant baseline.",
      f"- Steps for the convergence figure: {', '.join(map(str, sizes.sweep))}; "
      + "; ".join(f"{m} {v[0]:.1e} → {v[-1]:.1e}" for m, v in sweep.items()) + ".",
      f"- Expected Gradients add up only in expectation (δ is Monte-Carlo error over "
      f"{sizes.eg_samples} draws); layer IG at `layer_0` has relative δ {layer:.1e}, "
      f"{direction(layer, _CHECK, 'within', 'beyond')} the {_CHECK:g} that input IG meets.",
      f"- The family: SmoothGrad over IG ({sizes.noise_samples} samples) keeps every noisy "
      f"sample complete (relative δ {number(smooth, 'rel_delta'):.1e}, "
      f"{direction(number(smooth, 'rel_delta'), _CHECK, 'within', 'beyond')} {_CHECK:g}); "
      f"Guided IG's adaptive path is a Riemann sum, relative δ "
      f"{number(guided, 'rel_delta'):.1e} at {_STEPS} steps, "
      f"{direction(number(guided, 'rel_delta'), gl, 'smaller', 'larger')} than "
      f"Gauss–Legendre IG's; Blur IG {number(blur, 'rel_delta'):.1e} against "
      f"F(x) − F(blurred x). Correlation of the maps with IG's: "
      + ", ".join(f"{t} {c:.2f}" for t, c in corr.items())
      + f" — {best} agrees most with IG.",
  ]
