r"""Chunked similarity slabs: the machinery shared by the SDM and TRL Triton losses.

A loss of rows R [b, D] against columns C [B, D] (L2-normalised) needs S = R Cᵀ [b, B]. S is never
held whole: the rows are cut into chunks of m rows (`plan_chunks`), and for each chunk

    forward   S_I = R_I Cᵀ                   [m, B] float32   (cuBLAS: bf16 x bf16 -> fp32)
              line statistics of the rows of S_I                      (Triton, one read of S_I)
              [both] running statistics of the columns of S_I        (Triton, one read of S_I)
    backward  S_I = R_I Cᵀ (recomputed)
              G_I = ∂L/∂S_I                  [m, B] bf16      (Triton, one elementwise pass)
              dR_I = G_I C,  dC += G_Iᵀ R_I                    (cuBLAS, fp32 output)

so a forward + backward costs four b×B×D products and the extra memory is one S slab plus one G
slab (`SLAB_BUDGET_BYTES`), besides O((b + B)·D) for the features and their gradients.

"Both" mode (rows are their own columns: text rows against image columns of the SAME samples,
b = B): the image->text loss of sample j is a statistic of COLUMN j of S, so one slab serves
both directions — rows give text->image, columns image->text — and G_I holds both directions'
gradient. Column statistics are online (running max + rescaled sums) across chunks.

A loss plugs in through a `SlabLossSpec`: a line-statistics kernel and a gradient kernel with
the signatures documented on `SlabLossSpec`. A "line" is a row or a column of the slab: the
line kernel reads element e of line l at S + l·line_stride + e·elem_stride, so the same kernel
serves rows (line_stride = B, elem_stride = 1) and columns (line_stride = 1, elem_stride = B).

Precision: S is float32 (a bf16 S would be off by ~4e-3, 0.2 logits at scale 50); the GEMM
operands are the normalised features rounded to bf16 for fp16/bf16 inputs (float32 stays
float32); G is stored in the operand dtype. Without `torch.mm(..., out_dtype=torch.float32)`
(CUDA only, torch >= 2.8) the operands are upcast to float32 for the product (the CPU path).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .precision import exact_float32
from .similarity_tiles import INTERPRETED

SLAB_BUDGET_BYTES = 1 << 30
"""Bytes for the S slab (float32) plus the G slab (operand dtype) of one chunk: 1 GiB, i.e.
~5,500 rows of B = 32768 columns with bf16 operands."""

ROW_ALIGN = 128
"""Chunk rows are a multiple of this (GEMM tile friendly), except the last chunk."""


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Operand dtype of the slab products for features of `dtype`: bfloat16 for fp16/bf16 inputs
    (bf16 keeps the range of tiny gradient coefficients that fp16 would flush), float32 otherwise."""
    return torch.bfloat16 if dtype in (torch.float16, torch.bfloat16) else torch.float32


def plan_chunks(n_rows: int, n_cols: int, bytes_per_entry: int, chunk_rows: Optional[int] = None,
                budget_bytes: int = SLAB_BUDGET_BYTES) -> list[tuple[int, int]]:
    """Row ranges [(start, stop)] covering n_rows, each chunk's [rows, n_cols] slabs within the budget.

    Chunks are balanced (equal sizes rounded up to ROW_ALIGN) so that no tiny last chunk runs a
    badly shaped GEMM. `chunk_rows` overrides the size (tests use it to force several chunks).
    """
    if chunk_rows is None:
        max_rows = max(ROW_ALIGN, budget_bytes // max(n_cols * bytes_per_entry, 1) // ROW_ALIGN * ROW_ALIGN)
        n_chunks = math.ceil(n_rows / max_rows)
        chunk_rows = math.ceil(math.ceil(n_rows / n_chunks) / ROW_ALIGN) * ROW_ALIGN
    chunk_rows = max(1, int(chunk_rows))
    return [(start, min(start + chunk_rows, n_rows)) for start in range(0, n_rows, chunk_rows)]


_OUT_DTYPE_SUPPORTED: dict[str, bool] = {}
_OUT_DTYPE_ERRORS: dict[str, str] = {}


def _out_dtype_supported(device: torch.device) -> bool:
    """Whether torch.mm(a, b, out_dtype=torch.float32) works for bf16 operands on this device
    (cuBLAS bf16 x bf16 -> fp32; CUDA only in torch 2.8 - 2.13). Probed once per device type; a
    failure is kept (`gemm_path`) so that reports can say the products were upcast."""
    key = device.type
    if key not in _OUT_DTYPE_SUPPORTED:
        ok = False
        if device.type == "cuda":
            try:       # the calls the slabs make: a transposed second operand, addmm with a transposed first
                probe = torch.ones(4, 2, device=device, dtype=torch.bfloat16)
                product = torch.mm(probe, probe.t(), out_dtype=torch.float32)
                total = torch.addmm(product[:2, :2].contiguous(), probe.t(), probe, out_dtype=torch.float32)
                ok = product.dtype == total.dtype == torch.float32
                if not ok:
                    _OUT_DTYPE_ERRORS[key] = f"returned {product.dtype} / {total.dtype}"
            except (TypeError, RuntimeError, NotImplementedError) as error:
                ok = False
                _OUT_DTYPE_ERRORS[key] = f"{type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        _OUT_DTYPE_SUPPORTED[key] = ok
    return _OUT_DTYPE_SUPPORTED[key]


def gemm_path(device) -> tuple[str, bool]:
    """(description, is_fallback) of how the slabs multiply bf16/fp16 operands on `device`:
    cuBLAS with float32 output, or (fallback) both operands upcast to float32 first (about 10x slower
    on a GPU; the CPU path, where no out_dtype product exists, is no fallback)."""
    device = torch.device(device)
    if _out_dtype_supported(device):
        return "bf16 x bf16 -> fp32 (torch.mm out_dtype)", False
    if device.type != "cuda":
        return "operands upcast to fp32 (CPU path)", False
    reason = _OUT_DTYPE_ERRORS.get(device.type, "unsupported")
    return f"FALLBACK: torch.mm(out_dtype=float32) probe failed ({reason}); bf16 operands upcast to fp32 (~10x slower)", True


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, k] @ b [k, n] with float32 output (and float32 accumulation) for any operand dtype."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if _out_dtype_supported(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc [m, n] float32 + a @ b, float32 (may return a new tensor)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return acc.addmm_(a, b)
    if _out_dtype_supported(a.device):
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    return acc.addmm_(a.float(), b.float())


@dataclass(frozen=True)
class SlabLossSpec:
    """One loss as two Triton kernels plus their scalar hyper-parameters.

    line_kernel(S, LINE_PID, ELEM_PID, STATE, LOSS, line_offset, elem_offset, n_lines, n_elems,
                n_state_lines, line_stride, elem_stride, *line_hyper, has_state, final, AXIS, BLOCK_L, BLOCK_E)
        grid (cdiv(n_lines, BLOCK_L),); tiles from `line_tile` (AXIS: its reduction axis); element
        e's pid is ELEM_PID[elem_offset + e]; line l (pid LINE_PID[line_offset + l]) reads its running
        state STATE[k * n_state_lines + line_offset + l] (k < n_state) when has_state, folds in
        its n_elems elements, and writes the state back; with `final` it writes the saved
        statistics (STATE rows 0..2) and the per-line loss LOSS[line_offset + l] instead
        (has_state / final are run-time flags: one compiled variant per direction).
    grad_kernel(S, G, ROW_PID, COL_PID, ROW_STATE, COL_STATE, GRAD, row_offset, n_rows, n_cols,
                n_row_state, *grad_hyper, BOTH, BLOCK_M, BLOCK_N)
        grid over [BLOCK_M, BLOCK_N] tiles of the slab: G = ∂(Σ GRAD·loss)/∂S of the row lines
        (+ the column lines when BOTH), stored in G's dtype.
    """
    name: str
    n_state: int
    line_kernel: Callable
    line_hyper: tuple
    grad_kernel: Callable
    grad_hyper: tuple


def line_blocks(n_lines: int, n_elems: int, lines_contiguous: bool) -> tuple[int, int, int, int]:
    """(AXIS, BLOCK_L, BLOCK_E, num_warps) of the line-statistics kernel.

    GPU, 4 warps, 16-byte loads along the contiguous axis: a line's reduction must stay inside a
    thread or a warp (no shared-memory round trip per tile), so
      rows (contiguous elements): tile [16 lines, 128 elements], a warp spans one 128-element
          run, the 4 warps take different lines -> warp-shuffle reductions (AXIS = 1);
      columns (contiguous lines): tile [8 elements, 512 lines], the 4 warps span the lines ->
          each thread reduces its 8 elements in registers (AXIS = 0).
    Interpreted: as few programs and loop trips as the shape allows.
    """
    if INTERPRETED:
        return (0 if lines_contiguous else 1, max(2, min(64, triton.next_power_of_2(n_lines))),
                max(2, min(256, triton.next_power_of_2(n_elems))), 4)
    return (0, 512, 8, 4) if lines_contiguous else (1, 16, 128, 4)


@triton.jit
def line_block(LINE_PID, STATE, line_offset, n_lines, BLOCK_L: tl.constexpr):
    """This program's lines: (indices [BLOCK_L], mask, pids, pointers to their state column)."""
    lines = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    line_mask = lines < n_lines
    line_pid = tl.load(LINE_PID + line_offset + lines, mask=line_mask, other=0)
    return lines, line_mask, line_pid, STATE + line_offset + lines


@triton.jit
def line_state(state, k, n_state_lines, line_mask, initial, has_state, BLOCK_L: tl.constexpr):
    """State row k of the program's lines: loaded when has_state (a run-time flag), else `initial`."""
    value = tl.full((BLOCK_L,), initial, tl.float32)
    if has_state:
        value = tl.load(state + k * n_state_lines, mask=line_mask, other=initial)
    return value


@triton.jit
def line_tile(S, ELEM_PID, lines, line_mask, line_pid, e0, elem_offset, n_elems, line_stride, elem_stride,
              AXIS: tl.constexpr, BLOCK_E: tl.constexpr):
    """One tile of a slab seen as lines: (s, valid, positive, negative), each [BLOCK_L, BLOCK_E] when
    AXIS = 1 (reduce along axis 1), [BLOCK_E, BLOCK_L] when AXIS = 0. positive: the element's pid
    equals the line's. Offsets are int32 (a slab holds < 2³¹ entries, checked by `SlabLoss`)."""
    elems = e0 + tl.arange(0, BLOCK_E)
    elem_mask = elems < n_elems
    elem_pid = tl.load(ELEM_PID + elem_offset + elems, mask=elem_mask, other=0)
    if AXIS == 1:
        offsets = lines[:, None] * line_stride + elems[None, :] * elem_stride
        valid = line_mask[:, None] & elem_mask[None, :]
        same = line_pid[:, None] == elem_pid[None, :]
    else:
        offsets = elems[:, None] * elem_stride + lines[None, :] * line_stride
        valid = elem_mask[:, None] & line_mask[None, :]
        same = elem_pid[:, None] == line_pid[None, :]
    s = tl.load(S + offsets, mask=valid, other=0.0)
    return s, valid, same & valid, (~same) & valid


def grad_blocks(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the gradient kernel (one read of S, one write of G per tile)."""
    if INTERPRETED:
        return (max(2, min(64, triton.next_power_of_2(n_rows))),
                max(2, min(256, triton.next_power_of_2(n_cols))), 4)
    return 32, 128, 4


def _line_stats(spec: SlabLossSpec, slab, line_pids, elem_pids, state, loss, line_offset, elem_offset, n_lines,
                n_elems, line_stride, elem_stride, has_state, final):
    axis, block_l, block_e, warps = line_blocks(n_lines, n_elems, lines_contiguous=line_stride == 1)
    spec.line_kernel[(triton.cdiv(n_lines, block_l),)](
        slab, line_pids, elem_pids, state, loss, line_offset, elem_offset, n_lines, n_elems, state.shape[1],
        line_stride, elem_stride, *spec.line_hyper, int(has_state), int(final), AXIS=axis,
        BLOCK_L=block_l, BLOCK_E=block_e, num_warps=warps)


class SlabLoss(torch.autograd.Function):
    """Per-line losses of rows [b, D] against columns [B, D] (normalised, float32 or the operand dtype).

    forward(rows, cols, row_pids [b] int64, col_pids [B] int64, spec, both, operand_dtype, chunk_rows)
    -> loss [b] float32: the row lines' losses, plus the column lines' losses when `both`
    (then b == B and row i and column i are the two halves of sample i).
    """

    @staticmethod
    def forward(ctx, rows, cols, row_pids, col_pids, spec: SlabLossSpec, both: bool, operand_dtype, chunk_rows):
        # the slabs stay float32 under mixed precision, and exact float32 under a caller's TF32 setting
        with torch.autocast(rows.device.type, enabled=False), exact_float32():
            return SlabLoss._forward(ctx, rows, cols, row_pids, col_pids, spec, both, operand_dtype, chunk_rows)

    @staticmethod
    def backward(ctx, grad_loss):
        with torch.autocast(grad_loss.device.type, enabled=False), exact_float32():
            return SlabLoss._backward(ctx, grad_loss)

    @staticmethod
    def _forward(ctx, rows, cols, row_pids, col_pids, spec, both, operand_dtype, chunk_rows):
        n_rows, n_cols = rows.shape[0], cols.shape[0]
        r = rows.detach().to(operand_dtype).contiguous()
        c = cols.detach().to(operand_dtype).contiguous()
        device = rows.device
        row_state = torch.empty(spec.n_state, n_rows, device=device, dtype=torch.float32)
        row_loss = torch.empty(n_rows, device=device, dtype=torch.float32)
        col_state = torch.empty(spec.n_state if both else 1, n_cols if both else 1, device=device,
                                dtype=torch.float32)
        col_loss = torch.empty(n_cols if both else 1, device=device, dtype=torch.float32)
        chunks = plan_chunks(n_rows, n_cols, 4 + r.element_size(), chunk_rows)
        if (chunks[0][1] - chunks[0][0]) * n_cols >= 2**31:
            raise ValueError(f"a slab of {chunks[0][1] - chunks[0][0]} x {n_cols} entries exceeds the kernels' "
                             "int32 offsets: use a smaller chunk_rows")
        c_t = c.t()
        for index, (start, stop) in enumerate(chunks):
            slab = matmul_fp32(r[start:stop], c_t)
            m = stop - start
            _line_stats(spec, slab, row_pids, col_pids, row_state, row_loss, start, 0, m, n_cols,
                        n_cols, 1, has_state=False, final=True)
            if both:
                _line_stats(spec, slab, col_pids, row_pids, col_state, col_loss, 0, start, n_cols, m,
                            1, n_cols, has_state=index > 0, final=index == len(chunks) - 1)
        ctx.save_for_backward(r, c, row_pids, col_pids, row_state, col_state)
        ctx.settings = (spec, both, chunks)
        return row_loss + col_loss if both else row_loss

    @staticmethod
    def _backward(ctx, grad_loss):
        r, c, row_pids, col_pids, row_state, col_state = ctx.saved_tensors
        spec, both, chunks = ctx.settings
        n_rows, n_cols = r.shape[0], c.shape[0]
        grad = grad_loss.detach().to(torch.float32).contiguous()
        need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_rows = torch.empty(n_rows, r.shape[1], device=r.device, dtype=torch.float32) if need_rows else None
        d_cols = torch.zeros(n_cols, c.shape[1], device=c.device, dtype=torch.float32) if need_cols else None
        # The interpreter cannot store bf16 faithfully: it writes float32 and torch rounds.
        g_dtype = torch.float32 if INTERPRETED else r.dtype
        c_t = c.t()
        for start, stop in chunks:
            m = stop - start
            slab = matmul_fp32(r[start:stop], c_t)
            g = torch.empty(m, n_cols, device=r.device, dtype=g_dtype)
            block_m, block_n, warps = grad_blocks(m, n_cols)
            spec.grad_kernel[(triton.cdiv(m, block_m), triton.cdiv(n_cols, block_n))](
                slab, g, row_pids, col_pids, row_state, col_state, grad, start, m, n_cols, n_rows,
                *spec.grad_hyper, BOTH=both, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
            del slab
            g = g.to(r.dtype)
            if need_rows:
                d_rows[start:stop] = matmul_fp32(g, c)
            if need_cols:
                d_cols = addmm_fp32(d_cols, g.t(), r[start:stop])
        return d_rows, d_cols, None, None, None, None, None, None
