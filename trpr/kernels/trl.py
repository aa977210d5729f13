r"""TRL (triplet alignment) loss with cuBLAS similarity slabs and fused Triton statistics (docs/method.md §3).

One line (a row of S for text->image, a column for image->text), τ = temperature, m = margin,
P = the elements sharing the line's pid, x_j = S_j / τ:

    α_j = exp(x_j − L⁺) for j ∈ P,  L⁺ = log Σ_{j∈P} exp x_j            (α carries no gradient)
    L⁻ = log Σ_{j∉P} exp x_j
    u = m − Σ_{j∈P} α_j S_j + τ L⁻,   ℓ = max(u, 0)

A line without negatives has L⁻ = log 0 = −∞, so ℓ = 0 and no gradient (as RDE's loss gives).

Forward, online over element tiles: two log-sum-exps, over the positives (max m⁺, sum l⁺ and the
α-numerator a⁺ = Σ e^{x−m⁺} S) and over the negatives (m⁻, l⁻), each rescaled by e^{m_old − m_new}
when its max grows; one exp per element (each element is either positive or negative). Σ α S =
a⁺ / l⁺. State rows: (m⁺, l⁺, a⁺, m⁻, l⁻); saved for the backward: (L⁺, L⁻ (+10³⁰ without a
negative), [u > 0 and a negative exists]).

Backward, upstream gradient g (α constant; ∂(τ L⁻)/∂S_j = softmax over the negatives):

    ∂ℓ/∂S_j = [u > 0] · (−α_j if j ∈ P else exp(x_j − L⁻)),   one exp per element and direction.

The hinge at exactly u = 0 takes the zero subgradient (as torch.relu does).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .sdm import slab_loss_both_directions
from .similarity_tiles import NEG_BIG
from .slab import SlabLossSpec, line_block, line_state, line_tile


@triton.jit(do_not_specialize=["has_state", "final"])
def _trl_line_stats_kernel(S, LINE_PID, ELEM_PID, STATE, LOSS, line_offset, elem_offset, n_lines, n_elems,
                           n_state_lines, line_stride, elem_stride, inv_tau, tau, margin,
                           has_state, final, AXIS: tl.constexpr,
                           BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr):
    lines, line_mask, line_pid, state = line_block(LINE_PID, STATE, line_offset, n_lines, BLOCK_L)
    pos_max = line_state(state, 0, n_state_lines, line_mask, NEG_BIG, has_state, BLOCK_L)
    pos_sum = line_state(state, 1, n_state_lines, line_mask, 0.0, has_state, BLOCK_L)
    pos_sim = line_state(state, 2, n_state_lines, line_mask, 0.0, has_state, BLOCK_L)
    neg_max = line_state(state, 3, n_state_lines, line_mask, NEG_BIG, has_state, BLOCK_L)
    neg_sum = line_state(state, 4, n_state_lines, line_mask, 0.0, has_state, BLOCK_L)
    for e0 in range(0, n_elems, BLOCK_E):
        s, valid, positive, negative = line_tile(S, ELEM_PID, lines, line_mask, line_pid, e0, elem_offset,
                                                 n_elems, line_stride, elem_stride, AXIS, BLOCK_E)
        x = s * inv_tau
        new_pos_max = tl.maximum(pos_max, tl.max(tl.where(positive, x, NEG_BIG), axis=AXIS))
        new_neg_max = tl.maximum(neg_max, tl.max(tl.where(negative, x, NEG_BIG), axis=AXIS))
        shift = tl.where(positive, tl.expand_dims(new_pos_max, AXIS), tl.expand_dims(new_neg_max, AXIS))
        e = tl.where(valid, tl.exp(tl.where(valid, x - shift, 0.0)), 0.0)
        e_pos = tl.where(positive, e, 0.0)
        pos_rescale = tl.exp(pos_max - new_pos_max)
        pos_sum = pos_rescale * pos_sum + tl.sum(e_pos, axis=AXIS)
        pos_sim = pos_rescale * pos_sim + tl.sum(e_pos * s, axis=AXIS)
        neg_sum = tl.exp(neg_max - new_neg_max) * neg_sum + tl.sum(e - e_pos, axis=AXIS)
        pos_max = new_pos_max
        neg_max = new_neg_max
    if final:
        has_pos = pos_sum > 0.0
        has_neg = neg_sum > 0.0
        safe_pos_sum = tl.where(has_pos, pos_sum, 1.0)
        lse_neg = neg_max + tl.log(tl.where(has_neg, neg_sum, 1.0))
        hinge = margin - pos_sim / safe_pos_sum + tau * lse_neg
        active = has_neg & (hinge > 0.0)
        lse_neg = tl.where(has_neg, lse_neg, -NEG_BIG)      # no negative: exp(x − L⁻) = 0 in the backward
        tl.store(state, pos_max + tl.log(safe_pos_sum), mask=line_mask)
        tl.store(state + n_state_lines, lse_neg, mask=line_mask)
        tl.store(state + 2 * n_state_lines, active.to(tl.float32), mask=line_mask)
        tl.store(LOSS + line_offset + lines, tl.where(active, hinge, 0.0), mask=line_mask)
    else:
        tl.store(state, pos_max, mask=line_mask)
        tl.store(state + n_state_lines, pos_sum, mask=line_mask)
        tl.store(state + 2 * n_state_lines, pos_sim, mask=line_mask)
        tl.store(state + 3 * n_state_lines, neg_max, mask=line_mask)
        tl.store(state + 4 * n_state_lines, neg_sum, mask=line_mask)


@triton.jit
def _trl_line_grad(x, positive, lse_pos, lse_neg, coef):
    """coef · (−α on positives, softmax over the negatives elsewhere) for x = S/τ [M, N]."""
    e = tl.exp(x - tl.where(positive, lse_pos, lse_neg))
    return coef * tl.where(positive, -e, e)


@triton.jit
def _trl_grad_kernel(S, G, ROW_PID, COL_PID, ROW_STATE, COL_STATE, GRAD, row_offset, n_rows, n_cols,
                     n_row_state, inv_tau,
                     BOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    valid = row_mask[:, None] & col_mask[None, :]
    offsets = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(S + offsets, mask=valid, other=0.0) * inv_tau
    row_pid = tl.load(ROW_PID + row_offset + rows, mask=row_mask, other=0)
    col_pid = tl.load(COL_PID + cols, mask=col_mask, other=0)
    positive = row_pid[:, None] == col_pid[None, :]
    r = ROW_STATE + row_offset + rows
    r_pos = tl.load(r, mask=row_mask, other=0.0)
    r_neg = tl.load(r + n_row_state, mask=row_mask, other=0.0)
    r_coef = tl.load(r + 2 * n_row_state, mask=row_mask, other=0.0) * tl.load(GRAD + row_offset + rows,
                                                                               mask=row_mask, other=0.0)
    d_s = _trl_line_grad(x, positive, r_pos[:, None], r_neg[:, None], r_coef[:, None])
    if BOTH:
        c_pos = tl.load(COL_STATE + cols, mask=col_mask, other=0.0)
        c_neg = tl.load(COL_STATE + n_cols + cols, mask=col_mask, other=0.0)
        c_coef = tl.load(COL_STATE + 2 * n_cols + cols, mask=col_mask, other=0.0) * tl.load(GRAD + cols,
                                                                                          mask=col_mask, other=0.0)
        d_s += _trl_line_grad(x, positive, c_pos[None, :], c_neg[None, :], c_coef[None, :])
    d_s = tl.where(valid, d_s, 0.0)
    tl.store(G + offsets, d_s.to(G.dtype.element_ty), mask=valid)


def trl_spec(tau: float, margin: float) -> SlabLossSpec:
    """The TRL kernels with their hyper-parameters (see `kernels.slab.SlabLossSpec`)."""
    return SlabLossSpec("trl", 5, _trl_line_stats_kernel, (1.0 / float(tau), float(tau), float(margin)),
                        _trl_grad_kernel, (1.0 / float(tau),))


def trl_loss_triton(text_feats, image_feats, pids, tau=0.015, margin=0.1, weights=None, *, text_cols=None,
                    image_cols=None, col_pids=None, chunk_rows=None):
    """Per-sample TRL loss [b] float32 with the slab kernels (see `kernels.trl_loss`).

    `chunk_rows` overrides the slab height (tests use small values to run several chunks).
    """
    return slab_loss_both_directions(trl_spec(tau, margin), text_feats, image_feats, pids, weights, text_cols,
                                     image_cols, col_pids, chunk_rows)
