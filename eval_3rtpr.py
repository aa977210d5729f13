"""Evaluate 3RTPR checkpoints: retrieval metrics, leaderboard, CMC curves and free-text search.

Evaluation (METHOD.md §5, §8, §9):
    python eval_3rtpr.py --checkpoint RUN_DIR [RUN_DIR ...] --dataset NAME [--root ROOT] [--split test]
                         --out DIR [--i2t] [--leaderboard] [--batch-size N]
    (also under `accelerate launch`: feature extraction is sharded over the processes)
Free-text search:
    python eval_3rtpr.py search "a man in a blue jacket" --checkpoint RUN_DIR --dataset NAME [--root ROOT]
                         [--split test] [--top 10] [--out DIR]

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

import kernels
import modeling
from metrics.cmc import cmc_curve, plot_cmc
from metrics.leaderboard import LeaderboardRow, markdown_table, mean_std_rows, reported_rows, sort_by_r1
from metrics.published import METRIC_NAMES, canonical_dataset, published_for
from modeling.model import CONFIG_NAME as MODEL_CONFIG_NAME
from modeling.model import WEIGHTS_NAME as MODEL_WEIGHTS_NAME
from modeling.pair import MEMBER_DIRS, PAIR_CONFIG_NAME

MODEL_ROWS = (("A", (0,)), ("B", (1,)), ("A+B", (0, 1)))  # row name -> indices into (pair.a, pair.b)
SCORES = ("GE", "FS", "GE+FS")
ROW_KEYS = tuple(f"{model}/{score}" for model, _ in MODEL_ROWS for score in SCORES)
I2T_PREFIX = "i2t:"
CMC_MAX_RANK = 20
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


def _unwrap_pair(pair, accelerator):
    return accelerator.unwrap_model(pair) if accelerator is not None else pair


def extract_pair_features(pair, gallery_split, queries_split, *, tokenizer, image_size, batch_size: int = 64,
                          accelerator=None, num_workers: int = 0) -> PairFeatures:
    """Encode a split's gallery images (data.EvalImages) and queries (data.EvalTexts) with both models of
    `pair` (a modeling.ReciprocalPair) in eval mode under no_grad; the pair's train/eval mode is restored."""
    import data

    pair = _unwrap_pair(pair, accelerator)
    models = [pair.a, pair.b]
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
                        ks=(1, 5, 10)) -> dict[str, dict]:
    """Retrieval metrics for every row "A/GE" ... "A+B/GE+FS" (text->image) and, with `i2t`,
    "i2t:A/GE" ... (image->text: the images query the captions).

    Values: kernels.retrieval_metrics dicts ({"R1","R5","R10","mAP","mINP"} in percent, plus per-query
    "AP", "INP", "first_rank" when `per_query`).
    """
    directions = [("", features.text_outputs, features.image_outputs, features.query_pids, features.gallery_pids)]
    if i2t:
        directions.append((I2T_PREFIX, features.image_outputs, features.text_outputs,
                           features.gallery_pids, features.query_pids))
    results = {}
    for prefix, query_outputs, gallery_outputs, query_pids, gallery_pids in directions:
        for model_name, model_indices in MODEL_ROWS:
            for score in SCORES:
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
    return {key: _summary(result) for key, result in score_pair_features(features, i2t=i2t).items()}


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


# ============================================================================ evaluation run
@dataclass
class CheckpointResult:
    """One checkpoint's evaluation: rows {row key -> {"R1",...,"mINP"} percent}, text->image CMC curves
    {row key -> [R@1..R@20] percent}, the config fingerprint that groups seeds, and timings in seconds."""

    checkpoint: Checkpoint
    image_size: tuple
    rows: dict
    cmc: dict
    fingerprint: str
    seconds: dict = field(default_factory=dict)


_RUN_ONLY_KEY = re.compile(r"seed|output|out_dir|run_name|resume|logging|log_dir", re.IGNORECASE)


def _without_run_only_keys(value):
    """The config with seeds, output folders and logging settings removed (recursively): what
    distinguishes two runs of the same recipe."""
    if isinstance(value, dict):
        return {k: _without_run_only_keys(v) for k, v in value.items() if not _RUN_ONLY_KEY.search(str(k))}
    if isinstance(value, list):
        return [_without_run_only_keys(v) for v in value]
    return value


def config_fingerprint(checkpoint: Checkpoint, pair) -> str:
    """Short hash of what makes a recipe: the run's config.yaml without seeds / output folders, or (for a
    bare pair folder) the models' settings and CLIP config. Checkpoints with equal fingerprints are
    seeds of one config and get a mean ± std row."""
    if checkpoint.run_config is not None:
        recipe = _without_run_only_keys(checkpoint.run_config)
    else:
        recipe = {"settings": pair.a.settings(), "clip": pair.a.clip.config.to_dict()}
    blob = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def evaluate_checkpoint(checkpoint: Checkpoint, gallery_split, queries_split, *, tokenizer, batch_size: int,
                        accelerator=None, i2t: bool = False, num_workers: int = 0) -> CheckpointResult:
    """Load one checkpoint, extract features, compute every row and its CMC curve."""
    pair = load_pair(checkpoint)
    if accelerator is not None:
        pair = pair.to(accelerator.device)
    image_size = tuple(pair.a.image_size)
    started = time.perf_counter()
    features = extract_pair_features(pair, gallery_split, queries_split, tokenizer=tokenizer, image_size=image_size,
                                     batch_size=batch_size, accelerator=accelerator, num_workers=num_workers)
    extracted = time.perf_counter()
    results = score_pair_features(features, i2t=i2t, per_query=True)
    scored = time.perf_counter()
    return CheckpointResult(
        checkpoint=checkpoint,
        image_size=image_size,
        rows={key: _summary(result) for key, result in results.items()},
        cmc={key: cmc_curve(result["first_rank"], CMC_MAX_RANK) for key, result in results.items()
             if not key.startswith(I2T_PREFIX)},
        fingerprint=config_fingerprint(checkpoint, pair),
        seconds={"feature_extraction": extracted - started, "metrics": scored - extracted},
    )


def _unique_names(results: list[CheckpointResult]) -> None:
    seen: dict[str, int] = {}
    for result in results:
        name = result.checkpoint.name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            result.checkpoint.name = f"{name}#{seen[name]}"


def seed_groups(results: list[CheckpointResult]) -> list[list[CheckpointResult]]:
    """Checkpoints grouped by config fingerprint (groups of 2 or more only, in first-seen order)."""
    groups: dict[str, list[CheckpointResult]] = {}
    for result in results:
        groups.setdefault(result.fingerprint, []).append(result)
    return [members for members in groups.values() if len(members) > 1]


def _group_label(members: list[CheckpointResult]) -> str:
    prefix = os.path.commonprefix([m.checkpoint.name for m in members]).rstrip("_-/.# ")
    return f"3RTPR {prefix or 'seeds'} (mean of {len(members)})"


def leaderboard_rows(results: list[CheckpointResult], dataset: str, *, with_published: bool,
                     prefix: str = "") -> list[LeaderboardRow]:
    """Rows of one direction ("" = text->image, "i2t:" = image->text): every checkpoint's rows, one
    mean ± std row per row key for each config with several checkpoints, and (text->image with
    `with_published`) the reported rows of METHOD.md §9, sorted by R@1."""
    keys = [f"{prefix}{key}" for key in ROW_KEYS]
    rows = []
    for result in results:
        for key in keys:
            rows.append(LeaderboardRow(method=f"3RTPR {result.checkpoint.name} {key}",
                                       metrics=result.rows[key], source=str(result.checkpoint.pair_dir)))
    for members in seed_groups(results):
        per_checkpoint = [{key: m.rows[key] for key in keys} for m in members]
        rows += mean_std_rows(_group_label(members), per_checkpoint, [m.checkpoint.name for m in members])
    if with_published and not prefix:
        rows = sort_by_r1(rows + reported_rows(published_for(dataset)))
    return rows


def render_leaderboard(results: list[CheckpointResult], dataset: str, split: str, *, with_published: bool,
                       i2t: bool, cmc_png: str | None) -> str:
    """The Markdown report: text->image table (+ published rows), image->text table, CMC figure."""
    lines = [f"# 3RTPR evaluation: {dataset}, split {split}", "",
             "Metrics in percent (METHOD.md §8). A, B: the two reciprocal models; A+B: their ensemble "
             "(sum of similarities). GE: global embeddings; FS: fused representations; GE+FS: both.", "",
             "## Text → image", ""]
    t2i = leaderboard_rows(results, dataset, with_published=with_published)
    if with_published:
        if published_for(dataset):
            lines += [f"Sorted by R@1. \"reported\" rows are published numbers (CLIP ViT-B/16), not re-run here.", ""]
        else:
            lines += [f"No published results exist for {dataset!r} (only the three public benchmarks "
                      "cuhk-pedes, icfg-pedes and rstpreid have them): our rows only, sorted by R@1.", ""]
    lines += [markdown_table(t2i, rank=with_published), ""]
    if i2t:
        lines += ["## Image → text", "", markdown_table(leaderboard_rows(results, dataset, with_published=False,
                                                                         prefix=I2T_PREFIX)), ""]
    if cmc_png:
        lines += ["## CMC (text → image)", "", f"![CMC curves]({cmc_png})", ""]
    return "\n".join(lines)


def write_reports(results: list[CheckpointResult], *, dataset: str, split: str, root, out_dir: Path,
                  with_published: bool, i2t: bool) -> dict[str, Path]:
    """Write results.json, leaderboard.md and cmc_<dataset>.png into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmc_name = f"cmc_{re.sub(r'[^A-Za-z0-9_.-]+', '_', canonical_dataset(dataset))}.png"
    several = len(results) > 1
    curves = {(f"{r.checkpoint.name} {key}" if several else key): curve
              for r in results for key, curve in r.cmc.items()}
    plot_cmc(curves, out_dir / cmc_name, title=f"CMC, text → image: {dataset} ({split})")
    groups = []
    for members in seed_groups(results):
        keys = list(members[0].rows)
        mean_rows = mean_std_rows(_group_label(members), [m.rows for m in members],
                                  [m.checkpoint.name for m in members])
        groups.append({"label": _group_label(members), "checkpoints": [m.checkpoint.name for m in members],
                       "fingerprint": members[0].fingerprint,
                       "mean": {key: row.metrics for key, row in zip(keys, mean_rows)},
                       "std": {key: row.std for key, row in zip(keys, mean_rows)}})
    report = {
        "dataset": dataset, "split": split, "root": None if root is None else str(root),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "metrics_unit": "percent", "i2t": i2t, "leaderboard": with_published,
        "checkpoints": [{"name": r.checkpoint.name, "path": str(r.checkpoint.path),
                         "pair_dir": str(r.checkpoint.pair_dir), "image_size": list(r.image_size),
                         "config_fingerprint": r.fingerprint, "rows": r.rows, "cmc": r.cmc,
                         "seconds": r.seconds} for r in results],
        "seed_groups": groups,
        "published": [{"method": p.method, "metrics": p.metrics, "source": p.source}
                      for p in published_for(dataset)] if with_published else [],
        "cmc_plot": cmc_name,
    }
    paths = {"results": out_dir / "results.json", "leaderboard": out_dir / "leaderboard.md", "cmc": out_dir / cmc_name}
    paths["results"].write_text(json.dumps(report, indent=2) + "\n")
    paths["leaderboard"].write_text(render_leaderboard(results, dataset, split, with_published=with_published,
                                                       i2t=i2t, cmc_png=cmc_name))
    return paths


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

    import data

    accelerator = Accelerator()
    checkpoints = [resolve_checkpoint(path) for path in args.checkpoint]
    gallery, queries = load_eval_split(args.dataset, args.root, args.split)
    tokenizer = data.transforms.get_tokenizer()
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
        _unique_names(results)
        paths = write_reports(results, dataset=args.dataset, split=args.split, root=args.root, out_dir=args.out,
                              with_published=args.leaderboard, i2t=args.i2t)
        print(paths["leaderboard"].read_text())
        print(f"wrote {paths['results']}, {paths['leaderboard']}, {paths['cmc']}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return 0
