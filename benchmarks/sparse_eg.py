r"""EG± vs gradient descent on a sparse linear target with dense inputs (Kivinen & Warmuth).

Kivinen & Warmuth (1997, "Exponentiated gradient versus gradient descent for linear
predictors") bound the online square loss of GD by
roughly ``‖w*‖₂² · max‖x‖₂²`` and that of EG± by ``U² · max‖x‖∞² · ln(2d)`` (``U >=
‖w*‖₁`` its budget). With ``d`` dense inputs (``‖x‖₂² ≈ d``, ``‖x‖∞`` of order 1) and
a target with ``k << d`` non-zero weights, the first grows like ``k·d`` and the second
like ``k²·ln d``: EG± should need far fewer examples. Here ``d = 1000``, ``k = 10``,
``w*`` = ±1 on ``k`` random coordinates (``‖w*‖₁ = 10``, ``‖w*‖₂² = 10``), ``y = w*·x``
(no noise), inputs ±1 (Rademacher) or standard Gaussian, ``w_0 = 0``, loss
``½(w·x − y)²``. (The bounds alone suggest an advantage of about
``1000·10 / (100·ln 2000) ≈ 13×``; they bound cumulative loss, not what is measured.)

Two regimes:

1. **Online** (``rows``, Kivinen & Warmuth's setting): every iteration draws one fresh
   example and takes one step on its loss, so iterations = examples seen. Measured: the
   expected (population) loss ``E ½(w·x − y)² = ½‖w − w*‖²`` (exact: ``E[x xᵀ] = I`` for
   both input laws), averaged over 6 seeds (``w*`` support and signs, and the example
   stream, drawn with numpy and fed in chunks of 1000; 2 seeds with ``--quick``).
   Iterations to target: the first t after which the mean loss stays ≤ 1% of its
   initial value (5.0) to the end of the budget (12,000 examples; 6,000 with
   ``--quick``); also to a 10× tighter target (0.1%), each method at its best rate for
   that one. Learning-rate grids: 8 per decade (2 with ``--quick``).
2. **Full batch** (``full_batch``, n = 500 fixed examples < d): every iteration is one
   step on the mean training loss. Measured: iterations until the training loss stays
   ≤ 1% of its initial value, and the population loss ``½‖w − w*‖²`` reached. With
   n < d the training set does not determine ``w*``: GD converges to the minimum-norm
   interpolant (population loss about ``(1 − n/d)`` of the initial), EG± to a
   small-‖·‖₁ one. Learning rates are chosen on the training target. 4 seeds (2 with
   ``--quick``), 500 iterations (200), grids of 4 per decade (2).

Methods, each at its best learning rate from its log grid (a best rate at the edge of
its grid is flagged): ``optax.sgd(η)`` (GD), and
``gradtx.eg_plus_minus(η, total=U)`` for ``U = ‖w*‖₁``, ``2‖w*‖₁`` and ``4‖w*‖₁`` (EG±
needs a bound ``U >= ‖w*‖₁``; a loose one costs speed). Learning rates and seeds are
``vmap``-ed, the iterations are a ``lax.scan``; the examples of a seed are the same for
every method and learning rate.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import gradtx

NAME = "sparse_eg"
DIM = 1000
RELEVANT = 10
NUM_EXAMPLES = 500  # full batch
TARGET_FRACTION = 0.01
TIGHT_FRACTION = 0.001  # a second, 10x tighter online target
INPUTS = ("rademacher", "gaussian")
ONLINE_CHUNK = 1000  # examples drawn with numpy and fed per call
W_STAR_L1 = float(RELEVANT)


class Method(NamedTuple):
  key: str
  label: str
  total: float | None  # EG± budget U; None for GD


METHODS = (
    Method("gd", "GD (optax.sgd)", None),
    Method("eg_u1", "EG± U=‖w*‖₁", W_STAR_L1),
    Method("eg_u2", "EG± U=2‖w*‖₁", 2 * W_STAR_L1),
    Method("eg_u4", "EG± U=4‖w*‖₁", 4 * W_STAR_L1),
)


def make_tx(method: Method, lr) -> optax.GradientTransformation:
  if method.total is None:
    return optax.sgd(lr)
  return gradtx.eg_plus_minus(lr, total=method.total)


def lr_grid(method: Method, regime: str, quick: bool) -> np.ndarray:
  per_decade = {("online", False): 8, ("online", True): 2, ("full_batch", False): 4,
                ("full_batch", True): 2}[regime, quick]
  if regime == "online":
    low, high = (-5.0, -2.0) if method.total is None else (-3.0, 0.0)
  else:
    low, high = (-3.0, 1.0) if method.total is None else (-3.0, 2.0)
  return np.logspace(low, high, int(round((high - low) * per_decade)) + 1)


def w_stars(seeds: list[int]) -> np.ndarray:
  out = np.zeros((len(seeds), DIM), np.float32)
  for i, seed in enumerate(seeds):
    rng = np.random.default_rng(seed)
    support = rng.choice(DIM, RELEVANT, replace=False)
    out[i, support] = rng.choice([-1.0, 1.0], RELEVANT)
  return out


def draw_inputs(rng: np.random.Generator, shape: tuple[int, ...], inputs: str) -> np.ndarray:
  if inputs == "rademacher":
    return (2 * rng.integers(0, 2, shape, dtype=np.int8) - 1).astype(np.float32)
  return rng.standard_normal(shape, dtype=np.float32)


@functools.partial(jax.jit, static_argnames=("method",))
def online_init(lrs, w_star, *, method):
  """Per learning rate and seed: ``w_0 = 0`` and the optimizer state."""
  w0 = jnp.zeros(w_star.shape[-1:], jnp.float32)
  init = lambda lr, _: (w0, make_tx(method, lr).init(w0))
  return jax.vmap(jax.vmap(init, (None, 0)), (0, None))(lrs, w_star)


@functools.partial(jax.jit, static_argnames=("method",))
def online_chunk(lrs, carry, xs, w_star, *, method):
  """One step per example of ``xs [S, C, d]``: the carry and the population losses [L, S, C]."""

  def one(lr, carry, x, w_star):
    tx = make_tx(method, lr)

    def step(carry, x):
      w, state = carry
      grad = (w @ x - w_star @ x) * x
      updates, state = tx.update(grad, state, w)
      w = optax.apply_updates(w, updates)
      return (w, state), 0.5 * jnp.sum(jnp.square(w - w_star))

    return jax.lax.scan(step, carry, x)

  return jax.vmap(jax.vmap(one, (None, 0, 0, 0)), (0, 0, None, None))(lrs, carry, xs, w_star)


@functools.partial(jax.jit, static_argnames=("method", "steps"))
def full_batch(lrs, xs, w_star, *, method, steps):
  """Training and population loss curves ``[L, S, steps + 1]``."""

  def one(lr, x, w_star):
    tx = make_tx(method, lr)
    y = x @ w_star
    w0 = jnp.zeros((DIM,), jnp.float32)
    train = lambda w: 0.5 * jnp.mean(jnp.square(x @ w - y))
    pop = lambda w: 0.5 * jnp.sum(jnp.square(w - w_star))

    def step(carry, _):
      w, state = carry
      updates, state = tx.update(jax.grad(train)(w), state, w)
      w = optax.apply_updates(w, updates)
      return (w, state), (train(w), pop(w))

    _, (tr, po) = jax.lax.scan(step, (w0, tx.init(w0)), None, length=steps)
    return (jnp.concatenate([train(w0)[None], tr]), jnp.concatenate([pop(w0)[None], po]))

  tr, po = jax.vmap(jax.vmap(one, (None, 0, 0)), (0, None, None))(lrs, xs, w_star)
  fix = lambda a: jnp.where(jnp.isfinite(a), a, jnp.inf)
  return fix(tr), fix(po)


def first_for_good(curve: np.ndarray, threshold: float) -> int | None:
  """First t after which ``curve[t:] <= threshold``; None if the last value is above."""
  bad = np.flatnonzero(~(curve <= threshold))
  if bad.size == 0:
    return 0
  return None if bad[-1] == curve.size - 1 else int(bad[-1] + 1)


def _best(lrs: np.ndarray, counts: list[int | None]) -> int | None:
  reached = [(c, i) for i, c in enumerate(counts) if c is not None]
  return min(reached)[1] if reached else None


def run_online(inputs: str, quick: bool, seeds: list[int], steps: int, progress) -> tuple:
  """Every method's grid on the same example streams, fed to the device in chunks."""
  w_star = jnp.asarray(w_stars(seeds))
  rngs = [np.random.default_rng(1000 + s) for s in seeds]
  grids = {m.key: jnp.asarray(lr_grid(m, "online", quick), jnp.float32) for m in METHODS}
  carries = {m.key: online_init(grids[m.key], w_star, method=m) for m in METHODS}
  losses = {m.key: [] for m in METHODS}
  for start in range(0, steps, ONLINE_CHUNK):
    size = min(ONLINE_CHUNK, steps - start)
    xs = jnp.asarray(np.stack([draw_inputs(rng, (size, DIM), inputs) for rng in rngs]))
    for m in METHODS:
      carries[m.key], chunk = online_chunk(grids[m.key], carries[m.key], xs, w_star, method=m)
      losses[m.key].append(chunk)
    jax.block_until_ready(carries)
    progress.update()
  initial = 0.5 * np.sum(np.square(np.asarray(w_star, np.float64)), axis=-1)  # [S]
  rows, curves = [], {}
  for method in METHODS:
    lrs = np.asarray(grids[method.key], np.float64)
    per_seed = np.concatenate([np.asarray(c, np.float64) for c in losses[method.key]], -1)
    per_seed = np.concatenate([np.broadcast_to(initial[None, :, None], per_seed.shape[:2] + (1,)),
                               np.where(np.isfinite(per_seed), per_seed, np.inf)], -1)
    mean_curves = per_seed.mean(axis=1)
    threshold = TARGET_FRACTION * mean_curves[0, 0]
    counts = [first_for_good(c, threshold) for c in mean_curves]
    best = _best(lrs, counts)
    row = {"regime": "online", "inputs": inputs, "method": method.key, "label": method.label,
           "total": method.total, "lrs": lrs.tolist(), "iterations_by_lr": counts,
           "target_loss": float(threshold), "budget": steps}
    if best is None:
      row |= {"iterations": None, "lr": None, "lr_at_grid_edge": False,
              "per_seed_iterations": None}
    else:
      row |= {"iterations": counts[best], "lr": float(lrs[best]),
              "lr_at_grid_edge": best in (0, lrs.size - 1),
              "per_seed_iterations": [first_for_good(c, TARGET_FRACTION * i)
                                      for c, i in zip(per_seed[best], initial, strict=True)]}
      curves[method.key] = (float(lrs[best]), mean_curves[best])
    # The same at a 10x tighter target, each method again at its best rate for it.
    tight_counts = [first_for_good(c, TIGHT_FRACTION * mean_curves[0, 0]) for c in mean_curves]
    tight = _best(lrs, tight_counts)
    row["tight"] = {"target_fraction": TIGHT_FRACTION,
                    "iterations": None if tight is None else tight_counts[tight],
                    "lr": None if tight is None else float(lrs[tight]),
                    "lr_at_grid_edge": tight is not None and tight in (0, lrs.size - 1)}
    rows.append(row)
  for entry in (lambda r: r, lambda r: r["tight"]):
    gd = entry(rows[0])["iterations"]
    for row in rows:
      n = entry(row)["iterations"]
      entry(row)["gd_over_method"] = None if n is None or gd is None else gd / max(n, 1)
      # GD censored by the budget: the ratio is at least budget / n.
      entry(row)["gd_over_method_at_least"] = (steps / max(n, 1) if n is not None and gd is None
                                               else None)
  return rows, curves


def run_full_batch(inputs: str, quick: bool, seeds: list[int], steps: int, progress) -> tuple:
  w_star = w_stars(seeds)
  xs = []
  for seed in seeds:
    rng = np.random.default_rng(2000 + seed)
    x = (rng.choice([-1.0, 1.0], (NUM_EXAMPLES, DIM)) if inputs == "rademacher"
         else rng.standard_normal((NUM_EXAMPLES, DIM)))
    xs.append(x.astype(np.float32))
  xs = jnp.asarray(np.stack(xs))
  rows, curves = [], {}
  for method in METHODS:
    lrs = lr_grid(method, "full_batch", quick)
    train, pop = jax.device_get(full_batch(jnp.asarray(lrs, jnp.float32), xs,
                                           jnp.asarray(w_star), method=method, steps=steps))
    train, pop = (np.asarray(a, np.float64).mean(axis=1) for a in (train, pop))
    train_threshold = TARGET_FRACTION * train[0, 0]
    pop_threshold = TARGET_FRACTION * pop[0, 0]
    counts = [first_for_good(c, train_threshold) for c in train]
    best = _best(lrs, counts)
    row = {"regime": "full_batch", "inputs": inputs, "method": method.key,
           "label": method.label, "total": method.total, "lrs": lrs.tolist(),
           "iterations_by_lr": counts, "train_target": float(train_threshold),
           "population_target": float(pop_threshold), "budget": steps,
           "num_examples": NUM_EXAMPLES}
    if best is None:
      row |= {"train_iterations": None, "lr": None, "lr_at_grid_edge": False,
              "population_iterations": None, "final_population_loss": None,
              "final_population_fraction": None}
    else:
      final_pop = float(pop[best, -1])
      row |= {"train_iterations": counts[best], "lr": float(lrs[best]),
              "lr_at_grid_edge": best in (0, lrs.size - 1),
              "population_iterations": first_for_good(pop[best], pop_threshold),
              "final_population_loss": final_pop if math.isfinite(final_pop) else None,
              "final_population_fraction": (final_pop / pop[0, 0]
                                            if math.isfinite(final_pop) else None)}
      curves[method.key] = (float(lrs[best]), train[best], pop[best])
    rows.append(row)
    progress.update()
  return rows, curves


def _fmt_iters(n, lr=None, edge=False):
  if n is None:
    return "never"
  text = f"{n:,}"
  if lr is not None:
    text += f" (η={lr:.2g}{', grid edge' if edge else ''})"
  return text


def _fmt_spread(counts):
  if counts is None:
    return "—"
  reached = [c for c in counts if c is not None]
  never = len(counts) - len(reached)
  text = f"{min(reached):,} – {max(reached):,}" if reached else ""
  return text + (f"{'; ' if reached else ''}{never} never" if never else "")


def _fmt_ratio(x, at_least=None):
  if x is None:
    return "—" if at_least is None else f"> {_fmt_ratio(at_least)}"
  return f"{x:,.0f}×" if x >= 10 else f"{x:.2g}×"


def _row_ratio(entry):
  return _fmt_ratio(entry["gd_over_method"], entry["gd_over_method_at_least"])


def plot(online_curves, batch_curves, out_dir):
  plt = _common.pyplot()
  fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
  colors = {"gd": "tab:gray", "eg_u1": "tab:orange", "eg_u2": "tab:blue", "eg_u4": "tab:green"}
  labels = {m.key: m.label for m in METHODS}
  for ax, inputs in zip(axes[:2], INPUTS, strict=True):
    for key, (lr, curve) in online_curves[inputs].items():
      t = np.arange(curve.size)
      ax.plot(t, np.where(np.isfinite(curve), curve, np.nan), color=colors[key],
              label=f"{labels[key]} (η={lr:.2g})")
    for fraction, style in ((TARGET_FRACTION, "--"), (TIGHT_FRACTION, ":")):
      ax.axhline(fraction * 0.5 * RELEVANT, color="black", lw=0.8, ls=style,
                 label=f"target ({fraction:.1%} of initial)")
    ax.set_yscale("log")
    ax.set_xlabel("iteration = examples seen")
    ax.set_ylabel("population loss ½‖w − w*‖² (mean over seeds)")
    ax.set_title(f"online, {inputs} inputs, d={DIM}, {RELEVANT} relevant")
    ax.legend(fontsize=7)
  for ax, inputs in zip(axes[2:], INPUTS, strict=True):
    for key, (lr, train, pop) in batch_curves[inputs].items():
      t = np.arange(train.size)
      ax.plot(t, np.where(np.isfinite(train), train, np.nan), color=colors[key],
              label=f"{labels[key]} (η={lr:.2g}): train")
      ax.plot(t, np.where(np.isfinite(pop), pop, np.nan), color=colors[key], ls=":",
              label="population")
    ax.set_yscale("log")
    ax.set_xlabel("full-batch iteration")
    ax.set_ylabel("loss (mean over seeds)")
    ax.set_title(f"full batch, n={NUM_EXAMPLES} < d, {inputs} inputs")
    ax.legend(fontsize=6, ncol=2, loc="center right")
  fig.suptitle("EG± vs GD on a sparse target with dense inputs (Kivinen & Warmuth 1997)")
  _common.save_figure(fig, out_dir, NAME)


def main():
  args = _common.parse_args(__doc__.splitlines()[0])
  quick = args.quick
  online_steps = 6_000 if quick else 12_000
  batch_steps = 200 if quick else 500
  online_seeds = [0, 1] if quick else list(range(6))
  batch_seeds = [0, 1] if quick else [0, 1, 2, 3]
  rows, batch_rows = [], []
  online_curves, batch_curves = {}, {}
  total = len(INPUTS) * (math.ceil(online_steps / ONLINE_CHUNK) + len(METHODS))
  with tqdm(total=total, desc=NAME, unit="call") as progress:
    for inputs in INPUTS:
      new_rows, online_curves[inputs] = run_online(inputs, quick, online_seeds, online_steps,
                                                   progress)
      rows += new_rows
    for inputs in INPUTS:
      new_rows, batch_curves[inputs] = run_full_batch(inputs, quick, batch_seeds, batch_steps,
                                                      progress)
      batch_rows += new_rows

  table = _common.markdown_table(
      ["inputs", "method", "grid (η)", "iterations to 1% (best η)", "GD / method",
       "per-seed iterations at that η", "iterations to 0.1% (best η)", "GD / method"],
      [[r["inputs"], r["label"], f"{r['lrs'][0]:.0e} … {r['lrs'][-1]:.0e} ({len(r['lrs'])})",
        _fmt_iters(r["iterations"], r["lr"], r["lr_at_grid_edge"]),
        _row_ratio(r),
        _fmt_spread(r["per_seed_iterations"]),
        _fmt_iters(r["tight"]["iterations"], r["tight"]["lr"], r["tight"]["lr_at_grid_edge"]),
        _row_ratio(r["tight"])]
       for r in rows])
  batch_table = _common.markdown_table(
      ["inputs", "method", "iterations to train loss ≤ 1% (best η)",
       "iterations to population loss ≤ 1%", "final population loss / initial"],
      [[r["inputs"], r["label"], _fmt_iters(r["train_iterations"], r["lr"], r["lr_at_grid_edge"]),
        _fmt_iters(r["population_iterations"]),
        "—" if r["final_population_fraction"] is None
        else f"{r['final_population_fraction']:.3g}"] for r in batch_rows])
  summary, batch_summary = [], []
  for inputs in INPUTS:
    mine = {r["method"]: r for r in rows if r["inputs"] == inputs}
    summary.append(
        f"- online, {inputs}, 1% target: GD needs {_fmt_iters(mine['gd']['iterations'])} "
        "examples; " + ", ".join(
            f"{mine[k]['label']} {_fmt_iters(mine[k]['iterations'])} "
            f"(GD / EG± = {_row_ratio(mine[k])})"
            for k in ("eg_u1", "eg_u2", "eg_u4"))
        + "; at 0.1%: " + ", ".join(
            f"{mine[k]['label']} {_row_ratio(mine[k]['tight'])}"
            for k in ("eg_u1", "eg_u2", "eg_u4")) + ".")
    mine = {r["method"]: r for r in batch_rows if r["inputs"] == inputs}
    gd, eg = mine["gd"], mine["eg_u1"]
    batch_summary.append(
        f"- full batch, {inputs}: training target in {_fmt_iters(gd['train_iterations'])} "
        f"iterations for GD vs {_fmt_iters(eg['train_iterations'])} for EG± U=‖w*‖₁; "
        "final population loss / initial "
        + " vs ".join("—" if r["final_population_fraction"] is None
                      else f"{r['final_population_fraction']:.3g}" for r in (gd, eg)) + ".")
  title_quick = " (quick)" if quick else ""
  markdown = "\n".join([
      f"# EG± vs GD on a sparse target with dense inputs{title_quick}",
      "",
      f"Linear regression, d = {DIM} inputs of which {RELEVANT} are relevant (w* = ±1 on "
      f"them: ‖w*‖₁ = {W_STAR_L1:g}, ‖w*‖₂² = {RELEVANT}), y = w*·x without noise, inputs "
      "±1 (Rademacher) or N(0, 1), w₀ = 0, loss ½(w·x − y)². GD is optax.sgd(η); EG± is "
      "gradtx.eg_plus_minus(η, total=U). Each method at its best η from a log grid "
      "('grid edge' flags a best η at the end of its grid).",
      "",
      f"**Online** (Kivinen & Warmuth's setting: one fresh example per iteration, "
      f"{online_steps:,} iterations, {len(online_seeds)} seeds): iterations (= examples) "
      "until the population loss ½‖w − w*‖², averaged over seeds, stays ≤ 1% of its "
      "initial value (and, second pair of columns, ≤ 0.1%, each method at its best η for "
      "that target). Ratio = GD iterations / method iterations ('> r' when GD did not "
      "reach the target within the budget: a lower bound).",
      "",
      table,
      "",
      *summary,
      "",
      f"**Full batch** (n = {NUM_EXAMPLES} fixed examples < d, {batch_steps:,} iterations, "
      f"{len(batch_seeds)} seeds; η chosen on the training target, then the population "
      "loss ½‖w − w*‖² of that run): with n < d the training set does not determine w*; GD "
      "from 0 converges to the minimum-norm interpolant, whose population loss is about "
      f"(1 − n/d) = {1 - NUM_EXAMPLES / DIM:.2g} of the initial.",
      "",
      batch_table,
      "",
      *batch_summary,
  ])
  _common.write_results(args.out, NAME, markdown=markdown, payload={
      "quick": quick,
      "config": {"dim": DIM, "relevant": RELEVANT, "w_star_l1": W_STAR_L1,
                 "target_fraction": TARGET_FRACTION, "tight_fraction": TIGHT_FRACTION,
                 "online_steps": online_steps,
                 "online_seeds": online_seeds, "full_batch_steps": batch_steps,
                 "full_batch_seeds": batch_seeds, "num_examples": NUM_EXAMPLES,
                 "inputs": list(INPUTS), "noise": 0.0,
                 "methods": {m.key: {"label": m.label, "total": m.total} for m in METHODS}},
      "rows": rows,
      "full_batch": {"rows": batch_rows},
  })
  plot(online_curves, batch_curves, args.out)


if __name__ == "__main__":
  main()
