"""eval_3rtpr end to end on tiny random-init checkpoints and synth-pedes-tiny: reports equal the Python
API, seeds get a mean ± std row, the published leaderboard, planted free-text search, bad input."""
import io
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from trpr import data
import eval_3rtpr
from trpr import evaluation
from trpr import modeling
from trpr.data.tokenizer import get_tokenizer, tokenize
from trpr.reporting import evaluation as report

IMAGE_SIZE = (64, 32)
DATASET = "synth-pedes-tiny"


def _small_pair(head_seeds, select_ratio=0.2, image_tokens="all"):
    torch.manual_seed(head_seeds[0])
    return modeling.ReciprocalPair.from_clip(modeling.small_clip_config(), head_seeds=head_seeds,
                                             select_ratio=select_ratio, fused_dim=96, image_size=IMAGE_SIZE,
                                             image_tokens=image_tokens)


def _save_run(pair, run_dir: Path, sub: str, seed: int) -> Path:
    pair.save_pretrained(run_dir / sub)
    config = {"seed": seed, "output_dir": str(run_dir), "model": {"select_ratio": 0.2, "fused_dim": 96},
              "data": {"dataset": DATASET}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Dataset root with synth-pedes-tiny (also exposed as a CUHK-PEDES layout), two seed runs."""
    base = tmp_path_factory.mktemp("eval_cli")
    root = base / "datasets"
    splits = data.load_benchmark(DATASET, root=root)
    (root / "CUHK-PEDES").symlink_to(root / "SYNTH-PEDES-tiny", target_is_directory=True)
    run0 = _save_run(_small_pair((0, 1)), base / "runs" / "seed0", "best", seed=0)
    run1 = _save_run(_small_pair((2, 3)), base / "runs" / "seed1", "last", seed=1)
    return {"base": base, "root": root, "splits": splits, "runs": [run0, run1]}


def _api_rows(pair_dir, splits, i2t=False):
    pair = modeling.ReciprocalPair.from_pretrained(pair_dir)
    return evaluation.evaluate_pair(pair, splits["test_gallery"], splits["test_queries"], tokenizer=get_tokenizer(),
                                    image_size=IMAGE_SIZE, batch_size=16, i2t=i2t)


def test_cli_reports_equal_python_api(setup, capsys):
    out = setup["base"] / "eval"
    run0, run1 = setup["runs"]
    code = eval_3rtpr.main(["--checkpoint", str(run0), str(run1), "--dataset", DATASET, "--root", str(setup["root"]),
                            "--out", str(out), "--i2t", "--batch-size", "16"])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [c["name"] for c in results["checkpoints"]] == ["seed0", "seed1"]
    assert results["checkpoints"][1]["pair_dir"].endswith("last")  # run folder without best/ -> last/
    per_run = [_api_rows(run0 / "best", setup["splits"], i2t=True), _api_rows(run1 / "last", setup["splits"], i2t=True)]
    for checkpoint, expected in zip(results["checkpoints"], per_run):
        assert list(checkpoint["rows"]) == list(expected)
        assert len(expected) == 18 and "i2t:A+B/GE+FS" in expected
        for key, metrics in expected.items():
            assert checkpoint["rows"][key] == pytest.approx(metrics, abs=1e-9), key
        # CMC at rank 1 / 5 / 10 is R@1 / R@5 / R@10
        for key in report.ROW_KEYS:
            curve = checkpoint["cmc"][key]
            assert len(curve) == 20 and curve == sorted(curve)
            assert [curve[0], curve[4], curve[9]] == pytest.approx(
                [expected[key]["R1"], expected[key]["R5"], expected[key]["R10"]], abs=1e-9)
    # same config, two seeds -> one mean ± std group
    (group,) = results["seed_groups"]
    assert group["checkpoints"] == ["seed0", "seed1"]
    r1 = [per_run[0]["A+B/GE+FS"]["R1"], per_run[1]["A+B/GE+FS"]["R1"]]
    assert group["mean"]["A+B/GE+FS"]["R1"] == pytest.approx(sum(r1) / 2)
    assert group["std"]["A+B/GE+FS"]["R1"] == pytest.approx(abs(r1[0] - r1[1]) / 2 ** 0.5)
    markdown = (out / "leaderboard.md").read_text()
    expected_cell = f"| 3RTPR seed0 A/GE | {per_run[0]['A/GE']['R1']:.2f} | {per_run[0]['A/GE']['R5']:.2f} |"
    assert expected_cell in markdown and expected_cell in printed
    assert "## Image → text" in markdown and "ours (mean ± std), n=2" in markdown
    assert (out / results["cmc_plot"]).read_bytes()[:4] == b"\x89PNG"


def test_cli_leaderboard_places_rows_among_published(setup, capsys):
    out = setup["base"] / "eval_cuhk"
    pair_dir = setup["runs"][0] / "best"  # a pair folder directly
    assert eval_3rtpr.main(["--checkpoint", str(pair_dir), "--dataset", "CUHK-PEDES", "--root", str(setup["root"]),
                            "--out", str(out), "--leaderboard", "--batch-size", "16"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoints"][0]["name"] == "seed0/best"
    assert [p["method"] for p in results["published"]][-1] == "RDE (CVPR'24)"
    lines = [l for l in (out / "leaderboard.md").read_text().splitlines() if l.startswith("| ") and l[2].isdigit()]
    assert len(lines) == 9 + 5
    r1 = [float(l.split("|")[3]) for l in lines]
    assert r1 == sorted(r1, reverse=True)
    assert "| RDE (CVPR'24) | 75.94 | 90.14 | 94.12 | 67.56 | 51.44 | reported |" in "\n".join(lines)
    assert (out / "cmc_cuhk-pedes.png").is_file()


def test_leaderboard_says_synth_has_no_published_rows(setup):
    result = report.CheckpointResult(
        name="x", path="x", pair_dir="x", image_size=IMAGE_SIZE,
        rows={key: {"R1": 1.0, "R5": 2.0, "R10": 3.0, "mAP": 4.0, "mINP": 5.0} for key in report.ROW_KEYS},
        cmc={}, fingerprint="f")
    text = report.render_leaderboard([result], "synth-pedes", "test", with_published=True, i2t=False, cmc_png=None)
    assert "No published results exist for 'synth-pedes'" in text
    assert "| reported |" not in text and "| ours |" in text


def _plant_caption(pair, caption: str, target_pixels: torch.Tensor):
    """Rank-one edit of each model's text projection so that `caption`'s global text embedding equals the
    target image's global embedding (select_ratio 0: fused == global, so every score ranks it first)."""
    input_ids, attention_mask = tokenize(get_tokenizer(), [caption])
    eot = int(attention_mask.sum()) - 1
    for model in (pair.a, pair.b):
        model.eval()
        with torch.no_grad():
            target, _ = model.encode_image(target_pixels[None])
            captured = []
            hook = model.clip.text_projection.register_forward_hook(lambda m, i, o: captured.append(i[0]))
            model.encode_text(input_ids, attention_mask)
            hook.remove()
            hidden = captured[0][0, eot] if captured[0].dim() == 3 else captured[0][0]
            weight = model.clip.text_projection.weight  # [E, W]
            weight += torch.outer(target[0] - weight @ hidden, hidden) / hidden.dot(hidden)
            planted, _ = model.encode_text(input_ids, attention_mask)
        assert torch.nn.functional.cosine_similarity(planted, target).item() > 0.999


def test_search_finds_planted_image_and_caches_gallery(setup, capsys, monkeypatch):
    splits = setup["splits"]
    queries, gallery = splits["test_queries"], splits["test_gallery"]
    caption, target_image_id = queries[5]["caption"], queries[5]["image_id"]
    target_index = gallery["image_id"].index(target_image_id)
    pair = _small_pair((4, 5), select_ratio=0.0)
    _plant_caption(pair, caption, data.EvalImages(gallery, IMAGE_SIZE)[target_index]["pixel_values"])
    pair_dir = setup["base"] / "planted"
    pair.save_pretrained(pair_dir)
    monkeypatch.setenv("TRPR_CACHE", str(setup["base"] / "cache"))
    argv = ["search", caption, "--checkpoint", str(pair_dir), "--dataset", DATASET, "--root", str(setup["root"]),
            "--top", "5", "--out", str(setup["base"] / "search")]
    answers = []
    for _ in range(2):
        assert eval_3rtpr.main(argv) == 0
        captured = capsys.readouterr()
        answers.append((captured.out, captured.err))
    first_out, first_err = answers[0]
    second_out, second_err = answers[1]
    table = [line.split() for line in first_out.splitlines() if line.strip()[:1].isdigit()]
    assert len(table) == 5
    target_path = data.torch_datasets.image_sources(gallery)[target_index]
    assert table[0][3] == target_path and int(table[0][2]) == gallery[target_index]["pid"]
    assert float(table[0][1]) == pytest.approx(4.0, abs=1e-2)  # A+B/GE+FS: four cosines of 1
    assert "encoded and cached" in first_err and "from cache" in second_err
    assert second_out.split("grid:")[0] == first_out.split("grid:")[0]  # same matches from the cached features
    assert len(list((setup["base"] / "cache" / "search-features").glob("*.safetensors"))) == 1
    grid = evaluation.search_grid_path(setup["base"] / "search", caption)
    assert grid.name.startswith("search_") and grid.suffix == ".png"
    assert grid.read_bytes()[:4] == b"\x89PNG"
    # "-": one query per stdin line, answered from the same loaded model and cached gallery
    monkeypatch.setattr("sys.stdin", io.StringIO(f"a person in a red coat\n\n{caption}\n"))
    assert eval_3rtpr.main(["search", "-"] + argv[2:]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("query: ") == 2 and "from cache" in captured.err
    assert captured.out.split(f"query: {caption}")[1].split("grid:")[0] == first_out.split(f"query: {caption}")[1].split("grid:")[0]


def test_config_fingerprint_groups_seeds_only():
    base = {"seed": 0, "data": {"dataset": "cuhk-pedes", "root": "/a", "num_workers": 4},
            "model": {"fused_dim": 2048, "head_seeds": [0, 1]}, "eval": {"batch_size": 64}}
    other_seed = {"seed": 1, "data": {"dataset": "cuhk-pedes", "root": "/b", "num_workers": 0},
                  "model": {"fused_dim": 2048, "head_seeds": [2, 3]}, "eval": {"batch_size": 128}}
    other_recipe = dict(base, model={"fused_dim": 1024, "head_seeds": [0, 1]})
    fingerprint = report.config_fingerprint
    assert fingerprint(base, {}) == fingerprint(other_seed, {})
    assert fingerprint(base, {}) != fingerprint(other_recipe, {})
    # a bare pair folder (no run config) is described by its models
    assert fingerprint(None, {"fused_dim": 2048}) != fingerprint(None, {"fused_dim": 1024})


def _error_line(capsys, argv) -> str:
    assert eval_3rtpr.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("eval_3rtpr.py: error: ")
    return lines[-1]


def test_bad_input_is_one_line_error(setup, capsys, tmp_path):
    root, (run0, _) = str(setup["root"]), setup["runs"]
    common = ["--root", root, "--out", str(tmp_path / "o")]
    assert "no such folder" in _error_line(capsys, ["--checkpoint", str(tmp_path / "nope"), "--dataset", DATASET] + common)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "neither a run folder" in _error_line(capsys, ["--checkpoint", str(empty), "--dataset", DATASET] + common)
    broken = tmp_path / "broken"
    shutil.copytree(run0 / "best", broken)
    (broken / "model_b" / "model.safetensors").unlink()
    line = _error_line(capsys, ["--checkpoint", str(broken), "--dataset", DATASET] + common)
    assert "missing model_b/model.safetensors" in line and str(broken) in line
    incompatible = tmp_path / "incompatible"
    shutil.copytree(run0 / "best", incompatible)
    config_path = incompatible / "model_a" / "config.json"
    config = json.loads(config_path.read_text())
    config["fused_dim"] = 48
    config_path.write_text(json.dumps(config))
    line = _error_line(capsys, ["--checkpoint", str(incompatible), "--dataset", DATASET] + common)
    assert "cannot load" in line and "model_a" in line
    small_vocab = tmp_path / "small_vocab"
    modeling.ReciprocalPair.from_clip(modeling.small_clip_config(text_vocab_size=1000), fused_dim=96,
                                      image_size=IMAGE_SIZE).save_pretrained(small_vocab)
    line = _error_line(capsys, ["--checkpoint", str(small_vocab), "--dataset", DATASET] + common)
    assert "model_a/config.json has an incompatible text config (vocab_size 1000" in line
    damaged_root = tmp_path / "damaged"
    shutil.copytree(setup["root"] / "SYNTH-PEDES-tiny", damaged_root / "CUHK-PEDES")
    image = setup["splits"]["test_gallery"].cast_column("image", datasets.Image(decode=False))[3]["image"]["path"]
    damaged_image = damaged_root / "CUHK-PEDES" / Path(image).relative_to(setup["root"] / "SYNTH-PEDES-tiny")
    damaged_image.write_bytes(b"not an image")
    line = _error_line(capsys, ["--checkpoint", str(run0), "--dataset", "cuhk-pedes", "--root", str(damaged_root),
                                "--out", str(tmp_path / "o")])
    assert "cannot read image" in line and str(damaged_image) in line
    line = _error_line(capsys, ["--checkpoint", str(run0), "--dataset", "no-such-benchmark"] + common)
    assert "no-such-benchmark" in line
    line = _error_line(capsys, ["--checkpoint", str(run0), "--dataset", DATASET, "--split", "train"] + common)
    assert "no evaluation split 'train'" in line and "test, val" in line
    line = _error_line(capsys, ["search", "a man", "--checkpoint", str(run0), "--dataset", DATASET, "--root", root,
                                "--score", "C/GE"])
    assert "--score 'C/GE'" in line


def test_empty_split_is_reported(monkeypatch, setup):
    splits = setup["splits"]
    emptied = {"test_gallery": splits["test_gallery"].select([]), "test_queries": splits["test_queries"]}
    monkeypatch.setattr(data, "load_benchmark", lambda name, root=None: emptied, raising=False)
    with pytest.raises(evaluation.EvalInputError, match="split 'test' is empty \\(test_gallery has no rows\\)"):
        evaluation.load_eval_split(DATASET, None, "test")


def test_search_device_follows_cuda_availability(monkeypatch):
    """search runs its encoders on the GPU when there is one (issue 24: it ran on the CPU of a GPU machine)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_3rtpr.search_device("auto") == torch.device("cuda")
    assert eval_3rtpr.search_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_3rtpr.search_device("auto") == torch.device("cpu")
    with pytest.raises(eval_3rtpr.EvalInputError, match="no CUDA device"):
        eval_3rtpr.search_device("cuda")
