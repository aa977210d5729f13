r"""Fused, tiled TRL (triplet alignment) loss in Triton (METHOD.md §3): no B×B matrix in memory.

One direction (rows R [b, D], columns C [B, D], L2-normalised; image->text swaps the roles and
runs the same kernels), τ = temperature, m = margin, P(i) = columns with row i's pid:

    S_ij = R_i·C_j,  x_ij = S_ij / τ
    α_ij = exp(x_ij − L⁺_i) for j ∈ P(i),  L⁺_i = log Σ_{j∈P(i)} exp x_ij      (α carries no gradient)
    L⁻_i = log Σ_{j∉P(i)} exp x_ij
    u_i = m − Σ_{j∈P(i)} α_ij S_ij + τ L⁻_i,   ℓ_i = max(u_i, 0)
    A row without negatives has L⁻ = log 0 = −∞; its loss is defined as max(m − Σ α S, 0).

Forward (one program per row block, loop over column tiles): two online log-sum-exps, over the
positives (max m⁺, sum l⁺ and the α-numerator a⁺ = Σ e^{x−m⁺} S) and over the negatives (m⁻, l⁻),
each rescaled by e^{m_old − m_new} when its running max grows. Σ α S = a⁺ / l⁺. Saved per row:
ℓ_i, L⁺_i, L⁻_i (+10³⁰ when there is no negative, so that its exponentials vanish) and the
hinge flag [u_i > 0].

Backward, with upstream gradient g_i (α constant, ∂(τ L⁻_i)/∂S_ij = softmax over negatives):

    dS_ij = g_i · [u_i > 0] · ( −α_ij              if j ∈ P(i)
                               +exp(x_ij − L⁻_i)   otherwise )
    dR = dS · C   (row-block kernel),   dC = dSᵀ · R   (column-block kernel)

recomputing S tile by tile; extra memory O(b·D + B·D + b). The hinge at exactly u_i = 0 takes
the zero subgradient (as torch.relu does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sdm import prepare_directions
from .similarity_tiles import (NEG_BIG, accumulate_tile_product, dot_settings, pick_blocks,
                               similarity_tile)

NO_NEGATIVE_LSE = 1.0e30
"""L⁻ stored for rows without negatives: exp(x − 10³⁰) is exactly 0 in the backward."""


@triton.jit
def _trl_forward_kernel(R, C, ROW_PID, COL_PID, LOSS, LSE_POS, LSE_NEG, ACTIVE,
                        n_rows, n_cols, D, inv_tau, tau, margin, no_negative_lse,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    row_pid = tl.load(ROW_PID + rows, mask=row_mask, other=0)
    pos_max = tl.full((BLOCK_M,), NEG_BIG, tl.float32)
    pos_sum = tl.zeros((BLOCK_M,), tl.float32)
    pos_sim = tl.zeros((BLOCK_M,), tl.float32)
    neg_max = tl.full((BLOCK_M,), NEG_BIG, tl.float32)
    neg_sum = tl.zeros((BLOCK_M,), tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        col_pid = tl.load(COL_PID + cols, mask=col_mask, other=0)
        s = similarity_tile(R, C, rows, cols, row_mask, col_mask, D,
                            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
        x = s * inv_tau
        positive = (row_pid[:, None] == col_pid[None, :]) & col_mask[None, :]
        negative = (row_pid[:, None] != col_pid[None, :]) & col_mask[None, :]
        x_pos = tl.where(positive, x, NEG_BIG)
        new_pos_max = tl.maximum(pos_max, tl.max(x_pos, axis=1))
        e_pos = tl.where(positive, tl.exp(x_pos - new_pos_max[:, None]), 0.0)
        rescale = tl.exp(pos_max - new_pos_max)
        pos_sum = rescale * pos_sum + tl.sum(e_pos, axis=1)
        pos_sim = rescale * pos_sim + tl.sum(e_pos * s, axis=1)
        pos_max = new_pos_max
        x_neg = tl.where(negative, x, NEG_BIG)
        new_neg_max = tl.maximum(neg_max, tl.max(x_neg, axis=1))
        e_neg = tl.where(negative, tl.exp(x_neg - new_neg_max[:, None]), 0.0)
        neg_sum = tl.exp(neg_max - new_neg_max) * neg_sum + tl.sum(e_neg, axis=1)
        neg_max = new_neg_max
    has_pos = pos_sum > 0.0
    has_neg = neg_sum > 0.0
    safe_pos_sum = tl.where(has_pos, pos_sum, 1.0)
    lse_neg = tl.where(has_neg, neg_max + tl.log(tl.where(has_neg, neg_sum, 1.0)), no_negative_lse)
    hinge = margin - pos_sim / safe_pos_sum + tl.where(has_neg, tau * lse_neg, 0.0)
    tl.store(LOSS + rows, tl.maximum(hinge, 0.0), mask=row_mask)
    tl.store(LSE_POS + rows, pos_max + tl.log(safe_pos_sum), mask=row_mask)
    tl.store(LSE_NEG + rows, lse_neg, mask=row_mask)
    tl.store(ACTIVE + rows, (hinge > 0.0).to(tl.float32), mask=row_mask)


@triton.jit
def _trl_grad_sims(s, row_pid, col_pid, row_mask, col_mask, lse_pos, lse_neg, active_grad, inv_tau):
    """dS tile [BM, BN] = g·[u>0]·(−α on positives, softmax over negatives elsewhere)."""
    valid = row_mask[:, None] & col_mask[None, :]
    x = s * inv_tau
    positive = row_pid[:, None] == col_pid[None, :]
    weight = tl.where(positive, -tl.exp(x - lse_pos[:, None]), tl.exp(x - lse_neg[:, None]))
    return tl.where(valid, active_grad[:, None] * weight, 0.0)


@triton.jit
def _trl_backward_rows_kernel(R, C, ROW_PID, COL_PID, LSE_POS, LSE_NEG, ACTIVE_GRAD, D_ROWS,
                              n_rows, n_cols, D, inv_tau,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    row_pid = tl.load(ROW_PID + rows, mask=row_mask, other=0)
    lse_pos = tl.load(LSE_POS + rows, mask=row_mask, other=0.0)
    lse_neg = tl.load(LSE_NEG + rows, mask=row_mask, other=0.0)
    active_grad = tl.load(ACTIVE_GRAD + rows, mask=row_mask, other=0.0)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        col_pid = tl.load(COL_PID + cols, mask=col_mask, other=0)
        s = similarity_tile(R, C, rows, cols, row_mask, col_mask, D,
                            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
        d_s = _trl_grad_sims(s, row_pid, col_pid, row_mask, col_mask, lse_pos, lse_neg, active_grad, inv_tau)
        accumulate_tile_product(D_ROWS, rows, row_mask, d_s, C, cols, col_mask, D,
                                BLOCK_D, UPCAST, PRECISION)


@triton.jit
def _trl_backward_cols_kernel(R, C, ROW_PID, COL_PID, LSE_POS, LSE_NEG, ACTIVE_GRAD, D_COLS,
                              n_rows, n_cols, D, inv_tau,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    col_pid = tl.load(COL_PID + cols, mask=col_mask, other=0)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        row_pid = tl.load(ROW_PID + rows, mask=row_mask, other=0)
        lse_pos = tl.load(LSE_POS + rows, mask=row_mask, other=0.0)
        lse_neg = tl.load(LSE_NEG + rows, mask=row_mask, other=0.0)
        active_grad = tl.load(ACTIVE_GRAD + rows, mask=row_mask, other=0.0)
        s = similarity_tile(R, C, rows, cols, row_mask, col_mask, D,
                            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PRECISION)
        d_s = _trl_grad_sims(s, row_pid, col_pid, row_mask, col_mask, lse_pos, lse_neg, active_grad, inv_tau)
        accumulate_tile_product(D_COLS, cols, col_mask, tl.trans(d_s), R, rows, row_mask, D,
                                BLOCK_D, UPCAST, PRECISION)


class TrlDirection(torch.autograd.Function):
    """One TRL direction: (rows [b,D], cols [B,D] normalised, row_pids [b], col_pids [B]) -> ℓ [b] fp32."""

    @staticmethod
    def forward(ctx, rows, cols, row_pids, col_pids, tau, margin, blocks):
        n_rows, dim = rows.shape
        n_cols = cols.shape[0]
        block_m, block_n, block_d, warps = blocks or pick_blocks(n_rows, n_cols, dim, rows.dtype)
        upcast, precision = dot_settings(rows.dtype)
        loss = torch.empty(n_rows, device=rows.device, dtype=torch.float32)
        lse_pos, lse_neg, active = torch.empty_like(loss), torch.empty_like(loss), torch.empty_like(loss)
        _trl_forward_kernel[(triton.cdiv(n_rows, block_m),)](
            rows, cols, row_pids, col_pids, loss, lse_pos, lse_neg, active, n_rows, n_cols, dim,
            1.0 / float(tau), float(tau), float(margin), NO_NEGATIVE_LSE,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=upcast, PRECISION=precision,
            num_warps=warps)
        ctx.save_for_backward(rows, cols, row_pids, col_pids, lse_pos, lse_neg, active)
        ctx.settings = (1.0 / float(tau), block_m, block_n, block_d, warps, upcast, precision)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        rows, cols, row_pids, col_pids, lse_pos, lse_neg, active = ctx.saved_tensors
        inv_tau, block_m, block_n, block_d, warps, upcast, precision = ctx.settings
        n_rows, dim = rows.shape
        n_cols = cols.shape[0]
        active_grad = (grad_loss.detach().to(torch.float32) * active).contiguous()
        args = (rows, cols, row_pids, col_pids, lse_pos, lse_neg, active_grad)
        meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=upcast,
                    PRECISION=precision, num_warps=warps)
        d_rows = d_cols = None
        if ctx.needs_input_grad[0]:
            d_rows = torch.zeros(n_rows, dim, device=rows.device, dtype=torch.float32)
            _trl_backward_rows_kernel[(triton.cdiv(n_rows, block_m),)](
                *args, d_rows, n_rows, n_cols, dim, inv_tau, **meta)
            d_rows = d_rows.to(rows.dtype)
        if ctx.needs_input_grad[1]:
            d_cols = torch.zeros(n_cols, dim, device=cols.device, dtype=torch.float32)
            _trl_backward_cols_kernel[(triton.cdiv(n_cols, block_n),)](
                *args, d_cols, n_rows, n_cols, dim, inv_tau, **meta)
            d_cols = d_cols.to(cols.dtype)
        return d_rows, d_cols, None, None, None, None, None


def trl_loss_triton(text_feats, image_feats, pids, tau=0.015, margin=0.1, weights=None, *, text_cols=None,
                    image_cols=None, col_pids=None, blocks=None):
    """Per-sample TRL loss [b] float32 with the Triton kernels (see `kernels.trl_loss`).

    `blocks` = (BLOCK_M, BLOCK_N, BLOCK_D, num_warps) overrides the fixed tile sizes.
    """
    t, v, at, av, p, all_p = prepare_directions(text_feats, image_feats, pids, weights, text_cols,
                                                image_cols, col_pids)
    loss = (TrlDirection.apply(t, av, p, all_p, tau, margin, blocks)
            + TrlDirection.apply(v, at, p, all_p, tau, margin, blocks))
    if weights is not None:
        loss = loss * weights.detach().to(device=loss.device, dtype=torch.float32)
    return loss
