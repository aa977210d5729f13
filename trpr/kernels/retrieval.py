r"""Retrieval metrics in Triton: rank counting without sorting the gallery.

Protocol (docs/method.md §8): a query's gallery ranking is by descending dot product; an item with
an equal score ranks after items with a smaller gallery index. Every metric follows from the
1-based ranks of the query's matches:

    rank(j) = 1 + #{k : s_k > s_j} + #{k : s_k = s_j, k < j}

so the kernels only COUNT, for each match, the gallery items ranked above it. Two kernels:

* `_rank_count_slab_kernel` (float32/float64 features): cuBLAS computes the scores of a chunk
  of queries [q, Ng] (`SCORE_SLAB_BYTES`; at CUHK-PEDES size one chunk, the very product the
  sort baseline computes, so the scores are bit-identical to it); one program per query reads
  its matches' scores out of the slab, then streams its row once, comparing every score with
  every match score; counts accumulate per element in registers and are reduced once. On a GPU
  the float32 product runs on the FMA units and dominates; one slab write + read is cheap.
* `_rank_count_fused_kernel` (fp16/bf16 features): the slab would cost more memory traffic than
  the tensor-core product itself (10⁵ × 10⁶ fp32 scores = 400 GB each way), so the kernel
  computes score tiles with `tl.dot` (wgmma) and counts in the epilogue; nothing of size Nq × Ng
  is written. The gallery and the queries are regrouped by pid so that the matches of a block
  of queries lie in a few neighbouring gallery tiles: pass A computes those tiles and picks each
  match's score out of them (bit-identical to the score pass B computes for the same pair, the
  same `similarity_tile` code), pass B streams the whole gallery and counts: per tile and match
  slot one compare + one in-warp reduction; the slots are separate register vectors (unrolled
  at compile time, no dynamic indexing).

Both handle up to `MAX_SLOTS` matches per query and launch (more take further launches) and
skip a gallery tile none of whose scores reaches the lowest match score of its queries, after
one max-reduction. The metrics are then computed by `reference.metrics_from_match_ranks`,
exactly as on the CPU path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import DEFAULT_KS, GalleryByPid, check_retrieval_inputs, metrics_from_match_ranks
from .similarity_tiles import INTERPRETED, dot_settings, similarity_tile

MAX_SLOTS = 8
"""Match slots per launch; a query with more matches is finished by further launches."""

SCORE_SLAB_BYTES = 1 << 29
"""Bytes of one [query chunk, Ng] score slab in score-slab mode (512 MiB)."""

FUSED_DTYPES = (torch.float16, torch.bfloat16)
"""Feature dtypes that take the fused tensor-core path; all others use the score slab."""


@triton.jit
def _slot(MATCH_POS, queries, q_mask, count, match_stride, slot_base, j: tl.constexpr):
    """(gallery position of the query's match in slot slot_base + j, whether the slot holds a match)."""
    valid = q_mask & (slot_base + j < count)
    pos = tl.load(MATCH_POS + queries.to(tl.int64) * match_stride + slot_base + j, mask=valid, other=-1)
    return pos, valid


@triton.jit
def _higher(s, item_original, match_score, match_original):
    """Items ranked above the match: a higher score, or an equal score and a smaller original index.
    An empty slot has match_score = +inf (nothing above it); masked items carry s = −inf."""
    return (s > match_score) | ((s == match_score) & (item_original < match_original))


@triton.jit
def _empty_slot(score, valid):
    return tl.where(valid, score, float("inf"))


@triton.jit
def _rank_count_slab_kernel(SCORES, MATCH_POS, MATCH_COUNT, ABOVE, query_offset, n_gallery, slot_base,
                            match_stride, SLOTS: tl.constexpr, BLOCK_G: tl.constexpr):
    """Score-slab mode: one program per query (row of SCORES [n, Ng], global query query_offset + row).

    ABOVE[q, slot_base + j] = #items ranked above the query's match j, for j < SLOTS (a power of
    two; slots past the query's matches are empty). Positions are original gallery indices. Counts
    accumulate per element in registers ([SLOTS, BLOCK_G] int32, every slot of an item in the
    same thread) and are reduced once at the end; a tile below every match score is skipped.
    """
    row = tl.program_id(0)
    query = query_offset + row
    scores = SCORES + row.to(tl.int64) * n_gallery
    slots = slot_base + tl.arange(0, SLOTS)
    in_use = slots < tl.load(MATCH_COUNT + query)
    pos = tl.load(MATCH_POS + query.to(tl.int64) * match_stride + slots, mask=in_use, other=0)
    match_score = _empty_slot(tl.load(scores + pos, mask=in_use, other=0.0), in_use)
    threshold = tl.min(match_score, axis=0)
    above = tl.zeros((SLOTS, BLOCK_G), tl.int32)
    for g0 in range(0, n_gallery, BLOCK_G):
        items = g0 + tl.arange(0, BLOCK_G)[None, :]
        s = tl.load(scores + items, mask=items < n_gallery, other=float("-inf"))        # [1, BLOCK_G]
        if tl.max(tl.max(s, axis=1), axis=0) >= threshold:
            above += _higher(s, items, match_score[:, None], pos[:, None]).to(tl.int32)
    tl.store(ABOVE + query.to(tl.int64) * match_stride + slots, tl.sum(above, axis=1), mask=in_use)


@triton.jit
def _rank_count_fused_kernel(Q, G, G_ORIGINAL, MATCH_POS, MATCH_COUNT, SPAN_LO, SPAN_HI, ABOVE,
                             n_queries, n_gallery, D, slot_base, match_stride,
                             SLOTS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr,
                             BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Fused mode: ABOVE[q, slot_base + j] for BLOCK_Q (pid-sorted) queries, j < SLOTS, scores from
    Q [Nq, D] and the pid-regrouped gallery G [Ng, D]; G_ORIGINAL maps positions to original
    indices. Pass A picks the match scores out of the tiles spanning SPAN_LO..SPAN_HI; pass B
    counts (one reduction per tile and slot, within a warp: each warp owns 16 query rows)."""
    block = tl.program_id(0)
    queries = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = queries < n_queries
    count = tl.load(MATCH_COUNT + queries, mask=q_mask, other=0)
    pos0, ok0 = _slot(MATCH_POS, queries, q_mask, count, match_stride, slot_base, 0)
    ms0 = tl.zeros((BLOCK_Q,), tl.float32)
    if SLOTS > 1:
        pos1, ok1 = _slot(MATCH_POS, queries, q_mask, count, match_stride, slot_base, 1)
        ms1 = tl.zeros((BLOCK_Q,), tl.float32)
    if SLOTS > 2:
        pos2, ok2 = _slot(MATCH_POS, queries, q_mask, count, match_stride, slot_base, 2)
        ms2 = tl.zeros((BLOCK_Q,), tl.float32)
    if SLOTS > 3:
        pos3, ok3 = _slot(MATCH_POS, queries, q_mask, count, match_stride, slot_base, 3)
        ms3 = tl.zeros((BLOCK_Q,), tl.float32)
    if SLOTS > 4:
        pos4, ok4 = _slot(MATCH_POS, queries, q_mask, count, match_stride, slot_base, 4)
        ms4 = tl.zeros((BLOCK_Q,), tl.float32)
    if SLOTS > 5:
        pos5, ok5 = _slot(MATCH_POS, queries, q_mask, count, match_stride, slot_base, 5)
        ms5 = tl.zeros((BLOCK_Q,), tl.float32)
    if SLOTS > 6:
        pos6, ok6 = _slot(MATCH_POS, queries, q_mask, count, match_stride, slot_base, 6)
        ms6 = tl.zeros((BLOCK_Q,), tl.float32)
    if SLOTS > 7:
        pos7, ok7 = _slot(MATCH_POS, queries, q_mask, count, match_stride, slot_base, 7)
        ms7 = tl.zeros((BLOCK_Q,), tl.float32)
    span_lo = tl.load(SPAN_LO + block)
    span_hi = tl.load(SPAN_HI + block)
    for g0 in range((span_lo // BLOCK_G) * BLOCK_G, span_hi, BLOCK_G):          # pass A
        items = g0 + tl.arange(0, BLOCK_G)
        s = similarity_tile(Q, G, queries, items, q_mask, items < n_gallery, D,
                            BLOCK_Q, BLOCK_G, BLOCK_D, UPCAST, PRECISION)
        ms0 += tl.sum(tl.where(items[None, :] == pos0[:, None], s, 0.0), axis=1)
        if SLOTS > 1:
            ms1 += tl.sum(tl.where(items[None, :] == pos1[:, None], s, 0.0), axis=1)
        if SLOTS > 2:
            ms2 += tl.sum(tl.where(items[None, :] == pos2[:, None], s, 0.0), axis=1)
        if SLOTS > 3:
            ms3 += tl.sum(tl.where(items[None, :] == pos3[:, None], s, 0.0), axis=1)
        if SLOTS > 4:
            ms4 += tl.sum(tl.where(items[None, :] == pos4[:, None], s, 0.0), axis=1)
        if SLOTS > 5:
            ms5 += tl.sum(tl.where(items[None, :] == pos5[:, None], s, 0.0), axis=1)
        if SLOTS > 6:
            ms6 += tl.sum(tl.where(items[None, :] == pos6[:, None], s, 0.0), axis=1)
        if SLOTS > 7:
            ms7 += tl.sum(tl.where(items[None, :] == pos7[:, None], s, 0.0), axis=1)
    ms0 = _empty_slot(ms0, ok0)
    mo0 = tl.load(G_ORIGINAL + pos0, mask=ok0, other=0)[:, None]
    above0 = tl.zeros((BLOCK_Q,), tl.int32)
    if SLOTS > 1:
        ms1 = _empty_slot(ms1, ok1)
        mo1 = tl.load(G_ORIGINAL + pos1, mask=ok1, other=0)[:, None]
        above1 = tl.zeros((BLOCK_Q,), tl.int32)
    if SLOTS > 2:
        ms2 = _empty_slot(ms2, ok2)
        mo2 = tl.load(G_ORIGINAL + pos2, mask=ok2, other=0)[:, None]
        above2 = tl.zeros((BLOCK_Q,), tl.int32)
    if SLOTS > 3:
        ms3 = _empty_slot(ms3, ok3)
        mo3 = tl.load(G_ORIGINAL + pos3, mask=ok3, other=0)[:, None]
        above3 = tl.zeros((BLOCK_Q,), tl.int32)
    if SLOTS > 4:
        ms4 = _empty_slot(ms4, ok4)
        mo4 = tl.load(G_ORIGINAL + pos4, mask=ok4, other=0)[:, None]
        above4 = tl.zeros((BLOCK_Q,), tl.int32)
    if SLOTS > 5:
        ms5 = _empty_slot(ms5, ok5)
        mo5 = tl.load(G_ORIGINAL + pos5, mask=ok5, other=0)[:, None]
        above5 = tl.zeros((BLOCK_Q,), tl.int32)
    if SLOTS > 6:
        ms6 = _empty_slot(ms6, ok6)
        mo6 = tl.load(G_ORIGINAL + pos6, mask=ok6, other=0)[:, None]
        above6 = tl.zeros((BLOCK_Q,), tl.int32)
    if SLOTS > 7:
        ms7 = _empty_slot(ms7, ok7)
        mo7 = tl.load(G_ORIGINAL + pos7, mask=ok7, other=0)[:, None]
        above7 = tl.zeros((BLOCK_Q,), tl.int32)
    threshold = ms0
    if SLOTS > 1:
        threshold = tl.minimum(threshold, ms1)
    if SLOTS > 2:
        threshold = tl.minimum(threshold, ms2)
    if SLOTS > 3:
        threshold = tl.minimum(threshold, ms3)
    if SLOTS > 4:
        threshold = tl.minimum(threshold, ms4)
    if SLOTS > 5:
        threshold = tl.minimum(threshold, ms5)
    if SLOTS > 6:
        threshold = tl.minimum(threshold, ms6)
    if SLOTS > 7:
        threshold = tl.minimum(threshold, ms7)
    for g0 in range(0, n_gallery, BLOCK_G):                                        # pass B
        items = g0 + tl.arange(0, BLOCK_G)
        g_mask = items < n_gallery
        s = similarity_tile(Q, G, queries, items, q_mask, g_mask, D,
                            BLOCK_Q, BLOCK_G, BLOCK_D, UPCAST, PRECISION)
        s = tl.where(g_mask[None, :], s, float("-inf"))
        if tl.max(tl.max(s, axis=1) - threshold, axis=0) >= 0.0:
            item_original = tl.load(G_ORIGINAL + items, mask=g_mask, other=0)[None, :]
            above0 += tl.sum(_higher(s, item_original, ms0[:, None], mo0).to(tl.int32), axis=1)
            if SLOTS > 1:
                above1 += tl.sum(_higher(s, item_original, ms1[:, None], mo1).to(tl.int32), axis=1)
            if SLOTS > 2:
                above2 += tl.sum(_higher(s, item_original, ms2[:, None], mo2).to(tl.int32), axis=1)
            if SLOTS > 3:
                above3 += tl.sum(_higher(s, item_original, ms3[:, None], mo3).to(tl.int32), axis=1)
            if SLOTS > 4:
                above4 += tl.sum(_higher(s, item_original, ms4[:, None], mo4).to(tl.int32), axis=1)
            if SLOTS > 5:
                above5 += tl.sum(_higher(s, item_original, ms5[:, None], mo5).to(tl.int32), axis=1)
            if SLOTS > 6:
                above6 += tl.sum(_higher(s, item_original, ms6[:, None], mo6).to(tl.int32), axis=1)
            if SLOTS > 7:
                above7 += tl.sum(_higher(s, item_original, ms7[:, None], mo7).to(tl.int32), axis=1)
    out = ABOVE + queries.to(tl.int64) * match_stride + slot_base
    tl.store(out + 0, above0, mask=ok0)
    if SLOTS > 1:
        tl.store(out + 1, above1, mask=ok1)
    if SLOTS > 2:
        tl.store(out + 2, above2, mask=ok2)
    if SLOTS > 3:
        tl.store(out + 3, above3, mask=ok3)
    if SLOTS > 4:
        tl.store(out + 4, above4, mask=ok4)
    if SLOTS > 5:
        tl.store(out + 5, above5, mask=ok5)
    if SLOTS > 6:
        tl.store(out + 6, above6, mask=ok6)
    if SLOTS > 7:
        tl.store(out + 7, above7, mask=ok7)


def gpu_fused_blocks() -> tuple[int, int, int, int, int]:
    """Fixed GPU (BLOCK_Q, BLOCK_G, BLOCK_D, num_warps, num_stages) of the fused kernel.

    128 x 128 score tiles (wgmma 64x128x16 per warpgroup: 8 warps = two warpgroups, each warp
    owning 16 query rows, so a row's count reduces inside one warp), D in chunks of 64, 3
    cp.async stages of 2 x 16 KB operand tiles. Reads (128 + 128)·D·2 bytes per 2·128·128·D
    FLOP: 64 FLOP per byte of L2 traffic.
    """
    return 128, 128, 64, 8, 3


SLAB_BLOCK_G = 1024
"""Gallery items per tile in score-slab mode (8 fp32 per thread over 4 warps, 16-byte loads)."""


def _launch_windows(max_matches, launch):
    """launch(slot_base, n_slots) for each window of at most MAX_SLOTS match slots."""
    for slot_base in range(0, max_matches, MAX_SLOTS):
        launch(slot_base, min(MAX_SLOTS, max_matches - slot_base))


def _ranks_fused(query_feats, gallery_feats, query_pids, gallery_pids, block_sizes):
    """above [Nq, M] int32 (queries in input order) with the fused tensor-core kernel."""
    device = query_feats.device
    grouping = GalleryByPid(query_pids, gallery_pids)
    query_order = torch.sort(query_pids, stable=True).indices
    dtype = torch.float32 if INTERPRETED else query_feats.dtype      # the interpreter cannot load bf16
    q = query_feats.to(dtype)[query_order].contiguous()
    g = gallery_feats.to(dtype)[grouping.order].contiguous()
    g_original = grouping.order.to(torch.int32).contiguous()
    start = grouping.match_start[query_order].to(torch.int32)
    count = grouping.match_count[query_order].to(torch.int32).contiguous()
    n_q, dim = q.shape
    max_matches = max(grouping.max_matches, 1)
    match_pos = (start[:, None] + torch.arange(max_matches, device=device, dtype=torch.int32)[None, :]).contiguous()
    if block_sizes is not None:
        block_q, block_g, block_d, warps, stages = block_sizes
    elif INTERPRETED:       # as few programs and loop trips as the test shapes allow
        block_q, block_g = max(16, min(64, triton.next_power_of_2(n_q))), max(16, min(128, triton.next_power_of_2(g.shape[0])))
        block_d, warps, stages = max(16, min(128, triton.next_power_of_2(dim))), 4, 1
    else:
        block_q, block_g, block_d, warps, stages = gpu_fused_blocks()
        block_d = min(block_d, max(16, triton.next_power_of_2(dim)))
    n_blocks = triton.cdiv(n_q, block_q)
    # Gallery span [lo, hi) holding the matches of each block of (pid-sorted) queries.
    padded = n_blocks * block_q - n_q
    has = count > 0
    big = torch.iinfo(torch.int32).max
    lo = torch.nn.functional.pad(torch.where(has, start, torch.full_like(start, big)), (0, padded), value=big)
    hi = torch.nn.functional.pad(torch.where(has, start + count, torch.zeros_like(start)), (0, padded), value=0)
    span_lo = lo.view(n_blocks, block_q).min(dim=1).values.contiguous()
    span_hi = hi.view(n_blocks, block_q).max(dim=1).values.contiguous()
    above = torch.zeros(n_q, max_matches, device=device, dtype=torch.int32)
    upcast, precision = dot_settings(dtype)

    def launch(slot_base, n_slots):
        _rank_count_fused_kernel[(n_blocks,)](
            q, g, g_original, match_pos, count, span_lo, span_hi, above, n_q, g.shape[0], dim, slot_base,
            max_matches, SLOTS=n_slots, BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_D=block_d,
            UPCAST=upcast, PRECISION=precision, num_warps=warps, num_stages=stages)

    _launch_windows(max_matches, launch)
    out = torch.empty_like(above)
    out[query_order] = above
    return out, grouping.match_count


def _ranks_from_score_slabs(query_feats, gallery_feats, query_pids, gallery_pids, block_sizes):
    """above [Nq, M] int32 from cuBLAS score slabs (float64 features score in float64, others in float32)."""
    device = query_feats.device
    grouping = GalleryByPid(query_pids, gallery_pids)
    match_idx, valid = grouping.match_indices(slice(None))
    match_pos = torch.where(valid, match_idx, torch.zeros_like(match_idx)).to(torch.int32).contiguous()
    count = grouping.match_count.to(torch.int32).contiguous()
    dtype = torch.float64 if query_feats.dtype == torch.float64 else torch.float32
    q = query_feats.to(dtype)
    g_t = gallery_feats.to(dtype).t()
    n_q, n_g = q.shape[0], g_t.shape[1]
    max_matches = match_pos.shape[1]
    above = torch.zeros(n_q, max_matches, device=device, dtype=torch.int32)
    if block_sizes is not None:
        block_g, warps = block_sizes[1], block_sizes[3]
    else:
        block_g, warps = (max(16, min(SLAB_BLOCK_G, triton.next_power_of_2(n_g))), 4) if INTERPRETED else (SLAB_BLOCK_G, 4)
    chunk = max(1, SCORE_SLAB_BYTES // (n_g * q.element_size()))
    for start in range(0, n_q, chunk):
        stop = min(start + chunk, n_q)
        with torch.autocast(device.type, enabled=False):      # exact float32 scores under mixed precision
            scores = ((q if (start, stop) == (0, n_q) else q[start:stop]) @ g_t).contiguous()

        def launch(slot_base, n_slots):
            _rank_count_slab_kernel[(stop - start,)](
                scores, match_pos, count, above, start, n_g, slot_base, max_matches,
                SLOTS=triton.next_power_of_2(n_slots), BLOCK_G=block_g, num_warps=warps)

        _launch_windows(max_matches, launch)
    return above, grouping.match_count


def match_ranks_triton(query_feats, gallery_feats, query_pids, gallery_pids, block_sizes=None):
    """1-based ranks of every query's matches: (ranks int64 [Nq, M], valid bool [Nq, M]).

    fp16/bf16 features take the fused kernel, others the score-slab mode (see module docstring).
    block_sizes = (BLOCK_Q, BLOCK_G, BLOCK_D, num_warps, num_stages) overrides the fixed configuration
    (score-slab mode uses BLOCK_G and num_warps).
    """
    device = query_feats.device
    query_pids = query_pids.to(device=device, dtype=torch.int64)
    gallery_pids = gallery_pids.to(device=device, dtype=torch.int64)
    ranks_of = _ranks_fused if query_feats.dtype in FUSED_DTYPES else _ranks_from_score_slabs
    above, match_count = ranks_of(query_feats, gallery_feats, query_pids, gallery_pids, block_sizes)
    valid = torch.arange(above.shape[1], device=device)[None, :] < match_count[:, None]
    return above.to(torch.int64) + 1, valid


def retrieval_metrics_triton(query_feats, gallery_feats, query_pids, gallery_pids, ks=DEFAULT_KS,
                             per_query=False, block_sizes=None):
    """`kernels.retrieval_metrics` with the Triton rank-counting kernel (CUDA or interpreter)."""
    check_retrieval_inputs(query_pids, gallery_pids, query_feats.shape[0], gallery_feats.shape[0], ks)
    if query_feats.dim() != 2 or gallery_feats.dim() != 2 or query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"query_feats {tuple(query_feats.shape)} and gallery_feats "
                         f"{tuple(gallery_feats.shape)} must be [N, D] with the same D")
    ranks, valid = match_ranks_triton(query_feats, gallery_feats, query_pids, gallery_pids, block_sizes)
    return metrics_from_match_ranks(ranks, valid, ks, per_query)
