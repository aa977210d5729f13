"""The photo-search web app (trpr/app.py) without a server: answers (planted caption first, rank/score/file),
messages instead of exceptions for empty queries and galleries, rescan, one-line CLI errors, and (with
gradio installed) the UI built and launched on 127.0.0.1."""
import shutil

import pytest
from PIL import Image

from test_eval_cli import IMAGE_SIZE, _plant_caption, _small_pair
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
