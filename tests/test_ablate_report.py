"""The ablation sweep (trpr.experiments.ablation_*, scripts/ablate.py) without training: the run plan, the trainer command lines and the report built from
hand-written run folders (test_metrics.json + metrics.jsonl in the trainer's format)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from trpr import configs
from trpr.engine.state_files import save_state
from trpr.experiments import ablation_plan, ablation_report, ablation_sweep, alr_analysis, proxy_pretrain
from trpr.reporting import ablation as ablation_tables

REPO = Path(__file__).resolve().parents[1]


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


def fake_run(folder: Path, r1: dict, detection=None):
    """Writes the two files the report reads, in the trainer's format."""
    folder.mkdir(parents=True, exist_ok=True)
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
    report = ablation_report.write_report(ablation_plan.plan_runs(args), args, failed=[]).read_text()
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
    assert f"{test['A/FS']['R1']:.2f} (1 seed)" in row
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "1 of 1 runs already finished, 0 to train" in second.stdout


# ============================================================================ proxy mode (issue 12)
def proxy_args(tmp_path, *extra):
    return ablation_sweep.parse_args(["--proxy", "--backbone", str(tmp_path / "proxy"), "--runs-dir", str(tmp_path / "runs"),
                              "--docs-dir", str(tmp_path / "docs"), *extra])


def test_proxy_plan_recipes_backbone_variants_and_the_ensemble_control(tmp_path):
    args = proxy_args(tmp_path, "--seeds", "0", "1")
    runs = ablation_plan.plan_runs(args)
    assert len(runs) == 2 * 3 * 6  # seeds x (clean, 50 %, 80 %) x variants
    by_name = {r.name: r for r in runs}
    options = {name: dict(zip(run.command, run.command[1:])) for name, run in by_name.items()}
    assert options["baseline-clean-seed0"]["--config"] == "proxy-clean"
    assert options["baseline-noisy-seed0"]["--config"] == "proxy-noisy"
    assert options["full-noisy80-seed1"]["--data.noise_rate"] == "0.8"
    assert all(o["--model.backbone"] == str(tmp_path / "proxy") for o in options.values())
    assert options["fused_all-clean-seed0"]["--model.image_tokens"] == "all"
    assert "--model.image_tokens" not in options["fused-clean-seed0"]
    # the control: a second + ALR run, another seed, the partner's noisy training set
    control, partner = by_name["ensemble-noisy-seed1"], by_name["alr-noisy-seed1"]
    assert control.partner is partner and partner.partner is None
    control_options, partner_options = options["ensemble-noisy-seed1"], options["alr-noisy-seed1"]
    assert control_options["--seed"] == "1001" and partner_options["--seed"] == "1"
    assert control_options["--data.noise_rate"] == "0.0"
    assert control_options["--data.noise_file"] == str(ablation_plan.noise_file_for("noisy", 1, args))
    assert control_options["--alr.models"] == "1" and control_options["--eval.select_row"] == "A/FS"
    assert "--data.noise_file" not in options["ensemble-clean-seed1"]
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
    row = next(line for line in report.splitlines() if line.startswith("| control"))
    assert f"{saved['A+B/FS']['R1']:.2f} (1 seed)" in row and "A+A'" in row


def alr_record(noisy) -> dict:
    """An epoch's ALR record as the trainer writes it (engine.alr_report of a real mixture fit): noisy pairs
    have higher losses and lower similarities than clean ones, with some overlap."""
    from trpr.engine import alr_report
    from trpr.modeling.alr import compute_alr

    flags = torch.as_tensor(noisy, dtype=torch.bool)
    generator = torch.Generator().manual_seed(int(flags.sum()))
    losses = [flags.float() + 0.6 * torch.rand(len(flags), generator=generator) for _ in range(2)]
    sims = 0.5 - 0.3 * flags.float() + 0.1 * torch.rand(len(flags), generator=generator)
    return alr_report(compute_alr(losses[0], losses[1], sims), sims, flags)


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
        detection, quantiles = alr["noise_detection"], alr["weight_quantiles"]
        row = (f"| 1 | {detection['precision']:.1f} (1 seed) | {detection['recall']:.1f} (1 seed) | "
               f"{detection['f1']:.1f} (1 seed) | {alr['mean_weight_noisy']:.3f} (1 seed) | "
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
