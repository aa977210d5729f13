"""Evaluate 3RTPR checkpoints: retrieval metrics, leaderboard, CMC curves and free-text search.

Evaluation (METHOD.md §5, §8, §9):
    python eval_3rtpr.py --checkpoint RUN_DIR [RUN_DIR ...] --dataset NAME [--root ROOT] [--split test]
                         --out DIR [--i2t] [--leaderboard] [--batch-size N]
    (also under `accelerate launch`: feature extraction is sharded over the processes)
Free-text search:
    python eval_3rtpr.py search "a man in a blue jacket" --checkpoint RUN_DIR --dataset NAME [--root ROOT]
                         [--split test] [--top 10] [--out DIR]      (QUERY "-": one query per stdin line)

For every checkpoint the rows are GE, FS and GE+FS for model A, model B and the ensemble A+B. Features
are L2-normalised pieces concatenated by `modeling.scoring_features`, so a dot product is the sum of
the chosen cosine similarities and `kernels.retrieval_metrics` never needs the similarity matrix.
Bad input (a checkpoint folder missing files, an unknown dataset, an empty split, ...) ends with a
one-line error on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

import kernels
import modeling
from data.transforms import CONTEXT_LENGTH, VOCAB_SIZE
from metrics.cmc import cmc_curve
from metrics.published import METRIC_NAMES, canonical_dataset
from metrics.report import (CMC_MAX_RANK, I2T_PREFIX, MODEL_ROWS, ROW_KEYS, SCORES, CheckpointResult,
                            config_fingerprint, make_names_unique, write_reports)
from modeling.model import CONFIG_NAME as MODEL_CONFIG_NAME
from modeling.model import WEIGHTS_NAME as MODEL_WEIGHTS_NAME
from modeling.pair import MEMBER_DIRS, PAIR_CONFIG_NAME

EXIT_BAD_INPUT = 2


class EvalInputError(Exception):
    """Bad user input (checkpoint, dataset, split): reported as one line on stderr, exit status 2."""


# ============================================================================ feature extraction
@dataclass
class PairFeatures:
    """Encoder outputs of both models of a pair over one evaluation split.

    image_outputs / text_outputs: per model (A, B) a tuple (global [N, E], fused [N, D]) of
    un-normalised fp32 features; N = gallery size (images) or number of queries (texts).
    gallery_pids [Ng] / query_pids [Nq]: int64 person ids. All tensors share one device
    (CPU, or the GPU the models ran on).
    """

    image_outputs: list
    text_outputs: list
    gallery_pids: torch.Tensor
    query_pids: torch.Tensor


def _model_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _shard_indices(num_items: int, accelerator) -> tuple[list[int], int]:
    """This process's contiguous share of range(num_items), padded by repeating the last index so that
    every process encodes the same count (a gather needs equal shapes). Returns (indices, per_process)."""
    processes = 1 if accelerator is None else accelerator.num_processes
    rank = 0 if accelerator is None else accelerator.process_index
    per_process = math.ceil(num_items / processes)
    start = rank * per_process
    return [min(i, num_items - 1) for i in range(start, start + per_process)], per_process


@torch.no_grad()
def encode_dataset(models: list, dataset, modality: str, *, batch_size: int = 64, accelerator=None,
                   num_workers: int = 0, desc: str = "encoding") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Encode every item of `dataset` with each model (eval mode is the caller's business).

    modality "image": items hold "pixel_values" [3, H, W]; "text": "input_ids" / "attention_mask" [77].
    With an Accelerator of several processes each encodes a contiguous shard and the shards are
    gathered, so every process returns all rows. Returns per model (global [N, E], fused [N, D]) in
    dataset order, fp32, on the GPU when the models run on one, else on the CPU.
    """
    if modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    num_items = len(dataset)
    indices, per_process = _shard_indices(num_items, accelerator)
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = _model_device(models[0])
    keep_on = device if device.type == "cuda" else torch.device("cpu")
    pieces = [([], []) for _ in models]
    show_progress = accelerator is None or accelerator.is_local_main_process
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with autocast:
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not show_progress, leave=False):
            if modality == "image":
                inputs = (batch["pixel_values"].to(device, non_blocking=True),)
            else:
                inputs = (batch["input_ids"].to(device), batch["attention_mask"].to(device))
            for model, (global_parts, fused_parts) in zip(models, pieces):
                encode = model.encode_image if modality == "image" else model.encode_text
                global_emb, fused_emb = encode(*inputs)
                global_parts.append(global_emb.float().to(keep_on))
                fused_parts.append(fused_emb.float().to(keep_on))
    outputs = []
    for global_parts, fused_parts in pieces:
        global_emb, fused_emb = torch.cat(global_parts), torch.cat(fused_parts)
        if accelerator is not None and accelerator.num_processes > 1:
            global_emb = accelerator.gather(global_emb.to(accelerator.device))[:num_items].to(keep_on)
            fused_emb = accelerator.gather(fused_emb.to(accelerator.device))[:num_items].to(keep_on)
        outputs.append((global_emb, fused_emb))
    return outputs


def _unwrap(pair, accelerator):
    return accelerator.unwrap_model(pair) if accelerator is not None else pair


def extract_pair_features(pair, gallery_split, queries_split, *, tokenizer, image_size, batch_size: int = 64,
                          accelerator=None, num_workers: int = 0) -> PairFeatures:
    """Encode a split's gallery images (data.EvalImages) and queries (data.EvalTexts) with both models of
    `pair` (a modeling.ReciprocalPair) in eval mode under no_grad; the pair's train/eval mode is restored."""
    import data

    pair = _unwrap(pair, accelerator)
    models = [_unwrap(model, accelerator) for model in (pair.a, pair.b)]
    was_training = pair.training
    pair.eval()
    try:
        images = data.EvalImages(gallery_split, tuple(image_size))
        texts = data.EvalTexts(queries_split, tokenizer)
        image_outputs = encode_dataset(models, images, "image", batch_size=batch_size, accelerator=accelerator,
                                       num_workers=num_workers, desc="gallery images")
        text_outputs = encode_dataset(models, texts, "text", batch_size=batch_size, accelerator=accelerator,
                                      num_workers=num_workers, desc="text queries")
    finally:
        pair.train(was_training)
    device = image_outputs[0][0].device
    return PairFeatures(
        image_outputs=image_outputs,
        text_outputs=text_outputs,
        gallery_pids=torch.as_tensor(gallery_split["pid"], dtype=torch.int64, device=device),
        query_pids=torch.as_tensor(queries_split["pid"], dtype=torch.int64, device=device),
    )


def score_pair_features(features: PairFeatures, *, i2t: bool = False, per_query: bool = False,
                        ks=(1, 5, 10), show_progress: bool = True) -> dict[str, dict]:
    """Retrieval metrics for every row "A/GE" ... "A+B/GE+FS" (text->image) and, with `i2t`,
    "i2t:A/GE" ... (image->text: the images query the captions). A tqdm bar counts the rows.

    Values: kernels.retrieval_metrics dicts ({"R1","R5","R10","mAP","mINP"} in percent, plus per-query
    "AP", "INP", "first_rank" when `per_query`).
    """
    directions = [("", features.text_outputs, features.image_outputs, features.query_pids, features.gallery_pids)]
    if i2t:
        directions.append((I2T_PREFIX, features.image_outputs, features.text_outputs,
                           features.gallery_pids, features.query_pids))
    jobs = [(prefix, model_name, model_indices, score, direction)
            for prefix, *direction in directions for model_name, model_indices in MODEL_ROWS for score in SCORES]
    results = {}
    for prefix, model_name, model_indices, score, direction in tqdm(jobs, desc="retrieval metrics", unit="row",
                                                                    disable=not show_progress, leave=False):
        query_outputs, gallery_outputs, query_pids, gallery_pids = direction
        query_feats = modeling.scoring_features([query_outputs[i] for i in model_indices], score)
        gallery_feats = modeling.scoring_features([gallery_outputs[i] for i in model_indices], score)
        results[f"{prefix}{model_name}/{score}"] = kernels.retrieval_metrics(
            query_feats, gallery_feats, query_pids, gallery_pids, ks=ks, per_query=per_query)
    return results


def _summary(result: dict) -> dict[str, float]:
    return {name: float(result[name]) for name in METRIC_NAMES}


def evaluate_pair(pair, gallery_split, queries_split, *, tokenizer, image_size, batch_size: int = 64,
                  accelerator=None, i2t: bool = False) -> dict[str, dict[str, float]]:
    """Evaluate both models of a ReciprocalPair and their ensemble on one split.

    gallery_split: `<split>_gallery` of data.load_benchmark (pid, image_id, image);
    queries_split: `<split>_queries` (pid, caption, image_id). image_size: (H, W) pixels.
    Returns {"A/GE": {...}, "A/FS", "A/GE+FS", "B/...", "A+B/..."} (+ "i2t:..." rows with `i2t`), each
    {"R1","R5","R10","mAP","mINP"} in percent. With a multi-process Accelerator the extraction is
    sharded and every process gets the same result.
    """
    features = extract_pair_features(pair, gallery_split, queries_split, tokenizer=tokenizer,
                                     image_size=image_size, batch_size=batch_size, accelerator=accelerator)
    show_progress = accelerator is None or accelerator.is_local_main_process
    results = score_pair_features(features, i2t=i2t, show_progress=show_progress)
    return {key: _summary(result) for key, result in results.items()}


# ============================================================================ checkpoints and data
@dataclass
class Checkpoint:
    """A checkpoint named on the command line.

    name: label in tables; path: as given; pair_dir: the folder ReciprocalPair.from_pretrained reads;
    run_config: the run's config.yaml (dict) when a run folder (or its best/ / last/) was given, else None.
    """

    name: str
    path: Path
    pair_dir: Path
    run_config: dict | None = None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _read_run_config(run_dir: Path) -> dict | None:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise EvalInputError(f"checkpoint {run_dir}: {path.name} is not valid YAML ({_first_line(error)})") from error
    if not isinstance(config, dict):
        raise EvalInputError(f"checkpoint {run_dir}: {path.name} does not hold a mapping")
    return config


def _pair_member_dirs(pair_dir: Path) -> list[str]:
    """Member folder names from pair.json when it is readable, else the default (model_a, model_b)."""
    try:
        members = json.loads((pair_dir / PAIR_CONFIG_NAME).read_text()).get("members")
    except (OSError, ValueError, AttributeError):
        members = None
    if isinstance(members, list) and len(members) == 2 and all(isinstance(m, str) for m in members):
        return members
    return list(MEMBER_DIRS)


def _looks_like_pair_dir(folder: Path) -> bool:
    return (folder / PAIR_CONFIG_NAME).is_file() or any((folder / member).is_dir() for member in MEMBER_DIRS)


def _missing_pair_files(pair_dir: Path) -> list[str]:
    """Relative paths a ReciprocalPair folder needs and `pair_dir` lacks."""
    needed = [PAIR_CONFIG_NAME] + [f"{member}/{name}" for member in _pair_member_dirs(pair_dir)
                                   for name in (MODEL_CONFIG_NAME, MODEL_WEIGHTS_NAME)]
    return [name for name in needed if not (pair_dir / name).is_file()]


def _pair_layout_hint() -> str:
    return f"{PAIR_CONFIG_NAME} + {'/, '.join(MEMBER_DIRS)}/ with {MODEL_CONFIG_NAME} and {MODEL_WEIGHTS_NAME}"


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A run folder (uses best/, else last/) or a pair folder -> Checkpoint; EvalInputError when neither."""
    given = Path(path)
    if not given.exists():
        raise EvalInputError(f"checkpoint {given}: no such folder")
    if not given.is_dir():
        raise EvalInputError(f"checkpoint {given}: not a folder (give a run folder or a saved ReciprocalPair folder)")
    if _looks_like_pair_dir(given):
        run_dir = given.parent if given.name in ("best", "last") else None
        name = f"{given.parent.name}/{given.name}" if run_dir is not None else given.name
        return Checkpoint(name, given, given, _read_run_config(run_dir) if run_dir is not None else None)
    for sub in ("best", "last"):
        if (given / sub).is_dir():
            return Checkpoint(given.name, given, given / sub, _read_run_config(given))
    raise EvalInputError(f"checkpoint {given}: neither a run folder (no best/ or last/) nor a pair folder "
                         f"({_pair_layout_hint()})")


def load_pair(checkpoint: Checkpoint):
    """modeling.ReciprocalPair.from_pretrained(checkpoint.pair_dir), errors as one-line EvalInputError."""
    missing = _missing_pair_files(checkpoint.pair_dir)
    if missing:
        raise EvalInputError(f"checkpoint {checkpoint.pair_dir}: missing {', '.join(missing)}")
    try:
        pair = modeling.ReciprocalPair.from_pretrained(checkpoint.pair_dir)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise EvalInputError(f"checkpoint {checkpoint.pair_dir}: cannot load ({_first_line(error)})") from error
    if tuple(pair.a.image_size) != tuple(pair.b.image_size):
        raise EvalInputError(f"checkpoint {checkpoint.pair_dir}: models A and B take different image sizes "
                             f"({tuple(pair.a.image_size)} vs {tuple(pair.b.image_size)})")
    for member, model in zip(_pair_member_dirs(checkpoint.pair_dir), pair.models):
        text_config = model.clip.config.text_config
        if text_config.vocab_size < VOCAB_SIZE or text_config.max_position_embeddings < CONTEXT_LENGTH:
            raise EvalInputError(
                f"checkpoint {checkpoint.pair_dir}: {member}/{MODEL_CONFIG_NAME} has an incompatible text config "
                f"(vocab_size {text_config.vocab_size}, max_position_embeddings {text_config.max_position_embeddings}; "
                f"the CLIP tokenizer needs at least {VOCAB_SIZE} and {CONTEXT_LENGTH})")
    return pair


def load_eval_split(dataset: str, root: str | None, split: str):
    """(`<split>_gallery`, `<split>_queries`) of data.load_benchmark(dataset, root); EvalInputError on an
    unknown dataset, a missing or empty split."""
    import data

    try:
        splits = data.load_benchmark(dataset, root=root)
    except (OSError, ValueError, KeyError) as error:
        raise EvalInputError(f"dataset {dataset!r}: {_first_line(error)}") from error
    gallery_key, queries_key = f"{split}_gallery", f"{split}_queries"
    if gallery_key not in splits or queries_key not in splits:
        available = sorted(key[: -len("_gallery")] for key in splits if key.endswith("_gallery"))
        raise EvalInputError(f"dataset {dataset!r}: no evaluation split {split!r} "
                             f"(available: {', '.join(available) or 'none'})")
    for key in (gallery_key, queries_key):
        if len(splits[key]) == 0:
            raise EvalInputError(f"dataset {dataset!r}: split {split!r} is empty ({key} has no rows)")
    return splits[gallery_key], splits[queries_key]


@contextlib.contextmanager
def _unreadable_images_as_input_errors():
    """A gallery image that cannot be read (data.EvalImages names the file) ends as a one-line error."""
    try:
        yield
    except OSError as error:
        raise EvalInputError(_first_line(error)) from error


# ============================================================================ evaluation run
def evaluate_checkpoint(checkpoint: Checkpoint, gallery_split, queries_split, *, tokenizer, batch_size: int,
                        accelerator=None, i2t: bool = False, num_workers: int = 0) -> CheckpointResult:
    """Load one checkpoint, extract features, compute every row and its CMC curve."""
    pair = load_pair(checkpoint)
    if accelerator is not None:
        pair = pair.to(accelerator.device)
    image_size = tuple(pair.a.image_size)
    started = time.perf_counter()
    with _unreadable_images_as_input_errors():
        features = extract_pair_features(pair, gallery_split, queries_split, tokenizer=tokenizer,
                                         image_size=image_size, batch_size=batch_size, accelerator=accelerator,
                                         num_workers=num_workers)
    extracted = time.perf_counter()
    results = score_pair_features(features, i2t=i2t, per_query=True,
                                  show_progress=accelerator is None or accelerator.is_local_main_process)
    scored = time.perf_counter()
    model_description = {"settings": pair.a.settings(), "clip": pair.a.clip.config.to_dict()}
    return CheckpointResult(
        name=checkpoint.name, path=str(checkpoint.path), pair_dir=str(checkpoint.pair_dir),
        image_size=image_size,
        rows={key: _summary(result) for key, result in results.items()},
        cmc={key: cmc_curve(result["first_rank"], CMC_MAX_RANK) for key, result in results.items()
             if not key.startswith(I2T_PREFIX)},
        fingerprint=config_fingerprint(checkpoint.run_config, model_description),
        seconds={"feature_extraction": extracted - started, "metrics": scored - extracted},
    )


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eval_3rtpr.py",
        description="Evaluate 3RTPR checkpoints (rows A/B/A+B × GE/FS/GE+FS). "
                    "Free-text search: eval_3rtpr.py search QUERY --checkpoint ... (see `search --help`).")
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="RUN_DIR",
                        help="run folder(s) (best/, else last/) or ReciprocalPair folder(s); several seeds of "
                             "one config also get a mean ± std row")
    parser.add_argument("--dataset", required=True, help="cuhk-pedes | icfg-pedes | rstpreid | synth-pedes[-tiny|-small|-full]")
    parser.add_argument("--root", default=None, help="datasets root (default: data.load_benchmark's default)")
    parser.add_argument("--split", default="test", help="evaluation split (default: test)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for results.json, leaderboard.md, CMC PNG")
    parser.add_argument("--i2t", action="store_true", help="also evaluate image -> text")
    parser.add_argument("--leaderboard", action="store_true",
                        help="place our rows among the published results of METHOD.md §9, sorted by R@1")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size (default: 64)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for decoding images (default: 0)")
    return parser


def evaluate_command(argv: list[str]) -> int:
    """`eval_3rtpr.py --checkpoint ...`: evaluate, write the reports, print the table (main process)."""
    args = _eval_parser().parse_args(argv)
    if args.batch_size < 1:
        raise EvalInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    from accelerate import Accelerator

    from data.transforms import get_tokenizer

    accelerator = Accelerator()
    checkpoints = [resolve_checkpoint(path) for path in args.checkpoint]
    gallery, queries = load_eval_split(args.dataset, args.root, args.split)
    tokenizer = get_tokenizer()
    results = []
    for checkpoint in checkpoints:
        result = evaluate_checkpoint(checkpoint, gallery, queries, tokenizer=tokenizer, batch_size=args.batch_size,
                                     accelerator=accelerator, i2t=args.i2t, num_workers=args.num_workers)
        results.append(result)
        if accelerator.is_main_process:
            print(f"{checkpoint.name}: {len(queries)} queries × {len(gallery)} gallery images, features "
                  f"{result.seconds['feature_extraction']:.1f} s, metrics {result.seconds['metrics']:.2f} s",
                  file=sys.stderr)
    if accelerator.is_main_process:
        make_names_unique(results)
        paths = write_reports(results, dataset=args.dataset, split=args.split, root=args.root, out_dir=args.out,
                              with_published=args.leaderboard, i2t=args.i2t)
        print(paths["leaderboard"].read_text())
        print(f"wrote {paths['results']}, {paths['leaderboard']}, {paths['cmc']}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return 0


# ============================================================================ free-text search
@dataclass
class GalleryIndex:
    """Gallery features of one checkpoint on one split, as cached on disk for search.

    image_outputs: per model (A, B) (global [Ng, E], fused [Ng, D]) fp32 CPU;
    pids / image_ids: LongTensor[Ng]; sources: per gallery item its image file path ("" when the
    dataset embeds the image bytes instead).
    """

    image_outputs: list
    pids: torch.Tensor
    image_ids: torch.Tensor
    sources: list


def search_cache_dir() -> Path:
    """`$TRPR_CACHE/search-features`, else `~/.cache/3rtpr/search-features`."""
    base = Path(os.environ.get("TRPR_CACHE") or Path.home() / ".cache" / "3rtpr")
    return base / "search-features"


def search_cache_key(checkpoint: Checkpoint, dataset: str, root, split: str) -> str:
    """Hash of (every file of the pair folder: relative path, size, mtime in ns) + dataset + root + split.
    Re-saving a checkpoint changes the mtimes and so the key; nothing is read from the weights."""
    files = sorted(p for p in checkpoint.pair_dir.rglob("*") if p.is_file())
    signature = [[str(p.relative_to(checkpoint.pair_dir)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    blob = json.dumps({"pair_dir": str(checkpoint.pair_dir.resolve()), "files": signature,
                       "dataset": canonical_dataset(dataset), "root": None if root is None else str(Path(root).resolve()),
                       "split": split}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def build_gallery_index(pair, gallery_split, *, batch_size: int = 64, num_workers: int = 0) -> GalleryIndex:
    """Encode the gallery with both models (eval mode, no_grad) and keep its pids and image paths."""
    import data
    from data.torch_datasets import image_sources

    was_training = pair.training
    pair.eval()
    try:
        images = data.EvalImages(gallery_split, tuple(pair.a.image_size))
        outputs = encode_dataset([pair.a, pair.b], images, "image", batch_size=batch_size,
                                 num_workers=num_workers, desc="gallery images")
    finally:
        pair.train(was_training)
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
    temporary = stem.with_suffix(".tmp")
    save_file(tensors, str(temporary))
    stem.with_suffix(".json").write_text(json.dumps({"sources": index.sources}))
    temporary.replace(stem.with_suffix(".safetensors"))  # the features file appears last: its presence = complete


def load_gallery_index(stem: Path) -> GalleryIndex | None:
    """The cached index at `stem`, or None when absent or unreadable (it is then rebuilt)."""
    from safetensors.torch import load_file

    features_path, sources_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if not (features_path.is_file() and sources_path.is_file()):
        return None
    try:
        tensors = load_file(str(features_path))
        sources = json.loads(sources_path.read_text())["sources"]
        outputs = [(tensors[f"{m}.global"], tensors[f"{m}.fused"]) for m in "ab"]
    except (OSError, ValueError, KeyError):
        return None
    if len(sources) != tensors["pids"].numel():
        return None
    return GalleryIndex(image_outputs=outputs, pids=tensors["pids"], image_ids=tensors["image_ids"], sources=sources)


def _parse_row_key(row: str) -> tuple[tuple[int, ...], str]:
    """"A+B/GE+FS" -> ((0, 1), "GE+FS")."""
    model_name, _, score = row.partition("/")
    models = dict(MODEL_ROWS)
    if model_name not in models or score not in SCORES:
        raise EvalInputError(f"--score {row!r}: expected one of {', '.join(ROW_KEYS)}")
    return models[model_name], score


@torch.no_grad()
def search_gallery(pair, index: GalleryIndex, query: str, *, tokenizer, row: str = "A+B/GE+FS",
                   top: int = 10) -> list[dict]:
    """Rank the gallery for one free-text query.

    row: which models and score rank ("A/GE" ... "A+B/GE+FS"); the score is the sum of the chosen
    cosine similarities (so at most 1, 2 or 4). Returns up to `top` dicts {"rank" (1-based),
    "score", "pid", "image_id", "path", "gallery_index"}; equal scores keep gallery order.
    """
    from data.transforms import tokenize

    model_indices, score = _parse_row_key(row)
    models = [pair.a, pair.b]
    device = _model_device(pair)
    input_ids, attention_mask = tokenize(tokenizer, [query])
    was_training = pair.training
    pair.eval()
    try:
        text_outputs = [models[i].encode_text(input_ids.to(device), attention_mask.to(device)) for i in model_indices]
    finally:
        pair.train(was_training)
    query_feats = modeling.scoring_features([(g.float().cpu(), f.float().cpu()) for g, f in text_outputs], score)
    gallery_feats = modeling.scoring_features([index.image_outputs[i] for i in model_indices], score)
    scores = gallery_feats @ query_feats[0]
    order = torch.sort(scores, descending=True, stable=True).indices[:top]
    return [{"rank": rank, "score": float(scores[i]), "pid": int(index.pids[i]), "image_id": int(index.image_ids[i]),
             "path": index.sources[i], "gallery_index": int(i)} for rank, i in enumerate(order.tolist(), start=1)]


def save_search_grid(matches: list[dict], query: str, path: Path, *, gallery_split=None) -> Path:
    """A PNG with the matched images in rank order, each titled "#rank pid score". Images are read from
    their paths; embedded images (no path) come from `gallery_split` when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from data.torch_datasets import image_sources, open_image

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
        ax.set_title(f"#{match['rank']} pid {match['pid']}\n{match['score']:.3f}", fontsize=8)
    fig.suptitle(query if len(query) <= 90 else query[:87] + "...", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _search_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eval_3rtpr.py search",
                                     description="Free-text person search in an evaluation gallery.")
    parser.add_argument("query", help="a description of the person, e.g. \"a man in a blue jacket with a black "
                                      "backpack\"; \"-\" reads one query per line from stdin")
    parser.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="run folder or ReciprocalPair folder")
    parser.add_argument("--dataset", required=True, help="benchmark whose gallery is searched")
    parser.add_argument("--root", default=None, help="datasets root (default: data.load_benchmark's default)")
    parser.add_argument("--split", default="test", help="gallery split (default: test)")
    parser.add_argument("--top", type=int, default=10, help="number of matches (default: 10)")
    parser.add_argument("--out", type=Path, default=Path("search-results"),
                        help="folder for the PNG grid (default: ./search-results)")
    parser.add_argument("--score", default="A+B/GE+FS", help=f"ranking row, one of {', '.join(ROW_KEYS)} (default: A+B/GE+FS)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size when the gallery is encoded")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="gallery feature cache (default: $TRPR_CACHE/search-features or ~/.cache/3rtpr/search-features)")
    return parser


def _slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "query"


def _read_queries(query: str):
    """The query itself, or with "-" one query per non-empty stdin line (answered as they come)."""
    if query != "-":
        yield query
        return
    for line in sys.stdin:
        if line.strip():
            yield line.strip()


def search_command(argv: list[str]) -> int:
    """`eval_3rtpr.py search QUERY ...`: print the top matches and save a PNG grid per query."""
    args = _search_parser().parse_args(argv)
    if not args.query.strip():
        raise EvalInputError("search: the query is empty")
    if args.top < 1:
        raise EvalInputError(f"--top must be at least 1, got {args.top}")
    _parse_row_key(args.score)
    from data.transforms import get_tokenizer

    started = time.perf_counter()
    checkpoint = resolve_checkpoint(args.checkpoint)
    cache_stem = (args.cache_dir or search_cache_dir()) / search_cache_key(checkpoint, args.dataset, args.root, args.split)
    index = load_gallery_index(cache_stem)
    pair = load_pair(checkpoint)
    gallery = None
    from_cache = index is not None
    if index is None:
        gallery, _ = load_eval_split(args.dataset, args.root, args.split)
        with _unreadable_images_as_input_errors():
            index = build_gallery_index(pair, gallery, batch_size=args.batch_size)
        save_gallery_index(index, cache_stem)
    tokenizer = get_tokenizer()
    print(f"gallery: {index.pids.numel()} images of {args.dataset} ({args.split}), "
          f"{'from cache' if from_cache else 'encoded and cached'} at {cache_stem}.safetensors; "
          f"ready in {time.perf_counter() - started:.2f} s", file=sys.stderr)
    for query in _read_queries(args.query):
        query_started = time.perf_counter()
        matches = search_gallery(pair, index, query, tokenizer=tokenizer, row=args.score, top=args.top)
        answered = time.perf_counter()
        print(f"query: {query}")
        print(f"{'rank':>4}  {'score':>7}  {'pid':>6}  path")
        for match in matches:
            print(f"{match['rank']:>4}  {match['score']:>7.4f}  {match['pid']:>6}  {match['path'] or '(embedded image)'}")
        grid = save_search_grid(matches, query, args.out / f"search_{_slug(query)}.png", gallery_split=gallery)
        print(f"grid: {grid}", flush=True)
        print(f"answered in {answered - query_started:.3f} s ({args.score}, score = sum of cosines)", file=sys.stderr)
    return 0


# ============================================================================ entry point
def main(argv: list[str] | None = None) -> int:
    """CLI entry: `search ...` or the evaluation; bad input -> one line on stderr, exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "search":
            return search_command(argv[1:])
        return evaluate_command(argv)
    except EvalInputError as error:
        print(f"eval_3rtpr.py: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
