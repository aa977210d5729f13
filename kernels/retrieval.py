r"""Retrieval metrics in Triton without the [Nq, Ng] score matrix and without sorting the gallery.

Protocol (METHOD.md §8): a query's gallery ranking is by descending dot product; an item with
an equal score ranks after items with a smaller gallery index. Every metric follows from the
1-based ranks of the query's matches:

    rank(j) = 1 + #{k : s_k > s_j} + #{k : s_k = s_j, k < j}

so the kernel only COUNTS, tile by tile, how many gallery items rank above each match.

Layout: the gallery is regrouped by pid (stable), so the matches of a query are one contiguous
range [start, start + count) of the regrouped gallery; queries are also sorted by pid, so the
matches of a block of queries lie in a few neighbouring gallery tiles. Each program owns
BLOCK_Q queries and runs two passes:

  A. over the gallery tiles spanning its queries' matches: read each match's score out of the
     same tile computation used in pass B (bit-identical scores, so a match never outranks
     itself through rounding);
  B. over the whole gallery: for each match slot j, count items ranking above match j.

Memory: O(Nq·M) counts (M = largest number of matches of a query, processed in windows of
`SLOT_WINDOW` slots) plus the regrouped copies of the features. Metrics are then computed by
`reference.metrics_from_match_ranks`, exactly as on the CPU path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import DEFAULT_KS, GalleryByPid, check_retrieval_inputs, metrics_from_match_ranks
from .similarity_tiles import INTERPRETED, dot_settings, kernel_dtype, similarity_tile

SLOT_WINDOW = 32
"""Match slots handled per launch (a query with more matches is finished by further launches)."""


@triton.jit
def _count_above_kernel(Q, G, G_ORIGINAL, MATCH_START, MATCH_COUNT, SPAN_LO, SPAN_HI, ABOVE,
                        n_queries, n_gallery, D, slot_base, n_slots, above_stride,
                        BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                        SLOTS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    block = tl.program_id(0)
    queries = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = queries < n_queries
    start = tl.load(MATCH_START + queries, mask=q_mask, other=0)
    count = tl.load(MATCH_COUNT + queries, mask=q_mask, other=0)
    slot = tl.arange(0, SLOTS)
    slot_valid = (slot[None, :] < n_slots) & ((slot_base + slot)[None, :] < count[:, None]) & q_mask[:, None]
    match_pos = start[:, None] + slot_base + slot[None, :]
    match_original = tl.load(G_ORIGINAL + match_pos, mask=slot_valid, other=0)

    # Pass A: the matches' scores, taken from the very tiles pass B computes.
    match_score = tl.zeros((BLOCK_Q, SLOTS), dtype=tl.float32)
    span_lo = tl.load(SPAN_LO + block)
    span_hi = tl.load(SPAN_HI + block)
    for g0 in range((span_lo // BLOCK_G) * BLOCK_G, span_hi, BLOCK_G):
        items = g0 + tl.arange(0, BLOCK_G)
        g_mask = items < n_gallery
        s = similarity_tile(Q, G, queries, items, q_mask, g_mask, D,
                            BLOCK_Q, BLOCK_G, BLOCK_D, UPCAST, PRECISION)
        for j in range(0, n_slots):
            is_match = items[None, :] == (start + slot_base + j)[:, None]
            value = tl.sum(tl.where(is_match, s, 0.0), axis=1)
            match_score += tl.where(slot[None, :] == j, value[:, None], 0.0)

    # Pass B: for each match, count the gallery items ranked above it.
    above = tl.zeros((BLOCK_Q, SLOTS), dtype=tl.int32)
    for g0 in range(0, n_gallery, BLOCK_G):
        items = g0 + tl.arange(0, BLOCK_G)
        g_mask = items < n_gallery
        item_original = tl.load(G_ORIGINAL + items, mask=g_mask, other=0)
        s = similarity_tile(Q, G, queries, items, q_mask, g_mask, D,
                            BLOCK_Q, BLOCK_G, BLOCK_D, UPCAST, PRECISION)
        for j in range(0, n_slots):
            in_slot = slot[None, :] == j
            ms = tl.sum(tl.where(in_slot, match_score, 0.0), axis=1)
            mo = tl.sum(tl.where(in_slot, match_original, 0), axis=1)
            higher = (s > ms[:, None]) | ((s == ms[:, None]) & (item_original[None, :] < mo[:, None]))
            not_self = items[None, :] != (start + slot_base + j)[:, None]
            higher = higher & not_self & g_mask[None, :]
            above += tl.where(in_slot, tl.sum(higher.to(tl.int32), axis=1)[:, None], 0)

    out = ABOVE + queries.to(tl.int64)[:, None] * above_stride + slot_base + slot[None, :]
    tl.store(out, above, mask=slot_valid)


def gpu_retrieval_blocks(dtype: torch.dtype, n_queries: int) -> tuple[int, int, int, int]:
    """Fixed GPU (BLOCK_Q, BLOCK_G, BLOCK_D, num_warps): no register spills on sm_90 (8 warps, D in
    chunks of 32); 64-query blocks for fp16/bf16 on large query sets, 32 otherwise (more programs
    for small sets; float32's FMA dot needs the smaller tile)."""
    half = dtype in (torch.float16, torch.bfloat16)
    return (64 if half and n_queries >= 16384 else 32), 128, 32, 8


def match_ranks_triton(query_feats, gallery_feats, query_pids, gallery_pids, block_sizes=None):
    """1-based ranks of every query's matches: (ranks int64 [Nq, M], valid bool [Nq, M]).

    block_sizes = (BLOCK_Q, BLOCK_G, BLOCK_D, num_warps) overrides the fixed configuration.
    """
    device = query_feats.device
    dtype = kernel_dtype(query_feats.dtype)
    query_pids = query_pids.to(device=device, dtype=torch.int64)
    gallery_pids = gallery_pids.to(device=device, dtype=torch.int64)
    grouping = GalleryByPid(query_pids, gallery_pids)
    query_order = torch.sort(query_pids, stable=True).indices
    q = query_feats.to(dtype)[query_order].contiguous()
    g = gallery_feats.to(dtype)[grouping.order].contiguous()
    g_original = grouping.order.to(torch.int32).contiguous()
    start = grouping.match_start[query_order].to(torch.int32).contiguous()
    count = grouping.match_count[query_order].to(torch.int32).contiguous()
    n_q, dim = q.shape
    n_g = g.shape[0]
    if block_sizes is None and INTERPRETED:      # big blocks: interpreter cost grows with loop trips
        block_q = max(16, min(64, triton.next_power_of_2(n_q)))
        block_g = max(16, min(128, triton.next_power_of_2(n_g)))
        block_d = max(16, min(128, triton.next_power_of_2(dim)))
        warps = 4
    elif block_sizes is None:
        block_q, block_g, block_d, warps = gpu_retrieval_blocks(dtype, n_q)
        block_d = min(block_d, max(16, triton.next_power_of_2(dim)))
    else:
        block_q, block_g, block_d, warps = block_sizes
    n_blocks = triton.cdiv(n_q, block_q)
    # Gallery span [lo, hi) holding the matches of each block of (pid-sorted) queries.
    padded = n_blocks * block_q - n_q
    has = count > 0
    lo = torch.where(has, start, torch.full_like(start, torch.iinfo(torch.int32).max))
    hi = torch.where(has, start + count, torch.zeros_like(start))
    span_lo = torch.nn.functional.pad(lo, (0, padded), value=torch.iinfo(torch.int32).max)
    span_hi = torch.nn.functional.pad(hi, (0, padded), value=0)
    span_lo = span_lo.view(n_blocks, block_q).min(dim=1).values.contiguous()
    span_hi = span_hi.view(n_blocks, block_q).max(dim=1).values.contiguous()
    max_matches = max(grouping.max_matches, 1)
    above = torch.zeros(n_q, max_matches, device=device, dtype=torch.int32)
    upcast, precision = dot_settings(dtype)
    for slot_base in range(0, max_matches, SLOT_WINDOW):
        n_slots = min(SLOT_WINDOW, max_matches - slot_base)
        _count_above_kernel[(n_blocks,)](
            q, g, g_original, start, count, span_lo, span_hi, above, n_q, n_g, dim, slot_base, n_slots,
            max_matches, BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_D=block_d,
            SLOTS=max(2, triton.next_power_of_2(n_slots)), UPCAST=upcast, PRECISION=precision,
            num_warps=warps)
    valid = torch.arange(max_matches, device=device)[None, :] < count[:, None]
    ranks = torch.empty_like(above, dtype=torch.int64)
    ranks[query_order] = above.to(torch.int64) + 1
    valid_out = torch.empty_like(valid)
    valid_out[query_order] = valid
    return ranks, valid_out


def retrieval_metrics_triton(query_feats, gallery_feats, query_pids, gallery_pids, ks=DEFAULT_KS,
                             per_query=False, block_sizes=None):
    """`kernels.retrieval_metrics` with the Triton rank-counting kernel (CUDA or interpreter)."""
    check_retrieval_inputs(query_pids, gallery_pids, query_feats.shape[0], gallery_feats.shape[0], ks)
    if query_feats.dim() != 2 or gallery_feats.dim() != 2 or query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"query_feats {tuple(query_feats.shape)} and gallery_feats "
                         f"{tuple(gallery_feats.shape)} must be [N, D] with the same D")
    ranks, valid = match_ranks_triton(query_feats, gallery_feats, query_pids, gallery_pids, block_sizes)
    return metrics_from_match_ranks(ranks, valid, ks, per_query)
