"""Generated model cards (modeling.card): save_pretrained / push_to_hub write a README.md whose metadata and
text come from the run's config and evaluation results: base model, datasets, noise rate, recipe, the
Hub's model-index (R@1/R@5/R@10/mAP/mINP per evaluated split), limitations, citation."""
import json
import shutil

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from trpr.evaluation.checkpoints import load_pair, resolve_checkpoint
from trpr.modeling import ReciprocalPair, small_clip_config
from trpr.modeling import card as cards

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32)
ROW = "A+B/GE+FS"


def _rows(r1):
    return {row: {"R1": r1 + i, "R5": 50.0 + i, "R10": 60.0 + i, "mAP": 40.125 + i, "mINP": 20.5 + i}
            for i, row in enumerate(["A/GE", ROW])}


CONFIG = {"seed": 3, "data": {"dataset": "cuhk-pedes", "noise_rate": 0.5, "image_size": [384, 128]},
          "model": {"backbone": "openai/clip-vit-base-patch16", "select_ratio": 0.2, "fused_dim": 64,
                    "image_tokens": "topk"},
          "loss": {"lambda_sdm": 1.0, "lambda_trl": 0.0}, "alr": {"enabled": True, "start_epoch": 1, "models": 2},
          "optim": {"backbone_lr": 1e-5, "head_lr": 1e-3, "warmup_epochs": 5},
          "train": {"epochs": 60, "batch_size": 128}, "eval": {"split": "val", "select_row": ROW}}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return ReciprocalPair.from_clip(small_clip_config(**TINY), fused_dim=64, image_size=(32, 16))


def test_card_metadata_comes_from_the_record(pair, tmp_path):
    pair.run_record = {"config": CONFIG, "results": {
        "val": {"split": "val", "dataset": "cuhk-pedes", "rows": _rows(70.0)},
        "test": {"split": "test", "dataset": "cuhk-pedes", "rows": _rows(72.25)}}}
    pair.save_pretrained(tmp_path / "pair")
    card = ModelCard.load(tmp_path / "pair" / "README.md")
    assert card.data.base_model == "openai/clip-vit-base-patch16" and card.data.datasets == ["cuhk-pedes"]
    assert card.data.library_name == "3rtpr"
    got = {(r.dataset_split, r.metric_name.split(" ")[0]): r.metric_value for r in card.data.eval_results}
    # one result per split and metric, of the selection row (the A/GE row is only in the table)
    assert got == {("val", "R@1"): 71.0, ("val", "R@5"): 51.0, ("val", "R@10"): 61.0, ("val", "mAP"): 41.12,
                   ("val", "mINP"): 21.5, ("test", "R@1"): 73.25, ("test", "R@5"): 51.0, ("test", "R@10"): 61.0,
                   ("test", "mAP"): 41.12, ("test", "mINP"): 21.5}
    assert all(r.task_type == "text-to-image" and r.dataset_name == "cuhk-pedes" for r in card.data.eval_results)
    text = card.text
    assert "noise rate: 0.5" in text and "60 epochs, global batch 128" in text and "`openai/clip-vit-base-patch16`" in text
    assert "| test (cuhk-pedes) | A+B/GE+FS | 73.25 | 51.00 | 61.00 | 41.12 | 21.50 |" in text
    assert "privacy and surveillance" in text and "@Article{Nguyen25TIP" in text
    # the record travels with the folder: loading and saving again gives the same card
    again = ReciprocalPair.from_pretrained(tmp_path / "pair")
    assert again.run_record == json.loads(json.dumps(pair.run_record))
    again.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_text() == (tmp_path / "pair" / "README.md").read_text()


def test_card_without_a_record_says_so(pair, tmp_path):
    pair.run_record = None
    pair.save_pretrained(tmp_path / "bare")
    card = ModelCard.load(tmp_path / "bare" / "README.md")
    assert card.data.eval_results is None and card.data.base_model is None
    assert "No training record" in card.text and "No evaluation results" in card.text
    assert "privacy" in card.text
    assert "run" not in json.loads((tmp_path / "bare" / "pair.json").read_text())


def _run_folder(pair, run_dir):
    """A run folder as the trainer and eval_3rtpr.py leave it (best/, config, metrics, results.json)."""
    pair.run_record = None
    pair.save_pretrained(run_dir / "best")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    records = [{"epoch": 0, "val": _rows(10.0), "best_epoch": 0}, {"epoch": 1, "val": _rows(30.0), "best_epoch": 1},
               {"epoch": 2, "val": _rows(20.0), "best_epoch": 1}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "test_metrics.json").write_text(json.dumps({"checkpoint": "best", **_rows(33.0)}))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "results.json").write_text(json.dumps(
        {"dataset": "icfg-pedes", "split": "test", "checkpoints": [{"name": "x", "rows": _rows(5.0)}]}))
    return run_dir


def test_run_record_from_a_run_folder_and_push_to_hub(pair, tmp_path, monkeypatch):
    run_dir = _run_folder(pair, tmp_path / "run")
    record = cards.read_run_record(run_dir)
    assert record["config"] == CONFIG
    assert record["results"]["val"]["epoch"] == 1 and record["results"]["val"]["rows"][ROW]["R1"] == 31.0
    assert record["results"]["test"]["rows"][ROW]["R1"] == 34.0
    assert record["results"]["test (eval/)"] == {"split": "test", "dataset": "icfg-pedes", "rows": _rows(5.0)}
    loaded = load_pair(resolve_checkpoint(str(run_dir)))  # what eval_3rtpr / 3rtpr-app load
    assert loaded.run_record == record
    uploaded = tmp_path / "uploaded"

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            shutil.copytree(folder_path, uploaded)
            return f"https://hub.example/{repo_id}/commit/1"

    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", FakeApi)
    assert loaded.push_to_hub("org/run").endswith("/commit/1")
    card = ModelCard.load(uploaded / "README.md")
    splits = {(r.dataset_name, r.dataset_split) for r in card.data.eval_results}
    assert splits == {("cuhk-pedes", "val"), ("cuhk-pedes", "test"), ("icfg-pedes", "test")}
    assert sorted(card.data.datasets) == ["cuhk-pedes", "icfg-pedes"]


def test_card_cli_saves_the_selected_checkpoint(pair, tmp_path, capsys):
    run_dir = _run_folder(pair, tmp_path / "run")
    assert cards.main([str(run_dir), "--save-to", str(tmp_path / "out")]) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert {r.metric_value for r in card.data.eval_results if r.metric_name.startswith("R@1 ")} == {31.0, 34.0, 6.0}
    assert cards.main([str(tmp_path / "nothing"), "--save-to", str(tmp_path / "x")]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_damaged_run_files_are_skipped(pair, tmp_path):
    run_dir = _run_folder(pair, tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 3, "val": {"A')  # cut by a crash
    (run_dir / "test_metrics.json").write_text("{not json")
    record = cards.read_run_record(run_dir)
    assert set(record["results"]) == {"val", "test"} and record["results"]["test"]["dataset"] == "icfg-pedes"
    assert record["results"]["val"]["rows"][ROW]["R1"] == 31.0
