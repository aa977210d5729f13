"""torch Datasets over the splits of `load_benchmark` (items are dicts; the default collate stacks them).

TrainViews   one item per training caption, V independently augmented (image, text) views
EvalImages   one item per gallery image (test transform)
EvalTexts    one item per query caption (tokenized, no augmentation)

Images are read straight from their files with `data.images.open_image` (the splits' `image` column is
only used for its paths), captions are tokenized once at construction. Columns are read through pyarrow
(`data.arrow_splits`), so building these datasets hashes nothing.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .arrow_splits import column_values
from .images import open_image  # noqa: F401  (re-exported: eval_3rtpr imports it from here)
from .transforms import augment_text, build_image_transform
from .tokenizer import tokenize

PIXEL_OUTPUTS = ("float", "uint8")


def image_sources(split) -> list:
    """The `image` column of an HF split as a list of file paths (or raw bytes for embedded images).
    Read through pyarrow (`data.arrow_splits.column_values`): no `datasets` transform, nothing hashed."""
    if "image" not in split.column_names:
        raise ValueError(f"split has no 'image' column (columns: {split.column_names})")
    sources = []
    for row, item in enumerate(column_values(split, "image")):
        if item.get("path"):
            sources.append(item["path"])
        elif item.get("bytes") is not None:
            sources.append(bytes(item["bytes"]))
        else:
            raise ValueError(f"image column row {row} has neither a path nor bytes")
    return sources


def _check_output(output: str) -> str:
    if output not in PIXEL_OUTPUTS:
        raise ValueError(f"output must be one of {list(PIXEL_OUTPUTS)}, got {output!r}")
    return output


class EpochKeyedBatches(Sampler):
    """Wraps a batch sampler so that it yields [(epoch, position), ...] instead of [position, ...].

    TrainViews takes such a key and seeds the sample's augmentation from (seed, epoch, position) in
    whatever process it runs, so persistent DataLoader workers (whose copy of the dataset never sees
    `TrainViews.set_epoch`) still draw per-epoch augmentations. Call `set_epoch(e)` before iterating
    the DataLoader for epoch e (it is forwarded to the wrapped sampler when that has `set_epoch`)."""

    def __init__(self, batch_sampler, epoch: int = 0):
        self.batch_sampler = batch_sampler
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        epoch = self.epoch
        for batch in self.batch_sampler:
            yield [(epoch, int(position)) for position in batch]


class TrainViews(Dataset):
    """Training samples with `num_views` independent augmented views each.

    key: a position 0..N-1, or an (epoch, position) pair (what `EpochKeyedBatches` yields).
    item -> {"index": int, "pid": int,
             "pixel_values": output="float": FloatTensor[V, 3, H, W] (CLIP-normalised)
                             output="uint8": ByteTensor[V, 3, H, W] (augmented, not normalised),
             "erase_boxes":  output="uint8" only: LongTensor[V, 4] (top, left, height, width; 0 0 0 0 = none),
                             to be filled after normalising: `data.transforms.normalize_uint8(pixels, boxes)`
                             on the device gives the float path's tensor,
             "input_ids": LongTensor[V, 77], "attention_mask": LongTensor[V, 77]}
    The image is decoded and resized once per item; each view is flipped, pad-cropped and erased from
    the resized pixels (the same draws, in the same order, as `ImageTransform.__call__`).
    augment=True: train image transform + text augmentation per view; augment=False: test transform, no
    text augmentation (all views equal).

    Randomness: with an (epoch, position) key, or after `set_epoch(e)` with a plain position, view
    randomness is a pure function of (seed, epoch, position), so any number of DataLoader workers,
    persistent or not, gives the same batches. A plain position before any `set_epoch` draws from torch's
    global RNG (seeded per worker by DataLoader), so it still differs between epochs.
    stream: None (training's views: np.random.SeedSequence([seed, epoch, position])) or an int, the spawn
    key of a stream of its own, SeedSequence([seed, epoch, position], spawn_key=(stream,)): the same
    augmentations, other draws (the ALR pass's views under alr.views reference, engine.alr_pass).
    """

    def __init__(self, train_split, tokenizer, image_size: Sequence[int] = (384, 128), num_views: int = 2,
                 augment: bool = True, seed: int = 0, text_aug_prob: float = 0.2, output: str = "float",
                 stream: Optional[int] = None):
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.indices = column_values(train_split, "index")
        self.pids = column_values(train_split, "pid")
        self.images = image_sources(train_split)
        self.input_ids, self.attention_mask = tokenize(tokenizer, column_values(train_split, "caption"))
        self.image_size = tuple(image_size)
        self.num_views = num_views
        self.augment = augment
        self.seed = seed
        self.stream = None if stream is None else int(stream)
        self.text_aug_prob = text_aug_prob
        self.output = _check_output(output)
        self.epoch: Optional[int] = None
        self.transform = build_image_transform(train=augment, image_size=image_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the views of this epoch a deterministic function of (seed, epoch, index) for plain-position
        keys (this object only: DataLoader workers hold copies; use EpochKeyedBatches with persistent workers)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pids)

    def _generator(self, epoch: Optional[int], position: int) -> torch.Generator:
        if epoch is None:
            item_seed = int(torch.randint(0, 2**62, ()))
        else:
            spawn_key = () if self.stream is None else (self.stream,)
            sequence = np.random.SeedSequence([self.seed, epoch, position], spawn_key=spawn_key)
            item_seed = int(sequence.generate_state(1, np.uint64)[0] >> 2)
        return torch.Generator().manual_seed(item_seed)

    def __getitem__(self, key) -> dict:
        if isinstance(key, (tuple, list)):
            epoch, position = int(key[0]), int(key[1])
        else:
            epoch, position = self.epoch, int(key)
        image = open_image(self.images[position])
        ids, mask = self.input_ids[position], self.attention_mask[position]
        item = {"index": int(self.indices[position]), "pid": int(self.pids[position])}
        if not self.augment:
            uint8, box = self.transform.augment(self.transform.resize(image))
            pixels = torch.from_numpy(uint8) if self.output == "uint8" else self.transform.to_float(uint8, box)
            item.update(pixel_values=pixels.unsqueeze(0).expand(self.num_views, -1, -1, -1).clone(),
                        input_ids=ids.unsqueeze(0).repeat(self.num_views, 1),
                        attention_mask=mask.unsqueeze(0).repeat(self.num_views, 1))
            if self.output == "uint8":
                item["erase_boxes"] = torch.zeros(self.num_views, 4, dtype=torch.long)
            return item
        generator = self._generator(epoch, position)
        resized = self.transform.resize(image)
        views, boxes, view_ids, view_masks = [], [], [], []
        for _ in range(self.num_views):
            uint8, box = self.transform.augment(resized, generator)
            views.append(torch.from_numpy(uint8) if self.output == "uint8" else self.transform.to_float(uint8, box))
            boxes.append(box)
            new_ids, new_mask = augment_text(ids, mask, generator, prob=self.text_aug_prob)
            view_ids.append(new_ids)
            view_masks.append(new_mask)
        item.update(pixel_values=torch.stack(views), input_ids=torch.stack(view_ids),
                    attention_mask=torch.stack(view_masks))
        if self.output == "uint8":
            item["erase_boxes"] = torch.tensor(boxes, dtype=torch.long)
        return item


class EvalImages(Dataset):
    """Gallery images. item -> {"pid": int, "image_id": int, "pixel_values": FloatTensor[3, H, W]}
    (output="uint8": ByteTensor[3, H, W], not normalised: `data.transforms.normalize_uint8` on the device)."""

    def __init__(self, gallery_split, image_size: Sequence[int] = (384, 128), output: str = "float"):
        self.pids = column_values(gallery_split, "pid")
        self.image_ids = column_values(gallery_split, "image_id")
        self.images = image_sources(gallery_split)
        self.output = _check_output(output)
        self.transform = build_image_transform(train=False, image_size=image_size)

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, position: int) -> dict:
        uint8, box = self.transform.augment(self.transform.resize(open_image(self.images[position])))
        pixels = torch.from_numpy(uint8) if self.output == "uint8" else self.transform.to_float(uint8, box)
        return {"pid": int(self.pids[position]), "image_id": int(self.image_ids[position]), "pixel_values": pixels}


class EvalTexts(Dataset):
    """Query captions. item -> {"pid": int, "image_id": int, "input_ids": LongTensor[77], "attention_mask": LongTensor[77]}."""

    def __init__(self, queries_split, tokenizer):
        self.pids = column_values(queries_split, "pid")
        self.image_ids = column_values(queries_split, "image_id")
        self.input_ids, self.attention_mask = tokenize(tokenizer, column_values(queries_split, "caption"))

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, position: int) -> dict:
        return {"pid": int(self.pids[position]), "image_id": int(self.image_ids[position]),
                "input_ids": self.input_ids[position], "attention_mask": self.attention_mask[position]}
