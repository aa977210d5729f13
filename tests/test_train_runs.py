"""Whole training runs on synth-pedes-tiny (tiny CLIP, 32x16 images, 3 steps/epoch, 2 epochs with ALR):
kill-and-resume, a checkpoint interrupted mid-write, 2 processes == 1 process, early errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import configs
import engine
import kernels
import train_3rtpr
from engine import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_BACKBONE = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, projection_dim: 32}"


def tiny_args(data_root: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "synth-pedes.yaml"), "--data.dataset", "synth-pedes-tiny",
            "--data.root", str(data_root), "--train.epochs", "2", "--train.batch_size", "48",
            "--data.image_size", "[32, 16]", "--model.fused_dim", "64", "--model.backbone", TINY_BACKBONE,
            "--logging.trackers", "[]", "--alr.drop_noisy", "true",
            "--loss.lambda_sdm", "1.0", "--loss.lambda_trl", "1.0",  # both loss terms, both gathered paths
            # the paper's Adam eps: with 1e-8, parameters whose true gradient is 0 (the key biases: softmax
            # ignores a per-row constant) take full-size steps on rounding noise, which differs by process
            "--optim.eps", "1e-3"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="module")
def reference_run(data_root, tmp_path_factory):
    """An uninterrupted 2-epoch run (one process, in this process)."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir), "--final-test"])
    return run_dir


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load_weights(run_dir: Path, checkpoint: str = "last") -> dict:
    return {f"{member}.{name}": tensor for member in ("model_a", "model_b")
            for name, tensor in load_file(str(run_dir / checkpoint / member / "model.safetensors")).items()}


def test_reference_run_writes_the_run_folder(reference_run):
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "alr_weights.png", "best/pair.json",
                 "last/pair.json", "last/training_state/optimizer_a.pt", "last/training_state/rng_0.pt"):
        assert (reference_run / name).is_file(), name
    assert not list(reference_run.glob("alr_weights_epoch*.png"))  # one ALR figure, rewritten every epoch
    assert not list(reference_run.glob(".*.tmp")) and not list(reference_run.glob(".*.old"))
    records = read_records(reference_run)
    assert [r["epoch"] for r in records] == [0, 1]
    assert "alr" not in records[0] and records[1]["alr"]["kept_fraction"] <= 1.0
    assert set(records[1]["val"]) >= {"A/GE", "B/FS", "A+B/GE+FS"}
    test_metrics = json.loads((reference_run / "test_metrics.json").read_text())
    assert test_metrics["checkpoint"] == "best" and 0.0 <= test_metrics["A+B/GE+FS"]["R1"] <= 100.0
    saved = configs.load_config(reference_run / "config.yaml")
    assert saved["train"]["epochs"] == 2 and saved["data"]["dataset"] == "synth-pedes-tiny"


def test_interrupted_mid_write_then_resumed_equals_uninterrupted(reference_run, data_root, tmp_path, monkeypatch):
    """The process dies while writing epoch 1's last/ (after epoch 0's finished): the half-written folder
    is never used, --resume restarts epoch 1 from epoch 0's state and ends where the reference ends."""
    run_dir = tmp_path / "interrupted"
    real_rng_state = checkpoint.rng_state
    calls = []

    def dying_rng_state():
        calls.append(1)
        if len(calls) == 2:  # second checkpoint = end of epoch 1: pair and optimizers already in .last.tmp
            raise KeyboardInterrupt("killed while writing last/")
        return real_rng_state()

    monkeypatch.setattr(checkpoint, "rng_state", dying_rng_state)
    with pytest.raises(KeyboardInterrupt):
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir)])
    monkeypatch.setattr(checkpoint, "rng_state", real_rng_state)
    assert (run_dir / ".last.tmp" / "model_a" / "model.safetensors").is_file()  # the half-written copy
    state = json.loads((run_dir / "last" / "training_state" / "trainer_state.json").read_text())
    assert state["epoch"] == 0
    assert [r["epoch"] for r in read_records(run_dir)] == [0]

    train_3rtpr.main(["--resume", str(run_dir)])
    reference, resumed = load_weights(reference_run), load_weights(run_dir)
    assert reference.keys() == resumed.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6, msg=name)
    for member in "ab":
        saved = [torch.load(run / "last" / "training_state" / f"optimizer_{member}.pt") for run in (reference_run, run_dir)]
        for key in saved[0]["state"]:
            torch.testing.assert_close(saved[1]["state"][key]["exp_avg_sq"], saved[0]["state"][key]["exp_avg_sq"])
    alr = [torch.load(run / "last" / "training_state" / "alr_state.pt") for run in (reference_run, run_dir)]
    assert torch.equal(alr[0]["keep"], alr[1]["keep"])
    torch.testing.assert_close(alr[1]["weights"], alr[0]["weights"])
    for mine, theirs in zip(read_records(run_dir), read_records(reference_run)):
        assert mine["loss_a"] == pytest.approx(theirs["loss_a"], rel=1e-6)
        assert mine["loss_b"] == pytest.approx(theirs["loss_b"], rel=1e-6)
        assert mine.get("alr", {}).get("mu") == pytest.approx(theirs.get("alr", {}).get("mu"))
    assert not (run_dir / ".last.tmp").exists()


def test_atomic_write_keeps_the_old_folder_on_failure(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    final = tmp_path / "last"
    engine.write_folder_atomically(final, lambda folder: (folder / "weights").write_text("epoch 0"), accelerator)

    def failing_write(folder):
        (folder / "weights").write_text("epoch 1, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        engine.write_folder_atomically(final, failing_write, accelerator)
    assert (final / "weights").read_text() == "epoch 0"
    # a crash between the two renames leaves only the previous copy: it is moved back
    final.rename(tmp_path / ".last.old")
    assert engine.recover_checkpoint(final) == final
    assert (final / "weights").read_text() == "epoch 0"
    engine.write_folder_atomically(final, lambda folder: (folder / "weights").write_text("epoch 1"), accelerator)
    assert (final / "weights").read_text() == "epoch 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_two_processes_match_one_process(reference_run, data_root, tmp_path):
    """ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 (gloo): same per-epoch losses,
    ALR pass (each process encodes a share; one mixture fit, on the main process), ALR weights,
    validation metrics and final weights as one process on the same global batches."""
    run_dir = tmp_path / "two_processes"
    environment = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), str(ROOT / "train_3rtpr.py"), *tiny_args(data_root), "--output-dir", str(run_dir)]
    finished = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "on 2 process(es)" in finished.stdout + finished.stderr
    for mine, theirs in zip(read_records(run_dir), read_records(reference_run), strict=True):
        assert mine["loss_a"] == pytest.approx(theirs["loss_a"], rel=1e-5)
        assert mine["loss_b"] == pytest.approx(theirs["loss_b"], rel=1e-5)
        assert ("alr" in mine) == ("alr" in theirs)
        if "alr" in theirs:  # the same ALR round: consensus, threshold, mixtures, weight distribution
            assert mine["alr"]["consensus_counts"] == theirs["alr"]["consensus_counts"]
            assert mine["alr"]["kept_fraction"] == theirs["alr"]["kept_fraction"]
            assert mine["alr"]["mu"] == pytest.approx(theirs["alr"]["mu"], rel=1e-5, abs=1e-6)
            for model, fit in theirs["alr"]["mixture"].items():
                assert mine["alr"]["mixture"][model]["status"] == fit["status"]
                assert mine["alr"]["mixture"][model]["means"] == pytest.approx(fit["means"], rel=1e-4, abs=1e-5)
            assert mine["alr"]["weight_quantiles"]["all"] == pytest.approx(theirs["alr"]["weight_quantiles"]["all"],
                                                                           rel=1e-5, abs=1e-6)
        for row, metrics in theirs["val"].items():  # 48 queries: fp32 noise may flip one near-tie
            assert mine["val"][row]["R1"] == pytest.approx(metrics["R1"], abs=100 / 48 + 1e-6)
            assert mine["val"][row]["mAP"] == pytest.approx(metrics["mAP"], abs=1.0)
    alr = [torch.load(run / "last" / "training_state" / "alr_state.pt") for run in (reference_run, run_dir)]
    assert torch.equal(alr[0]["keep"], alr[1]["keep"])
    torch.testing.assert_close(alr[1]["weights"], alr[0]["weights"], rtol=1e-5, atol=1e-5)
    reference, distributed = load_weights(reference_run), load_weights(run_dir)
    for name in reference:
        torch.testing.assert_close(distributed[name], reference[name], rtol=1e-4, atol=1e-4, msg=name)


def test_non_finite_loss_writes_no_checkpoint(data_root, tmp_path, monkeypatch):
    run_dir = tmp_path / "diverged"
    diverging = lambda t, i, *a, **k: (t.sum(-1) + i.sum(-1)) * float("inf")  # noqa: E731
    monkeypatch.setattr(kernels, "sdm_loss", diverging)
    monkeypatch.setattr(kernels, "trl_loss", diverging)
    with pytest.raises(engine.TrainingDiverged, match=r"model A at epoch 0, step 0"):
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir)])
    assert not (run_dir / "last").exists() and not (run_dir / "best").exists()


@pytest.mark.parametrize("extra, message", [
    (["--train.epoch", "3"], "unknown key 'train.epoch'"),
    (["--train.epochs", "three"], "train.epochs must be int"),
    (["--model.backbone", "{hidden_sise: 8}"], "model.backbone mapping"),
])
def test_bad_config_fails_before_training(data_root, tmp_path, extra, message):
    with pytest.raises(configs.ConfigError, match=message):
        train_3rtpr.main(tiny_args(data_root) + extra + ["--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_missing_dataset_and_split_name_the_problem(data_root, tmp_path):
    with pytest.raises(SystemExit, match=r"data.dataset='cuhk-pedes'.*"):
        train_3rtpr.main(tiny_args(data_root) + ["--data.dataset", "cuhk-pedes", "--data.root", str(tmp_path),
                                                 "--output-dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="eval.split='train'"):
        train_3rtpr.main(tiny_args(data_root) + ["--eval.split", "train", "--output-dir", str(tmp_path / "run2")])


def test_existing_run_needs_resume(reference_run, data_root):
    with pytest.raises(configs.ConfigError, match="already holds a run"):
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(reference_run)])
