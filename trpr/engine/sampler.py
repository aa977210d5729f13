"""The training batch order: global batches split evenly over the processes."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler):
    """Shuffled global batches of `global_batch` samples (incomplete last batch dropped); this process
    yields its contiguous share [rank*b, (rank+1)*b) of each, b = global_batch / world_size.
    The order is a pure function of (seed, epoch): one process or several see the same global batches."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size {global_batch} is not divisible by the {world_size} processes")
        if num_samples < global_batch:
            raise ValueError(f"train.batch_size {global_batch} exceeds the training set ({num_samples} samples)")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.local_batch = rank, global_batch // world_size
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.global_batch

    def __iter__(self):
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed))
        start = self.rank * self.local_batch
        for step in range(len(self)):
            first = step * self.global_batch + start
            yield order[first:first + self.local_batch].tolist()
