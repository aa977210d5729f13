"""The ablation sweep (trpr.experiments.ablation_*, scripts/ablate.py) without training: the run plan, the trainer command lines and the report built from
hand-written run folders (test_metrics.json + metrics.jsonl in the trainer's format)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from trpr import configs
from trpr.engine.state_files import save_state
from trpr.experiments import (ablation_compare, ablation_plan, ablation_report, ablation_sweep, alr_analysis,
                              proxy_pretrain)
from trpr.experiments import ablation_zeroshot as zeroshot
from trpr.modeling.pair import ROW_KEYS
from trpr.reporting import ablation as ablation_tables

REPO = Path(__file__).resolve().parents[2]


def args_for(tmp_path, *extra):
    return ablation_sweep.parse_args(["--runs-dir", str(tmp_path / "runs"), "--docs-dir", str(tmp_path / "docs"), *extra])


def test_plan_is_seed_major_and_commands_carry_each_variant(tmp_path):
    args = args_for(tmp_path, "--seeds", "3", "4", "--epochs", "5", "--set", "loss.tau=0.02")
    runs = ablation_plan.plan_runs(args)
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


def metric_rows(r1: dict) -> dict:
    """Every evaluate_pair row (modeling.pair.ROW_KEYS) in the trainer's format: R@1 from `r1` (0 for the
    rows it does not name), mAP = R@1 / 2."""
    return {key: {"R1": r1.get(key, 0.0), "R5": 0.0, "R10": 0.0, "mAP": r1.get(key, 0.0) / 2, "mINP": 0.0}
            for key in ROW_KEYS}


def fake_run(folder: Path, r1: dict, detection=None, epochs=None, best_epoch=None):
    """Writes the two files the report reads, in the trainer's format: test_metrics.json (best/) from `r1`
    ({row key: R@1}; A+B/FS defaults to A/FS + 1, every run has the ensemble rows) and metrics.jsonl:
    `epochs` = [(val R@1 rows, test R@1 rows)] one record per epoch (default one epoch whose val and test rows
    are `r1`), best_epoch (default the last), the ALR record with `detection` as precision on the last."""
    folder.mkdir(parents=True, exist_ok=True)
    r1 = {"A+B/FS": r1.get("A/FS", 0.0) + 1.0, **r1}
    (folder / "test_metrics.json").write_text(json.dumps({"checkpoint": "best", **metric_rows(r1)}))
    epochs = epochs if epochs is not None else [(r1, r1)]
    best_epoch = len(epochs) - 1 if best_epoch is None else best_epoch
    records = [{"epoch": e, "best_epoch": best_epoch, "val": metric_rows(val), "test": metric_rows(test)}
               for e, (val, test) in enumerate(epochs)]
    if detection is not None:
        records[-1]["alr"] = {"mu": 0.5, "noise_detection": {"precision": detection, "recall": 40.0, "f1": 1.0},
                              "separation_auc": {"loss": detection / 100, "fused_similarity": 0.7,
                                                 "global_similarity": 0.6},
                              "mean_weight_noisy": 0.9, "mean_weight_clean": 0.99, "consensus_counts": [1, 2, 3]}
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def report_line(report: str, start: str, section: str | None = None) -> str:
    """The first line of the report (of the part after heading text `section`) that starts with `start`."""
    text = report.split(section, 1)[1] if section else report
    return next(line for line in text.splitlines() if line.startswith(start))


def test_report_means_stds_and_unrun_cells(tmp_path):
    args = args_for(tmp_path, "--seeds", "0", "1", "--variants", "baseline", "full")
    runs_dir = tmp_path / "runs"
    fake_run(runs_dir / "baseline-clean-seed0", {"A/GE": 10.0, "A/FS": 19.0})
    fake_run(runs_dir / "baseline-clean-seed1", {"A/GE": 14.0, "A/FS": 23.0})
    fake_run(runs_dir / "full-noisy-seed0", {"A/FS": 20.0, "A+B/FS": 30.0}, detection=60.0)
    fake_run(runs_dir / "full-noisy-seed1", {"A/FS": 22.0, "A+B/FS": 34.0}, detection=80.0)
    report = ablation_report.write_report(ablation_plan.plan_runs(args), args, failed=[]).read_text()
    baseline_row = report_line(report, "| CLIP baseline")
    # clean: R@1 of A/GE mean 12, sample std 2.83; mAP half of it; 2 seeds; noisy column never ran
    assert "| A/GE (A/GE) |" in baseline_row and "12.00 ± 2.83" in baseline_row and "6.00 ± 1.41" in baseline_row
    assert baseline_row.count("not run") == 2
    ensemble_row = report_line(report, "| + reciprocal pair, ALR soft weights (two-model consensus) | A+B/FS")
    assert "32.00 ± 2.83" in ensemble_row
    # the ALR epoch: P / R / F1, then model A's AUC of loss (precision / 100 here), fused and global similarity
    assert ("| 0 | 70.0 ± 14.1 | 40.0 ± 0.0 | 1.0 ± 0.0 | 0.700 ± 0.141 | 0.700 ± 0.000 | 0.600 ± 0.000 |"
            in report)
    baseline_ensemble = report_line(report, "| CLIP baseline", "## Ensemble")
    assert "22.00 ± 2.83" in baseline_ensemble  # A+B of the baseline runs: A/FS + 1
    saved = json.loads((tmp_path / "docs" / "ablation.json").read_text())
    assert saved["runs_finished"] == 4 and saved["runs_planned"] == 8
    assert "zero-shot" in report and "not evaluated" in report_line(report, "| zero-shot")
    for figure in ("ablation_r1.png", "alr_detection.png"):
        assert (tmp_path / "docs" / figure).stat().st_size > 0
    assert not (tmp_path / "docs" / "ablation_differences.png").exists()  # fused was not run: no comparison
    assert "skipped: fused not run" in report


def test_both_selection_rules_pick_their_own_epoch(tmp_path):
    """Trainer's rule: test_metrics.json (best/ on val A/FS, or A+B/FS for the pair). Reference rule: the
    epoch with the best val max(M/GE, M/FS), M = the select_row's model, first epoch on ties, and that
    epoch's recorded test rows."""
    args = proxy_args(tmp_path, "--seeds", "0", "--variants", "fused", "alr_hard", "full_hard", "ensemble_hard",
                      "--conditions", "clean")
    runs_dir = tmp_path / "runs"
    # fused: val A/FS best at epoch 1 (the trainer's best/), val max(GE, FS) best at epoch 2 (GE 50)
    fake_run(runs_dir / "fused-clean-seed0", {"A/GE": 11.0, "A/FS": 12.0, "A/GE+FS": 13.0}, best_epoch=1, epochs=[
        ({"A/GE": 5.0, "A/FS": 5.0}, {"A/GE": 1.0, "A/FS": 1.0, "A/GE+FS": 1.0}),
        ({"A/GE": 10.0, "A/FS": 30.0}, {"A/GE": 11.0, "A/FS": 12.0, "A/GE+FS": 13.0}),
        ({"A/GE": 50.0, "A/FS": 20.0}, {"A/GE": 41.0, "A/FS": 42.0, "A/GE+FS": 43.0})])
    # alr_hard: epochs 0 and 2 tie on max(GE, FS) = 40 (GE at 0, FS at 2): the first one wins
    fake_run(runs_dir / "alr_hard-clean-seed0", {"A/FS": 7.0}, epochs=[
        ({"A/GE": 40.0, "A/FS": 1.0}, {"A/FS": 21.0}), ({"A/FS": 3.0}, {"A/FS": 22.0}),
        ({"A/GE": 2.0, "A/FS": 40.0}, {"A/FS": 23.0})])
    # full_hard selects on A+B: model A's own val rows must not count
    fake_run(runs_dir / "full_hard-clean-seed0", {"A+B/FS": 8.0}, epochs=[
        ({"A/GE": 90.0, "A+B/GE": 10.0}, {"A+B/FS": 31.0}), ({"A+B/GE": 20.0, "A+B/FS": 15.0}, {"A+B/FS": 32.0})])
    fake_run(runs_dir / "ensemble_hard-clean-seed0", {"A/FS": 3.0})
    (runs_dir / "ensemble_hard-clean-seed0" / ablation_plan.ENSEMBLE_METRICS).write_text(
        json.dumps(metric_rows({"A+B/FS": 44.0})))
    report = ablation_report.write_report(ablation_plan.plan_runs(args), args, failed=[]).read_text()
    trainer, reference = report.split("## (b)")[0], report.split("## (b)")[1].split("## Paired")[0]
    assert "trainer's rule" in report.split("## (a)")[1].splitlines()[0]
    assert "reference rule max(GE, FS)" in report.split("## (b)")[1].splitlines()[0]
    fused = "| + fused representation (top-k image tokens) | A/"
    assert "| 12.00 (1 seed) | 6.00 (1 seed) | 1 |" in report_line(trainer, fused + "FS")
    assert "| 42.00 (1 seed) | 21.00 (1 seed) | 1 |" in report_line(reference, fused + "FS")
    assert "| 43.00 (1 seed) |" in report_line(reference, fused + "GE+FS")
    hard = "| + ALR hard selection, one model (= the reference's --ccd --ccd-r) | A/FS"
    assert "| 7.00 (1 seed) |" in report_line(trainer, hard)
    assert "| 21.00 (1 seed) |" in report_line(reference, hard)
    pair = "| + reciprocal pair, ALR hard selection (two-model consensus) | A+B/FS"
    assert "| 8.00 (1 seed) |" in report_line(trainer, pair)
    assert "| 32.00 (1 seed) |" in report_line(reference, pair)
    control = "| control: two independent hard-selection models, ensembled | A+A'/FS"
    assert "| 44.00 (1 seed) |" in report_line(trainer, control)
    assert "| n/a | n/a | 0 |" in report_line(reference, control) and "n/a for the ensemble controls" in report
    table = json.loads((tmp_path / "docs" / "ablation.json").read_text())["table"]
    assert table["fused"]["clean"]["trainer"]["A/FS"]["epochs"] == [1]
    assert table["fused"]["clean"]["reference"]["A/FS"]["epochs"] == [2]
    assert table["alr_hard"]["clean"]["reference"]["A/FS"]["epochs"] == [0]


def test_paired_verdicts(tmp_path):
    """Paired by seed: earns its place (same positive sign, mean > 2 std), not shown (signs differ; std too
    large), hurts (the mirror case), not shown with one seed, skipped when a side did not run."""
    assert ablation_compare.verdict([2.0, 3.0, 2.5]) == ablation_compare.EARNS
    assert ablation_compare.verdict([3.0, -1.0, 4.0]) == ablation_compare.NOT_SHOWN  # signs differ
    assert ablation_compare.verdict([1.0, 10.0, 0.5]) == ablation_compare.NOT_SHOWN  # mean 3.83 < 2 x 5.35
    assert ablation_compare.verdict([-3.0, -4.0, -3.5]) == ablation_compare.HURTS
    assert ablation_compare.verdict([5.0]) == ablation_compare.NOT_SHOWN
    assert ablation_compare.verdict([0.0, 0.0]) == ablation_compare.NOT_SHOWN
    args = proxy_args(tmp_path, "--seeds", "0", "1", "2", "--variants", "baseline", "fused", "alr", "alr_hard",
                      "frozen", "--conditions", "noisy")
    runs_dir = tmp_path / "runs"
    for seed, (base, fused, alr, hard, frozen) in enumerate([(10, 12, 15, 13, 9), (20, 23, 22, 33, 19),
                                                             (30, 32.5, 36, 32.5, 26.5)]):
        fake_run(runs_dir / f"baseline-noisy-seed{seed}", {"A/GE": base})
        for name, value in (("fused", fused), ("alr", alr), ("alr_hard", hard), ("frozen", frozen)):
            if name == "alr_hard" and seed == 2:
                continue  # one seed missing: paired over seeds 0 and 1 only
            fake_run(runs_dir / f"{name}-noisy-seed{seed}", {"A/FS": value, "A/GE+FS": value + 1.0})
    report = ablation_report.write_report(ablation_plan.plan_runs(args), args, failed=[]).read_text()
    results = {(e["name"], e["rule"]): e for e in
               json.loads((tmp_path / "docs" / "ablation.json").read_text())["comparisons"]}
    fused = results[("fused_fs-baseline", "trainer")]
    assert fused["seeds"] == [0, 1, 2] and fused["differences"] == pytest.approx([2.0, 3.0, 2.5])
    assert fused["mean"] == pytest.approx(2.5) and fused["std"] == pytest.approx(0.5)
    assert fused["verdict"] == ablation_compare.EARNS
    assert results[("fused_ge_fs-baseline", "trainer")]["differences"] == pytest.approx([3.0, 4.0, 3.5])
    assert results[("alr-fused", "trainer")]["differences"] == pytest.approx([3.0, -1.0, 3.5])
    assert results[("alr-fused", "trainer")]["verdict"] == ablation_compare.NOT_SHOWN
    hard = results[("alr_hard-fused", "trainer")]
    assert hard["seeds"] == [0, 1] and hard["differences"] == pytest.approx([1.0, 10.0])
    assert hard["verdict"] == ablation_compare.NOT_SHOWN  # same sign, mean 5.5 < 2 x 6.36
    assert results[("frozen-fused", "trainer")]["verdict"] == ablation_compare.HURTS
    assert results[("fused_fs-baseline", "reference")]["verdict"] == ablation_compare.EARNS  # one epoch: same rows
    assert results[("full-ensemble", "trainer")]["skipped"] == "full not run"
    line = report_line(report, "| fused representation (FS score alone)", "### (a)")
    assert "| 0: +2.00, 1: +3.00, 2: +2.50 | +2.50 ± 0.50 | earns its place |" in line
    assert "| hurts |" in report_line(report, "| frozen backbone", "### (a)")
    assert "skipped: full not run" in report_line(report, "| reciprocal pair over two independent soft", "### (a)")
    assert (tmp_path / "docs" / "ablation_differences.png").stat().st_size > 0


def test_the_zero_shot_row_is_read(tmp_path):
    args = proxy_args(tmp_path, "--seeds", "0", "--variants", "baseline", "--conditions", "clean", "noisy")
    fake_run(tmp_path / "runs" / "baseline-clean-seed0", {"A/GE": 10.0})
    (tmp_path / "runs" / zeroshot.ZEROSHOT_FILE).write_text(json.dumps(
        {"backbone": "/cache/proxy", "dataset": "synth-pedes", "A/GE": metric_rows({"A/GE": 17.5})["A/GE"]}))
    report = ablation_report.write_report(ablation_plan.plan_runs(args), args, failed=[]).read_text()
    for section in ("## (a)", "## (b)"):
        row = report_line(report, "| zero-shot", section)
        assert row.count("| 17.50 | 8.75 | –") == 2  # the same test-split number in both conditions
    assert "`/cache/proxy` itself" in report
    assert json.loads((tmp_path / "docs" / "ablation.json").read_text())["table"]["_zeroshot"]["A/GE"]["R1"] == 17.5


def test_zero_shot_evaluates_the_backbone_folder_once(tmp_path, monkeypatch):
    """ensure_zeroshot: the untouched backbone folder on the recipe dataset's test split (row A/GE, what
    evaluate_pair gives the trainer's pair before any step), written once; a random-init backbone has none."""
    from trpr import data
    from trpr import modeling
    from trpr.data.tokenizer import get_tokenizer
    from trpr.evaluation import evaluate_pair
    from transformers import CLIPModel

    monkeypatch.setenv("TRPR_CACHE", str(tmp_path / "data"))
    torch.manual_seed(0)
    backbone = tmp_path / "backbone"
    CLIPModel(modeling.small_clip_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, projection_dim=32)).save_pretrained(backbone)
    args = proxy_args(tmp_path, "--seeds", "0", "--variants", "baseline", "--conditions", "clean",
                      "--set", "data.dataset=synth-pedes-tiny", "--set", "data.image_size=[32, 16]")
    args.backbone = str(backbone)
    path = zeroshot.ensure_zeroshot(args)
    saved = json.loads(path.read_text())
    assert path == tmp_path / "runs" / zeroshot.ZEROSHOT_FILE and saved["dataset"] == "synth-pedes-tiny"
    splits = data.load_benchmark("synth-pedes-tiny", root=tmp_path / "data")
    pair = modeling.ReciprocalPair.from_clip(str(backbone), image_size=(32, 16)).eval()
    expected = evaluate_pair(pair, splits["test_gallery"], splits["test_queries"], tokenizer=get_tokenizer(),
                             image_size=(32, 16))
    assert set(saved) == {"backbone", "dataset", "A/GE"}
    assert saved["A/GE"] == pytest.approx(expected["A/GE"])
    monkeypatch.setattr(zeroshot, "evaluate_zeroshot", lambda config: pytest.fail("evaluated twice"))
    assert zeroshot.ensure_zeroshot(args) == path  # once per sweep
    scratch = args_for(tmp_path / "scratch", "--conditions", "clean")  # from-scratch recipe: random init
    assert zeroshot.ensure_zeroshot(scratch) is None and not (tmp_path / "scratch" / "runs").exists()


def test_a_run_folder_of_another_command_is_not_reused(tmp_path):
    args = args_for(tmp_path, "--seeds", "0", "--variants", "baseline", "--conditions", "clean", "--epochs", "3")
    (run,) = ablation_plan.plan_runs(args)
    fake_run(run.folder, {"A/FS": 10.0})
    run.command_file.write_text(" ".join(run.command + ["--resume", str(run.folder)]) + "\n")
    assert ablation_plan.plan_runs(args)[0].finished  # same command (a resume is the same run): reused
    other = args_for(tmp_path, "--seeds", "0", "--variants", "baseline", "--conditions", "clean", "--epochs", "4")
    with pytest.raises(SystemExit, match="another command"):
        ablation_plan.plan_runs(other)


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
    assert f"{test['A/GE']['R1']:.2f} (1 seed)" in row
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "test" in records[0]  # eval.record_test: the reference rule's epoch has its test rows
    reference = (tmp_path / "docs" / "ablation.md").read_text().split("## (b)")[1]
    assert f"{records[0]['test']['A/GE']['R1']:.2f} (1 seed)" in next(
        line for line in reference.splitlines() if line.startswith("| CLIP baseline"))
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "1 of 1 runs already finished, 0 to train" in second.stdout


# ============================================================================ proxy mode (issue 12)
def proxy_args(tmp_path, *extra):
    return ablation_sweep.parse_args(["--proxy", "--backbone", str(tmp_path / "proxy"), "--runs-dir", str(tmp_path / "runs"),
                              "--docs-dir", str(tmp_path / "docs"), *extra])


def test_proxy_plan_recipes_backbone_variants_and_the_ensemble_control(tmp_path):
    args = proxy_args(tmp_path, "--seeds", "0", "1")
    runs = ablation_plan.plan_runs(args)
    noisy_only = len(ablation_plan.NOISY_ONLY_VARIANTS)
    # seeds x (conditions x variants, less the clean runs of the variants whose pass only matters under noise)
    assert len(runs) == 2 * (3 * len(ablation_plan.PROXY_VARIANTS) - noisy_only) == 2 * (3 * 21 - 8)
    by_name = {r.name: r for r in runs}
    assert "full_hard_global-clean-seed0" not in by_name and "full_hard_global-noisy80-seed1" in by_name
    assert by_name["ensemble_hard_global-noisy-seed0"].partner is by_name["alr_hard_global-noisy-seed0"]
    options = {name: dict(zip(run.command, run.command[1:])) for name, run in by_name.items()}
    assert options["baseline-clean-seed0"]["--config"] == "proxy-clean"
    assert options["baseline-noisy-seed0"]["--config"] == "proxy-noisy"
    assert options["full-noisy80-seed1"]["--data.noise_rate"] == "0.8"
    assert all(o["--model.backbone"] == str(tmp_path / "proxy") for o in options.values())
    assert options["fused_all-clean-seed0"]["--model.image_tokens"] == "all"
    assert options["fused-clean-seed0"]["--model.image_tokens"] == "topk"  # ablation_plan.PINNED
    assert options["fused_ref-clean-seed0"]["--model.image_tokens"] == "reference"
    assert options["frozen-noisy-seed0"]["--optim.backbone_lr"] == "0.0"
    assert options["head_warmup-noisy-seed0"]["--optim.head_warmup_epochs"] == "1"
    assert options["alr_hard_global-noisy-seed0"]["--alr.score"] == "global"
    assert options["full_hard_global-noisy-seed0"]["--alr.models"] == "2"
    assert options["alr_hard_views-noisy80-seed0"]["--alr.views"] == "reference"
    assert options["alr_hard_views-noisy80-seed0"]["--alr.selection"] == "reference"
    assert options["alr_hard_trl_ref-noisy-seed1"]["--loss.trl_temperature"] == "reference"
    assert options["alr_hard_gmm_ref-noisy-seed1"]["--alr.gmm_preset"] == "reference"
    assert all(o["--eval.record_test"] == "true" for o in options.values())  # the reference rule needs them
    assert options["full_hard-noisy-seed0"]["--eval.select_row"] == "A+B/FS"
    # the control: a second hard-selection run, another seed, the partner's noisy training set
    control, partner = by_name["ensemble_hard-noisy-seed1"], by_name["alr_hard-noisy-seed1"]
    assert control.partner is partner and partner.partner is None
    control_options, partner_options = options["ensemble_hard-noisy-seed1"], options["alr_hard-noisy-seed1"]
    assert control_options["--alr.selection"] == partner_options["--alr.selection"] == "reference"
    assert control_options["--seed"] == "1001" and partner_options["--seed"] == "1"
    assert control_options["--data.noise_rate"] == "0.0"
    assert control_options["--data.noise_file"] == str(ablation_plan.noise_file_for("noisy", 1, args))
    assert control_options["--alr.models"] == "1" and control_options["--eval.select_row"] == "A/FS"
    assert "--data.noise_file" not in options["ensemble_hard-clean-seed1"]
    assert control.metrics_file.name == ablation_plan.ENSEMBLE_METRICS and partner.metrics_file.name == "test_metrics.json"
    assert args.runs_dir == str(tmp_path / "runs") and args.docs_dir == str(tmp_path / "docs")


def test_proxy_defaults_and_random_init_control(tmp_path, monkeypatch):
    monkeypatch.setenv("TRPR_CACHE", str(tmp_path / "cache"))
    args = ablation_sweep.parse_args(["--proxy"])
    assert args.runs_dir == "runs/ablation_proxy" and args.docs_dir == "docs/results/proxy"
    assert args.backbone == str(proxy_pretrain.proxy_folder(proxy_pretrain.ProxySettings()))
    assert args.backbone.startswith(str(tmp_path / "cache"))
    scratch = ablation_sweep.parse_args(["--proxy", "--random-init"])
    assert scratch.runs_dir == "runs/ablation_proxy_random"
    mapping = configs.parse_overrides(["--model.backbone", scratch.backbone])["model"]["backbone"]
    assert mapping == proxy_pretrain.ProxySettings().architecture()
    assert " " not in scratch.backbone  # command.txt is compared word by word
    default = ablation_sweep.parse_args([])
    assert default.variants == ablation_plan.DEFAULT_VARIANTS and default.conditions == ["clean", "noisy"]
    assert default.backbone is None and default.config == "synth-pedes" and default.noisy_config is None


@pytest.mark.parametrize("argv, message", [
    (["--random-init"], "belongs to --proxy"),
    (["--proxy", "--random-init", "--backbone", "x"], "exclude each other"),
    (["--proxy", "--backbone", "x", "--variants", "full", "ensemble"], "add --variants alr"),
])
def test_bad_proxy_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        ablation_sweep.parse_args(argv)
    assert message in capsys.readouterr().err


def test_missing_backbone_folder_stops_the_sweep_before_training(tmp_path):
    args = proxy_args(tmp_path, "--seeds", "0", "--variants", "baseline", "--conditions", "clean")
    with pytest.raises(SystemExit, match="does not exist; build the proxy first"):
        ablation_sweep.train_all(ablation_plan.plan_runs(args), args)


def write_pair_run(folder: Path, dataset_root: Path, seed: int):
    """A trained-looking run folder: a real (untrained, tiny) pair in best/, config.yaml, test metrics."""
    from trpr import modeling
    import yaml

    torch.manual_seed(seed)
    pair = modeling.ReciprocalPair.from_clip(modeling.small_clip_config(hidden_size=32, intermediate_size=64,
                                                                        num_hidden_layers=1, num_attention_heads=2,
                                                                        projection_dim=32),
                                             head_seeds=(seed, seed + 1), fused_dim=16, image_size=(32, 16))
    pair.save_pretrained(folder / "best")
    config = configs.load_config(None, ["--data.dataset", "synth-pedes-tiny", "--data.root", str(dataset_root),
                                        "--data.image_size", "[32, 16]", "--eval.batch_size", "64",
                                        "--data.num_workers", "0"])
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    fake_run(folder, {"A/FS": 5.0})
    return pair


def test_ensemble_control_evaluates_the_two_independent_models_a(tmp_path):
    from trpr import data
    from trpr import modeling
    from trpr.data.tokenizer import get_tokenizer
    from trpr.evaluation import evaluate_pair

    args = proxy_args(tmp_path, "--seeds", "0", "--variants", "alr", "ensemble", "--conditions", "clean")
    partner, control = ablation_plan.plan_runs(args)
    first = write_pair_run(partner.folder, tmp_path / "data", seed=0)
    second = write_pair_run(control.folder, tmp_path / "data", seed=5)
    assert control.trained and not control.finished
    assert ablation_sweep.evaluate_ensembles([partner, control], {"TRPR_CACHE": str(tmp_path / "data")}, threads=1) == []
    assert control.finished
    saved = json.loads((control.folder / ablation_plan.ENSEMBLE_METRICS).read_text())
    splits = data.load_benchmark("synth-pedes-tiny", root=tmp_path / "data")
    expected = evaluate_pair(modeling.ReciprocalPair(first.a, second.a), splits["test_gallery"],
                                        splits["test_queries"], tokenizer=get_tokenizer(), image_size=(32, 16))
    assert saved["A+B/FS"] == pytest.approx(expected["A+B/FS"])
    assert saved["A/FS"] == pytest.approx(expected["A/FS"]) and saved["members"][0].startswith(str(partner.folder))
    report = ablation_report.write_report([partner, control], args, failed=[]).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| control") and "| A+A'/FS (A+B/FS) |" in line)
    assert f"{saved['A+B/FS']['R1']:.2f} (1 seed)" in row


def alr_record(noisy) -> dict:
    """An epoch's ALR record as the trainer writes it (engine.alr_report of a real mixture fit): noisy pairs
    have higher losses and lower similarities than clean ones, with some overlap."""
    from trpr.engine import alr_report
    from trpr.modeling.alr import compute_alr

    flags = torch.as_tensor(noisy, dtype=torch.bool)
    generator = torch.Generator().manual_seed(int(flags.sum()))
    losses = [flags.float() + 0.6 * torch.rand(len(flags), generator=generator) for _ in range(2)]
    sims = 0.5 - 0.3 * flags.float() + 0.1 * torch.rand(len(flags), generator=generator)
    signals = {"loss": losses[0], "fused_similarity": sims, "global_similarity": sims.flip(0)}
    return alr_report(compute_alr(losses[0], losses[1], sims), sims, flags, signals)


def test_proxy_report_has_every_noisy_condition_and_the_weight_figure(tmp_path):
    import numpy as np
    from trpr import data
    from trpr.data.noise import generate_permutation, save_permutation

    args = proxy_args(tmp_path, "--seeds", "0", "--variants", "alr", "full", "--conditions", "noisy", "noisy80")
    runs = {r.name: r for r in ablation_plan.plan_runs(args)}
    train_size = len(data.load_benchmark("synth-pedes-tiny", root=tmp_path / "data")["train"])
    for name, run in runs.items():
        rate = 0.8 if "noisy80" in name else 0.5
        permutation = save_permutation(run.folder / "noise_permutation.npy", generate_permutation(train_size, rate, 0))
        noisy = np.asarray(data.load_benchmark("synth-pedes-tiny", root=tmp_path / "data",
                                               noise_file=permutation)["train"]["noisy"])
        write_pair_run(run.folder, tmp_path / "data", seed=0)
        state = run.folder / "last" / "training_state"
        state.mkdir(parents=True)
        weights = torch.where(torch.from_numpy(noisy), torch.tensor(0.2), torch.tensor(0.95))
        save_state({"weights": weights, "keep": torch.ones(train_size, dtype=torch.bool)}, state / "alr_state.safetensors")
        records = [{"epoch": 0, "best_epoch": 0}, {"epoch": 1, "best_epoch": 1, "alr": alr_record(noisy)}]
        (run.folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    found = ablation_report.run_alr_weights(runs["full-noisy80-seed0"], tmp_path / "data")
    assert found is not None and found[1].mean() == pytest.approx(0.8, abs=0.02)
    assert np.all(found[0][found[1]] == np.float32(0.2))
    report = ablation_report.write_report(list(runs.values()), args, failed=[]).read_text()
    assert "### 50% noisy correspondence" in report and "### 80% noisy correspondence" in report
    for name, run in runs.items():  # the detection and weights of each run's current-format ALR record
        alr = json.loads((run.folder / "metrics.jsonl").read_text().splitlines()[1])["alr"]
        detection, quantiles, auc = alr["noise_detection"], alr["weight_quantiles"], alr["separation_auc"]
        row = (f"| 1 | {detection['precision']:.1f} (1 seed) | {detection['recall']:.1f} (1 seed) | "
               f"{detection['f1']:.1f} (1 seed) | {auc['loss']:.3f} (1 seed) | {auc['fused_similarity']:.3f} "
               f"(1 seed) | {auc['global_similarity']:.3f} (1 seed) | {alr['mean_weight_noisy']:.3f} (1 seed) | "
               f"{quantiles['noisy'][1]:.3f} (1 seed) | {quantiles['noisy'][3]:.3f} (1 seed) | "
               f"{alr['mean_weight_clean']:.3f} (1 seed) | {alr['mu']:.3f} (1 seed) | 0 of 2 | 1 |")
        assert row in report, row
    assert "alr_weight_distributions.png" in report
    assert (tmp_path / "docs" / "alr_weight_distributions.png").stat().st_size > 0
    assert (tmp_path / "docs" / "alr_detection.png").stat().st_size > 0


def test_diagnosis_scores_with_the_trainers_alr_pass_and_draws_the_losses(tmp_path):
    import numpy as np
    from trpr import data
    from trpr import modeling
    from accelerate import Accelerator
    from trpr.data.tokenizer import get_tokenizer
    from trpr.engine import AlrPass
    from trpr.modeling.losses import TrainingLoss

    run = tmp_path / "runs" / "full-noisy-seed0"
    pair = write_pair_run(run, tmp_path / "data", seed=0)
    result = alr_analysis.separability(run, 0.5, tmp_path / "docs")
    assert result["alr_epoch"] == 1  # the fake run's best epoch is 0: the pass before epoch 1
    # the same losses as the trainer's pass on that training set and epoch
    config = yaml_config(run)
    train = data.load_benchmark("synth-pedes-tiny", root=tmp_path / "data", noise_rate=0.5, seed=0)["train"]
    truth = np.asarray(train["noisy"])
    with torch.no_grad():
        losses, sims = AlrPass(train, get_tokenizer(), config, Accelerator(cpu=True)).sample_statistics(
            modeling.ReciprocalPair.from_pretrained(run / "best").eval().models,
            TrainingLoss.from_config(config["loss"]).alr_term, 1)
    from sklearn.metrics import roc_auc_score
    for m, name in enumerate(("A", "B")):
        assert result[name]["auc_loss"] == pytest.approx(roc_auc_score(truth, losses[m].numpy()))
        assert result[name]["cos_noisy"] == pytest.approx(float(sims[m][torch.from_numpy(truth)].mean()), abs=1e-6)
        assert 0.0 <= result[name]["auc_global_similarity"] <= 1.0
        assert -1.0 <= result[name]["cos_other_identity"] <= 1.0
        assert 0.0 <= result[name]["gmm_f1"] <= 100.0
    assert (tmp_path / "docs" / "alr_losses_full-noisy-seed0.png").stat().st_size > 0
    table = ablation_tables.write_separability([result], tmp_path / "docs").read_text()
    assert "engine.AlrPass" in table and table.count("| full-noisy-seed0 (0.0) |") == 2


def yaml_config(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def test_selection_rule_section_reads_each_rules_epoch_of_the_reported_row(tmp_path):
    """Deviation 7: the GE+FS row's test R@1 at the epoch of its own best val R@1 (fixed), of the best val
    max(GE, FS) (reference; the first on ties) and at the last epoch; the pair variant reads A+B rows only;
    the baseline (no GE+FS row) and the ensemble control are left out."""
    args = proxy_args(tmp_path, "--seeds", "0", "1", "--variants", "baseline", "fused", "alr_hard", "full_hard",
                      "ensemble_hard", "--conditions", "noisy")
    runs_dir = tmp_path / "runs"
    for seed, shift in ((0, 0.0), (1, 2.0)):
        # val GE+FS best at epoch 1; val max(GE, FS) best at epoch 2 (GE 50); test GE+FS 10 / 20 / 30 (+ shift)
        fake_run(runs_dir / f"fused-noisy-seed{seed}", {"A/GE+FS": 1.0}, epochs=[
            ({"A/GE": 5.0, "A/FS": 5.0, "A/GE+FS": 5.0}, {"A/GE+FS": 10.0 + shift}),
            ({"A/GE": 10.0, "A/FS": 30.0, "A/GE+FS": 40.0}, {"A/GE+FS": 20.0 + shift}),
            ({"A/GE": 50.0, "A/FS": 20.0, "A/GE+FS": 35.0}, {"A/GE+FS": 30.0 + shift})])
        # the pair: A's rows would pick epoch 0 under both rules; A+B's pick epoch 1 (fixed) and 0 (max, a tie
        # of 30 broken towards the first epoch)
        fake_run(runs_dir / f"full_hard-noisy-seed{seed}", {"A+B/FS": 1.0}, epochs=[
            ({"A/GE+FS": 99.0, "A/GE": 99.0, "A+B/GE": 30.0, "A+B/FS": 1.0, "A+B/GE+FS": 1.0},
             {"A+B/GE+FS": 7.0, "A/GE+FS": 0.0}),
            ({"A/GE+FS": 1.0, "A+B/GE": 2.0, "A+B/FS": 30.0, "A+B/GE+FS": 60.0}, {"A+B/GE+FS": 8.0, "A/GE+FS": 0.0})])
    fake_run(runs_dir / "baseline-noisy-seed0", {"A/GE": 3.0})
    report = ablation_report.write_report(ablation_plan.plan_runs(args), args, failed=[]).read_text()
    section = report.split("## Which epoch to keep")[1].split("## Ensemble")[0]
    fused = report_line(section, "| fused | A/GE+FS |")
    # fixed 20 / 22, max(GE, FS) 30 / 32, last 30 / 32: fixed − max = -10 in both seeds -> hurts
    assert "| 21.00 ± 1.41 | 31.00 ± 1.41 | 31.00 ± 1.41 | 1,1 / 2,2 / 2,2 | 0: -10.00, 1: -10.00 |" in fused
    assert fused.endswith("| hurts |")
    pair = report_line(section, "| full_hard | A+B/GE+FS |")
    assert "| 8.00 ± 0.00 | 7.00 ± 0.00 | 8.00 ± 0.00 | 1,1 / 0,0 / 1,1 | 0: +1.00, 1: +1.00 |" in pair
    assert "| baseline |" not in section and "| ensemble_hard |" not in section
    saved = json.loads((tmp_path / "docs" / "ablation.json").read_text())["selection_rules"]
    assert saved["effect"]["fused"]["noisy"]["epochs"]["reference"] == [2, 2]


def test_a_run_recorded_before_an_option_was_pinned_is_reused_only_with_that_value(tmp_path, monkeypatch):
    """PINNED options appear in every planned command (unless the variant sets them); a run folder whose
    recorded command lacks them is the same run when its config.yaml holds the pinned values."""
    args = args_for(tmp_path, "--seeds", "0", "--variants", "fused", "fused_all", "--conditions", "clean")
    fused, fused_all = ablation_plan.plan_runs(args)
    options = dict(zip(fused.command, fused.command[1:]))
    assert options["--model.image_tokens"] == "topk"
    assert fused_all.command.count("--model.image_tokens") == 1  # the variant's own value, not the pin
    assert dict(zip(fused_all.command, fused_all.command[1:]))["--model.image_tokens"] == "all"
    at = fused.command.index("--model.image_tokens")
    old_command = fused.command[:at] + fused.command[at + 2:]
    fake_run(fused.folder, {"A/FS": 10.0})
    fused.command_file.write_text(" ".join(old_command) + "\n")
    (fused.folder / "config.yaml").write_text("model:\n  image_tokens: topk\n")
    assert ablation_plan.plan_runs(args)[0].finished  # recorded before the pin, trained with topk: reused
    (fused.folder / "config.yaml").write_text("model:\n  image_tokens: all\n")
    with pytest.raises(SystemExit, match="another command"):  # trained with another value: not this run
        ablation_plan.plan_runs(args)
    (fused.folder / "config.yaml").unlink()
    with pytest.raises(SystemExit, match="another command"):  # nothing says what it was trained with
        ablation_plan.plan_runs(args)
