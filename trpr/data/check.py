"""Validate a benchmark folder and print a report; exit status 1 when anything is wrong.

    python -m trpr.data.check NAME --root ROOT
    python -m trpr.data.check folder --root DATASET_DIR      (a custom dataset, data.folder_dataset)

The rules are the loader's own, so `data.check` passes exactly when `load_benchmark` accepts the annotation
and every image is usable in training: `data.benchmarks.review_annotation` (entry keys, the benchmark's
splits, integer ids >= 0, captions, image paths listed twice, ids in two splits; what the loader fixes
with a warning is reported as a WARNING) and `data.images.open_image` (every image file exists, decodes
and is accepted). Differences from the official counts (docs/method.md §6) are warnings too (a subset of
a benchmark is legitimate for experiments, but worth knowing).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from .benchmarks import count_warnings, resolve_layout, review_layout
from .images import image_problems

MAX_LISTED = 10  # problems listed per category; the rest are counted


def check_benchmark(name: str, root: Optional[str] = None, check_images: bool = True,
                    progress: Optional[bool] = None, num_threads: Optional[int] = None
                    ) -> tuple[dict[str, list[str]], list[str], dict]:
    """Run all checks. Returns (problems by category, warnings, counts split -> (ids, images, captions) of
    the entries the loader would use). progress=None: a progress bar on a terminal only."""
    layout, folder = resolve_layout(name, root)
    review = review_layout(layout, folder)
    problems = {category: list(items) for category, items in review.errors.items()}
    warnings = [f"{category}: {message}" for category, items in review.warnings.items() for message in items]
    image_dir = folder / layout.image_dir
    if not image_dir.is_dir():
        problems["missing image folder"] = [f"{image_dir} does not exist"]

    counts = {split: (len({entry["id"] for entry in entries}), len(entries),
                      sum(len(entry["captions"]) for entry in entries))
              for split, entries in review.by_split.items()}
    if check_images and image_dir.is_dir():
        usable = [(entry["_position"], entry.get("_where", f"entry {entry['_position']}"),
                   image_dir / entry[layout.image_key])
                  for entries in review.by_split.values() for entry in entries]
        usable.sort()
        reasons = image_problems([str(file) for _, _, file in usable], num_threads, progress,
                                 desc=f"checking {layout.name} images")
        for (_, where, file), reason in zip(usable, reasons):
            if reason is not None:
                category = "missing images" if reason == "file not found" else "unreadable images"
                problems.setdefault(category, []).append(f"{where}: {file}: {reason}")
    warnings += count_warnings(layout, counts)
    return problems, warnings, counts


def format_report(name: str, problems: dict[str, list[str]], warnings: list[str], counts: dict) -> str:
    """The printed report: counts table, warnings, problems by category (first MAX_LISTED of each)."""
    lines = [f"data.check {name}", f"{'split':<8}{'ids':>8}{'images':>9}{'captions':>10}"]
    for split, (ids, images, captions) in counts.items():
        lines.append(f"{split:<8}{ids:>8}{images:>9}{captions:>10}")
    for warning in warnings:
        lines.append(f"WARNING: {warning}")
    for category, items in problems.items():
        lines.append(f"PROBLEM [{category}]: {len(items)}")
        lines.extend(f"  - {item}" for item in items[:MAX_LISTED])
        if len(items) > MAX_LISTED:
            lines.append(f"  ... and {len(items) - MAX_LISTED} more")
    total = sum(len(items) for items in problems.values())
    lines.append("OK: no problems found" if total == 0 else f"FAILED: {total} problem(s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Validate a text-based person-retrieval benchmark folder.")
    parser.add_argument("name", help="cuhk-pedes | icfg-pedes | rstpreid | synth-pedes[-tiny|-small|-full] | folder")
    parser.add_argument("--root", default=None, help="folder holding the dataset folder (folder: the custom "
                                                     "dataset's own folder)")
    parser.add_argument("--skip-images", action="store_true", help="do not open the image files")
    args = parser.parse_args(argv)
    try:
        problems, warnings, counts = check_benchmark(args.name, args.root, check_images=not args.skip_images)
    except (FileNotFoundError, ValueError) as error:
        print(f"data.check {args.name}\nFAILED: {error}")
        return 1
    print(format_report(args.name, problems, warnings, counts))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
