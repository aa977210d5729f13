"""Search galleries made of any folder of images (no identities, no annotation): found recursively,
encoded once, and kept on disk beside the benchmark galleries' features.

The index of (gallery folder, checkpoint) lives beside `stem = search_cache_dir() / folder-<key>`:
    <stem>.json                {"version", "gallery", "index_id", "files": [[relative path, size, mtime_ns], ...]
                                (row order), "unreadable": [[relative path, size, mtime_ns, reason], ...]}
    <stem>.shards/<index_id>/  the features as fp16 shards (gallery_shards: manifest.json with job = index_id,
                                shard-*.npy [rows, 2(E + D)]: a.global, a.fused, b.global, b.fused side by side,
                                row i = file i), memory-mapped when read: nothing is loaded whole
    <stem>.pending/            an encode in progress (resumable: its finished shards are kept)
    <stem>.ann/                the approximate index (ann_index), keyed by index_id
Every search scans the folder first: a file is reused only when its relative path, size and mtime_ns
all match the index; new or changed files are encoded, removed ones dropped, so the index is never stale.
An update writes a new generation (`<stem>.shards/<new index_id>/`, streamed shard by shard from the old
generation's rows and the fresh encode), then the .json (atomic rename), then drops the old generation.
Unreadable files are remembered (with the same key) so they are not decoded again, and are listed in one
warning at every search. Nothing is pickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from trpr.runtime.atomic import atomic_write_json

from .checkpoints import Checkpoint, EvalInputError
from .gallery_shards import (DEFAULT_SHARD_SIZE, PIECES, ShardError, ShardStore, encode_to_shards, piece_columns,
                             relabel_shards, write_rows_to_shards)
from .search import GalleryIndex, checkpoint_signature, search_cache_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FOLDER_INDEX_VERSION = 2  # bump when the files' layout changes: older indexes are then rebuilt
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
    """A folder gallery's index. files: FileKey per row; store: its features as memory-mapped fp16 shards
    (gallery_shards.ShardStore, job = index_id); unreadable: (relative path, size, mtime_ns, reason) of
    skipped files."""
    folder: Path
    files: list
    store: ShardStore
    unreadable: list = field(default_factory=list)
    stem: Path | None = None  # where it is saved (`<stem>.json`, `<stem>.shards/<index_id>/`)
    index_id: str = ""  # the random id of the saved write: changes whenever the saved index changes

    @property
    def features(self) -> list:
        """Per model (global [N, E], fused [N, D]) fp32, read whole from the shards (small galleries, tests)."""
        return self.store.features()

    def gallery_index(self) -> GalleryIndex:
        """As a search.GalleryIndex backed by the shards (pids -1: no identities; sources: relative paths under
        `root`); search_gallery reads the features from the memory maps, never all at once above
        search.EXACT_IN_MEMORY_MAX rows."""
        count = len(self.files)
        return GalleryIndex(image_outputs=None, store=self.store, pids=torch.full((count,), -1, dtype=torch.int64),
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


def shards_root(stem: Path) -> Path:
    """`<stem>.shards`: one sub-folder per saved generation, named by its index_id."""
    return Path(stem).with_name(Path(stem).name + ".shards")


def generation_dir(stem: Path, index_id: str) -> Path:
    return shards_root(stem) / index_id


def new_index_id() -> str:
    return uuid.uuid4().hex


def save_folder_index(index: FolderIndex, stem: Path) -> None:
    """Write `<stem>.json` (temporary name, atomic rename) for `index`, whose store must already be the
    complete generation `<stem>.shards/<index.index_id>/` (job = index_id, see `commit_generation`)."""
    stem = Path(stem)
    if index.store.job != index.index_id or index.store.dir.resolve() != generation_dir(stem, index.index_id).resolve():
        raise ValueError(f"{index.store.dir} is not the generation {index.index_id} of {stem}")
    meta = {"version": FOLDER_INDEX_VERSION, "gallery": str(Path(index.folder).resolve()), "index_id": index.index_id,
            "files": [list(f) for f in index.files], "unreadable": [list(u) for u in index.unreadable]}
    atomic_write_json(stem.with_suffix(".json"), meta)
    index.stem = stem
    stem.with_suffix(".safetensors").unlink(missing_ok=True)  # a version-1 index's fp32 features


def commit_generation(stem: Path, index: FolderIndex, previous: str | None = None) -> None:
    """Save `index` (its store already the generation `<stem>.shards/<index_id>/`) and drop the generation
    it replaces (`previous`) and leftovers of interrupted writes older than an hour (a concurrent writer's
    fresh generation is left alone)."""
    save_folder_index(index, stem)
    root = shards_root(stem)
    for other in root.iterdir() if root.is_dir() else []:
        if other.name == index.index_id:
            continue
        try:
            stale = other.name == previous or time.time() - other.stat().st_mtime > 3600
        except OSError:
            continue
        if stale:
            shutil.rmtree(other, ignore_errors=True)


def load_folder_index(stem: Path, folder: Path) -> FolderIndex | None:
    """The index saved at `stem`, or None when absent, damaged, of another version or mismatched (the .json
    and the shards of different writes, row counts that differ): it is then rebuilt. Rows are not read
    (memory maps). A generation replaced by a concurrent update between reading the .json and opening its
    shards is retried with the new .json."""
    meta_path = Path(stem).with_suffix(".json")
    for _ in range(3):
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("version") != FOLDER_INDEX_VERSION:
                return None
            index_id = str(meta["index_id"])
            store = ShardStore(generation_dir(stem, index_id))
            files = [(str(p), int(s), int(t)) for p, s, t in meta["files"]]
            unreadable = [(str(p), int(s), int(t), str(r)) for p, s, t, r in meta["unreadable"]]
        except ShardError:
            try:
                if json.loads(meta_path.read_text()).get("index_id") != index_id:
                    continue  # replaced while we read it: read the new one
            except (OSError, ValueError, AttributeError):
                pass
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if store.job != index_id or store.count != len(files) or set(store.columns) != set(PIECES):
            return None
        return FolderIndex(folder=Path(folder), files=files, store=store, unreadable=unreadable, stem=Path(stem),
                           index_id=index_id)
    return None


def update_folder_index(pair, folder: Path, stem: Path, *, batch_size: int = 64, num_workers: int = 0,
                        progress: bool | None = None, accelerator=None,
                        shard_size: int | None = None) -> tuple[FolderIndex, IndexUpdate]:
    """Bring the index at `stem` up to date with `folder` and save it when anything changed.

    Files whose (relative path, size, mtime_ns) match the index keep their rows; new and changed files are
    checked (data.images.image_problems, a progress bar) and the readable ones encoded with both models;
    removed files are dropped. Rows follow the sorted relative paths.
    The encode streams into fp16 shards under `<stem>.pending/` (gallery_shards.encode_to_shards: a progress
    bar in images/s; an interrupted encode resumes from its finished shards when the same files, with the
    same sizes and mtimes, are still to encode; with an `accelerator` of several processes the shards are
    split between them and the main process alone saves). A first index adopts the finished encode as it
    is; an update streams the kept and fresh rows into a new generation, shard by shard (memory: one shard).
    """
    from trpr.data.images import image_problems

    folder, stem = Path(folder), Path(stem)
    shard_size = shard_size or DEFAULT_SHARD_SIZE
    scanned = scan_gallery(folder)
    columns = piece_columns([(m.embed_dim, m.output_dim) for m in (pair.a, pair.b)])
    old = load_folder_index(stem, folder)
    if old is not None and old.store.columns != {k: tuple(v) for k, v in columns.items()}:
        old = None  # another model layout (cannot happen under the same checkpoint key): rebuilt
    update = IndexUpdate(found=old is not None)
    known_rows = {key: row for row, key in enumerate(old.files)} if old else {}
    known_bad = {tuple(u[:3]): u[3] for u in old.unreadable} if old else {}
    old_paths = {key[0] for key in known_rows} | {key[0] for key in known_bad}
    scanned_set = set(scanned)
    update.removed = len(old_paths - {key[0] for key in scanned})
    to_check = [key for key in scanned if key not in known_rows and key not in known_bad]
    update.reused = sum(key in known_rows for key in scanned)
    update.changed = sum(key[0] in old_paths for key in to_check)
    update.added = len(to_check) - update.changed
    reasons = image_problems([str(folder / key[0]) for key in to_check], progress=progress,
                             desc="checking new images") if to_check else []
    bad = {key: reason for key, reason in zip(to_check, reasons) if reason is not None}
    bad.update({key: reason for key, reason in known_bad.items() if key in scanned_set})
    fresh = [key for key in to_check if key not in bad]
    update.encoded = len(fresh)
    unreadable = sorted(key + (reason,) for key, reason in bad.items())
    main_process = accelerator is None or accelerator.is_main_process
    if old is not None and not to_check and not update.removed:  # nothing changed: the saved index as it is
        old.unreadable = unreadable
        return old, update
    pending = stem.with_name(stem.name + ".pending")
    fresh_store = None
    if fresh:
        fresh_store = encode_to_shards(pair, [folder / key[0] for key in fresh], pending, dtype="float16",
                                       shard_size=shard_size, batch_size=batch_size, num_workers=num_workers,
                                       accelerator=accelerator, progress=progress,
                                       job_extra=[list(key[1:]) for key in fresh])
        if fresh_store.columns != {k: tuple(v) for k, v in columns.items()}:
            raise ValueError(f"{pending}: columns {fresh_store.columns} do not match the models' {columns}")
    if accelerator is not None:  # every process has opened the finished encode before the main one moves it
        accelerator.wait_for_everyone()
    fresh_rows = {key: row for row, key in enumerate(fresh)}
    files = [key for key in scanned if key in known_rows or key in fresh_rows]
    index_id = new_index_id()
    target = generation_dir(stem, index_id)
    store = None
    if main_process:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not any(key in known_rows for key in files):
            # every row is fresh, in file order: the finished encode becomes the generation (no copy)
            if fresh_store is not None:
                os.replace(pending, target)
                store = relabel_shards(target, index_id)
            else:
                store = write_rows_to_shards(target, 0, columns, None, job=index_id, shard_size=shard_size)
        else:
            store = _merge_rows(old, known_rows, fresh_store, fresh_rows, files, target, index_id, columns, shard_size)
        index = FolderIndex(folder=folder, files=files, store=store, unreadable=unreadable, index_id=index_id)
        commit_generation(stem, index, previous=old.index_id if old is not None else None)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if main_process:
        shutil.rmtree(pending, ignore_errors=True)
    else:
        index = load_folder_index(stem, folder)
    return index, update


def _merge_rows(old: FolderIndex, known_rows: dict, fresh_store, fresh_rows: dict, files: list, target: Path,
                index_id: str, columns: dict, shard_size: int) -> ShardStore:
    """The new generation at `target`: row r is the old index's row of files[r] when it was kept, else the
    fresh encode's; written shard by shard from the memory maps."""
    def rows(start, stop):
        block = np.empty((stop - start, old.store.dim), dtype=np.float32)
        keys = files[start:stop]
        kept = [(r, known_rows[key]) for r, key in enumerate(keys) if key in known_rows]
        new = [(r, fresh_rows[key]) for r, key in enumerate(keys) if key not in known_rows]
        if kept:
            at, source = zip(*kept)
            block[list(at)] = old.store.rows(list(source))
        if new:
            at, source = zip(*new)
            block[list(at)] = fresh_store.rows(list(source))
        return block

    return write_rows_to_shards(target, len(files), columns, rows, job=index_id, shard_size=shard_size)


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
