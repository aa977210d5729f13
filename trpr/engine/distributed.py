"""Data-parallel helpers of the training engine (the losses gather for themselves: `modeling.losses`)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from trpr.modeling.collectives import all_reduce_sum
from trpr.modeling.fused import MaskedBatchNorm1d

UNSUPPORTED_DISTRIBUTED_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def sync_batch_norms(model: torch.nn.Module) -> None:
    """Make the training statistics of every MaskedBatchNorm1d of `model` span all processes (mean and
    variance all-reduced with gradient), so that DDP sees the batch statistics of one process on the
    global batch. Eval mode and the parameters/buffers are unchanged."""
    for module in model.modules():
        if isinstance(module, MaskedBatchNorm1d):
            module.reduce_statistics = all_reduce_sum


def check_distributed_type(accelerator) -> None:
    """SystemExit for sharded strategies: the ALR pass, validation and checkpoints use unsharded models."""
    name = accelerator.distributed_type.name
    if name in UNSUPPORTED_DISTRIBUTED_TYPES:
        raise SystemExit(f"{name} is not supported: the ALR pass, validation and checkpoints use the unsharded "
                         f"models. A ViT-B/16 pair fits one GPU: use DDP "
                         f"(accelerate_configs/multi_gpu_ddp_bf16.yaml, also across nodes).")


def broadcast_from_main(*tensors: torch.Tensor) -> None:
    """Overwrite `tensors` on every process with the main process's values (in place; no-op alone)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)
