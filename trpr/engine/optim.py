"""Optimisation of one model: parameter groups, Adam, the per-epoch learning-rate schedule (docs/method.md §7)."""
from __future__ import annotations

import math

import torch

from trpr.configs.sections import OptimSection


BACKBONE_GROUPS = ("backbone", "backbone_bias")


def freeze_backbone(model: torch.nn.Module) -> None:
    """optim.backbone_lr 0: every backbone (clip.*) parameter stops requiring gradients, so the backbone
    gets no gradients (its forward builds no graph) and no optimizer group; the fused heads still train."""
    for name, parameter in model.named_parameters():
        if name.startswith("clip."):
            parameter.requires_grad_(False)


def drop_backbone_grads(optimizer) -> None:
    """Head warm-up (optim.head_warmup_epochs): the backbone groups' gradients are set to None before the
    step, so Adam leaves those parameters and their state (moments, step count) untouched."""
    for group in optimizer.param_groups:
        if group.get("name") in BACKBONE_GROUPS:
            for parameter in group["params"]:
                parameter.grad = None


def param_groups(model: torch.nn.Module, optim: OptimSection) -> list[dict]:
    """Backbone (clip.*) weights lr/wd, backbone biases lr x bias_lr_factor without decay, heads head_lr
    without decay (config `optim` section). Frozen parameters (the patch embedding; the whole backbone
    after `freeze_backbone`) are left out, and so are the backbone groups when backbone_lr is 0.
    Returns torch.optim groups with an extra "name" (backbone | backbone_bias | heads)."""
    groups = {"backbone": [], "backbone_bias": [], "heads": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if not name.startswith("clip."):
            groups["heads"].append(parameter)
        elif name.endswith("bias"):
            groups["backbone_bias"].append(parameter)
        else:
            groups["backbone"].append(parameter)
    settings = {"backbone": (optim.backbone_lr, optim.weight_decay),
                "backbone_bias": (optim.backbone_lr * optim.bias_lr_factor, 0.0),
                "heads": (optim.head_lr, 0.0)}
    return [{"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
            for name, params in groups.items() if params and not (name in BACKBONE_GROUPS and optim.backbone_lr == 0)]


def lr_factor(epoch: int, epochs: int, warmup_epochs: int, warmup_factor: float) -> float:
    """Per-epoch multiplier: linear from warmup_factor to 1 over the warm-up epochs, then cosine to 0."""
    if epoch < warmup_epochs:
        alpha = epoch / warmup_epochs
        return warmup_factor * (1 - alpha) + alpha
    span = max(epochs - warmup_epochs, 1)
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def head_warmup_factors(epochs: int, optim: OptimSection):
    """(backbone factor, head factor) per epoch with optim.head_warmup_epochs N > 0: during epochs 0..N-1 the
    backbone's factor is 0 and the heads train at their full lr (factor 1); from epoch N both follow the
    usual warm-up + cosine schedule over the remaining epochs (`lr_factor(epoch - N, epochs - N, ...)`)."""
    warm = optim.head_warmup_epochs

    def regular(epoch: int) -> float:
        return lr_factor(epoch - warm, epochs - warm, optim.warmup_epochs, optim.warmup_factor)

    return (lambda epoch: 0.0 if epoch < warm else regular(epoch)), (lambda epoch: 1.0 if epoch < warm else regular(epoch))


def build_optimizer(model: torch.nn.Module, optim: OptimSection, epochs: int):
    """(Adam, per-epoch LambdaLR over `epochs` = train.epochs) for one model from the optim section; Adam is
    fused (one kernel per step) where torch has a fused Adam for the parameters' device (build it after
    moving the model). With optim.head_warmup_epochs > 0 the schedule is per group (`head_warmup_factors`)."""
    groups = param_groups(model, optim)
    # fused: CUDA (no host sync, ~3 reads + 3 writes per parameter) and, since torch 2.4, the CPU, where it
    # is ~3.4x faster than the multi-tensor update on the demo's 49408x64 token table (5 vs 17 ms, 1 thread);
    # otherwise the multi-tensor (for-each) update, which PyTorch picks by itself only for CUDA tensors
    kind = {parameter.device.type for group in groups for parameter in group["params"]}
    fused = len(kind) == 1 and kind <= set(_fused_adam_devices())
    optimizer = torch.optim.Adam(groups, betas=tuple(optim.betas), eps=optim.eps,
                                 fused=True if fused else None, foreach=None if fused else True)
    schedule = lambda epoch: lr_factor(epoch, epochs, optim.warmup_epochs, optim.warmup_factor)  # noqa: E731
    if optim.head_warmup_epochs > 0:
        backbone, heads = head_warmup_factors(epochs, optim)
        schedule = [backbone if group["name"] in BACKBONE_GROUPS else heads for group in optimizer.param_groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _fused_adam_devices() -> list[str]:
    """Device types with a fused Adam in this torch ("cuda"; also "cpu" from torch 2.4 on)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return ["cuda"]
    return list(_get_fused_kernels_supported_devices())


def build_optimizers(models, optim: OptimSection, epochs: int, accelerator) -> tuple[list, list]:
    """([optimizer per model] prepared by the Accelerator, [scheduler per model]): `build_optimizer` each."""
    optimizers, schedulers = [], []
    for model in models:
        optimizer, scheduler = build_optimizer(model, optim, epochs)
        optimizers.append(accelerator.prepare(optimizer))
        schedulers.append(scheduler)
    return optimizers, schedulers


def current_lrs(optimizer) -> dict[str, float]:
    """{"lr_backbone": the backbone group's lr (0.0 when the backbone has no group: optim.backbone_lr 0),
    "lr_head": the heads group's (last group's) lr} of a built optimizer."""
    backbone = [group["lr"] for group in optimizer.param_groups if group.get("name") == "backbone"]
    if not backbone and optimizer.param_groups[0].get("name") is None:  # groups without names: the first
        backbone = [optimizer.param_groups[0]["lr"]]
    return {"lr_backbone": backbone[0] if backbone else 0.0, "lr_head": optimizer.param_groups[-1]["lr"]}
