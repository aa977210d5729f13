"""Triton building blocks shared by the kernels: interpreter flag, −∞ stand-in, similarity tiles.

Feature matrices are row-major contiguous [N, D]; row offsets are computed in int64 so that
N·D may exceed 2³¹. Products accumulate in float32. ``UPCAST`` converts the loaded operands to
float32 before `tl.dot` (float32 inputs, and always under TRITON_INTERPRET=1); ``PRECISION`` is
the `tl.dot` input precision ("ieee" for float32 so that scores match PyTorch's float32 to
~1e-6; unused for fp16/bf16 operands, which run on the tensor cores).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""True when Triton runs in its CPU interpreter (set before triton is imported). The interpreter
cannot load bfloat16 (garbage) and computes a wrong bf16 `tl.dot`: callers upcast bf16 on the host."""

NEG_BIG = tl.constexpr(-1.0e30)
"""Finite stand-in for −∞ in masked logits: exp(NEG_BIG − m) is exactly 0 and 0·NEG_BIG is 0.
A `tl.constexpr` because compiled kernels may only read constexpr globals."""


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION) constexprs for features of `dtype` (see module docstring)."""
    upcast = INTERPRETED or dtype == torch.float32
    return upcast, ("ieee" if upcast else "tf32")


@triton.jit
def similarity_tile(R, C, rows, cols, row_mask, col_mask, D,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] float32 tile R[rows] @ C[cols]ᵀ; masked rows/cols read zeros.

    The D loop runs in the same order for every tile, so a pair (row, col) gets bit-identical
    scores wherever in a tile it sits (the retrieval kernel relies on this).
    """
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
