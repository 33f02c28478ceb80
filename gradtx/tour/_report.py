"""The tour's results: rows and curves from runs, tables, PNGs, ``report.md`` and JSON.

Parts summarise their :class:`~gradtx.tour.Runs` with :func:`_row` and
:func:`_mean_curve`; :func:`write_report` writes what the parts return.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

import gradtx
from gradtx.tour._data import Dataset
from gradtx.tour._registry import PARTS, Config, Figure, Panel, PartResult, Row
from gradtx.tour._training import Runs


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
    if panel.image is not None:
      _draw_image(ax, panel)
      continue
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


def _draw_image(ax: Any, panel: Panel) -> None:
  """An image panel: diverging colours symmetric around 0, NaN blank, labelled columns."""
  image = np.asarray(panel.image, np.float64)
  finite = np.abs(image[np.isfinite(image)])
  lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
  ax.imshow(np.ma.masked_invalid(image), cmap="RdBu_r", vmin=-lim, vmax=lim,
            interpolation="nearest")
  if panel.xticklabels is not None:
    ax.set_xticks(np.asarray(panel.x), list(panel.xticklabels), fontsize=8)
  else:
    ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(panel.title, fontsize=10)
  ax.set_xlabel(panel.xlabel)
  ax.set_ylabel(panel.ylabel)


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
