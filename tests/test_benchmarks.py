"""Every benchmark runs with ``--quick`` and writes well-formed results.

Each script runs in a subprocess (as a user would run it) into a temporary ``--out``
directory, so the committed results under ``benchmarks/results/`` are never touched. One
test per benchmark checks the benchmark's own claims on its quick run: deterministic
ones (same results as a reference, compiled memory, iteration counts) strictly, timings
only as measured.
"""

import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK_ARGS = {"attribution_speed": ("--no-captum",), "zeroth_order": ("--no-evosax",)}
# Result sections beyond "rows", each with a markdown table of its own.
SECTIONS = ("transformer", "completeness", "finetune", "per_lr", "full_batch", "memory",
            "training")


def _run_quick(name, out_dir, *extra_args):
  env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--out", str(out_dir),
       *extra_args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def _check_common(name, out_dir, stdout):
  data = json.loads((out_dir / f"{name}.json").read_text())
  assert data["benchmark"] == name
  assert data["quick"] is True
  assert data["rows"], "no result rows"
  assert data["environment"]["jax"]
  markdown = (out_dir / f"{name}.md").read_text()
  tables = [[]]  # runs of consecutive "|" lines
  for line in markdown.splitlines():
    if line.startswith("|"):
      tables[-1].append(line)
    elif tables[-1]:
      tables.append([])
  tables = [table for table in tables if table]
  # One table of data["rows"], then one per extra section that has rows of its own.
  sections = [data["rows"]] + [data[key]["rows"] for key in SECTIONS if key in data]
  assert len(tables) == len(sections), "one markdown table per section"
  for table, rows in zip(tables, sections, strict=True):
    assert len(table) == 2 + len(rows), "one table line per row, plus the header"
    cells = {len(re.findall(r"(?<!\\)\|", line)) for line in table}  # "\|" is not a border
    assert len(cells) == 1, "ragged markdown table"
    assert table[0] in stdout, "the script prints its table"
  assert (out_dir / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
  return data


@pytest.fixture(scope="module")
def contrastive_memory_quick(tmp_path_factory):
  """One quick run of ``contrastive_memory`` (the slowest), shared by its two tests."""
  out_dir = tmp_path_factory.mktemp("contrastive_memory")
  return out_dir, _run_quick("contrastive_memory", out_dir)


def _quick(name, tmp_path):
  """Runs one benchmark quickly into ``tmp_path``; returns its checked JSON."""
  stdout = _run_quick(name, tmp_path, *QUICK_ARGS.get(name, ()))
  return _check_common(name, tmp_path, stdout)


def _measured(ratio):
  """A paired ratio was measured: a positive finite median over at least one round."""
  assert ratio["rounds"] >= 1 and 0 < ratio["median"] < math.inf, ratio


def test_overhead(tmp_path):
  data = _quick("overhead", tmp_path)
  for row in data["rows"]:
    for key in ("vs_hand", "vs_adam", "hand_vs_adam"):
      _measured(row[key])
    # The hand-written step computes the same thing as the gradtx one, and XLA's
    # (deterministic) cost analysis finds no extra memory traffic in the gradtx step.
    assert row["max_abs_param_diff"] < 1e-5, row["transformation"]
    assert abs(row["xla_bytes_ratio"] - 1.0) < 0.01, row["transformation"]


def test_clipping_speedup(tmp_path):
  data = _quick("clipping_speedup", tmp_path)
  # Iteration counts are deterministic: the claim itself is checked, not only the format.
  for objective in {row["objective"] for row in data["rows"]}:
    largest = max((r for r in data["rows"] if r["objective"] == objective),
                  key=lambda r: r["s"])
    assert largest["gd"]["iterations"] is not None, "the GD baseline must reach the target"
    for mode in ("hard", "soft"):
      assert largest[f"speedup_{mode}"] >= 5.0, (objective, mode, largest)


def test_child_tuning(tmp_path):
  data = _quick("child_tuning", tmp_path)
  p = data["config"]["reserve_p"]
  for row in data["rows"]:
    _measured(row["vs_adamw"])
    # F keeps a Bernoulli(p) share of every tensor; D's fixed Fisher mask keeps at least p
    # of the included layers, and nothing is kept everywhere.
    if row["variant"].startswith("F"):
      assert abs(row["mask_density"] - p) < 0.01, row
    else:
      assert p - 0.01 < row["mask_density"] < 1.0, row
  for row in data["finetune"]["rows"]:
    accuracy = row["test_accuracy"]
    assert len(accuracy["per_seed"]) >= 2, row
    assert accuracy["mean"] == pytest.approx(sum(accuracy["per_seed"]) / len(
        accuracy["per_seed"])), row
    assert 0.2 < accuracy["mean"] <= 1.0, row  # above chance (5 classes) on 5-9
    assert row["best_lr"] in [point["lr"] for point in row["grid"]], row


def test_step_size_robustness(tmp_path):
  data = _quick("step_size_robustness", tmp_path)
  tolerance, steps = data["target"]["tolerance"], data["config"]["steps"]
  for model in ("mlp", "cnn"):
    mine = {r["method"]: r for r in data["rows"] if r["model"] == model}
    assert {"adam", "sgdm", "adam_hd", "adam_hd_log", "adam_eg", "adam_eg_per_leaf",
            "adam_eg_faster", "adam_eg_warm", "dog", "mechanize", "prodigy",
            "schedule_free"} <= set(mine), (model, sorted(mine))
    adam, eg = mine["adam"], mine["adam_eg"]
    lrs, best = adam["lrs"], adam["adam_best"]
    assert lrs[-1] / lrs[0] >= 1e4 * (1 - 1e-6), "four decades of initial rates"
    assert best["final_loss"] == min(v for v in adam["final_loss"] if v is not None)
    # The verdict follows from the numbers, whichever way it goes.
    for r in mine.values():
      assert len(r["final_loss"]) == len(r["test_acc"]) == len(lrs)
      worst = r["worst_ratio_in_target_range"]
      assert r["target_met"] == (r["target_range"]["covered_by_grid"] and worst is not None
                                 and worst <= 1 + tolerance), (model, r["method"])
    assert data["target"]["met"][model] == eg["target_met"]
    # EGDD's reach is e^(±0.011 T): the effective rate it ends with stays within it.
    for lr, eff in zip(lrs, eg["effective_lr"], strict=True):
      if eff is not None:
        assert (lr * math.exp(-0.011 * steps) * 0.999 <= eff
                <= lr * math.exp(0.011 * steps) * 1.001), (model, lr, eff)


def test_sparse_eg(tmp_path):
  data = _quick("sparse_eg", tmp_path)
  for inputs in ("rademacher", "gaussian"):
    mine = {r["method"]: r for r in data["rows"] if r["inputs"] == inputs}
    assert set(mine) == {"gd", "eg_u1", "eg_u2", "eg_u4"}
    gd, eg = mine["gd"], mine["eg_u1"]
    # Kivinen & Warmuth: with U = ‖w*‖₁, EG± needs >= 5x fewer examples than tuned GD.
    assert gd["iterations"] is not None and eg["iterations"] is not None, inputs
    assert eg["gd_over_method"] >= 5.0, (inputs, eg["gd_over_method"])
    # A looser bound U costs examples.
    assert eg["iterations"] <= mine["eg_u2"]["iterations"] <= mine["eg_u4"]["iterations"]
    # n < d full batch: GD fits the training set but not w*; EG± U=‖w*‖₁ recovers w*.
    batch = {r["method"]: r for r in data["full_batch"]["rows"] if r["inputs"] == inputs}
    assert batch["gd"]["final_population_fraction"] > 0.3
    assert batch["eg_u1"]["final_population_fraction"] < 0.01


def test_zeroth_order(tmp_path):
  data = _quick("zeroth_order", tmp_path)
  evosax = data["evosax"]  # optional, like Captum: the run says whether it was measured
  assert isinstance(evosax["available"], bool) and evosax["note"]
  target = data["target"]
  for row in data["rows"]:
    _measured(row["lean_vs_default"])
    # Same noise, same estimate: the float64 numpy formula of the documented draws.
    assert row["agreement"]["gradtx_vs_numpy"]["rel"] <= target["agreement_rel"], row
  # Compiled memory is deterministic: forward < lean < chunked < materialised, lean <= 10%.
  memory = data["memory"]["rows"]
  for size in {r["num_params"] for r in memory}:
    temp = {r["mode"].split(" ")[0]: r["memory"]["temp"] for r in memory
            if r["num_params"] == size}
    assert temp["forward"] < temp["lean"] < temp["chunked"] < temp["materialised"], temp
    assert temp["lean"] <= 0.1 * temp["materialised"], temp
  executed = [r for r in memory if r["executed"] and r["max_abs_diff_vs_default"] is not None]
  assert any(r["mode"] == "lean" for r in executed)
  assert all(r["max_abs_diff_vs_default"] < 1e-5 for r in executed)  # same key, same estimate
  training = data["training"]
  for row in training["rows"]:
    curve = training["curves"][row["method"]]
    assert row["final_test_accuracy"] >= curve["test_accuracy"][0] + 0.2, row


def test_attribution_speed(tmp_path):
  data = _quick("attribution_speed", tmp_path)
  # Captum is optional (torch is not a dependency): the run says whether it was measured.
  captum = data["captum"]
  assert isinstance(captum["available"], bool) and captum["note"]
  for row in data["rows"]:
    assert row["model"] in ("mlp", "cnn") and row["steps"] >= 2, row
    for key in ["vs_floor", "unhoisted_vs_floor", "hoisting_speedup",
                "vs_steps_x_one_gradient", "vs_loop"] + (
        ["vs_captum"] if captum["available"] else []):
      _measured(row[key])
    # The loop, the floor (weighted and summed), the unhoisted IG and Captum give
    # gradtx's attributions; hoisting the first layer removes FLOPs (deterministic).
    assert row["loop_max_abs_diff"] < 1e-4 and row["floor_max_abs_diff"] < 1e-4, row
    assert row["unhoisted_max_abs_diff"] < 1e-4, row
    assert row["xla_flops_vs_floor"] < row["xla_flops_unhoisted_vs_floor"], row
    if captum["available"]:
      assert row["captum_max_abs_diff"] <= data["target"]["captum_agreement_atol"], row
    else:
      assert row["vs_captum"] is None and row["captum_max_abs_diff"] is None, row
  # Completeness (float64, deterministic): every method for every model; the error falls
  # with the steps (monotonically for the midpoint and trapezoid rules); Gauss–Legendre
  # is below 1e-3 and below the trapezoid rule at every step count of the grid.
  completeness = data["completeness"]
  methods = {"riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
             "gausslegendre"}
  for model, curves in completeness["curves"].items():
    assert methods <= set(curves), model
    for method, errors in curves.items():
      assert len(errors) == len(completeness["grid"])
      assert all(0 <= e < math.inf for e in errors)
      assert errors[-1] < errors[0], (model, method)
    for method in ("riemann_middle", "riemann_trapezoid"):
      errors = curves[method]
      assert all(b <= a for a, b in zip(errors, errors[1:], strict=False)), (model, method)
    for gl, trapezoid in zip(curves["gausslegendre"], curves["riemann_trapezoid"],
                             strict=True):
      assert gl < data["target"]["completeness_rel_error"] and gl < trapezoid, model


def test_contrastive_memory(contrastive_memory_quick):
  out_dir, stdout = contrastive_memory_quick
  data = _check_common("contrastive_memory", out_dir, stdout)
  rows = data["rows"]
  for row in rows:
    assert row["memory"]["temp"] > 0
    assert row["executed"], row  # quick sizes are far below the 8 GiB limit
    # Every variant computes the same update as the dense full-batch step.
    assert row["max_abs_param_diff"] < 1e-5, (row["method"], row["loss"])
    _measured(row["time_vs_full"])
    full = next(r for r in rows if r["batch"] == row["batch"] and r["loss"] == row["loss"]
                and r["method"] == "full")
    if row["method"] != "full":  # compiled memory is deterministic: the claims are checked
      assert row["memory"]["temp"] < full["memory"]["temp"], row
      assert row["memory_vs_full"] == pytest.approx(
          row["memory"]["temp"] / full["memory"]["temp"], rel=1e-6), row
  # With the blockwise loss (no B x B matrix), caching keeps one chunk's activations:
  # <= 30% of the full-batch step's temporaries once there are >= 8 chunks.
  checked = [r for r in rows if r["method"] == "two_pass" and r["loss"] != "dense"
             and r["num_chunks"] >= data["target"]["min_chunks"]]
  assert checked, "no blockwise two_pass row with B / chunk >= 8"
  for row in checked:
    assert row["memory_target_met"] and row["memory_vs_full"] <= 0.30, row
  loss_only = data["loss_only"]
  assert loss_only["available"], loss_only["note"]
  assert loss_only["blockwise"]["temp"] < 2**30 < loss_only["dense_matrix_bytes"]
  # Transformer towers (compile-only): activations dominate, so caching saves memory.
  transformer = data["transformer"]["rows"]
  assert {r["method"] for r in transformer} == {"full", "two_pass", "remat"}
  for row in transformer:
    assert row["memory"]["temp"] > 0
    if row["method"] == "two_pass":
      full = next(r for r in transformer if r["batch"] == row["batch"]
                  and r["loss"] == row["loss"] and r["method"] == "full")
      assert row["memory"]["temp"] < full["memory"]["temp"], row


def test_contrastive_memory_transformer_section_keeps_mlp_results(contrastive_memory_quick,
                                                                  tmp_path):
  """``--section transformer`` re-measures only the transformer rows; MLP rows are kept."""
  shutil.copytree(contrastive_memory_quick[0], tmp_path, dirs_exist_ok=True)
  before = json.loads((tmp_path / "contrastive_memory.json").read_text())
  stdout = _run_quick("contrastive_memory", tmp_path, "--section", "transformer")
  after = _check_common("contrastive_memory", tmp_path, stdout)
  for key in ("config", "target", "rows", "loss_only", "mlp_wall_s"):
    assert after[key] == before[key], key
  assert [r["memory"] for r in after["transformer"]["rows"]] == [
      r["memory"] for r in before["transformer"]["rows"]]  # compiled memory is deterministic
