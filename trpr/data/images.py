"""Reading benchmark images: the one rule set every reader applies, and the check before training.

`open_image` decides whether an image is usable and how it becomes RGB; the training/evaluation datasets,
`verify_images` (the parallel, cached check the trainer runs before epoch 0) and `python -m trpr.data.check`
all call it, so they agree on every file:
    unreadable / truncated / missing file  -> refused
    smaller than MIN_IMAGE_SIDE px on a side -> refused (nothing to learn from; it would be upsampled ~100x)
    16-bit grey (PIL modes I;16*, I)       -> scaled to 8 bit (v * 255 / 65535, rounded), then grey -> RGB
    floating point (PIL mode F)            -> refused (no defined range)
    transparency (RGBA, LA, PA, tRNS)      -> composited on ALPHA_BACKGROUND (the CLIP mean colour: a
                                              transparent pixel normalises to ~0, like an erased one)
    anything else (L, P, CMYK, YCbCr, ...) -> PIL's conversion to RGB
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from trpr.runtime.atomic import atomic_write_json
from trpr.runtime.cache import image_checks_dir

logger = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 4
ALPHA_BACKGROUND = (123, 117, 104)  # round(255 * CLIP_MEAN)
IMAGE_RULES_VERSION = 1  # bump when a rule above changes: cached checks are then redone
IMAGE_POLICIES = ("error", "skip")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

ImageSource = Union[str, bytes]


def _where(source: ImageSource) -> str:
    return "embedded image bytes" if isinstance(source, bytes) else str(source)


def _to_rgb(image: Image.Image) -> Image.Image:
    """A decoded PIL image -> RGB under the module's rules; ValueError says why an image is refused."""
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"image is {width}x{height} px; images smaller than {MIN_IMAGE_SIDE} px on a side are "
                         "refused (remove the entry or replace the file)")
    if image.mode == "F":
        raise ValueError("floating-point image (PIL mode F) has no defined 8-bit range; save it as 8-bit RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _decode_rgb(source: ImageSource) -> Image.Image:
    """Decode + `_to_rgb`; raises FileNotFoundError / one of _DECODE_ERRORS with the bare reason."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return _to_rgb(image)


def open_image(source: ImageSource) -> Image.Image:
    """RGB PIL image from a path or PNG/JPEG bytes, under the module's rules. A missing, unreadable or
    refused image raises OSError naming the file and what is wrong."""
    try:
        return _decode_rgb(source)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"cannot read image {_where(source)}: file not found") from error
    except _DECODE_ERRORS as error:
        raise OSError(f"cannot read image {_where(source)}: {error}") from error


def image_problem(source: ImageSource) -> Optional[str]:
    """Why `open_image(source)` refuses the image (the reason alone, without the file), or None."""
    try:
        _decode_rgb(source)
    except FileNotFoundError:
        return "file not found"
    except _DECODE_ERRORS as error:
        return str(error) or type(error).__name__
    return None


def image_problems(sources: Sequence[ImageSource], num_threads: Optional[int] = None, progress: Optional[bool] = None,
                   desc: str = "checking images") -> list[Optional[str]]:
    """`image_problem` of every source, decoded in a thread pool (PIL releases the GIL while decoding)
    with a progress bar (progress=None: shown on a terminal only). Returns one entry per source."""
    from tqdm.auto import tqdm

    threads = num_threads or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = pool.map(image_problem, sources)
        return list(tqdm(results, total=len(sources), desc=desc, unit="img", leave=False,
                         disable=None if progress is None else not progress))


# ----------------------------------------------------------------------------- the check before training
@dataclass
class ImageCheck:
    """Result of `verify_images`. keep: int64 [R] positions of the split's rows whose image is usable
    (ascending); bad: file (or 'embedded image bytes #k') -> why it is refused; cached: read from the cache."""
    keep: np.ndarray
    bad: dict = field(default_factory=dict)
    num_rows: int = 0
    cached: bool = False

    def report(self, name: str = "split") -> str:
        """Lines naming every refused file, its reason and how many rows it takes away."""
        lines = [f"{name}: {len(self.bad)} unusable image(s), {self.num_rows - len(self.keep)} of {self.num_rows} rows"]
        lines += [f"  - {where}: {reason}" for where, reason in sorted(self.bad.items())]
        return "\n".join(lines)


class ImageCheckError(ValueError):
    """verify_images(policy='error') found unusable images; the message names every file."""


def image_check_summary(error: ImageCheckError) -> tuple[str, str, str]:
    """(the full list, its headline "NAME: N unusable image(s), R of M rows", the first "FILE: reason") of
    an ImageCheckError, for a one-line error after the list is printed (training and evaluation)."""
    lines = str(error).splitlines()
    first = lines[1].strip().lstrip("- ") if len(lines) > 2 else ""
    return "\n".join(lines[:-1]), lines[0], first


def _cache_key(paths: Sequence[str]) -> str:
    digest = hashlib.blake2b(f"image-rules-v{IMAGE_RULES_VERSION};min{MIN_IMAGE_SIDE}".encode(), digest_size=16)
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def _read_cache(path: Path) -> Optional[dict]:
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        return cached["bad"] if isinstance(cached.get("bad"), dict) else None
    except (OSError, ValueError, KeyError, AttributeError):
        return None  # absent or damaged: check again


def _write_cache(path: Path, bad: dict, checked: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"rules": IMAGE_RULES_VERSION, "checked": checked, "bad": bad})
    except OSError as error:  # a read-only cache only costs a re-check next time
        logger.warning("image check not cached (%s): %s", path, error)


def verify_images(split, policy: str = "error", cache_dir: Optional[Union[str, Path]] = None,
                  name: str = "split", num_threads: Optional[int] = None,
                  progress: Optional[bool] = None) -> ImageCheck:
    """Decode every image of `split` (a split of `load_benchmark` with an `image` column) once, in parallel,
    under `open_image`'s rules, before training uses it.

    policy: "error" -> raise ImageCheckError naming every unusable file (and its reason);
            "skip"  -> log a warning naming every unusable file and return the rows to keep
                       (subset the split with `data.keep_rows(split, check.keep)`).
    cache_dir: where the verdict is cached (default `$TRPR_CACHE/image_checks`, the folder of
            `load_benchmark`'s default root); the key is the list of files with their sizes and
            modification times (and the rule version), so an unchanged split is decoded only once.
            Embedded image bytes are checked every time.
    name: label for messages and the cache file, e.g. "cuhk-pedes/train".
    Returns ImageCheck (keep: int64 [R] row positions; bad: file -> reason).
    """
    from .torch_datasets import image_sources

    if policy not in IMAGE_POLICIES:
        raise ValueError(f"image policy must be one of {list(IMAGE_POLICIES)}, got {policy!r}")
    sources = image_sources(split)
    paths = sorted({s for s in sources if isinstance(s, str)})
    embedded = {i: s for i, s in enumerate(sources) if isinstance(s, bytes)}
    cache_root = Path(cache_dir) if cache_dir is not None else image_checks_dir()
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "split"
    cache_file = cache_root / f"{label}-{_cache_key(paths)}.json"
    bad = _read_cache(cache_file) if paths else {}
    cached = bad is not None
    if bad is None:
        problems = image_problems(paths, num_threads, progress, desc=f"checking {name} images")
        bad = {path: problem for path, problem in zip(paths, problems) if problem is not None}
        _write_cache(cache_file, bad, len(paths))
    bad_embedded = {}
    if embedded:
        problems = image_problems(list(embedded.values()), num_threads, progress, desc=f"checking {name} images")
        bad_embedded = {i: p for i, p in zip(embedded, problems) if p is not None}
    keep = np.array([row for row, source in enumerate(sources)
                     if (source not in bad if isinstance(source, str) else row not in bad_embedded)], dtype=np.int64)
    all_bad = dict(bad)
    all_bad.update({f"embedded image bytes #{row}": problem for row, problem in bad_embedded.items()})
    check = ImageCheck(keep=keep, bad=all_bad, num_rows=len(sources), cached=cached)
    if all_bad:
        if policy == "error":
            raise ImageCheckError(check.report(name) + "\nfix or remove these files, or skip them with the "
                                  "'skip' image policy (data.verify_images(..., policy='skip'))")
        logger.warning("skipping unusable images:\n%s", check.report(name))
    return check
