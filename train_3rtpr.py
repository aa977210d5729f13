"""Train 3RTPR: a reciprocal pair of CLIP models with fused representations and adaptive loss refinement.

    accelerate launch [--config_file accelerate_configs/X.yaml] train_3rtpr.py \
        --config configs/<recipe>.yaml [--section.key VALUE ...] --output-dir RUN_DIR [--resume RUN_DIR] [--final-test]
    python train_3rtpr.py ...   (one process)

Every epoch (METHOD.md §3-§7):
  1. from `alr.start_epoch` on, ALR: a no-grad pass of both models over the training set (sharded across
     processes, in global batches), a Gaussian mixture per model on the per-sample losses, a two-model
     consensus and per-sample weights w (and keep flags h), identical on every process;
  2. training: model A on augmented view 0, model B on view 1 of every sample; features of the whole global
     batch are all-gathered (with gradient) so the per-sample SDM / TRL losses span the global batch;
     L = lambda_sdm * sum(h w l_sdm) / sum(h) + lambda_trl * sum(h w l_trl) / sum(h); each model steps its
     own Adam on its own loss;
  3. validation on `eval.split` every `eval.every` epochs (best/ keeps the best `eval.select_row` R@1);
  4. last/ (models + optimizers, schedulers, RNG, ALR state) written atomically; a line in metrics.jsonl.
Epochs are counted from 0. The run folder layout is described in docs/design.md ("Run folder").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch.utils.data import DataLoader, Sampler, Subset
from tqdm.auto import tqdm

import configs
import data
import kernels
import modeling
from data.transforms import get_tokenizer
from modeling.alr import compute_alr, noise_detection_scores
from modeling.fused import MaskedBatchNorm1d

# all_gather / all_reduce WITH autograd have no public replacement yet; silence their deprecation notice
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated",
                        category=FutureWarning)

RUN_CONFIG = "config.yaml"
METRICS_FILE = "metrics.jsonl"
BEST_DIR, LAST_DIR, STATE_DIR = "best", "last", "training_state"
TRAINER_STATE = "trainer_state.json"


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops before the optimizer step, no checkpoint of that epoch is written."""


# ================================================================================= command line / config
def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """(known arguments, the remaining --section.key VALUE overrides)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any config key can be overridden: --train.epochs 2 --alr.sharpness 3 ...")
    parser.add_argument("--config", help="recipe YAML (configs/*.yaml); with --resume: the run's config.yaml")
    parser.add_argument("--output-dir", help="run folder (created); default with --resume: the resumed folder")
    parser.add_argument("--resume", help="run folder to continue from its last finished epoch")
    parser.add_argument("--final-test", action="store_true",
                        help="after training, evaluate best/ (else last/) on the test split")
    return parser.parse_known_args(argv)


def resolve_run(args, overrides) -> tuple[dict, Path]:
    """The resolved config and the run folder; raises ConfigError / SystemExit with a clear message."""
    if args.resume:
        resume_dir = Path(args.resume)
        if args.config:
            raise configs.ConfigError("give either --config or --resume (a resumed run uses its own config.yaml)")
        if not (resume_dir / RUN_CONFIG).is_file():
            raise configs.ConfigError(f"--resume {resume_dir}: no {RUN_CONFIG} (not a run folder)")
        config = configs.load_config(resume_dir / RUN_CONFIG, overrides)
        run_dir = Path(args.output_dir) if args.output_dir else resume_dir
    else:
        if not args.config or not args.output_dir:
            raise configs.ConfigError("--config and --output-dir are required (or --resume RUN_DIR)")
        config = configs.load_config(args.config, overrides)
        run_dir = Path(args.output_dir)
        if (run_dir / LAST_DIR).exists() or (run_dir / BEST_DIR).exists():
            raise configs.ConfigError(f"--output-dir {run_dir} already holds a run (last/ or best/); "
                                      f"continue it with --resume {run_dir} or choose another folder")
    return config, run_dir


def build_clip_source(backbone):
    """config model.backbone -> what TRPRModel.from_clip takes: a name/path, or a random-init small config."""
    if isinstance(backbone, dict):
        return modeling.small_clip_config(**backbone)
    return backbone


# ================================================================================================= data
class GlobalBatchSampler(Sampler):
    """Shuffled global batches of `global_batch` samples (incomplete last batch dropped); this process
    yields its contiguous share [rank*b, (rank+1)*b) of each, b = global_batch / world_size.
    The order is a pure function of (seed, epoch): one process or several see the same global batches."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int):
        if global_batch % world_size:
            raise ValueError(f"train.batch_size {global_batch} is not divisible by the {world_size} processes")
        if num_samples < global_batch:
            raise ValueError(f"train.batch_size {global_batch} exceeds the training set ({num_samples} samples)")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.local_batch = rank, global_batch // world_size
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.global_batch

    def __iter__(self):
        seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed))
        start = self.rank * self.local_batch
        for step in range(len(self)):
            first = step * self.global_batch + start
            yield order[first:first + self.local_batch].tolist()


# ========================================================================================= optimisation
def param_groups(model: modeling.TRPRModel, optim: dict) -> list[dict]:
    """METHOD.md §7: backbone (clip.*) weights lr/wd, backbone biases 2x lr without decay, heads head_lr
    without decay. Frozen parameters (the patch embedding) are left out."""
    groups = {"backbone": [], "backbone_bias": [], "heads": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if not name.startswith("clip."):
            groups["heads"].append(parameter)
        elif name.endswith("bias"):
            groups["backbone_bias"].append(parameter)
        else:
            groups["backbone"].append(parameter)
    settings = {"backbone": (optim["backbone_lr"], optim["weight_decay"]),
                "backbone_bias": (optim["backbone_lr"] * optim["bias_lr_factor"], 0.0),
                "heads": (optim["head_lr"], 0.0)}
    return [{"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
            for name, params in groups.items() if params]


def lr_factor(epoch: int, epochs: int, warmup_epochs: int, warmup_factor: float) -> float:
    """Per-epoch multiplier: linear from warmup_factor to 1 over the warm-up epochs, then cosine to 0."""
    if epoch < warmup_epochs:
        alpha = epoch / warmup_epochs
        return warmup_factor * (1 - alpha) + alpha
    span = max(epochs - warmup_epochs, 1)
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def build_optimizer(model, config):
    """Adam + per-epoch LambdaLR for one model."""
    optim = config["optim"]
    optimizer = torch.optim.Adam(param_groups(model, optim), betas=tuple(optim["betas"]), eps=optim["eps"])
    schedule = lambda epoch: lr_factor(epoch, config["train"]["epochs"], optim["warmup_epochs"],  # noqa: E731
                                       optim["warmup_factor"])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ======================================================================================== distribution
class ProcessSyncedBatchNorm(MaskedBatchNorm1d):
    """MaskedBatchNorm1d whose training statistics span every process (mean and variance are
    all-reduced with gradient), so that DDP sees the same batch statistics as one process on the global
    batch. Eval mode and single-process runs are unchanged."""

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(tokens, valid)
        values = tokens.float()
        if valid is None:
            valid = torch.ones(values.shape[:2], dtype=torch.bool, device=values.device)
        weight = valid.to(values.dtype).unsqueeze(-1)  # [B, K, 1]
        sums = dist_nn.all_reduce(torch.cat([(values * weight).sum(dim=(0, 1)), weight.sum().reshape(1)]))
        total = sums[-1]
        mean = sums[:-1] / total.clamp(min=1.0)
        variance = dist_nn.all_reduce((((values - mean) ** 2) * weight).sum(dim=(0, 1))) / total.clamp(min=1.0)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach(), total.detach())
        normed = (values - mean) * torch.rsqrt(variance + self.eps)
        if self.affine:
            normed = normed * self.weight + self.bias
        return normed.to(tokens.dtype)


def sync_batch_norms(model: torch.nn.Module) -> None:
    """Switch every MaskedBatchNorm1d of `model` to ProcessSyncedBatchNorm (same parameters/buffers)."""
    for module in model.modules():
        if type(module) is MaskedBatchNorm1d:
            module.__class__ = ProcessSyncedBatchNorm


def gather_rows(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """[b, ...] on each process -> [world_size * b, ...] in rank order; differentiable for float tensors
    (the gradient of every process's loss flows back to the process that computed the rows)."""
    if world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    if tensor.is_floating_point() and tensor.requires_grad:
        return torch.cat(dist_nn.all_gather(tensor), dim=0)
    pieces = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(pieces, tensor)
    return torch.cat(pieces, dim=0)


def trim_text_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut [B, 77] captions to the longest caption of the batch [B, L]. Exact: CLIP's text attention is
    causal and the padding follows EOT, so no kept position ever attended to a removed one."""
    length = int(attention_mask.sum(dim=1).max())
    return input_ids[:, :length], attention_mask[:, :length]


def per_sample_losses(text_feats, image_feats, pids, weights, loss_cfg: dict, world_size: int, rank: int):
    """{"sdm": [b], "trl": [b]} (only the terms with lambda > 0) of this process's rows against the global
    batch; features [b, D] are gathered here (with gradient). weights [b] or None."""
    distributed = {}
    if world_size > 1:
        distributed = dict(text_cols=gather_rows(text_feats, world_size),
                           image_cols=gather_rows(image_feats, world_size),
                           col_pids=gather_rows(pids, world_size))
    losses = {}
    if loss_cfg["lambda_sdm"] > 0:
        losses["sdm"] = kernels.sdm_loss(text_feats, image_feats, pids, loss_cfg["logit_scale"], weights,
                                         **distributed)
    if loss_cfg["lambda_trl"] > 0:
        losses["trl"] = kernels.trl_loss(text_feats, image_feats, pids, loss_cfg["tau"], loss_cfg["margin"],
                                         weights, **distributed)
    return losses


def reciprocal_step(wrapped_models, optimizers, batch: dict, alr_state: dict, loss_cfg: dict, accelerator,
                    where: str = "") -> list[float]:
    """One training step of both models on one batch; returns [loss A, loss B] of the global batch.

    batch: this process's share of a global batch from TrainViews(num_views=2) (model A takes view 0,
    model B view 1). alr_state: {"weights": [N], "keep": [N] bool} indexed by the dataset index.
    Each model: forward, per-sample losses against the all-gathered global batch,
    L = sum_i lambda * h_i w_i l_i / sum_i h_i (sums over the global batch), backward, its own optimizer step.
    Raises TrainingDiverged on a non-finite loss (before that model's optimizer step)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    index = batch["index"].to(accelerator.device)
    pids = batch["pid"].to(accelerator.device)
    keep = alr_state["keep"][index].float()
    weights = alr_state["weights"][index] * keep
    kept_in_batch = gather_rows(keep, world).sum().clamp(min=1.0)
    losses = []
    for view, (model, optimizer) in enumerate(zip(wrapped_models, optimizers)):
        input_ids, attention_mask = trim_text_padding(batch["input_ids"][:, view], batch["attention_mask"][:, view])
        with accelerator.autocast():
            out = model(pixel_values=batch["pixel_values"][:, view].to(accelerator.device),
                        input_ids=input_ids.to(accelerator.device), attention_mask=attention_mask.to(accelerator.device))
        terms = per_sample_losses(out["text_fused"], out["image_fused"], pids, weights, loss_cfg, world, rank)
        local = sum(loss_cfg[f"lambda_{name}"] * values.sum() for name, values in terms.items()) / kept_in_batch
        # DDP averages the gradients over the processes: scale so that they are those of the global loss
        accelerator.backward(local * world)
        global_loss = accelerator.reduce(local.detach(), reduction="sum").item()
        if not math.isfinite(global_loss):
            raise TrainingDiverged(f"non-finite loss ({global_loss}) of model {'AB'[view]} at {where}; "
                                   f"stopping without saving this epoch")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(global_loss)
    return losses


# ============================================================================================== ALR pass
@torch.no_grad()
def alr_pass(models, train_split, tokenizer, config, accelerator, epoch: int) -> dict:
    """METHOD.md §4 step 1-6 over the whole training set. Returns {"result": AlrResult (main process only,
    else None), "weights": [N], "keep": [N] bool (every process), "diag_sims": [N] (main)}.

    The samples are taken in index order in global batches of train.batch_size (the last one padded by
    wrapping around; padded rows are discarded), each process encodes its share, the features are
    gathered so that each sample's loss is computed within its global batch, as in one process."""
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = config["train"]["batch_size"]
    local_batch = global_batch // world
    dataset = data.TrainViews(train_split, tokenizer, config["data"]["image_size"], num_views=1, augment=False)
    total = len(dataset)
    padded = math.ceil(total / global_batch) * global_batch
    mine = [(g * global_batch + rank * local_batch + i) for g in range(padded // global_batch)
            for i in range(local_batch)]
    loader = DataLoader(Subset(dataset, [p % total for p in mine]), batch_size=local_batch, shuffle=False,
                        num_workers=config["data"]["num_workers"])
    alr_cfg, loss_cfg = config["alr"], config["loss"]
    loss_name = "sdm" if loss_cfg["lambda_sdm"] > 0 else "trl"
    chosen = models[: alr_cfg["models"]]
    for model in models:
        model.eval()
    losses = [[] for _ in chosen]
    sims, indices = [], []
    progress = tqdm(loader, desc=f"ALR pass, epoch {epoch}", disable=not accelerator.is_main_process, leave=False)
    with accelerator.autocast():
        for batch in progress:
            pids = batch["pid"].to(accelerator.device)
            input_ids, attention_mask = trim_text_padding(batch["input_ids"][:, 0], batch["attention_mask"][:, 0])
            batch_sims = []
            for model, model_losses in zip(chosen, losses):
                out = model(pixel_values=batch["pixel_values"][:, 0].to(accelerator.device),
                            input_ids=input_ids.to(accelerator.device), attention_mask=attention_mask.to(accelerator.device))
                text, image = out["text_fused"].float(), out["image_fused"].float()
                model_losses.append(per_sample_losses(text, image, pids, None, loss_cfg, world, rank)[loss_name])
                batch_sims.append(torch.nn.functional.cosine_similarity(text, image, dim=-1))
            sims.append(torch.stack(batch_sims).mean(0))
            indices.append(batch["index"].to(accelerator.device))
    for model in models:
        model.train()
    position = torch.tensor(mine, device=accelerator.device)
    real = accelerator.gather((position < total).long()).cpu().bool()  # (int: NCCL-safe)
    index = accelerator.gather(torch.cat(indices)).cpu()[real]
    gathered_sims = accelerator.gather(torch.cat(sims)).cpu()[real]
    gathered_losses = [accelerator.gather(torch.cat(values)).cpu()[real] for values in losses]

    weights = torch.ones(total, device=accelerator.device)
    keep = torch.ones(total, device=accelerator.device)
    result, diag_sims = None, None
    if accelerator.is_main_process:
        order = torch.argsort(index)
        if not torch.equal(index[order], torch.arange(total)):
            raise RuntimeError(f"ALR pass: dataset indices are not 0..{total - 1} (train split 'index' column)")
        diag_sims = gathered_sims[order]
        sample_losses = [values[order] for values in gathered_losses]
        result = compute_alr(sample_losses[0], sample_losses[1] if len(sample_losses) > 1 else None, diag_sims,
                             mu=alr_cfg["mu"], sharpness=alr_cfg["sharpness"], drop_noisy=alr_cfg["drop_noisy"])
        weights = result.weights.to(accelerator.device)
        keep = result.keep.float().to(accelerator.device)
    if world > 1:  # the mixture is fitted once, on the main process; everyone gets its weights
        dist.broadcast(weights, src=0)
        dist.broadcast(keep, src=0)
    return {"result": result, "weights": weights, "keep": keep.bool(), "diag_sims": diag_sims}


def alr_report(result, diag_sims, noisy: torch.Tensor) -> dict:
    """JSON-able ALR figures of one epoch; with any truly noisy sample also P/R/F1 of the split
    'noisy = no model calls it clean' (the samples drop_noisy drops) against the `noisy` column."""
    report = {"mu": result.mu, "mean_diag_similarity": float(diag_sims.mean()),
              "kept_fraction": float(result.keep.float().mean()),
              "mean_weight": float(result.weights.mean()),
              "full_weight_fraction": float((result.weights >= 1).float().mean()),
              "consensus_counts": [int((result.consensus == c).sum()) for c in range(3)]}
    if noisy.any():
        report["noise_detection"] = noise_detection_scores(result.consensus == 0, noisy)
        report["mean_weight_noisy"] = float(result.weights[noisy].mean())
        report["mean_weight_clean"] = float(result.weights[~noisy].mean()) if (~noisy).any() else None
    return report


def plot_alr_weights(result, noisy: torch.Tensor, epoch: int, path: Path) -> np.ndarray:
    """Histogram of the ALR weights (split by the true noisy flag when known) -> PNG at `path`;
    returns the RGB image [H, W, 3] uint8 for the trackers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.linspace(0, 1, 41)
    weights = result.weights.numpy()
    if noisy.any():
        axis.hist(weights[~noisy.numpy()], bins=bins, alpha=0.7, label="clean pairs")
        axis.hist(weights[noisy.numpy()], bins=bins, alpha=0.7, label="noisy pairs")
        axis.legend()
    else:
        axis.hist(weights, bins=bins)
    axis.set_yscale("log")
    axis.set_ylim(bottom=0.8)  # single samples stay visible
    axis.set_xlabel("ALR weight w")
    axis.set_ylabel("training samples")
    axis.set_title(f"ALR weights, epoch {epoch} (mu = {result.mu:.3f}, kept {result.keep.float().mean():.1%})")
    figure.tight_layout()
    figure.savefig(path)
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


# ========================================================================================= checkpoints
def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` (and itself) to disk."""
    for path in sorted(folder.rglob("*")) + [folder]:
        _fsync_path(path)


def write_folder_atomically(final: Path, write, accelerator) -> None:
    """Run write(tmp_folder) on every process into `.<name>.tmp`, fsync it, then swap it in for `final`
    (old copy renamed to `.<name>.old` first, removed last). A crash at any point leaves either the old or
    the new complete folder under `final` or `.<name>.old`, never a half-written `final`."""
    tmp = final.parent / f".{final.name}.tmp"
    old = final.parent / f".{final.name}.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        _fsync_path(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def recover_checkpoint(folder: Path) -> Path | None:
    """`folder` if complete; after a crash between the two renames of write_folder_atomically, the
    previous copy `.<name>.old` is moved back. Half-written `.<name>.tmp` folders are never used."""
    old = folder.parent / f".{folder.name}.old"
    if not folder.exists() and old.exists():
        old.rename(folder)
    return folder if folder.exists() else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(run_dir: Path, pair, optimizers, schedulers, alr_state: dict, trainer_state: dict, accelerator) -> None:
    """last/ = the pair + training_state/ (optimizers, schedulers, loss scaler, per-process RNG, ALR, counters)."""
    def write(folder: Path) -> None:
        state_dir = folder / STATE_DIR
        if accelerator.is_main_process:
            pair.save_pretrained(folder)
            state_dir.mkdir()
            for name, optimizer, scheduler in zip("ab", optimizers, schedulers):
                torch.save(optimizer.state_dict(), state_dir / f"optimizer_{name}.pt")
                torch.save(scheduler.state_dict(), state_dir / f"scheduler_{name}.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), state_dir / "scaler.pt")
            torch.save({key: value.cpu() for key, value in alr_state.items()}, state_dir / "alr_state.pt")
            (state_dir / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        accelerator.wait_for_everyone()
        torch.save(rng_state(), state_dir / f"rng_{accelerator.process_index}.pt")

    write_folder_atomically(run_dir / LAST_DIR, write, accelerator)


def load_last(last_dir: Path, models, optimizers, schedulers, accelerator) -> tuple[dict, dict]:
    """Restore weights, optimizer/scheduler/scaler/RNG states from last/; returns (alr_state, trainer_state)."""
    state_dir = last_dir / STATE_DIR
    saved = modeling.ReciprocalPair.from_pretrained(last_dir)
    for model, saved_model in zip(models, saved.models):
        model.load_state_dict(saved_model.state_dict())
    for name, optimizer, scheduler in zip("ab", optimizers, schedulers):
        optimizer.load_state_dict(torch.load(state_dir / f"optimizer_{name}.pt", map_location="cpu"))
        scheduler.load_state_dict(torch.load(state_dir / f"scheduler_{name}.pt"))
    if accelerator.scaler is not None and (state_dir / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(state_dir / "scaler.pt"))
    rng_file = state_dir / f"rng_{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file}: missing; resume with the number of processes of the original run")
    set_rng_state(torch.load(rng_file, weights_only=False))
    alr_state = {k: v.to(accelerator.device) for k, v in torch.load(state_dir / "alr_state.pt").items()}
    return alr_state, json.loads((state_dir / TRAINER_STATE).read_text())


# ============================================================================================== logging
def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path, before_epoch: int | None = None) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if before_epoch is None or r["epoch"] < before_epoch]


def plot_curves(records: list[dict], select_row: str, path: Path) -> None:
    """curves.png: per-epoch mean training loss of A and B, and validation R@1 of `select_row`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    figure, (loss_axis, r1_axis) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    loss_axis.plot(epochs, [r["loss_a"] for r in records], marker="o", label="model A")
    loss_axis.plot(epochs, [r["loss_b"] for r in records], marker="o", label="model B")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss (epoch mean)")
    loss_axis.legend()
    validated = [r for r in records if r.get("val")]
    r1_axis.plot([r["epoch"] for r in validated], [r["val"][select_row]["R1"] for r in validated], marker="o")
    r1_axis.set_xlabel("epoch")
    r1_axis.set_ylabel(f"val R@1 {select_row} (%)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def flat_config(config: dict, prefix: str = "") -> dict:
    """Tracker-friendly {dotted key: int|float|str|bool}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and not (prefix + key == "model.backbone"):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


# ================================================================================================ main
def main(argv=None) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    args, overrides = parse_args(argv)
    config, run_dir = resolve_run(args, overrides)
    trackers = config["logging"]["trackers"]
    accelerator = Accelerator(log_with=trackers or None, project_dir=str(run_dir))
    world, rank = accelerator.num_processes, accelerator.process_index
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise SystemExit(f"{accelerator.distributed_type.name} is not supported: the ALR pass, validation and "
                         f"checkpoints use the unsharded models. A ViT-B/16 pair fits one GPU: use DDP "
                         f"(accelerate_configs/multi_gpu_ddp_bf16.yaml, also across nodes).")
    set_seed(config["seed"])
    log = accelerator.print

    # ---- data (fails early on a missing dataset, before any model is built)
    data_cfg = config["data"]
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        configs.save_config(config, run_dir / RUN_CONFIG)
    accelerator.wait_for_everyone()
    noise_out = run_dir / "noise_permutation.npy" if data_cfg["noise_rate"] > 0 and not data_cfg["noise_file"] else None
    with accelerator.main_process_first():  # synth-pedes is generated once, by the main process
        try:
            splits = data.load_benchmark(data_cfg["dataset"], root=data_cfg["root"], noise_rate=data_cfg["noise_rate"],
                                         noise_file=data_cfg["noise_file"], seed=config["seed"],
                                         noise_out=noise_out if accelerator.is_main_process else None)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise SystemExit(f"config data.dataset={data_cfg['dataset']!r} (data.root={data_cfg['root']!r}): {error}")
    train_split = splits["train"]
    eval_split = config["eval"]["split"]
    if eval_split is not None and f"{eval_split}_gallery" not in splits:
        raise SystemExit(f"config eval.split={eval_split!r}: dataset {data_cfg['dataset']} has no such split "
                         f"(splits: {', '.join(splits.keys())}); use --eval.split null to keep the last epoch")
    noisy = torch.tensor(train_split["noisy"], dtype=torch.bool)
    tokenizer = get_tokenizer()
    train_views = data.TrainViews(train_split, tokenizer, data_cfg["image_size"], num_views=2, augment=True,
                                  seed=config["seed"])
    sampler = GlobalBatchSampler(len(train_views), config["train"]["batch_size"], rank, world, config["seed"])
    loader = DataLoader(train_views, batch_sampler=sampler, num_workers=data_cfg["num_workers"])

    # ---- the reciprocal pair, optimizers, schedulers
    model_cfg = config["model"]
    pair = modeling.ReciprocalPair.from_clip(build_clip_source(model_cfg["backbone"]),
                                             head_seeds=tuple(model_cfg["head_seeds"]),
                                             select_ratio=model_cfg["select_ratio"], fused_dim=model_cfg["fused_dim"],
                                             image_size=tuple(data_cfg["image_size"]),
                                             image_tokens=model_cfg["image_tokens"])
    for model in pair.models:
        model.set_gradient_checkpointing(model_cfg["gradient_checkpointing"])
        if world > 1:
            sync_batch_norms(model)
    pair.to(accelerator.device)
    models = list(pair.models)  # the unwrapped modules (saving, ALR pass, validation)
    wrapped = list(accelerator.prepare(*models))  # DDP wrappers (training forward)
    optimizers, schedulers = [], []
    for model in models:
        optimizer, scheduler = build_optimizer(model, config)
        optimizers.append(accelerator.prepare(optimizer))
        schedulers.append(scheduler)

    # ---- resume
    epochs = config["train"]["epochs"]
    alr_state = {"weights": torch.ones(len(train_views), device=accelerator.device),
                 "keep": torch.ones(len(train_views), dtype=torch.bool, device=accelerator.device)}
    trainer_state = {"epoch": -1, "global_step": 0, "best_score": None, "best_epoch": None}
    if args.resume:
        if accelerator.is_main_process:
            recover_checkpoint(Path(args.resume) / LAST_DIR)
        accelerator.wait_for_everyone()
        last_dir = Path(args.resume) / LAST_DIR
        if not last_dir.is_dir():
            raise SystemExit(f"--resume {args.resume}: no finished epoch to resume from (no {LAST_DIR}/)")
        alr_state, trainer_state = load_last(last_dir, models, optimizers, schedulers, accelerator)
        log(f"resumed from {last_dir}: epoch {trainer_state['epoch']} finished, step {trainer_state['global_step']}")
    start_epoch = trainer_state["epoch"] + 1
    if accelerator.is_main_process and start_epoch > 0:  # drop records of epochs that will be redone
        kept = read_metrics(run_dir, before_epoch=start_epoch)
        (run_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in kept))
    elif accelerator.is_main_process and (run_dir / METRICS_FILE).exists():
        (run_dir / METRICS_FILE).unlink()
    if trackers:
        accelerator.init_trackers("3rtpr", config=flat_config(config))
    log(f"3RTPR: {len(train_views)} training samples, {len(sampler)} steps/epoch of {config['train']['batch_size']} "
        f"on {world} process(es), epochs {start_epoch}..{epochs - 1}, run folder {run_dir}")

    loss_cfg, alr_cfg = config["loss"], config["alr"]
    global_step = trainer_state["global_step"]
    for epoch in range(start_epoch, epochs):
        epoch_start = time.time()
        record = {"epoch": epoch}
        # ---- 1. adaptive loss refinement
        if alr_cfg["enabled"] and epoch >= alr_cfg["start_epoch"]:
            alr = alr_pass(models, train_split, tokenizer, config, accelerator, epoch)
            alr_state = {"weights": alr["weights"], "keep": alr["keep"]}
            if accelerator.is_main_process:
                record["alr"] = alr_report(alr["result"], alr["diag_sims"], noisy)
                image = plot_alr_weights(alr["result"], noisy, epoch, run_dir / f"alr_weights_epoch{epoch}.png")
                if "tensorboard" in trackers:
                    accelerator.get_tracker("tensorboard").log_images({"alr/weights": image[None]}, step=global_step,
                                                                      dataformats="NHWC")
                scalars = {f"alr/{k}": v for k, v in record["alr"].items() if isinstance(v, float)}
                scalars.update({f"alr/noise_{k}": v for k, v in record["alr"].get("noise_detection", {}).items()})
                accelerator.log(scalars, step=global_step)
                detection = record["alr"].get("noise_detection")
                log(f"epoch {epoch} ALR: mu {record['alr']['mu']:.3f}, kept {record['alr']['kept_fraction']:.1%}, "
                    f"mean weight {record['alr']['mean_weight']:.3f}"
                    + (f", noisy-pair detection P {detection['precision']:.1f} R {detection['recall']:.1f} "
                       f"F1 {detection['f1']:.1f}" if detection else ""))

        # ---- 2. one epoch of reciprocal training
        sampler.set_epoch(epoch)
        train_views.set_epoch(epoch)
        sums = torch.zeros(2, dtype=torch.float64)
        progress = tqdm(loader, desc=f"epoch {epoch}/{epochs - 1}", disable=not accelerator.is_main_process)
        for step, batch in enumerate(progress):
            step_losses = reciprocal_step(wrapped, optimizers, batch, alr_state, loss_cfg, accelerator,
                                          where=f"epoch {epoch}, step {step} (global step {global_step})")
            sums += torch.tensor(step_losses, dtype=torch.float64)
            global_step += 1
            progress.set_postfix(loss_a=f"{step_losses[0]:.4f}", loss_b=f"{step_losses[1]:.4f}")
            if global_step % config["train"]["log_every"] == 0:
                accelerator.log({"train/loss_a": step_losses[0], "train/loss_b": step_losses[1],
                                 "train/lr_backbone": optimizers[0].param_groups[0]["lr"],
                                 "train/lr_head": optimizers[0].param_groups[-1]["lr"]}, step=global_step)
        record.update(step=global_step, loss_a=float(sums[0]) / len(sampler), loss_b=float(sums[1]) / len(sampler),
                      lr_backbone=optimizers[0].param_groups[0]["lr"], lr_head=optimizers[0].param_groups[-1]["lr"])

        # ---- 3. validation and best/
        improved = False
        if eval_split is not None and ((epoch + 1) % config["eval"]["every"] == 0 or epoch == epochs - 1):
            import eval_3rtpr

            for model in models:
                model.eval()
            metrics = eval_3rtpr.evaluate_pair(pair, splits[f"{eval_split}_gallery"], splits[f"{eval_split}_queries"],
                                               tokenizer=tokenizer, image_size=tuple(data_cfg["image_size"]),
                                               batch_size=config["eval"]["batch_size"], accelerator=accelerator)
            for model in models:
                model.train()
            record["val"] = metrics
            score = metrics[config["eval"]["select_row"]]["R1"]
            improved = trainer_state["best_score"] is None or score > trainer_state["best_score"]
            if improved:
                trainer_state.update(best_score=score, best_epoch=epoch)
            accelerator.log({f"val/{row}/{name}": value for row, values in metrics.items()
                             for name, value in values.items()}, step=global_step)
            select_row = config["eval"]["select_row"]
            log(f"epoch {epoch} {eval_split} R@1: " + ", ".join(f"{row} {values['R1']:.2f}" for row, values
                                                                in metrics.items() if row.endswith("GE+FS"))
                + f"; selection row {select_row} {score:.2f}" + (" (best so far)" if improved else ""))
        for scheduler in schedulers:
            scheduler.step()

        # ---- 4. checkpoints and the epoch record (checkpoint first: a record always has its checkpoint)
        trainer_state.update(epoch=epoch, global_step=global_step)
        if improved:
            write_folder_atomically(run_dir / BEST_DIR, lambda folder: pair.save_pretrained(folder)
                                    if accelerator.is_main_process else None, accelerator)
        save_last(run_dir, pair, optimizers, schedulers, alr_state, trainer_state, accelerator)
        record.update(best_epoch=trainer_state["best_epoch"], epoch_time_s=time.time() - epoch_start)
        if accelerator.is_main_process:
            append_metrics(run_dir, record)
        log(f"epoch {epoch}: loss A {record['loss_a']:.4f}, loss B {record['loss_b']:.4f}, "
            f"{record['epoch_time_s']:.1f}s")

    if accelerator.is_main_process:
        plot_curves(read_metrics(run_dir), config["eval"]["select_row"], run_dir / "curves.png")
    if args.final_test:
        final_test(run_dir, splits, tokenizer, config, accelerator)
    accelerator.end_training()
    return run_dir


def final_test(run_dir: Path, splits, tokenizer, config, accelerator) -> None:
    """--final-test: evaluate best/ (else last/) on the test split once; writes test_metrics.json."""
    import eval_3rtpr

    if "test_gallery" not in splits:
        raise SystemExit(f"--final-test: dataset {config['data']['dataset']} has no test split")
    chosen = run_dir / BEST_DIR if (run_dir / BEST_DIR).is_dir() else run_dir / LAST_DIR
    pair = modeling.ReciprocalPair.from_pretrained(chosen).to(accelerator.device).eval()
    metrics = eval_3rtpr.evaluate_pair(pair, splits["test_gallery"], splits["test_queries"], tokenizer=tokenizer,
                                       image_size=tuple(config["data"]["image_size"]),
                                       batch_size=config["eval"]["batch_size"], accelerator=accelerator)
    if accelerator.is_main_process:
        (run_dir / "test_metrics.json").write_text(json.dumps({"checkpoint": chosen.name, **metrics}, indent=2) + "\n")
    accelerator.print(f"test ({chosen.name}/): " + ", ".join(f"{row} R@1 {v['R1']:.2f}" for row, v in metrics.items()))


if __name__ == "__main__":
    try:
        main()
    except (configs.ConfigError, TrainingDiverged) as error:
        sys.exit(f"error: {error}")
