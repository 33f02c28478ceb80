"""What every benchmark shares: the command line, interleaved timing, the result files.

A benchmark is ``python benchmarks/<name>.py [--quick] [--out DIR]``: it prints a
markdown table and writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` to ``DIR``
(``benchmarks/results/`` by default, ``benchmarks/results/quick/`` with ``--quick``, so a
quick run never overwrites the committed full results; an explicit ``--out`` that holds a
full result of the benchmark is refused to a quick run).

Timings follow one rule (README, "Benchmarks and notebooks"): the machines are noisy and
shared, so absolute times are not comparable between runs. Every function under
comparison is jit-compiled and warmed up, then timed in *rounds*: each round calls every
function once, in a fresh random order, blocking until its result is ready. A ratio is
the median over rounds of the per-round ratio, so a slow spell that hits one round
hits numerator and denominator alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

RESULTS_DIR = Path(__file__).resolve().parent / "results"


QUICK_DIR = RESULTS_DIR / "quick"


def parse_args(description: str,
               configure: Callable[[argparse.ArgumentParser], None] | None = None, *,
               argv: Sequence[str] | None = None, name: str | None = None,
               ) -> argparse.Namespace:
  """``--quick`` (small sizes, few repeats: about a minute) and ``--out DIR``, checked.

  ``configure(parser)``, if given, adds a benchmark's own options. Without ``--out``,
  results go to ``benchmarks/results/`` (``benchmarks/results/quick/`` with ``--quick``).

  Args:
    description: the help text's first line.
    configure: adds options to the parser.
    argv: the arguments (default ``sys.argv[1:]``).
    name: the benchmark (default: the running script's file name).

  Raises:
    SystemExit: ``--out`` is an existing file, or a quick run's ``--out`` holds a full
      result of this benchmark; the message names the option, the path and what to do.
  """
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and few repeats (about a minute)")
  parser.add_argument("--out", type=Path, default=None,
                      help=f"directory for the .json/.md/.png results (default {RESULTS_DIR}, "
                           f"{QUICK_DIR} with --quick)")
  if configure is not None:
    configure(parser)
  args = parser.parse_args(argv)
  if args.out is None:
    args.out = QUICK_DIR if args.quick else RESULTS_DIR
  name = name or Path(sys.argv[0]).stem
  if args.out.exists() and not args.out.is_dir():
    raise SystemExit(f"--out {str(args.out)!r} is an existing file, not a folder: give a "
                     f"folder for {name}'s results (default {RESULTS_DIR})")
  previous = args.out / f"{name}.json"
  if args.quick and previous.is_file():
    try:
      full = json.loads(previous.read_text()).get("quick") is False
    except ValueError:
      full = False
    if full:
      raise SystemExit(f"--out {str(args.out)!r} holds the full results of {name} "
                       f"({previous.name}), which this --quick run would overwrite; give "
                       f"another --out (quick runs go to {QUICK_DIR} by default)")
  return args


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 2,
    seed: int = 0,
    on_round: Callable[[], None] | None = None,
) -> dict[str, np.ndarray]:
  """Seconds per call of every function, measured in interleaved rounds.

  Each round calls every function once, in a fresh random order, and waits for its
  result with ``jax.block_until_ready``. The first ``warmup`` rounds (which also
  trigger compilation) are not recorded.

  Args:
    fns: ``{name: fn}``; each ``fn()`` runs one jit-compiled computation.
    repeats: recorded rounds.
    warmup: unrecorded rounds first.
    seed: seeds the order of calls within rounds.
    on_round: called after every round (e.g. a progress bar's ``update``).

  Returns:
    ``{name: array of repeats seconds}``, aligned by round.
  """
  order = list(fns)
  rng = random.Random(seed)
  times: dict[str, list[float]] = {name: [] for name in order}
  for round_index in range(warmup + repeats):
    rng.shuffle(order)
    for name in order:
      start = time.perf_counter()
      jax.block_until_ready(fns[name]())
      elapsed = time.perf_counter() - start
      if round_index >= warmup:
        times[name].append(elapsed)
    if on_round is not None:
      on_round()
  return {name: np.asarray(values) for name, values in times.items()}


def paired_ratio(numerator: np.ndarray, denominator: np.ndarray, *,
                 num_bootstrap: int = 2000) -> dict[str, float]:
  """Median over rounds of ``numerator / denominator`` (same-round pairs), with spread.

  Gives the quartiles of the per-round ratios, a 95% bootstrap confidence interval of
  their median (``ci_low``, ``ci_high``; resampling rounds, fixed seed), and
  ``ratio_of_medians`` (``median(numerator) / median(denominator)``), which ignores the
  pairing; the two agree when the noise is stationary.
  """
  ratios = np.asarray(numerator) / np.asarray(denominator)
  q25, median, q75 = np.percentile(ratios, [25, 50, 75])
  resampled = np.random.default_rng(0).choice(ratios, size=(num_bootstrap, ratios.size))
  ci_low, ci_high = np.percentile(np.median(resampled, axis=1), [2.5, 97.5])
  return {
      "median": float(median),
      "q25": float(q25),
      "q75": float(q75),
      "ci_low": float(ci_low),
      "ci_high": float(ci_high),
      "ratio_of_medians": float(np.median(numerator) / np.median(denominator)),
      "rounds": int(ratios.size),
  }


def environment() -> dict[str, Any]:
  """Where the numbers were measured."""
  device = jax.devices()[0]
  return {
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device": getattr(device, "device_kind", str(device)),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "machine": platform.machine(),
  }


def fmt_ratio(ratio: Mapping[str, float] | None, digits: int = 3) -> str:
  """A :func:`paired_ratio`'s median for a table (``—`` when not measured)."""
  return "—" if ratio is None else f"{ratio['median']:.{digits}f}"


def fmt_ci(ratio: Mapping[str, float] | None, digits: int = 3) -> str:
  """A :func:`paired_ratio`'s 95% confidence interval, ``low–high`` (``—``: not measured)."""
  return "—" if ratio is None else f"{ratio['ci_low']:.{digits}f}–{ratio['ci_high']:.{digits}f}"


def init_dense(key: Any, dims: Sequence[int], names: Sequence[str],
               gains: float | Sequence[float] = 2.0) -> dict[str, dict[str, Any]]:
  """Dense layers ``{name: {"kernel", "bias"}}``: kernels ``N(0, gain / fan_in)``, biases 0.

  Args:
    key: a ``jax.random`` key (split into one key per layer), or a numpy ``Generator``
      (drawn layer by layer in float32; no XLA program per shape, seconds of a quick run).
    dims: ``[inputs, hidden..., outputs]``, one more than ``names``.
    names: the layers' names.
    gains: 2 (He), 1 (LeCun), or one gain per layer.
  """
  gains = [gains] * len(names) if isinstance(gains, int | float) else list(gains)
  shapes = list(zip(dims[:-1], dims[1:], strict=True))
  if isinstance(key, np.random.Generator):
    def kernel(i, shape):
      draw = key.standard_normal(shape).astype(np.float32)
      return jax.numpy.asarray(draw / np.sqrt(shape[0] / gains[i]))
  else:
    keys = jax.random.split(key, len(names))

    def kernel(i, shape):
      return jax.random.normal(keys[i], shape) * (gains[i] / shape[0]) ** 0.5
  return {name: {"kernel": kernel(i, shape), "bias": jax.numpy.zeros((shape[1],), np.float32)}
          for i, (name, shape) in enumerate(zip(names, shapes, strict=True))}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; cells are ``str()``-ed."""
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def write_results(out_dir: Path, name: str, *, payload: Mapping[str, Any],
                  markdown: str) -> None:
  """Writes ``<name>.json`` (payload + environment) and ``<name>.md``; prints the markdown."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  data = {"benchmark": name, **payload, "environment": environment()}
  (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
  (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n")
  print(markdown)


def pyplot() -> Any:
  """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def label_axes(ax: Any, *, title: str, xlabel: str, ylabel: str, xscale: str | None = None,
               yscale: str | None = None, legend_fontsize: float | None = 8) -> None:
  """Titles and labels one panel, sets its log (or other) scales, and draws its legend.

  Args:
    ax: a matplotlib ``Axes``.
    title: the panel's title.
    xlabel: the x axis' label.
    ylabel: the y axis' label.
    xscale: e.g. ``"log"`` (default: matplotlib's linear).
    yscale: e.g. ``"log"``.
    legend_fontsize: the legend's font size; ``None``: no legend.
  """
  if xscale is not None:
    ax.set_xscale(xscale)
  if yscale is not None:
    ax.set_yscale(yscale)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if legend_fontsize is not None:
    ax.legend(fontsize=legend_fontsize)


def save_figure(fig: Any, out_dir: Path, name: str) -> None:
  """Saves a matplotlib figure as ``<name>.png`` and closes it."""
  plt = pyplot()
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_dir / f"{name}.png", dpi=120, bbox_inches="tight")
  plt.close(fig)


# ------------------------------------------- the MLP of overhead.py and child_tuning.py


def layer_names(num_blocks: int) -> list[str]:
  return ["embed"] + [f"block_{i}" for i in range(num_blocks)] + ["head"]


def init_mlp(key: jax.Array, width: int, num_blocks: int) -> dict[str, dict[str, jax.Array]]:
  """``embed``: 784 → width, ``block_i``: width → width, ``head``: width → 10 (He normal)."""
  dims = [784] + [width] * (num_blocks + 1) + [10]
  return init_dense(key, dims, layer_names(num_blocks))


def loss_fn(params, x, y):
  """Mean softmax cross-entropy of the ReLU MLP of :func:`init_mlp`."""
  layers = layer_names(len(params) - 2)
  h = x
  for i, name in enumerate(layers):
    h = h @ params[name]["kernel"] + params[name]["bias"]
    if i < len(layers) - 1:
      h = jax.nn.relu(h)
  return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()


def gradtx_step(tx):
  """The jitted training step ``(params, state, x, y) -> (params, state, loss)`` of ``tx``."""
  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return step


def compile_step(step, *args):
  """The AOT-compiled step and XLA's static cost estimate of it (deterministic)."""
  compiled = step.lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, {"flops": float(cost.get("flops", np.nan)),
                    "bytes_accessed": float(cost.get("bytes accessed", np.nan))}
