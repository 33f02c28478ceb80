r"""Clipped GD is arbitrarily faster than fixed-step GD when the initial gradient is large.

Zhang, He, Sra, Jadbabaie, "Why gradient clipping accelerates training: a theoretical
justification for adaptivity", ICLR 2020, arXiv:1905.11881 (the
paper's Remark 5). On an (L0, L1)-smooth function, ``‖∇²f(x)‖ <= L0 + L1‖∇f(x)‖``, the
curvature grows with the gradient, so a fixed step must be small enough for the
steepest point the run visits, where ``‖∇f‖`` is about ``M = ‖∇f(x0)‖``; the paper's
lower bound for fixed-step GD grows with M, while its bound for clipped GD does not
depend on M. So the speedup of clipping is unbounded as M grows. This script measures
it: iterations to reach ``f(x) <= 1e-4`` (``f* = 0``) from ``x0 = s·u ∈ R^10`` for
growing ``s``, with ``u_i`` evenly spaced in [0.5, 1] (distinct coordinates, so that no
single lucky step, e.g. ``x(1 − ηx²) = 0`` on the quartic, can land on the minimum).

Objectives (both convex, minimum 0 at x = 0, *not* L-smooth for any L):

1. ``cosh``: ``f(x) = Σ_i a_i (cosh x_i − 1)`` with ``a_i`` log-spaced from 0.1 up to 1
   (condition number 10 at the minimum; the steepest coordinate starts farthest out).
   ``∇f = a ⊙ sinh x``, ``∇²f = diag(a ⊙ cosh x)`` and, since
   ``cosh t = √(1 + sinh² t) <= 1 + |sinh t|`` and ``a_i <= 1``,

     ``‖∇²f‖ = max_i a_i cosh x_i <= max_i a_i + max_i a_i|sinh x_i| <= 1 + ‖∇f‖``:

   (L0, L1) = (1, 1). Fixed-step GD must not throw the steepest coordinate (a = 1,
   x = s) beyond ``−s``: ``s − η sinh s >= −s`` needs ``η <= 2s/sinh s`` (a larger step
   lands where ``sinh`` is even larger, and the run diverges). Near the minimum the
   flattest coordinate (a = 0.1) then contracts by only ``1 − 0.1η`` per step: about
   ``5·(sinh s / s)·log(1/ε)`` iterations, exponential in s. Clipped GD moves at most
   ``ηγ`` per step while ``‖g‖ > γ`` (about ``‖x0‖/(ηγ)`` steps), then is plain GD with
   a step η of order 1: its iteration count grows only linearly in s.
   (Computed as ``2 a_i sinh²(x_i/2)``, which equals ``a_i(cosh x_i − 1)`` without the
   cancellation that would ruin float32 near the minimum.)

2. ``quartic``: ``f(x) = Σ_i x_i⁴ / 4``. ``∇f = x³``, ``∇²f = diag(3x²)``, and Young's
   inequality ``t² = (|t|³)^{2/3}·1^{1/3} <= (2/3)|t|³ + 1/3`` gives
   ``3x_i² <= 1 + 2|x_i|³``, so ``‖∇²f‖ <= 1 + 2 max_i |x_i|³ <= 1 + 2‖∇f‖``:
   (L0, L1) = (1, 2). Fixed-step GD needs ``η <= 2/s²`` (``s(1 − ηs²) >= −s``), and the
   flat minimum (``x_{t+1} = x_t(1 − η x_t²)``) then costs about ``1/(2η x²)`` iterations
   to reach ``|x|``: GD's count grows like ``s²`` — a polynomial rather than exponential
   gap, but still unbounded.

Methods (all through optax, jit-compiled, ``lax.scan`` inside a ``lax.while_loop``,
``vmap`` over the hyper-parameter grid):

- GD: ``optax.sgd(η)``, best of 57 log-spaced ``η ∈ [1e-6, 10]`` (8 per decade).
- hard / soft clipped GD: ``optax.chain(gradtx.clip_by_global_norm(γ, mode=...),
  optax.sgd(η))``, best over ``η ∈ [1e-2, 100]`` (17, 4 per decade) × ``γ ∈ [1e-2, 100]``
  (9, 2 per decade); also the untuned *theory* choice ``η = 1/L0, γ = L0/L1``, for which
  soft clipping takes exactly the step ``η* = 1/(L0 + L1‖g‖)`` of Zhang et al. and
  hard clipping ``min(1/L0, 1/(L1‖g‖))`` (Zhang et al.'s clipped-GD theorem uses this
  form with an extra safety factor 1/10).

A run's iteration count is the first t after which ``f(x_t) <= target`` holds to the
end of the run; diverged runs (non-finite loss) never count. A grid is simulated in
chunks of 256 steps until some run has stayed below the target for a whole chunk (its
count is then the grid's best: every other run was still above the target later) or
the budget (2^19 steps; 2^16 with ``--quick``) runs out.

``--quick``: fewer starting points, coarser grids (GD 4 η per decade; clipped 2 η and 1 γ
per decade).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import gradtx

NAME = "clipping_speedup"
DIM = 10
TARGET = 1e-4
CHUNK = 256
COSH_WEIGHTS = np.logspace(-1.0, 0.0, DIM)  # a_i, paired with START_SHAPE
START_SHAPE = np.linspace(0.5, 1.0, DIM)  # x0 = s * START_SHAPE


class Objective(NamedTuple):
  name: str
  fn: Callable[[jax.Array], jax.Array]
  l0: float
  l1: float
  starts: tuple[float, ...]
  quick_starts: tuple[float, ...]


def _cosh(x):
  return jnp.sum(COSH_WEIGHTS * 2.0 * jnp.square(jnp.sinh(x / 2.0)))


def _quartic(x):
  return jnp.sum(x**4) / 4.0


OBJECTIVES = (
    Objective("cosh", _cosh, 1.0, 1.0, (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0), (2.0, 6.0)),
    Objective("quartic", _quartic, 1.0, 2.0, (1.0, 3.0, 10.0, 30.0), (3.0, 10.0)),
)


def make_tx(method: str, lr, gamma) -> optax.GradientTransformation:
  if method == "gd":
    return optax.sgd(lr)
  return optax.chain(gradtx.clip_by_global_norm(gamma, mode=method), optax.sgd(lr))


@functools.partial(jax.jit, static_argnames=("fn", "method", "budget"))
def iterations_to_target(lrs, gammas, x0, *, fn, method, budget):
  """Per grid point: the first t after which ``fn(x_t) <= TARGET`` (``budget`` if none).

  Also returns how many steps were simulated (every count >= that is censored).
  """
  grad = jax.grad(fn)

  def chunk(lr, gamma, x, state, last_bad, start):
    tx = make_tx(method, lr, gamma)

    def step(carry, t):
      x, state, last_bad = carry
      updates, state = tx.update(grad(x), state, x)
      x = optax.apply_updates(x, updates)
      bad = jnp.logical_not(fn(x) <= TARGET)  # NaN counts as bad
      return (x, state, jnp.where(bad, t, last_bad)), None

    steps = start + 1 + jnp.arange(CHUNK, dtype=jnp.int32)
    return jax.lax.scan(step, (x, state, last_bad), steps)[0]

  n = lrs.shape[0]
  xs = jnp.broadcast_to(x0, (n,) + x0.shape)
  states = jax.vmap(lambda lr, gamma: make_tx(method, lr, gamma).init(x0))(lrs, gammas)
  last_bad = jnp.zeros((n,), jnp.int32)  # f(x0) > TARGET for every start used here

  def not_done(carry):
    t, _, _, last_bad = carry
    return (t < budget) & ~jnp.any(last_bad <= t - CHUNK)

  def body(carry):
    t, xs, states, last_bad = carry
    xs, states, last_bad = jax.vmap(chunk, in_axes=(0, 0, 0, 0, 0, None))(
        lrs, gammas, xs, states, last_bad, t)
    return t + CHUNK, xs, states, last_bad

  t, _, _, last_bad = jax.lax.while_loop(
      not_done, body, (jnp.int32(0), xs, states, last_bad))
  converged = last_bad <= t - CHUNK
  return jnp.where(converged, last_bad + 1, budget), t


@functools.partial(jax.jit, static_argnames=("fn", "method", "num_steps"))
def loss_curve(lr, gamma, x0, *, fn, method, num_steps):
  """``fn(x_t)`` for t = 0 … num_steps of one run."""
  tx = make_tx(method, lr, gamma)
  grad = jax.grad(fn)

  def step(carry, _):
    x, state = carry
    updates, state = tx.update(grad(x), state, x)
    x = optax.apply_updates(x, updates)
    return (x, state), fn(x)

  _, losses = jax.lax.scan(step, (x0, tx.init(x0)), None, length=num_steps)
  return jnp.concatenate([fn(x0)[None], losses])


def grids(quick: bool):
  per_decade_lr, per_decade_gamma = (2, 1) if quick else (4, 2)
  gd = np.logspace(-6, 1, 7 * 2 * per_decade_lr + 1)  # the baseline gets the finer grid
  lr, gamma = np.meshgrid(np.logspace(-2, 2, 4 * per_decade_lr + 1),
                          np.logspace(-2, 2, 4 * per_decade_gamma + 1), indexing="ij")
  return gd, lr.ravel(), gamma.ravel()


def best_of(counts, budget, lrs, gammas=None):
  counts = np.asarray(counts)
  i = int(np.argmin(counts))
  reached = counts[i] < budget
  out = {"iterations": int(counts[i]) if reached else None, "lr": float(lrs[i]),
         "grid_size": int(counts.size),
         "lr_at_grid_edge": bool(reached and lrs[i] in (np.min(lrs), np.max(lrs)))}
  if gammas is not None:
    out["gamma"] = float(gammas[i])
    out["gamma_at_grid_edge"] = bool(reached and gammas[i] in (np.min(gammas), np.max(gammas)))
  return out


def run_start(obj: Objective, s: float, quick: bool, budget: int):
  gd_lrs, clip_lrs, clip_gammas = grids(quick)
  x0 = jnp.asarray(s * START_SHAPE, jnp.float32)
  row = {"objective": obj.name, "s": s, "f_x0": float(obj.fn(x0)),
         "grad_norm_x0": float(jnp.linalg.norm(jax.grad(obj.fn)(x0)))}
  counts, simulated = iterations_to_target(jnp.asarray(gd_lrs), jnp.ones(gd_lrs.shape), x0,
                                           fn=obj.fn, method="gd", budget=budget)
  row["gd"] = best_of(counts, budget, gd_lrs) | {"steps_simulated": int(simulated)}
  theory_lr, theory_gamma = 1.0 / obj.l0, obj.l0 / obj.l1
  for mode in ("hard", "soft"):
    counts, simulated = iterations_to_target(jnp.asarray(clip_lrs), jnp.asarray(clip_gammas),
                                             x0, fn=obj.fn, method=mode, budget=budget)
    row[mode] = best_of(counts, budget, clip_lrs, clip_gammas)
    row[mode]["steps_simulated"] = int(simulated)
    theory_count, _ = iterations_to_target(jnp.asarray([theory_lr]), jnp.asarray([theory_gamma]),
                                           x0, fn=obj.fn, method=mode, budget=budget)
    theory_count = int(theory_count[0])
    row[f"theory_{mode}"] = {"iterations": theory_count if theory_count < budget else None,
                             "lr": theory_lr, "gamma": theory_gamma}
  gd_iters = row["gd"]["iterations"]
  for key in ("hard", "soft", "theory_hard", "theory_soft"):
    clip_iters = row[key]["iterations"]
    row[f"speedup_{key}"] = (
        None if clip_iters is None
        else (gd_iters / clip_iters if gd_iters is not None else math.inf))
  return row


def curves(obj: Objective, row: dict, budget: int):
  """Loss curves of the best runs (and the theory choice) from the row's start."""
  x0 = jnp.asarray(row["s"] * START_SHAPE, jnp.float32)
  longest = max(r["iterations"] or budget for r in (row["gd"], row["hard"], row["soft"]))
  num_steps = min(budget, int(2 ** math.ceil(math.log2(1.25 * longest + 16))))
  out = {}
  for label, key, method in [("GD", "gd", "gd"), ("hard clip", "hard", "hard"),
                             ("soft clip", "soft", "soft"),
                             ("soft clip, theory η, γ", "theory_soft", "soft")]:
    cfg = row[key]
    losses = loss_curve(jnp.float32(cfg["lr"]), jnp.float32(cfg.get("gamma", 1.0)), x0,
                        fn=obj.fn, method=method, num_steps=num_steps)
    out[label] = (cfg, np.asarray(losses))
  return out


def _fmt_iters(cfg, with_gamma=True):
  if cfg["iterations"] is None:
    return "never"
  text = f"{cfg['iterations']:,} (η={cfg['lr']:.2g}"
  return text + (f", γ={cfg['gamma']:.2g})" if with_gamma else ")")


def _fmt_speedup(x):
  return "—" if x is None else ("∞" if math.isinf(x) else f"{x:,.0f}×" if x >= 10
                                else f"{x:.1f}×")


def plot(rows, curve_sets, out_dir):
  plt = _common.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
  ax = axes[0]
  for obj, marker in zip(OBJECTIVES, "os", strict=True):
    mine = [r for r in rows if r["objective"] == obj.name]
    xs = [r["grad_norm_x0"] for r in mine]
    for key, color, label in [("gd", "tab:gray", "best GD"), ("hard", "tab:blue", "best hard clip"),
                              ("soft", "tab:orange", "best soft clip"),
                              ("theory_soft", "tab:green", "soft clip, theory η, γ")]:
      ys = [r[key]["iterations"] or np.nan for r in mine]
      ax.plot(xs, ys, marker=marker, color=color, ls="-" if obj.name == "cosh" else "--",
              label=f"{obj.name}: {label}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("‖∇f(x0)‖")
  ax.set_ylabel(f"iterations to f ≤ {TARGET:g}")
  ax.set_title("iterations vs initial gradient norm")
  ax.legend(fontsize=7, loc="upper left")
  colors = {"GD": "tab:gray", "hard clip": "tab:blue", "soft clip": "tab:orange",
            "soft clip, theory η, γ": "tab:green"}
  for ax, (obj_name, s, curve) in zip(axes[1:], curve_sets, strict=True):
    for label, (cfg, losses) in curve.items():
      t = np.arange(losses.size)
      gamma = f", γ={cfg['gamma']:.2g}" if "gamma" in cfg else ""
      ax.plot(t + 1, np.where(np.isfinite(losses), losses, np.nan), color=colors[label],
              ls=":" if "theory" in label else "-",
              label=f"{label} (η={cfg['lr']:.2g}{gamma})")
    ax.axhline(TARGET, color="black", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom=TARGET * 1e-4)
    ax.set_xlabel("iteration + 1")
    ax.set_ylabel("f(x)")
    ax.set_title(f"{obj_name}, x0 = {s:g}·u")
    ax.legend(fontsize=7, loc="upper right")
  fig.suptitle("Clipped GD vs the best fixed-step GD (Zhang et al. 2020)")
  _common.save_figure(fig, out_dir, NAME)


def main():
  args = _common.parse_args(__doc__.splitlines()[0])
  budget = 2**16 if args.quick else 2**19
  starts = [(obj, s) for obj in OBJECTIVES
            for s in (obj.quick_starts if args.quick else obj.starts)]
  rows, curve_sets = [], []
  for obj, s in tqdm(starts, desc=NAME, unit="start"):
    rows.append(run_start(obj, s, args.quick, budget))
  for obj in OBJECTIVES:
    last = [r for r in rows if r["objective"] == obj.name][-1]
    curve_sets.append((obj.name, last["s"], curves(obj, last, budget)))

  table = _common.markdown_table(
      ["objective", "x0", "‖∇f(x0)‖", "best GD: iters (η)", "hard clip: iters (η, γ)",
       "soft clip: iters (η, γ)", "theory η, γ: hard / soft", "speedup hard / soft"],
      [[r["objective"], f"{r['s']:g}·u", f"{r['grad_norm_x0']:.3g}", _fmt_iters(r["gd"], False),
        _fmt_iters(r["hard"]), _fmt_iters(r["soft"]),
        " / ".join(f"{r[f'theory_{m}']['iterations'] or 'never'}" for m in ("hard", "soft")),
        f"{_fmt_speedup(r['speedup_hard'])} / {_fmt_speedup(r['speedup_soft'])}"]
       for r in rows])
  gd_lrs, clip_lrs, clip_gammas = grids(args.quick)
  headline = [r for r in rows if r["s"] == max(x["s"] for x in rows
                                                if x["objective"] == r["objective"])]
  quick = " (quick)" if args.quick else ""
  markdown = "\n".join([
      f"# Clipped vs fixed-step gradient descent{quick}",
      "",
      f"Iterations until f(x) ≤ {TARGET:g} holds for good, from x0 = s·u ∈ R^{DIM}, "
      "u_i evenly spaced in [0.5, 1]. "
      "cosh: f = Σ a_i (cosh x_i − 1), a_i log-spaced 0.1 → 1, (L0, L1) = (1, 1); "
      "quartic: f = Σ x_i⁴/4, (L0, L1) = (1, 2). "
      f"GD: best of {gd_lrs.size} step sizes η ∈ [1e-6, 10]; clipped (gradtx."
      f"clip_by_global_norm + optax.sgd): best of {clip_lrs.size} (η, γ) pairs, "
      "η ∈ [1e-2, 100], γ ∈ [1e-2, 100], and the untuned theory choice η = 1/L0, "
      f"γ = L0/L1. Budget {budget:,} steps; 'never' = not reached (or diverged). "
      "Speedup = best GD / best clipped iterations.",
      "",
      table,
      "",
      "Largest start: " + "; ".join(
          f"{r['objective']} {_fmt_speedup(r['speedup_hard'])} (hard), "
          f"{_fmt_speedup(r['speedup_soft'])} (soft); untuned theory η, γ: "
          f"{_fmt_speedup(r['speedup_theory_hard'])} (hard), "
          f"{_fmt_speedup(r['speedup_theory_soft'])} (soft)" for r in headline)
      + ". Target: ≥ 5×.",
  ])
  _common.write_results(args.out, NAME, markdown=markdown, payload={
      "quick": args.quick,
      "config": {"dim": DIM, "target": TARGET, "budget": budget, "chunk": CHUNK,
                 "cosh_weights": COSH_WEIGHTS.tolist(), "start_shape": START_SHAPE.tolist(),
                 "gd_lrs": gd_lrs.tolist(),
                 "clip_lrs": sorted(set(clip_lrs.tolist())),
                 "clip_gammas": sorted(set(clip_gammas.tolist()))},
      "target": {"speedup_min": 5.0},
      "rows": [{k: (None if isinstance(v, float) and math.isinf(v) else v)
                for k, v in r.items()} for r in rows],
  })
  plot(rows, curve_sets, args.out)


if __name__ == "__main__":
  main()
