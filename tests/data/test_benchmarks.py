"""load_benchmark on fixtures written in each official layout; noise; bad input; python -m trpr.data.check."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

from trpr.data import load_benchmark
from trpr.data.check import check_benchmark, main as check_main

# (folder, annotation file, image key, splits present)
FORMATS = {
    "cuhk-pedes": ("CUHK-PEDES", "reid_raw.json", "file_path", ("train", "val", "test")),
    "icfg-pedes": ("ICFG-PEDES", "ICFG-PEDES.json", "file_path", ("train", "test")),
    "rstpreid": ("RSTPReid", "data_captions.json", "img_path", ("train", "val", "test")),
}
# raw ids per split: deliberately non-contiguous and unsorted, so renumbering is visible
RAW_IDS = {"train": [17, 5, 9], "val": [40, 33], "test": [102, 100]}
IMAGES_PER_ID = 2


def captions_for(fmt, raw_id, shot):
    # ICFG-PEDES has one caption per image, the others two
    count = 1 if fmt == "icfg-pedes" else 2
    return [f"person {raw_id} image {shot} caption {c}" for c in range(count)]


def write_fixture(root, fmt, mutate=None):
    """Write a tiny benchmark in `fmt`'s official layout under root; returns the entries written."""
    folder, annotation, image_key, splits = FORMATS[fmt]
    entries = []
    for split in splits:
        for raw_id in RAW_IDS[split]:
            for shot in range(IMAGES_PER_ID):
                path = f"{split}/{raw_id}_{shot}.png"
                file = root / folder / "imgs" / path
                file.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 8), (raw_id % 256, shot * 50, 10)).save(file)
                entry = {"split": split, "captions": captions_for(fmt, raw_id, shot), image_key: path, "id": raw_id}
                if fmt != "rstpreid":
                    entry["processed_tokens"] = [c.split() for c in entry["captions"]]
                entries.append(entry)
    if mutate is not None:
        mutate(entries)
    (root / folder / annotation).write_text(json.dumps(entries), encoding="utf-8")
    return entries


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_splits_counts_and_columns(tmp_path, fmt):
    write_fixture(tmp_path, fmt)
    dd = load_benchmark(fmt, root=tmp_path)
    _, _, _, splits = FORMATS[fmt]
    expected_splits = {"train"} | {f"{s}_{kind}" for s in splits if s != "train" for kind in ("gallery", "queries")}
    assert set(dd) == expected_splits
    per_image = 1 if fmt == "icfg-pedes" else 2
    train = dd["train"]
    assert train.column_names == ["index", "pid", "image_id", "image", "caption", "noisy"]
    assert len(train) == len(RAW_IDS["train"]) * IMAGES_PER_ID * per_image  # one row per caption
    assert train["index"] == list(range(len(train)))
    assert not any(train["noisy"])
    for split in splits[1:]:
        gallery, queries = dd[f"{split}_gallery"], dd[f"{split}_queries"]
        assert gallery.column_names == ["pid", "image_id", "image"]
        assert queries.column_names == ["pid", "caption", "image_id"]
        assert len(gallery) == len(RAW_IDS[split]) * IMAGES_PER_ID
        assert len(queries) == len(gallery) * per_image
        assert gallery["image_id"] == list(range(len(gallery)))
        # each query points at its own gallery image, which has the query's pid
        gallery_pids = gallery["pid"]
        for pid, image_id, caption in zip(queries["pid"], queries["image_id"], queries["caption"]):
            assert gallery_pids[image_id] == pid
            raw_id, shot = int(caption.split()[1]), int(caption.split()[3])
            assert gallery[image_id]["image"].getpixel((0, 0))[:2] == (raw_id % 256, shot * 50)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_pid_renumbering_and_images(tmp_path, fmt):
    write_fixture(tmp_path, fmt)
    train = load_benchmark(fmt, root=tmp_path)["train"]
    # raw ids 5, 9, 17 -> 0, 1, 2 (sorted order); the caption names the raw id
    mapping = {int(c.split()[1]): pid for c, pid in zip(train["caption"], train["pid"])}
    assert mapping == {5: 0, 9: 1, 17: 2}
    assert sorted(set(train["pid"])) == [0, 1, 2]
    row = train[3]
    assert row["image"].size == (4, 8)  # decoded from the file path
    raw_id, shot = int(row["caption"].split()[1]), int(row["caption"].split()[3])
    assert row["image"].getpixel((0, 0))[:2] == (raw_id % 256, shot * 50)
    # captions of one image share its image_id
    image_ids = train["image_id"]
    assert len(set(image_ids)) == len(RAW_IDS["train"]) * IMAGES_PER_ID


def test_names_are_case_insensitive_and_summary_logged(tmp_path, caplog):
    write_fixture(tmp_path, "cuhk-pedes")
    write_fixture(tmp_path, "rstpreid")
    with caplog.at_level(logging.INFO, logger="trpr.data.benchmarks"):
        assert len(load_benchmark("CUHK-PEDES", root=tmp_path)["train"]) == 12
        assert len(load_benchmark("RSTPReid", root=str(tmp_path))["train"]) == 12
    text = caplog.text
    assert "train" in text and "captions" in text
    # the fixture is far smaller than the official release: a clear warning per split
    assert "official release" in text and "'val'" in text


def test_noise_from_rate_and_file(tmp_path):
    write_fixture(tmp_path, "cuhk-pedes")
    clean = load_benchmark("cuhk-pedes", root=tmp_path)["train"]
    out = tmp_path / "run" / "noise_permutation.npy"
    noisy = load_benchmark("cuhk-pedes", root=tmp_path, noise_rate=0.5, seed=3, noise_out=out)["train"]
    permutation = np.load(out)
    assert permutation.dtype == np.int64 and sorted(permutation.tolist()) == list(range(len(clean)))
    assert (permutation != np.arange(len(clean))).sum() <= round(0.5 * len(clean))
    assert (permutation != np.arange(len(clean))).sum() >= 2
    expected = [clean["caption"][j] for j in permutation]
    assert noisy["caption"] == expected
    assert noisy["noisy"] == [a != b for a, b in zip(expected, clean["caption"])]
    assert noisy["pid"] == clean["pid"] and noisy["image_id"] == clean["image_id"]
    # the same seed gives the same permutation; the saved file reproduces the noisy split
    again = load_benchmark("cuhk-pedes", root=tmp_path, noise_rate=0.5, seed=3)["train"]
    assert again["caption"] == noisy["caption"]
    from_file = load_benchmark("cuhk-pedes", root=tmp_path, noise_file=out)["train"]
    assert from_file["caption"] == noisy["caption"] and from_file["noisy"] == noisy["noisy"]
    # RDE convention: caption of sample i becomes caption[pi(i)]
    custom = np.roll(np.arange(len(clean)), 1).astype(np.int64)
    np.save(tmp_path / "roll.npy", custom)
    rolled = load_benchmark("cuhk-pedes", root=tmp_path, noise_file=tmp_path / "roll.npy")["train"]
    assert rolled["caption"][0] == clean["caption"][-1] and rolled["caption"][1] == clean["caption"][0]
    assert all(rolled["noisy"])


def test_missing_folder_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="CUHK-PEDES"):
        load_benchmark("cuhk-pedes", root=tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("market-1501", root=tmp_path)
    with pytest.raises(ValueError, match="root"):
        load_benchmark("icfg-pedes")


def test_malformed_json_names_file_and_position(tmp_path):
    write_fixture(tmp_path, "icfg-pedes")
    path = tmp_path / "ICFG-PEDES" / "ICFG-PEDES.json"
    path.write_text(path.read_text()[:-20] + "\n{oops", encoding="utf-8")
    with pytest.raises(ValueError, match=r"ICFG-PEDES\.json: malformed JSON at line 2"):
        load_benchmark("icfg-pedes", root=tmp_path)


@pytest.mark.parametrize("mutation, message", [
    (lambda e: e[4].pop("captions"), r"entry 4 \(img_path='train/9_0.png'\) lacks key 'captions'"),
    (lambda e: e[1].pop("id"), r"entry 1 .* lacks key 'id'"),
    (lambda e: e[2].update(split="training"), r"entry 2 .* unknown split 'training'"),
    (lambda e: e[3].update(id="17"), r"entry 3 .* non-integer id"),
    (lambda e: e[0].update(captions=[]), r"entry 0 .* no captions"),
])
def test_bad_entries_name_file_and_entry(tmp_path, mutation, message):
    write_fixture(tmp_path, "rstpreid", mutate=mutation)
    with pytest.raises(ValueError, match=message) as info:
        load_benchmark("rstpreid", root=tmp_path)
    assert "data_captions.json" in str(info.value)


def test_empty_caption_dropped_with_warning(tmp_path, caplog):
    write_fixture(tmp_path, "cuhk-pedes", mutate=lambda e: e[0]["captions"].__setitem__(1, "  "))
    with caplog.at_level(logging.WARNING, logger="trpr.data.benchmarks"):
        train = load_benchmark("cuhk-pedes", root=tmp_path)["train"]
    assert len(train) == 11 and "1 blank caption(s) (dropped)" in caplog.text


@pytest.mark.parametrize("bad, message", [
    (np.arange(5, dtype=np.int64), "has 5 entries but the training split has 12"),
    (np.zeros(12, dtype=np.int64), "appears 12 times"),
    (np.arange(12, dtype=np.float32), "integer"),
    (np.arange(1, 13, dtype=np.int64), "outside"),
])
def test_bad_noise_file(tmp_path, bad, message):
    write_fixture(tmp_path, "cuhk-pedes")
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(ValueError, match=message) as info:
        load_benchmark("cuhk-pedes", root=tmp_path, noise_file=tmp_path / "bad.npy")
    assert "bad.npy" in str(info.value)
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        load_benchmark("cuhk-pedes", root=tmp_path, noise_file=tmp_path / "absent.npy")


def test_check_passes_on_a_good_fixture(tmp_path, capsys):
    write_fixture(tmp_path, "cuhk-pedes")
    assert check_main(["cuhk-pedes", "--root", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "OK: no problems found" in report and "WARNING" in report  # tiny != official counts


def test_check_reports_every_problem(tmp_path, capsys):
    def break_it(entries):
        entries[0]["captions"] = []                          # no captions
        entries[1]["split"] = "dev"                          # unknown split
        entries[2]["file_path"] = entries[3]["file_path"]    # duplicate path (entry 3 is then the duplicate)
        entries[4]["id"] = -3                                # bad id
        del entries[5]["captions"]                           # missing key
        entries[6]["id"] = 5                                 # a train id in the val split
        entries[7]["file_path"] = "val/nowhere.png"          # missing image
    write_fixture(tmp_path, "cuhk-pedes", mutate=break_it)
    (tmp_path / "CUHK-PEDES" / "imgs" / "val" / "33_0.png").write_bytes(b"not a png")  # unreadable image
    problems, _, _ = check_benchmark("cuhk-pedes", str(tmp_path), progress=False)
    assert set(problems) == {"empty captions", "unknown split", "duplicate paths", "bad id", "missing keys",
                             "id in several splits", "missing images", "unreadable images"}
    # one problem per broken thing: the entry with the unknown split adds nothing else (its id 17 is not
    # reported in two splits), and the unknown split names only the splits CUHK-PEDES has
    assert {category: len(items) for category, items in problems.items()} == {
        "empty captions": 1, "unknown split": 1, "duplicate paths": 1, "bad id": 1, "missing keys": 1,
        "id in several splits": 1, "missing images": 1, "unreadable images": 1}
    assert problems["id in several splits"] == ["id 5 appears in splits ['train', 'val'] (identities must be "
                                                "disjoint across splits)"]
    assert check_main(["cuhk-pedes", "--root", str(tmp_path)]) == 1
    report = capsys.readouterr().out
    assert "FAILED" in report and "entry 7" in report and "nowhere.png" in report
    # a missing folder is a clean failure too
    assert check_main(["icfg-pedes", "--root", str(tmp_path)]) == 1


def test_no_count_warning_when_counts_match_the_release(tmp_path, caplog, monkeypatch):
    from trpr.data import benchmarks

    write_fixture(tmp_path, "icfg-pedes")
    matching = benchmarks.BenchmarkLayout("icfg-pedes", "ICFG-PEDES", "ICFG-PEDES.json", "file_path", ("train", "test"),
                                          {"train": (3, 6, 6), "test": (2, 4, 4)})
    monkeypatch.setitem(benchmarks.LAYOUTS, "icfg-pedes", matching)
    with caplog.at_level(logging.INFO, logger="trpr.data.benchmarks"):
        load_benchmark("icfg-pedes", root=tmp_path)
    assert "official release" not in caplog.text and "train" in caplog.text
    mismatching = benchmarks.BenchmarkLayout("icfg-pedes", "ICFG-PEDES", "ICFG-PEDES.json", "file_path",
                                             ("train", "test"), {"train": (3, 6, 6), "test": (2, 4, 5)})
    monkeypatch.setitem(benchmarks.LAYOUTS, "icfg-pedes", mismatching)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trpr.data.benchmarks"):
        load_benchmark("icfg-pedes", root=tmp_path)
    assert "split 'test'" in caplog.text and "official release has (2, 4, 5)" in caplog.text
    assert "split 'train'" not in caplog.text


def test_relative_root_gives_absolute_image_paths(tmp_path, monkeypatch):
    write_fixture(tmp_path, "rstpreid")
    monkeypatch.chdir(tmp_path)
    train = load_benchmark("rstpreid", root=".")["train"]
    monkeypatch.chdir("/")
    assert train[0]["image"].size == (4, 8)


def test_bad_noise_rate(tmp_path, caplog):
    write_fixture(tmp_path, "cuhk-pedes")
    for bad in (1.5, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"noise_rate must lie in \[0, 1\)"):
            load_benchmark("cuhk-pedes", root=tmp_path, noise_rate=bad)
    np.save(tmp_path / "id.npy", np.arange(12, dtype=np.int64))
    with caplog.at_level(logging.WARNING, logger="trpr.data.benchmarks"):
        train = load_benchmark("cuhk-pedes", root=tmp_path, noise_rate=0.5, noise_file=tmp_path / "id.npy")["train"]
    assert not any(train["noisy"]) and "noise_rate=0.5 is not used" in caplog.text
