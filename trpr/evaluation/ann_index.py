"""Approximate search for large galleries: a FAISS inverted-file index over a compact vector picks
candidates, which are then re-scored exactly with the ranking row's full features read from memory-mapped
shards (gallery_shards.ShardStore).

Compact vector (COMPACT_PIECES): the A+B/GE+FS scoring row, its four pieces L2-normalised side by side
(2(E + D) floats: 384 for the demo model, 5,120 for ViT-B/16), stored by the IVF as SQ8 codes (one byte
a dim: 384 B per image for the demo model), as SQ4 codes when wider than SQ8_MAX_DIMS (ViT-B/16: 2,560 B
per image, 2.5 GB per million). The ranking row asked for is then scored exactly from the fp16 shards for the
candidates only. Tried and dropped at 10^6 (docs/benchmarks.md): the A+B/GE vector alone (recall@10
0.90 even with every list probed), the full row PCA-reduced to 128 dims (0.69) or 192 dims (0.51), PQ32
codes (0.78); SQ4 codes gave the same recall as SQ8 (0.986).

Files beside the gallery's features, in `<ann_dir>`:
    manifest.json + shard-*.npy   the gallery features as fp16 shards (gallery_shards), job = fingerprint
                                   (dataset galleries; a folder gallery's index is already such shards, in
                                   `<stem>.shards/<index_id>/`, and its `<stem>.ann/` holds only the two below)
    ann.faiss                      faiss.write_index of an IndexIVFFlat (inner product); not a pickle
    ann.json                       {"version", "fingerprint", "count", "params": {...}, "faiss", "build_seconds"}
The index is rebuilt when the fingerprint (the gallery features' id) or the row count no longer match.
Benchmark evaluation never uses this module: it stays exact.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trpr.runtime.atomic import atomic_path, atomic_write_json

from .gallery_shards import ShardError, ShardStore, write_features_to_shards

ANN_VERSION = 1
ANN_THRESHOLD = 50_000  # --index auto: approximate search above this many gallery images
INDEX_MODES = ("auto", "exact", "ann")
COMPACT_PIECES = ("a.global", "a.fused", "b.global", "b.fused")  # the A+B/GE+FS row (the default search row)
SQ8_MAX_DIMS = 1024  # a wider compact vector is stored as SQ4 codes, half a byte a dim (ViT-B/16: 2,560 B per image)
PIECE_NAMES = {(0, "GE"): "a.global", (0, "FS"): "a.fused", (1, "GE"): "b.global", (1, "FS"): "b.fused"}


def row_pieces(row: str) -> list:
    """The shard pieces whose normalised concatenation scores `row` ("A+B/GE+FS" -> a.global, a.fused,
    b.global, b.fused), in modeling.scoring_features order."""
    from trpr.modeling.pair import parse_row_key

    model_indices, score = parse_row_key(row)
    return [PIECE_NAMES[(m, s)] for m in model_indices for s in score.split("+")]


def row_matrix(raw: np.ndarray, columns: dict, pieces) -> np.ndarray:
    """float32 [k, K]: each piece of `raw` [k, dim] (columns: name -> (start, stop)) L2-normalised, side by
    side, so that a query's and a gallery item's dot product is the sum of the pieces' cosines."""
    parts = []
    for name in pieces:
        start, stop = columns[name]
        part = np.asarray(raw[:, start:stop], dtype=np.float32)
        parts.append(part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12))
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


@dataclass
class AnnParams:
    """nlist: inverted lists (k-means cells); nprobe: lists scanned per query; candidates: items re-scored
    exactly per query (at least top); train_size: rows k-means is trained on; seed: of that sample."""
    nlist: int
    nprobe: int
    candidates: int = 512
    train_size: int = 65536
    seed: int = 0
    pca: int = 0  # > 0: reduce the compact vector to this many dims by a PCA trained with the index
    codec: str = "SQ8"  # how the IVF stores vectors: "Flat" (float32), "SQ8" (1 byte a dim), "PQ<m>" (m bytes)
    compact: list = field(default_factory=lambda: list(COMPACT_PIECES))


def default_params(count: int, width: int = 0) -> AnnParams:
    """nlist ~ 2 sqrt(N) (at least 39 training points per list); nprobe = nlist / 32, raised so that about
    16,384 items are scanned (all lists of a small gallery), at least 16; 512 candidates re-scored; SQ8 codes, SQ4 when the compact vector is `width` > SQ8_MAX_DIMS (chosen from the
    measurements in docs/benchmarks.md: recall@10 of the exact A+B/GE+FS ranking)."""
    nlist = max(1, min(int(2 * math.sqrt(max(count, 1))), max(count, 1) // 39))
    per_list = max(count, 1) / nlist
    return AnnParams(nlist=nlist, nprobe=min(nlist, max(16, nlist // 32, math.ceil(16384 / per_list))),
                     codec="SQ4" if width > SQ8_MAX_DIMS else "SQ8")


def _progress(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not show, leave=False)


def build_ann_index(store: ShardStore, ann_dir: Path, params: AnnParams | None = None, *,
                    progress: bool = True):
    """Train and fill an IVF index over the compact vectors of `store`, save ann.faiss + ann.json in
    `ann_dir` (atomic renames). Returns (faiss index, meta dict)."""
    import faiss

    if store.count == 0:
        raise ShardError(f"{store.dir}: an empty gallery has no approximate index")
    params = params or default_params(store.count, sum(b - a for a, b in (store.columns[p] for p in COMPACT_PIECES)))
    started = time.perf_counter()
    rng = np.random.default_rng(params.seed)
    sample = np.sort(rng.choice(store.count, size=min(store.count, params.train_size), replace=False))
    train = row_matrix(store.rows(sample), store.columns, params.compact)
    reduce = f"PCA{params.pca}," if params.pca and params.pca < train.shape[1] else ""
    factory = f"{reduce}IVF{params.nlist},{params.codec}"
    index = faiss.index_factory(train.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.seed = params.seed
    index.train(train)
    with _progress(store.count, "building the approximate index", progress) as bar:
        for _, chunk in store.chunks():
            index.add(row_matrix(chunk, store.columns, params.compact))
            bar.update(len(chunk))
    faiss.extract_index_ivf(index).nprobe = params.nprobe
    ann_dir = Path(ann_dir)
    ann_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(ann_dir / "ann.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    meta = {"version": ANN_VERSION, "fingerprint": store.job, "count": store.count, "params": asdict(params),
            "factory": factory, "metric": "inner product", "faiss": faiss.__version__, "build_seconds": round(time.perf_counter() - started, 3)}
    atomic_write_json(ann_dir / "ann.json", meta)
    return index, meta


def load_ann_index(store: ShardStore, ann_dir: Path):
    """(faiss index, meta) saved in `ann_dir` for exactly these features, else None (absent, another
    fingerprint or row count, another version, unreadable): the caller rebuilds."""
    import faiss

    ann_dir = Path(ann_dir)
    try:
        meta = json.loads((ann_dir / "ann.json").read_text())
    except (OSError, ValueError):
        return None
    if (meta.get("version") != ANN_VERSION or meta.get("fingerprint") != store.job
            or meta.get("count") != store.count or not (ann_dir / "ann.faiss").is_file()):
        return None
    try:
        index = faiss.read_index(str(ann_dir / "ann.faiss"))
    except RuntimeError:
        return None
    if index.ntotal != store.count:
        return None
    faiss.extract_index_ivf(index).nprobe = int(meta["params"]["nprobe"])
    return index, meta


class AnnSearcher:
    """Candidates from the FAISS index, exact re-scoring from the shards.

    store: the gallery's ShardStore; index: its IVF index; params: AnnParams (nprobe / candidates used
    per query); rebuilt: whether opening built the index (else it was read from disk).
    """

    def __init__(self, store: ShardStore, index, params: AnnParams, rebuilt: bool = False):
        self.store, self.index, self.params, self.rebuilt = store, index, params, rebuilt

    @classmethod
    def open(cls, store: ShardStore, ann_dir: Path, params: AnnParams | None = None, *,
             progress: bool = True) -> "AnnSearcher":
        """Read the index saved beside `store`, or build (and save) it when missing or stale."""
        loaded = load_ann_index(store, ann_dir)
        if loaded is not None:
            index, meta = loaded
            saved = AnnParams(**meta["params"])
            if params is None or (params.nlist, params.compact) == (saved.nlist, saved.compact):
                if params is not None:
                    ivf_of(index).nprobe = params.nprobe
                return cls(store, index, params or saved, rebuilt=False)
        index, meta = build_ann_index(store, ann_dir, params, progress=progress)
        return cls(store, index, AnnParams(**meta["params"]), rebuilt=True)

    def search(self, query_raw: np.ndarray, row: str, top: int, *, nprobe: int | None = None,
               candidates: int | None = None) -> tuple:
        """query_raw: float32 [dim] (the query's four pieces in the shards' column layout). Returns
        (gallery rows int64 [k], exact scores float32 [k]) of the best `top` candidates, best first;
        equal scores keep gallery order."""
        query_raw = np.asarray(query_raw, dtype=np.float32).reshape(1, -1)
        ivf = ivf_of(self.index)
        ivf.nprobe = min(int(nprobe or self.params.nprobe), ivf.nlist)
        wanted = max(int(candidates or self.params.candidates), top)
        _, found = self.index.search(row_matrix(query_raw, self.store.columns, self.params.compact),
                                     min(wanted, self.store.count))
        found = np.sort(found[0][found[0] >= 0])
        return rescore(self.store, query_raw[0], row, found, top)


def ivf_of(index):
    """The IVF part of a (possibly PCA-wrapped) FAISS index: nlist, nprobe live there."""
    import faiss

    return faiss.extract_index_ivf(index)


def rescore(store: ShardStore, query_raw: np.ndarray, row: str, rows: np.ndarray, top: int) -> tuple:
    """Exact `row` scores of the gallery `rows` (sorted ascending) from the shards; the best `top`."""
    pieces = row_pieces(row)
    query = row_matrix(np.asarray(query_raw, dtype=np.float32).reshape(1, -1), store.columns, pieces)[0]
    scores = row_matrix(store.rows(rows), store.columns, pieces) @ query
    order = np.argsort(-scores, kind="stable")[:top]
    return rows[order].astype(np.int64), scores[order].astype(np.float32)


def exact_search(store: ShardStore, query_raw: np.ndarray, row: str, top: int, chunk_rows: int = 65536) -> tuple:
    """The exact ranking over the whole gallery, streamed shard by shard from the memory maps (memory: one
    chunk). Returns (gallery rows int64 [k], scores float32 [k]), best first, ties in gallery order."""
    pieces = row_pieces(row)
    query = row_matrix(np.asarray(query_raw, dtype=np.float32).reshape(1, -1), store.columns, pieces)[0]
    best_rows, best_scores = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    for first, chunk in store.chunks(chunk_rows):
        scores = row_matrix(chunk, store.columns, pieces) @ query
        keep = np.argpartition(-scores, min(top, len(scores) - 1))[:top] if len(scores) > top else np.arange(len(scores))
        best_rows = np.concatenate([best_rows, first + keep])
        best_scores = np.concatenate([best_scores, scores[keep]])
        order = np.lexsort((best_rows, -best_scores))[:top]
        best_rows, best_scores = best_rows[order], best_scores[order]
    return best_rows, best_scores


_OPEN: dict = {}  # (ann_dir, fingerprint) -> AnnSearcher: one load per process (the web app answers many queries)


def _wanted(mode: str, count: int, threshold: int | None) -> bool:
    """Whether `mode` ranks a gallery of `count` items approximately (auto: above `threshold`, by default
    the module's ANN_THRESHOLD, read at call time)."""
    if mode not in INDEX_MODES:
        raise ValueError(f"--index must be one of {', '.join(INDEX_MODES)}, got {mode!r}")
    limit = ANN_THRESHOLD if threshold is None else threshold
    return count > 0 and (mode == "ann" or (mode == "auto" and count > limit))


def searcher_for(features: list, ann_dir: Path, fingerprint: str, count: int, mode: str = "auto", *,
                 threshold: int | None = None, progress: bool = True) -> AnnSearcher | None:
    """The AnnSearcher to rank a gallery with, or None for exact search.

    features: per model (global [N, E], fused [N, D]) of the gallery (written as fp16 shards under
    `ann_dir` when the shards there are not those of `fingerprint`); mode: "exact" -> None, "ann" -> a
    searcher, "auto" -> a searcher when count > threshold (default ANN_THRESHOLD).
    """
    if not _wanted(mode, count, threshold):
        return None
    key = (str(Path(ann_dir).resolve()), fingerprint)
    if key in _OPEN:
        return _OPEN[key]
    try:
        store = ShardStore(ann_dir)
        if store.job != fingerprint or store.count != count:
            store = None
    except ShardError:
        store = None
    if store is None:
        store = write_features_to_shards(features, ann_dir, job=fingerprint)
    _OPEN.clear()
    _OPEN[key] = AnnSearcher.open(store, ann_dir, progress=progress)
    return _OPEN[key]


def searcher_for_folder(folder_index, mode: str = "auto", *, threshold: int | None = None,
                        progress: bool = True) -> AnnSearcher | None:
    """The AnnSearcher of a folder gallery's index (folder_gallery.FolderIndex), or None for exact search
    (same modes as `searcher_for`). Its candidates come from `<stem>.ann/` (ann.faiss + ann.json, keyed by
    the saved index's index_id, so any change to the gallery rebuilds it) and are re-scored from the
    index's own fp16 shards: nothing is copied."""
    if not _wanted(mode, len(folder_index.files), threshold):
        return None
    if folder_index.stem is None or not folder_index.index_id:
        raise ShardError(f"gallery {folder_index.folder}: its index is not saved yet, so it has no approximate index")
    ann_dir = folder_index.stem.with_name(folder_index.stem.name + ".ann")
    key = (str(ann_dir.resolve()), folder_index.index_id)
    if key not in _OPEN:
        for copy in list(ann_dir.glob("shard-*.npy")) + [ann_dir / "manifest.json"]:
            copy.unlink(missing_ok=True)  # the fp16 copy a version-1 folder index kept here
        _OPEN.clear()
        _OPEN[key] = AnnSearcher.open(folder_index.store, ann_dir, progress=progress)
    return _OPEN[key]
