"""Noisy correspondence (RDE protocol, METHOD.md §6).

A noise permutation π is an int64 array over the N training samples: the caption of sample i becomes
caption[π(i)]; its image, pid and index stay. With only a rate r, π permutes a random r-fraction of the
indices among themselves (the others map to themselves); a moved index may land on itself by chance, so
the fraction of actually moved captions is reported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np


def generate_permutation(num_samples: int, rate: float, seed: int = 0) -> np.ndarray:
    """int64 [num_samples]: identity except on a random round(rate·N) subset, which is shuffled among itself."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {rate}")
    rng = np.random.default_rng(seed)
    permutation = np.arange(num_samples, dtype=np.int64)
    chosen = rng.permutation(num_samples)[: int(round(rate * num_samples))]
    permutation[chosen] = rng.permutation(chosen)
    return permutation


def validate_permutation(permutation: np.ndarray, num_samples: int, source: str = "noise permutation") -> np.ndarray:
    """Check that `permutation` is a 1-D integer permutation of range(num_samples); returns it as int64.
    Errors name `source` (the file) and what is wrong."""
    permutation = np.asarray(permutation)
    if permutation.ndim != 1:
        raise ValueError(f"{source}: expected a 1-D array, got shape {permutation.shape}")
    if not np.issubdtype(permutation.dtype, np.integer):
        raise ValueError(f"{source}: expected integer indices, got dtype {permutation.dtype}")
    if len(permutation) != num_samples:
        raise ValueError(f"{source}: has {len(permutation)} entries but the training split has {num_samples} "
                         "samples (one per caption); the file belongs to another dataset or noise setting")
    counts = np.bincount(np.clip(permutation, 0, max(num_samples - 1, 0)), minlength=num_samples)
    out_of_range = np.flatnonzero((permutation < 0) | (permutation >= num_samples))
    if len(out_of_range):
        i = int(out_of_range[0])
        raise ValueError(f"{source}: entry {i} is {int(permutation[i])}, outside [0, {num_samples})")
    if num_samples and counts.max() > 1:
        value = int(np.flatnonzero(counts > 1)[0])
        raise ValueError(f"{source}: value {value} appears {int(counts[value])} times; not a permutation")
    return permutation.astype(np.int64)


def load_permutation(path: Union[str, Path], num_samples: int) -> np.ndarray:
    """Read and validate an RDE-style `.npy` permutation for `num_samples` training samples."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"noise file {path} does not exist")
    try:
        permutation = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"noise file {path}: not a readable .npy array ({error})") from error
    return validate_permutation(permutation, num_samples, source=f"noise file {path}")


def save_permutation(path: Union[str, Path], permutation: np.ndarray) -> Path:
    """Write `permutation` as int64 `.npy` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(permutation, dtype=np.int64), allow_pickle=False)
    return path


def apply_permutation(captions: Sequence[str], permutation: np.ndarray) -> tuple[list[str], list[bool]]:
    """(captions[π(i)] for each i, noisy flags): a sample is noisy when its caption text changed."""
    shuffled = [captions[int(j)] for j in permutation]
    noisy = [new != old for new, old in zip(shuffled, captions)]
    return shuffled, noisy
