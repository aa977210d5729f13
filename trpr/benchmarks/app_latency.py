"""How long the photo-search web app takes to show results in a real browser (issue 20's goal: results
visible at most 1.5 s after submit on the demo gallery).

    python -m trpr.benchmarks.app_latency --run runs/demo --gallery runs/demo/gallery

Serves `3rtpr-app` on 127.0.0.1 (a free port) over the run and the gallery folder (filled from the run's
test split by `scripts/app_screenshot.py --export-only`, i.e. `make app`'s gallery), opens it in headless
Chromium (Debian's chromium + chromium-driver: `make browser`) and, for each query, times from the first
keystroke in the description box to the moment the result thumbnails and the "N of M images" message are
on the page (`app_browser.search_in_browser`: typing the query + Enter + search + rendering). The gallery
index is built before the first timed query (a warm-up query), so the table is what a user sees once the
app is up. Prints one row per query and the median / maximum, in seconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

QUERIES = (
    "a woman in a red long coat with a black handbag",
    "a man in a blue jacket and black trousers carrying a backpack",
    "a person wearing a white shirt, grey shorts and a cap",
    "a young woman in a green dress with long hair",
    "a man in a yellow t-shirt and blue jeans",
    "a person in a black coat holding a red bag",
    "a woman with a purple top and brown trousers",
    "a man wearing an orange jacket and white shoes",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    parser.add_argument("--gallery", type=Path, default=Path("runs/demo/gallery"), help="gallery folder")
    parser.add_argument("--top", type=int, default=10, help="results shown per query")
    args = parser.parse_args(argv)
    if not args.gallery.is_dir():
        parser.error(f"{args.gallery}: no such folder (make app fills runs/demo/gallery)")

    from tqdm.auto import tqdm

    from trpr import app, app_browser

    found = app_browser.find_browser()
    if isinstance(found, str):
        parser.error(found)
    session = app.open_session(str(args.run), args.gallery)
    rows = []
    with app_browser.serve(session, default_top=args.top) as url, app_browser.chrome(*found) as driver:
        app_browser.search_in_browser(driver, url, "warm-up query", timeout_s=600)  # builds the gallery index
        for query in tqdm(QUERIES, desc="queries in the browser", unit="query"):
            shown = app_browser.search_in_browser(driver, url, query, timeout_s=60)
            rows.append((query, shown["seconds"], shown["images"]))
    print(f"\n| query | submit -> results shown (s) | thumbnails |\n|---|---|---|")
    for query, seconds, images in rows:
        print(f"| {query} | {seconds:.2f} | {images} |")
    times = [seconds for _, seconds, _ in rows]
    print(f"\nmedian {statistics.median(times):.2f} s, max {max(times):.2f} s over {len(times)} queries "
          f"({args.run}, gallery {args.gallery})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
