"""The tour's command line: ``python -m gradtx.tour [--quick] [--out DIR] [--only PART]``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from gradtx.tour._data import load_data
from gradtx.tour._registry import PARTS, Config, Context, PartResult
from gradtx.tour._report import format_table, write_report


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m gradtx.tour",
      description="Train small models on sklearn's digits with every gradtx technique.",
  )
  parser.add_argument("--quick", action="store_true", help="fewer steps and seeds (< 1 min)")
  parser.add_argument("--out", default="tour_report", help="report folder (default: %(default)s)")
  parser.add_argument("--only", action="append", metavar="PART",
                      help="run only these parts (repeat or comma-separate); see --list")
  parser.add_argument("--seeds", type=int, default=None, help="seeds per run")
  parser.add_argument("--list", action="store_true", help="list the parts and exit")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, PartResult]:
  """Runs the tour; returns the results by part (also written to ``--out``)."""
  args = _parse(argv)
  if args.list:
    for p in PARTS.values():
      print(f"{p.name:12s} {p.title}")
    return {}
  names = list(PARTS)
  if args.only:
    names = list(dict.fromkeys(
        n.strip() for item in args.only for n in item.split(",") if n.strip()))
    unknown = [n for n in names if n not in PARTS]
    if unknown:
      raise SystemExit(f"--only: unknown part(s) {unknown}; the parts are {list(PARTS)}")
  if args.seeds is not None and args.seeds < 1:
    raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
  config = Config.make(args.quick, args.seeds)
  start = time.perf_counter()
  data = load_data()
  results, seconds = {}, {}
  for name in names:
    t0 = time.perf_counter()
    ctx = Context(config, data, progress=not args.no_progress, part_name=name)
    results[name] = PARTS[name].run(ctx)
    seconds[name] = time.perf_counter() - t0
    print(f"[{name}] done in {seconds[name]:.1f} s", flush=True)
  write_report(args.out, config, results, seconds, data)
  rows = [row for name in names for row in results[name].rows]
  part_names = [name for name in names for _ in results[name].rows]
  print(format_table(rows, part_names=part_names))
  print(f"\nReport: {args.out}/report.md ({time.perf_counter() - start:.1f} s in all)")
  return results
