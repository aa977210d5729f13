"""Pre-train the proxy CLIP: a small CLIP trained with CLIP's own contrastive loss on the synthetic
web-photo corpus (trpr/data/proxy_corpus.py), saved as a `transformers` CLIP folder so that fine-tuning loads
it through `--model.backbone DIR` exactly like `openai/clip-vit-base-patch16`.

    python scripts/pretrain_proxy.py                # build (or reuse) the cached proxy, print its folder
    python scripts/pretrain_proxy.py --print-path   # only print the folder of these settings
    make proxy                                      # the same as the first line, offline, nice -n 10
    python -m trpr.experiments.proxy_pretrain ...   # the same as scripts/pretrain_proxy.py

The folder (under $TRPR_CACHE, default ~/.cache/3rtpr; its name encodes the settings) holds
config.json + model.safetensors (CLIPModel.save_pretrained, square image_size of pre-training; the
project's loader resizes the position embeddings to the fine-tuning grid), the CLIP tokenizer files,
pretrain_info.json (settings, corpus, CPU and wall time, final loss, zero-shot retrieval) and
loss_curve.png. It is written under a temporary name and renamed when complete; an interrupted run
resumes from its last finished epoch (`.<name>.work/state.safetensors`).

Loss: symmetric InfoNCE over the batch with a learned temperature, as CLIP: logits = exp(t) · cos(img, txt),
t initialised to ln(1/0.07) and clamped at ln(100); mean of the image→text and text→image cross-entropies.
Zero-shot check at the end (text → image, identity-level matches, no fine-tuning): the corpus's held-out
identities at the square size, and the synth-pedes test split at the fine-tuning size through the
fine-tuning loader (TRPRModel.from_clip of the saved folder, global embeddings).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trpr.data.proxy_corpus import CorpusSpec, ensure_corpus, load_corpus
from trpr.data.transforms import CLIP_MEAN, CLIP_STD
from trpr.data.tokenizer import get_tokenizer, tokenize
from trpr.reporting.proxy import plot_loss_curve
from trpr.runtime.atomic import atomic_path, replace_folder, temporary_folder
from trpr.runtime.cache import cache_root

PROXY_VERSION = 1  # bump when the training code changes what a given set of settings produces
INFO_NAME = "pretrain_info.json"
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class ProxySettings:
    """Architecture (both towers the same width; text and vision depth separately), optimisation and the
    corpus. image_size is the corpus's square side; the joint space has `width` dimensions."""
    width: int = 64
    vision_layers: int = 2
    text_layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    patch: int = 8
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1.0e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.03
    seed: int = 0
    corpus: CorpusSpec = field(default_factory=CorpusSpec)

    def architecture(self) -> dict:
        """The proxy's architecture as `modeling.small_clip_config` keyword arguments (= a config's
        `model.backbone` mapping: the same network from random init)."""
        return dict(hidden_size=self.width, intermediate_size=self.mlp_ratio * self.width,
                    num_attention_heads=self.heads, projection_dim=self.width,
                    vision_num_hidden_layers=self.vision_layers, text_num_hidden_layers=self.text_layers,
                    vision_patch_size=self.patch, vision_image_size=self.corpus.image_size)

    def clip_config(self):
        """The transformers CLIPConfig of the proxy (random init)."""
        from trpr.modeling import small_clip_config

        return small_clip_config(**self.architecture())

    def folder_name(self) -> str:
        """Readable main settings + a hash of all of them (corpus included) and of PROXY_VERSION."""
        digest = hashlib.sha256(json.dumps([PROXY_VERSION, asdict(self)], sort_keys=True).encode()).hexdigest()[:8]
        return (f"PROXY-CLIP-w{self.width}-l{self.vision_layers}x{self.text_layers}-p{self.patch}-"
                f"{self.corpus.image_size}px-ids{self.corpus.train_ids}-e{self.epochs}-seed{self.seed}-{digest}")


def proxy_folder(settings: ProxySettings, root=None) -> Path:
    """Where the proxy of `settings` is cached: `<root>/<settings.folder_name()>` (root default $TRPR_CACHE
    or ~/.cache/3rtpr)."""
    return Path(root if root is not None else cache_root()).expanduser().absolute() / settings.folder_name()


def is_complete(folder: Path) -> bool:
    return (folder / INFO_NAME).is_file() and (folder / "config.json").is_file() and \
        (folder / "model.safetensors").is_file()


# ================================================================================================ data
class CorpusBatches:
    """Training batches of the corpus: pictures as CLIP-normalised float [B, 3, S, S] (random horizontal
    flip), one of each picture's captions as token ids / mask [B, L] (L = longest caption of the batch).
    The order, flips and caption choices are a function of (seed, epoch)."""

    def __init__(self, corpus, indices: np.ndarray, batch_size: int, seed: int):
        self.images = corpus.images
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.seed = seed
        per_image = len(corpus.captions[self.indices[0]])
        flat = [caption for i in self.indices for caption in corpus.captions[i]]
        ids, mask = tokenize(get_tokenizer(), flat)
        length = int(mask.sum(1).max())
        self.input_ids = ids[:, :length].view(len(self.indices), per_image, length)
        self.attention_mask = mask[:, :length].view(len(self.indices), per_image, length)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        self.scale, self.bias = 1.0 / (255.0 * std), -torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) / std

    def __len__(self) -> int:
        return len(self.indices) // self.batch_size  # the incomplete last batch is dropped

    def epoch(self, epoch: int):
        """Yields (pixel_values, input_ids, attention_mask) for every batch of `epoch`."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.indices))
        for step in range(len(self)):
            rows = np.sort(order[step * self.batch_size:(step + 1) * self.batch_size])
            pixels = torch.from_numpy(np.ascontiguousarray(self.images[self.indices[rows]])).permute(0, 3, 1, 2)
            pixels = pixels.float().mul_(self.scale).add_(self.bias)
            flip = torch.from_numpy(rng.random(len(rows)) < 0.5)
            pixels[flip] = pixels[flip].flip(-1)
            choice = torch.from_numpy(rng.integers(self.input_ids.shape[1], size=len(rows)))
            rows_t = torch.from_numpy(rows)
            ids, mask = self.input_ids[rows_t, choice], self.attention_mask[rows_t, choice]
            length = int(mask.sum(1).max())
            yield pixels, ids[:, :length], mask[:, :length]


# ============================================================================================ training
def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: image_emb, text_emb [B, E] (un-normalised; row i of each is a pair),
    logit_scale: the log of the inverse temperature (scalar). Returns the mean of the two cross-entropies."""
    logits = logit_scale.exp() * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def build_model(settings: ProxySettings):
    """(CLIPModel, CLIPBackbone at the square pre-training size over the same parameters). Unlike
    fine-tuning, the patch-embedding convolution trains."""
    from trpr.modeling.backbone import CLIPBackbone
    from transformers import CLIPModel

    torch.manual_seed(settings.seed)
    clip = CLIPModel(settings.clip_config())
    size = settings.corpus.image_size
    backbone = CLIPBackbone(clip, (size, size))
    backbone.vision_model.embeddings.patch_embedding.weight.requires_grad_(True)
    return clip, backbone


def build_optimizer(clip, settings: ProxySettings) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.98, eps 1e-6 as CLIP); no weight decay on biases, norms, the logit scale."""
    decay, no_decay = [], []
    for name, parameter in clip.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(step: int, total: int, settings: ProxySettings) -> float:
    """Linear warm-up over warmup_fraction of the steps, then cosine to 0."""
    warmup = max(1, int(round(settings.warmup_fraction * total)))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    return settings.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save_state(path: Path, state: dict) -> None:
    """Write the work state atomically in trpr's state-file format (safetensors + JSON, never a pickle)."""
    from trpr.engine.state_files import save_state as write_state

    with atomic_path(path) as tmp:
        write_state(state, tmp)


def train(settings: ProxySettings, corpus, work_dir: Path, progress: bool = True) -> tuple:
    """Pre-trains (resuming from work_dir/state.safetensors when present). Returns (CLIPModel, CLIPBackbone, history)
    with history = {"loss": per-step losses, "logit_scale": per-step, "cpu_s", "wall_s", "epochs"}."""
    clip, backbone = build_model(settings)
    optimizer = build_optimizer(clip, settings)
    batches = CorpusBatches(corpus, corpus.indices("train"), settings.batch_size, settings.seed)
    total = settings.epochs * len(batches)
    history = {"loss": [], "logit_scale": [], "cpu_s": 0.0, "wall_s": 0.0, "epochs": 0}
    work_dir.mkdir(parents=True, exist_ok=True)
    state_path = work_dir / "state.safetensors"
    if state_path.is_file():
        from trpr.engine.state_files import load_state

        state = load_state(state_path)  # nothing is unpickled
        clip.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = state["history"]
        print(f"pretrain_proxy: resuming after epoch {history['epochs'] - 1} from {state_path}")
    clip.train()
    bar = tqdm(total=total, initial=history["epochs"] * len(batches), desc="proxy pre-training", unit="step",
               disable=None if progress else True)
    for epoch in range(history["epochs"], settings.epochs):
        cpu0, wall0 = time.process_time(), time.time()
        for step, (pixels, ids, mask) in enumerate(batches.epoch(epoch)):
            global_step = epoch * len(batches) + step
            for group in optimizer.param_groups:
                group["lr"] = lr_at(global_step, total, settings)
            image = backbone.encode_image(pixels).tokens[:, 0]
            text = backbone.encode_text(ids, mask).global_embedding
            loss = clip_loss(image, text, clip.logit_scale)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"pretrain_proxy: non-finite loss at epoch {epoch}, step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            history["loss"].append(loss.item())
            history["logit_scale"].append(clip.logit_scale.exp().item())
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", scale=f"{history['logit_scale'][-1]:.1f}")
        history["cpu_s"] += time.process_time() - cpu0
        history["wall_s"] += time.time() - wall0
        history["epochs"] = epoch + 1
        save_state(state_path, {"model": clip.state_dict(), "optimizer": optimizer.state_dict(), "history": history})
    bar.close()
    clip.eval()
    return clip, backbone, history


# ========================================================================================== zero-shot
@torch.no_grad()
def zero_shot_heldout(backbone, corpus, batch_size: int = 256) -> dict:
    """Text → image retrieval over the corpus's held-out identities (square pictures, first caption of each
    picture as a query; a match is any picture of the same identity). kernels.retrieval_metrics dict."""
    from trpr import kernels

    batches = CorpusBatches(corpus, corpus.indices("heldout"), batch_size, seed=0)
    images, texts = [], []
    for start in range(0, len(batches.indices), batch_size):
        rows = batches.indices[start:start + batch_size]
        pixels = torch.from_numpy(np.ascontiguousarray(corpus.images[rows])).permute(0, 3, 1, 2)
        images.append(backbone.encode_image(pixels.float().mul_(batches.scale).add_(batches.bias)).tokens[:, 0])
        ids = batches.input_ids[start:start + batch_size, 0]
        mask = batches.attention_mask[start:start + batch_size, 0]
        length = int(mask.sum(1).max())
        texts.append(backbone.encode_text(ids[:, :length], mask[:, :length]).global_embedding)
    pids = torch.from_numpy(corpus.identity[batches.indices])
    return summary(kernels.retrieval_metrics(F.normalize(torch.cat(texts), dim=-1),
                                             F.normalize(torch.cat(images), dim=-1), pids, pids))


@torch.no_grad()
def zero_shot_benchmark(folder: Path, image_size: tuple[int, int], dataset: str = "synth-pedes",
                        split: str = "test", root=None) -> dict:
    """Text → image retrieval on a benchmark split with the saved proxy loaded the way fine-tuning loads it
    (TRPRModel.from_clip(folder) at `image_size`, position embeddings resized), global embeddings."""
    from trpr import data
    from trpr import kernels
    from trpr.runtime.encoding import encode
    from trpr.modeling import TRPRModel

    model = TRPRModel.from_clip(str(folder), select_ratio=0.0, image_size=image_size).eval()
    splits = data.load_benchmark(dataset, root=root)
    gallery, queries = splits[f"{split}_gallery"], splits[f"{split}_queries"]
    (images,), = encode([model], data.EvalImages(gallery, image_size), "image", pieces=("global",), batch_size=128)
    (texts,), = encode([model], data.EvalTexts(queries, get_tokenizer()), "text", pieces=("global",), batch_size=128)
    return summary(kernels.retrieval_metrics(F.normalize(texts, dim=-1), F.normalize(images, dim=-1),
                                             torch.as_tensor(queries["pid"]), torch.as_tensor(gallery["pid"])))


def summary(metrics: dict) -> dict:
    return {name: round(float(metrics[name]), 2) for name in ("R1", "R5", "R10", "mAP")}


# ============================================================================================= outputs
def write_proxy(clip, history: dict, settings: ProxySettings, corpus_dir: Path, folder: Path,
                benchmark_size: tuple[int, int], steps_per_epoch: int, zero_shot_heldout_metrics: dict,
                benchmark: str | None = "synth-pedes", root=None) -> dict:
    """Writes the proxy folder atomically (tmp name, renamed when complete) and returns its info."""
    tmp = temporary_folder(folder, INFO_NAME, "proxy CLIP")
    try:
        clip.save_pretrained(tmp)
        get_tokenizer().save_pretrained(tmp)
        plot_loss_curve(history, steps_per_epoch, tmp / "loss_curve.png")
        zero_shot = {"heldout_corpus": zero_shot_heldout_metrics}
        if benchmark:
            zero_shot[f"{benchmark}_test_{benchmark_size[0]}x{benchmark_size[1]}"] = zero_shot_benchmark(
                tmp, benchmark_size, benchmark, root=root)
        info = {"proxy_version": PROXY_VERSION, "settings": asdict(settings), "corpus_folder": str(corpus_dir),
                "steps": len(history["loss"]), "steps_per_epoch": steps_per_epoch,
                "cpu_time_s": round(history["cpu_s"], 1), "wall_time_s": round(history["wall_s"], 1), "torch_threads": torch.get_num_threads(),
                "final_epoch_loss": float(np.mean(history["loss"][-steps_per_epoch:])),
                "final_logit_scale": history["logit_scale"][-1], "zero_shot": zero_shot}
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def build_proxy(settings: ProxySettings, root=None, benchmark_size: tuple[int, int] = (64, 32),
                benchmark: str | None = "synth-pedes", force: bool = False, progress: bool = True) -> Path:
    """The cached proxy folder of `settings`: reused when complete, else the corpus is built (cached too),
    the model pre-trained (resumable) and saved. Prints the zero-shot numbers."""
    folder = proxy_folder(settings, root)
    if is_complete(folder) and not force:
        print(f"pretrain_proxy: reusing {folder}")
        return folder
    corpus_dir = ensure_corpus(settings.corpus, root, progress=progress)
    corpus = load_corpus(corpus_dir)
    work_dir = folder.parent / f".{folder.name}.work"
    if force:
        shutil.rmtree(work_dir, ignore_errors=True)
    clip, backbone, history = train(settings, corpus, work_dir, progress)
    steps_per_epoch = len(history["loss"]) // max(1, history["epochs"])
    info = write_proxy(clip, history, settings, corpus_dir, folder, benchmark_size, steps_per_epoch,
                       zero_shot_heldout(backbone, corpus), benchmark, root)
    shutil.rmtree(work_dir, ignore_errors=True)
    print(f"pretrain_proxy: {info['steps']} steps, CPU time {info['cpu_time_s'] / 60:.1f} min, wall time "
          f"{info['wall_time_s'] / 60:.1f} min ({info['torch_threads']} threads), last-epoch loss "
          f"{info['final_epoch_loss']:.3f}, logit scale {info['final_logit_scale']:.1f}")
    for name, metrics in info["zero_shot"].items():
        print(f"zero-shot text->image, {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    print(f"pretrain_proxy: saved {folder}")
    return folder


# ========================================================================================= command line
def parse_args(argv=None) -> tuple[argparse.Namespace, ProxySettings]:
    defaults, corpus_defaults = ProxySettings(), CorpusSpec()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for item in fields(ProxySettings):
        if item.name != "corpus":
            parser.add_argument(f"--{item.name.replace('_', '-')}", type=type(getattr(defaults, item.name)),
                                default=getattr(defaults, item.name))
    for item in fields(CorpusSpec):
        parser.add_argument(f"--corpus-{item.name.replace('_', '-')}", type=type(getattr(corpus_defaults, item.name)),
                            default=getattr(corpus_defaults, item.name))
    parser.add_argument("--root", default=None, help="cache root (default $TRPR_CACHE or ~/.cache/3rtpr)")
    parser.add_argument("--benchmark-image-size", type=int, nargs=2, default=[64, 32], metavar=("H", "W"),
                        help="size of the zero-shot check on synth-pedes (the fine-tuning size)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--print-path", action="store_true",
                        help="print the proxy folder of these settings, build nothing")
    parser.add_argument("--force", action="store_true", help="pre-train again even when the folder is complete")
    args = parser.parse_args(argv)
    corpus = CorpusSpec(**{item.name: getattr(args, f"corpus_{item.name}") for item in fields(CorpusSpec)})
    settings = ProxySettings(**{item.name: getattr(args, item.name) for item in fields(ProxySettings)
                                if item.name != "corpus"}, corpus=corpus)
    return args, settings


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    if args.print_path:
        print(proxy_folder(settings, args.root))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    build_proxy(settings, args.root, tuple(args.benchmark_image_size), force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
