"""The photo-search app used as a user uses it: its server started on 127.0.0.1 (a free port) over a small
generated gallery and a tiny random-init checkpoint, then queried over HTTP with gradio_client, and from a
real headless Chromium (selenium + Debian's chromium-driver) that types a query, waits for the results and
saves a screenshot. Skips without gradio; the browser test skips without a browser, saying why, unless
TRPR_REQUIRE_BROWSER=1 (CI, .ci/run), where a missing browser fails."""
import os
from pathlib import Path

import pytest
from PIL import Image

from tests.test_app import CAPTION, make_photos
from trpr import app, app_browser

gradio = pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A running server (URL) over the planted 4-photo gallery, and the photos' record."""
    photos = make_photos(tmp_path_factory.mktemp("served"))
    session = app.open_session(str(photos["pair"]), photos["folder"], cache_dir=photos["base"] / "cache", batch_size=2)
    with app_browser.serve(session, default_top=3) as url:
        assert url.startswith("http://127.0.0.1:")
        yield {"url": url, "session": session, **photos}


def test_server_answers_a_query_over_http(served, tmp_path):
    from gradio_client import Client

    client = Client(served["url"], verbose=False, download_files=str(tmp_path / "downloads"))
    gallery, table, message = client.predict(CAPTION, 3, api_name="/search")
    assert "3 of 4 images for" in message
    # the gallery's images come back as files whose pixels are the photos' (the planted one first)
    assert len(gallery) == 3 and gallery[0]["caption"].startswith("#1 · 4.000") and gallery[0]["caption"].endswith("sub/target.png")
    served_first = Image.open(gallery[0]["image"]).convert("RGB")
    assert list(served_first.getdata()) == list(Image.open(served["folder"] / "sub" / "target.png").convert("RGB").getdata())
    assert [row[2] for row in table["data"]][0] == "sub/target.png" and table["headers"] == ["rank", "score", "file", "match"]
    _, _, message = client.predict("   ", 3, api_name="/search")
    assert message.startswith("Type a description")
    assert "4 images in" in client.predict(api_name="/rescan")
    # the explain endpoint answers for the last search (this pair has no fused heads: it says so)
    client.predict(CAPTION, 3, api_name="/search")
    assert "no fused heads" in client.predict(0, api_name="/explain")


def test_server_serves_only_the_gallery_folder(served):
    """A file next to the gallery (the checkpoint) is not downloadable through the file route."""
    import urllib.error
    import urllib.request

    secret = Path(served["pair"]) / "pair.json"
    for route in ("gradio_api/file=", "file="):
        try:
            with urllib.request.urlopen(served["url"] + route + str(secret), timeout=10) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            assert error.code in (403, 404), error
        else:
            assert b"3rtpr-pair" not in body, f"{route}: served a file outside the gallery"


def _browser_or_skip():
    found = app_browser.find_browser()
    if isinstance(found, str):
        if os.environ.get(app_browser.REQUIRE_BROWSER_ENV) == "1":
            pytest.fail(f"{app_browser.REQUIRE_BROWSER_ENV}=1 but {found}")
        pytest.skip(found)
    return found


def test_browser_types_a_query_sees_the_results_and_an_explanation(served, tmp_path):
    """A pair with fused heads that select image patches (image_tokens topk), so that a clicked result is
    explained (patches drawn, words highlighted)."""
    from tests.test_eval_3rtpr import _small_pair

    browser, driver_path = _browser_or_skip()
    _small_pair((8, 9), select_ratio=0.2, image_tokens="topk").save_pretrained(tmp_path / "headed")
    session = app.open_session(str(tmp_path / "headed"), served["folder"], cache_dir=tmp_path / "cache")
    with app_browser.serve(session, default_top=3) as url, app_browser.chrome(browser, driver_path) as driver:
        shown = app_browser.search_in_browser(driver, url, CAPTION, timeout_s=90)
        assert "3 of 4 images for" in shown["message"] and shown["images"] >= 3
        first = session.last[1][0]["file"]
        assert first in driver.page_source
        text = app_browser.explain_in_browser(driver, 0)
        assert text.startswith(f"#1 {first}") and "fused heads pooled the" in text and "highlighted patches" in text
        from selenium.webdriver.common.by import By

        marked = driver.find_element(By.ID, "explain-words").text
        expected = [token.strip() for token, label in app.explain(session, 0)["words"] if label == "selected"]
        assert expected and all(word in marked for word in expected)
        shot = app_browser.save_screenshot(driver, tmp_path / "app.png")
    with Image.open(shot) as image:
        assert image.size[0] >= 1000 and image.getextrema() != ((255, 255), (255, 255), (255, 255))


def test_latency_benchmark_prints_a_row_per_query(served, tmp_path, monkeypatch, capsys):
    """python -m trpr.benchmarks.app_latency (the browser goal's measurement): one timed row per query with
    the thumbnails shown, and the median / maximum line; a missing gallery folder is a usage error."""
    from trpr.benchmarks import app_latency

    _browser_or_skip()
    monkeypatch.setenv("TRPR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(app_latency, "QUERIES", (CAPTION, "a person in a coat"))
    assert app_latency.main(["--run", str(served["pair"]), "--gallery", str(served["folder"]), "--top", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| query")]
    assert len(rows) == 2 and all(line.endswith("| 3 |") for line in rows), out
    assert "median" in out and "over 2 queries" in out
    with pytest.raises(SystemExit):
        app_latency.main(["--run", str(served["pair"]), "--gallery", str(tmp_path / "missing")])
