"""Plain-PyTorch ground truth for the 3RTPR losses and retrieval metrics (docs/method.md §3, §8).

These functions are the CPU path used in training and evaluation and the oracle the Triton
kernels are tested against. They materialise the local [b, B] similarity matrix (fine for the
batch sizes a CPU trains with); the Triton kernels in `sdm.py` / `trl.py` never do.

Conventions shared by the losses
--------------------------------
* ``rows`` / ``cols``: for the text->image direction the rows are this rank's text features
  [b, D] and the columns are all image features [B, D] (under data parallelism: the gathered
  global batch); image->text swaps the roles. Without columns, columns = rows (b = B).
* Features are L2-normalised inside (in float32, or float64 when given float64), so
  S_ij = cos(row_i, col_j) in [-1, 1].
* y_ij = 1 when pid(row i) == pid(col j). Every row must have at least one positive column
  (the columns must contain each row's own partner, as a gathered global batch does); this is a
  precondition of the caller, not checked (checking it would cost a host sync per step).
* Results are per-sample losses [b] (both directions summed), float32 (float64 for float64
  input), multiplied by ``weights`` (detached) when given.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

SDM_EPS = 1e-8
"""The 1e-8 inside log(q_ij + 1e-8) of the SDM loss (IRRA's epsilon)."""

DEFAULT_KS = (1, 5, 10)


# ----------------------------------------------------------------------------- validation
def check_loss_inputs(text_feats, image_feats, pids, weights, text_cols, image_cols, col_pids):
    """Validate shapes of the loss inputs and fill in the columns.

    Returns (text_cols [B,D], image_cols [B,D], col_pids [B]); without columns these are the rows
    themselves (B = b). Raises ValueError naming the bad argument. Shape checks only: no host sync.
    """
    if text_feats.dim() != 2 or image_feats.dim() != 2:
        raise ValueError(f"text_feats and image_feats must be [b, D]; got {tuple(text_feats.shape)} "
                         f"and {tuple(image_feats.shape)}")
    if text_feats.shape != image_feats.shape:
        raise ValueError(f"text_feats {tuple(text_feats.shape)} and image_feats "
                         f"{tuple(image_feats.shape)} must have the same shape")
    b = text_feats.shape[0]
    if b == 0:
        raise ValueError("empty batch: text_feats has 0 rows")
    if pids.shape != (b,):
        raise ValueError(f"pids must be [b={b}]; got {tuple(pids.shape)}")
    if weights is not None and weights.shape != (b,):
        raise ValueError(f"weights must be [b={b}]; got {tuple(weights.shape)}")
    given = [x is not None for x in (text_cols, image_cols, col_pids)]
    if any(given) and not all(given):
        raise ValueError("columns need all three of text_cols, image_cols, col_pids")
    if not any(given):
        return text_feats, image_feats, pids
    if col_pids.dim() != 1:
        raise ValueError(f"col_pids must be [B]; got {tuple(col_pids.shape)}")
    big_b = col_pids.shape[0]
    for name, t in (("text_cols", text_cols), ("image_cols", image_cols)):
        if t.shape != (big_b, text_feats.shape[1]):
            raise ValueError(f"{name} must be [B={big_b}, D={text_feats.shape[1]}]; got {tuple(t.shape)}")
    return text_cols, image_cols, col_pids


def normalize_features(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in float32 (float64 stays float64). [N, D] -> [N, D]."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.normalize(x.to(dtype), dim=-1)


# ----------------------------------------------------------------------------- SDM
def sdm_direction_reference(rows: torch.Tensor, cols: torch.Tensor, row_pids: torch.Tensor,
                            col_pids: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """One SDM direction on normalised features: rows [b,D], cols [B,D] -> loss [b].

    ℓ_i = Σ_j p_ij (log p_ij − log(q_ij + 1e-8)), p = softmax_j(s·S_ij), q_ij = y_ij / Σ_j y_ij.
    """
    logits = logit_scale * rows @ cols.t()
    labels = (row_pids[:, None] == col_pids[None, :]).to(logits.dtype)
    q = labels / labels.sum(dim=1, keepdim=True)
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(q + SDM_EPS))).sum(dim=1)


def _both_directions(direction, text_feats, image_feats, pids, weights, text_cols, image_cols, col_pids,
                     **hyper) -> torch.Tensor:
    """direction(rows, cols, row_pids, col_pids, **hyper) for text->image plus image->text, per local
    sample [b], on L2-normalised features in float32 (also under mixed precision), then weighted."""
    all_t, all_v, all_p = check_loss_inputs(text_feats, image_feats, pids, weights, text_cols, image_cols,
                                            col_pids)
    pids = pids.to(text_feats.device)
    all_p = pids if col_pids is None else all_p.to(text_feats.device)
    with torch.autocast(text_feats.device.type, enabled=False):
        t, v = normalize_features(text_feats), normalize_features(image_feats)
        at = t if all_t is text_feats else normalize_features(all_t)
        av = v if all_v is image_feats else normalize_features(all_v)
        loss = direction(t, av, pids, all_p, **hyper) + direction(v, at, pids, all_p, **hyper)
    return _apply_weights(loss, weights)


def sdm_loss_reference(text_feats, image_feats, pids, logit_scale=50.0, weights=None, *,
                       text_cols=None, image_cols=None, col_pids=None):
    """Per-sample SDM loss [b] (text->image + image->text), see `kernels.sdm_loss`."""
    return _both_directions(sdm_direction_reference, text_feats, image_feats, pids, weights, text_cols,
                            image_cols, col_pids, logit_scale=logit_scale)


# ----------------------------------------------------------------------------- TRL
def trl_direction_reference(rows: torch.Tensor, cols: torch.Tensor, row_pids: torch.Tensor,
                            col_pids: torch.Tensor, tau: float, margin: float) -> torch.Tensor:
    """One TRL direction on normalised features: rows [b,D], cols [B,D] -> loss [b].

    ℓ_i = [m − Σ_{j∈P(i)} α_ij S_ij + τ·log Σ_{j∉P(i)} exp(S_ij/τ)]₊ with
    α_i· = softmax over P(i) of S_i·/τ, detached. A row without negatives (every column shares
    its pid) has an empty log-sum-exp (−∞), so its loss is 0 with no gradient (RDE's loss too).
    """
    sims = rows @ cols.t()
    positive = row_pids[:, None] == col_pids[None, :]
    scaled = sims / tau
    alpha = torch.softmax(scaled.detach().masked_fill(~positive, float("-inf")), dim=1)
    pos_term = (alpha * sims).sum(dim=1)
    has_neg = (~positive).any(dim=1)
    # Rows with no negative get finite dummy logits so that the unused branch has no NaN gradient.
    neg_logits = scaled.masked_fill(positive, float("-inf")).masked_fill(~has_neg[:, None], 0.0)
    hinge = torch.relu(margin - pos_term + tau * torch.logsumexp(neg_logits, dim=1))
    return torch.where(has_neg, hinge, torch.zeros_like(hinge))


def trl_loss_reference(text_feats, image_feats, pids, tau=0.015, margin=0.1, weights=None, *,
                       text_cols=None, image_cols=None, col_pids=None):
    """Per-sample TRL loss [b] (text->image + image->text), see `kernels.trl_loss`."""
    return _both_directions(trl_direction_reference, text_feats, image_feats, pids, weights, text_cols,
                            image_cols, col_pids, tau=tau, margin=margin)


def _apply_weights(loss: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        return loss
    return loss * weights.detach().to(device=loss.device, dtype=loss.dtype)


# ----------------------------------------------------------------------------- retrieval
def check_retrieval_inputs(query_pids: torch.Tensor, gallery_pids: torch.Tensor, n_queries: int,
                           n_gallery: int, ks: Sequence[int]):
    """Validate pid vectors and ks for the retrieval metrics (ValueError naming what is wrong)."""
    if query_pids.shape != (n_queries,):
        raise ValueError(f"query_pids must be [Nq={n_queries}]; got {tuple(query_pids.shape)}")
    if gallery_pids.shape != (n_gallery,):
        raise ValueError(f"gallery_pids must be [Ng={n_gallery}]; got {tuple(gallery_pids.shape)}")
    if n_queries == 0 or n_gallery == 0:
        raise ValueError(f"empty retrieval problem: {n_queries} queries, {n_gallery} gallery items")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive ranks; got {tuple(ks)}")


class GalleryByPid:
    """The gallery regrouped by pid so that each query's matches are one contiguous range.

    order [Ng]      gallery indices sorted by pid (stable: ascending index within a pid)
    match_start [Nq] first position (in `order`) of the query's pid, match_count [Nq] its size
    (0 when the pid is absent from the gallery).
    """

    def __init__(self, query_pids: torch.Tensor, gallery_pids: torch.Tensor):
        gallery_pids = gallery_pids.to(torch.int64)
        query_pids = query_pids.to(device=gallery_pids.device, dtype=torch.int64)
        sorted_pids, self.order = torch.sort(gallery_pids, stable=True)
        self.match_start = torch.searchsorted(sorted_pids, query_pids, right=False)
        self.match_count = torch.searchsorted(sorted_pids, query_pids, right=True) - self.match_start
        self.max_matches = int(self.match_count.max().item())

    def match_indices(self, query_slice: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Gallery indices of the matches of queries[query_slice]: ([q, M] long, valid [q, M] bool)."""
        start = self.match_start[query_slice]
        count = self.match_count[query_slice]
        slot = torch.arange(max(self.max_matches, 1), device=start.device)
        valid = slot[None, :] < count[:, None]
        pos = torch.where(valid, start[:, None] + slot[None, :], torch.zeros_like(slot)[None, :])
        pos = pos.clamp(max=self.order.numel() - 1)
        return self.order[pos], valid


def count_items_ranked_above(scores: torch.Tensor, match_idx: torch.Tensor,
                             valid: torch.Tensor) -> torch.Tensor:
    """For each match, the number of gallery items ranked above it (torch, no sort).

    scores [q, Ng]; match_idx/valid [q, M]. An item k ranks above match j when
    score_k > score_j, or score_k == score_j and k < j (stable tie rule). Returns int64 [q, M]
    (0 in invalid slots).

    One pass over sign(score_k − score_j) [q, M, Ng] gives, per match, S1 = #greater − #smaller
    and S2 = #greater + #smaller, so #greater = (S1 + S2) / 2 and #equal = Ng − S2 (float sums of
    ±1 are exact below 2²⁴ items; float64 is used above). Only matches that tie with another
    item (#equal > 1) take a second, exact pass for the tie rule.
    """
    n_gallery = scores.shape[1]
    dtype = scores.dtype if n_gallery < 2**24 else torch.float64
    match_scores = scores.gather(1, match_idx)                          # [q, M]
    sign = torch.sign(scores.to(dtype)[:, None, :] - match_scores.to(dtype)[:, :, None])
    s1, s2 = sign.sum(dim=-1), sign.abs_().sum(dim=-1)
    above = ((s1 + s2) / 2).round().to(torch.int64)
    tied = valid & ((n_gallery - s2) > 1.5)
    if bool(tied.any()):
        rows, slots = tied.nonzero(as_tuple=True)
        gallery_index = torch.arange(n_gallery, device=scores.device)
        same = scores[rows] == match_scores[rows, slots][:, None]
        before = gallery_index[None, :] < match_idx[rows, slots][:, None]
        above[rows, slots] += (same & before).sum(dim=1)
    return torch.where(valid, above, torch.zeros_like(above))


def metrics_from_match_ranks(match_ranks: torch.Tensor, valid: torch.Tensor, ks=DEFAULT_KS,
                             per_query: bool = False) -> dict:
    """R@K, mAP, mINP (percent) from the 1-based ranks of every query's matches.

    match_ranks/valid [Nq, M] (any order within a row). Queries without any match count as a
    miss in R@K and are left out of mAP/mINP (a warning gives their number). per_query adds
    "AP", "INP" (fractions, NaN for no-match queries) and "first_rank" (1-based, 0 = no match),
    each a float64/int64 CPU tensor [Nq].
    """
    match_ranks = match_ranks.to(torch.float64)
    n_match = valid.sum(dim=1)
    big = torch.finfo(torch.float64).max
    ranks = torch.where(valid, match_ranks, torch.full_like(match_ranks, big)).sort(dim=1).values
    ordinal = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64, device=ranks.device)
    sorted_valid = torch.arange(ranks.shape[1], device=ranks.device)[None, :] < n_match[:, None]
    precision = torch.where(sorted_valid, ordinal[None, :] / ranks, torch.zeros_like(ranks))
    has_match = n_match > 0
    n_safe = n_match.clamp(min=1).to(torch.float64)
    ap = precision.sum(dim=1) / n_safe
    last = torch.where(sorted_valid, ranks, torch.zeros_like(ranks)).max(dim=1).values
    inp = n_safe / last.clamp(min=1)
    first = torch.where(has_match, ranks[:, 0], torch.full_like(ranks[:, 0], math.inf))
    return summarize_queries(first, ap, inp, has_match, ks, per_query)


def summarize_queries(first: torch.Tensor, ap: torch.Tensor, inp: torch.Tensor, has_match: torch.Tensor,
                      ks=DEFAULT_KS, per_query: bool = False) -> dict:
    """The metrics dict from per-query figures, each [Nq]: first match rank (1-based, inf = none),
    AP and INP (fractions), has_match (bool). R@K over all queries, mAP/mINP over those with a match."""
    out = {f"R{int(k)}": float((first <= k).to(torch.float64).mean().item() * 100.0) for k in ks}
    n_missing = int((~has_match).sum().item())
    if n_missing:
        warnings.warn(f"{n_missing} of {has_match.numel()} queries have no match in the gallery: "
                      "counted as misses in R@K, left out of mAP/mINP", stacklevel=3)
    if n_missing == has_match.numel():
        out["mAP"] = out["mINP"] = float("nan")
    else:
        out["mAP"] = float(ap[has_match].mean().item() * 100.0)
        out["mINP"] = float(inp[has_match].mean().item() * 100.0)
    if per_query:
        nan = torch.full_like(ap, math.nan)
        out["AP"] = torch.where(has_match, ap, nan).cpu()
        out["INP"] = torch.where(has_match, inp, nan).cpu()
        out["first_rank"] = torch.where(has_match, first, torch.zeros_like(first)).to(torch.int64).cpu()
    return out


def _query_block_size(n_gallery: int, max_matches: int, budget: int = 1 << 22) -> int:
    """Queries per chunk so that the [q, M, Ng] comparison block stays near `budget` elements."""
    return max(1, min(4096, budget // max(n_gallery * max(max_matches, 1), 1)))


def retrieval_metrics_reference(query_feats: torch.Tensor, gallery_feats: torch.Tensor,
                                query_pids: torch.Tensor, gallery_pids: torch.Tensor, ks=DEFAULT_KS,
                                per_query: bool = False, query_block: Optional[int] = None) -> dict:
    """Chunked retrieval metrics: queries in blocks, one matmul + rank counting per block.

    query_feats [Nq,D], gallery_feats [Ng,D] scored by dot product (float32 unless float64);
    never sorts the gallery and never holds more than one [query_block, Ng] score block.
    """
    check_retrieval_inputs(query_pids, gallery_pids, query_feats.shape[0], gallery_feats.shape[0], ks)
    if query_feats.dim() != 2 or gallery_feats.dim() != 2 or query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"query_feats {tuple(query_feats.shape)} and gallery_feats "
                         f"{tuple(gallery_feats.shape)} must be [N, D] with the same D")
    dtype = torch.float64 if query_feats.dtype == torch.float64 else torch.float32
    q_all = query_feats.to(dtype)
    g_t = gallery_feats.to(dtype).t().contiguous()
    grouping = GalleryByPid(query_pids.to(gallery_feats.device), gallery_pids.to(gallery_feats.device))
    n_q = q_all.shape[0]
    block = query_block or _query_block_size(g_t.shape[1], grouping.max_matches)
    ranks, valids = [], []
    for start in range(0, n_q, block):
        part = slice(start, min(start + block, n_q))
        with torch.autocast(g_t.device.type, enabled=False):     # exact float32 scores under mixed precision
            scores = q_all[part].to(g_t.device) @ g_t
        match_idx, valid = grouping.match_indices(part)
        ranks.append(count_items_ranked_above(scores, match_idx, valid) + 1)
        valids.append(valid)
    return metrics_from_match_ranks(torch.cat(ranks), torch.cat(valids), ks, per_query)


def retrieval_metrics_from_scores(scores: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor,
                                  ks=DEFAULT_KS, per_query: bool = False) -> dict:
    """Sort-based metrics from a full score matrix [Nq, Ng] (the IRRA protocol; the test oracle).

    Each row is sorted descending with a stable sort (equal scores keep ascending gallery index).
    Same outputs and no-match rule as `metrics_from_match_ranks`.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [Nq, Ng]; got {tuple(scores.shape)}")
    check_retrieval_inputs(query_pids, gallery_pids, scores.shape[0], scores.shape[1], ks)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    matches = (gallery_pids.to(scores.device)[order] == query_pids.to(scores.device)[:, None])
    n_match = matches.sum(dim=1)
    has_match = n_match > 0
    hits = matches.cumsum(dim=1)
    position = torch.arange(1, scores.shape[1] + 1, device=scores.device, dtype=torch.float64)
    ap = ((hits.to(torch.float64) / position) * matches).sum(dim=1) / n_match.clamp(min=1)
    last = (matches * position).max(dim=1).values
    inp = n_match.to(torch.float64) / last.clamp(min=1)
    first = torch.where(has_match, matches.to(torch.float64).argmax(dim=1).to(torch.float64) + 1,
                        torch.full_like(ap, math.inf))
    return summarize_queries(first, ap, inp, has_match, ks, per_query)
