"""Benchmarks, synth-pedes, noisy correspondence, transforms and torch datasets.

Public API (docs/design.md): load_benchmark, TrainViews, EvalImages, EvalTexts; the transforms and the
tokenizer live in `data.transforms`. Imports are lazy so that `import data` stays cheap.
"""
from __future__ import annotations

__all__ = ["load_benchmark", "TrainViews", "EvalImages", "EvalTexts"]


def __getattr__(name: str):
    if name == "load_benchmark":
        from .benchmarks import load_benchmark

        return load_benchmark
    if name in ("TrainViews", "EvalImages", "EvalTexts"):
        from . import torch_datasets

        return getattr(torch_datasets, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
