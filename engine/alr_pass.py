"""The ALR pass (docs/method.md §4): score every training sample with both models, fit the mixture,
and turn the result into the per-sample weights and keep flags of the next epoch; its report and plot.

`score_samples` (encode -> per-sample loss and fused diagonal similarity) is the one implementation
of ALR's scoring, also used by `scripts/ablate.py`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

import data
from modeling.alr import MixtureSettings, compute_alr, noise_detection_scores
from modeling.run_folder import alr_weights_file

from .distributed import broadcast_from_main
from .step import encode_view


class SampleScores(NamedTuple):
    """ALR's statistics of one batch under one model: losses [b] (the unweighted per-sample loss of the
    ALR term against the global batch), diag_sims [b] (cosine of each sample's fused text and image
    features), text / image [b, D] the fused features (fp32)."""

    losses: torch.Tensor
    diag_sims: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor


def score_samples(model, batch: dict, loss_term, device, view: int = 0, autocast=None) -> SampleScores:
    """Encode view `view` of a TrainViews batch with `model` and score it with `loss_term` (a
    modeling.losses.PairLoss, e.g. TrainingLoss.alr_term, whose world size decides the columns)."""
    text, image = encode_view(model, batch, view, device, autocast)
    losses = loss_term.per_sample(text, image, batch["pid"].to(device))
    return SampleScores(losses, F.cosine_similarity(text, image, dim=-1), text, image)


def alr_active(config: dict, epoch: int) -> bool:
    """Whether epoch `epoch` trains with ALR weights (alr.enabled and epoch >= alr.start_epoch)."""
    return bool(config["alr"]["enabled"]) and epoch >= config["alr"]["start_epoch"]


@torch.no_grad()
def alr_pass(models, train_split, tokenizer, loss_term, config, accelerator, epoch: int) -> dict:
    """ALR over the whole training set. Returns {"result": AlrResult (main process only, else None),
    "weights": [N], "keep": [N] bool (every process), "diag_sims": [N] (main)}.

    models: the unwrapped (A, B); the first `alr.models` of them score. loss_term: the ALR term
    (TrainingLoss.alr_term). The samples are taken in index order in global batches of
    train.batch_size (the last one padded by wrapping around; padded rows are discarded), each process
    encodes its share, and each sample's loss is computed within its global batch, as in one process."""
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
    alr_cfg = config["alr"]
    chosen = models[: alr_cfg["models"]]
    for model in models:
        model.eval()
    losses = [[] for _ in chosen]
    sims, indices = [], []
    progress = tqdm(loader, desc=f"ALR pass, epoch {epoch}", disable=not accelerator.is_main_process, leave=False)
    with accelerator.autocast():
        for batch in progress:
            batch_sims = []
            for model, model_losses in zip(chosen, losses):
                scores = score_samples(model, batch, loss_term, accelerator.device)
                model_losses.append(scores.losses)
                batch_sims.append(scores.diag_sims)
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
                             mu=alr_cfg["mu"], sharpness=alr_cfg["sharpness"], drop_noisy=alr_cfg["drop_noisy"],
                             mixture=MixtureSettings.from_config(alr_cfg))
        weights = result.weights.to(accelerator.device)
        keep = result.keep.float().to(accelerator.device)
    broadcast_from_main(weights, keep)  # the mixture is fitted once, on the main process
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


def report_alr(alr: dict, noisy: torch.Tensor, epoch: int, run_dir: Path, accelerator, *, global_step: int,
               trackers: list) -> dict | None:
    """Main process: the epoch's ALR report (returned for metrics.jsonl), its histogram PNG in the run
    folder (and TensorBoard), its scalars to the trackers and a log line. Other processes: None."""
    if not accelerator.is_main_process:
        return None
    report = alr_report(alr["result"], alr["diag_sims"], noisy)
    image = plot_alr_weights(alr["result"], noisy, epoch, run_dir / alr_weights_file(epoch))
    if "tensorboard" in trackers:
        accelerator.get_tracker("tensorboard").log_images({"alr/weights": image[None]}, step=global_step,
                                                          dataformats="NHWC")
    scalars = {f"alr/{k}": v for k, v in report.items() if isinstance(v, float)}
    scalars.update({f"alr/noise_{k}": v for k, v in report.get("noise_detection", {}).items()})
    accelerator.log(scalars, step=global_step)
    detection = report.get("noise_detection")
    accelerator.print(f"epoch {epoch} ALR: mu {report['mu']:.3f}, kept {report['kept_fraction']:.1%}, "
                      f"mean weight {report['mean_weight']:.3f}"
                      + (f", noisy-pair detection P {detection['precision']:.1f} R {detection['recall']:.1f} "
                         f"F1 {detection['f1']:.1f}" if detection else ""))
    return report
