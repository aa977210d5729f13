"""Write to a temporary beside the target, then rename: a reader (or a crash) sees the old complete file or
folder or the new complete one, never a half-written one. The one home of this pattern.

    with atomic_path(path) as tmp:          # any writer that takes a path: np.save, save_file, savefig, ...
        write(tmp)                          # renamed over `path` when the block ends; removed if it raises
    atomic_write_text(path, text); atomic_write_bytes(path, blob); atomic_write_json(path, value)
    replace_folder(tmp_dir, out_dir)        # a complete folder swapped in for another
    fsync_path(path); fsync_tree(folder)    # flush to disk (checkpoints)

Temporary names are unique (`.<name>.<pid>-<8 hex>.tmp`), so concurrent writers of the same target never
share one: the last rename wins. Several files that belong together are written by nesting `atomic_path`
blocks: the inner block's file is renamed first (name the file whose presence means "complete" outermost).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def temporary_path(path: str | Path) -> Path:
    """A unique temporary name beside `path`: `.<name>.<pid>-<8 hex>.tmp` in the same folder (so the rename
    stays on one file system)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path` (nothing created); when the block ends normally the file
    written there replaces `path` (os.replace, atomic on POSIX), when it raises the temporary is removed and
    `path` is left as it was. fsync: flush the file before the rename and the folder after it."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, blob: bytes, *, fsync: bool = False) -> None:
    """`path` replaced by `blob` atomically (atomic_path)."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(blob)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8", fsync: bool = False) -> None:
    """`path` replaced by `text` atomically (atomic_path)."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding=encoding)


def atomic_write_json(path: str | Path, value, *, fsync: bool = False, **dumps) -> None:
    """`path` replaced by json.dumps(value, **dumps) atomically (atomic_path)."""
    atomic_write_text(path, json.dumps(value, **dumps), fsync=fsync)


def temporary_folder(out_dir: Path, marker: str, what: str) -> Path:
    """A new empty folder beside `out_dir` to build it in (then swapped in by `replace_folder`). Refuses an
    existing non-empty `out_dir` that lacks the file `marker` (not a `what` folder: never replaced)."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / marker).is_file():
        raise FileExistsError(f"{out_dir} exists and is not a {what} folder (no {marker}); "
                              "refusing to replace it — choose an empty or new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    return tmp_dir


def replace_folder(tmp_dir: Path, out_dir: Path, *, keep_complete: str | None = None) -> None:
    """Swap the complete folder `tmp_dir` in as `out_dir` (same parent folder): an existing `out_dir` is
    renamed away first and deleted after, so a reader finds the old or the new folder, never a mix.
    keep_complete: a marker file name; an `out_dir` already holding it (another process finished first)
    is kept instead and `tmp_dir` removed."""
    if keep_complete is not None:
        try:
            os.replace(tmp_dir, out_dir)  # fails when out_dir exists and is not empty
            return
        except OSError:
            if not (out_dir / keep_complete).exists():
                raise
            shutil.rmtree(tmp_dir, ignore_errors=True)
            return
    if out_dir.exists():
        stale = out_dir.parent / f".{out_dir.name}.stale-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp_dir, out_dir)


def fsync_path(path: str | Path) -> None:
    """Flush one file or folder to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file and folder under `folder` (and itself) to disk."""
    for path in sorted(Path(folder).rglob("*")) + [Path(folder)]:
        fsync_path(path)
