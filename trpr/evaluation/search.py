"""Free-text person search in an evaluation gallery or a folder of images (`folder_gallery`): a gallery
index cached on disk, ranking one query, and a PNG grid of the matches."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trpr import data
from trpr import kernels
from trpr import modeling
from trpr.metrics.published import canonical_dataset
from trpr.modeling.pair import ROW_KEYS, parse_row_key, selection_rows
from trpr.runtime.atomic import atomic_path
from trpr.runtime.cache import search_features_dir
from trpr.runtime.encoding import encode, eval_mode, model_device

from .checkpoints import Checkpoint, EvalInputError

DEFAULT_SEARCH_ROW = "A+B/GE+FS"
# a shard-backed gallery (folder_gallery) of at most this many rows is read into memory once for exact search
# (50,000 x 5,120 fp32 = 1 GB at ViT-B/16 dims); a larger one is streamed from the memory maps per query
EXACT_IN_MEMORY_MAX = 50_000


@dataclass
class GalleryIndex:
    """Gallery features of one checkpoint on one split, as cached on disk for search.

    image_outputs: per model (A, B) (global [Ng, E], fused [Ng, D]) fp32 CPU, or None when the features
    live in `store` (a gallery_shards.ShardStore of memory-mapped fp16 shards: folder galleries), read
    from there by `outputs()` (once, up to EXACT_IN_MEMORY_MAX rows) or streamed by `search_gallery`;
    pids / image_ids: LongTensor[Ng] (pids -1 in a folder gallery: no identities); sources: per gallery
    item its image file path ("" when the dataset embeds the image bytes instead), relative to `root`
    when root is set (folder galleries). finite_models: the models (0 = A, 1 = B) whose gallery features
    `search_gallery` has already found finite (checked once per index, not on every query).
    """

    image_outputs: list | None
    pids: torch.Tensor
    image_ids: torch.Tensor
    sources: list
    root: Path | None = None
    finite_models: set = field(default_factory=set, repr=False, compare=False)
    store: object = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.pids.numel())

    def streamed(self) -> bool:
        """Whether exact search streams the shards instead of holding the features in memory (a shard-backed
        gallery of more than EXACT_IN_MEMORY_MAX rows)."""
        return self.image_outputs is None and self.store is not None and len(self) > EXACT_IN_MEMORY_MAX

    def outputs(self) -> list:
        """image_outputs, read from the shards (fp16 -> fp32) on first use when the gallery is shard-backed."""
        if self.image_outputs is None:
            if self.streamed():
                raise ValueError(f"{len(self)} gallery rows are more than EXACT_IN_MEMORY_MAX = {EXACT_IN_MEMORY_MAX}: "
                                 "stream them (ann_index.exact_search) instead of reading them whole")
            self.image_outputs = self.store.features()
        return self.image_outputs


def search_cache_dir() -> Path:
    """`runtime.cache.search_features_dir()`: $TRPR_CACHE (else ~/.cache/3rtpr)/search-features."""
    return search_features_dir()


def checkpoint_signature(checkpoint: Checkpoint) -> dict:
    """{"pair_dir", "files": [[relative path, size, mtime in ns], ...]} of the pair folder: re-saving a
    checkpoint changes the mtimes and so every cache key built on it; nothing is read from the weights."""
    files = sorted(p for p in checkpoint.pair_dir.rglob("*") if p.is_file())
    signature = [[str(p.relative_to(checkpoint.pair_dir)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return {"pair_dir": str(checkpoint.pair_dir.resolve()), "files": signature}


def _annotation_signature(dataset: str, root) -> list | None:
    """[path, size, mtime_ns] of the dataset's annotation file (editing it changes the cache key), else None
    (an unknown or missing dataset: the cache is then missed and loading the split says what is wrong)."""
    from trpr.data.benchmarks import resolve_layout

    try:
        layout, folder = resolve_layout(dataset, root)
        path = folder / layout.annotation
        stat = path.stat()
    except (OSError, ValueError):
        return None
    return [str(path), stat.st_size, stat.st_mtime_ns]


def search_cache_key(checkpoint: Checkpoint, dataset: str, root, split: str) -> str:
    """Hash of `checkpoint_signature` + dataset + root + split + the annotation file's path, size and
    mtime_ns (an edited annotation is encoded again). The images are checked when the cache is read
    (`load_gallery_index`: each file's size and mtime_ns as saved)."""
    signature = checkpoint_signature(checkpoint)
    annotation = _annotation_signature(dataset, root)
    extra = {} if annotation is None else {"annotation": annotation}
    blob = json.dumps({**extra, "pair_dir": signature["pair_dir"], "files": signature["files"],
                       "dataset": canonical_dataset(dataset), "root": None if root is None else str(Path(root).resolve()),
                       "split": split}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def build_gallery_index(pair, gallery_split, *, batch_size: int = 64, num_workers: int = 0) -> GalleryIndex:
    """Encode the gallery with both models (eval mode, no_grad) and keep its pids and image paths."""
    from trpr.data.torch_datasets import image_sources

    with eval_mode(pair):
        images = data.EvalImages(gallery_split, tuple(pair.a.image_size))
        outputs = encode([pair.a, pair.b], images, "image", batch_size=batch_size, num_workers=num_workers,
                         desc="gallery images")
    sources = [s if isinstance(s, str) else "" for s in image_sources(gallery_split)]
    return GalleryIndex(image_outputs=[(g.cpu(), f.cpu()) for g, f in outputs],
                        pids=torch.as_tensor(gallery_split["pid"], dtype=torch.int64),
                        image_ids=torch.as_tensor(gallery_split["image_id"], dtype=torch.int64), sources=sources)


def save_gallery_index(index: GalleryIndex, stem: Path) -> None:
    """`<stem>.safetensors` (features, pids, image ids) + `<stem>.json` (image paths)."""
    from safetensors.torch import save_file

    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"pids": index.pids, "image_ids": index.image_ids}
    for model_name, (global_emb, fused_emb) in zip("ab", index.image_outputs):
        tensors[f"{model_name}.global"] = global_emb.contiguous()
        tensors[f"{model_name}.fused"] = fused_emb.contiguous()
    # unique temporary names + atomic renames (runtime.atomic): concurrent searches with a cold cache each write
    # their own files and the last rename wins (both hold the same index). The .json is renamed first, the
    # features file last: its presence = complete
    with atomic_path(stem.with_suffix(".safetensors")) as features_tmp, \
            atomic_path(stem.with_suffix(".json")) as sources_tmp:
        save_file(tensors, str(features_tmp))
        sources_tmp.write_text(json.dumps({"sources": index.sources, "files": _file_stats(index.sources)}))


def _file_stats(sources: list) -> list:
    """[size, mtime_ns] of every image file in `sources` (None for embedded images and missing files)."""
    stats = []
    for source in sources:
        try:
            stat = os.stat(source) if source else None
        except OSError:
            stat = None
        stats.append(None if stat is None else [stat.st_size, stat.st_mtime_ns])
    return stats


def load_gallery_index(stem: Path) -> GalleryIndex | None:
    """The cached index at `stem`, or None when absent, unreadable or stale (an image file is missing or
    has another size or mtime than when the index was built, or the index predates these records): it is
    then rebuilt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    features_path, sources_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not (features_path.is_file() and sources_path.is_file()):
        return None
    try:
        tensors = load_file(str(features_path))
        listing = json.loads(sources_path.read_text())
        sources, files = listing["sources"], listing["files"]
        outputs = [(tensors[f"{m}.global"], tensors[f"{m}.fused"]) for m in "ab"]
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):  # damaged (or an older listing): rebuilt
        return None
    if len(sources) != tensors["pids"].numel() or files != _file_stats(sources):  # the gallery changed: rebuilt
        return None
    return GalleryIndex(image_outputs=outputs, pids=tensors["pids"], image_ids=tensors["image_ids"], sources=sources)


def parse_score_row(row: str) -> tuple[tuple[int, ...], str]:
    """modeling.pair.parse_row_key with the error as EvalInputError naming --score."""
    try:
        return parse_row_key(row)
    except ValueError as error:
        raise EvalInputError(f"--score {error}") from None


def choose_search_row(score: str | None, checkpoint: Checkpoint) -> tuple[str, str]:
    """(ranking row, why it was chosen): `score` when given, else the row the run was selected on (its
    config.yaml's eval.select_row), else DEFAULT_SEARCH_ROW. EvalInputError for a row that is not one."""
    if score is not None:
        parse_score_row(score)
        return score, "--score"
    selected = ((checkpoint.run_config or {}).get("eval") or {}).get("select_row")
    if selected is not None:
        try:
            rows = selection_rows(selected)
        except ValueError:
            raise EvalInputError(f"checkpoint {checkpoint.path}: config.yaml's eval.select_row {selected!r} is not a "
                                 f"row; pass --score (one of {', '.join(ROW_KEYS)})") from None
        if len(rows) > 1:  # a max(...) rule: one ranking needs one row
            return rows[0], (f"the first row of the run's selection rule eval.select_row {selected}; --score to "
                             "change")
        return selected, "the row the run was selected on, its eval.select_row; --score to change"
    return DEFAULT_SEARCH_ROW, "no run config to take eval.select_row from; --score to change"


@torch.no_grad()
def search_gallery(pair, index: GalleryIndex, query: str, *, tokenizer, row: str = "A+B/GE+FS",
                   top: int = 10, ann=None) -> list[dict]:
    """Rank the gallery for one free-text query.

    row: which models and score rank ("A/GE" ... "A+B/GE+FS"); the score is the sum of the chosen
    cosine similarities (so at most 1, 2 or 4). ann: an ann_index.AnnSearcher over this gallery (its
    candidates re-scored exactly from fp16 shards), or None for the exact dense ranking (in memory, or
    streamed shard by shard from a large shard-backed gallery: `GalleryIndex.streamed`). Returns up to
    `top` dicts {"rank" (1-based), "score", "pid", "image_id", "path" (readable from here), "file" (as
    listed: relative to a folder gallery's root, else the path), "gallery_index"}; equal scores keep
    gallery order.
    """
    from trpr.data.tokenizer import tokenize

    model_indices, score = parse_score_row(row)
    models = [pair.a, pair.b]
    device = model_device(pair)
    input_ids, attention_mask = tokenize(tokenizer, [query])
    streamed = ann is None and index.streamed()
    # the candidates come from all four pieces; a streamed ranking takes the query in the shards' layout
    encoded = range(2) if ann is not None or streamed else model_indices
    with eval_mode(pair):
        text_outputs = {i: models[i].encode_text(input_ids.to(device), attention_mask.to(device)) for i in encoded}
    text_outputs = {i: (g.float().cpu(), f.float().cpu()) for i, (g, f) in text_outputs.items()}
    # NaN similarities would still sort into a ranking: non-finite features are an error naming model and row.
    # The gallery is checked once per index on the exact path (its full features are in memory); the ANN path
    # and a streamed exact ranking check the scores they return instead (the gallery lives in shards there).
    sides = [("the query", {i: text_outputs[i] for i in model_indices})]
    unchecked = [i for i in model_indices if i not in index.finite_models] if ann is None and not streamed else []
    if unchecked:
        sides.append(("gallery image", {i: index.outputs()[i] for i in unchecked}))
    for side, outputs in sides:
        for model_index, (global_emb, fused_emb) in outputs.items():
            for kind, feats in (("global", global_emb), ("fused", fused_emb)):
                bad = kernels.first_non_finite_row(feats)
                if bad >= 0:
                    where = "the query" if side == "the query" else f"gallery image row {bad} of {feats.shape[0]}"
                    raise kernels.NonFiniteFeatures(
                        f"model {'AB'[model_index]} gives a non-finite {kind} embedding for {where} (ranking {row}): "
                        "its weights are not usable (a diverged run?)")
    index.finite_models.update(unchecked)
    if ann is not None or streamed:
        from .ann_index import exact_search

        query_raw = torch.cat([piece[0] for i in range(2) for piece in text_outputs[i]]).numpy()
        found, found_scores = (ann.search(query_raw, row, top) if ann is not None
                               else exact_search(index.store, query_raw, row, top))
        if not all(math.isfinite(value) for value in found_scores.tolist()):
            raise kernels.NonFiniteFeatures(f"the gallery's stored features give non-finite scores (ranking {row}): "
                                            "rebuild the gallery index from a usable checkpoint")
        order, scores = torch.from_numpy(found), dict(zip(found.tolist(), found_scores.tolist()))
    else:
        query_feats = modeling.scoring_features([text_outputs[i] for i in model_indices], score)
        gallery_feats = modeling.scoring_features([index.outputs()[i] for i in model_indices], score)
        scores = gallery_feats @ query_feats[0]
        order = torch.sort(scores, descending=True, stable=True).indices[:top]
    def path(i: int) -> str:
        return str(Path(index.root) / index.sources[i]) if index.root is not None else index.sources[i]

    return [{"rank": rank, "score": float(scores[i]), "pid": int(index.pids[i]), "image_id": int(index.image_ids[i]),
             "path": path(i), "file": index.sources[i], "gallery_index": int(i)}
            for rank, i in enumerate(order.tolist(), start=1)]


def query_slug(text: str, limit: int = 60) -> str:
    """A file-name-safe form of a query (lower case, runs of other characters -> "-")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "query"


def search_grid_path(out_dir: Path, query: str) -> Path:
    """Where the grid of `query` is saved: OUT/search_<slug>-<8 hex of sha256(query)>.png, so queries with
    the same slug (every non-Latin one is "query") never overwrite each other's grid."""
    digest = hashlib.sha256(query.encode("utf-8")).hexdigest()[:8]
    return Path(out_dir) / f"search_{query_slug(query)}-{digest}.png"


def save_search_grid(matches: list[dict], query: str, path: Path, *, gallery_split=None) -> Path:
    """A PNG with the matched images in rank order, each titled "#rank pid score" (folder galleries, pid
    -1: "#rank score file name"). Images are read from their paths; embedded images (no path) come from
    `gallery_split` when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from trpr.data.torch_datasets import image_sources, open_image

    embedded = None
    columns = min(len(matches), 10) or 1
    rows = math.ceil(len(matches) / columns) or 1
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 3.6 * rows + 0.6), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, match in zip(axes.flat, matches):
        source = match["path"]
        if not source:
            if gallery_split is None:
                continue
            embedded = embedded or image_sources(gallery_split)
            source = embedded[match["gallery_index"]]
        ax.imshow(open_image(source))
        if match["pid"] >= 0:
            ax.set_title(f"#{match['rank']} pid {match['pid']}\n{match['score']:.3f}", fontsize=8)
        else:
            name = Path(match.get("file") or source).name
            name = name if len(name) <= 18 else name[:8] + "…" + name[-9:]
            ax.set_title(f"#{match['rank']} {match['score']:.3f}\n{name}", fontsize=7)
    fig.suptitle(query if len(query) <= 90 else query[:87] + "...", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
