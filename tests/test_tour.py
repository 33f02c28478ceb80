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
    "sophia",
    "diag_newton",
    "child_tuning_f",
    "child_tuning_d",
    "zeroth_order('es')",
    "sigmoid_contrastive",
    "zo_sgd_step",
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


def _values(payload, part):
  """``{technique: values}`` of one part's rows (the techniques are unique in the part)."""
  return {row["technique"]: row["values"] for row in payload["parts"][part]["rows"]}


def _loss(values, key="train_loss"):
  """A final loss; a diverged run (null in the JSON) counts as infinite."""
  loss = values[key]
  return math.inf if loss is None or not math.isfinite(loss) else loss


def test_writes_report_and_pngs(quick_tour):
  out, results, payload, _ = quick_tour
  assert set(payload["parts"]) == set(tour.PARTS) == set(results)
  report = (out / "report.md").read_text()
  pngs = [fig["file"] for part in payload["parts"].values() for fig in part["figures"]]
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
  # One printed table per part, under its name: a header line and one line per row.
  for name, part in payload["parts"].items():
    block = printed.split(f"[{name}] {part['title']}\n", 1)[1].split("\n\n", 1)[0]
    table = [line for line in block.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(part["rows"]), name
    for row, line in zip(part["rows"], table[1:], strict=True):
      assert line.startswith(f"| {row['technique']} | {row['setting']} |"), line


def test_one_meaning_per_column(quick_tour):
  """Every part has its own columns; every column is filled in some row of its part."""
  _, _, payload, _ = quick_tour
  for name, part in payload["parts"].items():
    keys = [c["key"] for c in part["columns"]]
    assert len(keys) == len(set(keys)), name
    for key in keys:
      assert any(row["values"].get(key) is not None for row in part["rows"]), (name, key)
    for row in part["rows"]:
      assert all(isinstance(v, int | float) or v is None for v in row["values"].values()), row
  clip_columns = {c["key"] for c in payload["parts"]["clipping"]["columns"]}
  assert "clipped_steps" in clip_columns
  assert not any("clipped_steps" in {c["key"] for c in part["columns"]}
                 for name, part in payload["parts"].items() if name != "clipping")
  assert "train_loss" not in {c["key"] for c in payload["parts"]["em"]["columns"]}
  assert "train_loss" not in {c["key"] for c in payload["parts"]["zeroth_order"]["columns"]}


def test_clean_runs_learn(quick_tour):
  _, _, payload, _ = quick_tour
  clean = [row for row in _rows(payload) if row["clean"]]
  assert len(clean) >= 11
  for row in clean:
    values = row["values"]
    assert values["test_acc"] > max(0.8, row["chance"] + 0.25), row
    if "train_loss" in values:  # a cross-entropy
      assert _loss(values) < 0.5, row


def test_clipping_recovers_from_spikes(quick_tour):
  _, _, payload, _ = quick_tour
  rows = payload["parts"]["clipping"]["rows"]
  steps = payload["config"]["steps"]
  spiked = [row for row in rows if not row["clean"]]
  settings = {row["setting"] for row in spiked}
  assert settings, "no spike runs"
  for setting in settings:
    by_name = {row["technique"]: row["values"] for row in spiked if row["setting"] == setting}
    baseline = by_name.pop("none")
    clean_baseline = next(r["values"] for r in rows if r["technique"] == "none" and r["clean"]
                          and r["setting"].split(",")[0] == setting.split(",")[0])
    # The spikes hurt the unclipped run...
    assert _loss(baseline) > 10 * _loss(clean_baseline)
    assert baseline["clipped_steps"] is None and baseline["spike_gain"] > 10
    assert len(by_name) == 5
    for name, values in by_name.items():
      # ...and every clipping rule recovers: far lower loss, clean-run accuracy.
      assert _loss(values) < 0.1 * _loss(baseline), (setting, name)
      assert values["test_acc"] > 0.9, (setting, name)
      assert 1 <= values["clipped_steps"] <= steps, (setting, name)
      assert 0 < values["mean_scale"] <= 1, (setting, name)
    # Soft clipping scales every step (by less than 1), so it counts all of them.
    assert by_name["clip_by_global_norm soft"]["clipped_steps"] == steps


def test_contrastive_probes_and_objective(quick_tour):
  _, _, payload, _ = quick_tour
  rows = _values(payload, "contrastive")
  settings = {r["technique"]: r["setting"] for r in payload["parts"]["contrastive"]["rows"]}
  assert {"random encoder (no pre-training)", "nt_xent, small batch", "cached_value_and_grad",
          "sigmoid_contrastive (SigLIP)", "raw pixels (no encoder)"} <= set(rows)
  cached, random = rows["cached_value_and_grad"], rows["random encoder (no pre-training)"]
  assert "chunk_size=128" in settings["cached_value_and_grad"]
  for values in rows.values():
    # Linear probes on all labels: far above chance (0.1), frozen features or not.
    assert values["test_acc"] > 0.9, values
    assert 0.4 < values["few_acc"] <= 1.0, values
  # The large-batch objective (NT-Xent of fixed pairs at the large batch B) went below
  # its chance level log(2B - 1) and the random encoder's, and below what the small batch
  # reaches in as many steps
  # (quick mode trains too briefly to separate the probes; see the full report).
  large = int(settings["cached_value_and_grad"].split()[1].rstrip(","))
  assert cached["nt_xent_large"] < math.log(2 * large - 1) - 0.1
  assert (cached["nt_xent_large"] < rows["nt_xent, small batch"]["nt_xent_large"]
          < random["nt_xent_large"])
  assert cached["few_acc"] > 0.6 and random["few_acc"] > 0.6
  assert any("cached gradient ends lower than the small batch" in line
             for line in payload["parts"]["contrastive"]["findings"])
  assert any(line.startswith("- SigLIP") for line in payload["parts"]["contrastive"]["findings"])


def test_attribution_is_complete(quick_tour):
  _, _, payload, _ = quick_tour
  rows = payload["parts"]["attribution"]["rows"]
  rel = {(row["technique"], row["setting"]): row["values"]["rel_delta"] for row in rows}
  gl = rel["integrated_gradients", "gausslegendre, 50 steps"]
  trapezoid = rel["integrated_gradients", "riemann_trapezoid, 50 steps"]
  first_order = rel["gradient × (x − x')", "first-order term at x"]
  layer = next(v for (t, _), v in rel.items() if t == "layer_integrated_gradients")
  # Completeness: IG with 50 Gauss–Legendre nodes adds up to F(x) - F(x') (relative delta
  # <= 1e-3), as does IG at a hidden layer; the trapezoid rule is less accurate at equal
  # steps, and the first-order term (x - x') * grad F(x) is far from complete.
  assert gl <= 1e-3 and layer <= 1e-3
  assert gl < trapezoid < 1e-2 < first_order
  findings = "\n".join(payload["parts"]["attribution"]["findings"])
  assert "≤ 0.001: yes" in findings
  assert "larger than Gauss–Legendre's" in findings


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
  by = {(row["technique"], row["values"]["initial_lr"]): row["values"] for row in rows}
  lrs = sorted({lr for _, lr in by})
  assert len(lrs) >= 3
  adam = [_loss(by["adam", lr]) for lr in lrs]
  eg = [_loss(by["eg_step_size(scale_by_adam)", lr]) for lr in lrs]
  # From a 10x-too-small lr, EGDD's step size grows and its loss ends far below Adam's;
  # over the grid its worst final loss is below Adam's worst.
  assert eg[0] < 0.5 * adam[0]
  assert by["eg_step_size(scale_by_adam)", lrs[0]]["final_lr"] > 1.5 * lrs[0]
  assert max(eg) < max(adam)
  for lr in lrs:
    assert by["eg_step_size(scale_by_adam)", lr]["vs_adam"] == pytest.approx(
        by["eg_step_size(scale_by_adam)", lr]["train_loss"] / by["adam", lr]["train_loss"])
  clean = [row["values"]["initial_lr"] for row in rows if row["clean"]]
  assert clean and all(lr == pytest.approx(1e-3) for lr in clean)
  assert any(f"EGDD lower at {eg[0]:.3g}" in line
             for line in payload["parts"]["step_size"]["findings"])
  # Sophia-G at Adam's usual lr trains the MLP; its clip keeps its step size at lr.
  sophia = by["sophia (gnb)", clean[0]]
  assert sophia["test_acc"] > 0.9 and _loss(sophia) < 0.1, sophia
  assert all(by["sophia (gnb)", lr]["final_lr"] == pytest.approx(lr) for lr in lrs)


def test_kmeans_lloyd_is_diag_newton(quick_tour):
  _, _, payload, _ = quick_tour
  rows = payload["parts"]["em"]["rows"]

  def pick(prefix):
    return next(r["values"] for r in rows if r["technique"].startswith(prefix))

  lloyd, newton, gd = pick("Lloyd"), pick("diag_newton"), pick("optax.sgd")
  # diag_newton(1.0, damping=0) on the K-means loss follows Lloyd to float64 rounding...
  assert newton["max_diff_lloyd"] <= 1e-12
  assert newton["kmeans_loss"] == pytest.approx(lloyd["kmeans_loss"], rel=1e-12)
  # ...one step size for every centroid does not.
  assert gd["max_diff_lloyd"] > 1e-3
  assert _loss(gd, "kmeans_loss") > lloyd["kmeans_loss"]
  assert lloyd["cluster_acc"] > 0.5
  findings = "\n".join(payload["parts"]["em"]["findings"])
  assert "within float64 rounding" in findings and "higher than Lloyd's" in findings


def test_child_tuning_placements(quick_tour):
  _, _, payload, _ = quick_tour
  rows = _values(payload, "child_tuning")

  def log_loss(name):
    return math.log(rows[name]["train_loss"])

  # F keeps p = 0.3 of all coordinates per step; D's fixed mask keeps 0.3 of the body plus
  # the whole (free) head.
  density = {name: values["mask_density"] for name, values in rows.items()}
  assert density["adamw"] is None and density["adamw, lr × √p"] is None
  assert abs(density["child_tuning_f, gradient"] - 0.3) < 0.01
  assert abs(density["child_tuning_f, update"] - 0.3) < 0.01
  assert 0.3 < density["child_tuning_d, update"] == density["child_tuning_d, gradient"] < 0.4
  # Masking the update after AdamW freezes all but D's 30% of the body; masking the gradient
  # does not (weight decay moves the rest; F's coordinates all move through Adam's moments).
  assert abs(rows["child_tuning_d, update"]["body_moved"] - 0.3) < 0.01
  assert rows["child_tuning_d, gradient"]["body_moved"] > 0.99
  assert rows["child_tuning_f, gradient"]["body_moved"] > 0.99
  # Su: before Adam, gradient dropout acts like lr x sqrt(p): F on the gradient ends nearer
  # (log train loss) to AdamW at lr x sqrt(p) than to plain AdamW.
  f_grad = log_loss("child_tuning_f, gradient")
  assert abs(f_grad - log_loss("adamw, lr × √p")) < abs(f_grad - log_loss("adamw"))
  assert any("closer to AdamW with the learning rate" in line
             for line in payload["parts"]["child_tuning"]["findings"])
  for values in rows.values():
    assert values["test_acc"] > 0.9, values


def test_zeroth_order_optimises_accuracy(quick_tour):
  _, _, payload, _ = quick_tour
  part = payload["parts"]["zeroth_order"]
  rows = _values(payload, "zeroth_order")
  es, bp = rows["zeroth_order('es') + adam"], rows["backprop + adam"]
  chance = part["rows"][0]["chance"]
  # ES on the argmax accuracy alone (its gradient is zero almost everywhere) learns the
  # digits far above chance: test accuracy > 0.85, training error rate < 0.15...
  assert es["test_acc"] > max(0.85, chance + 0.5), es
  assert es["train_error"] < 0.15, es
  # ...at N evaluations a step, where backprop on the cross-entropy spends one.
  assert es["evaluations"] >= 10 * bp["evaluations"]
  assert bp["test_acc"] >= es["test_acc"] - 0.01
  assert bp["evals_to_target"] < es["evals_to_target"]
  # MeZO's in-place step learns too, with less compiled memory than the materialised step.
  mezo = rows["zo_sgd_step (MeZO, in place)"]
  assert mezo["test_acc"] > max(0.8, chance + 0.5), mezo
  assert mezo["step_temp_ratio"] < 1, mezo


def test_partial_and_quick_runs_never_clobber_a_full_report(tmp_path, monkeypatch):
  """A quick run into a full report fails before running; a partial run merges."""
  full = tmp_path / "full"
  full.mkdir()
  (full / "results.json").write_text(json.dumps(
      {"format": 2, "config": {"quick": False, "seeds": 3}, "parts": {}}))
  with pytest.raises(SystemExit, match="holds a full tour report .* would overwrite"):
    tour.main(["--quick", "--only", "em", "--out", str(full), "--no-progress"])
  assert sorted(p.name for p in full.iterdir()) == ["results.json"]
  monkeypatch.chdir(tmp_path)
  assert tour._cli.parse_args(["--quick"]).out == "tour_report/quick"
  assert tour._cli.parse_args([]).out == "tour_report"


def test_partial_run_merges_into_its_report(quick_tour, tmp_path):
  import shutil

  out = tmp_path / "report"
  shutil.copytree(quick_tour[0], out)
  before = json.loads((out / "results.json").read_text())
  (out / "em.png").write_bytes(b"stale")
  with contextlib.redirect_stdout(io.StringIO()):
    tour.main(["--quick", "--only", "em", "--out", str(out), "--no-progress"])
  after = json.loads((out / "results.json").read_text())
  assert list(after["parts"]) == list(before["parts"])  # every part kept, in order
  for name in before["parts"]:
    if name != "em":
      assert after["parts"][name] == before["parts"][name], name
  assert (out / "em.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # redrawn
  report = (out / "report.md").read_text()
  assert all(part["title"] in report for part in after["parts"].values())
