"""Image transforms and text augmentation (docs/method.md §6), without torchvision.

Images: PIL for the resize, torch for everything after it. A transform returns a float tensor
[3, H, W] normalised with CLIP's mean/std (so a pixel equal to the mean becomes 0).

Text: `augment_text` on captions tokenized by `data.tokenizer` (the token ids and the tokenizer live there).
"""
from __future__ import annotations

import random
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .tokenizer import MASK_TOKEN_ID

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RandomSource = Union[torch.Generator, random.Random, None]


# ----------------------------------------------------------------------------- randomness
def _uniform(rng: RandomSource) -> float:
    """One float in [0, 1) from a torch.Generator, a random.Random, or torch's global RNG (None)."""
    if isinstance(rng, random.Random):
        return rng.random()
    return float(torch.rand((), generator=rng))


def _randint(rng: RandomSource, low: int, high: int) -> int:
    """One int in [low, high] (inclusive) from the given random source."""
    if isinstance(rng, random.Random):
        return rng.randint(low, high)
    return int(torch.randint(low, high + 1, (), generator=rng))


# ----------------------------------------------------------------------------- images
def random_pad_crop(pixels: np.ndarray, padding: int, rng: RandomSource) -> np.ndarray:
    """Zero-pad an [H, W, C] array by `padding` pixels on each side, then crop a random H×W window
    (the same as shifting the image by up to ±padding with black fill)."""
    return _shift(pixels, *_pad_crop_shift(padding, rng))


def _pad_crop_shift(padding: int, rng: RandomSource) -> tuple[int, int]:
    """The (shift_y, shift_x) of a random pad-and-crop, each in [-padding, padding] (drawn y first)."""
    shift_y = _randint(rng, 0, 2 * padding) - padding  # window top in padded coords minus padding
    shift_x = _randint(rng, 0, 2 * padding) - padding
    return shift_y, shift_x


def _shift(pixels: np.ndarray, shift_y: int, shift_x: int, channels_first: bool = False) -> np.ndarray:
    """pixels [H, W, C] shifted by (-shift_y, -shift_x) with zero fill: out[y, x] = pixels[y + shift_y, x + shift_x].
    channels_first: return [C, H, W] instead (the transpose folded into the same copy)."""
    height, width = pixels.shape[:2]
    source = pixels.transpose(2, 0, 1) if channels_first else pixels
    out = np.zeros(source.shape, dtype=pixels.dtype)
    src_y, dst_y = max(shift_y, 0), max(-shift_y, 0)
    src_x, dst_x = max(shift_x, 0), max(-shift_x, 0)
    rows, cols = height - abs(shift_y), width - abs(shift_x)
    if rows > 0 and cols > 0:
        if channels_first:
            out[:, dst_y : dst_y + rows, dst_x : dst_x + cols] = source[:, src_y : src_y + rows, src_x : src_x + cols]
        else:
            out[dst_y : dst_y + rows, dst_x : dst_x + cols] = source[src_y : src_y + rows, src_x : src_x + cols]
    return out


def random_erase_box(height: int, width: int, rng: RandomSource, p: float = 0.5,
                     area: tuple[float, float] = (0.02, 0.4), log_ratio: tuple[float, float] = (-1.2040, 1.2040),
                     attempts: int = 10) -> Optional[tuple[int, int, int, int]]:
    """The rectangle random erasing (Zhong et al.) fills in an H×W image, as (top, left, height, width), or
    None: with probability `p`, one rectangle of `area` fraction of the image, aspect ratio log-uniform in
    exp(log_ratio) (default 0.3–3.3); `attempts` tries to fit it, else None."""
    if _uniform(rng) >= p:
        return None
    for _ in range(attempts):
        target_area = height * width * (area[0] + (area[1] - area[0]) * _uniform(rng))
        aspect = float(np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * _uniform(rng)))
        erase_h = int(round((target_area * aspect) ** 0.5))
        erase_w = int(round((target_area / aspect) ** 0.5))
        if 0 < erase_h < height and 0 < erase_w < width:
            top = _randint(rng, 0, height - erase_h)
            left = _randint(rng, 0, width - erase_w)
            return top, left, erase_h, erase_w
    return None


def random_erase(pixels: torch.Tensor, rng: RandomSource, p: float = 0.5,
                 area: tuple[float, float] = (0.02, 0.4), log_ratio: tuple[float, float] = (-1.2040, 1.2040),
                 value: float = 0.0, attempts: int = 10) -> torch.Tensor:
    """Random erasing: fill the `random_erase_box` rectangle with `value` (0 = the mean after normalisation).
    pixels: [C, H, W] (modified in place and returned)."""
    box = random_erase_box(pixels.shape[1], pixels.shape[2], rng, p, area, log_ratio, attempts)
    if box is not None:
        top, left, erase_h, erase_w = box
        pixels[:, top : top + erase_h, left : left + erase_w] = value
    return pixels


NO_ERASE = (0, 0, 0, 0)  # an erase box that erases nothing


def normalize_uint8(pixel_values: torch.Tensor, erase_boxes: Optional[torch.Tensor] = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels -> CLIP-normalised `dtype`, on the tensors' device (the uint8 output of TrainViews /
    EvalImages: normalise after the host-to-device copy, which then moves 4x fewer bytes).

    pixel_values: uint8 [..., 3, H, W]; erase_boxes: int64 [..., 4] (top, left, height, width) with the same
    leading shape, or None. Each box is filled with 0 AFTER normalising (= the CLIP mean), exactly as the
    float path's random erasing does; a box of height or width 0 erases nothing.
    Computed as x * 1/(255 std) + (-mean/std) in float32, the float path's formula: on the CPU the result
    equals TrainViews(output="float") bit for bit, on a GPU up to float rounding. Returns [..., 3, H, W]."""
    if pixel_values.dtype != torch.uint8 or pixel_values.dim() < 3 or pixel_values.shape[-3] != 3:
        raise ValueError(f"expected uint8 [..., 3, H, W] pixels, got {pixel_values.dtype} {tuple(pixel_values.shape)}")
    device = pixel_values.device
    std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1)
    scale = 1.0 / (255.0 * std)
    bias = -torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1) / std
    out = pixel_values.float().mul_(scale).add_(bias)
    if erase_boxes is not None:
        if erase_boxes.shape != pixel_values.shape[:-3] + (4,):
            raise ValueError(f"erase_boxes must have shape {tuple(pixel_values.shape[:-3]) + (4,)}, "
                             f"got {tuple(erase_boxes.shape)}")
        height, width = out.shape[-2:]
        boxes = erase_boxes.to(device=device, dtype=torch.long)[..., None]  # [..., 4, 1]
        rows = torch.arange(height, device=device)
        cols = torch.arange(width, device=device)
        in_rows = (rows >= boxes[..., 0, :]) & (rows < boxes[..., 0, :] + boxes[..., 2, :])  # [..., H]
        in_cols = (cols >= boxes[..., 1, :]) & (cols < boxes[..., 1, :] + boxes[..., 3, :])  # [..., W]
        mask = (in_rows[..., :, None] & in_cols[..., None, :]).unsqueeze(-3)  # [..., 1, H, W]
        out.masked_fill_(mask, 0.0)
    return out.to(dtype)


class ImageTransform:
    """Callable PIL image -> FloatTensor[3, H, W], CLIP-normalised.

    train=False: bicubic resize to (H, W) + normalise.
    train=True: resize, horizontal flip (p 0.5), zero-pad 10 + random crop, normalise,
    random erasing (p 0.5, area 0.02–0.4, filled with 0 = the mean).
    Randomness: `generator` (torch.Generator or random.Random) passed per call; None uses torch's
    global RNG (which DataLoader seeds per worker).

    The steps are also exposed separately, so that one decoded image is resized once and augmented
    several times: `resize` (PIL -> uint8 [H, W, 3]), `augment` (-> uint8 [3, H, W] + erase box, the
    same random draws in the same order as __call__), `to_float` (uint8 [3, H, W] + box -> normalised
    float, bit-identical to __call__)."""

    def __init__(self, train: bool, image_size: Sequence[int] = (384, 128), padding: int = 10,
                 flip_p: float = 0.5, erase_p: float = 0.5):
        if len(image_size) != 2 or min(image_size) <= 0:
            raise ValueError(f"image_size must be (H, W) with positive sides, got {image_size!r}")
        self.train = train
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.padding = padding
        self.flip_p = flip_p
        self.erase_p = erase_p
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._bias = -torch.tensor(CLIP_MEAN).view(3, 1, 1) / std

    def resize(self, image: Image.Image) -> np.ndarray:
        """PIL image -> uint8 [H, W, 3] at the transform's size (bicubic; no copy of the size is right)."""
        height, width = self.image_size
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.BICUBIC)
        return np.asarray(image, dtype=np.uint8)

    def augment(self, pixels: np.ndarray, generator: RandomSource = None
                ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """Resized uint8 [H, W, 3] -> (uint8 [3, H, W], erase box (top, left, height, width) or NO_ERASE).
        train=True: flip, pad-and-crop, then the erase box is drawn (not applied: `to_float` or
        `normalize_uint8` fills it after normalising); train=False: the pixels, transposed, and NO_ERASE."""
        if not self.train:
            return np.ascontiguousarray(pixels.transpose(2, 0, 1)), NO_ERASE
        if _uniform(generator) < self.flip_p:
            pixels = pixels[:, ::-1]
        shifted = _shift(pixels, *_pad_crop_shift(self.padding, generator), channels_first=True)
        box = random_erase_box(shifted.shape[1], shifted.shape[2], generator, p=self.erase_p)
        return shifted, (box if box is not None else NO_ERASE)

    def to_float(self, pixels: np.ndarray, box: tuple[int, int, int, int] = NO_ERASE) -> torch.Tensor:
        """uint8 [3, H, W] (+ erase box) -> CLIP-normalised float [3, H, W], the box filled with 0."""
        # uint8 -> CLIP-normalised float in one pass: x * 1/(255 std) - mean/std
        tensor = torch.from_numpy(pixels).float().mul_(self._scale).add_(self._bias)
        top, left, erase_h, erase_w = box
        if erase_h and erase_w:
            tensor[:, top : top + erase_h, left : left + erase_w] = 0.0
        return tensor

    def __call__(self, image: Image.Image, generator: RandomSource = None) -> torch.Tensor:
        return self.to_float(*self.augment(self.resize(image), generator))

    def __repr__(self) -> str:
        return f"ImageTransform(train={self.train}, image_size={self.image_size})"


def build_image_transform(train: bool, image_size: Sequence[int] = (384, 128)) -> ImageTransform:
    """The image transform of docs/method.md §6: `transform(pil_image, generator=None) -> FloatTensor[3, H, W]`."""
    return ImageTransform(train=train, image_size=image_size)


# ----------------------------------------------------------------------------- text augmentation
def augment_text(input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: Optional[torch.Generator] = None,
                 prob: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Text augmentation (docs/method.md §6) on one tokenized caption.

    input_ids, attention_mask: LongTensor[L] as made by `tokenize`. Each word token (not SOT, EOT or
    pad) is picked with probability `prob`; a picked token becomes MASK_TOKEN_ID with probability 1/2,
    a random id in [1, 49405) with probability 1/5, and is deleted otherwise (the rest shift left, EOT
    stays last, padding grows). Returns new tensors (the inputs are not modified)."""
    ids = input_ids.numpy()
    length = int(attention_mask.numpy().sum())
    num_words = length - 2
    if num_words <= 0:
        return input_ids.clone(), attention_mask.clone()
    # the random draws stay in torch (their stream defines the augmentation); the rest is numpy, which is
    # several times faster than torch on 77-element vectors. Thresholds compare in float32, as torch does.
    uniforms = torch.rand(num_words, generator=generator).numpy()
    action = torch.rand(num_words, generator=generator).numpy()
    random_ids = torch.randint(1, MASK_TOKEN_ID, (num_words,), generator=generator).numpy()
    picked = uniforms < np.float32(prob)
    new_words = ids[1 : length - 1].copy()
    new_words[picked & (action < np.float32(0.5))] = MASK_TOKEN_ID
    replace = picked & (action >= np.float32(0.5)) & (action < np.float32(0.7))
    new_words[replace] = random_ids[replace]
    kept = new_words[~(picked & (action >= np.float32(0.7)))]
    out_ids = np.zeros_like(ids)
    new_length = len(kept) + 2
    out_ids[0] = ids[0]
    out_ids[1 : new_length - 1] = kept
    out_ids[new_length - 1] = ids[length - 1]
    out_mask = np.zeros_like(attention_mask.numpy())
    out_mask[:new_length] = 1
    return torch.from_numpy(out_ids), torch.from_numpy(out_mask)
