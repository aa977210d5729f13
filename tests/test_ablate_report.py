"""scripts/ablate.py without training: the run plan, the trainer command lines and the report built from
hand-written run folders (test_metrics.json + metrics.jsonl in the trainer's format)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ablate", REPO / "scripts" / "ablate.py")
ablate = importlib.util.module_from_spec(spec)
sys.modules["ablate"] = ablate  # dataclasses look their module up
spec.loader.exec_module(ablate)


def args_for(tmp_path, *extra):
    return ablate.parse_args(["--runs-dir", str(tmp_path / "runs"), "--docs-dir", str(tmp_path / "docs"), *extra])


def test_plan_is_seed_major_and_commands_carry_each_variant(tmp_path):
    args = args_for(tmp_path, "--seeds", "3", "4", "--epochs", "5", "--set", "loss.tau=0.02")
    runs = ablate.plan_runs(args)
    assert len(runs) == 2 * 2 * 4
    assert [r.seed for r in runs[:8]] == [3] * 8 and [r.seed for r in runs[8:]] == [4] * 8
    by_name = {r.name: r.command for r in runs}
    baseline = by_name["baseline-noisy-seed3"]
    pairs = dict(zip(baseline, baseline[1:]))
    assert pairs["--model.select_ratio"] == "0.0" and pairs["--alr.enabled"] == "false"
    assert pairs["--data.noise_rate"] == "0.5" and pairs["--seed"] == "3" and pairs["--train.epochs"] == "5"
    assert pairs["--loss.tau"] == "0.02" and pairs["--eval.select_row"] == "A/FS"
    assert baseline[-1] == "--final-test"
    full = dict(zip(by_name["full-clean-seed4"], by_name["full-clean-seed4"][1:]))
    assert full["--alr.models"] == "2" and full["--eval.select_row"] == "A+B/FS" and full["--data.noise_rate"] == "0.0"
    alr = dict(zip(by_name["alr-clean-seed4"], by_name["alr-clean-seed4"][1:]))
    assert alr["--alr.models"] == "1" and "--model.select_ratio" not in alr


def test_bad_set_option_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        args_for(tmp_path, "--set", "loss.tau")


def fake_run(folder: Path, r1: dict, detection=None):
    """Writes the two files the report reads, in the trainer's format."""
    folder.mkdir(parents=True)
    r1 = {"A+B/FS": r1["A/FS"] + 1.0, **r1}  # every run has the ensemble rows
    rows = {key: {"R1": value, "R5": 0.0, "R10": 0.0, "mAP": value / 2, "mINP": 0.0} for key, value in r1.items()}
    (folder / "test_metrics.json").write_text(json.dumps({"checkpoint": "best", **rows}))
    records = [{"epoch": 0, "best_epoch": 0}]
    if detection is not None:
        records.append({"epoch": 1, "best_epoch": 1,
                        "alr": {"mu": 0.5, "noise_detection": {"precision": detection, "recall": 40.0, "f1": 1.0},
                                "mean_weight_noisy": 0.9, "mean_weight_clean": 0.99, "consensus_counts": [1, 2, 3]}})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_means_stds_and_unrun_cells(tmp_path):
    args = args_for(tmp_path, "--seeds", "0", "1", "--variants", "baseline", "full")
    runs_dir = tmp_path / "runs"
    fake_run(runs_dir / "baseline-clean-seed0", {"A/FS": 10.0})
    fake_run(runs_dir / "baseline-clean-seed1", {"A/FS": 14.0})
    fake_run(runs_dir / "full-noisy-seed0", {"A/FS": 20.0, "A+B/FS": 30.0}, detection=60.0)
    fake_run(runs_dir / "full-noisy-seed1", {"A/FS": 22.0, "A+B/FS": 34.0}, detection=80.0)
    report = ablate.write_report(ablate.plan_runs(args), args, failed=[]).read_text()
    baseline_row = next(line for line in report.splitlines() if line.startswith("| CLIP baseline"))
    # clean: R@1 mean 12, sample std 2.83; mAP half of it; 2 seeds; noisy column never ran
    assert "12.00 ± 2.83" in baseline_row and "6.00 ± 1.41" in baseline_row
    assert baseline_row.count("not run") == 2
    ensemble_row = next(line for line in report.splitlines() if "A+B (A+B/FS)" in line)
    assert "32.00 ± 2.83" in ensemble_row
    assert "| 1 | 70.0 ± 14.1 | 40.0 ± 0.0 |" in report
    ensemble_section = report.split("## Ensemble")[1].split("## ALR")[0]
    baseline_ensemble = next(line for line in ensemble_section.splitlines() if line.startswith("| CLIP baseline"))
    assert "13.00 ± 2.83" in baseline_ensemble  # A+B of the baseline runs: A + 1
    saved = json.loads((tmp_path / "docs" / "ablation.json").read_text())
    assert saved["runs_finished"] == 4 and saved["runs_planned"] == 8
    assert (tmp_path / "docs" / "ablation_r1.png").stat().st_size > 0
    assert (tmp_path / "docs" / "alr_detection.png").stat().st_size > 0


def test_a_run_folder_of_another_command_is_not_reused(tmp_path):
    args = args_for(tmp_path, "--seeds", "0", "--variants", "baseline", "--conditions", "clean", "--epochs", "3")
    (run,) = ablate.plan_runs(args)
    fake_run(run.folder, {"A/FS": 10.0})
    (run.folder / "command.txt").write_text(" ".join(run.command + ["--resume", str(run.folder)]) + "\n")
    assert ablate.plan_runs(args)[0].finished  # same command (a resume is the same run): reused
    other = args_for(tmp_path, "--seeds", "0", "--variants", "baseline", "--conditions", "clean", "--epochs", "4")
    with pytest.raises(SystemExit, match="another command"):
        ablate.plan_runs(other)


def test_end_to_end_one_tiny_run_then_resume_skips_it(tmp_path):
    """The real trainer through the sweep: one 1-epoch run on synth-pedes-tiny, then a second call finds
    it finished and trains nothing."""
    import os
    import subprocess

    command = [sys.executable, "scripts/ablate.py", "--runs-dir", str(tmp_path / "runs"), "--docs-dir",
               str(tmp_path / "docs"), "--epochs", "1", "--seeds", "0", "--variants", "baseline", "--conditions",
               "clean", "--set", "data.dataset=synth-pedes-tiny", "--set", "train.batch_size=16", "--threads", "1"]
    env = dict(os.environ, TRPR_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    run = tmp_path / "runs" / "baseline-clean-seed0"
    test = json.loads((run / "test_metrics.json").read_text())
    assert 0.0 <= test["A/FS"]["R1"] <= 100.0
    row = next(line for line in (tmp_path / "docs" / "ablation.md").read_text().splitlines()
               if line.startswith("| CLIP baseline"))
    assert f"{test['A/FS']['R1']:.2f} (1 seed)" in row
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "1 of 1 runs already finished, 0 to train" in second.stdout
