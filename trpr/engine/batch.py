"""A training batch on the device (docs/method.md §3): `batch_to_device` is the one way a TrainViews batch
gets there, and the step reads the device copy only.

    batch = batch_to_device(host_batch, device)        # TrainBatch; checks the caption padding on the host
    pixels = batch.pixels(view)                        # float32 [b, 3, H, W], CLIP-normalised
    input_ids, attention_mask = batch.text(view)       # [b, L_view], cut to the view's longest caption

No host synchronisation: the copies do not block (pinned memory), uint8 pixels are normalised on the
device, and each view's caption length is read from the host mask before the copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trpr.data.transforms import normalize_uint8


@dataclass(frozen=True)
class TrainBatch:
    """This process's share of a global TrainViews batch (b samples, V views), on one device.

    index: int64 [b], the samples' dataset index (rows of `AlrState`); pids: int64 [b];
    pixel_values: [b, V, 3, H, W], float32 (normalised) or uint8 (not normalised, TrainViews(output="uint8"));
    erase_boxes: int64 [b, V, 4] (top, left, h, w) with uint8 pixels, else None;
    input_ids, attention_mask: int64 [b, V, 77]; text_lengths: per view, the longest caption (host ints)."""

    index: torch.Tensor
    pids: torch.Tensor
    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    text_lengths: tuple[int, ...]
    erase_boxes: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.index.device

    def pixels(self, view: int) -> torch.Tensor:
        """CLIP-normalised float32 pixels [b, 3, H, W] of view `view`: float pixels as they are, uint8 ones
        normalised here (on the device) with their erase boxes filled (`data.transforms.normalize_uint8`:
        on the CPU bit-identical to the float path)."""
        pixels = self.pixel_values[:, view]
        if pixels.dtype != torch.uint8:
            return pixels
        return normalize_uint8(pixels, None if self.erase_boxes is None else self.erase_boxes[:, view])

    def text(self, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [b, L] of view `view`, cut to its longest caption L (exact: CLIP's text
        attention is causal and the padding follows EOT)."""
        length = self.text_lengths[view]
        return self.input_ids[:, view, :length], self.attention_mask[:, view, :length]


def text_lengths(attention_mask: torch.Tensor) -> tuple[int, ...]:
    """Per view, the longest caption of a host [b, V, L] attention mask (the trimmed length); raises
    ValueError unless every row is right-padded (ones then zeros) with at least SOT and EOT."""
    lengths = attention_mask.sum(dim=-1)
    positions = torch.arange(attention_mask.shape[-1])
    if not torch.equal(attention_mask.bool(), positions < lengths[..., None]) or bool((lengths < 2).any()):
        raise ValueError("attention_mask must be right-padded (ones then zeros) with at least SOT and EOT in every row")
    return tuple(lengths.amax(dim=0).tolist())


def batch_to_device(batch: dict, device) -> TrainBatch:
    """A TrainViews batch (a DataLoader's dict of host tensors, pinned by `pin_memory`: "index", "pid",
    "pixel_values", "input_ids", "attention_mask", optionally "erase_boxes") as a TrainBatch on `device`,
    copied without blocking the host. The caption lengths are read (and the padding checked) on the host
    copy of the mask, so trimming needs no device read-back. uint8 pixels stay uint8."""
    def move(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)

    boxes = batch.get("erase_boxes")
    return TrainBatch(index=move(batch["index"]), pids=move(batch["pid"]), pixel_values=move(batch["pixel_values"]),
                      input_ids=move(batch["input_ids"]), attention_mask=move(batch["attention_mask"]),
                      text_lengths=text_lengths(batch["attention_mask"]),
                      erase_boxes=None if boxes is None else move(boxes))
