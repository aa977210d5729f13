"""The photo-search web app (trpr/app.py) without a server: answers (planted caption first, rank/score/file),
messages instead of exceptions for empty queries and galleries, rescan, one-line CLI errors, and (with
gradio installed) the UI built and launched on 127.0.0.1."""
import shutil

import pytest
from PIL import Image

from tests.test_eval_3rtpr import IMAGE_SIZE, _plant_caption, _small_pair
from trpr import app, data
from trpr.data.torch_datasets import image_sources
from trpr.evaluation import folder_gallery

CAPTION = "a tall person in a yellow raincoat"


def make_photos(base):
    """Four photos (png, jpg, webp, one in a sub-folder) and a tiny random-init pair in which CAPTION's
    embedding equals sub/target.png's (select_ratio 0), saved under `base`."""
    sources = image_sources(data.load_benchmark("synth-pedes-tiny", root=base / "datasets")["test_gallery"])
    folder = base / "photos"
    for i, name in enumerate(["a.png", "sub/b.jpg", "sub/target.png", "c.webp"]):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.open(sources[i]).convert("RGB").save(folder / name)
    pair = _small_pair((6, 7), select_ratio=0.0)
    _plant_caption(pair, CAPTION, folder_gallery.FolderImages([folder / "sub/target.png"], IMAGE_SIZE)[0]["pixel_values"])
    pair.save_pretrained(base / "pair")
    return {"base": base, "folder": folder, "pair": base / "pair", "source": sources[5]}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("app"))


def test_answer_ranks_planted_photo_and_explains_bad_input(photos, tmp_path):
    session = app.open_session(str(photos["pair"]), photos["folder"], cache_dir=tmp_path / "cache", batch_size=2)
    assert "4 images" in session.status and "new index: 4 encoded" in session.status
    items, rows, message = app.answer(session, CAPTION, 3)
    assert len(items) == len(rows) == 3
    assert items[0][0] == str(photos["folder"] / "sub" / "target.png") and items[0][1].startswith("#1 · 4.000")
    assert items[0][1].endswith("sub/target.png") and rows[0][0] == 1 and rows[0][2] == "sub/target.png"
    assert rows[0][1] == pytest.approx(4.0, abs=1e-2) and "3 of 4 images" in message
    assert len(app.answer(session, CAPTION, 1000)[0]) == 4  # top-k clamped to the gallery
    for query in ("", "   ", None):
        items, rows, message = app.answer(session, query, 3)
        assert items == rows == [] and message.startswith("Type a description")
    items, _, message = app.answer(session, CAPTION, "lots")
    assert items == [] and "Top-k must be a whole number" in message


def test_empty_gallery_is_a_message_until_photos_arrive(photos, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"not a png")
    session = app.open_session(str(photos["pair"]), empty, cache_dir=tmp_path / "cache")
    items, rows, message = app.answer(session, CAPTION, 5)
    assert items == rows == [] and "holds no readable image" in message and "1 file(s) could not be read" in message
    shutil.copy(photos["folder"] / "a.png", empty / "new.png")
    assert "1 images" in session.refresh() and "1 added" in session.status
    items, _, _ = app.answer(session, CAPTION, 5)
    assert [item[1].split(" · ")[-1] for item in items] == ["new.png"]


def test_cli_errors_are_one_line(photos, tmp_path, capsys):
    assert app.main(["--checkpoint", str(tmp_path / "nope"), "--gallery", str(photos["folder"])], launch=False) == 2
    assert capsys.readouterr().err.strip() == f"3rtpr-app: error: checkpoint {tmp_path / 'nope'}: no such folder"
    assert app.main(["--checkpoint", str(photos["pair"]), "--gallery", str(tmp_path / "none")], launch=False) == 2
    assert capsys.readouterr().err.strip().endswith("no such folder")
    assert app.main(["--checkpoint", str(photos["pair"]), "--gallery", str(photos["folder"]), "--top", "0"],
                    launch=False) == 2
    assert "--top must be between 1 and 100" in capsys.readouterr().err
    assert app.build_parser().parse_args(["--checkpoint", "x", "--gallery", "y"]).host == "127.0.0.1"


def test_ui_builds_and_launches_on_localhost(photos, tmp_path, monkeypatch):
    gr = pytest.importorskip("gradio")
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    argv = ["--checkpoint", str(photos["pair"]), "--gallery", str(photos["folder"]), "--cache-dir", str(tmp_path / "c")]
    assert app.main(argv) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7860
    assert launched["allowed_paths"] == [str(photos["folder"])]


@pytest.fixture(scope="module")
def headed(photos, tmp_path_factory):
    """A pair WITH fused heads (select_ratio 0.2) that select image patches (image_tokens topk), saved: the
    explanations need selected tokens."""
    from tests.test_eval_3rtpr import _small_pair as small_pair

    folder = tmp_path_factory.mktemp("headed") / "pair"
    small_pair((8, 9), select_ratio=0.2, image_tokens="topk").save_pretrained(folder)
    return folder


def test_explanation_of_a_head_that_pools_every_patch_says_so(photos, tmp_path_factory, tmp_path):
    """image_tokens all (the default): nothing is highlighted, and the text says every patch was pooled."""
    from tests.test_eval_3rtpr import _small_pair as small_pair

    folder = tmp_path_factory.mktemp("every") / "pair"
    small_pair((8, 9), select_ratio=0.2, image_tokens="all").save_pretrained(folder)
    session = app.open_session(str(folder), photos["folder"], cache_dir=tmp_path / "cache", score="A+B/GE+FS")
    app.answer(session, CAPTION, 4)
    shown = app.explain(session, 0)
    rows, columns, _ = session.pair.a.patch_grid()
    assert shown["patches"] == []
    assert f"pooled every patch of the {rows}×{columns} grid (image_tokens all: no patch selection)" in shown["text"]
    assert "highlighted patches" not in shown["text"]


def test_explanation_shows_exactly_what_the_fused_heads_selected(photos, headed, tmp_path, monkeypatch):
    import numpy as np
    import torch

    from trpr.data.tokenizer import tokenize

    session = app.open_session(str(headed), photos["folder"], cache_dir=tmp_path / "cache", score="A+B/GE+FS")
    assert app.explain(session, 0)["text"].startswith("Search first")
    app.answer(session, CAPTION, 4)
    shown = app.explain(session, 1, scale=4)
    match = session.last[1][1]
    model = session.pair.a
    assert shown["model"] == "A" and len(shown["patches"]) == model.image_head.k > 0
    # what the heads pooled in the real forward pass: spy on fuse() and compare with the explained positions
    pooled = {}
    for name, head in (("image", model.image_head), ("text", model.text_head)):
        original = head.fuse
        monkeypatch.setattr(head, "fuse", lambda tokens, g, valid=None, _o=original, _n=name:
                            pooled.setdefault(_n, (tokens, valid)) and _o(tokens, g, valid))
    pixels = folder_gallery.FolderImages([match["path"]], IMAGE_SIZE)[0]["pixel_values"][None]
    input_ids, attention_mask = tokenize(session.tokenizer, [CAPTION])
    with torch.no_grad():
        model.encode_image(pixels)
        model.encode_text(input_ids, attention_mask)
        patch_tokens = model.clip.encode_image(pixels).tokens[0, 1:]
        word_tokens = model.clip.encode_text(input_ids, attention_mask).tokens[0]
    assert torch.equal(pooled["image"][0][0], patch_tokens[shown["patches"]])
    text_tokens, valid = pooled["text"]
    assert sorted(shown["selected_positions"]) == shown["selected_positions"]
    assert torch.equal(text_tokens[0][valid[0]].sort(dim=0).values, word_tokens[shown["selected_positions"]].sort(dim=0).values)
    # the highlighted words are the selected token positions (position p = word p - 1 after SOT)
    highlighted = [p + 1 for p, (_, label) in enumerate(shown["words"]) if label == "selected"]
    assert highlighted == shown["selected_positions"] and len(highlighted) == int(valid[0].sum()) > 0
    assert "".join(token for token, _ in shown["words"]).strip() == CAPTION
    # the drawn patches are exactly the selected ones: every other patch keeps the model's input pixels
    rows, columns, patch = model.patch_grid()
    picture = np.asarray(shown["image"]).astype(int)
    plain = np.asarray(app.explain(session, 1, scale=4)["image"])  # same call twice: deterministic
    assert np.array_equal(picture, plain)
    from PIL import Image
    base = folder_gallery.FolderImages([match["path"]], IMAGE_SIZE).transform.resize(Image.open(match["path"]).convert("RGB"))
    base = np.asarray(Image.fromarray(base).resize((IMAGE_SIZE[1] * 4, IMAGE_SIZE[0] * 4), Image.NEAREST)).astype(int)
    changed = {(r // (patch * 4)) * columns + c // (patch * 4)
               for r, c in zip(*np.nonzero(np.abs(picture - base).sum(-1)))}
    assert changed == set(shown["patches"])
    assert "true match" not in shown["text"] and "false match" not in shown["text"]  # a folder: no identities


def test_custom_dataset_hits_are_marked_true_or_false(headed, tmp_path):
    from trpr.data import folder_dataset

    root = folder_dataset.write_example(tmp_path / "mine", preset="tiny")
    session = app.open_session(str(headed), root, cache_dir=tmp_path / "cache")
    rows, _ = folder_dataset.read_rows(folder_dataset.find_annotation(root))
    pid_of = {row["image"]: int(row["pid"]) for _, row in rows}
    caption, pid = rows[0][1]["caption"], int(rows[0][1]["pid"])
    items, table, message = app.answer(session, caption.upper() + ".", 10)  # matched case- and stop-insensitively
    marks = [row[3] for row in table]
    assert marks == ["true match" if pid_of[row[2]] == pid else "false match" for row in table]
    assert all(item[1].endswith(" · ✓" if mark == "true match" else " · ✗") for item, mark in zip(items, marks))
    assert f"{marks.count('true match')} of 10 are the described person" in message
    verdict = app.explain(session, 0)["text"]
    assert ("✓ true match" in verdict) == (marks[0] == "true match") and ("✗ false match" in verdict) != (marks[0] == "true match")
    _, table, message = app.answer(session, "a person nobody described", 5)
    assert [row[3] for row in table] == [""] * 5 and "described person" not in message
