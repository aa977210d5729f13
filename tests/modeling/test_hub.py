"""Sharing checkpoints (modeling.hub.HubMixin): from_pretrained from a local folder and from a Hub repo id
through a Hub cache (offline, the cache laid out by hand as huggingface_hub lays it out), push_to_hub's
upload of today's folder format, and clear errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trpr import modeling
from trpr.modeling import ReciprocalPair, TRPRModel, small_clip_config

ROOT = Path(__file__).resolve().parents[2]
REVISION = "0123456789abcdef0123456789abcdef01234567"
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32)


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    torch.manual_seed(0)
    pair = ReciprocalPair.from_clip(small_clip_config(**TINY), fused_dim=64, image_size=(32, 16))
    folder = tmp_path_factory.mktemp("pair")
    pair.save_pretrained(folder)
    return pair, folder


def fake_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """`folder` as the `main` snapshot of model repo `repo_id` in a Hub cache (models--org--name layout)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return repo


def assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    expected = original.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_local_folder_keeps_todays_format(saved_pair):
    pair, folder = saved_pair
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == ["README.md", "model_a/README.md", "model_a/config.json", "model_a/model.safetensors",
                     "model_b/README.md", "model_b/config.json", "model_b/model.safetensors", "pair.json"]
    assert json.loads((folder / "model_a" / "config.json").read_text())["model_type"] == "3rtpr"
    assert "library_name: 3rtpr" in (folder / "README.md").read_text()
    assert_same_weights(ReciprocalPair.from_pretrained(folder), pair)
    assert_same_weights(TRPRModel.from_pretrained(str(folder / "model_b")), pair.b)


def test_hub_repo_id_loads_from_the_cache(saved_pair, tmp_path):
    pair, folder = saved_pair
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "org/tiny-pair", folder)
    fake_hub_cache(cache, "org/tiny-model", folder / "model_a")
    assert_same_weights(ReciprocalPair.from_pretrained("org/tiny-pair", cache_dir=cache), pair)
    assert_same_weights(ReciprocalPair.from_pretrained("org/tiny-pair", cache_dir=cache, revision=REVISION), pair)
    assert_same_weights(TRPRModel.from_pretrained("org/tiny-model", cache_dir=cache), pair.a)
    with pytest.raises(OSError, match="Hub repo 'org/absent' could not be fetched"):
        ReciprocalPair.from_pretrained("org/absent", cache_dir=cache)


def test_hub_cache_from_the_environment_offline(saved_pair, tmp_path):
    """A fresh process with HF_HUB_CACHE and HF_HUB_OFFLINE=1, as a user would run it."""
    pair, folder = saved_pair
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "org/tiny-pair", folder)
    expected = tmp_path / "expected.pt"
    torch.save({name: t.clone() for name, t in pair.state_dict().items()}, expected)
    code = ("import sys, torch; from trpr.modeling import ReciprocalPair; "
            "pair = ReciprocalPair.from_pretrained('org/tiny-pair'); expected = torch.load(sys.argv[1]); "
            "state = pair.state_dict(); assert state.keys() == expected.keys(); "
            "assert all(torch.equal(state[k], v) for k, v in expected.items()); print('loaded', len(state))")
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    finished = subprocess.run([sys.executable, "-c", code, str(expected)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.startswith("loaded ")


def test_push_to_hub_uploads_the_saved_folder(saved_pair, tmp_path, monkeypatch):
    pair, _ = saved_pair
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploaded["repo_id"] = repo_id
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            return f"https://hub.example/{repo_id}/commit/1"

    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", FakeApi)
    assert pair.push_to_hub("org/tiny-pair").endswith("/commit/1")
    assert uploaded["repo_id"] == "org/tiny-pair"
    assert_same_weights(ReciprocalPair.from_pretrained(tmp_path / "uploaded"), pair)


def test_bad_names_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ReciprocalPair.from_pretrained(tmp_path / "runs" / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        modeling.TRPRModel.from_pretrained(tmp_path / "file")


def test_evaluation_resolves_a_repo_id_to_its_snapshot(saved_pair, tmp_path, monkeypatch):
    from trpr import evaluation

    _, folder = saved_pair
    cache = tmp_path / "hub"
    repo = fake_hub_cache(cache, "org/tiny-pair", folder)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    checkpoint = evaluation.resolve_checkpoint("org/tiny-pair")
    assert checkpoint.name == "org/tiny-pair" and checkpoint.pair_dir == repo / "snapshots" / REVISION
    assert evaluation.load_pair(checkpoint).a.fused_dim == 64
    with pytest.raises(evaluation.EvalInputError, match="Hub repo 'org/absent' could not be fetched"):
        evaluation.resolve_checkpoint("org/absent")
