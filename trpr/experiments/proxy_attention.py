"""Where does the image CLS attention of the last layer look? Person vs background, per backbone.

The fused image head keeps the k patches with the highest last-layer CLS attention (docs/method.md §2);
the paper's premise is that a pretrained CLIP's row picks informative (person) patches. synth-pedes is
procedural, so every picture's person mask is known exactly: this script re-renders the chosen test
pictures with their masks (checking that they equal the stored files) and measures, for each backbone,

* attention on person: the CLS attention mass on patches that are mostly person, against the fraction
  of such patches (what a uniform row would give);
* top-k precision: the fraction of the k = floor(N·ρ) selected patches that are mostly person (the
  fused head's choice), against the same chance rate.

    python scripts/proxy_attention.py --backbone PROXY_DIR [--run RUN_DIR ...] [--random-init] \
        --out docs/results/proxy_attention.png
    (= python -m trpr.experiments.proxy_attention ...; the figure is drawn by trpr.reporting.proxy)

Backbones: `--backbone` (a transformers CLIP folder, loaded as fine-tuning loads it), `--random-init`
(the same architecture untrained, seed 0), `--run` (model A of a trained run's best/, else last/).
Writes the figure (rows = backbones; each picture with its selected patches outlined and the attention
as a heat map) and the numbers as <out>.json; prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from trpr.data.synthetic import PRESETS, render_person, sample_identities, synth_folder
from trpr.data.transforms import ImageTransform
from trpr.reporting.proxy import plot_attention

PERSON_PATCH = 0.5  # a patch is "person" when at least half of its pixels are


def test_pictures(preset: str, count: int, root, seed: int = 0) -> list[dict]:
    """`count` test-split pictures of synth-pedes `preset` (spread over the identities), re-rendered with
    their person masks: [{"image": PIL [128x48], "mask": bool [128, 48], "file": str}]. Raises when a
    re-rendered picture differs from the stored file (the mask would not belong to it)."""
    from PIL import Image

    from trpr import data

    data.load_benchmark(f"synth-pedes-{preset}", root=root)  # generated on first use
    folder = synth_folder(root, preset)
    spec = PRESETS[preset]
    total = spec.train_ids + spec.val_ids + spec.test_ids
    identities = sample_identities(total, seed)
    first_test = spec.train_ids + spec.val_ids
    people = np.linspace(first_test, total - 1, count).round().astype(int)
    pictures = []
    for n, person in enumerate(people):
        shot = n % spec.images_per_id
        image, mask = render_person(identities[person], np.random.default_rng([seed, 1, int(person), shot]),
                                    with_mask=True)
        stored = folder / "imgs" / "test" / f"{person + 1:05d}_{shot}.png"
        with Image.open(stored) as saved:
            if not np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(image)):
                raise RuntimeError(f"{stored}: re-rendering gives another picture (generator changed?)")
        pictures.append({"image": image, "mask": mask, "file": str(stored.relative_to(folder))})
    return pictures


def corpus_pictures(count: int, root) -> list[dict]:
    """`count` held-out pictures of the default proxy corpus (square scenes), re-rendered with their person
    masks (checked against images.npy), in the format of `test_pictures`."""
    from trpr.data.proxy_corpus import CorpusSpec, corpus_identities, ensure_corpus, load_corpus

    spec = CorpusSpec()
    corpus = load_corpus(ensure_corpus(spec, root))
    identities = corpus_identities(spec)
    heldout = corpus.indices("heldout")
    pictures = []
    for position in np.linspace(0, len(heldout) - 1, count).round().astype(int):
        index = int(heldout[position])
        person, shot = int(corpus.identity[index]), index % spec.images_per_id
        image, mask = render_person(identities[person], np.random.default_rng([spec.seed, 2, person, shot]),
                                    size=(spec.image_size, spec.image_size), placement=spec.placement, with_mask=True)
        if not np.array_equal(np.asarray(corpus.images[index]), np.asarray(image)):
            raise RuntimeError(f"corpus picture {index}: re-rendering gives another picture (generator changed?)")
        pictures.append({"image": image, "mask": mask, "file": f"corpus #{index}"})
    return pictures


def patch_person_fraction(mask: np.ndarray, image_size: tuple[int, int], patch: int) -> np.ndarray:
    """bool mask [H0, W0] -> float [N] person fraction of every patch of the (H, W) model input,
    row-major like the ViT's patch tokens (mask resized with box filtering)."""
    from PIL import Image

    height, width = image_size
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.BOX),
                         dtype=np.float32) / 255.0
    grid = resized.reshape(height // patch, patch, width // patch, patch)
    return grid.mean(axis=(1, 3)).reshape(-1)


@torch.no_grad()
def cls_attention(backbone, pictures: list[dict]) -> np.ndarray:
    """[P, N] last-layer CLS attention over the N patches (CLS key dropped, rows renormalised to 1)."""
    transform = ImageTransform(train=False, image_size=backbone.image_size)
    pixels = torch.stack([transform(p["image"]) for p in pictures])
    row = backbone.encode_image(pixels).attention_row[:, 1:]
    return (row / row.sum(dim=1, keepdim=True)).numpy()


def attention_scores(attention: np.ndarray, person: np.ndarray, k: int) -> dict:
    """attention [P, N], person fractions [P, N] -> mean over pictures of: attention mass on person patches,
    the fraction of person patches (chance), top-k precision."""
    is_person = person >= PERSON_PATCH
    top = np.argsort(-attention, axis=1)[:, :k]
    return {"attention_on_person": float((attention * is_person).sum(1).mean()),
            "person_patch_fraction": float(is_person.mean()),
            "topk_precision": float(np.take_along_axis(is_person, top, axis=1).mean()), "k": int(k)}


def load_backbones(args, image_size: tuple[int, int]) -> dict:
    """{label: CLIPBackbone at image_size}, in figure order."""
    from trpr import modeling
    from trpr.modeling.backbone import CLIPBackbone, load_clip_model

    backbones = {}
    if args.random_init:
        if not args.backbone:
            raise SystemExit("--random-init copies the architecture of --backbone DIR")
        torch.manual_seed(0)
        config = load_clip_model(args.backbone).config
        backbones["random init"] = CLIPBackbone(load_clip_model(config), image_size).eval()
    if args.backbone:
        backbones["proxy (pretrained)"] = CLIPBackbone(load_clip_model(args.backbone), image_size).eval()
    for run in args.run or []:
        run = Path(run)
        chosen = run / "best" if (run / "best").is_dir() else run / "last"
        model = modeling.ReciprocalPair.from_pretrained(chosen).a.eval()
        if tuple(model.image_size) != tuple(image_size):
            raise SystemExit(f"{run}: model input {model.image_size} differs from --image-size {image_size}")
        backbones[f"fine-tuned: {run.name}"] = model.clip
    if not backbones:
        raise SystemExit("give --backbone DIR and/or --run RUN_DIR")
    return backbones


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=None, help="a transformers CLIP folder (the proxy)")
    parser.add_argument("--random-init", action="store_true", help="also the --backbone architecture untrained")
    parser.add_argument("--run", nargs="*", default=None, help="trained run folders (model A is used)")
    parser.add_argument("--image-size", type=int, nargs=2, default=[64, 32], metavar=("H", "W"))
    parser.add_argument("--select-ratio", type=float, default=0.2, help="rho of the fused head (k = floor(N rho))")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--corpus", action="store_true",
                        help="score held-out pictures of the proxy's pre-training corpus (square scenes; give "
                             "--image-size S S) instead of synth-pedes test pictures")
    parser.add_argument("--root", default=None, help="synth-pedes cache (default $TRPR_CACHE or ~/.cache/3rtpr)")
    parser.add_argument("--pictures", type=int, default=200, help="test pictures scored")
    parser.add_argument("--shown", type=int, default=8, help="pictures drawn")
    parser.add_argument("--out", default="docs/results/proxy_attention.png")
    args = parser.parse_args(argv)

    from trpr.runtime.cache import cache_root
    from trpr.modeling.fused import num_selected

    image_size = tuple(args.image_size)
    root = Path(args.root) if args.root else cache_root()
    pictures = corpus_pictures(args.pictures, root) if args.corpus else test_pictures(args.preset, args.pictures, root)
    backbones = load_backbones(args, image_size)
    patch = next(iter(backbones.values())).config.vision_config.patch_size
    person = np.stack([patch_person_fraction(p["mask"], image_size, patch) for p in pictures])
    k = num_selected(person.shape[1], args.select_ratio)
    attentions, scores = {}, {}
    for label, backbone in backbones.items():
        attentions[label] = cls_attention(backbone, pictures)
        scores[label] = attention_scores(attentions[label], person, k)
    shown = np.linspace(0, len(pictures) - 1, args.shown).round().astype(int)
    out = Path(args.out)
    plot_attention([pictures[i] for i in shown], {label: a[shown] for label, a in attentions.items()}, scores,
                   image_size, patch, k, out)
    result = {"pictures": len(pictures), "source": "proxy corpus (held out)" if args.corpus else args.preset, "image_size": list(image_size), "patch": patch,
              "person_patch_threshold": PERSON_PATCH, "scores": scores}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'backbone':<40} {'attention on person':>20} {'top-k precision':>16}  (person patches: "
          f"{100 * next(iter(scores.values()))['person_patch_fraction']:.1f}% = chance, k = {k})")
    for label, s in scores.items():
        print(f"{label:<40} {100 * s['attention_on_person']:>19.1f}% {100 * s['topk_precision']:>15.1f}%")
    print(f"figure: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
