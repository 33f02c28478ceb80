"""The tour's results: values from runs, tables, PNGs, ``report.md`` and ``results.json``.

Parts summarise their :class:`~gradtx.tour.Runs` with :func:`run_values` and
:func:`mean_curve`, and word their findings from the numbers (:func:`direction`).
:func:`write_report` turns what the parts return into ``results.json`` (every number)
and renders ``report.md`` from it; a run of some parts merges into a report of the same
sizes, and no run overwrites a full report with other sizes (:func:`prepare_out`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import numpy.typing as npt
import optax

import gradtx
from gradtx.tour._data import Dataset
from gradtx.tour._registry import PARTS, Column, Config, PartResult, Row
from gradtx.tour._training import Runs

_FORMAT = 2  # results.json's layout; reports of another layout are replaced, not merged


@dataclasses.dataclass
class Panel:
  """One axes of a figure: named curves, over steps unless ``x`` is given.

  A curve is an array of y values, or an ``(x, y)`` pair with its own x values.

  Or an ``image`` (2-D, e.g. heatmaps tiled into one array) instead of curves, drawn on
  a diverging colour scale symmetric around 0 (NaN pixels blank); ``x`` and
  ``xticklabels`` then label its columns, and ``logy``/``ymax``/``vlines`` are unused.
  ``legend_below`` puts the legend under the axes, where it hides no line.
  """

  title: str
  curves: Mapping[str, np.ndarray | tuple[np.ndarray, np.ndarray]]
  ylabel: str = "loss"
  logy: bool = True
  logx: bool = False
  vlines: Sequence[float] = ()
  x: Sequence[float] | np.ndarray | None = None
  xlabel: str = "step"
  xticklabels: Sequence[str] | None = None
  ymax: float | None = None
  image: np.ndarray | None = None
  legend_below: bool = False


@dataclasses.dataclass
class Figure:
  """A PNG: ``name`` is the file stem; panels are laid out in a row.

  A label keeps its colour across the panels of a figure.
  """

  name: str
  title: str
  panels: list[Panel]


def mean_std(values: npt.ArrayLike) -> tuple[float, float]:
  """Mean and standard deviation (float64) of the values over seeds."""
  values = np.asarray(values, np.float64)
  return float(np.mean(values)), float(np.std(values))


def run_values(runs: Runs, sel: Any = slice(None)) -> dict[str, float]:
  """``train_loss``, ``test_acc`` and ``test_acc_std`` of the runs ``sel`` selects."""
  acc, acc_std = mean_std(runs.test_acc[sel])
  return {"train_loss": mean_std(runs.train_loss[sel])[0], "test_acc": acc,
          "test_acc_std": acc_std}


def smooth(curve: npt.ArrayLike, window: int) -> np.ndarray:
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


def mean_curve(curves: np.ndarray, sel: Any = slice(None)) -> np.ndarray:
  """A ``[R, steps]`` log averaged over the selected runs, smoothed over 2% of the steps."""
  curves = np.asarray(curves)[sel]
  return smooth(np.mean(curves, axis=0), max(1, curves.shape[-1] // 50))


def finite(x: float) -> float:
  """``x``, or ``inf`` for NaN (a diverged run ranks last)."""
  return x if math.isfinite(x) else math.inf


def fmt_loss(x: float) -> str:
  """A loss for a sentence: three digits, or ``nan (diverged)``."""
  return f"{x:.3g}" if math.isfinite(x) else "nan (diverged)"


def direction(a: float, b: float, lower: str = "lower", higher: str = "higher",
              same: str = "the same as", *, rtol: float = 0.0) -> str:
  """The word that compares ``a`` with ``b``, decided by the numbers (NaN ranks highest).

  Example:
    >>> from gradtx.tour import direction
    >>> f"EGDD ends {direction(0.2, 0.5)} than Adam"
    'EGDD ends lower than Adam'
  """
  a, b = finite(a), finite(b)
  if a == b or abs(a - b) <= rtol * max(abs(a), abs(b)):
    return same
  return lower if a < b else higher


def format_table(columns: Sequence[Column], rows: Sequence[Row]) -> str:
  """A part's markdown table: technique, setting, then one cell per column (``|`` escaped).

  Example:
    >>> from gradtx.tour import TEST_ACC, Row, format_table
    >>> print(format_table([TEST_ACC], [Row("adam", "clean", {"test_acc": 0.95})]))
    | technique | setting | test acc |
    |---|---|---|
    | adam | clean | 0.950 |
  """
  line = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
  header = ["technique", "setting"] + [c.header for c in columns]
  lines = [line(header), "|" + "---|" * len(header)]
  for row in rows:
    lines.append(line([row.technique, row.setting] + [c.cell(row.values) for c in columns]))
  return "\n".join(lines)


def _plot(figure: Figure, path: str) -> None:
  """Writes one figure as a PNG with matplotlib's Agg canvas (no pyplot, no GUI)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure as MplFigure

  labels = list(dict.fromkeys(label for p in figure.panels for label in p.curves))
  colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
  n = len(figure.panels)
  below = max((len(p.curves) for p in figure.panels if p.legend_below), default=0)
  fig = MplFigure(figsize=(5.2 * n, 4.2 + 0.17 * below), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, n, squeeze=False)[0]
  for ax, panel in zip(axes, figure.panels, strict=True):
    if panel.image is not None:
      _draw_image(ax, panel)
      continue
    for x in panel.vlines:
      ax.axvline(x, color="0.88", lw=0.6, zorder=0)
    for label, curve in panel.curves.items():
      xs = np.arange(np.shape(curve)[-1]) if panel.x is None else np.asarray(panel.x)
      if isinstance(curve, tuple):
        xs, curve = np.asarray(curve[0]), curve[1]
      curve = np.asarray(curve, np.float64)
      text = label
      if panel.ymax is not None and np.any(~(curve <= panel.ymax)):
        first = int(np.argmax(~(curve <= panel.ymax)))
        text = f"{label} (off the chart from {panel.xlabel} {xs[first]:g})"
      style = "-" if panel.x is None else "o-"
      ax.plot(xs, curve, style, lw=1.3, ms=4, label=text, color=colours[label])
    if panel.logy:
      ax.set_yscale("log")
    if panel.logx:
      ax.set_xscale("log")
    if panel.ymax is not None:
      ax.set_ylim(top=panel.ymax)
    if panel.xticklabels is not None:
      ax.set_xticks(np.asarray(panel.x), list(panel.xticklabels))
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if panel.curves and panel.legend_below:
      ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)
    elif panel.curves:
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


def _part_payload(name: str, result: PartResult, seconds: float) -> dict[str, Any]:
  p = PARTS[name]
  return {
      "title": p.title, "about": p.about, "seconds": seconds,
      "columns": [dataclasses.asdict(c) for c in result.columns],
      "rows": [_finite_or_none(dataclasses.asdict(r)) for r in result.rows],
      "findings": list(result.findings),
      "figures": [{"file": f"{fig.name}.png", "title": fig.title} for fig in result.figures],
  }


def _results_path(out: str) -> str:
  return os.path.join(out, "results.json")


def prepare_out(out: str, config: Config, complete: bool = True,
                ) -> tuple[dict[str, Any], list[str]]:
  """Checks that the report may go to ``out``; returns the parts to keep and stale PNGs.

  A report of the same sizes (``quick``, ``seeds``) is merged into: its parts that this
  run does not repeat are kept. A quick report of other sizes is replaced, its PNGs
  removed when the new report is written. A full report is never overwritten by a run of
  other sizes, nor (when written by an older tour, so it cannot be merged) by a run of
  some parts only (``complete=False``): that is an error, raised before anything runs.

  Raises:
    SystemExit: ``out`` is a file, or holds a full report of other sizes.
  """
  if os.path.exists(out) and not os.path.isdir(out):
    raise SystemExit(f"--out {out!r} is an existing file, not a folder: give a folder for "
                     "the report (default tour_report/, tour_report/quick/ with --quick)")
  try:
    with open(_results_path(out)) as f:
      previous = json.load(f)
    old = previous["config"]
    old_sizes = (bool(old["quick"]), int(old["seeds"]))
  except FileNotFoundError:
    return {}, []
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SystemExit(f"--out {out!r}: cannot read its results.json ({e}); give another "
                     "folder or remove it") from e
  if old_sizes == (config.quick, config.seeds) and previous.get("format") == _FORMAT:
    return dict(previous["parts"]), []
  if not old_sizes[0] and not complete and old_sizes == (config.quick, config.seeds):
    raise SystemExit(f"--out {out!r} holds a full tour report written by an older tour, "
                     "which a run of some parts cannot merge into: run every part, or "
                     "give another --out")
  if not old_sizes[0] and old_sizes != (config.quick, config.seeds):
    raise SystemExit(
        f"--out {out!r} holds a full tour report ({old_sizes[1]} seeds) that this "
        f"{'--quick ' if config.quick else ''}run ({config.seeds} seeds) would overwrite; "
        "give another --out (quick runs go to tour_report/quick/ by default)")
  stale = [fig["file"] if isinstance(fig, dict) else fig
           for part in previous.get("parts", {}).values() for fig in part.get("figures", [])]
  return {}, stale


def render_markdown(payload: Mapping[str, Any]) -> str:
  """``report.md`` from ``results.json``'s payload: one table and findings per part."""
  cfg = payload["config"]
  md = [
      "# gradtx tour",
      "",
      f"`python -m gradtx.tour{' --quick' if cfg['quick'] else ''}` "
      f"({'quick' if cfg['quick'] else 'full'} mode, {cfg['seeds']} seeds per run, "
      f"{payload['versions']}). Data: {payload['data']}. Numbers are means over seeds "
      "(test accuracy ± its standard deviation); each part's table says what its "
      "columns measure.",
      "",
  ]
  for name, part in payload["parts"].items():
    columns = [Column(**c) for c in part["columns"]]
    rows = [Row(**r) for r in part["rows"]]
    md += [f"## {part['title']} (`--only {name}`, {part['seconds']:.0f} s)", "",
           part["about"], "", format_table(columns, rows), ""]
    if part["findings"]:
      md += ["\n".join(part["findings"]), ""]
    md += [f"![{fig['title']}]({fig['file']})\n" for fig in part["figures"]]
  return "\n".join(md)


def write_report(out: str, config: Config, results: dict[str, PartResult],
                 seconds: dict[str, float], data: Dataset) -> dict[str, Any]:
  """Writes the PNGs, ``results.json`` (non-finite numbers as ``null``) and ``report.md``.

  Parts of a previous report in ``out`` with the same sizes are kept (see
  :func:`prepare_out`), in the tour's order. Returns the payload written.
  """
  kept, stale = prepare_out(out, config, complete=set(results) == set(PARTS))
  os.makedirs(out, exist_ok=True)
  parts = {name: _part_payload(name, results[name], seconds[name]) for name in results}
  new_files = {fig["file"] for part in parts.values() for fig in part["figures"]}
  stale += [fig["file"] for name in parts if name in kept for fig in kept[name]["figures"]]
  for file in set(stale) - new_files:
    path = os.path.join(out, os.path.basename(file))
    if os.path.isfile(path):
      os.remove(path)
  kept.update(parts)
  payload = {
      "format": _FORMAT,
      "config": dataclasses.asdict(config),
      "versions": f"gradtx {gradtx.__version__}, jax {jax.__version__}, "
                  f"optax {optax.__version__}",
      "data": f"`sklearn.datasets.load_digits`, {data.x_train.shape[0]} training / "
              f"{data.x_test.shape[0]} test images, standardised",
      "parts": {name: kept[name] for name in [*PARTS, *kept] if name in kept},
  }
  for result in results.values():
    for figure in result.figures:
      _plot(figure, os.path.join(out, f"{figure.name}.png"))
  with open(_results_path(out), "w") as f:
    json.dump(payload, f, indent=1, allow_nan=False)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(render_markdown(payload))
  return payload


def _finite_or_none(tree: Any) -> Any:
  """Replaces NaN/inf floats in nested dicts by ``None`` (strict JSON)."""
  if isinstance(tree, dict):
    return {k: _finite_or_none(v) for k, v in tree.items()}
  if isinstance(tree, float) and not math.isfinite(tree):
    return None
  return tree
