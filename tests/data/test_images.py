"""Image rules (16-bit, alpha, tiny, unreadable), verify_images (parallel, cached, error/skip), and the
agreement of load_benchmark / verify_images / TrainViews with python -m trpr.data.check; annotation encoding."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from trpr import data
from trpr.data import images as images_lib
from trpr.data.check import check_benchmark, main as check_main
from trpr.data.images import ALPHA_BACKGROUND, ImageCheckError, image_problem, open_image, verify_images
from trpr.data.tokenizer import get_tokenizer
from tests.data.test_benchmarks import write_fixture

IMAGE_DIR = ("CUHK-PEDES", "imgs")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_16_bit_png_is_scaled_to_8_bit(tmp_path):
    values = np.array([[0, 257, 32768, 65535]] * 4, dtype=np.uint16)  # 4x4 grey
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(open_image(str(path)))
    assert rgb.shape == (4, 4, 3) and (rgb == rgb[..., :1]).all()
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]  # not pure white (PIL's I;16 -> RGB clips to 255)
    assert image_problem(str(path)) is None


def test_alpha_is_composited_on_the_documented_background(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 20, 255)   # opaque: kept
    rgba[0, 1] = (200, 10, 20, 0)     # transparent: the background
    rgba[0, 2] = (255, 255, 255, 128)  # half: a blend
    source = _png_bytes(Image.fromarray(rgba, "RGBA"))
    out = np.asarray(open_image(source)).astype(int)
    assert out[0, 0].tolist() == [200, 10, 20]
    assert out[0, 1].tolist() == list(ALPHA_BACKGROUND)
    expected = [round((255 * 128 + c * 127) / 255) for c in ALPHA_BACKGROUND]
    assert np.abs(out[0, 2] - np.array(expected)).max() <= 1
    # a palette image with a transparent colour is composited too
    palette = Image.fromarray(np.zeros((4, 4), dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert np.asarray(open_image(_png_bytes(palette)))[0, 0].tolist() == list(ALPHA_BACKGROUND)


@pytest.mark.parametrize("make, reason", [
    (lambda p: Image.new("RGB", (1, 1)).save(p), r"image is 1x1 px; images smaller than 4 px"),
    (lambda p: Image.new("RGB", (40, 3)).save(p), r"image is 40x3 px"),
    (lambda p: p.write_bytes(_png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)))[:60]), r"truncated|broken"),
    (lambda p: p.write_bytes(b"not an image"), r"cannot identify image file"),
    (lambda p: Image.new("F", (8, 8)).save(p.with_suffix(".tif")) or os.replace(p.with_suffix(".tif"), p),
     r"floating-point image"),
])
def test_refused_images_name_file_and_reason(tmp_path, make, reason):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(OSError, match=reason) as info:
        open_image(str(path))
    assert str(info.value).startswith(f"cannot read image {path}: ")
    assert image_problem(str(path)) is not None
    assert image_problem(str(tmp_path / "absent.png")) == "file not found"


def _broken_fixture(root):
    """cuhk-pedes fixture with: a truncated train image, a 1x1 train image, a 16-bit val image."""
    write_fixture(root, "cuhk-pedes")
    folder = root.joinpath(*IMAGE_DIR)
    (folder / "train" / "5_0.png").write_bytes(_png_bytes(Image.new("RGB", (32, 64), (1, 2, 3)))[:70])
    Image.new("RGB", (1, 1)).save(folder / "train" / "9_1.png")
    Image.fromarray(np.full((8, 4), 40000, dtype=np.uint16)).save(folder / "val" / "40_0.png")
    return folder


def test_verify_images_error_names_every_bad_file(tmp_path):
    folder = _broken_fixture(tmp_path)
    splits = data.load_benchmark("cuhk-pedes", root=tmp_path)
    with pytest.raises(ImageCheckError) as info:
        verify_images(splits["train"], cache_dir=tmp_path / "cache", name="cuhk-pedes/train", progress=False)
    message = str(info.value)
    assert "cuhk-pedes/train: 2 unusable image(s), 4 of 12 rows" in message  # two captions per image
    assert f"{folder / 'train' / '5_0.png'}: " in message and f"{folder / 'train' / '9_1.png'}: image is 1x1" in message
    assert "skip" in message
    # the validation split (16-bit image) is fine and its image is not white
    check = verify_images(splits["val_gallery"], cache_dir=tmp_path / "cache", name="cuhk-pedes/val", progress=False)
    assert check.keep.tolist() == list(range(4)) and not check.bad
    gallery = data.EvalImages(splits["val_gallery"], (8, 4))
    grey = round(40000 * 255 / 65535)
    expected = (grey / 255 - torch.tensor(data.transforms.CLIP_MEAN)) / torch.tensor(data.transforms.CLIP_STD)
    assert torch.allclose(gallery[0]["pixel_values"][:, 0, 0], expected, atol=1e-5)


def test_verify_images_skip_returns_the_rows_to_keep(tmp_path, caplog):
    _broken_fixture(tmp_path)
    train = data.load_benchmark("cuhk-pedes", root=tmp_path)["train"]
    check = verify_images(train, policy="skip", cache_dir=tmp_path / "cache", name="cuhk-pedes/train",
                          progress=False, num_threads=3)
    sources = data.torch_datasets.image_sources(train)
    bad_rows = [row for row, source in enumerate(sources) if source.endswith(("5_0.png", "9_1.png"))]
    assert len(bad_rows) == 4 and check.keep.tolist() == [r for r in range(12) if r not in bad_rows]
    assert check.keep.dtype == np.int64 and check.num_rows == 12 and len(check.bad) == 2
    assert "5_0.png" in caplog.text and "9_1.png" in caplog.text  # reported
    kept = data.keep_rows(train, check.keep)
    views = data.TrainViews(kept, get_tokenizer(), (16, 8))
    assert [views[(0, i)]["index"] for i in range(len(views))] == list(range(8))  # every kept row loads
    assert kept["caption"][:] == [train["caption"][r] for r in check.keep]
    with pytest.raises(ValueError, match="image policy must be one of"):
        verify_images(train, policy="ignore")


def test_verify_images_is_cached_until_a_file_changes(tmp_path, monkeypatch):
    write_fixture(tmp_path, "rstpreid")
    gallery = data.load_benchmark("rstpreid", root=tmp_path)["test_gallery"]
    first = verify_images(gallery, cache_dir=tmp_path / "cache", name="rstpreid/test", progress=False)
    assert not first.cached and len(list((tmp_path / "cache").glob("rstpreid_test-*.json"))) == 1
    decoded = []
    monkeypatch.setattr(images_lib, "image_problem", lambda source: decoded.append(source))
    again = verify_images(gallery, cache_dir=tmp_path / "cache", name="rstpreid/test", progress=False)
    assert again.cached and decoded == [] and again.keep.tolist() == first.keep.tolist()
    # a changed file (size and mtime) invalidates the cache: everything is decoded again
    changed = tmp_path / "RSTPReid" / "imgs" / "test" / "100_0.png"
    Image.new("RGB", (9, 9)).save(changed)
    os.utime(changed, ns=(1, 1))
    third = verify_images(gallery, cache_dir=tmp_path / "cache", name="rstpreid/test", progress=False)
    assert not third.cached and len(decoded) == 4


def test_train_views_refuse_a_bad_image_with_its_name(tmp_path):
    folder = _broken_fixture(tmp_path)
    train = data.load_benchmark("cuhk-pedes", root=tmp_path)["train"]
    views = data.TrainViews(train, get_tokenizer(), (16, 8))
    row = data.torch_datasets.image_sources(train).index(str(folder / "train" / "9_1.png"))
    with pytest.raises(OSError, match=r"9_1\.png: image is 1x1 px"):
        views[row]


# ----------------------------------------------------------------------------- loader == data.check
def _duplicate_entry(entries):
    entries.append(dict(entries[2]))


def _duplicate_path_other_captions(entries):
    entries.append(dict(entries[2], captions=["someone else entirely"]))


def _blank_caption(entries):
    entries[0]["captions"][1] = "   "


def _negative_id(entries):
    for entry in entries:
        if entry["id"] == 5:
            entry["id"] = -5


def _shared_identity(entries):
    entries[6]["id"] = 9


def _tiny_image(entries, root):
    Image.new("RGB", (2, 2)).save(root.joinpath(*IMAGE_DIR) / entries[3]["file_path"])


def _grey16_image(entries, root):
    Image.fromarray(np.full((8, 4), 999, dtype=np.uint16)).save(root.joinpath(*IMAGE_DIR) / entries[3]["file_path"])


@pytest.mark.parametrize("mutation, loader_refuses, image_refused, check_warns", [
    (_duplicate_entry, False, False, "duplicate entries"),
    (_duplicate_path_other_captions, True, False, None),
    (_blank_caption, False, False, "blank captions"),
    (_negative_id, True, False, None),
    (_shared_identity, True, False, None),
    (_tiny_image, False, True, None),
    (_grey16_image, False, False, None),
])
def test_loader_and_check_agree(tmp_path, capsys, mutation, loader_refuses, image_refused, check_warns):
    if mutation in (_tiny_image, _grey16_image):
        write_fixture(tmp_path, "cuhk-pedes", mutate=lambda entries: None)
        entries = json.loads((tmp_path / "CUHK-PEDES" / "reid_raw.json").read_text())
        mutation(entries, tmp_path)
    else:
        write_fixture(tmp_path, "cuhk-pedes", mutate=mutation)
    check_fails = check_main(["cuhk-pedes", "--root", str(tmp_path)]) == 1
    report = capsys.readouterr().out
    try:
        splits = data.load_benchmark("cuhk-pedes", root=tmp_path)
        loader_failed = False
    except ValueError as error:
        loader_failed = True
        assert "data.check" in str(error) and "\n" not in str(error)
    assert loader_failed == loader_refuses
    images_failed = False
    if not loader_failed:
        # duplicates never become extra training rows; a blank caption is one row less
        assert len(splits["train"]) == (11 if mutation is _blank_caption else 12)
        for name, split in splits.items():
            if "image" in split.column_names:
                try:
                    verify_images(split, cache_dir=tmp_path / "cache", name=name, progress=False)
                except ImageCheckError:
                    images_failed = True
    assert images_failed == image_refused
    assert check_fails == (loader_refuses or image_refused), report
    if check_warns:
        assert f"WARNING: {check_warns}:" in report


def test_duplicate_entry_is_dropped_with_a_warning(tmp_path, caplog):
    write_fixture(tmp_path, "cuhk-pedes", mutate=_duplicate_entry)
    train = data.load_benchmark("cuhk-pedes", root=tmp_path)["train"]
    assert len(train) == 12  # not 14
    assert "duplicate entries in 1 entries" in caplog.text and "repeats entry 2 exactly" in caplog.text


def test_unknown_split_is_one_problem_naming_the_benchmarks_splits(tmp_path, capsys):
    write_fixture(tmp_path, "icfg-pedes", mutate=lambda entries: entries[0].update(split="val"))
    problems, _, _ = check_benchmark("icfg-pedes", str(tmp_path), progress=False)
    assert problems == {"unknown split": ["entry 0 (file_path='train/17_0.png') has unknown split 'val' "
                                          "(expected one of ['train', 'test'])"]}
    with pytest.raises(ValueError, match=r"unknown split 'val' \(expected one of \['train', 'test'\]\)"):
        data.load_benchmark("icfg-pedes", root=tmp_path)


# ----------------------------------------------------------------------------- annotation encoding
def test_invalid_utf8_annotation_is_one_line_naming_file_and_offset(tmp_path, capsys):
    write_fixture(tmp_path, "rstpreid")
    path = tmp_path / "RSTPReid" / "data_captions.json"
    raw = path.read_bytes()
    offset = raw.index(b"person 5")
    path.write_bytes(raw[:offset] + b"\xff\xfe" + raw[offset:])
    message = rf"{path}: invalid UTF-8 at byte offset {offset} \(byte 0xff\)"
    with pytest.raises(ValueError, match=message) as info:
        data.load_benchmark("rstpreid", root=tmp_path)
    assert "\n" not in str(info.value)
    assert check_main(["rstpreid", "--root", str(tmp_path)]) == 1
    report = capsys.readouterr().out
    assert f"FAILED: {path}: invalid UTF-8 at byte offset {offset}" in report
    # a UTF-8 byte-order mark is accepted
    path.write_bytes(b"\xef\xbb\xbf" + raw)
    assert len(data.load_benchmark("rstpreid", root=tmp_path)["train"]) == 12
