"""Float32 matrix-product precision, scoped: exact products inside the losses and retrieval scores.

`torch.set_float32_matmul_precision` is process-global. The trainer lets the model's forward use TF32
(`engine.compilation.fast_math`, CUDA only); the loss slabs (`kernels.slab`) and the retrieval scores
(`kernels.retrieval`, `kernels.reference`) must not inherit it, or validation inside the trainer and
`eval_3rtpr.py` (which never turns TF32 on) would rank with different scores for the same checkpoint.
So every public kernel entry point runs under `exact_float32()`, whatever the caller set.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PRECISIONS = ("highest", "high", "medium")


@contextlib.contextmanager
def matmul_precision(level: str) -> Iterator[None]:
    """torch's float32 matmul precision set to `level` ("highest" | "high" | "medium") inside the
    block and restored afterwards (also on an exception). Not thread-local: torch's setting is global."""
    if level not in PRECISIONS:
        raise ValueError(f"matmul precision must be one of {PRECISIONS}, got {level!r}")
    previous = torch.get_float32_matmul_precision()
    if previous == level:
        yield
        return
    torch.set_float32_matmul_precision(level)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def exact_float32() -> contextlib.AbstractContextManager:
    """Full float32 products (no TF32 / bf16 passes) inside the block."""
    return matmul_precision("highest")
