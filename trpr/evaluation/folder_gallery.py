"""Search galleries made of any folder of images (no identities, no annotation): found recursively,
encoded once, and kept on disk beside the benchmark galleries' features.

The index of (gallery folder, checkpoint) lives at `search_cache_dir() / folder-<key>.{safetensors,json}`:
    .safetensors  a.global [N, E], a.fused [N, D], b.global [N, E], b.fused [N, D]  (fp32, row i = file i);
                  metadata {"index_id": random id shared with the .json}
    .json         {"version", "gallery", "index_id", "files": [[relative path, size, mtime_ns], ...] (row order),
                   "unreadable": [[relative path, size, mtime_ns, reason], ...]}
Every search scans the folder first: a file is reused only when its relative path, size and mtime_ns
all match the index; new or changed files are encoded, removed ones dropped, so the index is never stale.
Unreadable files are remembered (with the same key) so they are not decoded again, and are listed in one
warning at every search. Nothing is pickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from trpr.runtime.atomic import atomic_path

from .checkpoints import Checkpoint, EvalInputError
from .search import GalleryIndex, checkpoint_signature, search_cache_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FOLDER_INDEX_VERSION = 1  # bump when the files' layout changes: older indexes are then rebuilt
MAX_WARNED = 20  # unreadable files named in the warning; the rest are counted

FileKey = tuple  # (relative path with "/", size in bytes, mtime in ns)


def scan_gallery(folder: Path) -> list[FileKey]:
    """Every image file under `folder` (recursive, not into linked folders; extensions IMAGE_EXTENSIONS, any
    case; entries whose name starts with "." are skipped), as (relative path, size, mtime_ns) sorted by path."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(directory) / name
            try:
                stat = path.stat()
            except OSError:  # vanished or a broken link: not part of the gallery
                continue
            found.append((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
    return sorted(found)


def folder_cache_stem(checkpoint: Checkpoint, folder: Path, cache_dir: Path | None = None) -> Path:
    """`<cache_dir or search_cache_dir()>/folder-<sha256(resolved folder + checkpoint files)[:24]>`."""
    blob = json.dumps({"gallery": str(Path(folder).resolve()), "checkpoint": checkpoint_signature(checkpoint)},
                      sort_keys=True)
    return Path(cache_dir or search_cache_dir()) / f"folder-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


class FolderImages(Dataset):
    """Image files by path. item -> {"pixel_values": FloatTensor[3, H, W]} (the evaluation transform of
    data.EvalImages, read with data.images.open_image)."""

    def __init__(self, paths: list, image_size):
        from trpr.data.transforms import build_image_transform

        self.paths = [str(p) for p in paths]
        self.transform = build_image_transform(train=False, image_size=image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> dict:
        from trpr.data.images import open_image

        uint8, box = self.transform.augment(self.transform.resize(open_image(self.paths[position])))
        return {"pixel_values": self.transform.to_float(uint8, box)}


@dataclass
class FolderIndex:
    """A folder gallery's features. files: FileKey per row; features: per model (A, B) (global [N, E],
    fused [N, D]) fp32 CPU; unreadable: (relative path, size, mtime_ns, reason) of skipped files."""
    folder: Path
    files: list
    features: list
    unreadable: list = field(default_factory=list)
    stem: Path | None = None  # where it is saved (`<stem>.safetensors` / `.json`)
    index_id: str = ""  # the random id of the saved write: changes whenever the saved index changes

    def gallery_index(self) -> GalleryIndex:
        """As a search.GalleryIndex (pids -1: no identities; sources: relative paths under `root`)."""
        count = len(self.files)
        return GalleryIndex(image_outputs=self.features, pids=torch.full((count,), -1, dtype=torch.int64),
                            image_ids=torch.arange(count, dtype=torch.int64), sources=[f[0] for f in self.files],
                            root=self.folder)


@dataclass
class IndexUpdate:
    """What `update_folder_index` did: image files reused from the index / seen for the first time / changed
    (same path, other size or mtime) / gone; how many of the added and changed were encoded; whether an
    index was found on disk."""
    reused: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    encoded: int = 0
    found: bool = False

    def describe(self) -> str:
        if not self.found:
            return f"new index: {self.encoded} encoded"
        return f"{self.reused} from cache, {self.added} added, {self.changed} changed, {self.removed} removed"


def save_folder_index(index: FolderIndex, stem: Path) -> None:
    """Write `<stem>.json` then `<stem>.safetensors` (temporary names, atomic renames); both carry the same
    random index id, so a pair of files from two different writes is detected and rebuilt."""
    from safetensors.torch import save_file

    stem.parent.mkdir(parents=True, exist_ok=True)
    index_id = uuid.uuid4().hex
    tensors = {}
    for name, (global_emb, fused_emb) in zip("ab", index.features):
        tensors[f"{name}.global"] = global_emb.float().contiguous()
        tensors[f"{name}.fused"] = fused_emb.float().contiguous()
    meta = {"version": FOLDER_INDEX_VERSION, "gallery": str(Path(index.folder).resolve()), "index_id": index_id,
            "files": [list(f) for f in index.files], "unreadable": [list(u) for u in index.unreadable]}
    with atomic_path(stem.with_suffix(".safetensors")) as features_tmp, \
            atomic_path(stem.with_suffix(".json")) as meta_tmp:  # the .json is renamed first
        save_file(tensors, str(features_tmp), metadata={"index_id": index_id})
        meta_tmp.write_text(json.dumps(meta))
    index.stem, index.index_id = Path(stem), index_id


def load_folder_index(stem: Path, folder: Path) -> FolderIndex | None:
    """The index saved at `stem`, or None when absent, damaged, of another version or mismatched (the two
    files of different writes, row counts that differ): it is then rebuilt."""
    from safetensors import SafetensorError, safe_open

    features_path, meta_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not (features_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        with safe_open(str(features_path), framework="pt") as handle:
            if (handle.metadata() or {}).get("index_id") != meta["index_id"]:
                return None
            features = [(handle.get_tensor(f"{m}.global"), handle.get_tensor(f"{m}.fused")) for m in "ab"]
        files = [(str(p), int(s), int(t)) for p, s, t in meta["files"]]
        unreadable = [(str(p), int(s), int(t), str(r)) for p, s, t, r in meta["unreadable"]]
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None
    if meta.get("version") != FOLDER_INDEX_VERSION or any(t.shape[0] != len(files) for pair in features for t in pair):
        return None
    return FolderIndex(folder=Path(folder), files=files, features=features, unreadable=unreadable, stem=Path(stem),
                       index_id=str(meta["index_id"]))


def _empty_features(pair) -> list:
    """Per model (global [0, E], fused [0, D]): the features of an empty gallery."""
    return [(torch.zeros(0, model.embed_dim), torch.zeros(0, model.output_dim))
            for model in (pair.a, pair.b)]


def update_folder_index(pair, folder: Path, stem: Path, *, batch_size: int = 64, num_workers: int = 0,
                        progress: bool | None = None, accelerator=None,
                        shard_size: int | None = None) -> tuple[FolderIndex, IndexUpdate]:
    """Bring the index at `stem` up to date with `folder` and save it when anything changed.

    Files whose (relative path, size, mtime_ns) match the index keep their rows; new and changed files are
    checked (data.images.image_problems, a progress bar) and the readable ones encoded with both models;
    removed files are dropped. Rows follow the sorted relative paths.
    The encode streams into fp32 shards under `<stem>.pending/` (gallery_shards.encode_to_shards: a progress
    bar in images/s; an interrupted encode resumes from its finished shards when the same files are still
    to encode; with an `accelerator` of several processes the shards are split between them and the main
    process alone saves). The pending folder is removed once the index is saved.
    """
    from .gallery_shards import DEFAULT_SHARD_SIZE, encode_to_shards
    from trpr.data.images import image_problems

    folder = Path(folder)
    scanned = scan_gallery(folder)
    old = load_folder_index(stem, folder)
    update = IndexUpdate(found=old is not None)
    known_rows = {key: row for row, key in enumerate(old.files)} if old else {}
    known_bad = {tuple(u[:3]): u[3] for u in old.unreadable} if old else {}
    old_paths = {key[0] for key in (list(known_rows) + list(known_bad))}
    scanned_paths = {key[0] for key in scanned}
    update.removed = len(old_paths - scanned_paths)
    to_check = [key for key in scanned if key not in known_rows and key not in known_bad]
    update.reused = sum(key in known_rows for key in scanned)
    update.changed = sum(key[0] in old_paths for key in to_check)
    update.added = len(to_check) - update.changed
    reasons = image_problems([str(folder / key[0]) for key in to_check], progress=progress,
                             desc="checking new images") if to_check else []
    bad = {key: reason for key, reason in zip(to_check, reasons) if reason is not None}
    bad.update({key: reason for key, reason in known_bad.items() if key in set(scanned)})
    fresh = [key for key in to_check if key not in bad]
    update.encoded = len(fresh)
    fresh_features = None
    pending = stem.with_name(stem.name + ".pending")
    if fresh:
        store = encode_to_shards(pair, [folder / key[0] for key in fresh], pending, dtype="float32",
                                 shard_size=shard_size or DEFAULT_SHARD_SIZE, batch_size=batch_size,
                                 num_workers=num_workers, accelerator=accelerator, progress=progress)
        fresh_features = store.features()
    fresh_rows = {key: row for row, key in enumerate(fresh)}
    files = [key for key in scanned if key in known_rows or key in fresh_rows]
    # row r of the new index comes from the old index (rows kept_at <- kept_from) or from the fresh encode
    kept_at = torch.tensor([r for r, key in enumerate(files) if key in known_rows], dtype=torch.int64)
    kept_from = torch.tensor([known_rows[key] for key in files if key in known_rows], dtype=torch.int64)
    fresh_at = torch.tensor([r for r, key in enumerate(files) if key in fresh_rows], dtype=torch.int64)
    fresh_from = torch.tensor([fresh_rows[key] for key in files if key in fresh_rows], dtype=torch.int64)
    templates = old.features if old else (fresh_features or _empty_features(pair))
    features = []
    for model in range(2):
        parts = []
        for kind in range(2):
            merged = torch.empty(len(files), templates[model][kind].shape[1], dtype=torch.float32)
            if len(kept_at):
                merged[kept_at] = old.features[model][kind][kept_from].float()
            if len(fresh_at):
                merged[fresh_at] = fresh_features[model][kind][fresh_from].float()
            parts.append(merged)
        features.append(tuple(parts))
    index = FolderIndex(folder=folder, files=files, features=features,
                        unreadable=sorted(key + (reason,) for key, reason in bad.items()))
    main_process = accelerator is None or accelerator.is_main_process
    if main_process and (not update.found or to_check or update.removed):
        save_folder_index(index, stem)
    elif old is not None:
        index.stem, index.index_id = old.stem, old.index_id
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if main_process and pending.is_dir():
        shutil.rmtree(pending, ignore_errors=True)
    return index, update


def warn_unreadable(index: FolderIndex, stream=None) -> None:
    """One warning naming the skipped files (first MAX_WARNED) and why."""
    if not index.unreadable:
        return
    stream = stream or sys.stderr
    listed = [f"  - {path}: {reason}" for path, _, _, reason in index.unreadable[:MAX_WARNED]]
    more = len(index.unreadable) - MAX_WARNED
    print(f"warning: gallery {index.folder}: {len(index.unreadable)} unreadable image file(s) skipped:\n"
          + "\n".join(listed) + (f"\n  ... and {more} more" if more > 0 else ""), file=stream)


def check_gallery_folder(folder) -> Path:
    """`folder` as an absolute Path; EvalInputError when it is not an existing folder."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise EvalInputError(f"--gallery {folder}: {'not a folder' if path.exists() else 'no such folder'}")
    return path.absolute()
