"""Regenerate the README's screenshot of the photo-search app (docs/app_screenshot.png) from a run.

    python scripts/app_screenshot.py --run runs/demo --gallery runs/demo/gallery --out docs/app_screenshot.png
    python scripts/app_screenshot.py --run runs/demo --gallery runs/demo/gallery --export-only   # make app

The gallery folder is filled once with the test-split images of the run's dataset (synth-pedes for the
demo), copied as plain files; then the app is served on 127.0.0.1 (a free port), a headless Chromium
types the query, waits for the results, opens the first result's explanation and saves the page.
Needs the `app` extra and Debian's chromium + chromium-driver (`make browser`).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

DEFAULT_QUERY = ("a young woman in a long red coat and blue jeans, carrying a black handbag on her left shoulder "
                 "and wearing white shoes")  # longer than the text head keeps (15 tokens): some words unselected


def export_gallery(run_dir: Path, gallery: Path, split: str = "test") -> int:
    """Copy the `<split>_gallery` images of the run's dataset into `gallery` (skipped when it already holds
    images); returns how many images it holds."""
    import yaml

    from trpr import data
    from trpr.data.torch_datasets import image_sources

    existing = [p for p in gallery.rglob("*") if p.is_file()] if gallery.is_dir() else []
    if existing:
        return len(existing)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    splits = data.load_benchmark(config["data"]["dataset"], root=config["data"].get("root"))
    sources = image_sources(splits[f"{split}_gallery"])
    gallery.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if not isinstance(source, str):
            raise SystemExit(f"{config['data']['dataset']}: images are embedded, not files; export them another way")
        shutil.copy2(source, gallery / Path(source).name)
    return len(sources)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    parser.add_argument("--gallery", type=Path, default=Path("runs/demo/gallery"), help="gallery folder to fill/use")
    parser.add_argument("--out", type=Path, default=Path("docs/app_screenshot.png"), help="PNG to write")
    parser.add_argument("--query", default=DEFAULT_QUERY, help="the query typed into the app")
    parser.add_argument("--top", type=int, default=10, help="top-k shown")
    parser.add_argument("--export-only", action="store_true", help="only fill the gallery folder (make app)")
    args = parser.parse_args(argv)
    if not (args.run / "config.yaml").is_file():
        parser.error(f"{args.run}: not a run folder (no config.yaml): run make demo first")
    count = export_gallery(args.run, args.gallery)
    print(f"gallery {args.gallery}: {count} images")
    if args.export_only:
        return 0

    from trpr import app, app_browser

    found = app_browser.find_browser()
    if isinstance(found, str):
        parser.error(found)
    session = app.open_session(str(args.run), args.gallery)
    with app_browser.serve(session, default_top=args.top) as url, app_browser.chrome(*found, width=1280, height=1500) as driver:
        shown = app_browser.search_in_browser(driver, url, args.query, timeout_s=120)
        print(shown["message"])
        try:
            print("explained:", app_browser.explain_in_browser(driver, 0).splitlines()[0])
        except Exception as error:  # an app without the explain view: the results alone
            print(f"no explanation shown ({type(error).__name__})", file=sys.stderr)
        app_browser.save_screenshot(driver, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
