"""Custom datasets (`load_benchmark("folder", root=DIR)`: image folder + annotations.csv / .jsonl): the example
generator, loading equal to the synth-pedes it was made from, `python -m trpr.data.check folder` with the
same rules (file, line and reason for every problem), and one tiny training epoch + evaluation + search."""
import csv
import json
import os
import shutil

import pytest

import eval_3rtpr
import train_3rtpr
from tests.test_train_3rtpr import ROOT, TINY_BACKBONE
from trpr import data
from trpr.data import check
from trpr.data.arrow_splits import column_values
from trpr.data.folder_dataset import write_example
from trpr.data.torch_datasets import image_sources


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    base = tmp_path_factory.mktemp("folder_dataset")
    return write_example(base / "my-dataset", preset="tiny", fmt="csv")


def _counts(splits) -> dict:
    return {name: (len(set(column_values(split, "pid"))), len(split)) for name, split in splits.items()}


def test_example_loads_like_the_synth_pedes_it_was_made_from(example, tmp_path):
    assert (example / "annotations.csv").is_file() and (example / "images" / "train").is_dir()
    splits = data.load_benchmark("folder", root=example)
    synth = data.load_benchmark("synth-pedes-tiny", root=tmp_path / "synth")
    assert set(splits) == set(synth) == {"train", "val_gallery", "val_queries", "test_gallery", "test_queries"}
    assert _counts(splits) == _counts(synth)
    assert column_values(splits["train"], "caption") == column_values(synth["train"], "caption")
    assert column_values(splits["test_queries"], "pid") == column_values(synth["test_queries"], "pid")
    first = image_sources(splits["test_gallery"])[0]
    assert first.startswith(str(example / "images" / "test"))
    # the same table as JSONL loads the same splits
    jsonl = shutil.copytree(example, tmp_path / "as-jsonl")
    with open(jsonl / "annotations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    (jsonl / "annotations.csv").unlink()
    (jsonl / "annotations.jsonl").write_text("".join(json.dumps(dict(row, pid=int(row["pid"]))) + "\n" for row in rows))
    assert _counts(data.load_benchmark("folder", root=jsonl)) == _counts(splits)
    assert check.main(["folder", "--root", str(example)]) == 0


BAD_ROWS = [  # (row, the words data.check reports for its line), lines 2.. of annotations.csv
    ("images/train/missing.png,1,a man,train", "file not found"),
    ("images/ok1.png,-1,a man,train", "pid -1 is negative"),
    ("images/ok1.png,abc,a man,train", "pid 'abc' is not an integer"),
    ("images/ok1.png,99999999999999999999,a man,train", "out of range"),
    ("images/ok1.png,1,a man,dev", "split 'dev' is not one of train, val, test"),
    ("../outside.png,1,a man,train", "points outside the dataset folder"),
    ("/etc/passwd.png,1,a man,train", "is an absolute path"),
    ("images/ok1.png,1,a man in red,train", None),  # fine
    ("images/ok1.png,2,a man in blue,train", "has pid 2, split train; line 9 gave it pid 1"),
    ("images/ok2.png,1,a man,test", "pid 1 appears in splits train (line 2), test (line 11)"),
    ("images/ok1.png,1,only three fields", "has 3 fields, the header has 4"),
    ("images/ok1.png,1,a man in red,train", "repeats line 9 exactly"),  # warning: dropped
    ("images/ok1.png,1,   ,train", "blank caption"),  # warning: dropped
]


def test_check_names_file_line_and_reason(example, tmp_path, capsys):
    folder = tmp_path / "bad"
    (folder / "images").mkdir(parents=True)
    for name in ("ok1.png", "ok2.png"):
        shutil.copy(next((example / "images" / "train").iterdir()), folder / "images" / name)
    table = folder / "annotations.csv"
    table.write_text("image,pid,caption,split\n" + "\n".join(row for row, _ in BAD_ROWS) + "\n")
    assert check.main(["folder", "--root", str(folder)]) == 1
    report = capsys.readouterr().out
    for line, (row, reason) in enumerate(BAD_ROWS, start=2):
        if reason is not None:
            hits = [text for text in report.splitlines() if f"{table} line {line}" in text and reason in text]
            assert hits, f"line {line} ({reason}) not reported:\n{report}"
    assert "FAILED: 10 problem(s)" in report
    assert report.count("WARNING") == 2
    with pytest.raises(ValueError) as error:  # the loader refuses the file with one line naming file and line
        data.load_benchmark("folder", root=folder)
    message = str(error.value)
    assert "\n" not in message and f"{table} line 3: pid -1 is negative" in message
    assert f"python -m trpr.data.check folder --root {folder}" in message

    table.write_text("image,pid,text,split\nimages/ok1.png,1,a man,train\n")
    with pytest.raises(ValueError, match=r"annotations.csv line 1: the header lacks column\(s\) caption"):
        data.load_benchmark("folder", root=folder)
    (folder / "annotations.jsonl").write_text('{"image": "images/ok1.png"}\n')
    with pytest.raises(ValueError, match="both annotations.csv and annotations.jsonl exist"):
        data.load_benchmark("folder", root=folder)
    table.unlink()
    (folder / "annotations.jsonl").write_text('{"image": "images/ok1.png", "pid": 1, "caption": "a man", "split": "train"}\n'
                                              '{"image": "images/ok1.png", "pid": 1,\n')
    assert check.main(["folder", "--root", str(folder)]) == 1
    assert "annotations.jsonl line 2: malformed JSON" in capsys.readouterr().out
    (tmp_path / "no-table").mkdir()
    with pytest.raises(FileNotFoundError, match="no annotations.csv or annotations.jsonl"):
        data.load_benchmark("folder", root=tmp_path / "no-table")
    with pytest.raises(ValueError, match="needs root="):
        data.load_benchmark("folder")


def test_train_one_epoch_then_evaluate_and_search(example, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("TRPR_CACHE", str(tmp_path / "cache"))
    train_3rtpr.main(["--config", str(ROOT / "trpr" / "configs" / "synth-pedes.yaml"), "--data.dataset", "folder",
                      "--data.root", str(example), "--train.epochs", "1", "--train.batch_size", "48",
                      "--data.image_size", "[32, 16]", "--model.fused_dim", "64", "--model.backbone", TINY_BACKBONE,
                      "--data.num_workers", "0", "--logging.trackers", "[]", "--output-dir", str(run_dir),
                      "--final-test"])
    test_metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert 0.0 <= test_metrics["A+B/GE+FS"]["R1"] <= 100.0
    capsys.readouterr()
    assert eval_3rtpr.main(["--checkpoint", str(run_dir), "--dataset", "folder", "--root", str(example),
                            "--out", str(tmp_path / "eval"), "--batch-size", "16"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["checkpoints"][0]["rows"]["A+B/GE+FS"]["R1"] == pytest.approx(test_metrics["A+B/GE+FS"]["R1"], abs=1e-6)
    capsys.readouterr()
    assert eval_3rtpr.main(["search", "a man in a red jacket", "--checkpoint", str(run_dir), "--dataset", "folder",
                            "--root", str(example), "--top", "3", "--out", str(tmp_path / "search")]) == 0
    captured = capsys.readouterr()
    table = [line.split() for line in captured.out.splitlines() if line.strip()[:1].isdigit()]
    assert len(table) == 3 and all(row[3].startswith(str(example / "images" / "test")) for row in table)
    assert "encoded and cached" in captured.err
    search = ["search", "a man in a red jacket", "--checkpoint", str(run_dir), "--dataset", "folder", "--root",
              str(example), "--top", "3", "--out", str(tmp_path / "search")]
    assert eval_3rtpr.main(search) == 0 and "from cache" in capsys.readouterr().err
    stat = (example / "annotations.csv").stat()  # an edited table: the gallery is encoded again, not stale
    os.utime(example / "annotations.csv", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert eval_3rtpr.main(search) == 0 and "encoded and cached" in capsys.readouterr().err
