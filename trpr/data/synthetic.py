"""`synth-pedes`: a procedural pedestrian benchmark that exists on every machine.

Each identity is a combination of visible attributes (gender, hair, hat, upper garment type/colour/
pattern, lower garment type/colour, shoes, bag type/colour). Each identity gets several images that vary
view (front/back), pose (legs/arms), offset, scale, background, lighting and partial occlusion, and each
image gets two captions written from varied templates, synonyms and word orders that mention a random
subset of the attributes (so a caption alone is sometimes ambiguous, as in real data).

The output is the CUHK-PEDES on-disk layout (`imgs/` + `reid_raw.json`, splits train/val/test with
disjoint identities, ids 1-based), so it goes through the same loader as the real benchmarks. Every byte
is a function of (preset, seed): same seed -> same files.

    python -m trpr.data.synthetic --preset small --out DIR [--seed 0] [--contact-sheet sheet.png]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

from trpr.runtime.atomic import replace_folder, temporary_folder

GENERATOR_VERSION = 4  # bump whenever the rendered bytes change: cached copies are regenerated
# 4: the 2x canvas is downscaled by `downscale_lanczos` (NumPy), no longer by Pillow's LANCZOS resize, whose
#    output changed between Pillow 12 and 13 (up to 3 levels on ~6 % of the pixels): the bytes no longer
#    depend on the installed Pillow.
IMAGE_HEIGHT, IMAGE_WIDTH = 128, 48  # stored size (H, W); models resize
SUPERSAMPLE = 2  # drawn at 2x, then downscaled with antialiasing


@dataclass(frozen=True)
class Preset:
    """Identities per split and images per identity (two captions per image)."""
    train_ids: int
    val_ids: int
    test_ids: int
    images_per_id: int


PRESETS = {
    "tiny": Preset(train_ids=24, val_ids=8, test_ids=8, images_per_id=3),
    "small": Preset(train_ids=400, val_ids=100, test_ids=100, images_per_id=4),
    "full": Preset(train_ids=4000, val_ids=500, test_ids=500, images_per_id=4),
}
CAPTIONS_PER_IMAGE = 2

# ----------------------------------------------------------------------------- attribute vocabulary
# colour name -> RGB. Names are the words captions use; the palette is spread so that names are visible.
COLOURS = {
    "red": (200, 30, 35), "orange": (240, 130, 20), "yellow": (240, 215, 40), "green": (40, 150, 60),
    "blue": (35, 75, 200), "purple": (120, 50, 160), "pink": (240, 130, 180), "white": (235, 235, 235),
    "black": (25, 25, 28), "grey": (128, 128, 128), "brown": (115, 70, 35), "beige": (205, 185, 140),
}
COLOUR_SYNONYMS = {"grey": ["grey", "gray"], "beige": ["beige", "khaki", "tan"], "purple": ["purple", "violet"]}
UPPER_COLOURS = list(COLOURS)
LOWER_COLOURS = ["black", "blue", "grey", "white", "brown", "beige", "red", "green"]
SHOE_COLOURS = ["black", "white", "brown", "red", "blue", "grey"]
BAG_COLOURS = ["black", "red", "blue", "brown", "green", "pink", "yellow", "white"]
HAT_COLOURS = ["black", "red", "blue", "white", "grey", "green"]
HAIR_COLOURS = {"black": (20, 18, 18), "brown": (95, 55, 25), "blonde": (225, 190, 110), "grey": (165, 165, 165)}
SKIN_TONES = [(240, 205, 175), (215, 170, 130), (170, 120, 85), (110, 75, 50)]

UPPER_TYPES = ["t-shirt", "shirt", "jacket", "coat"]
LOWER_TYPES = ["trousers", "jeans", "shorts", "skirt"]
SHOE_TYPES = ["shoes", "sneakers", "boots"]
HAIR_STYLES = ["short", "long", "ponytail", "bald"]
HAT_TYPES = ["none", "cap", "beanie", "sunhat"]
BAG_TYPES = ["none", "backpack", "handbag", "shoulder bag"]

NOUNS = {
    "upper": {"t-shirt": ["t-shirt", "tee", "short-sleeved shirt"], "shirt": ["long-sleeved shirt", "shirt", "blouse"],
              "jacket": ["jacket", "zip-up jacket"], "coat": ["long coat", "coat", "overcoat"]},
    "lower": {"trousers": ["trousers", "pants", "slacks"], "jeans": ["jeans", "denim pants"],
              "shorts": ["shorts", "short pants"], "skirt": ["skirt", "short skirt"]},
    "shoes": {"shoes": ["shoes", "flat shoes"], "sneakers": ["sneakers", "trainers", "sport shoes"],
              "boots": ["boots", "ankle boots"]},
    "hat": {"cap": ["cap", "baseball cap"], "beanie": ["beanie", "knit hat", "woolly hat"],
            "sunhat": ["sun hat", "wide-brimmed hat"]},
    "bag": {"backpack": ["backpack", "rucksack"], "handbag": ["handbag", "purse", "small bag in the hand"],
            "shoulder bag": ["shoulder bag", "messenger bag", "bag over the shoulder"]},
}
PERSON_NOUNS = {"man": ["man", "man", "guy", "male pedestrian", "young man"],
                "woman": ["woman", "woman", "lady", "female pedestrian", "young woman"]}
NEUTRAL_NOUNS = ["person", "pedestrian", "individual"]
PRONOUNS = {"man": ("he", "his"), "woman": ("she", "her")}


@dataclass(frozen=True)
class Identity:
    """The visible attributes of one synthetic person."""
    gender: str
    skin: int
    hair_style: str
    hair_colour: str
    hat: str
    hat_colour: str
    upper: str
    upper_colour: str
    upper_striped: bool
    lower: str
    lower_colour: str
    shoes: str
    shoe_colour: str
    bag: str
    bag_colour: str
    build: float  # shoulder half-width factor

    def key(self) -> tuple:
        """The attributes that make two identities distinguishable in a caption."""
        return (self.gender, self.hair_style, self.hair_colour, self.hat, self.hat_colour, self.upper,
                self.upper_colour, self.upper_striped, self.lower, self.lower_colour, self.shoes,
                self.shoe_colour, self.bag, self.bag_colour)


def _pick(rng: np.random.Generator, options, probs=None):
    return options[int(rng.choice(len(options), p=probs))]


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw one identity's attributes."""
    gender = _pick(rng, ["man", "woman"])
    hair_style = _pick(rng, HAIR_STYLES, [0.55, 0.15, 0.05, 0.25] if gender == "man" else [0.15, 0.5, 0.3, 0.05])
    hat = _pick(rng, HAT_TYPES, [0.6, 0.15, 0.15, 0.1])
    bag = _pick(rng, BAG_TYPES, [0.35, 0.3, 0.15, 0.2] if gender == "man" else [0.3, 0.2, 0.3, 0.2])
    lower_types = LOWER_TYPES if gender == "woman" else LOWER_TYPES[:3]
    return Identity(
        gender=gender, skin=int(rng.integers(len(SKIN_TONES))), hair_style=hair_style,
        hair_colour=_pick(rng, list(HAIR_COLOURS), [0.45, 0.3, 0.15, 0.1]),
        hat=hat, hat_colour=_pick(rng, HAT_COLOURS), upper=_pick(rng, UPPER_TYPES),
        upper_colour=_pick(rng, UPPER_COLOURS), upper_striped=bool(rng.random() < 0.2),
        lower=_pick(rng, lower_types), lower_colour=_pick(rng, LOWER_COLOURS),
        shoes=_pick(rng, SHOE_TYPES), shoe_colour=_pick(rng, SHOE_COLOURS),
        bag=bag, bag_colour=_pick(rng, BAG_COLOURS), build=float(rng.uniform(0.9, 1.1)),
    )


# ----------------------------------------------------------------------------- rendering
def _shade(rgb, factor: float):
    return tuple(int(np.clip(c * factor, 0, 255)) for c in rgb)


def _draw_background(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """A street-like scene: a wall/sky colour, a few blocks (buildings, windows), a ground strip."""
    base = tuple(int(v) for v in rng.integers(60, 200, size=3))
    draw.rectangle([0, 0, width, height], fill=base)
    for _ in range(int(rng.integers(1, 5))):
        x0 = int(rng.integers(-width // 2, width))
        y0 = int(rng.integers(-height // 4, height // 2))
        block_w, block_h = int(rng.integers(width // 4, width)), int(rng.integers(height // 6, height))
        draw.rectangle([x0, y0, x0 + block_w, y0 + block_h], fill=_shade(base, float(rng.uniform(0.6, 1.3))))
    ground_top = int(height * rng.uniform(0.72, 0.9))
    ground = tuple(int(v) for v in rng.integers(70, 170, size=3))
    draw.rectangle([0, ground_top, width, height], fill=ground)


def _limb(draw: ImageDraw.ImageDraw, start, end, width: float, fill) -> None:
    """A thick segment with rounded ends."""
    draw.line([start, end], fill=fill, width=max(1, int(round(width))))
    radius = width / 2
    for x, y in (start, end):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)


class _MaskedDraw:
    """Stands in for an ImageDraw: every drawing call goes to the picture unchanged and paints the same
    shape with `value` into a mask (an 'L' image of the canvas size), so the mask marks what was drawn."""

    def __init__(self, draw: ImageDraw.ImageDraw, mask_draw: ImageDraw.ImageDraw, value: int):
        self._draw, self._mask_draw, self._value = draw, mask_draw, value

    def __getattr__(self, name: str):
        paint, shadow = getattr(self._draw, name), getattr(self._mask_draw, name)

        def both(*args, **kwargs):
            paint(*args, **kwargs)
            shadow(*args, **{**kwargs, "fill": self._value})
        return both



# ----------------------------------------------------------------------------- downscaling
LANCZOS_LOBES = 3


def _lanczos_taps(factor: int) -> tuple[np.ndarray, np.ndarray]:
    """The taps of a Lanczos-3 filter that shrinks by the integer `factor`: (offsets int [T], weights
    float64 [T]). Output pixel i reads source pixels i·factor + offset. The weights are rounded to 1e-12 so
    that the last bits of the platform's sin() never reach the image."""
    import math

    def lanczos(x: float) -> float:
        if x == 0.0:
            return 1.0
        if abs(x) >= LANCZOS_LOBES:
            return 0.0
        px = math.pi * x
        return LANCZOS_LOBES * math.sin(px) * math.sin(px / LANCZOS_LOBES) / (px * px)

    offsets, weights = [], []
    for offset in range(-LANCZOS_LOBES * factor - 1, LANCZOS_LOBES * factor + factor + 1):
        # distance of the source pixel's centre from the output pixel's centre, in output pixels
        weight = round(lanczos((offset + 0.5 - factor / 2) / factor), 12)
        if weight != 0.0:
            offsets.append(offset)
            weights.append(weight)
    return np.asarray(offsets), np.asarray(weights, dtype=np.float64)


def _downscale_axis(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Shrink axis 0 of float64 `pixels` [N, ...] by `factor` (N divisible by it) with Lanczos-3; taps that
    fall outside the image are dropped and the remaining weights renormalised (the edge rule of common
    resamplers). Elementwise products summed tap by tap in a fixed order: the same bits on every machine."""
    offsets, weights = _lanczos_taps(factor)
    size = pixels.shape[0] // factor
    sources = np.arange(size)[:, None] * factor + offsets[None, :]  # [size, T]
    inside = (sources >= 0) & (sources < pixels.shape[0])
    tap_weights = np.where(inside, weights[None, :], 0.0)
    tap_weights = tap_weights / tap_weights.sum(axis=1, keepdims=True)
    sources = np.clip(sources, 0, pixels.shape[0] - 1)
    shape = (size,) + (1,) * (pixels.ndim - 1)
    out = np.zeros((size,) + pixels.shape[1:], dtype=np.float64)
    for tap in range(len(offsets)):
        out += tap_weights[:, tap].reshape(shape) * pixels[sources[:, tap]]
    return out


def downscale_lanczos(image: Image.Image, factor: int) -> Image.Image:
    """An RGB image shrunk by the integer `factor` on both sides with a Lanczos-3 filter computed in NumPy,
    so the bytes do not depend on the installed Pillow (its LANCZOS resize changed between 12 and 13)."""
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.shape[0] % factor or pixels.shape[1] % factor:
        raise ValueError(f"image of {pixels.shape[1]}x{pixels.shape[0]} px is not divisible by {factor}")
    shrunk = _downscale_axis(_downscale_axis(pixels, factor).swapaxes(0, 1), factor).swapaxes(0, 1)
    return Image.fromarray(np.clip(np.floor(shrunk + 0.5), 0, 255).astype(np.uint8), "RGB")


def _coverage_mask(mask: Image.Image, factor: int) -> np.ndarray:
    """bool [H, W]: output pixels at least half covered by the drawn mask (factor x factor blocks counted)."""
    drawn = np.asarray(mask) > 0
    height, width = drawn.shape[0] // factor, drawn.shape[1] // factor
    counts = drawn.reshape(height, factor, width, factor).sum(axis=(1, 3))
    return counts * 2 >= factor * factor


def render_person(identity: Identity, rng: np.random.Generator, size: tuple[int, int] = (IMAGE_HEIGHT, IMAGE_WIDTH),
                  placement: float = 0.08, with_mask: bool = False):
    """One image of `identity` with random view, pose, placement, background, lighting and occlusion
    drawn from `rng`.

    size:      (H, W) of the output in pixels (the benchmark's crops: IMAGE_HEIGHT × IMAGE_WIDTH; the
               figure's height is 78-95 % of H whatever W is, so a wider canvas shows more scene).
    placement: the figure's horizontal centre lies uniformly within ±placement·W of the middle.
    with_mask: also return the person mask, bool [H, W]: output pixels at least half covered by the
               figure (body, clothes, hat, bag) and not hidden by an occluder.
    Returns the RGB image, or (image, mask) with `with_mask`. The defaults give the benchmark's images
    (the same random draws in the same order whatever the options)."""
    out_height, out_width = (int(s) for s in size)
    width, height = out_width * SUPERSAMPLE, out_height * SUPERSAMPLE
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    _draw_background(draw, rng, width, height)
    mask = Image.new("L", (width, height), 0) if with_mask else None
    scene_draw = draw
    if mask is not None:
        draw = _MaskedDraw(scene_draw, ImageDraw.Draw(mask), 255)

    back_view = bool(rng.random() < 0.35)
    unit = height * float(rng.uniform(0.78, 0.95))  # figure height in pixels
    top = float(rng.uniform(0.01, 0.99) * (height - unit))
    centre = width / 2 + float(rng.uniform(-placement, placement)) * width

    def at(fx: float, fy: float) -> tuple[float, float]:
        return centre + fx * unit, top + fy * unit

    skin = SKIN_TONES[identity.skin]
    upper_rgb = COLOURS[identity.upper_colour]
    lower_rgb = COLOURS[identity.lower_colour]
    shoe_rgb = COLOURS[identity.shoe_colour]
    bag_rgb = COLOURS[identity.bag_colour]
    hair_rgb = HAIR_COLOURS[identity.hair_colour]
    shoulder = 0.105 * identity.build * (1.0 if identity.gender == "man" else 0.9)
    waist = shoulder * 0.8
    stride = float(rng.uniform(0.0, 0.07))  # 0 = standing, larger = walking
    arm_swing = float(rng.uniform(-0.04, 0.04))
    limb_w = 0.06 * unit

    # long hair behind the shoulders, backpack behind the body (front view)
    head_c, head_r = at(0, 0.075), 0.055 * unit
    if identity.bag == "backpack" and not back_view:
        draw.rounded_rectangle([*at(-shoulder - 0.03, 0.17), *at(shoulder + 0.03, 0.42)], radius=4, fill=bag_rgb)

    # legs: the lower garment, skin below shorts/skirt, then shoes
    hip_y, foot_y = 0.5, 0.955
    left_foot, right_foot = at(-0.04 - stride, foot_y), at(0.04 + stride, foot_y)
    left_hip, right_hip = at(-0.045, hip_y), at(0.045, hip_y)
    bare_legs = identity.lower in ("shorts", "skirt")
    for hip, foot in ((left_hip, left_foot), (right_hip, right_foot)):
        _limb(draw, hip, foot, limb_w, skin if bare_legs else lower_rgb)
        if identity.lower == "jeans":
            draw.line([hip, foot], fill=_shade(lower_rgb, 0.7), width=max(1, SUPERSAMPLE))
        if identity.lower == "shorts":
            knee = (hip[0] + (foot[0] - hip[0]) * 0.5, hip[1] + (foot[1] - hip[1]) * 0.5)
            _limb(draw, hip, knee, limb_w * 1.15, lower_rgb)
    if identity.lower == "skirt":
        draw.polygon([at(-waist, 0.47), at(waist, 0.47), at(waist + 0.06, 0.74), at(-waist - 0.06, 0.74)],
                     fill=lower_rgb)
    if identity.lower in ("trousers", "jeans", "shorts"):
        draw.rectangle([*at(-waist, 0.46), *at(waist, 0.54)], fill=lower_rgb)
    shoe_top = 0.86 if identity.shoes == "boots" else 0.925
    for foot in (left_foot, right_foot):
        fx = (foot[0] - centre) / unit
        draw.rectangle([*at(fx - 0.035, shoe_top), *at(fx + 0.045, 0.985)], fill=shoe_rgb)
        if identity.shoes == "sneakers":
            draw.rectangle([*at(fx - 0.035, 0.97), *at(fx + 0.045, 0.985)], fill=(240, 240, 240))

    # torso: the upper garment (coats reach the knees)
    torso_bottom = 0.63 if identity.upper == "coat" else 0.5
    hem = waist + (0.04 if identity.upper == "coat" else 0.0)
    torso = [at(-shoulder, 0.14), at(shoulder, 0.14), at(hem, torso_bottom), at(-hem, torso_bottom)]
    draw.polygon(torso, fill=upper_rgb)
    if identity.upper_striped:
        stripe_rgb = (245, 245, 245) if sum(upper_rgb) < 400 else (30, 30, 30)
        for fy in np.arange(0.18, torso_bottom - 0.02, 0.05):
            frac = (fy - 0.14) / (torso_bottom - 0.14)
            half = shoulder + (hem - shoulder) * frac
            draw.line([at(-half, fy), at(half, fy)], fill=stripe_rgb, width=max(1, int(0.015 * unit)))
    if identity.upper in ("jacket", "coat") and not back_view:
        draw.line([at(0, 0.15), at(0, torso_bottom)], fill=_shade(upper_rgb, 0.6), width=max(1, SUPERSAMPLE))
    if identity.upper == "shirt" and not back_view:
        draw.polygon([at(-0.035, 0.14), at(0.035, 0.14), at(0, 0.19)], fill=_shade(upper_rgb, 1.25))

    # arms: sleeves, then hands
    sleeve_end = 0.3 if identity.upper == "t-shirt" else 1.0
    for side in (-1, 1):
        shoulder_pt = at(side * (shoulder + 0.01), 0.16)
        hand = at(side * (shoulder + 0.035) + side * arm_swing * (1 if side > 0 else -1), 0.48)
        _limb(draw, shoulder_pt, hand, limb_w * 0.85, skin)
        sleeve = (shoulder_pt[0] + (hand[0] - shoulder_pt[0]) * sleeve_end,
                  shoulder_pt[1] + (hand[1] - shoulder_pt[1]) * sleeve_end * 0.92)
        _limb(draw, shoulder_pt, sleeve, limb_w * 0.9, upper_rgb)

    # head, hair, hat (long hair falls over the shoulders: strands at the sides in front, a block behind)
    if identity.hair_style == "long":
        if back_view:
            draw.rectangle([*at(-0.07, 0.06), *at(0.07, 0.27)], fill=hair_rgb)
        else:
            for side in (-1, 1):
                draw.rectangle([*at(min(side * 0.035, side * 0.075), 0.06), *at(max(side * 0.035, side * 0.075), 0.26)],
                               fill=hair_rgb)
    draw.rectangle([*at(-0.02, 0.11), *at(0.02, 0.145)], fill=skin)
    draw.ellipse([head_c[0] - head_r, head_c[1] - head_r * 1.1, head_c[0] + head_r, head_c[1] + head_r * 1.1], fill=skin)
    if identity.hair_style != "bald":
        box = [head_c[0] - head_r * 1.05, head_c[1] - head_r * 1.2, head_c[0] + head_r * 1.05, head_c[1] + head_r * 1.0]
        if back_view:
            draw.ellipse(box, fill=hair_rgb)
        else:
            draw.pieslice(box, 180, 360, fill=hair_rgb)
        if identity.hair_style == "ponytail":
            draw.ellipse([*at(0.04, 0.06), *at(0.09, 0.17)], fill=hair_rgb)
    if identity.hat != "none":
        hat_rgb = COLOURS[identity.hat_colour]
        crown = [head_c[0] - head_r * 1.05, head_c[1] - head_r * 1.35, head_c[0] + head_r * 1.05, head_c[1] + head_r * 0.5]
        if identity.hat == "beanie":
            draw.pieslice([crown[0], crown[1] - head_r * 0.2, crown[2], crown[3] + head_r * 0.2], 180, 360, fill=hat_rgb)
        else:
            draw.pieslice(crown, 180, 360, fill=hat_rgb)
            brim_y = head_c[1] - head_r * 0.45
            if identity.hat == "cap":
                draw.rectangle([head_c[0] - head_r, brim_y, head_c[0] + head_r * 1.7, brim_y + head_r * 0.25], fill=hat_rgb)
            else:
                draw.ellipse([head_c[0] - head_r * 2.0, brim_y - head_r * 0.15, head_c[0] + head_r * 2.0,
                              brim_y + head_r * 0.3], fill=hat_rgb)

    # bags in front of the body
    if identity.bag == "backpack":
        if back_view:
            draw.rounded_rectangle([*at(-shoulder * 0.85, 0.17), *at(shoulder * 0.85, 0.43)], radius=4, fill=bag_rgb)
        else:
            for side in (-1, 1):
                draw.line([at(side * shoulder * 0.6, 0.14), at(side * shoulder * 0.6, 0.36)], fill=bag_rgb,
                          width=max(1, int(0.025 * unit)))
    elif identity.bag == "handbag":
        hand = at(shoulder + 0.04, 0.48)
        draw.rectangle([hand[0] - 0.04 * unit, hand[1], hand[0] + 0.05 * unit, hand[1] + 0.09 * unit], fill=bag_rgb)
    elif identity.bag == "shoulder bag":
        draw.line([at(-shoulder * 0.7, 0.15), at(shoulder + 0.02, 0.44)], fill=bag_rgb, width=max(1, int(0.02 * unit)))
        draw.rectangle([*at(shoulder - 0.02, 0.42), *at(shoulder + 0.08, 0.53)], fill=bag_rgb)

    # partial occlusion: an object in front (pole, car, another passer-by's shoulder); it hides the mask
    if mask is not None:
        draw = _MaskedDraw(scene_draw, ImageDraw.Draw(mask), 0)
    if rng.random() < 0.25:
        occ_rgb = tuple(int(v) for v in rng.integers(30, 220, size=3))
        kind = int(rng.integers(3))
        if kind == 0:  # vertical pole
            x0 = int(rng.integers(0, width - width // 6))
            draw.rectangle([x0, 0, x0 + int(width * rng.uniform(0.08, 0.18)), height], fill=occ_rgb)
        elif kind == 1:  # low object covering the legs
            y0 = int(height * rng.uniform(0.7, 0.85))
            draw.rectangle([0, y0, width, height], fill=occ_rgb)
        else:  # side occluder
            x0 = int(width * rng.uniform(0.65, 0.8)) if rng.random() < 0.5 else 0
            x1 = x0 + int(width * rng.uniform(0.2, 0.35))
            draw.rectangle([x0, int(height * 0.2), x1, height], fill=occ_rgb)

    image = downscale_lanczos(canvas, SUPERSAMPLE)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8))))
    # lighting: brightness, colour cast and sensor noise
    pixels = np.asarray(image, dtype=np.float32)
    gain = float(rng.uniform(0.75, 1.2)) * rng.uniform(0.93, 1.07, size=3)
    pixels = pixels * gain + rng.normal(0.0, 4.0, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if mask is None:
        return image
    return image, _coverage_mask(mask, SUPERSAMPLE)


# ----------------------------------------------------------------------------- captions
def _colour_word(rng: np.random.Generator, colour: str) -> str:
    return _pick(rng, COLOUR_SYNONYMS.get(colour, [colour]))


def _noun(rng: np.random.Generator, kind: str, value: str) -> str:
    return _pick(rng, NOUNS[kind][value])


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _garment_phrase(rng: np.random.Generator, kind: str, value: str, colour: str, striped: bool = False) -> str:
    """'a red striped t-shirt', 'blue jeans' (no article for plurals)."""
    words = [_colour_word(rng, colour)]
    if striped:
        words.append(_pick(rng, ["striped", "striped", "stripy"]))
    words.append(_noun(rng, kind, value))
    phrase = " ".join(words)
    if kind in ("lower", "shoes") and value != "skirt":
        return phrase  # plurals: trousers, jeans, shorts, shoes
    return f"{_article(phrase)} {phrase}"


def write_caption(identity: Identity, rng: np.random.Generator) -> str:
    """One caption mentioning a random subset of `identity`'s attributes, from varied templates."""
    he, his = PRONOUNS[identity.gender]
    subject = _pick(rng, PERSON_NOUNS[identity.gender]) if rng.random() < 0.75 else _pick(rng, NEUTRAL_NOUNS)
    clothing = []  # phrases for "wearing ..."
    if rng.random() < 0.85:
        clothing.append(_garment_phrase(rng, "upper", identity.upper, identity.upper_colour, identity.upper_striped))
    if rng.random() < 0.8 or not clothing:
        clothing.append(_garment_phrase(rng, "lower", identity.lower, identity.lower_colour))
    if rng.random() < 0.4:
        clothing.append(_garment_phrase(rng, "shoes", identity.shoes, identity.shoe_colour))
    if len(clothing) > 1 and rng.random() < 0.3:
        rng.shuffle(clothing)
    extras = []  # separate clauses
    if rng.random() < 0.45:
        if identity.hair_style == "bald":
            extras.append(_pick(rng, [f"{he} is bald", f"{he} has no hair", f"{he} has a shaved head"]))
        else:
            style = {"short": "short", "long": "long", "ponytail": "tied"}[identity.hair_style]
            hair = f"{style} {identity.hair_colour} hair" if rng.random() < 0.5 else f"{identity.hair_colour} {style} hair"
            if identity.hair_style == "ponytail" and rng.random() < 0.5:
                hair = f"{identity.hair_colour} hair in a ponytail"
            extras.append(_pick(rng, [f"{he} has {hair}", f"{his} hair is {identity.hair_colour}"]) if identity.hair_style == "short"
                          else f"{he} has {hair}")
    if identity.hat != "none" and rng.random() < 0.6:
        hat = _garment_phrase(rng, "hat", identity.hat, identity.hat_colour)
        extras.append(_pick(rng, [f"{he} wears {hat}", f"{he} has {hat} on {his} head", f"there is {hat} on {his} head"]))
    if identity.bag != "none" and rng.random() < 0.65:
        bag = _garment_phrase(rng, "bag", identity.bag, identity.bag_colour)
        extras.append(_pick(rng, [f"{he} carries {bag}", f"{he} is carrying {bag}", f"{he} has {bag}"]))
    elif identity.bag == "none" and rng.random() < 0.1:
        extras.append(f"{he} carries nothing")
    if len(extras) > 1:
        rng.shuffle(extras)

    joined = clothing[0] if len(clothing) == 1 else ", ".join(clothing[:-1]) + " and " + clothing[-1]
    template = int(rng.integers(4))
    if template == 0:
        sentence = f"{_article(subject).capitalize()} {subject} wearing {joined}."
    elif template == 1:
        sentence = f"The {subject} is wearing {joined}."
    elif template == 2:
        sentence = f"This {subject} has on {joined}."
    else:
        sentence = f"{_article(subject).capitalize()} {subject} in {joined}."
    for clause in extras:
        sentence += " " + clause[0].upper() + clause[1:] + "."
    return sentence


def caption_tokens(caption: str) -> list[str]:
    """CUHK-PEDES-style `processed_tokens`: lower-case word tokens."""
    return re.findall(r"[a-z0-9\-]+", caption.lower())


# ----------------------------------------------------------------------------- dataset writer
def sample_identities(count: int, seed: int, exclude: frozenset = frozenset()) -> list[Identity]:
    """`count` identities with pairwise distinct attribute keys, deterministic in `seed`; identities whose
    `key()` is in `exclude` are skipped (the random draws are the same; the list is filtered)."""
    rng = np.random.default_rng([seed, 0])
    identities, seen = [], set(exclude)
    while len(identities) < count:
        identity = sample_identity(rng)
        if identity.key() not in seen:
            seen.add(identity.key())
            identities.append(identity)
    return identities


def generate(out_dir, preset: str = "small", seed: int = 0, progress: bool = True, overwrite: bool = True) -> Path:
    """Write the synth-pedes `preset` into `out_dir` (CUHK-PEDES layout: `imgs/`, `reid_raw.json`,
    plus `synth_info.json`). The folder is built under a temporary name and renamed at the end, so a
    reader never sees half a dataset. overwrite=False keeps a complete `out_dir` that another process
    wrote meanwhile. Returns `out_dir`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown synth-pedes preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = PRESETS[preset]
    out_dir = Path(out_dir)
    tmp_dir = temporary_folder(out_dir, "synth_info.json", "synth-pedes")
    (tmp_dir / "imgs").mkdir()
    start = time.perf_counter()
    try:
        splits = ["train"] * spec.train_ids + ["val"] * spec.val_ids + ["test"] * spec.test_ids
        identities = sample_identities(len(splits), seed)
        entries = []
        bar = tqdm(total=len(splits) * spec.images_per_id, desc=f"synth-pedes-{preset}", unit="img",
                   disable=not progress, leave=False)
        for person, (split, identity) in enumerate(zip(splits, identities)):
            (tmp_dir / "imgs" / split).mkdir(exist_ok=True)
            for shot in range(spec.images_per_id):
                rng = np.random.default_rng([seed, 1, person, shot])
                image = render_person(identity, rng)
                rel_path = f"{split}/{person + 1:05d}_{shot}.png"
                image.save(tmp_dir / "imgs" / rel_path, format="PNG", optimize=False)
                captions = [write_caption(identity, rng) for _ in range(CAPTIONS_PER_IMAGE)]
                entries.append({"split": split, "captions": captions, "file_path": rel_path,
                                "processed_tokens": [caption_tokens(c) for c in captions], "id": person + 1,
                                "attributes": identity.__dict__})
                bar.update()
        bar.close()
        (tmp_dir / "reid_raw.json").write_text(json.dumps(entries, indent=0), encoding="utf-8")
        info = {"generator_version": GENERATOR_VERSION, "preset": preset, "seed": seed,
                "image_size_hw": [IMAGE_HEIGHT, IMAGE_WIDTH], **spec.__dict__,
                "captions_per_image": CAPTIONS_PER_IMAGE}
        (tmp_dir / "synth_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        # overwrite=False: another process that finished first keeps its copy
        replace_folder(tmp_dir, out_dir, keep_complete=None if overwrite else "reid_raw.json")
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if progress:
        print(f"synth-pedes-{preset}: {len(entries)} images written to {out_dir} "
              f"in {time.perf_counter() - start:.1f} s")
    return out_dir


def save_image(image: Image.Image, path) -> Path:
    """Write `image` to `path` (format from the suffix), creating the parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def wrap_words(text: str, width: int) -> list[str]:
    """`text` broken into lines of at most about `width` characters, at spaces."""
    lines, line = [], ""
    for word in text.split():
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return lines


def synth_folder(root, preset: str) -> Path:
    """Where load_benchmark keeps a preset: `<root>/SYNTH-PEDES-<preset>`."""
    return Path(root) / f"SYNTH-PEDES-{preset}"


def ensure_generated(root, preset: str, seed: int = 0) -> Path:
    """The preset's folder under `root`, generated first if absent or made by another generator version."""
    folder = synth_folder(root, preset)
    info_path = folder / "synth_info.json"
    if info_path.exists() and (folder / "reid_raw.json").exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            info = {}
        if info.get("generator_version") == GENERATOR_VERSION and info.get("seed") == seed:
            return folder
        return generate(folder, preset=preset, seed=seed, overwrite=True)  # stale: another version or seed
    return generate(folder, preset=preset, seed=seed, overwrite=False)


def contact_sheet(dataset_dir, out_path, identities: int = 12, columns_per_id: Optional[int] = None,
                  split: str = "train", scale: int = 2) -> Path:
    """A PNG grid: one row block per identity (its images side by side, first caption below), for looking
    at the data. Reads `dataset_dir/reid_raw.json`."""
    from PIL import ImageFont

    dataset_dir = Path(dataset_dir)
    entries = [e for e in json.loads((dataset_dir / "reid_raw.json").read_text(encoding="utf-8")) if e["split"] == split]
    by_id: dict[int, list[dict]] = {}
    for entry in entries:
        by_id.setdefault(entry["id"], []).append(entry)
    groups = list(by_id.values())
    stride = max(1, len(groups) // identities)  # spread over the split, not just its first identities
    chosen = groups[::stride][:identities]
    per_id = columns_per_id or max(len(v) for v in chosen)
    cell_w, cell_h = IMAGE_WIDTH * scale, IMAGE_HEIGHT * scale
    ids_per_row = 4
    block_w, text_h = per_id * cell_w + 8, 64
    rows = (len(chosen) + ids_per_row - 1) // ids_per_row
    sheet = Image.new("RGB", (ids_per_row * block_w, rows * (cell_h + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for n, group in enumerate(chosen):
        x0, y0 = (n % ids_per_row) * block_w, (n // ids_per_row) * (cell_h + text_h)
        for k, entry in enumerate(group[:per_id]):
            image = Image.open(dataset_dir / "imgs" / entry["file_path"]).convert("RGB")
            sheet.paste(image.resize((cell_w, cell_h), Image.NEAREST), (x0 + k * cell_w, y0))
        lines = wrap_words(group[0]["captions"][0], block_w // 6)
        draw.multiline_text((x0 + 2, y0 + cell_h + 2), "\n".join(lines[:5]), fill=(0, 0, 0), font=font, spacing=1)
    return save_image(sheet, out_path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synth-pedes benchmark (CUHK-PEDES layout).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--out", required=True, help="output folder (gets imgs/ and reid_raw.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contact-sheet", default=None, help="also write a contact-sheet PNG here")
    args = parser.parse_args(argv)
    out = generate(args.out, preset=args.preset, seed=args.seed)
    spec = PRESETS[args.preset]
    print(f"{'split':<6}{'ids':>7}{'images':>8}{'captions':>10}")
    for split, ids in (("train", spec.train_ids), ("val", spec.val_ids), ("test", spec.test_ids)):
        images = ids * spec.images_per_id
        print(f"{split:<6}{ids:>7}{images:>8}{images * CAPTIONS_PER_IMAGE:>10}")
    if args.contact_sheet:
        print(f"contact sheet: {contact_sheet(out, args.contact_sheet)}")


if __name__ == "__main__":
    main()
