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

from trpr import configs
from trpr import engine
from trpr import kernels
from trpr import modeling
import train_3rtpr
from trpr.runtime.run_folder import recover_interrupted_swap
from trpr.engine import checkpoint
from trpr.engine.state_files import load_state

ROOT = Path(__file__).resolve().parents[1]
TINY_BACKBONE = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, projection_dim: 32}"


def optim_of(config: dict) -> tuple:
    """(optim section, train.epochs): what engine.build_optimizer(s) takes from a config."""
    settings = configs.RunConfig.from_dict(config)
    return settings.optim, settings.train.epochs


def tiny_args(data_root: Path) -> list[str]:
    return ["--config", str(ROOT / "trpr" / "configs" / "synth-pedes.yaml"), "--data.dataset", "synth-pedes-tiny",
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
    """An uninterrupted 2-epoch run (one process, in this process), recording the test rows of every epoch
    too (eval.record_test: analysis only, it must change nothing else the other tests compare)."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir), "--final-test", "--eval.record_test", "true"])
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
                 "last/pair.json", "last/training_state/optimizer_a.safetensors",
                 "last/training_state/rng_0.safetensors"):
        assert (reference_run / name).is_file(), name
    assert not list(reference_run.glob("alr_weights_epoch*.png"))  # one ALR figure, rewritten every epoch
    assert not list(reference_run.glob(".*.tmp")) and not list(reference_run.glob(".*.old"))
    records = read_records(reference_run)
    assert [r["epoch"] for r in records] == [0, 1]
    assert "alr" not in records[0] and records[1]["alr"]["kept_fraction"] <= 1.0
    assert set(records[1]["val"]) >= {"A/GE", "B/FS", "A+B/GE+FS"}
    for record in records:  # per-phase timing (engine.timing), the checkpoint's background write included
        timing = record["time"]
        assert set(timing) >= {"alr_s", "train_s", "data_wait_s", "compute_s", "validation_s", "checkpoint_s",
                               "checkpoint_write_s", "epoch_s", "steps_samples_per_s", "epoch_samples_per_s"}
        assert 0 < timing["compute_s"] <= timing["train_s"] <= timing["epoch_s"] and timing["samples"] == 3 * 48
        assert timing["steps_samples_per_s"] > timing["epoch_samples_per_s"] > 0
    assert records[0]["time"]["alr_s"] == 0 < records[1]["time"]["alr_s"]
    test_metrics = json.loads((reference_run / "test_metrics.json").read_text())
    assert test_metrics["checkpoint"] == "best" and 0.0 <= test_metrics["A+B/GE+FS"]["R1"] <= 100.0
    saved = configs.load_config(reference_run / "config.yaml")
    assert saved["train"]["epochs"] == 2 and saved["data"]["dataset"] == "synth-pedes-tiny"


def test_reference_views_run_records_an_alr_report(data_root, tmp_path):
    """alr.views reference (the ALR pass scores each sample's training-augmented views, each model on the
    other's view): a 2-epoch run finishes, records epoch 1's ALR report and keeps the option in config.yaml."""
    run_dir = tmp_path / "views"
    train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir), "--alr.views", "reference"])
    records = read_records(run_dir)
    assert [r["epoch"] for r in records] == [0, 1] and "alr" not in records[0]
    alr = records[1]["alr"]
    assert 0.0 < alr["kept_fraction"] <= 1.0 and set(alr["mixture"]) == {"A", "B"} and "mu" in alr
    assert records[1]["time"]["alr_s"] > 0 and (run_dir / "alr_weights.png").is_file()
    assert configs.load_config(run_dir / "config.yaml")["alr"]["views"] == "reference"


def test_record_test_writes_the_test_rows_of_every_validated_epoch(reference_run):
    """eval.record_test: each validated epoch's record has "test" with every row of "val"; best/'s final
    test (test_metrics.json) is the test record of the best epoch (same weights, same evaluation)."""
    records = read_records(reference_run)
    assert [("val" in r, "test" in r) for r in records] == [(True, True), (True, True)]
    for record in records:
        assert set(record["test"]) == set(record["val"]) >= {"A/GE", "A/FS", "A+B/GE+FS"}
        assert all(0.0 <= row["R1"] <= 100.0 for row in record["test"].values())
    final = json.loads((reference_run / "test_metrics.json").read_text())
    best = records[-1]["best_epoch"]
    for row, metrics in records[best]["test"].items():
        assert final[row]["R1"] == pytest.approx(metrics["R1"], abs=1e-6), row
        assert final[row]["mAP"] == pytest.approx(metrics["mAP"], abs=1e-4), row
    config = configs.load_config(reference_run / "config.yaml")
    assert config["eval"]["record_test"] is True and config["eval"]["split"] != "test"


def test_interrupted_mid_write_then_resumed_equals_uninterrupted(reference_run, data_root, tmp_path, monkeypatch):
    """The process dies while the background writer writes epoch 1's last/ (after epoch 0's finished): the
    half-written folder is never used, --resume restarts epoch 1 from epoch 0's state and ends where the
    reference ends."""
    run_dir = tmp_path / "interrupted"
    real_save_rng_states = checkpoint.save_rng_states
    calls = []

    def dying_save_rng_states(state_dir, states):
        calls.append(1)
        if len(calls) == 2:  # second checkpoint = end of epoch 1: pair and optimizers already in .last.tmp
            raise KeyboardInterrupt("killed while writing last/")
        return real_save_rng_states(state_dir, states)

    monkeypatch.setattr(checkpoint, "save_rng_states", dying_save_rng_states)
    with pytest.raises(KeyboardInterrupt):
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir)])
    monkeypatch.setattr(checkpoint, "save_rng_states", real_save_rng_states)
    assert (run_dir / ".last.tmp" / "model_a" / "model.safetensors").is_file()  # the half-written copy
    state = json.loads((run_dir / "last" / "training_state" / "trainer_state.json").read_text())
    assert state["epoch"] == 0
    assert [r["epoch"] for r in read_records(run_dir)] == [0]  # epoch 1's record waits for its checkpoint

    train_3rtpr.main(["--resume", str(run_dir)])
    reference, resumed = load_weights(reference_run), load_weights(run_dir)
    assert reference.keys() == resumed.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6, msg=name)
    for member in "ab":
        saved = [load_state(run / "last" / "training_state" / f"optimizer_{member}.safetensors") for run in (reference_run, run_dir)]
        for key in saved[0]["state"]:
            torch.testing.assert_close(saved[1]["state"][key]["exp_avg_sq"], saved[0]["state"][key]["exp_avg_sq"])
    alr = [load_state(run / "last" / "training_state" / "alr_state.safetensors") for run in (reference_run, run_dir)]
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
    engine.checkpoint.write_folder_atomically(final, lambda folder: (folder / "weights").write_text("epoch 0"), accelerator)

    def failing_write(folder):
        (folder / "weights").write_text("epoch 1, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        engine.checkpoint.write_folder_atomically(final, failing_write, accelerator)
    assert (final / "weights").read_text() == "epoch 0"
    # a crash between the two renames leaves only the previous copy: it is moved back
    final.rename(tmp_path / ".last.old")
    assert recover_interrupted_swap(final) == final
    assert (final / "weights").read_text() == "epoch 0"
    engine.checkpoint.write_folder_atomically(final, lambda folder: (folder / "weights").write_text("epoch 1"), accelerator)
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
    alr = [load_state(run / "last" / "training_state" / "alr_state.safetensors") for run in (reference_run, run_dir)]
    assert torch.equal(alr[0]["keep"], alr[1]["keep"])
    torch.testing.assert_close(alr[1]["weights"], alr[0]["weights"], rtol=1e-5, atol=1e-5)
    reference, distributed = load_weights(reference_run), load_weights(run_dir)
    for name in reference:
        torch.testing.assert_close(distributed[name], reference[name], rtol=1e-4, atol=1e-4, msg=name)


def test_non_finite_loss_writes_no_checkpoint(data_root, tmp_path, monkeypatch):
    """Epoch 0 finishes and is saved; a non-finite loss in epoch 1 stops the run at its end (the next
    check) before any checkpoint or record of epoch 1: last/ and metrics.jsonl still hold epoch 0."""
    run_dir = tmp_path / "diverged"
    real_sdm, real_trl, calls = kernels.sdm_loss, kernels.trl_loss, []

    def diverging(real):
        def loss(t, i, *args, **kwargs):
            calls.append(1)
            out = real(t, i, *args, **kwargs)
            return out * float("inf") if len(calls) > 2 * 2 * 3 else out  # 2 terms x 2 models x 3 steps: epoch 1
        return loss

    monkeypatch.setattr(kernels, "sdm_loss", diverging(real_sdm))
    monkeypatch.setattr(kernels, "trl_loss", diverging(real_trl))
    with pytest.raises(engine.TrainingDiverged, match=r"model A at epoch 1, step 0 \(global step 3\)"):
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir), "--alr.enabled", "false"])
    state = json.loads((run_dir / "last" / "training_state" / "trainer_state.json").read_text())
    assert state["epoch"] == 0 and [r["epoch"] for r in read_records(run_dir)] == [0]
    assert not list(run_dir.glob(".*.tmp"))


def test_loader_batches_do_not_depend_on_workers(data_root):
    """The trainer's loader (uint8 views, EpochKeyedBatches): 0 workers and 2 persistent workers give the
    same batches in every epoch, new ones each epoch; the workers survive from one epoch to the next."""
    from trpr import data
    from trpr.data.tokenizer import get_tokenizer

    config = configs.load_config(None, tiny_args(data_root)[2:])
    train = data.load_benchmark("synth-pedes-tiny", root=data_root)["train"]

    def epochs(workers):
        loader = engine.build_train_loader(train, get_tokenizer(), {**config, "data": {**config["data"],
                                           "num_workers": workers}}, rank=0, world_size=1)
        batches = [list(engine.start_epoch(loader, epoch)) for epoch in range(2)]
        return loader, batches

    _, serial = epochs(0)
    loader, parallel = epochs(2)
    assert loader.persistent_workers and loader._iterator is not None
    workers = [process.pid for process in loader._iterator._workers]
    list(engine.start_epoch(loader, 2))
    assert [process.pid for process in loader._iterator._workers] == workers
    assert serial[0][0]["pixel_values"].dtype == torch.uint8 and "erase_boxes" in serial[0][0]
    for epoch_serial, epoch_parallel in zip(serial, parallel):
        assert len(epoch_serial) == len(epoch_parallel) == 3
        for one, other in zip(epoch_serial, epoch_parallel):
            assert one.keys() == other.keys() and all(torch.equal(one[key], other[key]) for key in one)
    assert not torch.equal(serial[0][0]["index"], serial[1][0]["index"])
    first = {int(i): n for n, i in enumerate(serial[0][0]["index"])}
    again = [(first[int(i)], n) for n, i in enumerate(serial[1][0]["index"]) if int(i) in first]
    assert again and all(not torch.equal(serial[0][0]["pixel_values"][a], serial[1][0]["pixel_values"][b])
                         for a, b in again)  # the same sample is augmented anew in another epoch


def test_background_checkpoint_equals_the_blocking_one(tmp_path):
    """CheckpointWriter (snapshot, then a background write) writes the same last/ and best/ as a blocking
    write (background=False) at the moment of the snapshot, though training goes on while it writes."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    config = configs.load_config(None, ["--model.fused_dim", "64", "--data.image_size", "[32, 16]"])
    torch.manual_seed(0)
    pair = modeling.ReciprocalPair.from_clip(modeling.small_clip_config(hidden_size=32, intermediate_size=64,
                                                                        num_hidden_layers=1, num_attention_heads=2,
                                                                        projection_dim=32),
                                             fused_dim=64, image_size=(32, 16))
    optimizers, schedulers = engine.build_optimizers(list(pair.models), *optim_of(config), accelerator)

    def train_a_little():
        for model, optimizer in zip(pair.models, optimizers):
            for parameter in model.parameters():
                parameter.grad = torch.randn_like(parameter) if parameter.requires_grad else None
            optimizer.step()

    train_a_little()
    alr_state = engine.AlrState.initial(10, "cpu")
    state = engine.TrainerState(epoch=0, global_step=3, best_score=1.0, best_epoch=0)
    blocking = engine.CheckpointWriter(tmp_path / "blocking", pair, optimizers, schedulers, accelerator,
                                       background=False)
    blocking.snapshot(alr_state, state, improved=True)
    blocking.write()
    blocking.close()
    writer = engine.CheckpointWriter(tmp_path / "background", pair, optimizers, schedulers, accelerator)
    writer.snapshot(alr_state, state, improved=True)
    written = []
    writer.write(after=written.append)
    train_a_little()  # the next epoch's steps change the live state while the writer writes
    writer.wait()
    assert len(written) == 1 and written[0] > 0
    for folder in ("last/model_a", "last/model_b", "best/model_b"):
        blocking = load_file(str(tmp_path / "blocking" / folder / "model.safetensors"))
        background = load_file(str(tmp_path / "background" / folder / "model.safetensors"))
        assert blocking.keys() == background.keys()
        assert all(torch.equal(blocking[name], background[name]) for name in blocking)
    names = sorted(p.relative_to(tmp_path / "blocking").as_posix() for p in (tmp_path / "blocking").rglob("*"))
    assert names == sorted(p.relative_to(tmp_path / "background").as_posix()
                           for p in (tmp_path / "background").rglob("*"))
    for member in "ab":
        saved = [load_state(tmp_path / run / "last" / "training_state" / f"optimizer_{member}.safetensors")
                 for run in ("blocking", "background")]
        assert saved[0]["param_groups"] == saved[1]["param_groups"]
        for key, entry in saved[0]["state"].items():
            assert all(torch.equal(value, saved[1]["state"][key][name]) for name, value in entry.items())
    # a second epoch: the host buffers are reused, the writer waits for nothing
    writer.snapshot(alr_state, engine.TrainerState(epoch=1), improved=False)
    writer.write()
    writer.close()
    assert json.loads((tmp_path / "background" / "last" / "training_state" / "trainer_state.json").read_text())[
        "epoch"] == 1


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
