r"""Fused, tiled SDM loss in Triton (METHOD.md §3): forward and backward, no B×B matrix in memory.

One direction (rows R [b, D], columns C [B, D], both L2-normalised; text->image has R = text,
C = images, image->text swaps them and runs the same kernels):

    z_ij = s · R_i·C_j                      (s = logit scale)
    lse_i = log Σ_j exp z_ij,  p_ij = exp(z_ij − lse_i)
    n_i = Σ_j y_ij,  c_ij = log(1/n_i + ε) if y_ij else log ε   (ε = 1e-8; log(q_ij + ε))
    ℓ_i = Σ_j p_ij (log p_ij − c_ij)
        = H_i − P⁺_i log(1/n_i + ε) − P⁻_i log ε,
    with H_i = Σ_j p_ij log p_ij, P⁺_i / P⁻_i the probability mass on positives / negatives.

Forward (one program per block of rows, loop over column tiles, online log-sum-exp with a
running max m): l = Σ e^{z−m}, h = Σ e^{z−m}(z − m), e⁺ = Σ_pos e^{z−m}, e⁻ = Σ_neg e^{z−m};
when m grows to m', every sum is multiplied by e^{m−m'} and h also gains (m − m')·l. At the
end H = h/l − log l, P± = e±/l, lse = m + log l. Saved per row: ℓ_i, lse_i, log(1/n_i + ε).

Backward: with upstream gradient g_i,

    ∂ℓ_i/∂z_ij = p_ij (log p_ij − c_ij − ℓ_i)            (since Σ_j ∂p_ij/∂z_ik = 0)
    dS_ij = s · g_i · p_ij (z_ij − lse_i − c_ij − ℓ_i)
    dR = dS · C        (kernel 1: one program per row block, loop over column tiles)
    dC = dSᵀ · R       (kernel 2: one program per column block, loop over row tiles)

Both kernels recompute z tile by tile from R and C and the saved per-row statistics, so the
extra memory is O(b·D + B·D) for the gradients and O(b) for the statistics. The gradient
through the L2 normalisation and the per-sample weights is left to autograd in PyTorch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .reference import SDM_EPS, check_loss_inputs
from .similarity_tiles import (NEG_BIG, accumulate_tile_product, dot_settings, kernel_dtype,
                               pick_blocks, similarity_tile)


@triton.jit
def _sdm_forward_kernel(R, C, ROW_PID, COL_PID, LOSS, LSE, LOGQ_POS, n_rows, n_cols, D, scale, eps, log_eps,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    row_pid = tl.load(ROW_PID + rows, mask=row_mask, other=0)
    run_max = tl.full((BLOCK_M,), NEG_BIG, tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    run_h = tl.zeros((BLOCK_M,), tl.float32)
    run_pos = tl.zeros((BLOCK_M,), tl.float32)
    run_neg = tl.zeros((BLOCK_M,), tl.float32)
    n_pos = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        col_pid = tl.load(COL_PID + cols, mask=col_mask, other=0)
        z = similarity_tile(R, C, rows, cols, row_mask, col_mask, D,
                            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION) * scale
        z = tl.where(col_mask[None, :], z, NEG_BIG)
        positive = (row_pid[:, None] == col_pid[None, :]) & col_mask[None, :]
        negative = (row_pid[:, None] != col_pid[None, :]) & col_mask[None, :]
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        shifted = z - new_max[:, None]
        e = tl.where(col_mask[None, :], tl.exp(shifted), 0.0)
        run_h = rescale * (run_h + (run_max - new_max) * run_sum) + tl.sum(e * shifted, axis=1)
        run_sum = rescale * run_sum + tl.sum(e, axis=1)
        run_pos = rescale * run_pos + tl.sum(tl.where(positive, e, 0.0), axis=1)
        run_neg = rescale * run_neg + tl.sum(tl.where(negative, e, 0.0), axis=1)
        n_pos += tl.sum(positive.to(tl.float32), axis=1)
        run_max = new_max
    log_sum = tl.log(run_sum)
    logq_pos = tl.log(1.0 / tl.maximum(n_pos, 1.0) + eps)
    loss = (run_h / run_sum - log_sum) - (run_pos / run_sum) * logq_pos - (run_neg / run_sum) * log_eps
    tl.store(LOSS + rows, loss, mask=row_mask)
    tl.store(LSE + rows, run_max + log_sum, mask=row_mask)
    tl.store(LOGQ_POS + rows, logq_pos, mask=row_mask)


@triton.jit
def _sdm_grad_logits(z, row_pid, col_pid, row_mask, col_mask, lse, loss, logq_pos, grad, scale, log_eps):
    """dS tile [BM, BN] = s · g_i · p_ij (z_ij − lse_i − c_ij − ℓ_i), zero outside the masks."""
    valid = row_mask[:, None] & col_mask[None, :]
    log_p = z - lse[:, None]
    c = tl.where(row_pid[:, None] == col_pid[None, :], logq_pos[:, None], log_eps)
    d_z = grad[:, None] * tl.exp(log_p) * (log_p - c - loss[:, None])
    return tl.where(valid, d_z * scale, 0.0)


@triton.jit
def _sdm_backward_rows_kernel(R, C, ROW_PID, COL_PID, LOSS, LSE, LOGQ_POS, GRAD, D_ROWS,
                              n_rows, n_cols, D, scale, log_eps,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    row_pid = tl.load(ROW_PID + rows, mask=row_mask, other=0)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    loss = tl.load(LOSS + rows, mask=row_mask, other=0.0)
    logq_pos = tl.load(LOGQ_POS + rows, mask=row_mask, other=0.0)
    grad = tl.load(GRAD + rows, mask=row_mask, other=0.0)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        col_pid = tl.load(COL_PID + cols, mask=col_mask, other=0)
        z = similarity_tile(R, C, rows, cols, row_mask, col_mask, D,
                            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION) * scale
        d_s = _sdm_grad_logits(z, row_pid, col_pid, row_mask, col_mask, lse, loss, logq_pos, grad,
                               scale, log_eps)
        accumulate_tile_product(D_ROWS, rows, row_mask, d_s, C, cols, col_mask, D,
                                BLOCK_D, UPCAST, PRECISION)


@triton.jit
def _sdm_backward_cols_kernel(R, C, ROW_PID, COL_PID, LOSS, LSE, LOGQ_POS, GRAD, D_COLS,
                              n_rows, n_cols, D, scale, log_eps,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    col_pid = tl.load(COL_PID + cols, mask=col_mask, other=0)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        row_pid = tl.load(ROW_PID + rows, mask=row_mask, other=0)
        lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
        loss = tl.load(LOSS + rows, mask=row_mask, other=0.0)
        logq_pos = tl.load(LOGQ_POS + rows, mask=row_mask, other=0.0)
        grad = tl.load(GRAD + rows, mask=row_mask, other=0.0)
        z = similarity_tile(R, C, rows, cols, row_mask, col_mask, D,
                            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION) * scale
        d_s = _sdm_grad_logits(z, row_pid, col_pid, row_mask, col_mask, lse, loss, logq_pos, grad,
                               scale, log_eps)
        accumulate_tile_product(D_COLS, cols, col_mask, tl.trans(d_s), R, rows, row_mask, D,
                                BLOCK_D, UPCAST, PRECISION)


class SdmDirection(torch.autograd.Function):
    """One SDM direction: (rows [b,D], cols [B,D] normalised, row_pids [b], col_pids [B]) -> ℓ [b] fp32."""

    @staticmethod
    def forward(ctx, rows, cols, row_pids, col_pids, logit_scale, blocks):
        n_rows, dim = rows.shape
        n_cols = cols.shape[0]
        block_m, block_n, block_d, warps = blocks or pick_blocks(n_rows, n_cols, dim, rows.dtype)
        upcast, precision = dot_settings(rows.dtype)
        loss = torch.empty(n_rows, device=rows.device, dtype=torch.float32)
        lse = torch.empty_like(loss)
        logq_pos = torch.empty_like(loss)
        _sdm_forward_kernel[(triton.cdiv(n_rows, block_m),)](
            rows, cols, row_pids, col_pids, loss, lse, logq_pos, n_rows, n_cols, dim,
            float(logit_scale), SDM_EPS, math.log(SDM_EPS), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            UPCAST=upcast, PRECISION=precision, num_warps=warps)
        ctx.save_for_backward(rows, cols, row_pids, col_pids, loss, lse, logq_pos)
        ctx.settings = (float(logit_scale), block_m, block_n, block_d, warps, upcast, precision)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        rows, cols, row_pids, col_pids, loss, lse, logq_pos = ctx.saved_tensors
        scale, block_m, block_n, block_d, warps, upcast, precision = ctx.settings
        n_rows, dim = rows.shape
        n_cols = cols.shape[0]
        grad = grad_loss.detach().to(torch.float32).contiguous()
        args = (rows, cols, row_pids, col_pids, loss, lse, logq_pos, grad)
        meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=upcast,
                    PRECISION=precision, num_warps=warps)
        d_rows = d_cols = None
        if ctx.needs_input_grad[0]:
            d_rows = torch.zeros(n_rows, dim, device=rows.device, dtype=torch.float32)
            _sdm_backward_rows_kernel[(triton.cdiv(n_rows, block_m),)](
                *args, d_rows, n_rows, n_cols, dim, scale, math.log(SDM_EPS), **meta)
            d_rows = d_rows.to(rows.dtype)
        if ctx.needs_input_grad[1]:
            d_cols = torch.zeros(n_cols, dim, device=cols.device, dtype=torch.float32)
            _sdm_backward_cols_kernel[(triton.cdiv(n_cols, block_n),)](
                *args, d_cols, n_rows, n_cols, dim, scale, math.log(SDM_EPS), **meta)
            d_cols = d_cols.to(cols.dtype)
        return d_rows, d_cols, None, None, None, None


def prepare_directions(text_feats, image_feats, pids, weights, text_cols, image_cols, col_pids):
    """Validate, L2-normalise (float32) and cast to the kernel dtype; shared by SDM and TRL.

    Returns (t [b,D], v [b,D], all_t [B,D], all_v [B,D], pids [b], all_pids [B]) contiguous,
    where all_t / all_v ARE t / v (same tensor objects) without columns.
    """
    all_t, all_v, all_p = check_loss_inputs(text_feats, image_feats, pids, weights, text_cols, image_cols,
                                            col_pids)
    dtype = kernel_dtype(text_feats.dtype)

    def norm(x):
        return F.normalize(x.to(torch.float32), dim=-1).to(dtype).contiguous()

    t, v = norm(text_feats), norm(image_feats)
    at = t if all_t is text_feats else norm(all_t)
    av = v if all_v is image_feats else norm(all_v)
    device = text_feats.device
    local_pids = pids.to(device=device, dtype=torch.int64).contiguous()
    all_p = local_pids if all_p is pids else all_p.to(device=device, dtype=torch.int64).contiguous()
    return t, v, at, av, local_pids, all_p


def sdm_loss_triton(text_feats, image_feats, pids, logit_scale=50.0, weights=None, *, text_cols=None,
                    image_cols=None, col_pids=None, blocks=None):
    """Per-sample SDM loss [b] float32 with the Triton kernels (see `kernels.sdm_loss`).

    `blocks` = (BLOCK_M, BLOCK_N, BLOCK_D, num_warps) overrides the fixed tile sizes (tests use
    small blocks to exercise multi-tile loops).
    """
    t, v, at, av, p, all_p = prepare_directions(text_feats, image_feats, pids, weights, text_cols,
                                                image_cols, col_pids)
    loss = (SdmDirection.apply(t, av, p, all_p, logit_scale, blocks)
            + SdmDirection.apply(v, at, p, all_p, logit_scale, blocks))
    if weights is not None:
        loss = loss * weights.detach().to(device=loss.device, dtype=torch.float32)
    return loss
