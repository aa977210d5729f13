"""Noisy correspondence (RDE protocol, docs/method.md §6).

A noise permutation π is an int64 array over the N training samples: the caption of sample i becomes
caption[π(i)]; its image, pid and index stay. With only a rate r, π permutes a random r-fraction of the
indices among themselves (the others map to themselves); a moved index may land on itself by chance, so
the fraction of actually moved captions is reported.

The valid noise rates are [0, 1) (`check_noise_rate`, the one rule the loader and the config check
use): at rate 1 every caption is a candidate for permutation and no clean pair is left for the loss
refinement's two-component mixture to find; the published settings are 0.2, 0.5 and 0.8.

Standard files: RDE's repository ships one permutation per benchmark and rate in its `noiseindex/`
folder (`CUHK-PEDES_0.2.npy` ... `RSTPReid_0.8.npy`, int64 over the training captions in annotation
order); `standard_noise_file` names where `load_benchmark` looks for them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np


NOISE_RATE_RANGE = "[0, 1)"
NPY_MAGIC = b"\x93NUMPY"


def check_noise_rate(rate: float, name: str = "noise_rate") -> float:
    """`rate` as a float when it lies in [0, 1); otherwise ValueError naming `name` and the range."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must lie in {NOISE_RATE_RANGE} (a fraction of the training captions below 1), "
                         f"got {rate!r}")
    return float(rate)


def standard_noise_file(root: Union[str, Path], dataset_folder: str, rate: float) -> Path:
    """`<root>/noiseindex/<dataset_folder>_<rate>.npy`, RDE's name (rate as Python prints it: 0.2, 0.5, 0.8)."""
    return Path(root) / "noiseindex" / f"{dataset_folder}_{float(rate)!r}.npy"


def generate_permutation(num_samples: int, rate: float, seed: int = 0) -> np.ndarray:
    """int64 [num_samples]: identity except on a random round(rate·N) subset, which is shuffled among itself."""
    check_noise_rate(rate)
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
    """Read and validate an RDE-style `.npy` permutation for `num_samples` training samples; a file that is
    not a plain numeric `.npy` array raises ValueError saying what it is instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"noise file {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(len(NPY_MAGIC))
    if head != NPY_MAGIC:
        what = ("a zip archive (.npz?), not a single .npy array" if head.startswith(b"PK") else
                "empty" if not head else f"not a .npy file (it starts with {head!r}, not the NumPy magic {NPY_MAGIC!r})")
        raise ValueError(f"noise file {path}: {what}; expected an int64 .npy permutation (numpy.save)")
    try:
        permutation = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise ValueError(f"noise file {path}: holds Python objects (dtype object, pickled), not integers; "
                             "expected an int64 .npy permutation") from None
        raise ValueError(f"noise file {path}: damaged .npy file ({error})") from None
    except (OSError, EOFError) as error:
        raise ValueError(f"noise file {path}: damaged or truncated .npy file ({error})") from None
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
