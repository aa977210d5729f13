"""Triton building blocks shared by the loss and retrieval kernels: similarity tiles.

All feature matrices are row-major contiguous [N, D]; row offsets are computed in int64 so
that N·D may exceed 2³¹. Products accumulate in float32. ``UPCAST`` converts the loaded
operands to float32 before `tl.dot` (used under TRITON_INTERPRET=1, where a bf16 `tl.dot` is
wrong, and for float32 inputs); ``PRECISION`` is the `tl.dot` input precision ("ieee" for
float32 inputs so that fp32 results match PyTorch to ~1e-6, "tf32" otherwise: unused for
fp16/bf16 operands).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""True when Triton runs in its CPU interpreter (set before triton is imported)."""

NEG_BIG = tl.constexpr(-1.0e30)
"""Finite stand-in for −∞ in masked logits: exp(NEG_BIG − m) is exactly 0 and 0·NEG_BIG is 0.
A `tl.constexpr` because compiled kernels may only read constexpr globals."""


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels read: fp16/bf16 stay, everything else becomes float32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION) constexprs for features of `dtype` (see module docstring)."""
    upcast = INTERPRETED or dtype == torch.float32
    return upcast, ("ieee" if upcast else "tf32")


@triton.jit
def similarity_tile(R, C, rows, cols, row_mask, col_mask, D,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 tile R[rows] @ C[cols]ᵀ; masked rows/cols read zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    r_base = R + rows.to(tl.int64)[:, None] * D
    c_base = C + cols.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        r = tl.load(r_base + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        c = tl.load(c_base + d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            r = r.to(tl.float32)
            c = c.to(tl.float32)
        acc = tl.dot(r, tl.trans(c), acc, input_precision=PRECISION)
    return acc


@triton.jit
def accumulate_tile_product(OUT, out_rows, out_mask, G, SRC, src_rows, src_mask, D,
                            BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """OUT[out_rows, :] += G @ SRC[src_rows, :] for G [P, Q] float32, SRC [*, D], OUT float32 [*, D].

    The calling program must own the rows `out_rows` of OUT (no other program writes them):
    the update is a plain read-modify-write, deterministic, followed by a CTA barrier so that
    the next update of the same rows sees this one.
    """
    o_base = OUT + out_rows.to(tl.int64)[:, None] * D
    s_base = SRC + src_rows.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        s = tl.load(s_base + d[None, :], mask=src_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            update = tl.dot(G, s.to(tl.float32), input_precision=PRECISION)
        else:
            update = tl.dot(G.to(s.dtype), s, input_precision=PRECISION)
        o_mask = out_mask[:, None] & d_mask[None, :]
        current = tl.load(o_base + d[None, :], mask=o_mask, other=0.0)
        tl.store(o_base + d[None, :], current + update, mask=o_mask)
    tl.debug_barrier()


def gpu_blocks(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """Fixed GPU (BLOCK_M, BLOCK_N, BLOCK_D, num_warps) of the loss kernels for features of `dtype`.

    Chosen from the sm_90 register report (cuobjdump --dump-resource-usage): with 8 warps these
    tiles compile without register spills; 4 warps or 64-wide D chunks spill. float32 (FMA "ieee"
    dot) needs the smaller row tile.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return 64, 64, 32, 8
    return 32, 64, 32, 8


def pick_blocks(n_rows: int, n_cols: int, dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for a [n_rows, n_cols] similarity over D.

    On a GPU: `gpu_blocks(dtype)` (D chunks shrink to the next power of two ≥ 16 for small D).
    Interpreted: the largest blocks the small test shapes allow, since interpreter cost grows
    with grid size × loop trips. No autotuning (it needs a GPU and would run at import time).
    """
    if INTERPRETED:
        def cover(n, cap):
            return max(16, min(cap, triton.next_power_of_2(n)))
        return cover(n_rows, 64), cover(n_cols, 64), cover(dim, 128), 4
    del n_rows, n_cols
    block_m, block_n, block_d, warps = gpu_blocks(dtype)
    return block_m, block_n, min(block_d, max(16, triton.next_power_of_2(dim))), warps
