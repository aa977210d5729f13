"""Benchmarks, synth-pedes, noisy correspondence, transforms and torch datasets.

Public API (docs/design.md): load_benchmark, verify_images, keep_rows, TrainViews, EvalImages, EvalTexts,
EpochKeyedBatches; the transforms and the tokenizer (and normalize_uint8) live in `data.transforms`.
Imports are lazy so that `from trpr import data` stays cheap.
"""
from __future__ import annotations

__all__ = ["load_benchmark", "verify_images", "keep_rows", "TrainViews", "EvalImages", "EvalTexts",
           "EpochKeyedBatches"]


def __getattr__(name: str):
    if name == "load_benchmark":
        from .benchmarks import load_benchmark

        return load_benchmark
    if name == "verify_images":
        from .images import verify_images

        return verify_images
    if name == "keep_rows":
        from .arrow_splits import keep_rows

        return keep_rows
    if name in ("TrainViews", "EvalImages", "EvalTexts", "EpochKeyedBatches"):
        from . import torch_datasets

        return getattr(torch_datasets, name)
    raise AttributeError(f"module 'trpr.data' has no attribute {name!r}")
