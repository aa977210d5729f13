"""torch Datasets over the splits of `load_benchmark` (items are dicts; the default collate stacks them).

TrainViews   one item per training caption, V independently augmented (image, text) views
EvalImages   one item per gallery image (test transform)
EvalTexts    one item per query caption (tokenized, no augmentation)

Images are read straight from their files with PIL (the splits' `image` column is only used for its
paths), captions are tokenized once at construction.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import augment_text, build_image_transform, tokenize


def image_sources(split) -> list:
    """The `image` column of an HF split as a list of file paths (or raw bytes for embedded images)."""
    import datasets

    if "image" not in split.column_names:
        raise ValueError(f"split has no 'image' column (columns: {split.column_names})")
    raw = split.cast_column("image", datasets.Image(decode=False))["image"]
    sources = []
    for row, item in enumerate(raw):
        if item.get("path"):
            sources.append(item["path"])
        elif item.get("bytes") is not None:
            sources.append(bytes(item["bytes"]))
        else:
            raise ValueError(f"image column row {row} has neither a path nor bytes")
    return sources


def open_image(source) -> Image.Image:
    """RGB PIL image from a path or PNG/JPEG bytes; a missing/unreadable file names itself in the error."""
    try:
        if isinstance(source, bytes):
            image = Image.open(io.BytesIO(source))
        else:
            image = Image.open(source)
        return image.convert("RGB")
    except (OSError, ValueError) as error:
        where = "embedded image bytes" if isinstance(source, bytes) else source
        raise OSError(f"cannot read image {where}: {error}") from error


def _column(split, name: str) -> list:
    if name not in split.column_names:
        raise ValueError(f"split lacks column {name!r} (columns: {split.column_names})")
    return list(split[name])


class TrainViews(Dataset):
    """Training samples with `num_views` independent augmented views each.

    item -> {"index": int, "pid": int,
             "pixel_values": FloatTensor[V, 3, H, W] (CLIP-normalised),
             "input_ids": LongTensor[V, 77], "attention_mask": LongTensor[V, 77]}
    augment=True: train image transform + text augmentation per view; augment=False: test transform, no
    text augmentation (all views equal; ALR's per-sample pass uses this, usually with num_views=1).

    Randomness: after `set_epoch(e)`, view randomness is a pure function of (seed, e, index), so any
    number of DataLoader workers gives the same batches. Before any `set_epoch` call it draws from torch's
    global RNG (seeded per worker by DataLoader), so it still differs between epochs.
    """

    def __init__(self, train_split, tokenizer, image_size: Sequence[int] = (384, 128), num_views: int = 2,
                 augment: bool = True, seed: int = 0, text_aug_prob: float = 0.2):
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.indices = _column(train_split, "index")
        self.pids = _column(train_split, "pid")
        self.images = image_sources(train_split)
        self.input_ids, self.attention_mask = tokenize(tokenizer, _column(train_split, "caption"))
        self.image_size = tuple(image_size)
        self.num_views = num_views
        self.augment = augment
        self.seed = seed
        self.text_aug_prob = text_aug_prob
        self.epoch: Optional[int] = None
        self.transform = build_image_transform(train=augment, image_size=image_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the views of this epoch a deterministic function of (seed, epoch, index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pids)

    def _generator(self, position: int) -> torch.Generator:
        if self.epoch is None:
            item_seed = int(torch.randint(0, 2**62, ()))
        else:
            item_seed = int(np.random.SeedSequence([self.seed, self.epoch, position]).generate_state(1, np.uint64)[0] >> 2)
        return torch.Generator().manual_seed(item_seed)

    def __getitem__(self, position: int) -> dict:
        image = open_image(self.images[position])
        ids, mask = self.input_ids[position], self.attention_mask[position]
        if not self.augment:
            pixels = self.transform(image)
            return {"index": int(self.indices[position]), "pid": int(self.pids[position]),
                    "pixel_values": pixels.unsqueeze(0).expand(self.num_views, -1, -1, -1).clone(),
                    "input_ids": ids.unsqueeze(0).repeat(self.num_views, 1),
                    "attention_mask": mask.unsqueeze(0).repeat(self.num_views, 1)}
        generator = self._generator(position)
        views, view_ids, view_masks = [], [], []
        for _ in range(self.num_views):
            views.append(self.transform(image, generator))
            new_ids, new_mask = augment_text(ids, mask, generator, prob=self.text_aug_prob)
            view_ids.append(new_ids)
            view_masks.append(new_mask)
        return {"index": int(self.indices[position]), "pid": int(self.pids[position]),
                "pixel_values": torch.stack(views), "input_ids": torch.stack(view_ids),
                "attention_mask": torch.stack(view_masks)}


class EvalImages(Dataset):
    """Gallery images. item -> {"pid": int, "image_id": int, "pixel_values": FloatTensor[3, H, W]}."""

    def __init__(self, gallery_split, image_size: Sequence[int] = (384, 128)):
        self.pids = _column(gallery_split, "pid")
        self.image_ids = _column(gallery_split, "image_id")
        self.images = image_sources(gallery_split)
        self.transform = build_image_transform(train=False, image_size=image_size)

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, position: int) -> dict:
        return {"pid": int(self.pids[position]), "image_id": int(self.image_ids[position]),
                "pixel_values": self.transform(open_image(self.images[position]))}


class EvalTexts(Dataset):
    """Query captions. item -> {"pid": int, "image_id": int, "input_ids": LongTensor[77], "attention_mask": LongTensor[77]}."""

    def __init__(self, queries_split, tokenizer):
        self.pids = _column(queries_split, "pid")
        self.image_ids = _column(queries_split, "image_id")
        self.input_ids, self.attention_mask = tokenize(tokenizer, _column(queries_split, "caption"))

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, position: int) -> dict:
        return {"pid": int(self.pids[position]), "image_id": int(self.image_ids[position]),
                "input_ids": self.input_ids[position], "attention_mask": self.attention_mask[position]}
