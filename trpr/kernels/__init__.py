"""3RTPR kernels: SDM / TRL per-sample losses and retrieval metrics (docs/method.md §3, §8).

Public API (docs/design.md):

    sdm_loss(text_feats [b,D], image_feats [b,D], pids [b], logit_scale=50.0, weights=None, *,
             text_cols=None [B,D], image_cols=None [B,D], col_pids=None [B], backend="auto") -> [b]
    trl_loss(text_feats, image_feats, pids, tau=0.015, margin=0.1, weights=None, *, (same), backend="auto") -> [b]
    retrieval_metrics(query_feats [Nq,D], gallery_feats [Ng,D], query_pids [Nq], gallery_pids [Ng],
                      ks=(1, 5, 10), per_query=False, backend="auto") -> dict
    retrieval_metrics_from_scores(scores [Nq,Ng], query_pids, gallery_pids, ks=(1, 5, 10), per_query=False) -> dict

Backends: "auto" = Triton for CUDA tensors when triton imports, the PyTorch reference
(`kernels.reference`) otherwise; "triton" forces the Triton kernels (on CPU tensors only valid
under TRITON_INTERPRET=1); "torch" forces the reference. This package imports only torch and,
lazily, triton.

Precision: every entry point runs its float32 products at "highest" (`kernels.precision.exact_float32`),
whatever `torch.set_float32_matmul_precision` the caller set; the Triton losses' backward too
(`kernels.slab.SlabLoss`). The PyTorch reference losses' autograd backward runs at the caller's setting.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .precision import exact_float32
from .reference import (DEFAULT_KS, retrieval_metrics_from_scores, retrieval_metrics_reference,
                        sdm_loss_reference, trl_loss_reference)

__all__ = ["sdm_loss", "trl_loss", "retrieval_metrics", "retrieval_metrics_from_scores",
           "triton_available", "BACKENDS", "NonFiniteFeatures", "first_non_finite_row"]


class NonFiniteFeatures(ValueError):
    """Features with a NaN or infinite value (a diverged or damaged model): no metric is computed from
    them (NaN scores would rank every gallery item alike and report R@1 100). The message names the row."""


def first_non_finite_row(feats: torch.Tensor) -> int:
    """Index of the first row of `feats` [N, D] holding a NaN or infinite value, or -1 (one device sync)."""
    bad = ~torch.isfinite(feats).reshape(feats.shape[0], -1).all(dim=1)
    return int(bad.float().argmax()) if bool(bad.any()) else -1

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when the `triton` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("backend='triton' but the triton package is not installed")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return True


def sdm_loss(text_feats, image_feats, pids, logit_scale=50.0, weights=None, *, text_cols=None,
             image_cols=None, col_pids=None, backend="auto"):
    """Per-sample SDM loss [b], float32: text->image plus image->text (docs/method.md §3).

    Rows: text_feats / image_feats [b, D] (fp32/fp16/bf16, un-normalised: L2-normalised inside),
    pids [b] int. Each text row is scored against the image columns and each image row against
    the text columns: text_cols / image_cols [B, D] with col_pids [B] (for data parallelism, the
    global batch gathered by the caller with autograd; it must contain every row's own partner);
    without columns the rows are their own columns. Row i of s·S (S = cosine similarity,
    s = logit_scale) gives p = softmax, q_ij = y_ij / Σ_j y_ij,
    ℓ_i = Σ_j p_ij (log p_ij − log(q_ij + 1e-8)). weights [b] multiply the losses (no gradient
    through them). No host synchronisation.
    """
    columns = dict(text_cols=text_cols, image_cols=image_cols, col_pids=col_pids)
    with exact_float32():
        if _use_triton(backend, text_feats, image_feats):
            from .sdm import sdm_loss_triton
            return sdm_loss_triton(text_feats, image_feats, pids, logit_scale, weights, **columns)
        return sdm_loss_reference(text_feats, image_feats, pids, logit_scale, weights, **columns)


def trl_loss(text_feats, image_feats, pids, tau=0.015, margin=0.1, weights=None, *, text_cols=None,
             image_cols=None, col_pids=None, backend="auto"):
    """Per-sample TRL loss [b], float32: text->image plus image->text (docs/method.md §3).

    ℓ_i = [m − Σ_{j∈P(i)} α_ij S_ij + τ·log Σ_{j∉P(i)} exp(S_ij/τ)]₊ per direction, α = softmax
    over the positives of S/τ (no gradient through α). A row with no negative (every column
    shares its pid) has τ·log 0 = −∞ inside the hinge: loss 0, no gradient (as in RDE). Rows,
    columns and weights as in `sdm_loss`.
    """
    columns = dict(text_cols=text_cols, image_cols=image_cols, col_pids=col_pids)
    with exact_float32():
        if _use_triton(backend, text_feats, image_feats):
            from .trl import trl_loss_triton
            return trl_loss_triton(text_feats, image_feats, pids, tau, margin, weights, **columns)
        return trl_loss_reference(text_feats, image_feats, pids, tau, margin, weights, **columns)


def retrieval_metrics(query_feats, gallery_feats, query_pids, gallery_pids, ks=DEFAULT_KS, per_query=False,
                      backend="auto"):
    """Text->image retrieval metrics by dot product, in percent (docs/method.md §8).

    Returns {"R<k>" for k in ks, "mAP", "mINP"}; per_query adds "AP", "INP" (fractions, NaN for
    queries without a match) and "first_rank" (1-based, 0 when no match) as CPU tensors [Nq].
    Ranking: descending score; an item with an equal score ranks after items with a smaller
    gallery index. AP = mean over the query's matches of precision at each match's rank;
    INP = #matches / rank of the last match. Queries with no match in the gallery count as
    misses in R@K and are left out of mAP/mINP (a warning gives their number).
    Never materialises the [Nq, Ng] score matrix and never sorts the gallery.
    NonFiniteFeatures (naming the first bad query or gallery row) when a feature is NaN or infinite.
    """
    for name, feats in (("query", query_feats), ("gallery", gallery_feats)):
        row = first_non_finite_row(feats)
        if row >= 0:
            raise NonFiniteFeatures(f"{name} row {row} of {feats.shape[0]} has non-finite features "
                                    f"({feats[row][~torch.isfinite(feats[row])][0].item()})")
    with exact_float32():
        if _use_triton(backend, query_feats, gallery_feats):
            from .retrieval import retrieval_metrics_triton
            return retrieval_metrics_triton(query_feats, gallery_feats, query_pids, gallery_pids, ks, per_query)
        return retrieval_metrics_reference(query_feats, gallery_feats, query_pids, gallery_pids, ks, per_query)
