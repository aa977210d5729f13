"""Work split across the processes of an Accelerate launch: each process takes a contiguous share of N
items, and the shares are gathered back in rank order (the sharded encoder, the ALR pass, evaluation).

`accelerator` may be None (one process) or anything with `num_processes`, `process_index` and `gather`.
"""
from __future__ import annotations

import math

import torch


def shard_indices(num_items: int, accelerator) -> tuple[list[int], int]:
    """This process's contiguous share of range(num_items), padded by repeating the last index so that
    every process encodes the same count (a gather needs equal shapes). Returns (indices, per_process)."""
    processes = 1 if accelerator is None else accelerator.num_processes
    rank = 0 if accelerator is None else accelerator.process_index
    per_process = math.ceil(num_items / processes)
    start = rank * per_process
    return [min(i, num_items - 1) for i in range(start, start + per_process)], per_process


def gather_shares(share: torch.Tensor, total: int, accelerator) -> torch.Tensor:
    """Every process's `share` [per_process, ...] (from shard_indices) in rank order, the padding dropped:
    [total, ...] on every process, on `share`'s device (gathered on the accelerator's device). One
    process: `share` itself."""
    if accelerator is None or accelerator.num_processes == 1:
        return share
    return accelerator.gather(share.to(accelerator.device))[:total].to(share.device)
