"""Image transforms, CLIP tokenization and text augmentation (docs/method.md §6), without torchvision.

Images: PIL for the resize, torch for everything after it. A transform returns a float tensor
[3, H, W] normalised with CLIP's mean/std (so a pixel equal to the mean becomes 0).

Text: the CLIP BPE tokenizer (ids equal to `openai/clip-vit-base-patch16`'s), built offline from the
bundled `trpr/data/assets/clip_bpe_simple_vocab_16e6.txt.gz` when no local tokenizer folder is given.
Rows are `SOT w1 .. wn EOT` followed by pad id 0 (attention_mask 0); EOT is always the last real token.
"""
from __future__ import annotations

import gzip
import json
import os
import random
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
PAD_TOKEN_ID = 0
MASK_TOKEN_ID = 49405  # the last BPE merge's slot; see docs/decisions.md
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

BPE_ASSET = Path(__file__).resolve().parent / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"
NUM_BPE_MERGES = 49152 - 256 - 2  # 48894, as in OpenAI CLIP's SimpleTokenizer

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


# ----------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character table (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def default_cache_dir() -> Path:
    """`$TRPR_CACHE`, else `~/.cache/3rtpr`."""
    return Path(os.environ.get("TRPR_CACHE") or Path.home() / ".cache" / "3rtpr")


def derive_clip_vocab_files(out_dir: Union[str, Path], bpe_path: Union[str, Path] = BPE_ASSET) -> Path:
    """Write `vocab.json` and `merges.txt` derived from CLIP's BPE merge list, as OpenAI CLIP does:
    the 256 byte-unicode characters, the same with '</w>', the first 48894 merges joined, then
    <|startoftext|> (49406) and <|endoftext|> (49407). Written atomically; returns `out_dir`."""
    out_dir = Path(out_dir)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    if vocab_path.exists() and merges_path.exists():
        damaged = vocab_files_problem(out_dir)
        if damaged is None:
            return out_dir
        import sys

        print(f"warning: {damaged}; rebuilding it from {bpe_path.name if isinstance(bpe_path, Path) else bpe_path}",
              file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_BPE_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab_list) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: derived {len(vocab_list)} vocabulary entries, expected {VOCAB_SIZE}")
    vocab = {token: idx for idx, token in enumerate(vocab_list)}
    suffix = f".tmp{os.getpid()}"
    (out_dir / ("vocab.json" + suffix)).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / ("merges.txt" + suffix)).write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    os.replace(out_dir / ("vocab.json" + suffix), vocab_path)
    os.replace(out_dir / ("merges.txt" + suffix), merges_path)
    return out_dir


def vocab_files_problem(folder: Path) -> Optional[str]:
    """What is wrong with the derived `vocab.json` / `merges.txt` in `folder` ("FILE: reason", naming the
    file), or None when both are complete (a JSON object of VOCAB_SIZE ids 0..VOCAB_SIZE-1; the version line
    and NUM_BPE_MERGES merges)."""
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{vocab_path}: damaged tokenizer cache ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    if not isinstance(vocab, dict) or len(vocab) != VOCAB_SIZE or sorted(vocab.values()) != list(range(VOCAB_SIZE)):
        return f"{vocab_path}: damaged tokenizer cache (not the {VOCAB_SIZE} CLIP vocabulary ids)"
    try:
        lines = merges_path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    except (OSError, ValueError) as error:
        return f"{merges_path}: damaged tokenizer cache ({type(error).__name__})"
    if not lines[0].startswith("#version") or len(lines) != NUM_BPE_MERGES + 1 or \
            any(len(line.split(" ")) != 2 for line in lines[1:]):
        return f"{merges_path}: damaged tokenizer cache (not the {NUM_BPE_MERGES} CLIP merges)"
    return None


@lru_cache(maxsize=8)
def get_tokenizer(name_or_path: Optional[str] = None):
    """The CLIP tokenizer (HF `CLIPTokenizerFast`).

    name_or_path: a local folder holding tokenizer files -> loaded from it; a hub name (e.g.
    `openai/clip-vit-base-patch16`) -> loaded from the hub/cache when reachable; None, or a hub name
    that cannot be loaded offline -> built from the bundled CLIP BPE vocabulary (same ids)."""
    from transformers import CLIPTokenizerFast

    if name_or_path is not None:
        path = Path(name_or_path)
        if path.is_dir():
            return CLIPTokenizerFast.from_pretrained(str(path))
        if path.exists():
            raise ValueError(f"tokenizer path {path} is a file; pass the folder holding the tokenizer files")
        try:
            return CLIPTokenizerFast.from_pretrained(str(name_or_path))
        except (OSError, ValueError):
            pass  # offline or unknown: the bundled vocabulary gives the same ids for CLIP checkpoints
    try:
        vocab_dir = derive_clip_vocab_files(default_cache_dir() / "clip_bpe")
    except OSError:  # read-only home / cache: derive into a private temporary folder instead
        import tempfile

        vocab_dir = derive_clip_vocab_files(Path(tempfile.mkdtemp(prefix="3rtpr_clip_bpe_")))
    return CLIPTokenizerFast(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"))


def tokenize(tokenizer, captions: Sequence[str], context_length: int = CONTEXT_LENGTH
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """captions (N strings) -> (input_ids LongTensor[N, L], attention_mask LongTensor[N, L]), L = context_length.
    Each row is SOT w1 .. wn EOT, at most L-2 word tokens (truncated; EOT stays last), then pad id 0."""
    if isinstance(captions, str):
        captions = [captions]
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    max_words = context_length - 2
    input_ids = torch.zeros(len(encoded), context_length, dtype=torch.long)
    attention_mask = torch.zeros(len(encoded), context_length, dtype=torch.long)
    for row, words in enumerate(encoded):
        ids = [SOT_TOKEN_ID] + list(words[:max_words]) + [EOT_TOKEN_ID]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


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
