"""The proxy pre-training corpus: web-photo-like pictures of synthetic people with short alt-text captions.

It stands in for CLIP's web data when pre-training a small CLIP (scripts/pretrain_proxy.py) that is then
fine-tuned on synth-pedes, and it is built to be DISJOINT from that benchmark:

* identities: drawn with another seed and an exclusion list, so that no identity's attribute key
  (`Identity.key()`) equals one of any synth-pedes preset (`benchmark_identity_keys`);
* pictures: the same procedural renderer (same visual domain, as web photos are for real CLIP), but
  square scenes in which the person stands anywhere across the width (the benchmark: tight crops);
* captions: generic alt text, not the benchmark's sentences: other templates, word orders and nouns,
  short, most naming one to three attributes ("photo of a woman in a red coat and black jeans",
  "grey tee, blue shorts", "image may contain: person, backpack").

On disk (a folder whose name encodes the settings, under the synth-pedes cache):
    images.npy    uint8 [N, S, S, 3] RGB, N = identities × images_per_id (train first, then held out)
    corpus.json   {"captions": [[str] * captions_per_image] * N, "identity": [int] * N (0-based),
                   "split": ["train" | "heldout"] * N, "attributes": [Identity fields] per identity}
    corpus_info.json  version and settings
Every byte is a function of the settings (seed included).

    python -m trpr.data.proxy_corpus [--identities 8000] [--out DIR] [--contact-sheet sheet.png]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from trpr.runtime.atomic import replace_folder, temporary_folder
from trpr.runtime.cache import cache_root

from .synthetic import (PRESETS, Identity, _article, _colour_word, _pick, render_person, sample_identities, save_image,
                        wrap_words)

CORPUS_VERSION = 2  # bump whenever the bytes of a corpus change: cached copies are rebuilt (2: synthetic GENERATOR_VERSION 4)
BENCHMARK_SEED = 0  # the seed load_benchmark generates synth-pedes with


@dataclass(frozen=True)
class CorpusSpec:
    """What a corpus holds. image_size: side S of the square pictures in pixels; placement: the person's
    horizontal centre lies within ±placement·S of the middle (see data.synthetic.render_person)."""
    train_ids: int = 8000
    heldout_ids: int = 250
    images_per_id: int = 3
    captions_per_image: int = 3
    image_size: int = 64
    placement: float = 0.3
    seed: int = 20240917

    def folder_name(self) -> str:
        """A name that encodes every setting (and the corpus version)."""
        return (f"PROXY-CORPUS-v{CORPUS_VERSION}-ids{self.train_ids}+{self.heldout_ids}x{self.images_per_id}"
                f"-cap{self.captions_per_image}-{self.image_size}px-place{self.placement:g}-seed{self.seed}")


# ----------------------------------------------------------------------------- identities
@lru_cache(maxsize=4)
def benchmark_identity_keys(seed: int = BENCHMARK_SEED) -> frozenset:
    """The attribute keys of every identity of every synth-pedes preset generated with `seed`."""
    keys = set()
    for spec in PRESETS.values():
        total = spec.train_ids + spec.val_ids + spec.test_ids
        keys.update(identity.key() for identity in sample_identities(total, seed))
    return frozenset(keys)


def corpus_identities(spec: CorpusSpec) -> list[Identity]:
    """train_ids + heldout_ids identities drawn with the corpus seed, none sharing a key with synth-pedes."""
    if spec.seed == BENCHMARK_SEED:
        raise ValueError(f"the corpus seed must differ from the benchmark's ({BENCHMARK_SEED})")
    return sample_identities(spec.train_ids + spec.heldout_ids, spec.seed, exclude=benchmark_identity_keys())


# ----------------------------------------------------------------------------- alt-text captions
ALT_NOUNS = {
    "upper": {"t-shirt": ["t-shirt", "tee", "t shirt"], "shirt": ["shirt", "long sleeve shirt", "button-up"],
              "jacket": ["jacket", "windbreaker"], "coat": ["coat", "winter coat", "trench coat"]},
    "lower": {"trousers": ["trousers", "pants"], "jeans": ["jeans", "denims"], "shorts": ["shorts"],
              "skirt": ["skirt", "mini skirt"]},
    "shoes": {"shoes": ["shoes", "loafers"], "sneakers": ["sneakers", "running shoes"], "boots": ["boots"]},
    "hat": {"cap": ["cap", "ball cap"], "beanie": ["beanie", "wool hat"], "sunhat": ["sun hat", "summer hat"]},
    "bag": {"backpack": ["backpack", "school bag"], "handbag": ["handbag", "purse"],
            "shoulder bag": ["shoulder bag", "crossbody bag", "bag"]},
}
WHO = {"man": ["man", "guy", "young man", "male"], "woman": ["woman", "girl", "young woman", "lady"]}
WHO_NEUTRAL = ["person", "someone", "pedestrian", "adult"]
FILLERS = ["on a city street", "in the city", "outdoors", "walking", "standing outside", "near a building",
           "street photography", "daytime", "urban scene", "on the sidewalk"]
# {a}: "a" / "an" for {who}; {listed}: "x, y and z"; {commas}: "x, y, z"
ALT_TEMPLATES = ("photo of {a} {who} with {listed}", "{who} wearing {listed}", "{commas}",
                 "image may contain: {who}, {commas}", "{listed} - street style", "candid shot of {a} {who}, {listed}",
                 "stock photo: {who} in {listed}", "{who} with {commas}", "{listed} on {a} {who}")
ATTRIBUTE_WEIGHTS = {"upper": 5.0, "lower": 4.0, "shoes": 1.5, "hat": 2.0, "bag": 2.5, "hair": 1.5}


def attribute_phrase(identity: Identity, attribute: str, rng: np.random.Generator) -> str:
    """A bare noun phrase for one attribute, e.g. 'red striped tee', 'long blonde hair', 'black backpack'."""
    if attribute == "hair":
        if identity.hair_style == "bald":
            return _pick(rng, ["shaved head", "bald head"])
        style = {"short": "short", "long": "long", "ponytail": "tied-back"}[identity.hair_style]
        if identity.hair_style == "ponytail" and rng.random() < 0.5:
            return f"{identity.hair_colour} ponytail"
        return f"{style} {identity.hair_colour} hair"
    value, colour = {"upper": (identity.upper, identity.upper_colour), "lower": (identity.lower, identity.lower_colour),
                     "shoes": (identity.shoes, identity.shoe_colour), "hat": (identity.hat, identity.hat_colour),
                     "bag": (identity.bag, identity.bag_colour)}[attribute]
    words = [_colour_word(rng, colour)]
    if attribute == "upper" and identity.upper_striped:
        words.append("striped")
    words.append(_pick(rng, ALT_NOUNS[attribute][value]))
    return " ".join(words)


def write_alt_text(identity: Identity, rng: np.random.Generator) -> str:
    """One short web-alt-text caption naming 1-3 (rarely 4) visible attributes of `identity`, lower case."""
    available = [a for a in ATTRIBUTE_WEIGHTS
                 if not (a == "hat" and identity.hat == "none") and not (a == "bag" and identity.bag == "none")]
    weights = np.array([ATTRIBUTE_WEIGHTS[a] for a in available])
    count = min(len(available), int(rng.choice([1, 2, 3, 4], p=[0.3, 0.4, 0.25, 0.05])))
    chosen = [available[i] for i in rng.choice(len(available), size=count, replace=False, p=weights / weights.sum())]
    phrases = [attribute_phrase(identity, attribute, rng) for attribute in chosen]
    who = _pick(rng, WHO[identity.gender]) if rng.random() < 0.6 else _pick(rng, WHO_NEUTRAL)
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    text = ALT_TEMPLATES[int(rng.integers(len(ALT_TEMPLATES)))].format(
        a=_article(who), who=who, listed=listed, commas=", ".join(phrases))
    if rng.random() < 0.3:
        text += f" {_pick(rng, FILLERS)}"
    return text


# ----------------------------------------------------------------------------- writer / cache
def generate_corpus(out_dir, spec: CorpusSpec = CorpusSpec(), progress: bool = True) -> Path:
    """Render the corpus into `out_dir` (built under a temporary name and renamed at the end, so a reader
    never sees half a corpus; an existing complete copy is replaced). Returns `out_dir`."""
    out_dir = Path(out_dir)
    tmp_dir = temporary_folder(out_dir, "corpus_info.json", "proxy corpus")
    start = time.perf_counter()
    try:
        identities = corpus_identities(spec)
        count = len(identities) * spec.images_per_id
        images = np.lib.format.open_memmap(tmp_dir / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(count, spec.image_size, spec.image_size, 3))
        captions, owner, split = [], [], []
        bar = tqdm(total=count, desc="proxy corpus", unit="img", disable=None if progress else True, leave=False)
        for person, identity in enumerate(identities):
            for shot in range(spec.images_per_id):
                rng = np.random.default_rng([spec.seed, 2, person, shot])
                picture = render_person(identity, rng, size=(spec.image_size, spec.image_size),
                                        placement=spec.placement)
                images[len(owner)] = np.asarray(picture)
                captions.append([write_alt_text(identity, rng) for _ in range(spec.captions_per_image)])
                owner.append(person)
                split.append("train" if person < spec.train_ids else "heldout")
                bar.update()
        bar.close()
        images.flush()
        del images
        (tmp_dir / "corpus.json").write_text(json.dumps(
            {"captions": captions, "identity": owner, "split": split,
             "attributes": [identity.__dict__ for identity in identities]}), encoding="utf-8")
        info = {"corpus_version": CORPUS_VERSION, **asdict(spec), "images": count}
        (tmp_dir / "corpus_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        replace_folder(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if progress:
        print(f"proxy corpus: {count} pictures of {len(identities)} identities written to {out_dir} "
              f"in {time.perf_counter() - start:.1f} s")
    return out_dir


def corpus_folder(spec: CorpusSpec = CorpusSpec(), root=None) -> Path:
    """Where the corpus of `spec` is cached: `<root>/<spec.folder_name()>`, root default $TRPR_CACHE or
    ~/.cache/3rtpr."""
    return Path(root if root is not None else cache_root()).expanduser().absolute() / spec.folder_name()


def ensure_corpus(spec: CorpusSpec = CorpusSpec(), root=None, progress: bool = True) -> Path:
    """The cached corpus folder of `spec`, generated first when absent or written by another version."""
    folder = corpus_folder(spec, root)
    info_path = folder / "corpus_info.json"
    if info_path.is_file() and (folder / "images.npy").is_file() and (folder / "corpus.json").is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            info = {}
        if info.get("corpus_version") == CORPUS_VERSION and all(info.get(k) == v for k, v in asdict(spec).items()):
            return folder
    return generate_corpus(folder, spec, progress=progress)


@dataclass
class Corpus:
    """A loaded corpus. images: uint8 [N, S, S, 3] (memory-mapped); captions: N lists; identity: int64 [N];
    split: N strings ("train" / "heldout")."""
    images: np.ndarray
    captions: list
    identity: np.ndarray
    split: list

    def indices(self, split: str) -> np.ndarray:
        """int64 positions of the pictures of one split."""
        return np.flatnonzero(np.asarray(self.split) == split)


def load_corpus(folder) -> Corpus:
    """Read a corpus folder written by generate_corpus; errors name the file."""
    folder = Path(folder)
    for name in ("images.npy", "corpus.json", "corpus_info.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing (not a proxy corpus folder)")
    meta = json.loads((folder / "corpus.json").read_text(encoding="utf-8"))
    images = np.load(folder / "images.npy", mmap_mode="r")
    if not (len(images) == len(meta["captions"]) == len(meta["identity"]) == len(meta["split"])):
        raise ValueError(f"{folder}: images.npy has {len(images)} pictures but corpus.json describes "
                         f"{len(meta['captions'])}")
    return Corpus(images, meta["captions"], np.asarray(meta["identity"], dtype=np.int64), meta["split"])


def contact_sheet(corpus: Corpus, out_path, count: int = 16, scale: int = 3) -> Path:
    """A PNG grid of `count` pictures spread over the corpus, each with its first caption below."""
    step = max(1, len(corpus.images) // count)
    chosen = list(range(0, len(corpus.images), step))[:count]
    side = corpus.images.shape[1] * scale
    columns, text_h = 8, 52
    rows = (len(chosen) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * side, rows * (side + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for n, index in enumerate(chosen):
        x0, y0 = (n % columns) * side, (n // columns) * (side + text_h)
        sheet.paste(Image.fromarray(np.asarray(corpus.images[index])).resize((side, side), Image.NEAREST), (x0, y0))
        lines = wrap_words(corpus.captions[index][0], side // 6)
        draw.multiline_text((x0 + 2, y0 + side + 2), "\n".join(lines[:4]), fill=(0, 0, 0), font=font, spacing=1)
    return save_image(sheet, out_path)


def main(argv=None) -> None:
    defaults = CorpusSpec()
    parser = argparse.ArgumentParser(description="Build the proxy pre-training corpus (cached).")
    parser.add_argument("--identities", type=int, default=defaults.train_ids, help="training identities")
    parser.add_argument("--heldout", type=int, default=defaults.heldout_ids, help="held-out identities")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=None, help="cache root (default $TRPR_CACHE or ~/.cache/3rtpr)")
    parser.add_argument("--contact-sheet", default=None, help="also write a contact-sheet PNG here")
    args = parser.parse_args(argv)
    spec = CorpusSpec(train_ids=args.identities, heldout_ids=args.heldout, seed=args.seed)
    folder = ensure_corpus(spec, args.out)
    print(f"proxy corpus: {folder}")
    if args.contact_sheet:
        print(f"contact sheet: {contact_sheet(load_corpus(folder), args.contact_sheet)}")


if __name__ == "__main__":
    main()
