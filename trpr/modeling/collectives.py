"""Differentiable collectives for data parallelism (torch.distributed, any backend).

    gather_rows(tensor [b, ...], world_size) -> [world_size * b, ...]   rank order; gradient flows back
    all_reduce_sum(tensor) -> tensor summed over the processes          with gradient

Both are the identity when torch.distributed is not initialised (one process). The training losses
(`modeling.losses`) gather their columns with `gather_rows`; `engine.distributed.sync_batch_norms`
injects `all_reduce_sum` into the fused heads' BatchNorm.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

# all_gather / all_reduce WITH autograd have no public replacement yet; silence their deprecation notice
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated",
                        category=FutureWarning)


def distributed_world_size() -> int:
    """Number of processes of the initialised default group, 1 without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_rows(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """[b, ...] on each process -> [world_size * b, ...] in rank order; differentiable for float tensors
    that require grad (the gradient of every process's loss flows back to the process that computed
    the rows), a plain all_gather otherwise. world_size 1: the tensor itself."""
    if world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    if tensor.is_floating_point() and tensor.requires_grad:
        return torch.cat(dist_nn.all_gather(tensor), dim=0)
    pieces = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(pieces, tensor)
    return torch.cat(pieces, dim=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over every process, with gradient (each process gets the sum)."""
    if distributed_world_size() == 1:
        return tensor
    return dist_nn.all_reduce(tensor)
