"""Reliability III (issue 21): security and wrong results.

8. nothing a run folder, checkpoint or cache holds is unpickled (a planted pickle never runs; old pickled
   run folders are refused with one line);
9. annotation paths that leave the dataset root, and pair.json members outside their folder, are refused;
1. a diverged model (non-finite weights, non-finite features) is never saved or ranked;
10. bad config values are one line naming key and value, before any data is read;
7. --resume with fewer epochs than done, and a run folder of a newer format, are refused;
4. --resume into another --output-dir is refused; a complete run is said to be complete, nothing changes;
5. --resume on changed training data stops with one line (--allow-changed-data continues);
3. the benchmark search cache is rebuilt when the annotation or an image changes; vanished files are never listed;
6. --out is checked before any work; every query of `search -` has its own grid;
11. a damaged tokenizer cache is named and rebuilt; Ctrl-C ends search quietly; long queries say they were
    truncated; an all-skipped training set gets no batch-size hint; a diverged pair gives no ranking.
"""
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trpr import configs
from trpr import engine
import train_3rtpr
from trpr.engine import state_files
from tests.test_train_3rtpr_reliability import copy_run, one_epoch_run  # noqa: F401 (one_epoch_run: a fixture)
from tests.test_train_3rtpr import data_root, tiny_args  # noqa: F401 (data_root: a fixture)


class Planted:
    """A pickle that, when loaded, creates `marker` (stands for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    """Write a malicious pickle to `path` (as torch.save would, a pickle inside)."""
    path.write_bytes(pickle.dumps({"state": Planted(marker)}))



# ------------------------------------------------------------------------- 8. nothing is unpickled
def test_state_files_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), betas=(0.9, 0.98))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": engine.checkpoint.rng_state(), "nan": float("nan"),
             "$odd": {1: (2, None)}, "array": np.arange(4, dtype=np.uint32)}
    state_files.save_state(state, tmp_path / "s.safetensors")
    assert b"\x80\x04" not in (tmp_path / "s.safetensors").read_bytes()[:16]  # not a pickle
    back = state_files.load_state(tmp_path / "s.safetensors")
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)
    torch.testing.assert_close(back["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert back["$odd"] == {1: (2, None)} and np.isnan(back["nan"]) and back["array"].dtype == np.uint32
    engine.checkpoint.set_rng_state(back["rng"])
    with pytest.raises(TypeError, match=r"state.bad: a object cannot be stored"):
        state_files.save_state({"bad": object()}, tmp_path / "t.safetensors")


STATE_FILES = ["rng_0", "alr_state", "optimizer_a", "optimizer_b", "scheduler_a", "scheduler_b"]


@pytest.mark.parametrize("name", STATE_FILES)
def test_planted_pickle_in_training_state_never_runs(one_epoch_run, tmp_path, name):
    run_dir = copy_run(one_epoch_run, tmp_path)
    marker = tmp_path / "code-ran"
    target = run_dir / "last" / "training_state" / f"{name}.safetensors"
    assert target.is_file()
    plant(target, marker)
    with pytest.raises(engine.CheckpointError, match=rf"^--resume {run_dir}: {target}: not a training-state file "
                                                    r"of this format, or damaged") as info:
        train_3rtpr.main(["--resume", str(run_dir), "--train.epochs", "2"])
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_old_pickled_run_folder_is_refused_without_opening_it(one_epoch_run, tmp_path):
    run_dir = copy_run(one_epoch_run, tmp_path)
    marker = tmp_path / "code-ran"
    state_dir = run_dir / "last" / "training_state"
    for path in state_dir.glob("*.safetensors"):  # the earlier layout: pickled .pt files
        path.unlink()
        plant(path.with_suffix(".pt"), marker)
    with pytest.raises(engine.CheckpointError, match=rf"{state_dir}: training state in the earlier pickled .pt "
                                                    r"format, which is never read .*start a new run") as info:
        train_3rtpr.main(["--resume", str(run_dir), "--train.epochs", "2"])
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_planted_pickles_in_weights_and_caches_never_run(one_epoch_run, tmp_path, monkeypatch):
    """Model weights, the search-feature cache and the noise permutation: read without unpickling."""
    from trpr import modeling
    from trpr.data.noise import load_permutation
    from trpr.evaluation.search import load_gallery_index

    marker = tmp_path / "code-ran"
    run_dir = copy_run(one_epoch_run, tmp_path)
    for name in ("model.safetensors",):
        plant(run_dir / "best" / "model_a" / name, marker)
    plant(run_dir / "best" / "model_a" / "pytorch_model.bin", marker)  # a pickled weights file beside it
    with pytest.raises(Exception) as info:
        modeling.ReciprocalPair.from_pretrained(run_dir / "best")
    assert "model_a" in str(info.value)
    stem = tmp_path / "cache" / "index"
    stem.parent.mkdir()
    plant(stem.with_suffix(".safetensors"), marker)
    stem.with_suffix(".json").write_text(json.dumps({"sources": []}))
    assert load_gallery_index(stem) is None  # unreadable cache: rebuilt
    plant(tmp_path / "noise.npy", marker)
    with pytest.raises(ValueError):
        load_permutation(tmp_path / "noise.npy", 10)
    assert not marker.exists()


# ---------------------------------------------------------- 9. paths that leave the dataset / pair folder
def _escaping_fixture(root: Path, path_of) -> tuple[Path, str]:
    """A cuhk-pedes fixture whose train entry 0 points at an image outside the dataset (which exists, so
    only the rule can stop it); returns (annotation file, the bad path)."""
    from PIL import Image

    from tests.data.test_benchmarks import write_fixture

    secret = root / "secret" / "x.png"
    secret.parent.mkdir(parents=True)
    Image.new("RGB", (4, 8), (1, 2, 3)).save(secret)
    bad = path_of(secret)

    def mutate(entries):
        entries[0]["file_path"] = bad

    write_fixture(root / "data", "cuhk-pedes", mutate)
    return root / "data" / "CUHK-PEDES" / "reid_raw.json", bad


@pytest.mark.parametrize("path_of", [lambda secret: "../../../secret/x.png", lambda secret: str(secret)],
                         ids=["dotdot", "absolute"])
def test_annotation_paths_outside_the_dataset_are_refused(tmp_path, capsys, path_of):
    from trpr.data import check
    from trpr.data.benchmarks import load_benchmark

    annotation, bad = _escaping_fixture(tmp_path, path_of)
    assert (annotation.parent / "imgs" / bad).is_file()  # the file is there: only the rule refuses it
    assert check.main(["cuhk-pedes", "--root", str(tmp_path / "data")]) == 1
    report = capsys.readouterr().out
    assert "PROBLEM [path outside the image folder]: 1" in report
    assert f"entry 0 (file_path={bad!r}) has image path {bad!r}, which leaves the image folder" in report
    with pytest.raises(ValueError, match=rf"^{annotation}: entry 0 \(file_path='{bad}'\) has image path .* leaves the "
                                         r"image folder") as info:
        load_benchmark("cuhk-pedes", root=tmp_path / "data")
    assert "\n" not in str(info.value)


def test_pair_members_outside_the_pair_folder_are_refused(one_epoch_run, tmp_path):
    from trpr import modeling

    run_dir = copy_run(one_epoch_run, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.copytree(run_dir / "best" / "model_a", outside)
    pair_json = run_dir / "best" / "pair.json"
    config = json.loads(pair_json.read_text())
    for member in ("../../elsewhere", str(outside), "model_a/../../../elsewhere"):
        pair_json.write_text(json.dumps(dict(config, members=[member, "model_b"])))
        with pytest.raises(ValueError, match=rf"{pair_json}: member '{member}' is not a folder inside the pair folder"):
            modeling.ReciprocalPair.from_pretrained(run_dir / "best")
    (run_dir / "best" / "link").symlink_to(outside)
    pair_json.write_text(json.dumps(dict(config, members=["link", "model_b"])))
    with pytest.raises(ValueError, match="member 'link' is not a folder inside the pair folder"):
        modeling.ReciprocalPair.from_pretrained(run_dir / "best")
    pair_json.write_text(json.dumps(config))
    modeling.ReciprocalPair.from_pretrained(run_dir / "best")  # the normal layout still loads


# ------------------------------------------------------------------- 1. a diverged model is never ranked
def test_retrieval_metrics_refuse_non_finite_features():
    from trpr import kernels

    feats = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    pids = torch.tensor([0, 1, 2, 3])
    assert kernels.retrieval_metrics(feats, feats, pids, pids, backend="torch")["R1"] == 100.0
    bad = feats.clone()
    bad[2] = float("nan")
    with pytest.raises(kernels.NonFiniteFeatures, match=r"^query row 2 of 4 has non-finite features \(nan\)"):
        kernels.retrieval_metrics(bad, feats, pids, pids, backend="torch")
    with pytest.raises(kernels.NonFiniteFeatures, match=r"^gallery row 2 of 4"):
        kernels.retrieval_metrics(feats, bad, pids, pids, backend="torch")


def test_huge_learning_rate_stops_training_and_saves_nothing(data_root, tmp_path):
    """lr 1e38 and one step per epoch: the step's loss is finite, the weights after it are not usable. The
    run must stop with one line naming the epoch and step instead of validating to R@1 100 (all-NaN
    scores) and saving best/."""
    run_dir = tmp_path / "diverged"
    with pytest.raises(engine.TrainingDiverged, match=r"(validation )?after epoch 0, step 1|epoch 0, step 1") as info:
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir), "--train.epochs", "1",
                                                 "--train.batch_size", "144",
                                                 "--optim.backbone_lr", "1e38", "--optim.head_lr", "1e38"])
    assert "\n" not in str(info.value) and "non-finite" in str(info.value)
    assert not (run_dir / "best").exists() and not (run_dir / "last").exists()


def test_non_finite_weights_are_never_saved(one_epoch_run, tmp_path):
    from trpr import modeling
    from trpr.engine.checkpoint import CheckpointWriter, TrainerState

    pair = modeling.ReciprocalPair.from_pretrained(one_epoch_run / "best")
    with torch.no_grad():
        next(pair.b.parameters()).fill_(float("inf"))
    accelerator = checkpoint_accelerator()
    writer = CheckpointWriter(tmp_path, pair, [], [], accelerator, background=False)
    with pytest.raises(engine.TrainingDiverged, match=r"non-finite weights of model B after epoch 3, global step 7"):
        writer.snapshot({}, TrainerState(epoch=3, global_step=7), improved=True)
    assert not (tmp_path / "best").exists() and not (tmp_path / "last").exists()


def checkpoint_accelerator():
    from trpr.engine.checkpoint import _ThisProcessOnly

    accelerator = _ThisProcessOnly()
    accelerator.scaler, accelerator.device = None, torch.device("cpu")
    return accelerator


def test_evaluating_a_pair_with_nan_weights_is_an_error_not_a_leaderboard_entry(one_epoch_run, data_root, tmp_path,
                                                                              capsys):
    from safetensors.torch import load_file, save_file

    import eval_3rtpr

    pair_dir = tmp_path / "nan_pair"
    shutil.copytree(one_epoch_run / "best", pair_dir)
    weights = pair_dir / "model_a" / "model.safetensors"
    state = load_file(str(weights))
    projection = next(name for name in state if "visual_projection" in name or "text_projection" in name)
    state[projection] = torch.full_like(state[projection], float("nan"))
    save_file(state, str(weights), metadata={"format": "pt"})
    code = eval_3rtpr.main(["--checkpoint", str(pair_dir), "--dataset", "synth-pedes-tiny", "--root", str(data_root),
                            "--out", str(tmp_path / "out"), "--batch-size", "32"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0
    assert f"checkpoint {pair_dir}: model A gives a non-finite" in err and "row 0" in err
    assert not (tmp_path / "out" / "leaderboard.md").exists()


# ------------------------------------------------------------------ 10. config values, one line each
@pytest.mark.parametrize("overrides, message", [
    (["--optim.backbone_lr", "-1e-5"], "optim.backbone_lr must be >= 0, got -1e-05"),
    (["--optim.head_lr", "0"], "optim.head_lr must be > 0, got 0.0"),
    (["--optim.head_lr", ".inf"], "optim.head_lr must be a finite number, got inf"),
    (["--loss.lambda_sdm", "-1"], "loss.lambda_sdm must be >= 0, got -1.0"),
    (["--loss.lambda_trl", "-0.5"], "loss.lambda_trl must be >= 0, got -0.5"),
    (["--model.fused_dim", "0"], "model.fused_dim must be > 0, got 0"),
    (["--model.fused_dim", "-64"], "model.fused_dim must be > 0, got -64"),
    (["--train.log_every", "0"], "train.log_every must be >= 1, got 0"),
    (["--eval.batch_size", "0"], "eval.batch_size must be >= 1, got 0"),
    (["--data.num_workers", "-1"], "data.num_workers must be >= 0, got -1"),
    (["--seed", "-3"], "seed must be >= 0, got -3"),
    (["--optim.betas", "[0.9, 1.0]"], r"optim.betas\[1\] must lie in \[0, 1\), got 1.0"),
    (["--optim.betas", "[-0.1, 0.99]"], r"optim.betas\[0\] must lie in \[0, 1\), got -0.1"),
    (["--optim.warmup_epochs", "-1"], "optim.warmup_epochs must be >= 0, got -1"),
    (["--alr.sharpness", "0"], "alr.sharpness must be > 0, got 0.0"),
    (["--alr.sharpness", "-2"], "alr.sharpness must be > 0, got -2.0"),
    (["--data.image_size", "[30, 16]"], r"data.image_size \[30, 16\] must be divisible by the backbone's patch size 8"),
    (["--model.backbone", "{hidden_size: 30, num_attention_heads: 4}"],
     "model.backbone: the vision width \\(hidden_size\\) 30 is not divisible by its 4 attention heads"),
    (["--model.backbone", "openai/clip-vit-base-patch16", "--data.image_size", "[384, 120]"],
     r"data.image_size \[384, 120\] must be divisible by the backbone's patch size 16"),
])
def test_bad_config_values_are_one_line_before_any_data(overrides, message, tmp_path, monkeypatch):
    from trpr import data

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the config was checked")

    monkeypatch.setattr(data, "load_benchmark", no_data)
    with pytest.raises(configs.ConfigError, match=message) as info:
        train_3rtpr.main(["--config", "synth-pedes", "--output-dir", str(tmp_path / "run")] + overrides)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("base", ["3", "[synth-pedes, 4]", "{a: 1}", "null"])
def test_non_string_base_is_one_line(tmp_path, base):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: {base}\ntrain:\n  epochs: 2\n")
    with pytest.raises(configs.ConfigError, match=rf"config file {recipe}: base must be a recipe name or path, or a "
                                                  r"list of them, got") as info:
        configs.load_config(recipe)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ 7. resume: epochs and format version
def test_resume_with_fewer_epochs_than_done_is_refused_and_changes_nothing(data_root, tmp_path):
    import yaml

    two = tmp_path / "two"
    train_3rtpr.main(tiny_args(data_root) + ["--train.epochs", "2", "--output-dir", str(two),
                                             "--alr.enabled", "false", "--eval.split", "null"])
    before = (two / "config.yaml").read_text()
    with pytest.raises(configs.ConfigError, match=rf"^--resume {two}: train.epochs 1 is fewer than the 2 epoch\(s\) "
                                                  r"the run has finished; pass --train.epochs 2 or more") as info:
        train_3rtpr.main(["--resume", str(two), "--train.epochs", "1"])
    assert "\n" not in str(info.value)
    assert (two / "config.yaml").read_text() == before and yaml.safe_load(before)["train"]["epochs"] == 2


def test_newer_format_versions_are_refused(one_epoch_run, tmp_path):
    from trpr import modeling

    run_dir = copy_run(one_epoch_run, tmp_path)
    state_file = run_dir / "last" / "training_state" / "trainer_state.json"
    counters = json.loads(state_file.read_text())
    assert counters["format_version"] == engine.checkpoint.TRAINING_STATE_VERSION
    state_file.write_text(json.dumps(dict(counters, format_version=99)))
    with pytest.raises(engine.CheckpointError, match=rf"^--resume {run_dir}: {state_file}: format_version 99 is newer "
                                                    r"than this trpr resumes \(2\); upgrade trpr"):
        train_3rtpr.main(["--resume", str(run_dir), "--train.epochs", "2"])
    model_config = run_dir / "best" / "model_a" / "config.json"
    model_config.write_text(json.dumps(dict(json.loads(model_config.read_text()), format_version=7)))
    with pytest.raises(ValueError, match=rf"{model_config}: format_version 7 is newer than this trpr reads \(1\)"):
        modeling.ReciprocalPair.from_pretrained(run_dir / "best")


# ------------------------------------------------------- 2. --overwrite keeps the old run until an epoch
def test_overwrite_keeps_the_previous_run_until_the_new_one_saves_an_epoch(one_epoch_run, data_root, tmp_path,
                                                                         monkeypatch, capsys):
    run_dir = copy_run(one_epoch_run, tmp_path)
    before = {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    def dies_in_epoch_0(*args, **kwargs):
        assert (run_dir / ".replaced" / "last").is_dir()  # the previous run still exists while epoch 0 runs
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with monkeypatch.context() as patch:
        patch.setattr(engine, "train_one_epoch", dies_in_epoch_0)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir), "--overwrite", "--train.epochs", "1"])
    after = {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # the previous run is back, byte for byte, and nothing of the new one is left
    capsys.readouterr()
    train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(run_dir), "--overwrite", "--train.epochs", "1",
                                             "--seed", "5"])
    assert "the previous run in" in capsys.readouterr().err
    assert not (run_dir / ".replaced").exists() and (run_dir / "last").is_dir()
    assert configs.load_config(run_dir / "config.yaml")["seed"] == 5


# ------------------------------------------- 4. --resume A --output-dir B; a complete run; changed data
def test_resume_into_another_output_dir_is_refused(one_epoch_run, tmp_path):
    run_dir = copy_run(one_epoch_run, tmp_path)
    other = tmp_path / "other"
    with pytest.raises(configs.ConfigError, match=rf"^--resume {run_dir} --output-dir {other}: a run is continued in "
                                                  rf"its own folder; .*cp -r {run_dir} {other}\) and --resume {other}$") as info:
        train_3rtpr.main(["--resume", str(run_dir), "--output-dir", str(other), "--train.epochs", "2"])
    assert "\n" not in str(info.value)
    assert not other.exists()
    train_3rtpr.main(["--resume", str(run_dir), "--output-dir", str(run_dir)])  # the same folder named twice: fine


def test_resume_of_a_complete_run_says_so_and_changes_nothing(one_epoch_run, tmp_path, capsys):
    run_dir = copy_run(one_epoch_run, tmp_path)
    before = {p.relative_to(run_dir).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
              for p in run_dir.rglob("*") if p.is_file() and p.name != "metrics.jsonl"}
    capsys.readouterr()
    assert train_3rtpr.main(["--resume", str(run_dir)]) == run_dir
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "already complete" in line]
    assert lines == [f"{run_dir}: the run is already complete (1 of 1 epochs finished); nothing was trained or "
                     "changed (pass --train.epochs 2 or more to train further)"]
    after = {p.relative_to(run_dir).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
             for p in run_dir.rglob("*") if p.is_file() and p.name != "metrics.jsonl"}
    assert after == before
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0]


def _copied_dataset(data_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(a copy of the synth-pedes-tiny folder's root, its reid_raw.json) to edit."""
    root = tmp_path / "data"
    shutil.copytree(data_root / "SYNTH-PEDES-tiny", root / "SYNTH-PEDES-tiny")
    return root, root / "SYNTH-PEDES-tiny" / "reid_raw.json"


def test_training_data_fingerprint_is_recorded_and_survives_a_move(one_epoch_run, data_root, tmp_path):
    from trpr import data

    saved = json.loads((one_epoch_run / "last" / "training_state" / "trainer_state.json").read_text())["train_data"]
    assert saved["name"] == "synth-pedes-tiny/train" and saved["rows"] == 144 and len(saved["fingerprint"]) == 16
    root, _ = _copied_dataset(data_root, tmp_path)
    moved = engine.train_data_record(data.load_benchmark("synth-pedes-tiny", root=root)["train"], "x")
    assert moved["fingerprint"] == saved["fingerprint"]  # another root, the same data


@pytest.mark.parametrize("change, message", [
    ("shrink", r"it has 142 rows, the run was trained on 144"),
    ("grow", r"it has 146 rows, the run was trained on 144"),
    ("caption", r"same 144 rows, different content"),
])
def test_resume_on_changed_training_data_stops_with_one_line(one_epoch_run, data_root, tmp_path, change, message):
    run_dir = copy_run(one_epoch_run, tmp_path)
    root, annotation = _copied_dataset(data_root, tmp_path)
    entries = json.loads(annotation.read_text())
    first = next(i for i, e in enumerate(entries) if e["split"] == "train")
    if change == "shrink":
        del entries[first]
    elif change == "grow":
        image = annotation.parent / "imgs" / entries[first]["file_path"]
        shutil.copy(image, image.with_name("extra.png"))  # one more image of the identity, two captions
        entries.append(dict(entries[first], file_path=str(Path(entries[first]["file_path"]).with_name("extra.png"))))
    else:
        entries[first]["captions"][0] = "a different description of this person"
    annotation.write_text(json.dumps(entries))
    config_before = (run_dir / "config.yaml").read_text()
    with pytest.raises(configs.ConfigError, match=rf"^--resume {run_dir}: the training data changed since the run was "
                                                  rf"saved \(synth-pedes-tiny/train: {message}; content fingerprint "
                                                  r"[0-9a-f]{16} -> [0-9a-f]{16}\); restore the data, or pass "
                                                  r"--allow-changed-data to continue on the new data$") as info:
        train_3rtpr.main(["--resume", str(run_dir), "--train.epochs", "2", "--data.root", str(root)])
    assert "\n" not in str(info.value)
    assert (run_dir / "config.yaml").read_text() == config_before
    assert engine.finished_epochs(run_dir) == 1
    if change == "grow":  # said explicitly: it continues (it used to end in an IndexError mid-epoch)
        train_3rtpr.main(["--resume", str(run_dir), "--train.epochs", "2", "--data.root", str(root),
                          "--allow-changed-data"])
        counters = json.loads((run_dir / "last" / "training_state" / "trainer_state.json").read_text())
        assert counters["epoch"] == 1 and counters["train_data"]["rows"] == 146


def test_allow_changed_data_needs_resume(tmp_path):
    with pytest.raises(configs.ConfigError, match="^--allow-changed-data applies to --resume only$"):
        train_3rtpr.main(["--config", "synth-pedes", "--output-dir", str(tmp_path / "run"), "--allow-changed-data"])


def test_every_training_image_skipped_is_one_line_without_a_batch_size_hint(data_root, tmp_path, monkeypatch):
    from trpr import data

    real = data.verify_images

    def all_unusable(split, policy="error", **kwargs):
        check = real(split, policy=policy, **kwargs)
        if kwargs.get("name", "").endswith("/train"):
            check.keep = check.keep[:0]
            check.bad = {"x.png": "truncated"}
        return check

    monkeypatch.setattr(data, "verify_images", all_unusable)
    with pytest.raises(SystemExit, match=r"data.image_policy=skip: every image of synth-pedes-tiny/train is unusable "
                                         r"\(1 file\(s\), listed above\), so nothing is left to train on") as info:
        train_3rtpr.main(tiny_args(data_root) + ["--output-dir", str(tmp_path / "run"), "--data.image_policy", "skip"])
    assert "batch_size" not in str(info.value)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------- 3. the search cache follows the gallery
def _search(argv, capsys, stdin=None, monkeypatch=None):
    import eval_3rtpr

    if stdin is not None:
        monkeypatch.setattr("sys.stdin", stdin)
    code = eval_3rtpr.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def search_setup(one_epoch_run, data_root, tmp_path):
    """A copy of synth-pedes-tiny to change, and search arguments over its whole test gallery (24 images)."""
    root, annotation = _copied_dataset(data_root, tmp_path)
    argv = ["--checkpoint", str(one_epoch_run), "--dataset", "synth-pedes-tiny", "--root", str(root), "--top", "24",
            "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    return {"root": root, "annotation": annotation, "argv": argv, "tmp": tmp_path}


def _listed_paths(out: str) -> list[str]:
    return [line.split()[3] for line in out.splitlines() if line.strip()[:1].isdigit()]


def test_search_cache_is_rebuilt_when_the_gallery_changes(search_setup, capsys):
    argv = ["search", "a woman in a red coat"] + search_setup["argv"]
    code, out, err = _search(argv, capsys)
    assert code == 0 and "encoded and cached" in err and len(_listed_paths(out)) == 24
    assert "from cache" in _search(argv, capsys)[2]
    # the annotation changes: a test image and its entry are removed
    annotation = search_setup["annotation"]
    entries = json.loads(annotation.read_text())
    removed = next(e for e in entries if e["split"] == "test")
    entries.remove(removed)
    annotation.write_text(json.dumps(entries))
    removed_path = annotation.parent / "imgs" / removed["file_path"]
    removed_path.unlink()
    code, out, err = _search(argv, capsys)
    assert code == 0 and "encoded and cached" in err and "gallery: 23 images" in err
    listed = _listed_paths(out)
    assert len(listed) == 23 and str(removed_path) not in listed and all(Path(p).is_file() for p in listed)
    assert "from cache" in _search(argv, capsys)[2]
    # an image changes in place (same annotation): the cache is stale as well
    image = annotation.parent / "imgs" / next(e for e in entries if e["split"] == "test")["file_path"]
    from PIL import Image

    Image.new("RGB", Image.open(image).size, (200, 10, 10)).save(image)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert "encoded and cached" in _search(argv, capsys)[2]


def test_search_never_lists_a_file_that_no_longer_exists(search_setup, capsys, monkeypatch):
    import io

    argv = search_setup["argv"]
    assert _search(["search", "a man"] + argv, capsys)[0] == 0  # indexed and cached
    gallery_files = sorted((search_setup["annotation"].parent / "imgs" / "test").glob("*.png"))
    doomed = gallery_files[3]

    class RemovedBetweenQueries(io.StringIO):
        """stdin of `search -`: the gallery loses a file after the first query was answered."""

        def __iter__(self):
            yield "a man in a black jacket\n"
            doomed.unlink()
            yield "a woman in a red coat\n"

    code, out, err = _search(["search", "-"] + argv, capsys, RemovedBetweenQueries(), monkeypatch)
    assert code == 2 and out.count("query: ") == 1 and "query: a woman" not in out  # nothing of the 2nd query
    last = err.strip().splitlines()[-1]
    assert last.startswith("eval_3rtpr.py: error: --dataset synth-pedes-tiny: the match at rank ")
    assert f"{doomed}, no longer exists" in last and "Traceback" not in err
    # the next search sees the missing file (the cache is stale) and names it instead of listing it
    code, out, err = _search(["search", "a man"] + argv, capsys)
    assert code == 2 and "query:" not in out and str(doomed) in err.strip().splitlines()[-1]


# --------------------------------------------------- 6. outputs checked first; one grid per query
def test_eval_out_that_cannot_be_written_fails_before_any_work(one_epoch_run, data_root, tmp_path, capsys,
                                                               monkeypatch):
    import eval_3rtpr

    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation ran before --out was checked")

    monkeypatch.setattr(eval_3rtpr, "evaluate_checkpoint", no_work)
    monkeypatch.setattr(eval_3rtpr, "load_eval_split", no_work)
    common = ["--checkpoint", str(one_epoch_run), "--dataset", "synth-pedes-tiny", "--root", str(data_root)]
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    for out, message in ((a_file, f"--out {a_file}: is a file, not a folder"),
                         (a_file / "sub", f"--out {a_file / 'sub'}: lies under {a_file}, which is a file")):
        code, _, err = _search(common + ["--out", str(out)], capsys)
        assert code == 2 and err.strip().splitlines() == [f"eval_3rtpr.py: error: {message}; name a folder for the outputs"]
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    monkeypatch.setattr(eval_3rtpr.os, "access", lambda path, mode: Path(path) != read_only)  # root ignores chmod
    code, _, err = _search(common + ["--out", str(read_only / "new")], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"eval_3rtpr.py: error: --out {read_only / 'new'}: cannot write there (in {read_only}, where it would be "
        "created): permission denied or a read-only file system; name a writable folder"]
    code, _, err = _search(["search", "a man", "--out", str(a_file)] + common, capsys)
    assert code == 2 and "is a file, not a folder" in err


def test_every_query_of_search_dash_gets_its_own_grid(search_setup, capsys, monkeypatch):
    import io

    queries = ["红色外套的女人", "青いジャケットの男", "A man, in a coat!", "a man in a coat"]
    code, out, _ = _search(["search", "-"] + search_setup["argv"], capsys, io.StringIO("\n".join(queries) + "\n"),
                           monkeypatch)
    assert code == 0
    grids = [line.split("grid: ")[1] for line in out.splitlines() if line.startswith("grid: ")]
    assert len(grids) == 4 and len(set(grids)) == 4 and all(Path(g).is_file() for g in grids)
    assert Path(grids[0]).name.startswith("search_query-") and Path(grids[2]).name.startswith("search_a-man-in-a-coat-")
    from trpr import evaluation

    assert [evaluation.search_grid_path(search_setup["tmp"] / "out", q) for q in queries] == [Path(g) for g in grids]


# ------------------------------------------- 11. tokenizer cache, Ctrl-C, long queries; diverged search
def test_damaged_tokenizer_cache_is_named_and_rebuilt(tmp_path, monkeypatch, capsys):
    from trpr.data import tokenizer

    monkeypatch.setenv("TRPR_CACHE", str(tmp_path))
    tokenizer.get_tokenizer.cache_clear()
    try:
        expected = tokenizer.get_tokenizer()("a man in a red coat")["input_ids"]
        vocab = tmp_path / "clip_bpe" / "vocab.json"
        for damage in (vocab.read_text()[:5000], json.dumps({"a": 1}), "\x00" * 10):
            vocab.write_text(damage)
            tokenizer.get_tokenizer.cache_clear()
            capsys.readouterr()
            assert tokenizer.get_tokenizer()("a man in a red coat")["input_ids"] == expected
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"warning: {vocab}: damaged tokenizer cache (")
            assert err[0].endswith("; rebuilding it from clip_bpe_simple_vocab_16e6.txt.gz")
            assert tokenizer.vocab_files_problem(vocab.parent) is None
        merges = tmp_path / "clip_bpe" / "merges.txt"
        merges.write_text(merges.read_text()[:100])
        tokenizer.get_tokenizer.cache_clear()
        assert tokenizer.get_tokenizer()("a man in a red coat")["input_ids"] == expected
        assert f"warning: {merges}: damaged tokenizer cache" in capsys.readouterr().err
    finally:
        tokenizer.get_tokenizer.cache_clear()


def test_ctrl_c_in_search_dash_ends_quietly(search_setup, capsys, monkeypatch):
    import io

    class InterruptedStdin(io.StringIO):
        def __iter__(self):
            yield "a man in a black jacket\n"
            raise KeyboardInterrupt

    code, out, err = _search(["search", "-"] + search_setup["argv"], capsys, InterruptedStdin(), monkeypatch)
    assert code == 130 and out.count("query: ") == 1
    assert err.strip().splitlines()[-1] == "eval_3rtpr.py: interrupted" and "Traceback" not in err


def test_a_query_longer_than_the_context_says_it_was_truncated(search_setup, capsys):
    words = " ".join(["a tall man with a black backpack and grey shoes"] * 10)
    code, _, err = _search(["search", words] + search_setup["argv"], capsys)
    notes = [line for line in err.splitlines() if "truncated" in line]
    assert code == 0 and len(notes) == 1 and "the model reads 75 (a context of 77 with start and end)" in notes[0]
    code, _, err = _search(["search", "a tall man with a black backpack"] + search_setup["argv"], capsys)
    assert code == 0 and "truncated" not in err


def test_search_with_a_diverged_pair_is_one_line_not_a_ranking(one_epoch_run, search_setup, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    pair_dir = tmp_path / "nan_pair"
    shutil.copytree(one_epoch_run / "best", pair_dir)
    weights = pair_dir / "model_b" / "model.safetensors"
    state = load_file(str(weights))
    projection = next(name for name in state if "visual_projection" in name)
    state[projection] = torch.full_like(state[projection], float("nan"))
    save_file(state, str(weights), metadata={"format": "pt"})
    argv = search_setup["argv"]
    argv = argv[:1] + [str(pair_dir)] + argv[2:]
    code, out, err = _search(["search", "a man", "--score", "A+B/GE+FS"] + argv, capsys)
    assert code == 2 and "query:" not in out and "rank" not in out
    assert err.strip().splitlines()[-1] == (
        f"eval_3rtpr.py: error: checkpoint {pair_dir}: model B gives a non-finite global embedding for gallery image "
        "row 0 of 24 (ranking A+B/GE+FS): its weights are not usable (a diverged run?)")
    assert _search(["search", "a man", "--score", "A/GE+FS"] + argv, capsys)[0] == 0  # model A alone is fine


# ------------------------------------------- 2. Ctrl-C and SIGTERM end as one line (found by the attack replay)
def test_ctrl_c_and_sigterm_in_training_are_one_line(monkeypatch, capsys):
    """SIGTERM is raised in the main thread as `Terminated` (a KeyboardInterrupt), so the run folder is restored
    like after any failure; both end with one line and the shell's status, and the handler is put back."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    for raised, status, name in ((KeyboardInterrupt(), 130, "Ctrl-C"), (train_3rtpr.Terminated(), 143, "SIGTERM")):
        def interrupted(raised=raised):
            assert signal.getsignal(signal.SIGTERM) is train_3rtpr._raise_terminated
            raise raised

        monkeypatch.setattr(train_3rtpr, "main", interrupted)
        with pytest.raises(SystemExit) as info:
            train_3rtpr.cli()
        assert info.value.code == status
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: interrupted ({name}); the unfinished epoch was not saved (a run with a finished "
                       "epoch continues with --resume)"]
        assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(train_3rtpr.Terminated):
        train_3rtpr._raise_terminated(signal.SIGTERM, None)


@pytest.mark.parametrize("text, where", [
    ("x: !!python/object/apply:os.system ['touch /tmp/never']\n", "line 1, column 4"),
    ("train:\n  epochs: [2\n", "line 3, column 1"),
    ("a: b: c\n", "line 1, column 5"),
])
def test_yaml_errors_in_a_recipe_are_one_line(tmp_path, text, where):
    """A recipe (or a run's config.yaml) PyYAML cannot read: one line naming the file, the problem and where,
    not PyYAML's several lines with a caret (found by the attack replay, i21-8-yaml); a python/object tag is
    never constructed."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(configs.ConfigError, match=rf"^config file {recipe} is not valid YAML: .*\({where}\)$") as info:
        configs.load_config(recipe)
    assert "\n" not in str(info.value)
    with pytest.raises(configs.ConfigError, match=r"^command line: value of --train.epochs is not valid YAML: .*\(line 1, "
                                                  r"column 3\)$") as info:
        configs.parse_overrides(["--train.epochs", "[2"])
    assert "\n" not in str(info.value)
