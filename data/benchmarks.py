"""The three text-based person-retrieval benchmarks (and synth-pedes) as `datasets.DatasetDict`.

On-disk layouts (METHOD.md §6), under `root`:
    CUHK-PEDES/reid_raw.json + imgs/      entries {split, captions, file_path, processed_tokens, id}
    ICFG-PEDES/ICFG-PEDES.json + imgs/    same keys; splits train/test
    RSTPReid/data_captions.json + imgs/   image key `img_path`
    SYNTH-PEDES-<preset>/reid_raw.json + imgs/   (CUHK-PEDES layout, generated on first use)

Splits returned:
    train            index int64 (0..N-1), pid int64 (0..P-1), image_id int64, image Image(), caption str, noisy bool
                     (one row per caption)
    <split>_gallery  pid, image_id, image   (one row per image)        for split in val/test when present
    <split>_queries  pid, caption, image_id (one row per caption)
Every split's pids are renumbered 0..P-1 in order of the original id; image_id numbers the split's images
0..M-1 in file order (a query's image_id is its gallery image's).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from . import noise as noise_lib

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
SYNTH_ALIASES = {"synth-pedes": "small", "synth-pedes-tiny": "tiny", "synth-pedes-small": "small",
                 "synth-pedes-full": "full"}


def default_root() -> Path:
    """`$TRPR_CACHE`, else `~/.cache/3rtpr` (where synth-pedes is generated)."""
    return Path(os.environ.get("TRPR_CACHE") or Path.home() / ".cache" / "3rtpr")


def resolve_layout(name: str, root: Optional[Union[str, Path]]) -> tuple[BenchmarkLayout, Path]:
    """(layout, dataset folder) for a benchmark name; generates synth-pedes presets on first use."""
    key = name.strip().lower()
    if key in SYNTH_ALIASES:
        from .synthetic import ensure_generated

        preset = SYNTH_ALIASES[key]
        folder = ensure_generated((Path(root) if root is not None else default_root()).expanduser().absolute(), preset)
        layout = BenchmarkLayout(f"synth-pedes-{preset}", folder.name, "reid_raw.json", "file_path",
                                 ("train", "val", "test"))
        return layout, folder
    if key not in LAYOUTS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(LAYOUTS) + sorted(SYNTH_ALIASES)}")
    layout = LAYOUTS[key]
    if root is None:
        raise ValueError(f"load_benchmark({name!r}) needs root=<folder holding {layout.folder}/>")
    folder = Path(root).expanduser().absolute() / layout.folder  # absolute: image paths survive a chdir
    if not folder.is_dir():
        raise FileNotFoundError(f"{layout.folder} folder not found: {folder} (root={root}); expected "
                                f"{folder / layout.annotation} and {folder / 'imgs'}/")
    return layout, folder


def read_annotation(path: Path) -> list:
    """Parse an annotation JSON list; malformed JSON raises ValueError naming the file and position."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            entries = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from error
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    return entries


def entry_problems(entry, image_key: str, known_splits=KNOWN_SPLITS) -> list[str]:
    """What is wrong with one annotation entry (empty list when it is well formed)."""
    if not isinstance(entry, dict):
        return [f"is a {type(entry).__name__}, not an object"]
    problems = [f"lacks key {key!r}" for key in ("split", "captions", image_key, "id") if key not in entry]
    if problems:
        return problems
    if entry["split"] not in known_splits:
        problems.append(f"has unknown split {entry['split']!r} (expected one of {list(known_splits)})")
    if isinstance(entry["id"], bool) or not isinstance(entry["id"], int):
        problems.append(f"has a non-integer id {entry['id']!r}")
    if not isinstance(entry[image_key], str) or not entry[image_key].strip():
        problems.append(f"has an empty or non-string {image_key!r}")
    captions = entry["captions"]
    if not isinstance(captions, list) or not captions:
        problems.append("has no captions (expected a non-empty list of strings)")
    elif any(not isinstance(c, str) or not c.strip() for c in captions):
        problems.append("has an empty or non-string caption")
    return problems


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


def load_benchmark(name: str, root: Optional[Union[str, Path]] = None, noise_rate: float = 0.0,
                   noise_file: Optional[Union[str, Path]] = None, seed: int = 0,
                   noise_out: Optional[Union[str, Path]] = None):
    """Load a benchmark as a `datasets.DatasetDict` (splits and columns: see the module docstring).

    name: cuhk-pedes | icfg-pedes | rstpreid (case-insensitive; the folder names are accepted too) or
          synth-pedes (= synth-pedes-small) | synth-pedes-tiny | synth-pedes-small | synth-pedes-full.
    root: folder holding the dataset folders (synth-pedes default: `$TRPR_CACHE` or ~/.cache/3rtpr).
    noise_file: RDE `.npy` int64 permutation of the training captions (wins over noise_rate).
    noise_rate, seed: otherwise, permute a random `noise_rate` fraction of training captions (seeded);
          the permutation is written to `noise_out` when given.
    """
    import datasets

    layout, folder = resolve_layout(name, root)
    annotation_path = folder / layout.annotation
    entries = read_annotation(annotation_path)
    image_dir = folder / "imgs"

    by_split: dict[str, list[dict]] = {}
    empty_caption_entries = []
    for position, entry in enumerate(entries):
        problems = entry_problems(entry, layout.image_key, layout.splits)
        if problems == ["has an empty or non-string caption"]:
            entry = dict(entry, captions=[c for c in entry["captions"] if isinstance(c, str) and c.strip()])
            empty_caption_entries.append(position)
            if not entry["captions"]:
                continue
        elif problems:
            label = entry.get(layout.image_key, "?") if isinstance(entry, dict) else "?"
            raise ValueError(f"{annotation_path}: entry {position} ({layout.image_key}={label!r}) "
                             + "; ".join(problems) + f". Run `python -m data.check {layout.name} --root <root>`.")
        by_split.setdefault(entry["split"], []).append(entry)
    if empty_caption_entries:
        logger.warning("%s: dropped empty captions in %d entries (first: entry %d)", annotation_path,
                       len(empty_caption_entries), empty_caption_entries[0])
    if "train" not in by_split:
        raise ValueError(f"{annotation_path}: no entry has split 'train'")

    image_feature = datasets.Image()
    out, counts = {}, {}
    train = _group_split(by_split["train"], layout.image_key, image_dir)
    captions = train["captions"]
    num_samples = len(captions)
    noisy = [False] * num_samples
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
    if noise_file is not None:
        if noise_rate > 0:
            logger.warning("noise_file %s given: it defines the noise; noise_rate=%s is not used", noise_file, noise_rate)
        permutation = noise_lib.load_permutation(noise_file, num_samples)
        captions, noisy = noise_lib.apply_permutation(captions, permutation)
        _log(f"noise from {noise_file}: {100.0 * sum(noisy) / max(1, num_samples):.2f}% of training captions changed")
    elif noise_rate > 0:
        permutation = noise_lib.generate_permutation(num_samples, noise_rate, seed)
        captions, noisy = noise_lib.apply_permutation(captions, permutation)
        moved = float((permutation != np.arange(num_samples)).mean()) if num_samples else 0.0
        if noise_out is not None:
            noise_lib.save_permutation(noise_out, permutation)
        _log(f"noise rate {noise_rate:.2f} (seed {seed}): {100.0 * moved:.2f}% of training captions moved, "
             f"{100.0 * sum(noisy) / max(1, num_samples):.2f}% changed text"
             + (f"; permutation saved to {noise_out}" if noise_out is not None else ""))
    image_of_caption = [train["images"][i] for i in train["caption_image_ids"]]
    out["train"] = datasets.Dataset.from_dict(
        {"index": list(range(num_samples)), "pid": train["caption_pids"], "image_id": train["caption_image_ids"],
         "image": image_of_caption, "caption": captions, "noisy": noisy},
        features=datasets.Features({"index": datasets.Value("int64"), "pid": datasets.Value("int64"),
                                    "image_id": datasets.Value("int64"), "image": image_feature,
                                    "caption": datasets.Value("string"), "noisy": datasets.Value("bool")}))
    counts["train"] = (train["num_ids"], len(train["images"]), num_samples)

    for split in EVAL_SPLITS:
        if split not in by_split:
            continue
        grouped = _group_split(by_split[split], layout.image_key, image_dir)
        out[f"{split}_gallery"] = datasets.Dataset.from_dict(
            {"pid": grouped["image_pids"], "image_id": list(range(len(grouped["images"]))), "image": grouped["images"]},
            features=datasets.Features({"pid": datasets.Value("int64"), "image_id": datasets.Value("int64"),
                                        "image": image_feature}))
        out[f"{split}_queries"] = datasets.Dataset.from_dict(
            {"pid": grouped["caption_pids"], "caption": grouped["captions"], "image_id": grouped["caption_image_ids"]},
            features=datasets.Features({"pid": datasets.Value("int64"), "caption": datasets.Value("string"),
                                        "image_id": datasets.Value("int64")}))
        counts[split] = (grouped["num_ids"], len(grouped["images"]), len(grouped["captions"]))

    _log(_summary_table(layout.name, counts))
    if layout.expected is not None:
        for split, expected in layout.expected.items():
            found = counts.get(split)
            if found != tuple(expected):
                logger.warning("%s split %r: found ids/images/captions %s, the official release has %s "
                               "(METHOD.md §6) — is %s complete and unmodified?", layout.name, split, found,
                               tuple(expected), annotation_path)
    return datasets.DatasetDict(out)


def _log(message: str) -> None:
    """INFO log that is visible even when the application configured no logging."""
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    logger.info(message)
