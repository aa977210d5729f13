"""One training step of the reciprocal pair and one epoch of them (docs/method.md §3, §5).

The encoding of a batch view is `encode_view`; the loss, its data parallelism and its reduction are
`modeling.losses.TrainingLoss`.

The batch reaches the device in one place: `train_one_epoch` turns every loader batch into a
`batch.TrainBatch` (`batch_to_device`), and the step reads that device copy only.

No host synchronisation per step: the batch is copied to the device without blocking (pinned memory),
uint8 pixels are normalised on the device, the caption length used for trimming is read from the
host copy of the attention mask, and the losses stay on the device. Their finiteness is checked every
`log_every` steps and at the end of the epoch (`train_one_epoch`), one synchronisation each.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .alr_state import AlrState
from .batch import TrainBatch, batch_to_device
from .compilation import fast_math
from .optim import current_lrs, drop_backbone_grads
from .timing import StepClock

class TrainingDiverged(RuntimeError):
    """A non-finite loss. Raised at the first check after it (every `train.log_every` steps and at the end
    of the epoch), before any checkpoint or metrics record of that epoch is written: last/ and best/ keep
    the previous epoch, so `--resume` continues from there."""


def trim_text_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut [B, 77] captions to the longest caption of the batch [B, L]. Exact: CLIP's text attention is
    causal and the padding follows EOT, so no kept position ever attended to a removed one.
    (A device tensor is read back to the host for L: pass host tensors; training batches are cut by
    `TrainBatch.text` instead.)"""
    length = int(attention_mask.sum(dim=1).max())
    return input_ids[:, :length], attention_mask[:, :length]


def encode_view(model, batch: TrainBatch, view: int, autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused features (text [b, D], image [b, D], fp32) of view `view` of a TrainBatch (its pixels
    normalised and its captions trimmed to the view's longest, on the batch's device). model: a
    TRPRModel or its DDP wrapper; autocast: a context factory (e.g. accelerator.autocast) around the
    forward, None for none. The forward runs under `engine.compilation.fast_math(device)` (TF32 on CUDA), and only
    the forward."""
    pixel_values = batch.pixels(view)
    input_ids, attention_mask = batch.text(view)
    with autocast() if autocast is not None else contextlib.nullcontext(), fast_math(batch.device):
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    return out["text_fused"].float(), out["image_fused"].float()


def reciprocal_step(wrapped_models, optimizers, batch: TrainBatch, alr_state: AlrState, loss, accelerator, *,
                    freeze_backbone: bool = False) -> torch.Tensor:
    """One training step of both models on one batch. Returns this process's shares of [loss A, loss B]
    (fp32 [2], detached, on the device; summed over the processes they are the global batch's losses).

    batch: this process's share of a global batch from TrainViews(num_views=2) (model A takes view 0,
    model B view 1), on the device (`batch_to_device`). alr_state: the per-sample weights and keep
    flags (`AlrState`, on the device), indexed by the dataset index. loss: a modeling.losses.TrainingLoss
    (rank / world size of this process). Each model: forward, loss on the global batch, backward, its
    own optimizer step. Nothing is read back to the host: a non-finite loss is found by the caller (`train_one_epoch`).
    freeze_backbone (a head warm-up epoch, optim.head_warmup_epochs): the backbone groups' gradients are
    dropped before each step (`optim.drop_backbone_grads`), so only the fused heads change."""
    if not isinstance(batch, TrainBatch):
        raise TypeError(f"reciprocal_step takes a TrainBatch on the device (engine.batch_to_device), "
                        f"got {type(batch).__name__}")
    world = accelerator.num_processes
    weights, keep = alr_state.rows(batch.index)
    shares = []
    for view, (model, optimizer) in enumerate(zip(wrapped_models, optimizers)):
        text, image = encode_view(model, batch, view, accelerator.autocast)
        local = loss(text, image, batch.pids, weights, keep)
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


@dataclass(frozen=True)
class EpochSteps:
    """What `train_one_epoch` did: the global step after it, the epoch's mean losses of A and B (global
    batch, per step), the learning rates at its end (backbone, heads), the steps run and the seconds spent
    waiting for data / computing (engine.timing.StepClock)."""

    step: int
    loss_a: float
    loss_b: float
    lr_backbone: float
    lr_head: float
    steps: int
    data_wait_s: float
    compute_s: float

    def step_times(self) -> dict[str, float]:
        """{"data_wait_s", "compute_s"}: the step phase's share of `engine.epoch_timing`."""
        return {"data_wait_s": self.data_wait_s, "compute_s": self.compute_s}


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
                    max_steps: int | None = None, freeze_backbone: bool = False) -> tuple[EpochSteps, int]:
    """Every step of one epoch over `loader` (a DataLoader of TrainViews, batch sampler EpochKeyedBatches
    or GlobalBatchSampler), or over `batches` when given (an iterator from `start_epoch(loader, epoch)`,
    already decoding); each host batch is moved to the device here (`batch_to_device`, the one place);
    at most `max_steps` steps (benchmarks); freeze_backbone: a head warm-up epoch (`reciprocal_step`).
    Every `log_every` steps: the mean losses and learning rates since the last log go to the trackers
    and the progress bar, and the losses are checked (TrainingDiverged names the first non-finite step); the same at the end of the epoch.
    Returns (EpochSteps, the new global step). The device is synchronised before returning."""
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
    summary = EpochSteps(step=global_step, loss_a=sums[0] / steps, loss_b=sums[1] / steps,
                         **current_lrs(optimizers[0]), steps=tally.steps, **clock.totals())
    return summary, global_step
