"""synth-pedes: determinism, layout, disjoint identities, captions that describe the rendered person."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from trpr.data import load_benchmark
from trpr.data.check import check_benchmark
from trpr.data.synthetic import (COLOURS, PRESETS, contact_sheet, generate, render_person, sample_identities,
                            synth_folder, write_caption)


def _all_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    load_benchmark("synth-pedes-tiny", root=root)  # generated on first use
    return root


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_root, tmp_path):
    first = _all_bytes(synth_folder(tiny_root, "tiny"))
    again = _all_bytes(generate(tmp_path / "again", preset="tiny", seed=0, progress=False))
    assert first.keys() == again.keys() and len(first) > 100
    assert first == again
    other = _all_bytes(generate(tmp_path / "other", preset="tiny", seed=1, progress=False))
    assert other.keys() == first.keys()
    assert sum(other[k] != first[k] for k in first) > 0.9 * len(first)


def test_layout_counts_and_disjoint_ids(tiny_root):
    folder = synth_folder(tiny_root, "tiny")
    entries = json.loads((folder / "reid_raw.json").read_text())
    spec = PRESETS["tiny"]
    ids = {split: {e["id"] for e in entries if e["split"] == split} for split in ("train", "val", "test")}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [spec.train_ids, spec.val_ids, spec.test_ids]
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    for entry in entries:
        assert set(entry) >= {"split", "captions", "file_path", "processed_tokens", "id"}
        assert len(entry["captions"]) == 2 and all(c.strip() for c in entry["captions"])
        with Image.open(folder / "imgs" / entry["file_path"]) as image:
            assert image.size == (48, 128) and image.mode == "RGB"
    problems, _, _ = check_benchmark("synth-pedes-tiny", str(tiny_root), progress=False)
    assert problems == {}


def test_load_benchmark_on_synth(tiny_root):
    dd = load_benchmark("synth-pedes-tiny", root=tiny_root)
    spec = PRESETS["tiny"]
    n_train_images = spec.train_ids * spec.images_per_id
    assert len(dd["train"]) == 2 * n_train_images
    assert sorted(set(dd["train"]["pid"])) == list(range(spec.train_ids))
    assert len(dd["test_gallery"]) == spec.test_ids * spec.images_per_id
    assert len(dd["val_queries"]) == 2 * spec.val_ids * spec.images_per_id


def test_identities_distinct_and_captions_truthful():
    identities = sample_identities(300, seed=0)
    assert len({i.key() for i in identities}) == 300
    rng = np.random.default_rng(0)
    colour_words = {"grey", "gray", "beige", "khaki", "tan", "violet"} | set(COLOURS)
    for identity in identities[:100]:
        caption = write_caption(identity, rng).lower()
        said_colours = {w for w in re.findall(r"[a-z]+", caption) if w in colour_words}
        true_colours = {identity.upper_colour, identity.lower_colour, identity.shoe_colour}
        if identity.bag != "none":
            true_colours.add(identity.bag_colour)
        if identity.hat != "none":
            true_colours.add(identity.hat_colour)
        if identity.hair_style != "bald":
            true_colours.add(identity.hair_colour)
        synonyms = {"gray": "grey", "khaki": "beige", "tan": "beige", "violet": "purple"}
        said = {synonyms.get(w, w) for w in said_colours}
        assert said <= true_colours | {"blonde"}, (caption, identity)
        assert len(said_colours) >= 1


def test_upper_garment_colour_is_visible():
    """The torso region's mean colour is among the 3 palette colours nearest to the named upper colour
    (identities whose torso is covered by stripes or a backpack are left out)."""
    identities = [i for i in sample_identities(120, seed=3) if not i.upper_striped and i.bag != "backpack"]
    assert len(identities) >= 40
    hits = 0
    for n, identity in enumerate(identities):
        image = np.asarray(render_person(identity, np.random.default_rng(n)), dtype=np.float32)
        torso = image[40:60, 18:30].reshape(-1, 3).mean(0)
        distances = {name: np.linalg.norm(torso - np.array(rgb)) for name, rgb in COLOURS.items()}
        hits += sorted(distances, key=distances.get).index(identity.upper_colour) <= 2
    assert hits >= 0.75 * len(identities)


def test_contact_sheet(tiny_root, tmp_path):
    out = contact_sheet(synth_folder(tiny_root, "tiny"), tmp_path / "sheet.png", identities=8)
    with Image.open(out) as sheet:
        assert sheet.size[0] > 400 and sheet.size[1] > 256


def test_generate_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synth-pedes folder"):
        generate(tmp_path / "precious", preset="tiny", progress=False)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]  # no temporary folder left behind


def test_square_scene_mask_marks_the_person_and_images_are_unchanged():
    identity = sample_identities(1, 4)[0]
    crop = render_person(identity, np.random.default_rng([9, 1]))
    crop_again, mask = render_person(identity, np.random.default_rng([9, 1]), with_mask=True)
    assert np.array_equal(np.asarray(crop), np.asarray(crop_again))  # the mask does not change the picture
    assert mask.shape == (128, 48) and 0.1 < mask.mean() < 0.6
    scene, scene_mask = render_person(identity, np.random.default_rng([9, 2]), size=(64, 64), placement=0.3,
                                      with_mask=True)
    assert scene.size == (64, 64) and scene_mask.shape == (64, 64)
    columns = np.flatnonzero(scene_mask.any(axis=0))
    rows = np.flatnonzero(scene_mask.any(axis=1))
    assert 0.05 < scene_mask.mean() < 0.3 and columns.max() - columns.min() < 32  # a narrow figure in a wide scene
    assert rows.max() - rows.min() > 32  # and tall: 78-95 % of the height


def test_the_tiny_preset_is_the_one_this_generator_version_always_wrote(tiny_root):
    """Pixels and annotation of synth-pedes-tiny (seed 0) as written by GENERATOR_VERSION 4 (the NumPy
    downscale; the same bytes under Pillow 12.3 and 13.0, checked when it was introduced): a change here must
    bump GENERATOR_VERSION (cached copies are then rebuilt)."""
    import hashlib

    folder = synth_folder(tiny_root, "tiny")
    digest = hashlib.sha256((folder / "reid_raw.json").read_bytes())
    for path in sorted((folder / "imgs").rglob("*.png")):
        digest.update(np.asarray(Image.open(path).convert("RGB")).tobytes())
    assert digest.hexdigest() == "7f729e4d726494d131fa2235b320f180a639180dad954bcc590885174e5f5097"


def test_downscale_is_a_lanczos_filter_of_our_own():
    """`downscale_lanczos` (NumPy, so the bytes do not depend on Pillow's version): a flat image stays exactly
    flat up to the borders, and a natural-looking image lands within a few levels of Pillow's LANCZOS."""
    from trpr.data.synthetic import downscale_lanczos

    flat = Image.new("RGB", (96, 256), (17, 130, 250))
    assert np.array_equal(np.asarray(downscale_lanczos(flat, 2)), np.full((128, 48, 3), (17, 130, 250), np.uint8))
    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 255, 96)[None, :, None] * np.ones((256, 1, 3))
    picture = np.clip(ramp + rng.normal(0, 20, ramp.shape), 0, 255).astype(np.uint8)
    ours = np.asarray(downscale_lanczos(Image.fromarray(picture), 2)).astype(int)
    pillow = np.asarray(Image.fromarray(picture).resize((48, 128), Image.LANCZOS)).astype(int)
    assert ours.shape == (128, 48, 3)
    assert np.abs(ours - pillow).max() <= 6 and np.abs(ours - pillow).mean() < 0.5
    with pytest.raises(ValueError, match="not divisible"):
        downscale_lanczos(Image.new("RGB", (95, 256)), 2)
