r"""SDM loss with cuBLAS similarity slabs and fused Triton statistics (docs/method.md §3; `trpr/kernels/slab.py`).

One line (a row of s·S for text->image, a column for image->text) with logits z_j = s·S_j
(s = logit scale), y_j = 1 for the columns sharing the line's pid, n = Σ_j y_j:

    lse = log Σ_j exp z_j,  p_j = exp(z_j − lse)
    c_j = log(1/n + ε) if y_j else log ε               (ε = 1e-8: log(q_j + ε))
    ℓ = Σ_j p_j (log p_j − c_j) = H − P⁺ log(1/n + ε) − P⁻ log ε,

H = Σ p log p, P± = the probability mass on positives / negatives. Online over element tiles with
a running max m: l = Σ e^{z−m}, h = Σ e^{z−m}(z − m), e± = Σ_± e^{z−m}, n; when m grows to m' every
sum is scaled by e^{m−m'} and h also gains (m − m')·l. At the end H = h/l − log l, P± = e±/l,
lse = m + log l. State rows: (m, l, h, e⁺, e⁻, n); saved for the backward: (lse, ℓ, log(1/n + ε)).

Backward, upstream gradient g of the line's loss (Σ_k ∂p_k/∂z_j = 0):

    ∂ℓ/∂S_j = s · p_j (log p_j − c_j − ℓ),   G_ij = g_i s p_ij(...) [+ g_j s p'_ji(...) in both mode]

Cost per chunk of m rows (both mode): one read of the fp32 slab per direction in the forward (two
exp per element in all), one read + one bf16 write in the backward (two exp per element).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .reference import SDM_EPS, check_loss_inputs
from .similarity_tiles import NEG_BIG
from .slab import SlabLoss, SlabLossSpec, gemm_dtype, line_block, line_state, line_tile


@triton.jit(do_not_specialize=["has_state", "final"])
def _sdm_line_stats_kernel(S, LINE_PID, ELEM_PID, STATE, LOSS, line_offset, elem_offset, n_lines, n_elems,
                           n_state_lines, line_stride, elem_stride, scale, eps, log_eps,
                           has_state, final, AXIS: tl.constexpr,
                           BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr):
    lines, line_mask, line_pid, state = line_block(LINE_PID, STATE, line_offset, n_lines, BLOCK_L)
    run_max = line_state(state, 0, n_state_lines, line_mask, NEG_BIG, has_state, BLOCK_L)
    run_sum = line_state(state, 1, n_state_lines, line_mask, 0.0, has_state, BLOCK_L)
    run_h = line_state(state, 2, n_state_lines, line_mask, 0.0, has_state, BLOCK_L)
    run_pos = line_state(state, 3, n_state_lines, line_mask, 0.0, has_state, BLOCK_L)
    run_neg = line_state(state, 4, n_state_lines, line_mask, 0.0, has_state, BLOCK_L)
    n_pos = line_state(state, 5, n_state_lines, line_mask, 0.0, has_state, BLOCK_L)
    for e0 in range(0, n_elems, BLOCK_E):
        s, valid, positive, negative = line_tile(S, ELEM_PID, lines, line_mask, line_pid, e0, elem_offset,
                                                 n_elems, line_stride, elem_stride, AXIS, BLOCK_E)
        z = tl.where(valid, s * scale, NEG_BIG)
        new_max = tl.maximum(run_max, tl.max(z, axis=AXIS))
        rescale = tl.exp(run_max - new_max)
        shifted = z - tl.expand_dims(new_max, AXIS)
        e = tl.where(valid, tl.exp(shifted), 0.0)
        run_h = rescale * (run_h + (run_max - new_max) * run_sum) + tl.sum(e * shifted, axis=AXIS)
        run_sum = rescale * run_sum + tl.sum(e, axis=AXIS)
        run_pos = rescale * run_pos + tl.sum(tl.where(positive, e, 0.0), axis=AXIS)
        run_neg = rescale * run_neg + tl.sum(tl.where(negative, e, 0.0), axis=AXIS)
        n_pos += tl.sum(positive.to(tl.float32), axis=AXIS)
        run_max = new_max
    if final:
        safe_sum = tl.where(run_sum > 0.0, run_sum, 1.0)
        log_sum = tl.log(safe_sum)
        logq_pos = tl.log(1.0 / tl.maximum(n_pos, 1.0) + eps)
        loss = (run_h / safe_sum - log_sum) - (run_pos / safe_sum) * logq_pos - (run_neg / safe_sum) * log_eps
        tl.store(state, run_max + log_sum, mask=line_mask)
        tl.store(state + n_state_lines, loss, mask=line_mask)
        tl.store(state + 2 * n_state_lines, logq_pos, mask=line_mask)
        tl.store(LOSS + line_offset + lines, loss, mask=line_mask)
    else:
        tl.store(state, run_max, mask=line_mask)
        tl.store(state + n_state_lines, run_sum, mask=line_mask)
        tl.store(state + 2 * n_state_lines, run_h, mask=line_mask)
        tl.store(state + 3 * n_state_lines, run_pos, mask=line_mask)
        tl.store(state + 4 * n_state_lines, run_neg, mask=line_mask)
        tl.store(state + 5 * n_state_lines, n_pos, mask=line_mask)


@triton.jit
def _sdm_line_grad(z, positive, lse, loss, logq_pos, coef, log_eps):
    """coef · p (log p − c − ℓ) for logits z [M, N] and broadcastable line statistics."""
    log_p = z - lse
    c = tl.where(positive, logq_pos, log_eps)
    return coef * tl.exp(log_p) * (log_p - c - loss)


@triton.jit
def _sdm_grad_kernel(S, G, ROW_PID, COL_PID, ROW_STATE, COL_STATE, GRAD, row_offset, n_rows, n_cols,
                     n_row_state, scale, log_eps,
                     BOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    valid = row_mask[:, None] & col_mask[None, :]
    offsets = rows[:, None] * n_cols + cols[None, :]
    z = tl.load(S + offsets, mask=valid, other=0.0) * scale
    row_pid = tl.load(ROW_PID + row_offset + rows, mask=row_mask, other=0)
    col_pid = tl.load(COL_PID + cols, mask=col_mask, other=0)
    positive = row_pid[:, None] == col_pid[None, :]
    r = ROW_STATE + row_offset + rows
    r_lse = tl.load(r, mask=row_mask, other=0.0)
    r_loss = tl.load(r + n_row_state, mask=row_mask, other=0.0)
    r_logq = tl.load(r + 2 * n_row_state, mask=row_mask, other=0.0)
    r_coef = tl.load(GRAD + row_offset + rows, mask=row_mask, other=0.0) * scale
    d_s = _sdm_line_grad(z, positive, r_lse[:, None], r_loss[:, None], r_logq[:, None], r_coef[:, None], log_eps)
    if BOTH:
        c_lse = tl.load(COL_STATE + cols, mask=col_mask, other=0.0)
        c_loss = tl.load(COL_STATE + n_cols + cols, mask=col_mask, other=0.0)
        c_logq = tl.load(COL_STATE + 2 * n_cols + cols, mask=col_mask, other=0.0)
        c_coef = tl.load(GRAD + cols, mask=col_mask, other=0.0) * scale
        d_s += _sdm_line_grad(z, positive, c_lse[None, :], c_loss[None, :], c_logq[None, :], c_coef[None, :],
                              log_eps)
    tl.store(G + offsets, d_s.to(G.dtype.element_ty), mask=valid)


def sdm_spec(logit_scale: float) -> SlabLossSpec:
    """The SDM kernels with their hyper-parameters (see `kernels.slab.SlabLossSpec`)."""
    scale = float(logit_scale)
    return SlabLossSpec("sdm", 6, _sdm_line_stats_kernel, (scale, SDM_EPS, math.log(SDM_EPS)),
                        _sdm_grad_kernel, (scale, math.log(SDM_EPS)))


def prepare_directions(text_feats, image_feats, pids, weights, text_cols, image_cols, col_pids):
    """Validate and L2-normalise in float32; shared by SDM and TRL.

    Returns (t [b,D], v [b,D], all_t [B,D] or None, all_v [B,D] or None, pids [b] int64,
    all_pids [B] int64 or None, operand dtype); the column entries are None without columns.
    """
    all_t, all_v, all_p = check_loss_inputs(text_feats, image_feats, pids, weights, text_cols, image_cols,
                                            col_pids)
    device = text_feats.device

    def norm(x):
        return F.normalize(x.to(torch.float32), dim=-1)

    local_pids = pids.to(device=device, dtype=torch.int64).contiguous()
    operands = gemm_dtype(text_feats.dtype)
    if all_t is text_feats:
        return norm(text_feats), norm(image_feats), None, None, local_pids, None, operands
    all_p = all_p.to(device=device, dtype=torch.int64).contiguous()
    return norm(text_feats), norm(image_feats), norm(all_t), norm(all_v), local_pids, all_p, operands


def slab_loss_both_directions(spec: SlabLossSpec, text_feats, image_feats, pids, weights, text_cols, image_cols,
                              col_pids, chunk_rows=None):
    """text->image + image->text per-sample losses [b] float32 of `spec`, weighted (no grad through weights).

    Without columns one slab pass serves both directions (rows = text, columns = images of the
    same samples); with columns each direction is its own pass of local rows against all columns.
    """
    t, v, all_t, all_v, p, all_p, operands = prepare_directions(text_feats, image_feats, pids, weights,
                                                                text_cols, image_cols, col_pids)
    if all_t is None:
        loss = SlabLoss.apply(t, v, p, p, spec, True, operands, chunk_rows)
    else:
        loss = (SlabLoss.apply(t, all_v, p, all_p, spec, False, operands, chunk_rows)
                + SlabLoss.apply(v, all_t, p, all_p, spec, False, operands, chunk_rows))
    if weights is not None:
        loss = loss * weights.detach().to(device=loss.device, dtype=torch.float32)
    return loss


def sdm_loss_triton(text_feats, image_feats, pids, logit_scale=50.0, weights=None, *, text_cols=None,
                    image_cols=None, col_pids=None, chunk_rows=None):
    """Per-sample SDM loss [b] float32 with the slab kernels (see `kernels.sdm_loss`).

    `chunk_rows` overrides the slab height (tests use small values to run several chunks).
    """
    return slab_loss_both_directions(sdm_spec(logit_scale), text_feats, image_feats, pids, weights, text_cols,
                                     image_cols, col_pids, chunk_rows)
