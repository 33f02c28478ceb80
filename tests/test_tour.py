"""The tour (`python -m gradtx.tour --quick`) runs end to end and says what it should."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest

from gradtx import tour

# Every gradtx transformation the tour demonstrates, as it names it in the tables.
TECHNIQUES = (
    "layerwise_lr_decay",
    "scale_by_path",
    "clip_by_global_norm hard",
    "clip_by_global_norm soft",
    "clip_by_leaf_norm",
    "auto_clip",
    "zscore_clip",
    "cached_value_and_grad",
    "nt_xent, small batch",
    "integrated_gradients",
    "expected_gradients",
    "layer_integrated_gradients",
    "eg_step_size",
    "diag_newton",
    "child_tuning_f",
    "child_tuning_d",
    "zeroth_order('es')",
)


@pytest.fixture(scope="module")
def quick_tour(tmp_path_factory):
  out = tmp_path_factory.mktemp("tour_report")
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    results = tour.main(["--quick", "--out", str(out), "--no-progress"])
  with open(out / "results.json") as f:
    payload = json.load(f)
  return out, results, payload, printed.getvalue()


def _rows(payload):
  return [row for part in payload["parts"].values() for row in part["rows"]]


def _loss(row):
  """The final train loss; a diverged run (null in the JSON) counts as infinite."""
  loss = row["train_loss"]
  return math.inf if loss is None or not math.isfinite(loss) else loss


def test_writes_report_and_pngs(quick_tour):
  out, results, payload, _ = quick_tour
  assert set(payload["parts"]) == set(tour.PARTS) == set(results)
  report = (out / "report.md").read_text()
  pngs = [name for part in payload["parts"].values() for name in part["figures"]]
  assert {"step_size.png", "em.png", "child_tuning.png", "zeroth_order.png"} <= set(pngs)
  assert {"layerwise.png", "clipping_sgd.png", "contrastive.png", "attribution_heatmaps.png",
          "attribution_completeness.png"} <= set(pngs)
  for name in pngs:
    with open(out / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert f"]({name})" in report
  for p in tour.PARTS.values():
    assert p.title in report


def test_table_contains_every_technique(quick_tour):
  out, _, payload, printed = quick_tour
  report = (out / "report.md").read_text()
  names = [row["technique"] for row in _rows(payload)]
  for technique in TECHNIQUES:
    assert any(technique in name for name in names), technique
    assert technique in report, technique
  # The printed table has one line per row, naming the part and the technique.
  table = [line for line in printed.splitlines() if line.startswith("| ")]
  assert len(table) == 1 + len(names)
  for name, row in zip(names, table[1:], strict=True):
    assert f"| {name} |" in row


def test_clean_runs_learn(quick_tour):
  _, _, payload, _ = quick_tour
  clean = [row for row in _rows(payload) if row["clean"]]
  assert len(clean) >= 11
  for row in clean:
    assert row["test_acc"] > max(0.8, row["chance"] + 0.25), row
    assert _loss(row) < 0.5, row


def test_clipping_recovers_from_spikes(quick_tour):
  _, _, payload, _ = quick_tour
  rows = payload["parts"]["clipping"]["rows"]
  spiked = [row for row in rows if not row["clean"]]
  settings = {row["setting"] for row in spiked}
  assert settings, "no spike runs"
  for setting in settings:
    by_name = {row["technique"]: row for row in spiked if row["setting"] == setting}
    baseline = by_name.pop("none")
    clean_baseline = next(r for r in rows if r["technique"] == "none" and r["clean"]
                          and r["setting"].split(",")[0] == setting.split(",")[0])
    # The spikes hurt the unclipped run...
    assert _loss(baseline) > 10 * _loss(clean_baseline)
    assert len(by_name) == 5
    for name, row in by_name.items():
      # ...and every clipping rule recovers: far lower loss, clean-run accuracy.
      assert _loss(row) < 0.1 * _loss(baseline), (setting, name)
      assert row["test_acc"] > 0.9, (setting, name)
      assert row["clipped_steps"] >= 1, (setting, name)


def test_contrastive_probes_and_objective(quick_tour):
  _, _, payload, _ = quick_tour
  rows = {row["technique"]: row for row in payload["parts"]["contrastive"]["rows"]}
  assert {"random encoder (no pre-training)", "nt_xent, small batch", "cached_value_and_grad",
          "raw pixels (no encoder)"} <= set(rows)
  few = lambda row: float(row["extras"]["probe acc, 5 labels/class"].split(" ± ")[0])
  cached, random = rows["cached_value_and_grad"], rows["random encoder (no pre-training)"]
  assert "chunk_size=128" in cached["setting"]
  for row in rows.values():
    # Linear probes on all labels: far above chance (0.1), frozen features or not.
    assert row["test_acc"] > 0.9, row
    assert 0.4 < few(row) <= 1.0, row
  # The large-batch objective (NT-Xent of fixed pairs at the large batch B) went below
  # its chance level log(2B - 1) and the random encoder's, and below what the small batch
  # reaches in as many steps
  # (quick mode trains too briefly to separate the probes; see the full report).
  nt = lambda row: float(row["extras"][f"NT-Xent @{large}"])
  large = int(cached["setting"].split()[1].rstrip(","))
  assert nt(cached) < math.log(2 * large - 1) - 0.1
  assert nt(cached) < nt(rows["nt_xent, small batch"]) < nt(random)
  assert few(cached) > 0.6 and few(random) > 0.6


def test_attribution_is_complete(quick_tour):
  _, _, payload, _ = quick_tour
  rows = payload["parts"]["attribution"]["rows"]
  rel = {(row["technique"], row["setting"]): float(row["extras"]["relative δ"])
         for row in rows}
  gl = rel["integrated_gradients", "gausslegendre, 50 steps"]
  trapezoid = rel["integrated_gradients", "riemann_trapezoid, 50 steps"]
  first_order = rel["gradient × (x − x')", "first-order term at x"]
  layer = next(v for (t, _), v in rel.items() if t == "layer_integrated_gradients")
  # Completeness: IG with 50 Gauss–Legendre nodes adds up to F(x) - F(x') (relative delta
  # <= 1e-3), as does IG at a hidden layer; the trapezoid rule is less accurate at equal
  # steps, and the first-order term (x - x') * grad F(x) is far from complete.
  assert gl <= 1e-3 and layer <= 1e-3
  assert gl < trapezoid < 1e-2 < first_order
  assert "≤ 0.001: yes" in payload["parts"]["attribution"]["findings"]


def test_command_line_options(capsys):
  tour.main(["--list"])
  listed = capsys.readouterr().out
  for name in tour.PARTS:
    assert name in listed
  with pytest.raises(SystemExit, match="unknown part"):
    tour.main(["--only", "no_such_part"])


def test_import_has_no_side_effects(tmp_path):
  code = (
      "import sys, gradtx.tour\n"
      "assert not {'sklearn', 'matplotlib'} & set(sys.modules)\n"
      "assert list(gradtx.tour.PARTS)\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, env=env, timeout=120)
  assert list(tmp_path.iterdir()) == []


def test_step_size_recovers_from_a_small_learning_rate(quick_tour):
  _, _, payload, _ = quick_tour
  rows = payload["parts"]["step_size"]["rows"]
  by = {(row["technique"], row["extras"]["initial lr"]): row for row in rows}
  lrs = sorted({row["extras"]["initial lr"] for row in rows}, key=float)
  assert len(lrs) >= 3
  adam = [_loss(by["adam", lr]) for lr in lrs]
  eg = [_loss(by["eg_step_size(scale_by_adam)", lr]) for lr in lrs]
  # From a 10x-too-small lr, EGDD's step size grows and its loss ends far below Adam's;
  # over the grid its worst final loss is below Adam's worst.
  assert eg[0] < 0.5 * adam[0]
  assert (float(by["eg_step_size(scale_by_adam)", lrs[0]]["extras"]["final lr"])
          > 1.5 * float(lrs[0]))
  assert max(eg) < max(adam)
  assert {row["extras"]["initial lr"] for row in rows if row["clean"]} == {"1e-03"}


def test_kmeans_lloyd_is_diag_newton(quick_tour):
  _, _, payload, _ = quick_tour
  rows = payload["parts"]["em"]["rows"]
  pick = lambda prefix: next(r for r in rows if r["technique"].startswith(prefix))  # noqa: E731
  lloyd, newton, gd = pick("Lloyd"), pick("diag_newton"), pick("optax.sgd")
  # diag_newton(1.0, damping=0) on the K-means loss follows Lloyd to float64 rounding...
  assert float(newton["extras"]["max |Δ Lloyd|"]) <= 1e-12
  assert newton["train_loss"] == pytest.approx(lloyd["train_loss"], rel=1e-12)
  # ...one step size for every centroid does not.
  assert float(gd["extras"]["max |Δ Lloyd|"]) > 1e-3
  assert _loss(gd) > lloyd["train_loss"]
  assert lloyd["test_acc"] > 0.5


def test_child_tuning_placements(quick_tour):
  _, _, payload, _ = quick_tour
  rows = {row["technique"]: row for row in payload["parts"]["child_tuning"]["rows"]}
  moved = lambda name: float(rows[name]["extras"]["body moved"])  # noqa: E731
  density = lambda name: float(rows[name]["extras"]["mask density"])  # noqa: E731
  log_loss = lambda name: math.log(rows[name]["train_loss"])  # noqa: E731
  # F keeps p = 0.3 of all coordinates per step; D's fixed mask keeps 0.3 of the body plus
  # the whole (free) head.
  assert abs(density("child_tuning_f, gradient") - 0.3) < 0.01
  assert abs(density("child_tuning_f, update") - 0.3) < 0.01
  assert 0.3 < density("child_tuning_d, update") == density("child_tuning_d, gradient") < 0.4
  # Masking the update after AdamW freezes all but D's 30% of the body; masking the gradient
  # does not (weight decay moves the rest; F's coordinates all move through Adam's moments).
  assert abs(moved("child_tuning_d, update") - 0.3) < 0.01
  assert moved("child_tuning_d, gradient") > 0.99
  assert moved("child_tuning_f, gradient") > 0.99
  # Su: before Adam, gradient dropout acts like lr x sqrt(p): F on the gradient ends nearer
  # (log train loss) to AdamW at lr x sqrt(p) than to plain AdamW.
  f_grad = log_loss("child_tuning_f, gradient")
  assert abs(f_grad - log_loss("adamw, lr × √p")) < abs(f_grad - log_loss("adamw"))
  for row in rows.values():
    assert row["test_acc"] > 0.9, row


def test_zeroth_order_optimises_accuracy(quick_tour):
  _, _, payload, _ = quick_tour
  rows = {row["technique"]: row for row in payload["parts"]["zeroth_order"]["rows"]}
  es, bp = rows["zeroth_order('es') + adam"], rows["backprop + adam"]
  # ES on the argmax accuracy alone (its gradient is zero almost everywhere) learns the
  # digits far above chance: test accuracy > 0.85, training error rate < 0.15...
  assert es["test_acc"] > max(0.85, es["chance"] + 0.5), es
  assert es["train_loss"] < 0.15, es
  # ...at N evaluations a step, where backprop on the cross-entropy spends one.
  es_evals, bp_evals = (int(r["extras"]["evaluations"]) for r in (es, bp))
  assert es_evals >= 10 * bp_evals
  assert bp["test_acc"] >= es["test_acc"] - 0.01
