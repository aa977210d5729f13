"""Evaluating a reciprocal pair (docs/method.md §8): every row of both models and their ensemble,
from a pair in memory (`evaluate_pair`, also training's validation) or a checkpoint on disk
(`evaluate_checkpoint`, with per-query CMC curves and timings for the reports of `reporting.evaluation`)."""
from __future__ import annotations

import time

from trpr.kernels import NonFiniteFeatures
from trpr.metrics.cmc import cmc_curve
from trpr.metrics.published import METRIC_NAMES
from trpr.reporting.evaluation import CMC_MAX_RANK, CheckpointResult, config_fingerprint
from trpr.modeling.pair import I2T_PREFIX

from .checkpoints import Checkpoint, EvalInputError, load_pair, unreadable_images_as_input_errors
from .features import extract_pair_features, score_pair_features


def summary(result: dict) -> dict[str, float]:
    """{"R1","R5","R10","mAP","mINP"} floats (percent) of a kernels.retrieval_metrics result."""
    return {name: float(result[name]) for name in METRIC_NAMES}


def evaluate_pair(pair, gallery_split, queries_split, *, tokenizer, image_size, batch_size: int = 64,
                  accelerator=None, i2t: bool = False, num_workers: int = 0) -> dict[str, dict[str, float]]:
    """Evaluate both models of a ReciprocalPair and their ensemble on one split.

    gallery_split: `<split>_gallery` of data.load_benchmark (pid, image_id, image);
    queries_split: `<split>_queries` (pid, caption, image_id). image_size: (H, W) pixels.
    Returns {"A/GE": {...}, "A/FS", "A/GE+FS", "B/...", "A+B/..."} (+ "i2t:..." rows with `i2t`), each
    {"R1","R5","R10","mAP","mINP"} in percent. With a multi-process Accelerator the extraction is
    sharded and every process gets the same result. num_workers: DataLoader workers decoding the images.
    """
    features = extract_pair_features(pair, gallery_split, queries_split, tokenizer=tokenizer,
                                     image_size=image_size, batch_size=batch_size, accelerator=accelerator,
                                     num_workers=num_workers)
    show_progress = accelerator is None or accelerator.is_local_main_process
    results = score_pair_features(features, i2t=i2t, show_progress=show_progress)
    return {key: summary(result) for key, result in results.items()}


def evaluate_checkpoint(checkpoint: Checkpoint, gallery_split, queries_split, *, tokenizer, batch_size: int,
                        accelerator=None, i2t: bool = False, num_workers: int = 0) -> CheckpointResult:
    """Load one checkpoint, extract features, compute every row and its CMC curve (text->image)."""
    pair = load_pair(checkpoint)
    if accelerator is not None:
        pair = pair.to(accelerator.device)
    image_size = tuple(pair.a.image_size)
    started = time.perf_counter()
    with unreadable_images_as_input_errors():
        features = extract_pair_features(pair, gallery_split, queries_split, tokenizer=tokenizer,
                                         image_size=image_size, batch_size=batch_size, accelerator=accelerator,
                                         num_workers=num_workers)
    extracted = time.perf_counter()
    try:  # a pair with non-finite weights is an error naming it, never a leaderboard entry
        results = score_pair_features(features, i2t=i2t, per_query=True,
                                      show_progress=accelerator is None or accelerator.is_local_main_process)
    except NonFiniteFeatures as error:
        raise EvalInputError(f"checkpoint {checkpoint.path}: {error}") from None
    scored = time.perf_counter()
    model_description = {"settings": pair.a.settings(), "clip": pair.a.clip.config.to_dict()}
    return CheckpointResult(
        name=checkpoint.name, path=str(checkpoint.path), pair_dir=str(checkpoint.pair_dir),
        image_size=image_size,
        rows={key: summary(result) for key, result in results.items()},
        cmc={key: cmc_curve(result["first_rank"], CMC_MAX_RANK) for key, result in results.items()
             if not key.startswith(I2T_PREFIX)},
        fingerprint=config_fingerprint(checkpoint.run_config, model_description),
        seconds={"feature_extraction": extracted - started, "metrics": scored - extracted},
    )
