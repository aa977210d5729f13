"""Validate a benchmark folder and print a report; exit status 1 when anything is wrong.

    python -m data.check NAME --root ROOT

Checks: the annotation file parses; every entry has its keys (split, captions, image path, id), a known
split, an integer id >= 0 and non-empty captions; no image path is listed twice; every image file exists
and decodes; no identity appears in two splits. Differences from the official counts of METHOD.md §6 are
reported as warnings (a subset of a benchmark is legitimate for experiments, but worth knowing).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

from PIL import Image
from tqdm.auto import tqdm

from .benchmarks import KNOWN_SPLITS, entry_problems, read_annotation, resolve_layout

MAX_LISTED = 10  # problems listed per category; the rest are counted


def check_benchmark(name: str, root: Optional[str] = None, check_images: bool = True,
                    progress: bool = True) -> tuple[dict[str, list[str]], list[str], dict]:
    """Run all checks. Returns (problems by category, warnings, counts split -> (ids, images, captions))."""
    problems: dict[str, list[str]] = defaultdict(list)
    warnings: list[str] = []
    layout, folder = resolve_layout(name, root)
    annotation_path = folder / layout.annotation
    entries = read_annotation(annotation_path)
    image_dir = folder / "imgs"
    if not image_dir.is_dir():
        problems["missing image folder"].append(f"{image_dir} does not exist")

    seen_paths: dict[str, int] = {}
    splits_of_id: dict[int, set] = defaultdict(set)
    ids_of_split: dict[str, set] = defaultdict(set)
    images_of_split: dict[str, int] = defaultdict(int)
    captions_of_split: dict[str, int] = defaultdict(int)
    valid_entries = []
    for position, entry in enumerate(entries):
        where = f"entry {position}"
        issues = entry_problems(entry, layout.image_key, KNOWN_SPLITS)
        if isinstance(entry, dict) and entry.get("split") in KNOWN_SPLITS and entry["split"] not in layout.splits:
            issues.append(f"has split {entry['split']!r}, which {layout.name} does not have (expected {list(layout.splits)})")
        for issue in issues:
            category = ("missing keys" if issue.startswith("lacks key") else
                        "unknown split" if "split" in issue else
                        "empty captions" if "caption" in issue else
                        "bad id" if "id" in issue else "malformed entry")
            label = entry.get(layout.image_key, "?") if isinstance(entry, dict) else "?"
            problems[category].append(f"{where} ({layout.image_key}={label!r}) {issue}")
        if not isinstance(entry, dict) or any(k not in entry for k in ("split", layout.image_key, "id")):
            continue
        path = entry[layout.image_key]
        if isinstance(path, str):
            if path in seen_paths:
                problems["duplicate paths"].append(f"{where}: {path!r} already listed by entry {seen_paths[path]}")
            else:
                seen_paths[path] = position
        pid = entry["id"]
        if isinstance(pid, int) and not isinstance(pid, bool):
            if pid < 0:
                problems["bad id"].append(f"{where} ({layout.image_key}={path!r}) has negative id {pid}")
            splits_of_id[pid].add(str(entry["split"]))
        split = str(entry["split"])
        ids_of_split[split].add(pid)
        images_of_split[split] += 1
        captions = entry.get("captions")
        captions_of_split[split] += len(captions) if isinstance(captions, list) else 0
        if isinstance(path, str) and path.strip():
            valid_entries.append((position, path))

    for pid, splits in sorted(splits_of_id.items()):
        if len(splits) > 1:
            problems["id in several splits"].append(f"id {pid} appears in splits {sorted(splits)}")

    if check_images and image_dir.is_dir():
        for position, path in tqdm(valid_entries, desc=f"checking {layout.name} images", unit="img",
                                   disable=not progress, leave=False):
            file = image_dir / path
            if not file.is_file():
                problems["missing images"].append(f"entry {position}: {file} does not exist")
                continue
            try:
                with Image.open(file) as image:
                    image.load()
            except (OSError, ValueError) as error:
                problems["unreadable images"].append(f"entry {position}: {file}: {error}")

    counts = {split: (len(ids_of_split[split]), images_of_split[split], captions_of_split[split])
              for split in KNOWN_SPLITS if split in ids_of_split}
    if layout.expected is not None:
        for split, expected in layout.expected.items():
            if counts.get(split) != tuple(expected):
                warnings.append(f"split {split!r}: ids/images/captions {counts.get(split)} differ from the "
                                f"official {tuple(expected)} (METHOD.md §6)")
    return dict(problems), warnings, counts


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
    parser.add_argument("name", help="cuhk-pedes | icfg-pedes | rstpreid | synth-pedes[-tiny|-small|-full]")
    parser.add_argument("--root", default=None, help="folder holding the dataset folder")
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
