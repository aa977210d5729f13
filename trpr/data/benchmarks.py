"""The three text-based person-retrieval benchmarks (and synth-pedes) as `datasets.DatasetDict`.

On-disk layouts (docs/method.md §6), under `root`:
    CUHK-PEDES/reid_raw.json + imgs/      entries {split, captions, file_path, processed_tokens, id}
    ICFG-PEDES/ICFG-PEDES.json + imgs/    same keys; splits train/test
    RSTPReid/data_captions.json + imgs/   image key `img_path`
    SYNTH-PEDES-<preset>/reid_raw.json + imgs/   (CUHK-PEDES layout, generated on first use)
A custom dataset ("folder", `data.folder_dataset`) is `root` itself: annotations.csv or annotations.jsonl
(columns image, pid, caption, split; one row per caption) + the image files it names, relative to `root`.

Splits returned:
    train            index int64 (0..N-1), pid int64 (0..P-1), image_id int64, image Image(), caption str, noisy bool
                     (one row per caption)
    <split>_gallery  pid, image_id, image   (one row per image)        for split in val/test when present
    <split>_queries  pid, caption, image_id (one row per caption)
Every split's pids are renumbered 0..P-1 in order of the original id; image_id numbers the split's images
0..M-1 in file order (a query's image_id is its gallery image's).
"""
from __future__ import annotations

import codecs
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Optional, Union

import numpy as np

from trpr.runtime.cache import cache_root

from . import noise as noise_lib
from .arrow_splits import build_split

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test")
KNOWN_SPLITS = ("train",) + EVAL_SPLITS


@dataclass(frozen=True)
class BenchmarkLayout:
    """Where a benchmark's annotation lives and how its entries are keyed."""
    name: str            # canonical lower-case name
    folder: str          # folder under root
    annotation: str      # annotation file inside the folder
    image_key: str       # entry key holding the image path (relative to imgs/)
    splits: tuple        # split names the benchmark has
    expected: Optional[dict] = None  # split -> (ids, images, captions) of the official release
    image_dir: str = "imgs"  # folder (inside the dataset folder) the image paths are relative to
    rows: bool = False   # annotation is a CSV/JSONL table, one row per caption (custom datasets)


LAYOUTS = {
    "cuhk-pedes": BenchmarkLayout("cuhk-pedes", "CUHK-PEDES", "reid_raw.json", "file_path", ("train", "val", "test"),
                                  {"train": (11003, 34054, 68126), "val": (1000, 3078, 6158),
                                   "test": (1000, 3074, 6156)}),
    "icfg-pedes": BenchmarkLayout("icfg-pedes", "ICFG-PEDES", "ICFG-PEDES.json", "file_path", ("train", "test"),
                                  {"train": (3102, 34674, 34674), "test": (1000, 19848, 19848)}),
    "rstpreid": BenchmarkLayout("rstpreid", "RSTPReid", "data_captions.json", "img_path", ("train", "val", "test"),
                                {"train": (3701, 18505, 37010), "val": (200, 1000, 2000),
                                 "test": (200, 1000, 2000)}),
}
CUSTOM_DATASET = "folder"  # load_benchmark("folder", root=DIR): a custom dataset (data.folder_dataset)
SYNTH_ALIASES = {"synth-pedes": "small", "synth-pedes-tiny": "tiny", "synth-pedes-small": "small",
                 "synth-pedes-full": "full"}


def resolve_layout(name: str, root: Optional[Union[str, Path]]) -> tuple[BenchmarkLayout, Path]:
    """(layout, dataset folder) for a benchmark name; generates synth-pedes presets on first use."""
    key = name.strip().lower()
    if key == CUSTOM_DATASET:
        from .folder_dataset import find_annotation

        if root is None:
            raise ValueError(f"load_benchmark({name!r}) needs root=<the dataset folder holding annotations.csv or "
                             "annotations.jsonl and the images>")
        folder = Path(root).expanduser().absolute()
        if not folder.is_dir():
            raise FileNotFoundError(f"custom dataset folder not found: {folder} (root={root})")
        layout = BenchmarkLayout(CUSTOM_DATASET, folder.name, find_annotation(folder).name, "image", KNOWN_SPLITS,
                                 image_dir="", rows=True)
        return layout, folder
    if key in SYNTH_ALIASES:
        from .synthetic import ensure_generated

        preset = SYNTH_ALIASES[key]
        folder = ensure_generated((Path(root) if root is not None else cache_root()).expanduser().absolute(), preset)
        layout = BenchmarkLayout(f"synth-pedes-{preset}", folder.name, "reid_raw.json", "file_path",
                                 ("train", "val", "test"))
        return layout, folder
    if key not in LAYOUTS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of "
                         f"{sorted(LAYOUTS) + sorted(SYNTH_ALIASES) + [CUSTOM_DATASET]}")
    layout = LAYOUTS[key]
    if root is None:
        raise ValueError(f"load_benchmark({name!r}) needs root=<folder holding {layout.folder}/>")
    folder = Path(root).expanduser().absolute() / layout.folder  # absolute: image paths survive a chdir
    if not folder.is_dir():
        raise FileNotFoundError(f"{layout.folder} folder not found: {folder} (root={root}); expected "
                                f"{folder / layout.annotation} and {folder / 'imgs'}/")
    return layout, folder


def read_annotation(path: Path) -> list:
    """Parse an annotation JSON list. Invalid UTF-8 and malformed JSON raise a one-line ValueError naming
    the file and the position (byte offset / line and column)."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = bom + error.start
        raise ValueError(f"{path}: invalid UTF-8 at byte offset {offset} (byte 0x{raw[offset]:02x}): the annotation "
                         "must be UTF-8 encoded JSON; re-save it as UTF-8") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    return entries


def escapes_folder(path: str) -> bool:
    """Whether an annotation's image path could name a file outside the image folder it is relative to:
    absolute (POSIX or Windows, a drive or a UNC share), or with a `..` component (either separator)."""
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute() or PureWindowsPath(path).drive \
            or path.startswith(("/", "\\")):
        return True
    return ".." in PureWindowsPath(path).parts or ".." in PurePosixPath(path).parts


def entry_problems(entry, image_key: str, splits=KNOWN_SPLITS) -> list[tuple[str, str]]:
    """What is wrong with one annotation entry on its own, as (category, message) pairs (empty when well
    formed). `splits`: the split names the benchmark has."""
    if not isinstance(entry, dict):
        return [("malformed entry", f"is a {type(entry).__name__}, not an object")]
    problems = [("missing keys", f"lacks key {key!r}") for key in ("split", "captions", image_key, "id")
                if key not in entry]
    if problems:
        return problems
    if entry["split"] not in splits:
        problems.append(("unknown split", f"has unknown split {entry['split']!r} (expected one of {list(splits)})"))
    if isinstance(entry["id"], bool) or not isinstance(entry["id"], int):
        problems.append(("bad id", f"has a non-integer id {entry['id']!r}"))
    elif entry["id"] < 0:
        problems.append(("bad id", f"has a negative id {entry['id']}"))
    if not isinstance(entry[image_key], str) or not entry[image_key].strip():
        problems.append(("malformed entry", f"has an empty or non-string {image_key!r}"))
    elif escapes_folder(entry[image_key]):
        problems.append(("path outside the image folder",
                         f"has image path {entry[image_key]!r}, which leaves the image folder (absolute, or with "
                         "'..'); image paths must be relative to <dataset>/imgs"))
    captions = entry["captions"]
    if not isinstance(captions, list) or not captions:
        problems.append(("empty captions", "has no captions (expected a non-empty list of strings)"))
    elif any(not isinstance(c, str) for c in captions):
        problems.append(("empty captions", "has a non-string caption"))
    return problems


@dataclass
class AnnotationReview:
    """The verdict on an annotation file, shared by `load_benchmark` and `python -m trpr.data.check` (so they
    agree on every rule).

    by_split: split -> usable entries in file order, with fixes applied (each with its entry number in
              "_position")
    errors:   category -> messages; `load_benchmark` refuses the file when there is any
    warnings: category -> messages; what `load_benchmark` fixed (and says so):
              blank captions dropped (an entry left with none is dropped), exact duplicate entries dropped
    """
    by_split: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    warnings: dict = field(default_factory=dict)


def review_annotation(entries: list, layout: BenchmarkLayout) -> AnnotationReview:
    """Apply the annotation rules to `entries` (the parsed JSON list of `layout`'s annotation file).

    Errors: an entry that is not an object, lacks a key, has a split `layout` does not have, a non-integer
    or negative id, an empty image path, no caption list, a non-string caption; an image path listed by
    two entries that differ; an id in two splits.
    Fixed with a warning: blank captions (dropped; an entry with only blank captions is dropped), an entry
    that repeats an earlier one exactly (dropped)."""
    review = AnnotationReview()
    errors, warnings = defaultdict(list), defaultdict(list)
    key = layout.image_key
    first_of_path: dict[str, tuple[int, dict]] = {}
    splits_of_id: dict[int, set] = defaultdict(set)
    for position, entry in enumerate(entries):
        label = entry.get(key, "?") if isinstance(entry, dict) else "?"
        where = f"entry {position} ({key}={label!r})"
        problems = entry_problems(entry, key, layout.splits)
        for category, message in problems:
            errors[category].append(f"{where} {message}")
        if problems:
            continue
        path = entry[key]
        if path in first_of_path:
            earlier, earlier_entry = first_of_path[path]
            same = all(entry[k] == earlier_entry[k] for k in ("split", "id", "captions"))
            if same:
                warnings["duplicate entries"].append(f"{where} repeats entry {earlier} exactly (dropped)")
            else:
                errors["duplicate paths"].append(f"{where} lists the image of entry {earlier} with a different "
                                                 f"split, id or captions")
            continue
        first_of_path[path] = (position, entry)
        captions = [c for c in entry["captions"] if c.strip()]
        if len(captions) < len(entry["captions"]):
            dropped = len(entry["captions"]) - len(captions)
            warnings["blank captions"].append(f"{where} has {dropped} blank caption(s) (dropped"
                                              + (", and the entry with them)" if not captions else ")"))
            if not captions:
                continue
        splits_of_id[entry["id"]].add(entry["split"])
        review.by_split.setdefault(entry["split"], []).append(dict(entry, captions=captions, _position=position))
    for pid, splits in sorted(splits_of_id.items()):
        if len(splits) > 1:
            errors["id in several splits"].append(f"id {pid} appears in splits {sorted(splits)} (identities "
                                                  "must be disjoint across splits)")
    review.errors, review.warnings = dict(errors), dict(warnings)
    return review


def review_layout(layout: BenchmarkLayout, folder: Path) -> AnnotationReview:
    """The review of a dataset folder's annotation: `review_annotation` of the JSON list, or for a custom
    dataset (layout.rows) `folder_dataset.review_rows` of its table. Shared by load_benchmark and data.check."""
    if layout.rows:
        from .folder_dataset import read_rows, review_rows

        path = folder / layout.annotation
        rows, bad = read_rows(path)
        return review_rows(rows, bad, path, layout.splits)
    return review_annotation(read_annotation(folder / layout.annotation), layout)


def _group_split(entries: list[dict], image_key: str, image_dir: Path) -> dict:
    """Columns for one split: per image (paths, pids, image_ids) and per caption (pid, image_id, caption)."""
    raw_ids = sorted({entry["id"] for entry in entries})
    pid_of = {raw: pid for pid, raw in enumerate(raw_ids)}
    images, image_pids, captions, caption_pids, caption_image_ids = [], [], [], [], []
    for image_id, entry in enumerate(entries):
        pid = pid_of[entry["id"]]
        images.append(str(image_dir / entry[image_key]))
        image_pids.append(pid)
        for caption in entry["captions"]:
            captions.append(caption)
            caption_pids.append(pid)
            caption_image_ids.append(image_id)
    return {"images": images, "image_pids": image_pids, "captions": captions, "caption_pids": caption_pids,
            "caption_image_ids": caption_image_ids, "num_ids": len(raw_ids)}


def _summary_table(name: str, counts: dict) -> str:
    lines = [f"{name}: split     ids   images  captions", "-" * (len(name) + 36)]
    for split, (ids, images, captions) in counts.items():
        lines.append(f"{name}: {split:<6} {ids:>7} {images:>8} {captions:>9}")
    return "\n".join(lines)


def _raise_review_errors(review: AnnotationReview, annotation_path: Path, layout: BenchmarkLayout) -> None:
    """One line: the first error of the review, how many more there are, and the command that lists them."""
    messages = [message for items in review.errors.values() for message in items]
    if layout.rows:  # the earliest line first
        messages.sort(key=lambda m: int(re.search(r" line (\d+)", m).group(1)) if re.search(r" line (\d+)", m) else 0)
    if messages:
        more = f" (and {len(messages) - 1} more problem(s))" if len(messages) > 1 else ""
        where = "" if layout.rows else f"{annotation_path}: "  # a custom dataset's messages name file and line
        root = annotation_path.parent if layout.rows else "<root>"
        raise ValueError(f"{where}{messages[0]}{more}. Run `python -m trpr.data.check {layout.name} "
                         f"--root {root}` for the full list.")


def _apply_noise(captions: list, layout: BenchmarkLayout, folder: Path, noise_rate: float,
                 noise_file, seed: int, noise_out) -> tuple[list, list]:
    """(captions, noisy flags) after the noise permutation (module docstring of `data.noise`)."""
    num_samples = len(captions)
    if noise_file is not None and noise_rate > 0:
        logger.warning("noise_file %s given: it defines the noise; noise_rate=%s is not used", noise_file, noise_rate)
    elif noise_rate > 0:
        standard = noise_lib.standard_noise_file(folder.parent, layout.folder, noise_rate)
        if standard.is_file():
            noise_file = standard
            _log(f"noise rate {noise_rate}: using the standard noise file {standard}")
        elif layout.expected is not None:
            logger.warning("NO STANDARD NOISE FILE %s: GENERATING a noise permutation instead (rate %s, seed %d). "
                           "Results are NOT comparable with published noisy-correspondence numbers, which use RDE's "
                           "permutation files: copy RDE's noiseindex/ folder to %s (README, 'Noisy correspondence').",
                           standard, noise_rate, seed, standard.parent)
    if noise_file is not None:
        permutation = noise_lib.load_permutation(noise_file, num_samples)
        source = f"noise from {noise_file}"
    elif noise_rate > 0:
        permutation = noise_lib.generate_permutation(num_samples, noise_rate, seed)
        source = f"noise rate {noise_rate:.2f} (seed {seed}), generated"
    else:
        return captions, [False] * num_samples
    captions, noisy = noise_lib.apply_permutation(captions, permutation)
    moved = float((permutation != np.arange(num_samples)).mean()) if num_samples else 0.0
    if noise_out is not None:
        noise_lib.save_permutation(noise_out, permutation)
    _log(f"{source}: {100.0 * moved:.2f}% of training captions moved, "
         f"{100.0 * sum(noisy) / max(1, num_samples):.2f}% changed text"
         + (f"; permutation saved to {noise_out}" if noise_out is not None else ""))
    return captions, noisy


def load_benchmark(name: str, root: Optional[Union[str, Path]] = None, noise_rate: float = 0.0,
                   noise_file: Optional[Union[str, Path]] = None, seed: int = 0,
                   noise_out: Optional[Union[str, Path]] = None):
    """Load a benchmark as a `datasets.DatasetDict` (splits and columns: see the module docstring).

    name: cuhk-pedes | icfg-pedes | rstpreid (case-insensitive; the folder names are accepted too),
          synth-pedes (= synth-pedes-small) | synth-pedes-tiny | synth-pedes-small | synth-pedes-full, or
          folder (a custom dataset: image folder + annotations.csv/.jsonl, `data.folder_dataset`).
    root: folder holding the dataset folders (synth-pedes default: `$TRPR_CACHE` or ~/.cache/3rtpr); for
          folder, the custom dataset's folder itself.
    noise_file: RDE `.npy` int64 permutation of the training captions (wins over noise_rate).
    noise_rate: in [0, 1) (`data.noise.check_noise_rate`). Without noise_file, `<root>/noiseindex/<Folder>_<rate>.npy`
          (RDE's file name, e.g. CUHK-PEDES_0.2.npy) is used when it exists; otherwise a random `noise_rate`
          fraction of training captions is permuted (seeded by `seed`) with a loud warning on the official
          benchmarks (numbers then not comparable with published ones).
    noise_out: the permutation used is written there when given (the run folder).
    The annotation rules are `review_annotation`'s (`python -m trpr.data.check` applies the same); the splits are
    built without pickling anything (`data.arrow_splits`).
    """
    import datasets

    noise_lib.check_noise_rate(noise_rate)
    layout, folder = resolve_layout(name, root)
    annotation_path = folder / layout.annotation
    review = review_layout(layout, folder)
    _raise_review_errors(review, annotation_path, layout)
    for category, messages in review.warnings.items():
        logger.warning("%s: %s in %d entries (first: %s)", annotation_path, category, len(messages), messages[0])
    by_split = review.by_split
    if "train" not in by_split:
        raise ValueError(f"{annotation_path}: no {'row' if layout.rows else 'entry'} has split 'train'")
    image_dir = folder / layout.image_dir

    image_feature = datasets.Image()
    out, counts = {}, {}
    train = _group_split(by_split["train"], layout.image_key, image_dir)
    num_samples = len(train["captions"])
    captions, noisy = _apply_noise(train["captions"], layout, folder, noise_rate, noise_file, seed, noise_out)
    image_of_caption = [train["images"][i] for i in train["caption_image_ids"]]
    out["train"] = build_split(
        {"index": list(range(num_samples)), "pid": train["caption_pids"], "image_id": train["caption_image_ids"],
         "image": image_of_caption, "caption": captions, "noisy": noisy},
        datasets.Features({"index": datasets.Value("int64"), "pid": datasets.Value("int64"),
                           "image_id": datasets.Value("int64"), "image": image_feature,
                           "caption": datasets.Value("string"), "noisy": datasets.Value("bool")}))
    counts["train"] = (train["num_ids"], len(train["images"]), num_samples)

    for split in EVAL_SPLITS:
        if split not in by_split:
            continue
        grouped = _group_split(by_split[split], layout.image_key, image_dir)
        out[f"{split}_gallery"] = build_split(
            {"pid": grouped["image_pids"], "image_id": list(range(len(grouped["images"]))), "image": grouped["images"]},
            datasets.Features({"pid": datasets.Value("int64"), "image_id": datasets.Value("int64"),
                               "image": image_feature}))
        out[f"{split}_queries"] = build_split(
            {"pid": grouped["caption_pids"], "caption": grouped["captions"], "image_id": grouped["caption_image_ids"]},
            datasets.Features({"pid": datasets.Value("int64"), "caption": datasets.Value("string"),
                               "image_id": datasets.Value("int64")}))
        counts[split] = (grouped["num_ids"], len(grouped["images"]), len(grouped["captions"]))

    _log(_summary_table(layout.name, counts))
    for warning in count_warnings(layout, counts):
        logger.warning("%s: %s — is %s complete and unmodified?", layout.name, warning, annotation_path)
    return datasets.DatasetDict(out)


def count_warnings(layout: BenchmarkLayout, counts: dict) -> list[str]:
    """Differences between `counts` (split -> (ids, images, captions)) and the official release."""
    if layout.expected is None:
        return []
    return [f"split {split!r}: found ids/images/captions {counts.get(split)}, the official release has "
            f"{tuple(expected)} (docs/method.md §6)"
            for split, expected in layout.expected.items() if counts.get(split) != tuple(expected)]


def _log(message: str) -> None:
    """INFO log that is visible even when the application configured no logging."""
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    logger.info(message)
