"""Bad inputs of the tour's and the benchmarks' command lines (no subprocess, no training).

Each row calls ``gradtx.tour.main`` / ``gradtx.tour._cli.parse_args`` or the benchmarks'
``_common.parse_args`` the way a user who made one mistake would: the run must stop
before any work with a message naming the option and the value, and quick or partial
runs must never overwrite a full result.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import tempfile

from _bad_inputs import Case

from gradtx import tour

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench_common():
  """``benchmarks/_common.py``, loaded by path (benchmarks/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      "_benchmarks_common", _ROOT / "benchmarks" / "_common.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _a_file() -> str:
  path = pathlib.Path(tempfile.mkdtemp()) / "report.md"
  path.write_text("not a folder")
  return str(path)


def _a_folder_with(name: str, payload: dict | str) -> str:
  folder = pathlib.Path(tempfile.mkdtemp())
  text = payload if isinstance(payload, str) else json.dumps(payload)
  (folder / name).write_text(text)
  return str(folder)


def _full_tour_report() -> str:
  return _a_folder_with("results.json", {"format": 2, "config": {"quick": False, "seeds": 3},
                                         "parts": {}})


def _full_benchmark_result() -> str:
  return _a_folder_with("overhead.json", {"benchmark": "overhead", "quick": False})


def _is(expected):
  def check(result):
    assert result == expected, (result, expected)
  return check


CASES = [
    Case("tour_benchmarks-tour-out-is-a-file",
         lambda: tour.main(["--quick", "--out", _a_file(), "--no-progress"]),
         SystemExit, r"--out '.*report\.md' is an existing file, not a folder"),
    Case("tour_benchmarks-tour-only-unknown-part",
         lambda: tour.main(["--only", "em,nope"]),
         SystemExit, r"--only: unknown part\(s\) \['nope'\]; the parts are \[.*'em'"),
    Case("tour_benchmarks-tour-only-empty",
         lambda: tour.main(["--only", " , "]),
         SystemExit, r"--only: unknown part\(s\)"),
    Case("tour_benchmarks-tour-seeds-zero",
         lambda: tour.main(["--seeds", "0"]),
         SystemExit, r"--seeds must be >= 1, got 0"),
    Case("tour_benchmarks-tour-quick-over-full-report",
         lambda: tour.main(["--quick", "--only", "em", "--out", _full_tour_report(),
                            "--no-progress"]),
         SystemExit, r"--out .* holds a full tour report \(3 seeds\) that this --quick run"),
    Case("tour_benchmarks-tour-other-seeds-over-full-report",
         lambda: tour.main(["--seeds", "5", "--only", "em", "--out", _full_tour_report(),
                            "--no-progress"]),
         SystemExit, r"holds a full tour report \(3 seeds\) .* run \(5 seeds\)"),
    Case("tour_benchmarks-tour-partial-over-old-full-report",
         lambda: tour.main(["--only", "em", "--no-progress", "--out", _a_folder_with(
             "results.json", {"config": {"quick": False, "seeds": 3}, "parts": {}})]),
         SystemExit, r"--out .* holds a full tour report written by an older tour"),
    Case("tour_benchmarks-tour-unreadable-results-json",
         lambda: tour.main(["--quick", "--out", _a_folder_with("results.json", "{oops"),
                            "--no-progress"]),
         SystemExit, r"--out .*: cannot read its results\.json"),
    Case("tour_benchmarks-tour-quick-default-out",
         lambda: tour._cli.parse_args(["--quick", "--only", "em"]).out,
         check=_is("tour_report/quick")),
    Case("tour_benchmarks-tour-nan-cell",
         lambda: tour.Column("train_loss", "train loss").cell({"train_loss": math.nan}),
         check=_is("nan (diverged)")),
    Case("tour_benchmarks-bench-out-is-a-file",
         lambda: _bench_common().parse_args("x", argv=["--out", _a_file()], name="overhead"),
         SystemExit, r"--out '.*report\.md' is an existing file, not a folder"),
    Case("tour_benchmarks-bench-quick-over-full-results",
         lambda: _bench_common().parse_args(
             "x", argv=["--quick", "--out", _full_benchmark_result()], name="overhead"),
         SystemExit, r"--out .* holds the full results of overhead .* this --quick run"),
    Case("tour_benchmarks-bench-quick-default-out",
         lambda: _bench_common().parse_args("x", argv=["--quick"], name="overhead").out,
         check=_is(_ROOT / "benchmarks" / "results" / "quick")),
]
