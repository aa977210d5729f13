"""CPU cost of the training data pipeline (TrainViews), per sample, printed as a table.

    python -m trpr.data.bench_pipeline [--dataset synth-pedes-small] [--samples 400] [--image-size 384 128]

Rows:
  decode                open_image (PIL decode + RGB rules)
  resize                one bicubic resize to the model's H x W
  item float            TrainViews item, 2 augmented views, CLIP-normalised float32 (today's path)
  item uint8            TrainViews item, 2 augmented views as uint8 + erase boxes (normalised on the device)
  loader float / uint8  DataLoader(num_workers=1, batch 64) over the same items: samples/s seen by the
                        trainer (includes collation and the transfer from the worker process)
  normalize uint8 batch normalize_uint8 on a [64, 2, 3, H, W] batch on this CPU (per sample; on a GPU it
                        runs on the device)
One thread (torch.set_num_threads(1)), epoch 0, the same samples for every row; each figure is the best of
3 passes. In-process rows give this process's CPU time (robust on a shared machine) and wall time; loader
rows give wall-clock samples/s.
"""
from __future__ import annotations

import argparse
import time

import torch
from PIL import Image


def _time_per_item(function, items, repeats: int = 3) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per call of function(item) over items: the best of `repeats` passes
    (after one warm-up call). CPU time is this process's (one thread), so other processes on a shared
    machine hardly change it; wall time is what a worker would take on an idle core."""
    function(items[0])
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for item in items:
            function(item)
        best_cpu = min(best_cpu, (time.process_time() - start_cpu) / len(items))
        best_wall = min(best_wall, (time.perf_counter() - start_wall) / len(items))
    return best_cpu, best_wall


def _loader_rate(dataset, num_samples: int, batch_size: int = 64, repeats: int = 3) -> float:
    """Samples/s of a 1-worker DataLoader over the first num_samples items (worker start-up and the first
    batch excluded; best of `repeats` passes). The batch shrinks so that at least 3 batches are timed."""
    from torch.utils.data import DataLoader

    batch_size = max(1, min(batch_size, num_samples // 4))

    best = 0.0
    for _ in range(repeats):
        loader = DataLoader(torch.utils.data.Subset(dataset, range(num_samples)), batch_size=batch_size,
                            num_workers=1)
        iterator = iter(loader)
        next(iterator)
        start = time.perf_counter()
        seen = sum(len(batch["index"]) for batch in iterator)
        best = max(best, seen / max(time.perf_counter() - start, 1e-9))
    return best


def run(dataset: str = "synth-pedes-small", num_samples: int = 400, image_size=(384, 128), root=None) -> list[tuple]:
    """[(row, CPU ms per sample or None, wall ms per sample, samples/s)] for the rows of the module docstring
    (loader rows have no CPU figure: the work happens in the worker process). `main` runs it on one thread."""
    from trpr import data
    from trpr.data.images import open_image
    from trpr.data.transforms import normalize_uint8
    from trpr.data.tokenizer import get_tokenizer

    train = data.load_benchmark(dataset, root=root)["train"]
    tokenizer = get_tokenizer()
    height, width = image_size
    rows = []
    float_views = data.TrainViews(train, tokenizer, image_size, num_views=2, augment=True, seed=0)
    uint8_views = data.TrainViews(train, tokenizer, image_size, num_views=2, augment=True, seed=0, output="uint8")
    positions = list(range(min(num_samples, len(float_views))))
    sources = [float_views.images[p] for p in positions]
    decoded = [open_image(s) for s in sources]
    rows.append(("decode", *_time_per_item(open_image, sources)))
    rows.append(("resize", *_time_per_item(lambda im: im.resize((width, height), Image.BICUBIC), decoded)))
    rows.append(("item float (2 views)", *_time_per_item(lambda p: float_views[(0, p)], positions)))
    rows.append(("item uint8 (2 views)", *_time_per_item(lambda p: uint8_views[(0, p)], positions)))
    float_views.set_epoch(0)
    uint8_views.set_epoch(0)
    rows.append(("loader float, 1 worker", None, 1.0 / _loader_rate(float_views, len(positions))))
    rows.append(("loader uint8, 1 worker", None, 1.0 / _loader_rate(uint8_views, len(positions))))
    batch = torch.stack([uint8_views[(0, p)]["pixel_values"] for p in positions[:64]])
    boxes = torch.stack([uint8_views[(0, p)]["erase_boxes"] for p in positions[:64]])
    cpu, wall = _time_per_item(lambda _: normalize_uint8(batch, boxes), list(range(5)))
    rows.append(("normalize uint8 batch (CPU)", cpu / len(batch), wall / len(batch)))
    return [(name, None if cpu is None else 1000.0 * cpu, 1000.0 * wall, 1.0 / wall) for name, cpu, wall in rows]


def format_table(rows, title: str) -> str:
    """Markdown table of run()'s rows: stage, CPU ms/sample, wall ms/sample, samples/s (wall)."""
    lines = [title, f"| {'stage':<28} | {'CPU ms/sample':>13} | {'wall ms/sample':>14} | {'samples/s':>9} |",
             f"|{'-' * 30}|{'-' * 15}|{'-' * 16}|{'-' * 11}|"]
    lines += [f"| {name:<28} | {'-' if cpu is None else f'{cpu:.3f}':>13} | {wall:>14.3f} | {rate:>9.1f} |"
              for name, cpu, wall, rate in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synth-pedes-small")
    parser.add_argument("--root", default=None)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--image-size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.dataset, args.samples, tuple(args.image_size), args.root)
    print(format_table(rows, f"data pipeline, {args.dataset}, {args.image_size[0]}x{args.image_size[1]}, "
                             f"{args.samples} samples, 1 thread"))


if __name__ == "__main__":
    main()
