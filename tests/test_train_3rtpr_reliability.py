"""Run-folder safety and early, one-line errors of the trainer (issue 14): the folder lock (busy, stale,
main process only), --overwrite, nothing left behind by early failures, the epoch record across a kill
between the checkpoint swap and the metrics append (SIGKILL at a named point), a torn metrics line, disk
full during a checkpoint (fault injection), damaged or mismatched checkpoints on --resume, the checks
before any work (backbone offline, batch size, images) and --help."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trpr import configs
from trpr import engine
import train_3rtpr
from trpr.engine import checkpoint, metrics_log
from trpr.runtime.run_folder import RUN_LOCK_FILE, RunFolderBusy, RunLock, lock_holder
from tests.data.test_benchmarks import write_fixture
from tests.data.test_images import _broken_fixture
from tests.test_train_3rtpr import ROOT, data_root, read_records, tiny_args  # noqa: F401 (data_root: a fixture)


@pytest.fixture(scope="module")
def one_epoch_run(data_root, tmp_path_factory):
    """A finished 1-epoch run (best/ and last/ of epoch 0); tests work on copies."""
    run_dir = tmp_path_factory.mktemp("runs") / "one_epoch"
    train_3rtpr.main(tiny_args(data_root) + ["--train.epochs", "1", "--output-dir", str(run_dir)])
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def trainer_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "last" / "training_state" / "trainer_state.json").read_text())


def no_model_building(monkeypatch):
    """Fail the test if the trainer gets as far as building the models."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr(engine, "build_pair", forbidden)


# ------------------------------------------------------------------------------ 1. one owner per folder
def test_a_running_training_owns_its_folder(data_root, one_epoch_run, tmp_path, monkeypatch):
    no_model_building(monkeypatch)
    holder = RunLock(tmp_path / "busy")
    (tmp_path / "busy").mkdir()
    assert holder.acquire() is None
    assert lock_holder(tmp_path / "busy")["pid"] == os.getpid()
    with pytest.raises(RunFolderBusy, match=rf"run folder {tmp_path / 'busy'} is in use by pid {os.getpid()} on host"):
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(tmp_path / "busy")])
    holder.release()
    assert lock_holder(tmp_path / "busy") is None and not (tmp_path / "busy" / RUN_LOCK_FILE).exists()
    # --resume of a folder another training holds is refused the same way
    run_dir = copy_run(one_epoch_run, tmp_path)
    other = RunLock(run_dir)
    other.acquire()
    with pytest.raises(RunFolderBusy, match="is in use by pid"):
        train_3rtpr.main(["--resume", str(run_dir)])
    other.release()
    assert (run_dir / "last").is_dir() and (run_dir / "config.yaml").is_file()  # untouched


def test_new_run_into_a_used_folder_needs_overwrite(data_root, one_epoch_run, tmp_path, monkeypatch, capsys):
    run_dir = copy_run(one_epoch_run, tmp_path)
    before = sorted(p.name for p in run_dir.iterdir())
    with pytest.raises(configs.ConfigError, match=rf"--output-dir {run_dir} already holds a run \(.*last/.*\); "
                                                  rf"continue it with --resume {run_dir}, replace it with --overwrite"):
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir)])
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(configs.ConfigError, match="is not empty and is not a run folder \\(todo.txt\\)"):
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(foreign), "--overwrite"])
    assert (foreign / "todo.txt").read_text() == "mine"
    # --overwrite of a run whose new run fails before training: the previous run comes back intact
    no_model_building(monkeypatch)
    with pytest.raises(SystemExit, match="train.batch_size=4000 is larger than the training set"):
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir), "--overwrite", "--train.batch_size", "4000"])
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert trainer_state(run_dir)["epoch"] == 0
    with pytest.raises(configs.ConfigError, match="--overwrite would delete the run that --resume continues"):
        train_3rtpr.main(["--resume", str(run_dir), "--overwrite"])


def test_only_the_main_process_takes_the_lock(tmp_path):
    class OtherRank:  # what a non-main process of `accelerate launch` sees
        is_main_process, num_processes = False, 1

        def wait_for_everyone(self):
            pass

    with engine.RunFolder(tmp_path / "run", OtherRank()) as folder:
        folder.start({"seed": 0})
    assert not (tmp_path / "run").exists()  # neither created, locked nor written by a non-main process


def test_early_failures_leave_no_folder(data_root, tmp_path, monkeypatch):
    no_model_building(monkeypatch)
    with pytest.raises(SystemExit, match=r"train.batch_size=4000 is larger than the training set of "
                                         r"synth-pedes-tiny \(\d+ samples\): use --train.batch_size \d+ or less"):
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(tmp_path / "new"), "--train.batch_size", "4000"])
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="eval.split='train'"):
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(tmp_path / "empty"), "--eval.split", "train",
                                                 "--data.noise_rate", "0.5"])
    assert list((tmp_path / "empty").iterdir()) == []  # the noise permutation written meanwhile is gone too


# --------------------------------------------------------- 1 + 2. kill -9 between the swap and the append
def test_kill_between_checkpoint_swap_and_metrics_append(data_root, tmp_path, capsys):
    """SIGKILL right after epoch 0's last/ swap: the stale lock is taken over, the epoch record saved with
    last/ goes back into metrics.jsonl, and training goes on."""
    run_dir = tmp_path / "killed"
    environment = dict(os.environ, TRPR_KILL_AT="last:swapped", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    finished = subprocess.run([sys.executable, str(ROOT / "train_3rtpr.py"), *tiny_args(data_root),
                               "--output-dir", str(run_dir)], cwd=ROOT, env=environment, capture_output=True,
                              text=True, timeout=600)
    assert finished.returncode == -9, finished.stderr[-3000:]
    # 12: stderr is not a terminal, so the bars are drawn when they start and end, not at every step
    assert 1 <= finished.stderr.count("epoch 0/1") <= 2, finished.stderr[-3000:]
    lock = json.loads((run_dir / RUN_LOCK_FILE).read_text())
    assert lock["pid"] != os.getpid() and lock_holder(run_dir) is None  # left behind, but stale
    saved_record = trainer_state(run_dir)["epoch_record"]
    assert saved_record["epoch"] == 0 and "loss_a" in saved_record and "val" in saved_record
    assert not (run_dir / "metrics.jsonl").exists()  # the append never happened
    capsys.readouterr()
    with pytest.raises(configs.ConfigError, match="already holds a run"):  # the stale lock does not block
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert f"was locked by pid {lock['pid']} on host {lock['host']}" in err and "no longer running" in err

    train_3rtpr.main(["--resume", str(run_dir)])
    assert "epoch 0's record restored from the checkpoint" in capsys.readouterr().out
    records = read_records(run_dir)
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0] == saved_record
    assert not (run_dir / RUN_LOCK_FILE).exists()


# ----------------------------------------------------------------------- 2. torn metrics line, resume
def test_torn_last_metrics_line_is_dropped_on_resume(one_epoch_run, tmp_path):
    run_dir = copy_run(one_epoch_run, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"epoch": 1, "loss_a": 0.5, "lo')  # died while appending epoch 1
    with pytest.warns(UserWarning, match=r"metrics.jsonl: line 2 is incomplete \(the run stopped while writing it\)"):
        train_3rtpr.main(["--resume", str(run_dir)])  # train.epochs 1: nothing left to train
    assert metrics.read_text() == good
    # a damaged line that is not the last one is an error naming the file and the line, not a JSONDecodeError
    metrics.write_text("{oops\n" + good)
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 1 is not an epoch record"):
        metrics_log.read_metrics(run_dir)


# ---------------------------------------------------------------------------------------- 3. disk full
def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_resume_works(one_epoch_run, tmp_path, monkeypatch):
    run_dir = copy_run(one_epoch_run, tmp_path)
    real_save = checkpoint.save_state  # the training-state files (engine.state_files)

    def disk_full_save(obj, path, *args, **kwargs):
        if ".last.tmp" in str(path):
            Path(path).write_bytes(b"\0" * 4096)  # a partial file, then the device is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_state", disk_full_save)
    with pytest.raises(engine.DiskFullError) as info:
        train_3rtpr.main(["--resume", str(run_dir), "--train.epochs", "2"])
    message = info.value.strerror
    assert message.startswith(f"no space left on {run_dir} while writing last/, ") and " GB needed (" in message
    assert "the previous last/ is kept" in message and "\n" not in message
    assert not (run_dir / ".last.tmp").exists()  # the partial copy does not keep the disk full
    assert trainer_state(run_dir)["epoch"] == 0 and not (run_dir / RUN_LOCK_FILE).exists()
    monkeypatch.setattr(checkpoint, "save_state", real_save)
    # the next --resume works, TensorBoard included
    train_3rtpr.main(["--resume", str(run_dir), "--train.epochs", "2", "--logging.trackers", "[tensorboard]"])
    assert trainer_state(run_dir)["epoch"] == 1 and [r["epoch"] for r in read_records(run_dir)] == [0, 1]
    assert list(run_dir.rglob("events.out.tfevents.*"))


def test_disk_full_seen_through_a_wrapped_error(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('... unexpected pos ...'): the free space decides."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    final = tmp_path / "last"
    engine.checkpoint.write_folder_atomically(final, lambda folder: (folder / "w").write_bytes(b"\1" * 1000), accelerator)

    def failing(folder):
        (folder / "w").write_bytes(b"\2" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(total=10, used=10, free=0))
    with pytest.raises(engine.DiskFullError, match=rf"no space left on {tmp_path} while writing last/") as info:
        engine.checkpoint.write_folder_atomically(final, failing, accelerator, needed_bytes=3 * 10 ** 9)
    assert "3.00 GB needed (0.00 GB free)" in info.value.strerror
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"] and (final / "w").read_bytes() == b"\1" * 1000
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: the error is not disguised
        engine.checkpoint.write_folder_atomically(final, failing, accelerator, needed_bytes=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_cli_prints_disk_full_as_one_line(monkeypatch, capsys):
    error = engine.DiskFullError(errno.ENOSPC, "no space left on /runs/x while writing last/, 1.20 GB needed")
    monkeypatch.setattr(train_3rtpr, "main", lambda: (_ for _ in ()).throw(error))
    with pytest.raises(SystemExit, match=r"^error: no space left on /runs/x while writing last/, 1.20 GB needed$"):
        train_3rtpr.cli()
    plain = OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
    monkeypatch.setattr(train_3rtpr, "main", lambda: (_ for _ in ()).throw(plain))
    with pytest.raises(SystemExit, match=r"^error: no space left on /runs/x/metrics.jsonl \(No space left on device\)"):
        train_3rtpr.cli()


# ----------------------------------------------------------------- 7. damaged / mismatched checkpoints
@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "last/model_a/model.safetensors").write_bytes(
        (run / "last/model_a/model.safetensors").read_bytes()[:5000]),
     r"last/model_a/model.safetensors: not a readable safetensors file"),
    (lambda run: (run / "last/model_b/model.safetensors").write_bytes(b"garbage" * 10),
     r"last/model_b/model.safetensors: not a readable safetensors file"),
    (lambda run: (run / "last/training_state/optimizer_b.safetensors").write_bytes(b"\0" * 100),
     r"last/training_state/optimizer_b.safetensors: not a training-state file of this format, or damaged"),
    (lambda run: (run / "last/training_state/alr_state.safetensors").unlink(),
     r"last/training_state/alr_state.safetensors: missing"),
])
def test_damaged_checkpoint_on_resume_is_one_line(one_epoch_run, tmp_path, damage, message):
    run_dir = copy_run(one_epoch_run, tmp_path)
    damage(run_dir)
    with pytest.raises(engine.CheckpointError, match=rf"^--resume {run_dir}: .*{message}") as info:
        train_3rtpr.main(["--resume", str(run_dir), "--train.epochs", "2"])
    assert "\n" not in str(info.value)


def test_resume_with_another_model_size_names_both_shapes(one_epoch_run, tmp_path):
    run_dir = copy_run(one_epoch_run, tmp_path)
    with pytest.raises(engine.CheckpointError,
                       match=r"last/model_a: image_head.token_fc1.weight is \[32, 32\] in the checkpoint but \[16, 32\] in "
                             r"the model the config builds .*resume with its config.yaml"):
        train_3rtpr.main(["--resume", str(run_dir), "--train.epochs", "2", "--model.fused_dim", "32"])
    assert trainer_state(run_dir)["epoch"] == 0


# ---------------------------------------------------------------------- 9. backbone, checked first
def test_offline_backbone_is_one_actionable_line_before_any_work(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    import socket

    from trpr import data

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(data, "load_benchmark", lambda *a, **k: pytest.fail("dataset built before the backbone check"))
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network used under HF_HUB_OFFLINE"))
    argv = ["--config", str(ROOT / "trpr" / "configs" / "cuhk-pedes.yaml"), "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        train_3rtpr.main(argv)
    message = str(info.value.code)
    assert message.startswith("error: config model.backbone='openai/clip-vit-base-patch16': ")
    assert "HF_HUB_OFFLINE is set" in message and "--model.backbone DIR" in message
    assert "CLIPModel.from_pretrained('openai/clip-vit-base-patch16').save_pretrained('DIR')" in message
    assert "\n" not in message and not (tmp_path / "run").exists()
    # not offline, no network: one TCP probe, no retries
    monkeypatch.setattr(hub_constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(ConnectionRefusedError(111, "refused")))
    with pytest.raises(SystemExit, match=r"http://127.0.0.1:9 cannot be reached .*--model.backbone DIR"):
        train_3rtpr.main(argv)
    # a local folder that is not a saved model
    (tmp_path / "clip").mkdir()
    with pytest.raises(SystemExit, match=r"folder .*clip lacks config.json, model.safetensors or pytorch_model.bin"):
        train_3rtpr.main(argv + ["--model.backbone", str(tmp_path / "clip")])


# ------------------------------------------------------------------- 5 + 6. images and data errors
def test_bad_images_stop_training_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    no_model_building(monkeypatch)
    monkeypatch.setenv("TRPR_CACHE", str(tmp_path / "cache"))
    folder = _broken_fixture(tmp_path)
    argv = tiny_args(tmp_path) + ["--data.dataset", "cuhk-pedes", "--data.root", str(tmp_path), "--train.batch_size", "4",
                                  "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        train_3rtpr.main(argv)
    message = str(info.value.code)
    assert message.startswith("error: config data.image_policy=error: cuhk-pedes/train: 2 unusable image(s), "
                              "4 of 12 rows (first: ")
    assert str(folder / "train") in message and "--data.image_policy skip" in message and "\n" not in message
    assert "9_1.png: image is 1x1 px" in capsys.readouterr().err  # the full list is printed before
    assert not (tmp_path / "run").exists()


def test_image_policy_skip_drops_bad_rows_and_their_queries(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from trpr import data

    monkeypatch.setenv("TRPR_CACHE", str(tmp_path / "cache"))
    folder = _broken_fixture(tmp_path)
    (folder / "val" / "33_1.png").write_bytes(b"not an image")
    config = configs.load_config(ROOT / "trpr" / "configs" / "synth-pedes.yaml",
                                 ["--data.dataset", "cuhk-pedes", "--data.image_policy", "skip"])
    splits = data.load_benchmark("cuhk-pedes", root=tmp_path)
    checked = engine.run.check_images(dict(splits), config, Accelerator(cpu=True))
    assert len(checked["train"]) == 8 and checked["train"]["index"] == list(range(8))
    assert len(checked["val_gallery"]) == 3 and len(checked["val_queries"]) == 6  # 2 captions went with the image
    bad_id = [i for i, s in enumerate(data.torch_datasets.image_sources(splits["val_gallery"])) if s.endswith("33_1.png")]
    assert splits["val_gallery"]["image_id"][bad_id[0]] not in checked["val_queries"]["image_id"]
    assert len(checked["test_gallery"]) == len(splits["test_gallery"])  # only train and eval.split are checked
    with pytest.raises(configs.ConfigError, match="data.image_policy must be one of error, skip, got 'ignore'"):
        configs.load_config(ROOT / "trpr" / "configs" / "synth-pedes.yaml", ["--data.image_policy", "ignore"])


def test_data_errors_are_one_line(tmp_path, monkeypatch):
    write_fixture(tmp_path, "rstpreid")
    path = tmp_path / "RSTPReid" / "data_captions.json"
    raw = path.read_bytes()
    path.write_bytes(raw[:50] + b"\xff" + raw[50:])
    argv = tiny_args(tmp_path) + ["--data.dataset", "rstpreid", "--data.root", str(tmp_path),
                                  "--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as info:
        train_3rtpr.main(argv)
    assert str(info.value.code).startswith(f"error: config data.dataset='rstpreid' (data.root='{tmp_path}'): {path}: "
                                           "invalid UTF-8 at byte offset 50 (byte 0xff)")
    assert "\n" not in str(info.value.code) and not (tmp_path / "run").exists()
    # the trainer and load_benchmark share the noise-rate rule
    with pytest.raises(configs.ConfigError, match=r"data.noise_rate must lie in \[0, 1\) .*got 1.0"):
        train_3rtpr.main(argv + ["--data.noise_rate", "1.0"])


# ---------------------------------------------------------------------------- 8 + 12. messages, --help
@pytest.mark.parametrize("override, message", [
    (["--train.epochs", "0"], "train.epochs must be >= 1, got 0"),
    (["--train.batch_size", "1"], "train.batch_size must be >= 2 (the losses contrast the samples of a batch), got 1"),
])
def test_epochs_and_batch_size_messages_name_the_value(override, message):
    with pytest.raises(configs.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        configs.load_config(ROOT / "trpr" / "configs" / "synth-pedes.yaml", override)


def test_help_lists_every_config_key_and_points_to_defaults(capsys):
    with pytest.raises(SystemExit):
        train_3rtpr.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "trpr/configs/defaults.yaml" in text and "--overwrite" in text
    for section, values in configs.default_config().items():
        assert f"  {section}:" in text
        for key in values if isinstance(values, dict) else []:
            assert f" {key}=" in text, f"{section}.{key}"
