"""The one sharded encoder: every image or caption of a dataset through the encoders of one or more
models, each process encoding its share (`sharding.shard_indices`), the shares gathered. Used by the ALR
pass (engine.alr_pass), evaluation (evaluation.features), search and its gallery shards, and the ALR
analysis (experiments.alr_analysis).

    outputs = encode(models, dataset, "image", pieces=("global", "fused"))   # [(global [N, E], fused [N, D])]
    outputs = encode(models, texts, "text", pieces=("fused",), normalize=True, dtype=torch.float16)

A model here is anything with `encode_image(pixels [B, 3, H, W])` and `encode_text(input_ids [B, L],
attention_mask [B, L])` returning (global [B, E], fused [B, D]) and the widths `embed_dim` (E) and
`output_dim` (D): modeling.TRPRModel. Eval/train mode and no_grad are the caller's business (`eval_mode`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .sharding import gather_shares, shard_indices

# piece name -> its position in what encode_image / encode_text return ((global, fused))
PIECES = {"global": 0, "fused": 1}


def model_device(module: torch.nn.Module) -> torch.device:
    """The device of the module's first parameter."""
    return next(module.parameters()).device


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`module` in eval mode inside the block; its train/eval mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def piece_width(model, piece: str) -> int:
    """Width of a piece: "global" -> model.embed_dim (E), "fused" -> model.output_dim (D)."""
    return model.embed_dim if piece == "global" else model.output_dim


def sharded_loader(dataset, accelerator=None, *, batch_size: int = 64, num_workers: int = 0,
                   persistent: bool = False, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over this process's share of `dataset` (shard_indices), in order. persistent: keep the
    workers across passes (a loader built once and given to `encode` at every pass)."""
    indices, _ = shard_indices(len(dataset), accelerator)
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      persistent_workers=persistent and num_workers > 0, pin_memory=pin_memory)


def _text_batches(dataset, indices: list, batch_size: int, loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids [b, L], attention_mask [b, L]) host batches of this process's share: slices of the
    dataset's tokenized tensors when it holds them (data.EvalTexts: `input_ids` / `attention_mask` [N, L]),
    else from the loader."""
    if loader is None and isinstance(getattr(dataset, "input_ids", None), torch.Tensor):
        input_ids, attention_mask = dataset.input_ids[indices], dataset.attention_mask[indices]
        for start in range(0, len(indices), batch_size):
            yield input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
        return
    for batch in loader:
        yield batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def encode(models: Sequence, dataset, modality: str, *, pieces: Sequence[str] = ("global", "fused"),
           dtype: torch.dtype = torch.float32, normalize: bool = False, batch_size: int = 64, accelerator=None,
           num_workers: int = 0, loader: DataLoader | None = None,
           prepare_images: Callable[[torch.Tensor], torch.Tensor] | None = None,
           prepare_texts: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None,
           desc: str = "encoding") -> list[tuple[torch.Tensor, ...]]:
    """Encode every item of `dataset` with each model, sharded across the accelerator's processes.

    modality "image": items hold "pixel_values" [3, H, W]; "text": "input_ids" / "attention_mask" [L]
    (a dataset holding tokenized `input_ids` / `attention_mask` tensors [N, L] is sliced, not loaded).
    pieces: which of ("global", "fused") to keep, in the order returned. dtype: the stored dtype (values
    are computed in fp32 and cast once). normalize: L2-normalise each row (in fp32, before the cast).
    accelerator: None (one process) or an Accelerator: each process encodes a contiguous share under its
    autocast and the shares are gathered, so every process returns all N rows. loader: a DataLoader over
    this process's share (`sharded_loader`, e.g. persistent), else one is built (batch_size, num_workers).
    prepare_images(pixels on the device) / prepare_texts(input_ids, attention_mask on the host): applied to
    each batch before the forward (e.g. data.transforms.normalize_uint8 for uint8 pixels; trimming padding).

    Returns per model a tuple with one tensor [N, W] per piece (W = E for "global", D for "fused"), in
    dataset order, `dtype`, on the models' device when it is a GPU, else on the CPU. Inputs are encoded
    once whatever the number of pieces.
    """
    if modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    unknown = [p for p in pieces if p not in PIECES]
    if unknown:
        raise ValueError(f"pieces must be among {tuple(PIECES)}, got {unknown}")
    num_items = len(dataset)
    indices, per_process = shard_indices(num_items, accelerator)
    device = model_device(models[0])
    keep_on = device if device.type == "cuda" else torch.device("cpu")
    stored = [[torch.empty(per_process, piece_width(model, p), dtype=dtype, device=keep_on) for p in pieces]
              for model in models]
    if modality == "image" or not isinstance(getattr(dataset, "input_ids", None), torch.Tensor):
        loader = loader if loader is not None else sharded_loader(dataset, accelerator, batch_size=batch_size,
                                                                 num_workers=num_workers)
    show = accelerator is None or accelerator.is_local_main_process
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    if modality == "image":
        batches = (batch["pixel_values"] for batch in loader)
    else:
        batches = _text_batches(dataset, indices, batch_size, loader)
    start = 0
    with autocast:
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not show, leave=False,
                          total=-(-per_process // (loader.batch_size if loader is not None else batch_size))):
            if modality == "image":
                pixels = batch.to(device, non_blocking=True)
                inputs = (prepare_images(pixels) if prepare_images is not None else pixels,)
            else:
                ids, mask = prepare_texts(*batch) if prepare_texts is not None else batch
                inputs = (ids.to(device), mask.to(device))
            rows = len(inputs[0])
            for model, targets in zip(models, stored):
                encoded = model.encode_image(*inputs) if modality == "image" else model.encode_text(*inputs)
                for piece, target in zip(pieces, targets):
                    value = encoded[PIECES[piece]].float()
                    target[start:start + rows] = F.normalize(value, dim=-1) if normalize else value
            start += rows
    return [tuple(gather_shares(target, num_items, accelerator) for target in targets) for targets in stored]
