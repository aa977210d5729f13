"""The ALR state the training steps read (docs/method.md §3-§4): one weight w and one keep flag h per
training sample, indexed by the training split's `index` column (0..N-1).

    state = AlrState.initial(N, device)          # before the first ALR pass: every w = 1, every h = True
    weights, keep = state.rows(index)            # a batch's rows: float32 [b], bool [b]
    state.save(path); AlrState.load(path, device)

One dtype each, everywhere (pass, broadcast, steps, snapshot, file): weights float32, keep bool. keep is
turned into a number in one place only, where the loss multiplies it (`modeling.losses.sample_weights`).
On disk it is last/training_state/alr_state.safetensors, written by `state_files.save_state` as the
mapping {"weights": [N] float32, "keep": [N] bool} (the layout every earlier run folder has).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .state_files import load_state, save_state

WEIGHT_DTYPE = torch.float32


@dataclass
class AlrState:
    """weights: float32 [N], the ALR weights w in (0, 1] (no gradient); keep: bool [N], the keep flags h;
    both on the same device, indexed by the training set's `index`."""

    weights: torch.Tensor
    keep: torch.Tensor

    def __post_init__(self):
        if self.weights.dtype != WEIGHT_DTYPE or self.keep.dtype != torch.bool:
            raise ValueError(f"AlrState: weights must be float32 and keep bool, got {self.weights.dtype} and "
                             f"{self.keep.dtype}")
        if self.weights.dim() != 1 or self.keep.shape != self.weights.shape:
            raise ValueError(f"AlrState: weights and keep must be [N] of one length, got "
                             f"{list(self.weights.shape)} and {list(self.keep.shape)}")

    @classmethod
    def initial(cls, num_samples: int, device) -> "AlrState":
        """Before the first ALR pass (and on every ALR-free epoch): every weight 1, every sample kept."""
        return cls(torch.ones(num_samples, dtype=WEIGHT_DTYPE, device=device),
                   torch.ones(num_samples, dtype=torch.bool, device=device))

    def __len__(self) -> int:
        return self.weights.numel()

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights float32 [b], keep bool [b]) of the samples `index` [b] (int64, on the state's device)."""
        return self.weights[index], self.keep[index]

    def to(self, device) -> "AlrState":
        return AlrState(self.weights.to(device), self.keep.to(device))

    def host_copy(self) -> "AlrState":
        """A detached copy on the CPU (a checkpoint snapshot: later changes to this state do not reach it)."""
        return AlrState(self.weights.detach().cpu().clone(), self.keep.detach().cpu().clone())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"weights", "keep"}: the file's mapping (this key order)."""
        return {"weights": self.weights, "keep": self.keep}

    @classmethod
    def from_state_dict(cls, state) -> "AlrState":
        """The inverse of `state_dict`; ValueError unless `state` maps "weights" (float [N]) and "keep"
        (bool [N]) to tensors of one length."""
        if not (isinstance(state, dict) and all(isinstance(state.get(k), torch.Tensor) for k in ("weights", "keep"))):
            raise ValueError("not an ALR state (tensors weights and keep)")
        weights, keep = state["weights"], state["keep"]
        if not weights.is_floating_point():
            raise ValueError(f"not an ALR state: weights of dtype {weights.dtype}")
        return cls(weights.to(WEIGHT_DTYPE), keep)

    def save(self, path: str | Path) -> None:
        """alr_state.safetensors (`state_files.save_state` of `state_dict()`, tensors copied to the host)."""
        save_state(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "AlrState":
        """The state `save` (or any earlier trainer) wrote to `path`, on `device`. state_files.StateFileError
        for a missing or damaged file, ValueError for a file that holds something else."""
        return cls.from_state_dict(load_state(path)).to(device)
