"""One training step of the reciprocal pair and one epoch of them (docs/method.md §3, §5).

The encoding of a batch view (`encode_view`) is shared with the ALR pass and the scripts
(`engine.alr_pass.score_samples`); the loss, its data parallelism and its reduction are
`modeling.losses.TrainingLoss`.
"""
from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from .optim import current_lrs


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops before the optimizer step, no checkpoint of that epoch is written."""


def trim_text_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut [B, 77] captions to the longest caption of the batch [B, L]. Exact: CLIP's text attention is
    causal and the padding follows EOT, so no kept position ever attended to a removed one."""
    length = int(attention_mask.sum(dim=1).max())
    return input_ids[:, :length], attention_mask[:, :length]


def encode_view(model, batch: dict, view: int, device, autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused features (text [b, D], image [b, D], fp32) of view `view` of a TrainViews batch
    (pixel_values [b, V, 3, H, W], input_ids / attention_mask [b, V, 77]); the captions are trimmed to
    the batch's longest. model: a TRPRModel or its DDP wrapper; autocast: a context factory
    (e.g. accelerator.autocast) around the forward, None for none."""
    input_ids, attention_mask = trim_text_padding(batch["input_ids"][:, view], batch["attention_mask"][:, view])
    with autocast() if autocast is not None else contextlib.nullcontext():
        out = model(pixel_values=batch["pixel_values"][:, view].to(device),
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    return out["text_fused"].float(), out["image_fused"].float()


def reciprocal_step(wrapped_models, optimizers, batch: dict, alr_state: dict, loss, accelerator,
                    where: str = "") -> list[float]:
    """One training step of both models on one batch; returns [loss A, loss B] of the global batch.

    batch: this process's share of a global batch from TrainViews(num_views=2) (model A takes view 0,
    model B view 1). alr_state: {"weights": [N], "keep": [N] bool} indexed by the dataset index.
    loss: a modeling.losses.TrainingLoss (rank / world size of this process). Each model: forward,
    loss on the global batch, backward, its own optimizer step.
    Raises TrainingDiverged on a non-finite loss (before that model's optimizer step)."""
    world = accelerator.num_processes
    index = batch["index"].to(accelerator.device)
    pids = batch["pid"].to(accelerator.device)
    weights, keep = alr_state["weights"][index], alr_state["keep"][index]
    losses = []
    for view, (model, optimizer) in enumerate(zip(wrapped_models, optimizers)):
        text, image = encode_view(model, batch, view, accelerator.device, accelerator.autocast)
        local = loss(text, image, pids, weights, keep)
        # DDP averages the gradients over the processes: scale so that they are those of the global loss
        accelerator.backward(local * world)
        global_loss = accelerator.reduce(local.detach(), reduction="sum").item()
        if not math.isfinite(global_loss):
            raise TrainingDiverged(f"non-finite loss ({global_loss}) of model {'AB'[view]} at {where}; "
                                   f"stopping without saving this epoch")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(global_loss)
    return losses


def train_one_epoch(wrapped_models, optimizers, loader, alr_state: dict, loss, accelerator, *, epoch: int,
                    epochs: int, global_step: int, log_every: int) -> tuple[dict, int]:
    """Every step of one epoch over `loader` (a DataLoader of TrainViews with a GlobalBatchSampler; their
    epoch is set here). Logs train/loss_a, loss_b and the learning rates every `log_every` steps.
    Returns ({"step", "loss_a", "loss_b" (epoch means), "lr_backbone", "lr_head"}, the new global step)."""
    loader.batch_sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    sums = torch.zeros(2, dtype=torch.float64)
    progress = tqdm(loader, desc=f"epoch {epoch}/{epochs - 1}", disable=not accelerator.is_main_process)
    for step, batch in enumerate(progress):
        step_losses = reciprocal_step(wrapped_models, optimizers, batch, alr_state, loss, accelerator,
                                      where=f"epoch {epoch}, step {step} (global step {global_step})")
        sums += torch.tensor(step_losses, dtype=torch.float64)
        global_step += 1
        progress.set_postfix(loss_a=f"{step_losses[0]:.4f}", loss_b=f"{step_losses[1]:.4f}", refresh=False)
        if global_step % log_every == 0:
            lrs = current_lrs(optimizers[0])
            accelerator.log({"train/loss_a": step_losses[0], "train/loss_b": step_losses[1],
                             "train/lr_backbone": lrs["lr_backbone"], "train/lr_head": lrs["lr_head"]},
                            step=global_step)
    steps = len(loader.batch_sampler)
    record = {"step": global_step, "loss_a": float(sums[0]) / steps, "loss_b": float(sums[1]) / steps,
              **current_lrs(optimizers[0])}
    return record, global_step
