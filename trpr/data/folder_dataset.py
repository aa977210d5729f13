"""Custom datasets: a folder of images plus one table, loaded as `load_benchmark("folder", root=DIR)`.

Format (anything a spreadsheet can export), under DIR:
    annotations.csv  or  annotations.jsonl     (exactly one of them, UTF-8, a BOM is accepted)
    any image files the table names, e.g. images/0001.jpg
Columns (CSV header / JSONL keys; other columns are ignored), one row per caption:
    image    path of the image file relative to DIR ("/" or "\\" separators; may not leave DIR)
    pid      identity: an integer >= 0 (identities must not be shared between splits)
    caption  a free-text description of the person
    split    train | val | test   (train is required; val/test become evaluation galleries + queries)
Several captions of one image are several rows with the same image, pid and split.

The rules (`review_rows`) are the benchmarks' own, applied per row, and every message names the file and
its line: refused — a missing column, a bad row (malformed JSON line, missing value), an unknown split, a
non-integer, negative or out-of-int64-range pid, an image path that is absolute or escapes DIR, one image
listed with two different pids or splits, an identity in two splits. Fixed with a warning — a blank
caption (its row is dropped), a row that repeats an earlier one exactly (dropped).

    python -m trpr.data.folder_dataset example OUT [--preset tiny] [--format csv|jsonl]
writes an example dataset (synth-pedes images in this format), a template to start from.
"""
from __future__ import annotations

import argparse
import codecs
import csv
import io
import json
import posixpath
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

ANNOTATION_NAMES = ("annotations.csv", "annotations.jsonl")
COLUMNS = ("image", "pid", "caption", "split")
SPLITS = ("train", "val", "test")
MAX_PID = 2 ** 63 - 1  # pids are stored as int64
_INTEGER = re.compile(r"[+-]?\d+")


def find_annotation(root: Path) -> Path:
    """The one annotation table of a custom dataset folder; FileNotFoundError / ValueError saying what is
    missing or ambiguous."""
    present = [root / name for name in ANNOTATION_NAMES if (root / name).is_file()]
    if not present:
        raise FileNotFoundError(f"custom dataset {root}: no {' or '.join(ANNOTATION_NAMES)} (columns "
                                f"{', '.join(COLUMNS)}; trpr/data/README.md, 'Custom datasets')")
    if len(present) > 1:
        raise ValueError(f"custom dataset {root}: both {' and '.join(ANNOTATION_NAMES)} exist; keep one")
    return present[0]


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = bom + error.start
        raise ValueError(f"{path}: invalid UTF-8 at byte offset {offset} (byte 0x{raw[offset]:02x}): save the table "
                         "as UTF-8 (in a spreadsheet: 'CSV UTF-8')") from None


def read_rows(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str, str]]]:
    """Parse a CSV or JSONL table. Returns ((line, row dict) per data row, (line, category, message) per row
    that could not be read). A file that is not UTF-8, or a CSV header lacking a column, raises a one-line
    ValueError naming the file."""
    text = _decode(path)
    rows, bad = [], []
    if path.suffix == ".jsonl":
        for line, content in enumerate(text.splitlines(), start=1):
            if not content.strip():
                continue
            try:
                row = json.loads(content)
            except json.JSONDecodeError as error:
                bad.append((line, "bad rows", f"malformed JSON ({error.msg}, column {error.colno})"))
                continue
            if not isinstance(row, dict):
                bad.append((line, "bad rows", f"is a JSON {type(row).__name__}, not an object with keys "
                                              f"{', '.join(COLUMNS)}"))
                continue
            rows.append((line, row))
        return rows, bad
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{path}: empty file (expected a header line with {', '.join(COLUMNS)})") from None
    header = [name.strip().lower() for name in header]
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        raise ValueError(f"{path} line 1: the header lacks column(s) {', '.join(missing)} (found "
                         f"{', '.join(header) or 'nothing'}; expected {', '.join(COLUMNS)})")
    line = reader.line_num
    for values in reader:
        start, line = line + 1, reader.line_num
        if not any(value.strip() for value in values):
            continue
        if len(values) != len(header):
            bad.append((start, "bad rows", f"has {len(values)} fields, the header has {len(header)}"))
            continue
        rows.append((start, dict(zip(header, values))))
    return rows, bad


def _parse_pid(value) -> tuple[int | None, str | None]:
    """(pid, None) or (None, why it is refused)."""
    if isinstance(value, bool) or value is None:
        return None, f"pid {value!r} is not an integer"
    if isinstance(value, int):
        pid = value
    elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        pid = int(value.strip())
    else:
        return None, f"pid {value!r} is not an integer"
    if pid < 0:
        return None, f"pid {pid} is negative (pids are integers >= 0)"
    if pid > MAX_PID:
        return None, f"pid {pid} is out of range (at most {MAX_PID}, int64)"
    return pid, None


def _normalise_image(value) -> tuple[str | None, str | None]:
    """(path relative to the root with "/", None) or (None, why it is refused)."""
    if not isinstance(value, str) or not value.strip():
        return None, "has an empty image path"
    path = value.strip().replace("\\", "/")
    if path.startswith("/") or re.match(r"[A-Za-z]:/", path):
        return None, f"image {value!r} is an absolute path (give it relative to the dataset folder)"
    normal = posixpath.normpath(path)
    if normal == ".." or normal.startswith("../"):
        return None, f"image {value!r} points outside the dataset folder"
    return normal, None


def review_rows(rows: list[tuple[int, dict]], bad: list[tuple[int, str, str]], path: Path, splits=SPLITS):
    """Apply the rules (module docstring) to the rows of `read_rows`. Returns a benchmarks.AnnotationReview
    whose entries are one per image, in order of first appearance: {"split", "id", "image", "captions",
    "_position": its first line, "_where": "<file> line <n>"}; every message starts with "<file> line <n>:"."""
    from .benchmarks import AnnotationReview

    review = AnnotationReview()
    errors, warnings = defaultdict(list), defaultdict(list)
    for line, category, message in bad:
        errors[category].append(f"{path} line {line}: {message}")
    entries: dict[str, dict] = {}
    seen_rows: dict[tuple, int] = {}
    splits_of_id: dict[int, dict] = defaultdict(dict)
    for line, row in rows:
        where = f"{path} line {line}"
        missing = [name for name in COLUMNS if row.get(name) is None]
        if missing:
            errors["missing keys"].append(f"{where}: lacks {', '.join(missing)}")
            continue
        problems = []
        image, why = _normalise_image(row["image"])
        if why:
            problems.append(("path outside root" if "outside" in why or "absolute" in why else "malformed entry", why))
        pid, why = _parse_pid(row["pid"])
        if why:
            problems.append(("bad id", why))
        split = row["split"].strip() if isinstance(row["split"], str) else row["split"]
        if split not in splits:
            problems.append(("unknown split", f"split {row['split']!r} is not one of {', '.join(splits)}"))
        caption = row["caption"]
        if not isinstance(caption, str):
            problems.append(("empty captions", f"caption {caption!r} is not text"))
        for category, message in problems:
            errors[category].append(f"{where}: {message}")
        if problems:
            continue
        key = (image, pid, split, caption)
        if key in seen_rows:
            warnings["duplicate entries"].append(f"{where}: repeats line {seen_rows[key]} exactly (dropped)")
            continue
        seen_rows[key] = line
        if not caption.strip():
            warnings["blank captions"].append(f"{where}: blank caption (row dropped)")
            continue
        entry = entries.get(image)
        if entry is None:
            entry = entries[image] = {"split": split, "id": pid, "image": image, "captions": [], "_position": line,
                                      "_where": where}
            splits_of_id[pid].setdefault(split, line)
        elif (entry["id"], entry["split"]) != (pid, split):
            errors["duplicate paths"].append(
                f"{where}: image {image!r} has pid {pid}, split {split}; line {entry['_position']} gave it pid "
                f"{entry['id']}, split {entry['split']}")
            continue
        entry["captions"].append(caption)
    for pid, first_line in sorted(splits_of_id.items()):
        if len(first_line) > 1:
            lines = ", ".join(f"{split} (line {line})" for split, line in first_line.items())
            errors["id in several splits"].append(f"{path} line {max(first_line.values())}: pid {pid} appears in "
                                                  f"splits {lines} (identities must be disjoint across splits)")
    for entry in entries.values():
        if entry["captions"]:
            review.by_split.setdefault(entry["split"], []).append(entry)
    review.errors, review.warnings = dict(errors), dict(warnings)
    return review


def review_folder(root: Path):
    """`review_rows(read_rows(find_annotation(root)))`."""
    path = find_annotation(root)
    rows, bad = read_rows(path)
    return review_rows(rows, bad, path)


def write_example(out_dir, preset: str = "tiny", fmt: str = "csv", seed: int = 0) -> Path:
    """An example custom dataset in `out_dir`: the synth-pedes `preset` images under images/<split>/ and
    annotations.<fmt> with one row per caption (pids as generated). Returns `out_dir`."""
    from .synthetic import generate

    if fmt not in ("csv", "jsonl"):
        raise ValueError(f"format must be csv or jsonl, got {fmt!r}")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.is_dir() else None) as tmp:
        synth = generate(Path(tmp) / "synth", preset=preset, seed=seed, progress=False)
        entries = json.loads((synth / "reid_raw.json").read_text())
        rows = []
        for entry in entries:
            image = f"images/{entry['split']}/{Path(entry['file_path']).name}"
            (out_dir / image).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(synth / "imgs" / entry["file_path"], out_dir / image)
            rows += [{"image": image, "pid": entry["id"], "caption": caption, "split": entry["split"]}
                     for caption in entry["captions"]]
    if fmt == "csv":
        with open(out_dir / "annotations.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    else:
        (out_dir / "annotations.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Custom datasets (image folder + annotations.csv/.jsonl).")
    commands = parser.add_subparsers(dest="command", required=True)
    example = commands.add_parser("example", help="write an example dataset built from synth-pedes images")
    example.add_argument("out", type=Path)
    example.add_argument("--preset", default="tiny", help="synth-pedes preset: tiny | small | full")
    example.add_argument("--format", default="csv", choices=("csv", "jsonl"))
    args = parser.parse_args(argv)
    out = write_example(args.out, args.preset, args.format)
    print(f"wrote {out} (load with data.load_benchmark('folder', root={str(out)!r}))")


if __name__ == "__main__":
    main()
