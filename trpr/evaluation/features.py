"""Encoding evaluation splits with both models of a pair (the sharded encoder `runtime.encoding.encode`),
and scoring the features into retrieval rows.

Features are L2-normalised pieces concatenated by `modeling.scoring_features`, so a dot product is the
sum of the chosen cosine similarities and `kernels.retrieval_metrics` never needs the similarity matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from trpr import data
from trpr import kernels
from trpr import modeling
from trpr.modeling.pair import I2T_PREFIX, MODEL_ROWS, SCORES
from trpr.runtime.encoding import encode, eval_mode


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


def _unwrap(module, accelerator):
    return accelerator.unwrap_model(module) if accelerator is not None else module


def extract_pair_features(pair, gallery_split, queries_split, *, tokenizer, image_size, batch_size: int = 64,
                          accelerator=None, num_workers: int = 0) -> PairFeatures:
    """Encode a split's gallery images (data.EvalImages) and queries (data.EvalTexts) with both models of
    `pair` (a modeling.ReciprocalPair) in eval mode under no_grad; the pair's train/eval mode is restored."""
    pair = _unwrap(pair, accelerator)
    models = [_unwrap(model, accelerator) for model in (pair.a, pair.b)]
    with eval_mode(pair):
        images = data.EvalImages(gallery_split, tuple(image_size))
        texts = data.EvalTexts(queries_split, tokenizer)
        image_outputs = encode(models, images, "image", batch_size=batch_size, accelerator=accelerator,
                               num_workers=num_workers, desc="gallery images")
        text_outputs = encode(models, texts, "text", batch_size=batch_size, accelerator=accelerator,
                              num_workers=num_workers, desc="text queries")
    device = image_outputs[0][0].device
    return PairFeatures(
        image_outputs=image_outputs,
        text_outputs=text_outputs,
        gallery_pids=torch.as_tensor(gallery_split["pid"], dtype=torch.int64, device=device),
        query_pids=torch.as_tensor(queries_split["pid"], dtype=torch.int64, device=device),
    )


def check_finite_features(features: PairFeatures) -> None:
    """kernels.NonFiniteFeatures naming the model (A or B), the embedding (global / fused), the side (text
    query / gallery image) and the first row whose features are NaN or infinite: a diverged or damaged
    model is an error, never a score (NaN similarities would give R@1 100)."""
    for side, outputs in (("text query", features.text_outputs), ("gallery image", features.image_outputs)):
        for model_name, (global_emb, fused_emb) in zip("AB", outputs):
            for kind, feats in (("global", global_emb), ("fused", fused_emb)):
                row = kernels.first_non_finite_row(feats)
                if row >= 0:
                    value = feats[row][~torch.isfinite(feats[row])][0].item()
                    raise kernels.NonFiniteFeatures(
                        f"model {model_name} gives a non-finite {kind} embedding ({value}) for {side} row {row} "
                        f"of {feats.shape[0]}: its weights are not usable (a diverged run?)")


def score_pair_features(features: PairFeatures, *, i2t: bool = False, per_query: bool = False,
                        ks=(1, 5, 10), show_progress: bool = True) -> dict[str, dict]:
    """Retrieval metrics for every row "A/GE" ... "A+B/GE+FS" (text->image) and, with `i2t`,
    "i2t:A/GE" ... (image->text: the images query the captions). A tqdm bar counts the rows.

    Values: kernels.retrieval_metrics dicts ({"R1","R5","R10","mAP","mINP"} in percent, plus per-query
    "AP", "INP", "first_rank" when `per_query`).
    """
    check_finite_features(features)
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
