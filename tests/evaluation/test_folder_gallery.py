"""Search over a plain folder of images (`eval_3rtpr.py search --gallery DIR`): recursive scan of the common
formats, a planted caption found first, the index kept on disk (JSON + fp16 .npy shards) and updated file by
file (added / changed / removed, equal to a fresh build), unreadable files skipped with one warning,
queries from stdin, one-line errors for empty or missing folders."""
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval_3rtpr
from tests.test_eval_3rtpr import IMAGE_SIZE, _plant_caption, _small_pair
from trpr import data
from trpr.data.torch_datasets import image_sources
from trpr.evaluation import folder_gallery, resolve_checkpoint

CAPTION = "a person in a bright orange coat with a green backpack"
TARGET = "cam1/street/target.png"


def _make_gallery(folder: Path, sources: list) -> list[str]:
    """Copy synth-pedes images into nested folders in several formats; add files search must skip or refuse."""
    names = [TARGET, "cam1/a.jpg", "cam1/b.JPEG", "cam2/c.bmp", "cam2/d.webp", "cam2/deep/e.png", "f.png", "g.jpg"]
    for name, source in zip(names, sources):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(source).convert("RGB").save(path)
    (folder / "cam2" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".thumbnails").mkdir()
    Image.open(sources[0]).save(folder / ".thumbnails" / "hidden.png")
    return names


@pytest.fixture(scope="module")
def gallery_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("search_folder")
    splits = data.load_benchmark("synth-pedes-tiny", root=base / "datasets")
    sources = image_sources(splits["test_gallery"])
    photos = base / "photos"
    names = _make_gallery(photos, sources)
    pair = _small_pair((4, 5), select_ratio=0.0)
    target_pixels = folder_gallery.FolderImages([photos / TARGET], IMAGE_SIZE)[0]["pixel_values"]
    _plant_caption(pair, CAPTION, target_pixels)
    pair.save_pretrained(base / "planted")
    return {"base": base, "photos": photos, "names": names, "pair_dir": base / "planted", "sources": sources}


def _table(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]


def _search(argv, capsys):
    assert eval_3rtpr.main(argv) == 0
    return capsys.readouterr()


def test_folder_search_finds_planted_photo_and_updates_index(gallery_setup, capsys, monkeypatch, tmp_path):
    photos, base = gallery_setup["photos"], gallery_setup["base"]
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRPR_CACHE", str(cache))
    argv = ["search", CAPTION, "--checkpoint", str(gallery_setup["pair_dir"]), "--gallery", str(photos),
            "--top", "3", "--out", str(tmp_path / "grids"), "--batch-size", "4"]
    first = _search(argv, capsys)
    table = _table(first.out)
    assert len(table) == 3 and table[0][0] == "1" and table[0][2] == TARGET  # rank, score, relative path
    assert float(table[0][1]) == pytest.approx(4.0, abs=1e-2)  # A+B/GE+FS: four cosines of 1
    assert "gallery: 8 images" in first.err and "new index: 8 encoded" in first.err
    assert first.err.count("unreadable image file(s) skipped") == 1 and "cam2/broken.jpg" in first.err
    assert "hidden.png" not in first.out + first.err and "notes.txt" not in first.err
    grid = Path(first.out.split("grid: ")[1].split()[0])
    assert grid.read_bytes()[:4] == b"\x89PNG"
    stored = sorted(p.name.split(".", 1)[1] for p in (cache / "search-features").iterdir())
    assert stored == ["json", "shards"]  # metadata + the features as fp16 .npy shards, nothing pickled
    (generation,) = next((cache / "search-features").glob("*.shards")).iterdir()
    assert sorted({p.suffix for p in generation.iterdir()}) == [".json", ".npy"]

    second = _search(argv, capsys)
    assert "8 from cache, 0 added, 0 changed, 0 removed" in second.err
    assert second.out.split("grid:")[0] == first.out.split("grid:")[0]
    assert "cam2/broken.jpg" in second.err  # still listed, but not decoded again

    # add one file, change one (new bytes), remove one, repair the broken one
    shutil.copy(photos / "f.png", photos / "cam2" / "new.png")
    Image.open(gallery_setup["sources"][10]).convert("RGB").save(photos / "g.jpg")
    (photos / "cam1" / "a.jpg").unlink()
    Image.open(gallery_setup["sources"][11]).convert("RGB").save(photos / "cam2" / "broken.jpg")
    third = _search(argv, capsys)
    assert "gallery: 9 images" in third.err and "6 from cache, 1 added, 2 changed, 1 removed" in third.err
    assert "unreadable" not in third.err
    assert _table(third.out)[0][2] == TARGET

    # the updated index equals one built from scratch
    checkpoint = resolve_checkpoint(gallery_setup["pair_dir"])
    pair = eval_3rtpr.load_pair(checkpoint)
    updated = folder_gallery.load_folder_index(folder_gallery.folder_cache_stem(checkpoint, photos, cache / "search-features"),
                                               photos)
    fresh, update = folder_gallery.update_folder_index(pair, photos, tmp_path / "fresh" / "index", batch_size=4)
    assert not update.found and update.added == 9
    assert [f[0] for f in updated.files] == [f[0] for f in fresh.files] == sorted(f[0] for f in fresh.files)
    assert "cam1/a.jpg" not in [f[0] for f in updated.files] and "cam2/new.png" in [f[0] for f in updated.files]
    for (g_up, f_up), (g_new, f_new) in zip(updated.features, fresh.features):  # fp16 rows: one rounding apart at most
        torch.testing.assert_close(g_up, g_new, rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(f_up, f_new, rtol=2e-3, atol=1e-4)
    assert len(list((cache / "search-features").glob("*.shards/*"))) == 1  # replaced generations are dropped

    # "-": one query per stdin line, from the same index
    monkeypatch.setattr("sys.stdin", io.StringIO(f"a man in a blue jacket\n\n{CAPTION}\n"))
    stdin = _search(["search", "-"] + argv[2:], capsys)
    assert stdin.out.count("query: ") == 2 and "9 from cache, 0 added" in stdin.err
    assert _table(stdin.out.split(f"query: {CAPTION}")[1])[0][2] == TARGET


def test_damaged_or_mismatched_index_is_rebuilt(gallery_setup, tmp_path):
    photos = gallery_setup["photos"]
    pair = eval_3rtpr.load_pair(resolve_checkpoint(gallery_setup["pair_dir"]))
    stem = tmp_path / "index"
    index, _ = folder_gallery.update_folder_index(pair, photos, stem, batch_size=8)
    assert folder_gallery.load_folder_index(stem, photos) is not None
    meta = json.loads(stem.with_suffix(".json").read_text())
    meta["index_id"] = "another write"
    stem.with_suffix(".json").write_text(json.dumps(meta))
    assert folder_gallery.load_folder_index(stem, photos) is None  # the two files do not belong together
    rebuilt, update = folder_gallery.update_folder_index(pair, photos, stem, batch_size=8)
    assert not update.found and len(rebuilt.files) == len(index.files)
    next(folder_gallery.generation_dir(stem, rebuilt.index_id).glob("shard-*.npy")).write_bytes(b"garbage")
    assert folder_gallery.load_folder_index(stem, photos) is None


def _error_line(capsys, argv) -> str:
    assert eval_3rtpr.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_folder_gallery_bad_input_is_one_line_error(gallery_setup, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TRPR_CACHE", str(tmp_path / "cache"))
    common = ["--checkpoint", str(gallery_setup["pair_dir"]), "--out", str(tmp_path / "o")]
    line = _error_line(capsys, ["search", "a man"] + common + ["--gallery", str(tmp_path / "nope")])
    assert line == f"eval_3rtpr.py: error: --gallery {tmp_path / 'nope'}: no such folder"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    line = _error_line(capsys, ["search", "a man"] + common + ["--gallery", str(empty)])
    assert "no readable image" in line and str(empty) in line
    only_broken = tmp_path / "only_broken"
    only_broken.mkdir()
    (only_broken / "x.png").write_bytes(b"not a png")
    assert eval_3rtpr.main(["search", "a man"] + common + ["--gallery", str(only_broken)]) == 2
    err = capsys.readouterr().err
    assert "x.png" in err and err.strip().splitlines()[-1].endswith("1 unreadable file(s) listed above")
    line = _error_line(capsys, ["search", "a man"] + common + ["--gallery", str(empty), "--root", str(tmp_path)])
    assert "--root" in line
    with pytest.raises(SystemExit) as exit_info:  # argparse: --dataset and --gallery exclude each other
        eval_3rtpr.main(["search", "a man"] + common + ["--gallery", str(empty), "--dataset", "synth-pedes-tiny"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
