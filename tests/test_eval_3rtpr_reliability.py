"""eval_3rtpr.py under faults and ordinary mistakes (issue 14): an interrupted best/ swap, damaged
safetensors (evaluation, search, the search cache), concurrent searches with a cold cache, --top bounds,
the search's default ranking row, unreadable gallery images, and quiet progress bars in logs."""
import contextlib
import io
import os
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from trpr import data
import eval_3rtpr
from trpr import evaluation
from trpr.evaluation import search
from trpr.runtime import progress
from trpr.runtime.run_folder import RunLock
from tests.test_eval_3rtpr import DATASET, _error_line, _small_pair


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """synth-pedes-tiny and a run folder (config.yaml selecting on A/FS, best/ and last/ of two pairs)."""
    base = tmp_path_factory.mktemp("eval_reliability")
    root = base / "datasets"
    splits = data.load_benchmark(DATASET, root=root)
    run_dir = base / "run"
    _small_pair((0, 1)).save_pretrained(run_dir / "best")
    _small_pair((2, 3)).save_pretrained(run_dir / "last")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "eval": {"select_row": "A/FS"},
                                                         "data": {"dataset": DATASET}}))
    return {"base": base, "root": root, "splits": splits, "run": run_dir}


def copy_run(setup, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(setup["run"], target)
    return target


def evaluate_argv(setup, checkpoint, tmp_path):
    return ["--checkpoint", str(checkpoint), "--dataset", DATASET, "--root", str(setup["root"]),
            "--out", str(tmp_path / "out"), "--batch-size", "32"]


# ---------------------------------------------------------------------------- 2. interrupted best/ swap
def test_interrupted_best_swap_is_recovered_not_skipped(setup, tmp_path, capsys):
    run_dir = copy_run(setup, tmp_path)
    (run_dir / "best").rename(run_dir / ".best.old")  # killed between the two renames of the swap
    assert eval_3rtpr.main(evaluate_argv(setup, run_dir, tmp_path)) == 0
    err = capsys.readouterr().err
    assert f"note: {run_dir / 'best'}: restored from .best.old/" in err
    results = yaml.safe_load((tmp_path / "out" / "results.json").read_text())
    assert results["checkpoints"][0]["pair_dir"] == str(run_dir / "best")  # not last/
    assert (run_dir / "best" / "pair.json").is_file() and not (run_dir / ".best.old").exists()


def test_interrupted_swap_while_training_or_unwritable_is_refused(setup, tmp_path, capsys, monkeypatch):
    run_dir = copy_run(setup, tmp_path)
    (run_dir / "best").rename(run_dir / ".best.old")
    training = RunLock(run_dir)
    training.acquire()  # a training owns the folder: its swap is in progress, leave it alone
    line = _error_line(capsys, evaluate_argv(setup, run_dir, tmp_path))
    assert f"best/ is being replaced right now by the training that owns the folder (pid {os.getpid()}" in line
    assert (run_dir / ".best.old").is_dir() and not (run_dir / "best").exists()
    training.release()

    def read_only(folder):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(evaluation.checkpoints, "recover_interrupted_swap", read_only)
    line = _error_line(capsys, evaluate_argv(setup, run_dir / "best", tmp_path))
    assert f"best/ is missing and .best.old/ holds the copy an interrupted save left" in line
    assert f"rename {run_dir / '.best.old'} to {run_dir / 'best'}" in line


# ---------------------------------------------------------------------------- 7. damaged safetensors
def test_damaged_safetensors_are_one_line_in_evaluation_and_search(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRPR_CACHE", str(tmp_path / "cache"))
    pair_dir = tmp_path / "pair"
    shutil.copytree(setup["run"] / "best", pair_dir)
    weights = pair_dir / "model_a" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])  # truncated
    line = _error_line(capsys, evaluate_argv(setup, pair_dir, tmp_path))
    assert f"{weights}: not a readable safetensors file" in line
    line = _error_line(capsys, ["search", "a man", "--checkpoint", str(pair_dir), "--dataset", DATASET,
                                "--root", str(setup["root"]), "--out", str(tmp_path / "s")])
    assert f"{weights}: not a readable safetensors file" in line


def test_damaged_search_cache_is_rebuilt(setup, tmp_path, capsys):
    argv = ["search", "a man in a red coat", "--checkpoint", str(setup["run"]), "--dataset", DATASET, "--root",
            str(setup["root"]), "--out", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "cache"), "--top", "3"]
    assert eval_3rtpr.main(argv) == 0
    first = capsys.readouterr().out
    (cached,) = (tmp_path / "cache").glob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[:100])
    assert eval_3rtpr.main(argv) == 0
    captured = capsys.readouterr()
    assert "encoded and cached" in captured.err and captured.out.split("grid:")[0] == first.split("grid:")[0]


# ------------------------------------------------------------------ 4. concurrent searches, cold cache
def test_concurrent_cold_cache_writes_do_not_collide(setup, tmp_path, monkeypatch):
    """Two searches encode the same gallery and save it at once: with one fixed temporary name the second
    rename found nothing (FileNotFoundError); each writer now has its own temporary files."""
    from trpr import modeling
    import safetensors.torch

    pair = modeling.ReciprocalPair.from_pretrained(setup["run"] / "best")
    gallery = setup["splits"]["test_gallery"]
    index = evaluation.build_gallery_index(pair, gallery, batch_size=64)
    stem = tmp_path / "cache" / "key"
    both_written = threading.Barrier(2, timeout=30)
    real_save_file = safetensors.torch.save_file

    def save_then_wait(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        both_written.wait()  # both temporaries exist before either is renamed

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_wait)
    errors = []

    def writer():
        try:
            evaluation.save_gallery_index(index, stem)
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(p.name for p in stem.parent.iterdir()) == ["key.json", "key.safetensors"]  # no temporaries left
    loaded = evaluation.load_gallery_index(stem)
    assert loaded is not None and loaded.sources == index.sources
    assert (loaded.image_outputs[0][1] == index.image_outputs[0][1]).all()


# ------------------------------------------------------------------------------ 8 + 10. search options
@pytest.mark.parametrize("top", ["0", "101", "100000"])
def test_top_is_bounded(setup, capsys, top):
    line = _error_line(capsys, ["search", "a man", "--checkpoint", str(setup["run"]), "--dataset", DATASET,
                                "--root", str(setup["root"]), "--top", top])
    assert f"--top must be between 1 and {eval_3rtpr.MAX_TOP} (every match is drawn in the grid), got {top}" in line


def test_search_ranks_with_the_row_the_run_was_selected_on(setup, tmp_path, capsys):
    common = ["--dataset", DATASET, "--root", str(setup["root"]), "--top", "2", "--out", str(tmp_path / "s"),
              "--cache-dir", str(tmp_path / "cache")]
    assert eval_3rtpr.main(["search", "a woman", "--checkpoint", str(setup["run"])] + common) == 0
    err = capsys.readouterr().err
    assert "ranking with A/FS (the row the run was selected on, its eval.select_row" in err
    assert "(A/FS, score = sum of cosines)" in err
    assert eval_3rtpr.main(["search", "a woman", "--checkpoint", str(setup["run"] / "last")] + common) == 0
    assert "ranking with A/FS" in capsys.readouterr().err  # best/ or last/ of a run: the run's config
    pair_dir = tmp_path / "pair"
    shutil.copytree(setup["run"] / "best", pair_dir)
    assert eval_3rtpr.main(["search", "a woman", "--checkpoint", str(pair_dir)] + common) == 0
    assert "ranking with A+B/GE+FS (no run config to take eval.select_row from" in capsys.readouterr().err
    assert eval_3rtpr.main(["search", "a woman", "--checkpoint", str(setup["run"]), "--score", "B/GE"] + common) == 0
    assert "ranking with B/GE (--score)" in capsys.readouterr().err


# -------------------------------------------------------------------------- 5. unreadable gallery images
def test_search_with_an_unreadable_gallery_image_is_one_line(setup, tmp_path, capsys):
    damaged_root = tmp_path / "damaged"
    shutil.copytree(setup["root"] / "SYNTH-PEDES-tiny", damaged_root / "CUHK-PEDES")
    sources = data.torch_datasets.image_sources(setup["splits"]["test_gallery"])
    damaged = damaged_root / "CUHK-PEDES" / Path(sources[2]).relative_to(setup["root"] / "SYNTH-PEDES-tiny")
    damaged.write_bytes(b"GIF89a broken")
    line = _error_line(capsys, ["search", "a man", "--checkpoint", str(setup["run"]), "--dataset", "cuhk-pedes",
                                "--root", str(damaged_root), "--cache-dir", str(tmp_path / "cache")])
    assert "cuhk-pedes/test_gallery: 1 unusable image(s)" in line and f"cannot read image {damaged}" in line


# ------------------------------------------------------------------------------ 12. progress bars in logs
def test_progress_bars_are_quiet_in_logs(monkeypatch):
    import time

    from tqdm import std as tqdm_std
    from tqdm.auto import tqdm  # imported long before the call, as in the commands

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    progress.restore_progress_defaults()  # an earlier in-process command may have quietened them
    monkeypatch.setattr(tqdm_std.tqdm, "__init__", tqdm_std.tqdm.__init__)  # restored afterwards

    def draws() -> int:
        log = io.StringIO()
        for _ in tqdm(range(30), file=log, desc="steps"):
            time.sleep(0.01)  # 0.3 s in all: several redraws at tqdm's default 0.1 s
        return log.getvalue().count("steps")

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress.quiet_progress_in_logs(Terminal()) is False and "TQDM_MININTERVAL" not in os.environ
    assert draws() >= 3
    assert progress.quiet_progress_in_logs(io.StringIO()) is True
    assert os.environ["TQDM_MININTERVAL"] == str(progress.LOG_MININTERVAL_S)  # for the processes it starts
    assert draws() == 2  # first draw and the final one, not one per step
    progress.restore_progress_defaults()
    monkeypatch.setenv("TQDM_MININTERVAL", "5")  # the user's choice wins
    assert progress.quiet_progress_in_logs(io.StringIO()) is False and os.environ["TQDM_MININTERVAL"] == "5"


@pytest.mark.parametrize("module", ["train_3rtpr", "eval_3rtpr"])
def test_both_commands_quiet_their_progress_bars(module, monkeypatch):
    import importlib

    command = importlib.import_module(module)
    import tqdm.std

    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    progress.restore_progress_defaults()
    monkeypatch.setattr(tqdm.std.tqdm, "__init__", tqdm.std.tqdm.__init__)
    monkeypatch.setattr(command, "main", lambda *a, **k: 0)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with pytest.raises(SystemExit) if module == "eval_3rtpr" else contextlib.nullcontext():
        command.cli()
    assert os.environ.get("TQDM_MININTERVAL") == str(progress.LOG_MININTERVAL_S)

