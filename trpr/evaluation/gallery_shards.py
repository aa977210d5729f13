"""Gallery features streamed to disk in shards: memory-mappable, resumable, shared across processes.

A shard folder holds
    manifest.json        {"version", "job", "count", "shard_size", "dtype", "columns": {"a.global": [start, stop],
                          "a.fused": [...], "b.global": [...], "b.fused": [...]}, "dim", "complete"}
    shard-00000.npy ...  raw .npy arrays [rows, dim] (rows = shard_size, the last one fewer), one row per
                          gallery item: the four pieces (un-normalised, as the encoders return them) side by side
                          in `columns` order. Read with np.load(mmap_mode="r", allow_pickle=False): never pickled.
A shard appears under its final name only once it is complete (temporary name, then an atomic rename), so
an interrupted encode keeps every finished shard and the next run with the same job (the same image list,
shard size, dtype and model dims: `job` is their hash) encodes only the missing ones. With an Accelerate
launch of several processes, shard i is encoded by process i % num_processes; the main process writes the
manifest once all are done, so 1 or N processes give the same files.

    python -m trpr.evaluation.gallery_shards --checkpoint RUN --gallery DIR [--cache-dir DIR]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m trpr.evaluation.gallery_shards ...
index a folder gallery ahead of search (the same on-disk index `eval_3rtpr.py search --gallery` uses).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trpr.runtime.atomic import atomic_path, atomic_write_json

from .checkpoints import EvalInputError

SHARD_VERSION = 1
DEFAULT_SHARD_SIZE = 4096  # rows per shard: 4096 x 5,120 fp16 = 40 MiB at ViT-B/16 dims (A+B/GE+FS)
PIECES = ("a.global", "a.fused", "b.global", "b.fused")
MANIFEST = "manifest.json"


class ShardError(EvalInputError):
    """A shard folder that cannot be used as it is; the message names the file and what is wrong (one
    line at the command line, like every EvalInputError)."""


def shard_path(shard_dir: Path, number: int) -> Path:
    return Path(shard_dir) / f"shard-{number:05d}.npy"


def piece_columns(embed_dims: list) -> dict:
    """{"a.global": [0, Ea], "a.fused": [Ea, Ea + Da], ...} for embed_dims [(Ea, Da), (Eb, Db)]."""
    columns, start = {}, 0
    for name, width in zip(PIECES, [w for pair in embed_dims for w in pair]):
        columns[name] = [start, start + int(width)]
        start += int(width)
    return columns


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    """np.save (allow_pickle=False) under a unique temporary name, then an atomic rename to `path`
    (runtime.atomic.atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


def _shard_ok(path: Path, rows: int, dim: int, dtype: str) -> bool:
    """Whether `path` is a finished shard of the expected shape and dtype (a header read, no data)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    return array.shape == (rows, dim) and array.dtype == np.dtype(dtype)


def _shard_bounds(count: int, shard_size: int) -> list:
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


def encode_to_shards(pair, paths: list, shard_dir: Path, *, shard_size: int = DEFAULT_SHARD_SIZE,
                     dtype: str = "float16", batch_size: int = 64, num_workers: int = 0, accelerator=None,
                     progress: bool | None = None, job_extra=None) -> "ShardStore":
    """Encode the images at `paths` (row i = paths[i]) with both models into shards under `shard_dir`.

    Finished shards of the same job are kept (resume); shards of another job are deleted first. The job
    hashes the paths, shard size, dtype, model dims and `job_extra` (JSON-able: e.g. each file's size and
    mtime, so a file rewritten between an interruption and the resume is encoded anew). Each
    shard is encoded, cast to `dtype` ("float16" or "float32") and written atomically; a progress bar
    counts images (images/s). With `accelerator` of several processes each encodes every
    num_processes-th shard and all wait for the manifest. Returns the complete ShardStore.
    """
    from tqdm.auto import tqdm

    from trpr.runtime.encoding import encode, eval_mode

    from .folder_gallery import FolderImages

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    shard_dir = Path(shard_dir)
    models = [pair.a, pair.b]
    columns = piece_columns([(m.embed_dim, m.output_dim) for m in models])
    dim = max(stop for _, stop in columns.values())
    paths = [str(p) for p in paths]
    job = hashlib.sha256(json.dumps({"paths": paths, "shard_size": shard_size, "dtype": dtype, "columns": columns,
                                     **({"extra": job_extra} if job_extra is not None else {})}).encode()).hexdigest()[:24]
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    manifest_path = shard_dir / MANIFEST
    if rank == 0:
        shard_dir.mkdir(parents=True, exist_ok=True)
        try:
            previous = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            previous = None
        if previous is None or previous.get("job") != job or previous.get("version") != SHARD_VERSION:
            for stale in list(shard_dir.glob("shard-*.npy")) + list(shard_dir.glob("*.tmp")):
                stale.unlink(missing_ok=True)
            atomic_write_json(manifest_path, {"version": SHARD_VERSION, "job": job, "count": len(paths),
                                              "shard_size": shard_size, "dtype": dtype, "columns": columns,
                                              "dim": dim, "complete": False})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    bounds = _shard_bounds(len(paths), shard_size)
    mine = [n for n in range(len(bounds)) if n % world == rank]
    todo = [n for n in mine if not _shard_ok(shard_path(shard_dir, n), bounds[n][1] - bounds[n][0], dim, dtype)]
    total = sum(bounds[n][1] - bounds[n][0] for n in todo)
    show = (rank == 0) if progress is None else (progress and rank == 0)
    image_size = tuple(pair.a.image_size)
    with tqdm(total=total, desc=f"encoding gallery shards ({len(todo)} of {len(bounds)} to do)", unit="img",
              disable=not show, smoothing=0.1) as bar, eval_mode(pair), torch.no_grad():
        for number in todo:
            start, stop = bounds[number]
            outputs = encode(models, FolderImages(paths[start:stop], image_size), "image",
                             batch_size=batch_size, num_workers=num_workers, desc=f"shard {number}")
            row = torch.cat([piece.float().cpu() for pair_out in outputs for piece in pair_out], dim=1)
            _write_shard(shard_path(shard_dir, number), row.numpy().astype(dtype))
            bar.update(stop - start)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if rank == 0:
        atomic_write_json(manifest_path, {"version": SHARD_VERSION, "job": job, "count": len(paths),
                                          "shard_size": shard_size, "dtype": dtype, "columns": columns,
                                          "dim": dim, "complete": True})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return ShardStore(shard_dir)


def _write_shard(path: Path, array: np.ndarray) -> None:
    """One finished shard (a seam for tests that simulate an interruption)."""
    write_npy_atomic(path, array)


def write_rows_to_shards(shard_dir: Path, count: int, columns: dict, rows, *, job: str,
                         shard_size: int = DEFAULT_SHARD_SIZE, dtype: str = "float16") -> "ShardStore":
    """Write a complete shard folder of `count` rows shard by shard (memory: one shard): rows(start, stop)
    returns the float rows [stop - start, dim] in `columns` layout. Every shard and then the manifest are
    written atomically; anything in `shard_dir` before is deleted first. Returns the ShardStore."""
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(shard_dir.glob("shard-*.npy")) + list(shard_dir.glob("*.tmp")) + [shard_dir / MANIFEST]:
        stale.unlink(missing_ok=True)
    dim = max((stop for _, stop in columns.values()), default=0)
    for number, (start, stop) in enumerate(_shard_bounds(count, shard_size)):
        block = np.asarray(rows(start, stop))
        if block.shape != (stop - start, dim):
            raise ValueError(f"rows({start}, {stop}) gave shape {block.shape}, expected ({stop - start}, {dim})")
        write_npy_atomic(shard_path(shard_dir, number), block.astype(dtype, copy=False))
    atomic_write_json(shard_dir / MANIFEST, {"version": SHARD_VERSION, "job": job, "count": int(count),
                                             "shard_size": shard_size, "dtype": dtype, "columns": columns,
                                             "dim": dim, "complete": True})
    return ShardStore(shard_dir)


def write_features_to_shards(features: list, shard_dir: Path, *, job: str, shard_size: int = DEFAULT_SHARD_SIZE,
                             dtype: str = "float16") -> "ShardStore":
    """Write features already in memory (per model (global [N, E], fused [N, D])) as a shard folder with
    the given `job` id (e.g. the folder index's index_id). Returns the ShardStore."""
    columns = piece_columns([(g.shape[1], f.shape[1]) for g, f in features])
    count = int(features[0][0].shape[0])

    def rows(start, stop):
        return torch.cat([piece[start:stop].float() for pair_out in features for piece in pair_out], dim=1).numpy()

    return write_rows_to_shards(shard_dir, count, columns, rows, job=job, shard_size=shard_size, dtype=dtype)


def relabel_shards(shard_dir: Path, job: str) -> "ShardStore":
    """Give a complete shard folder another job id (its manifest rewritten atomically; no row is touched):
    how a finished encode becomes a saved index generation without copying its rows."""
    manifest_path = Path(shard_dir) / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if not manifest.get("complete"):
        raise ShardError(f"{manifest_path}: the encode that writes this folder has not finished")
    atomic_write_json(manifest_path, {**manifest, "job": job})
    return ShardStore(shard_dir)


class ShardStore:
    """A complete shard folder, memory-mapped (no row is read until asked for).

    count: rows N; dim: floats per row; columns: piece name -> [start, stop); job: the manifest's job id.
    """

    def __init__(self, shard_dir: Path):
        self.dir = Path(shard_dir)
        manifest_path = self.dir / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except OSError as error:
            raise ShardError(f"{manifest_path}: cannot be read ({error.strerror or error})") from None
        except ValueError as error:
            raise ShardError(f"{manifest_path}: not valid JSON ({error})") from None
        if manifest.get("version") != SHARD_VERSION:
            raise ShardError(f"{manifest_path}: version {manifest.get('version')!r}, expected {SHARD_VERSION}")
        if not manifest.get("complete"):
            raise ShardError(f"{manifest_path}: the encode that writes this folder has not finished (rerun it to resume)")
        self.job, self.count, self.dim = manifest["job"], int(manifest["count"]), int(manifest["dim"])
        self.columns = {name: tuple(span) for name, span in manifest["columns"].items()}
        self.shard_size, self.dtype = int(manifest["shard_size"]), np.dtype(manifest["dtype"])
        self.shards = []
        for number, (start, stop) in enumerate(_shard_bounds(self.count, self.shard_size)):
            path = shard_path(self.dir, number)
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise ShardError(f"{path}: missing or not a .npy array ({error})") from None
            if array.shape != (stop - start, self.dim) or array.dtype != self.dtype:
                raise ShardError(f"{path}: shape {array.shape} {array.dtype}, expected ({stop - start}, {self.dim}) "
                                 f"{self.dtype} (manifest {manifest_path})")
            self.shards.append(array)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.shards)

    def rows(self, indices) -> np.ndarray:
        """float32 [k, dim]: the rows at `indices` (any order, repeats allowed), read from the memory maps."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        which, offset = np.divmod(indices, self.shard_size)
        for number in np.unique(which):
            mask = which == number
            out[mask] = self.shards[number][offset[mask]]
        return out

    def chunks(self, chunk_rows: int = 65536):
        """Yields (first row, float32 [rows, dim]) over the whole gallery, shard by shard."""
        for number, array in enumerate(self.shards):
            base = number * self.shard_size
            for start in range(0, array.shape[0], chunk_rows):
                yield base + start, np.asarray(array[start:start + chunk_rows], dtype=np.float32)

    def features(self) -> list:
        """Per model (global [N, E], fused [N, D]) as fp32 tensors (reads everything: small galleries only)."""
        whole = np.concatenate([np.asarray(a, dtype=np.float32) for a in self.shards]) if self.shards else \
            np.zeros((0, self.dim), dtype=np.float32)
        out = [torch.from_numpy(whole[:, slice(*self.columns[name])].copy()) for name in PIECES]
        return [(out[0], out[1]), (out[2], out[3])]


def main(argv: list[str] | None = None) -> int:
    """Index a folder gallery ahead of search (streamed shards, resumable, sharded across processes)."""
    import argparse

    from accelerate import Accelerator

    from .checkpoints import load_pair, resolve_checkpoint, unreadable_images_as_input_errors
    from .folder_gallery import check_gallery_folder, folder_cache_stem, update_folder_index

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--gallery", required=True, type=Path)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    print(f"process {accelerator.process_index + 1} of {accelerator.num_processes} on {accelerator.device}",
          file=sys.stderr, flush=True)
    folder = check_gallery_folder(args.gallery)
    checkpoint = resolve_checkpoint(args.checkpoint)
    pair = load_pair(checkpoint).to(accelerator.device)
    stem = folder_cache_stem(checkpoint, folder, args.cache_dir)
    started = time.perf_counter()
    with unreadable_images_as_input_errors():
        index, update = update_folder_index(pair, folder, stem, batch_size=args.batch_size, accelerator=accelerator,
                                            shard_size=args.shard_size)
    if accelerator.is_main_process:
        print(f"{len(index.files)} images in {folder} ({update.describe()}), index at {stem}.json, "
              f"{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
