"""One training step of the reciprocal pair and one epoch of them (docs/method.md §3, §5).

The encoding of a batch view is `encode_view`; the loss, its data parallelism and its reduction are
`modeling.losses.TrainingLoss`.

No host synchronisation per step: the batch is copied to the device without blocking (pinned memory),
uint8 pixels are normalised on the device, the caption length used for trimming is read from the
host copy of the attention mask, and the losses stay on the device. Their finiteness is checked every
`log_every` steps and at the end of the epoch (`train_one_epoch`), one synchronisation each.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from tqdm.auto import tqdm

from trpr.data.transforms import normalize_uint8

from .alr_state import AlrState
from .compilation import fast_math
from .optim import current_lrs, drop_backbone_grads
from .timing import StepClock

TEXT_LENGTHS = "text_lengths"  # batch key (host list [V]) written by batch_to_device


class TrainingDiverged(RuntimeError):
    """A non-finite loss. Raised at the first check after it (every `train.log_every` steps and at the end
    of the epoch), before any checkpoint or metrics record of that epoch is written: last/ and best/ keep
    the previous epoch, so `--resume` continues from there."""


def trim_text_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut [B, 77] captions to the longest caption of the batch [B, L]. Exact: CLIP's text attention is
    causal and the padding follows EOT, so no kept position ever attended to a removed one.
    (A device tensor is read back to the host for L: pass host tensors, or use `batch_to_device`.)"""
    length = int(attention_mask.sum(dim=1).max())
    return input_ids[:, :length], attention_mask[:, :length]


def text_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Per view, the longest caption of a host [b, V, L] attention mask (the trimmed length); raises
    ValueError unless every row is right-padded (ones then zeros) with at least SOT and EOT."""
    lengths = attention_mask.sum(dim=-1)
    positions = torch.arange(attention_mask.shape[-1])
    if not torch.equal(attention_mask.bool(), positions < lengths[..., None]) or bool((lengths < 2).any()):
        raise ValueError("attention_mask must be right-padded (ones then zeros) with at least SOT and EOT in every row")
    return lengths.amax(dim=0).tolist()


def batch_to_device(batch: dict, device) -> dict:
    """A TrainViews batch (host tensors; pinned by a `pin_memory` DataLoader) on `device`, copied without
    blocking the host. Adds TEXT_LENGTHS (per view, the batch's longest caption, read from the host mask
    so that trimming needs no device read-back). uint8 pixels stay uint8 (normalised per view by
    `view_pixels`, on the device)."""
    moved = {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
             for key, value in batch.items()}
    moved[TEXT_LENGTHS] = text_lengths(batch["attention_mask"])
    return moved


def view_pixels(batch: dict, view: int, device) -> torch.Tensor:
    """CLIP-normalised float32 pixels [b, 3, H, W] of view `view` on `device`: a float batch is moved as it
    is; a uint8 batch (TrainViews(output="uint8")) is moved as uint8 and normalised there, its erase boxes
    filled (`data.transforms.normalize_uint8`: on the CPU bit-identical to the float path)."""
    pixels = batch["pixel_values"][:, view].to(device, non_blocking=True)
    if pixels.dtype != torch.uint8:
        return pixels
    boxes = batch.get("erase_boxes")
    return normalize_uint8(pixels, None if boxes is None else boxes[:, view].to(device, non_blocking=True))


def view_text(batch: dict, view: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [b, L] of view `view` on `device`, cut to the batch's longest caption
    (from TEXT_LENGTHS when `batch_to_device` made the batch, else from the mask: `trim_text_padding`)."""
    input_ids, attention_mask = batch["input_ids"][:, view], batch["attention_mask"][:, view]
    if TEXT_LENGTHS in batch:
        length = batch[TEXT_LENGTHS][view]
        input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
    else:
        input_ids, attention_mask = trim_text_padding(input_ids, attention_mask)
    return input_ids.to(device, non_blocking=True), attention_mask.to(device, non_blocking=True)


def encode_view(model, batch: dict, view: int, device, autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused features (text [b, D], image [b, D], fp32) of view `view` of a TrainViews batch
    (pixel_values [b, V, 3, H, W] float or uint8 (+ erase_boxes [b, V, 4]), input_ids / attention_mask
    [b, V, 77]), on the host or already moved by `batch_to_device`; the captions are trimmed to the
    batch's longest. model: a TRPRModel or its DDP wrapper; autocast: a context factory
    (e.g. accelerator.autocast) around the forward, None for none. The forward runs under
    `engine.fast_math(device)` (TF32 on CUDA), and only the forward."""
    pixel_values = view_pixels(batch, view, device)
    input_ids, attention_mask = view_text(batch, view, device)
    with autocast() if autocast is not None else contextlib.nullcontext(), fast_math(device):
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    return out["text_fused"].float(), out["image_fused"].float()


def reciprocal_step(wrapped_models, optimizers, batch: dict, alr_state: AlrState, loss, accelerator, *,
                    freeze_backbone: bool = False) -> torch.Tensor:
    """One training step of both models on one batch. Returns this process's shares of [loss A, loss B]
    (fp32 [2], detached, on the device; summed over the processes they are the global batch's losses).

    batch: this process's share of a global batch from TrainViews(num_views=2) (model A takes view 0,
    model B view 1), on the host or moved by `batch_to_device`. alr_state: the per-sample weights and keep
    flags (`AlrState`, on the device), indexed by the dataset index. loss: a modeling.losses.TrainingLoss (rank / world
    size of this process). Each model: forward, loss on the global batch, backward, its own optimizer step.
    Nothing is read back to the host: a non-finite loss is found by the caller (`train_one_epoch`).
    freeze_backbone (a head warm-up epoch, optim.head_warmup_epochs): the backbone groups' gradients are
    dropped before each step (`optim.drop_backbone_grads`), so only the fused heads change."""
    device = accelerator.device
    if TEXT_LENGTHS not in batch:
        batch = batch_to_device(batch, device)
    world = accelerator.num_processes
    index, pids = batch["index"].to(device), batch["pid"].to(device)
    weights, keep = alr_state.rows(index)
    shares = []
    for view, (model, optimizer) in enumerate(zip(wrapped_models, optimizers)):
        text, image = encode_view(model, batch, view, device, accelerator.autocast)
        local = loss(text, image, pids, weights, keep)
        # DDP averages the gradients over the processes: scale so that they are those of the global loss
        accelerator.backward(local * world)
        if freeze_backbone:
            drop_backbone_grads(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        shares.append(local.detach().float())
    return torch.stack(shares)


def start_epoch(loader, epoch: int) -> Iterator:
    """Set `epoch` on the loader's batch sampler (an EpochKeyedBatches / GlobalBatchSampler) and dataset,
    and start iterating it: persistent workers begin decoding that epoch's first batches now (the trainer
    calls this right after the previous epoch's steps, so they decode while it validates and saves)."""
    if hasattr(loader.batch_sampler, "set_epoch"):
        loader.batch_sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    return iter(loader)


class LossTally:
    """The steps' loss shares, summed on the device (float64), and the first step at which each model's
    share was not finite; read back (and reduced over the processes) only by `read`."""

    def __init__(self, device):
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.first_bad = torch.full((2,), -1, dtype=torch.long, device=device)
        self.steps = 0

    def add(self, shares: torch.Tensor, step: int) -> None:
        self.sums += shares
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(shares), step, self.first_bad)
        self.steps += 1

    def read(self, accelerator) -> tuple[list[float], list[int]]:
        """(summed global losses [A, B], first non-finite step per model over all processes or -1). One sync."""
        sums = accelerator.reduce(self.sums.clone(), reduction="sum").tolist()
        bad = accelerator.gather(self.first_bad[None]).cpu()
        first = [int(column[column >= 0].min()) if (column >= 0).any() else -1 for column in bad.T]
        return sums, first


def non_finite_lr(optimizers) -> str | None:
    """"model A, group backbone: lr inf" for the first parameter group whose learning rate is not a finite
    number, else None (host values: no device sync)."""
    for model, optimizer in zip("AB", optimizers):
        for index, group in enumerate(optimizer.param_groups):
            lr = group["lr"]
            lr = lr.item() if isinstance(lr, torch.Tensor) else lr
            if not math.isfinite(lr):
                return f"model {model}, parameter group {group.get('name', index)}: learning rate {lr}"
    return None


def non_finite_weights(models, accelerator=None) -> list[bool]:
    """Per model, whether any parameter holds a NaN or infinite value (any process; one device sync)."""
    flags = []
    for model in models:
        params = [p.detach() for p in model.parameters()]
        flags.append(torch.stack([torch.isfinite(p).all() for p in params]).all().logical_not()
                     if params else torch.zeros((), dtype=torch.bool))
    bad = torch.stack(flags).float()
    if accelerator is not None and accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return [bool(value > 0) for value in bad.tolist()]


def _check_finite(first_bad: list[int], epoch: int, first_global_step: int, optimizers=None, models=None,
                  accelerator=None, step: int | None = None) -> None:
    """TrainingDiverged (one line naming the epoch and step) when a learning rate (`optimizers`), a loss
    (`first_bad`, from LossTally.read) or, with `models`, a weight is not finite; `step`: the steps done."""
    where = f"at epoch {epoch}, step {step} (global step {first_global_step + step})" if step is not None else \
        f"at epoch {epoch}"
    lr = non_finite_lr(optimizers) if optimizers is not None else None
    if lr is not None:
        raise TrainingDiverged(f"non-finite {lr} {where}: check optim.backbone_lr / optim.head_lr; stopping without "
                               "saving this epoch")
    for model, step_bad in enumerate(first_bad):
        if step_bad >= 0:
            raise TrainingDiverged(f"non-finite loss of model {'AB'[model]} at epoch {epoch}, step {step_bad} "
                                   f"(global step {first_global_step + step_bad}); stopping without saving this epoch")
    if models is not None:
        for model, bad in zip("AB", non_finite_weights(models, accelerator)):
            if bad:
                raise TrainingDiverged(f"non-finite weights of model {model} {where} (the run diverged: lower "
                                       "optim.backbone_lr / optim.head_lr); stopping without saving this epoch")


def train_one_epoch(wrapped_models, optimizers, loader, alr_state: AlrState, loss, accelerator, *, epoch: int,
                    epochs: int, global_step: int, log_every: int, batches: Iterator | None = None,
                    max_steps: int | None = None, freeze_backbone: bool = False) -> tuple[dict, int]:
    """Every step of one epoch over `loader` (a DataLoader of TrainViews, batch sampler EpochKeyedBatches
    or GlobalBatchSampler), or over `batches` when given (an iterator from `start_epoch(loader, epoch)`,
    already decoding); at most `max_steps` steps (benchmarks); freeze_backbone: a head warm-up epoch
    (`reciprocal_step`). Every `log_every` steps: the mean losses
    and learning rates since the last log go to the trackers and the progress bar, and the losses are
    checked (TrainingDiverged names the first non-finite step); the same at the end of the epoch.
    Returns ({"step", "loss_a", "loss_b" (epoch means), "lr_backbone", "lr_head", "steps",
    "data_wait_s", "compute_s"}, the new global step). The device is synchronised before returning."""
    device = accelerator.device
    if batches is None:
        batches = start_epoch(loader, epoch)
    total = len(loader) if max_steps is None else min(max_steps, len(loader))
    tally, clock = LossTally(device), StepClock(device)
    logged_sums, logged_steps = [0.0, 0.0], 0
    first_global_step = global_step
    progress = tqdm(total=total, desc=f"epoch {epoch}/{epochs - 1}", disable=not accelerator.is_main_process)
    for step in range(total):
        try:
            batch = clock.next_batch(batches)
        except StopIteration:
            break
        clock.step_started()
        shares = reciprocal_step(wrapped_models, optimizers, batch_to_device(batch, device), alr_state, loss,
                                 accelerator, freeze_backbone=freeze_backbone)
        tally.add(shares, step)
        clock.step_finished()
        global_step += 1
        progress.update()
        if global_step % log_every == 0:
            sums, first_bad = tally.read(accelerator)
            _check_finite(first_bad, epoch, first_global_step, optimizers, wrapped_models, accelerator, step + 1)
            count = tally.steps - logged_steps
            means = [(now - before) / count for now, before in zip(sums, logged_sums)]
            logged_sums, logged_steps = sums, tally.steps
            progress.set_postfix(loss_a=f"{means[0]:.4f}", loss_b=f"{means[1]:.4f}")
            lrs = current_lrs(optimizers[0])
            accelerator.log({"train/loss_a": means[0], "train/loss_b": means[1],
                             "train/lr_backbone": lrs["lr_backbone"], "train/lr_head": lrs["lr_head"]},
                            step=global_step)
    progress.close()
    sums, first_bad = tally.read(accelerator)  # synchronises the device: the step clock can be read
    _check_finite(first_bad, epoch, first_global_step, optimizers, wrapped_models, accelerator, tally.steps)
    steps = max(tally.steps, 1)
    record = {"step": global_step, "loss_a": sums[0] / steps, "loss_b": sums[1] / steps,
              **current_lrs(optimizers[0]), "steps": tally.steps, **clock.totals()}
    return record, global_step
