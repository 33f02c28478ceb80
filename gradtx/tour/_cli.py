"""The tour's command line: ``python -m gradtx.tour [--quick] [--out DIR] [--only PART]``."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from gradtx.tour._data import load_data
from gradtx.tour._registry import PARTS, Column, Config, Context, PartResult, Row
from gradtx.tour._report import format_table, prepare_out, write_report

#: Where the report goes without ``--out``: quick runs never overwrite a full report.
DEFAULT_OUT = {False: "tour_report", True: "tour_report/quick"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The options, checked: ``--only`` names known parts, ``--seeds`` is at least 1.

  Raises:
    SystemExit: with a message naming the option, the value and what is allowed.
  """
  parser = argparse.ArgumentParser(
      prog="python -m gradtx.tour",
      description="Train small models on sklearn's digits with every gradtx technique.",
  )
  parser.add_argument("--quick", action="store_true",
                      help="fewer steps and seeds (about a minute of CPU)")
  parser.add_argument("--out", default=None,
                      help=f"report folder (default: {DEFAULT_OUT[False]}, "
                           f"{DEFAULT_OUT[True]} with --quick)")
  parser.add_argument("--only", action="append", metavar="PART",
                      help="run only these parts (repeat or comma-separate); see --list")
  parser.add_argument("--seeds", type=int, default=None, help="seeds per run")
  parser.add_argument("--list", action="store_true", help="list the parts and exit")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  args.parts = list(PARTS)
  if args.only:
    args.parts = list(dict.fromkeys(
        n.strip() for item in args.only for n in item.split(",") if n.strip()))
    unknown = [n for n in args.parts if n not in PARTS]
    if unknown or not args.parts:
      raise SystemExit(f"--only: unknown part(s) {unknown or args.only}; the parts are "
                       f"{list(PARTS)}")
  if args.seeds is not None and args.seeds < 1:
    raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
  if args.out is None:
    args.out = DEFAULT_OUT[args.quick]
  return args


def summary(columns: Sequence[Column], rows: Sequence[Row], name: str, title: str) -> str:
  """One part's table as the tour prints it, under its name and title."""
  return f"\n[{name}] {title}\n{format_table(columns, rows)}"


def main(argv: Sequence[str] | None = None) -> dict[str, PartResult]:
  """Runs the tour; returns the results by part (also written to ``--out``)."""
  args = parse_args(argv)
  if args.list:
    for p in PARTS.values():
      print(f"{p.name:12s} {p.title}")
    return {}
  config = Config.make(args.quick, args.seeds)
  prepare_out(args.out, config, complete=set(args.parts) == set(PARTS))  # fails now
  start = time.perf_counter()
  data = load_data()
  results, seconds = {}, {}
  for name in args.parts:
    t0 = time.perf_counter()
    ctx = Context(config, data, progress=not args.no_progress, part_name=name)
    results[name] = PARTS[name].run(ctx)
    seconds[name] = time.perf_counter() - t0
    print(f"[{name}] done in {seconds[name]:.1f} s", flush=True)
  write_report(args.out, config, results, seconds, data)
  for name, result in results.items():
    print(summary(result.columns, result.rows, name, PARTS[name].title))
  print(f"\nReport: {args.out}/report.md ({time.perf_counter() - start:.1f} s in all)")
  return results
