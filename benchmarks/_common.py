"""What every benchmark shares: the command line, interleaved timing, the result files.

A benchmark is ``python benchmarks/<name>.py [--quick] [--out DIR]``: it prints a
markdown table and writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` to ``DIR``
(``benchmarks/results/`` by default).

Timings follow one rule (DESIGN.md, "Proof that it works"): the machines are noisy and
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
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(description: str,
               configure: Callable[[argparse.ArgumentParser], None] | None = None,
               ) -> argparse.Namespace:
  """``--quick`` (small sizes, few repeats: under a minute) and ``--out DIR``.

  ``configure(parser)``, if given, adds a benchmark's own options.
  """
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true",
                      help="small sizes and few repeats (finishes in under a minute)")
  parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                      help=f"directory for the .json/.md/.png results (default {RESULTS_DIR})")
  if configure is not None:
    configure(parser)
  return parser.parse_args()


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


def save_figure(fig: Any, out_dir: Path, name: str) -> None:
  """Saves a matplotlib figure as ``<name>.png`` and closes it."""
  plt = pyplot()
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  fig.savefig(out_dir / f"{name}.png", dpi=120, bbox_inches="tight")
  plt.close(fig)
