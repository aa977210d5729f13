"""Time searching a folder of photos (`eval_3rtpr.py search --gallery`, `3rtpr-app`) at 10,000 images.

    python -m trpr.benchmarks.search_folder [--images 10000] [--queries 200] [--update-fraction 0.01]
                                            [--checkpoint RUN_OR_PAIR] [--work-dir DIR] [--threads N]

A folder of `--images` PNG files is filled with the synth-pedes (small preset) images, repeated under new
names as needed; the model is `--checkpoint`, else a random-init pair of the CPU demo's size
(trpr/configs/synth-pedes.yaml: width 64, 2 layers, patch 8, 64×32, fused 128; timing does not depend on
the weights). Measured, in this order, with the folder-gallery code the search and the app use:
  1. indexing from scratch (`update_folder_index`: scan, image checks, encoding with both models, saving):
     images/s;
  2. a rescan with nothing changed (what every `search --gallery` does before ranking);
  3. an incremental update after rewriting `--update-fraction` of the files (new content, so new size and
     mtime): seconds, and how many files were encoded again;
  4. query latency once indexed (`search_gallery`: tokenise, encode the query with the row's models, score
     every image, top 10): p50 / p95 over `--queries` synth-pedes captions, after 5 warm-up queries.
Prints a Markdown table (and --json PATH writes the numbers).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trpr.benchmarks.timing import device_name

DEMO_BACKBONE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     projection_dim=64, vision_patch_size=8)


def demo_pair():
    """A random-init ReciprocalPair of the CPU demo's size (eval mode)."""
    from trpr import modeling

    torch.manual_seed(0)
    return modeling.ReciprocalPair.from_clip(modeling.small_clip_config(**DEMO_BACKBONE), fused_dim=128,
                                             image_size=(64, 32)).eval()


def fill_folder(folder: Path, count: int, dataset: str = "synth-pedes-small") -> tuple[int, list[str]]:
    """`count` images in `folder` (img_00000.png ...), copied from the synth-pedes preset's images in turn;
    returns (how many distinct source images, the dataset's test captions for queries)."""
    from trpr import data
    from trpr.data.torch_datasets import image_sources

    splits = data.load_benchmark(dataset)
    sources = [s for name in ("train", "val_gallery", "test_gallery") if name in splits
               for s in image_sources(splits[name]) if isinstance(s, str)]
    sources = list(dict.fromkeys(sources))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shutil.copyfile(sources[i % len(sources)], folder / f"img_{i:05d}.png")
    captions = [c for c in splits["test_queries"]["caption"]]
    return len(sources), captions


def rewrite(paths: list[Path]) -> None:
    """Give each file new content (mirrored left-right, saved again): a real change of size / mtime."""
    from PIL import Image, ImageOps

    for path in paths:
        with Image.open(path) as image:
            changed = ImageOps.mirror(image.convert("RGB"))
        changed.save(path, optimize=True)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, linear interpolation (statistics.quantiles' inclusive method)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def run(images: int, queries: int, update_fraction: float, checkpoint: str | None, work_dir: Path,
        batch_size: int, row: str, dataset: str = "synth-pedes-small") -> dict:
    """The four measurements; returns them as a dict (seconds, images/s, milliseconds)."""
    from trpr.data.tokenizer import get_tokenizer
    from trpr.evaluation.folder_gallery import update_folder_index
    from trpr.evaluation.search import search_gallery

    if checkpoint is not None:
        from trpr.evaluation.checkpoints import load_pair, resolve_checkpoint

        pair, model_name = load_pair(resolve_checkpoint(checkpoint)).eval(), checkpoint
    else:
        pair, model_name = demo_pair(), "random-init pair, CPU demo size"
    folder, stem = work_dir / "photos", work_dir / "index" / "folder-bench"
    distinct, captions = fill_folder(folder, images, dataset)

    started = time.perf_counter()
    index, update = update_folder_index(pair, folder, stem, batch_size=batch_size, progress=False)
    index_s = time.perf_counter() - started
    assert update.encoded == images, update.describe()

    started = time.perf_counter()
    index, update = update_folder_index(pair, folder, stem, batch_size=batch_size, progress=False)
    rescan_s = time.perf_counter() - started
    assert update.reused == images, update.describe()

    changed = sorted(folder.iterdir())[:: max(1, round(1 / update_fraction))][: max(1, round(images * update_fraction))]
    time.sleep(0.01)
    rewrite(changed)
    started = time.perf_counter()
    index, update = update_folder_index(pair, folder, stem, batch_size=batch_size, progress=False)
    incremental_s = time.perf_counter() - started
    assert update.changed == len(changed), update.describe()

    gallery, tokenizer = index.gallery_index(), get_tokenizer()
    texts = [captions[i % len(captions)] for i in range(queries + 5)]
    latencies = []
    for i, text in enumerate(texts):
        started = time.perf_counter()
        matches = search_gallery(pair, gallery, text, tokenizer=tokenizer, row=row, top=10)
        if i >= 5:
            latencies.append((time.perf_counter() - started) * 1000)
        assert len(matches) == 10
    return {"date": time.strftime("%Y-%m-%d"), "device": device_name(torch.device("cpu")), "model": model_name,
            "images": images, "dataset": dataset, "distinct_sources": distinct, "batch_size": batch_size, "row": row,
            "index_s": index_s, "index_images_per_s": images / index_s, "rescan_unchanged_s": rescan_s,
            "update_files": len(changed), "update_s": incremental_s,
            "query_p50_ms": percentile(latencies, 0.5), "query_p95_ms": percentile(latencies, 0.95),
            "query_mean_ms": statistics.fmean(latencies), "queries": len(latencies)}


def table(result: dict) -> str:
    """The Markdown table of `run`'s result."""
    return "\n".join([
        f"search_folder: {result['images']:,} images ({result['distinct_sources']} distinct {result['dataset']} images), "
        f"{result['model']}, {result['device']}, batch {result['batch_size']}, row {result['row']}, {result['date']}",
        "", "| measurement | value |", "|---|---|",
        f"| indexing from scratch | {result['index_s']:.1f} s = {result['index_images_per_s']:.0f} images/s |",
        f"| rescan, nothing changed | {result['rescan_unchanged_s']:.2f} s |",
        f"| incremental update, {result['update_files']} files changed "
        f"({100 * result['update_files'] / result['images']:.0f} %) | {result['update_s']:.2f} s |",
        f"| query latency p50 / p95 ({result['queries']} queries) | {result['query_p50_ms']:.1f} / "
        f"{result['query_p95_ms']:.1f} ms |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trpr.benchmarks.search_folder",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="gallery size (default 10000)")
    parser.add_argument("--queries", type=int, default=200, help="timed queries (default 200)")
    parser.add_argument("--update-fraction", type=float, default=0.01, help="files changed for the update (0.01)")
    parser.add_argument("--checkpoint", default=None, help="run / pair folder (default: random-init demo-size pair)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default 64)")
    parser.add_argument("--row", default="A+B/GE+FS", help="ranking row (default A+B/GE+FS)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the images go (default: a temp folder)")
    parser.add_argument("--dataset", default="synth-pedes-small", help="synth-pedes preset the images come from")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.images < 10 or not 0 < args.update_fraction < 1 or args.queries < 1:
        parser.error("--images >= 10, 0 < --update-fraction < 1, --queries >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="search-folder-bench-") as temporary:
        work_dir = args.work_dir or Path(temporary)
        result = run(args.images, args.queries, args.update_fraction, args.checkpoint, work_dir, args.batch_size,
                     args.row, args.dataset)
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
