"""The ALR pass (docs/method.md §4): score every training sample with both models, fit the mixture,
and turn the result into the per-sample weights and keep flags of the next epoch; its report (the
record of metrics.jsonl; the figure is drawn by `trpr.reporting.training`).

    alr_pass = AlrPass(train_split, tokenizer, config, accelerator)    # once per run: loaders persist
    alr = alr_pass(models, loss.alr_term, epoch)                        # every ALR epoch

One pass: (1) every process encodes its share of the UNIQUE training images (test transform) and of the
captions, once each, with the models in eval mode (alr.views "eval", the default; alr.views "reference":
each sample's two training-augmented views instead, model A scored on view b and model B on view a, see
`AlrPass.encode_views`); the fused features are stored L2-normalised in fp16 and gathered; (2) the main process forms the epoch's shuffled batches of train.batch_size
(`alr_batches`) from the stored features and computes each sample's loss within its batch with the
training loss's own `per_sample` (`batch_statistics`), and its fused diagonal similarity; (3) it fits
the mixtures (`modeling.alr.compute_alr`) and the weights are broadcast to every process.

`batch_statistics` is the one implementation of ALR's per-batch scoring.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader
from tqdm.auto import tqdm

from trpr import data
from trpr.configs import ALR_VIEWS
from trpr.data.arrow_splits import column_values
from trpr.data.transforms import normalize_uint8
from trpr.modeling.alr import MixtureSettings, compute_alr, noise_detection_scores
from trpr.runtime.encoding import PIECES, encode, eval_mode, model_device, piece_width, sharded_loader
from trpr.runtime.sharding import gather_shares, shard_indices

from .alr_state import AlrState
from .compilation import fast_math
from .distributed import broadcast_from_main
from .step import trim_text_padding

# Spawn key of the pass's batch order: np.random.SeedSequence([seed, epoch], spawn_key=(ALR_BATCH_STREAM,)),
# a stream of its own, distinct from the training order's SeedSequence([seed, epoch]) ("ALR" in ASCII).
ALR_BATCH_STREAM = 0x414C52
# Spawn key of the augmented views scored under alr.views "reference" (`AlrPass.encode_views`): each sample's
# two views are drawn from np.random.SeedSequence([seed, epoch, position], spawn_key=(ALR_VIEW_STREAM,)), a
# stream of its own, distinct from the training views' SeedSequence([seed, epoch, position]) ("ALRV" in ASCII).
ALR_VIEW_STREAM = 0x414C5256
# alr.views (configs.ALR_VIEWS): what the pass's forwards see. "eval": the test transform, no text augmentation
# (the project); "reference": the training augmentation, each model on the other model's view (the reference code).
# Under alr.views "reference": the view (0 = a, trained on by model A; 1 = b, by model B) each scoring model
# is shown: model A view b, model B view a.
SCORED_VIEW = (1, 0)
# Spawn key of the coin flips of alr.selection "reference" (c = 1 samples kept on a coin): its own stream of
# (seed, epoch) as well ("COIN" in ASCII).
ALR_COIN_STREAM = 0x434F494E
# Stored features: L2-normalised (every entry in [-1, 1], no overflow) in fp16 (11-bit mantissa: a cosine
# is off by < 1e-3, far below what moves a loss at tau 0.015 or scale 50 noticeably); bf16 (8 bits) is not.
FEATURE_DTYPE = torch.float16
# alr.score names the piece (runtime.encoding.PIECES) whose losses and diagonal similarities the pass scores:
# "fused" (the method, docs/method.md §4) or "global" (the global embedding, an ablation)
# Weight quantiles recorded per epoch (the figure's bands) and drawn in alr_weights.png.
WEIGHT_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def batch_statistics(loss_term, text: torch.Tensor, image: torch.Tensor, pids: torch.Tensor,
                     columns: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample losses [b] fp32, fused diagonal cosines [b]) of rows text / image [b, D] and pids [b]
    against `columns` ({"text_cols", "image_cols", "col_pids"}; None: the loss term gathers the global
    batch like in training). loss_term: a modeling.losses.PairLoss (TrainingLoss.alr_term): ALR scores
    with the training loss's own per_sample, never a copy of its formula."""
    losses = loss_term.per_sample(text, image, pids, columns=columns)
    return losses, F.cosine_similarity(text.float(), image.float(), dim=-1)


def diagonal_cosines(captions: torch.Tensor, images: torch.Tensor, image_of: torch.Tensor,
                     chunk: int = 65536) -> torch.Tensor:
    """Each sample's caption-image cosine [N] fp32: rows of captions [N, W] against images[image_of] ([U, W],
    both L2-normalised), `chunk` samples at a time."""
    return torch.cat([(captions[s:s + chunk].float() * images[image_of[s:s + chunk]].float()).sum(-1)
                      for s in range(0, len(captions), chunk)])


def separation_auc(score: torch.Tensor, noisy: torch.Tensor) -> float:
    """ROC AUC (0..1; 0.5 = no information) of `score` [N] (higher = more likely noisy) for the truth
    `noisy` [N] bool (both classes present): the Mann-Whitney statistic, ties counted one half."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(noisy.numpy().astype(bool), score.double().numpy()))


def coin_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s coin flips under alr.selection "reference" (`modeling.alr.reference_selection`)."""
    return int(np.random.SeedSequence([seed, epoch], spawn_key=(ALR_COIN_STREAM,)).generate_state(1)[0])


def alr_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[tuple[torch.Tensor, int]]:
    """The ALR pass's batches of one epoch, composed like training batches: a uniform permutation of the
    sample positions 0..N-1 drawn from (seed, epoch) on the pass's own stream (ALR_BATCH_STREAM; never the
    training order), cut into consecutive batches of `batch_size`.

    Returns [(members [B] int64, scored)]: the first `scored` members are scored in that batch, the others
    only serve as its columns. An incomplete last batch of r samples is filled up to B with the first
    B - r samples of the permutation (scored in the first batch), so every batch holds B samples and every
    sample is scored exactly once. With N < B there is one batch of all N samples."""
    state = np.random.SeedSequence([seed, epoch], spawn_key=(ALR_BATCH_STREAM,)).generate_state(1)[0]
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(state)))
    batches = []
    for start in range(0, num_samples, batch_size):
        members = order[start:start + batch_size]
        scored = len(members)
        fill = min(batch_size, num_samples) - scored
        batches.append((torch.cat([members, order[:fill]]) if fill > 0 else members, scored))
    return batches


@dataclass
class AlrRound:
    """One ALR round's outcome. state: the next epoch's weights and keep flags (every process, identical);
    result: the `modeling.alr.AlrResult` (main process, else None); diag_sims: [N] scored diagonal cosines
    averaged over the models (main); signals: {"loss", "fused_similarity", "global_similarity"} [N] of
    model A (main; the report's AUCs)."""

    state: AlrState
    result: object | None = None
    diag_sims: torch.Tensor | None = None
    signals: dict | None = None


class AlrPass:
    """ALR over the whole training set, built once per run (its image loader persists across epochs).

    train_split: the training split (`index` 0..N-1, `pid`, `image_id`, `image`, `caption`); tokenizer;
    config: the run config (seed, train.batch_size, data.image_size, data.num_workers, eval.batch_size
    for encoding, alr.*); accelerator: its process index / count, device and autocast.

    Cost per pass: each unique image and each caption is encoded once per scoring model (images with
    the test transform: an image's features do not depend on its caption), sharded over the processes.
    Memory: the features of the whole training set stay on `accelerator.device`, L2-normalised in fp16,
    (N captions + U images) x (D + E) x 2 bytes per model on every process (both pieces: the scored one and
    the other for the report's separation AUCs): for CUHK-PEDES (N = 68,126, U = 34,054, D = 2048, E = 512)
    499 MiB per model, 998 MiB for the pair, plus, with several processes, the largest share of one tensor
    (the gather's input) at the moment it is gathered.

    alr.views "reference" (`encode_views`): every sample's image and caption are augmented as in training,
    so each sample has its own image row: N images instead of U (CUHK-PEDES: 665 MiB per model), and
    every training image is decoded once per pass (by the persistent `view_loader`), not once per image_id.
    """

    def __init__(self, train_split, tokenizer, config: dict, accelerator):
        self.config, self.accelerator = config, accelerator
        index = np.asarray(column_values(train_split, "index"), dtype=np.int64)
        if not np.array_equal(index, np.arange(len(index))):
            raise ValueError(f"ALR pass: the train split's 'index' column is not 0..{len(index) - 1} in row order")
        self.num_samples = len(index)
        image_ids = np.asarray(column_values(train_split, "image_id"), dtype=np.int64)
        _, first_rows, image_of = np.unique(image_ids, return_index=True, return_inverse=True)
        device = accelerator.device
        self.image_of = torch.from_numpy(image_of.reshape(-1).astype(np.int64)).to(device)  # sample -> unique image
        self.pids = torch.as_tensor(column_values(train_split, "pid"), dtype=torch.int64, device=device)
        self.num_images = len(first_rows)
        self.encode_batch = config["eval"]["batch_size"]
        # a run's config.yaml written before alr.views existed (read raw, e.g. by experiments.alr_analysis)
        # scored eval-transform inputs
        self.views = config["alr"].get("views", "eval")
        if self.views not in ALR_VIEWS:
            raise ValueError(f"alr.views must be one of {', '.join(ALR_VIEWS)}, got {self.views!r}")
        if self.views == "eval":
            self.images = data.EvalImages(data.keep_rows(train_split, first_rows), config["data"]["image_size"],
                                          output="uint8")
            self.image_loader = sharded_loader(self.images, accelerator, batch_size=self.encode_batch,
                                               num_workers=config["data"]["num_workers"], persistent=True,
                                               pin_memory=device.type == "cuda")
            self.texts = data.EvalTexts(train_split, tokenizer)
        else:
            # the training dataset's own augmentation (two views, uint8 + erase boxes), on the pass's stream
            self.train_views = data.TrainViews(train_split, tokenizer, config["data"]["image_size"], num_views=2,
                                               augment=True, seed=config["seed"], stream=ALR_VIEW_STREAM,
                                               output="uint8")
            share, _ = shard_indices(self.num_samples, accelerator)
            workers = config["data"]["num_workers"]
            self.view_loader = DataLoader(
                self.train_views, num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                batch_sampler=data.EpochKeyedBatches(BatchSampler(share, self.encode_batch, drop_last=False)))

    @property
    def sample_image(self) -> torch.Tensor:
        """[N] int64 on the device: each sample's row in the stored images (`encode`): its unique image
        (alr.views "eval") or its own augmented image (alr.views "reference": 0..N-1)."""
        if self.views == "eval":
            return self.image_of
        return torch.arange(self.num_samples, device=self.image_of.device)

    def encode(self, models, pieces=None, epoch: int | None = None) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Per model {piece: (captions [N, W], images)} for each piece name in `pieces` ("fused": D wide,
        "global": E wide; default the scored one, alr.score), L2-normalised, FEATURE_DTYPE, on the
        accelerator's device, on every process (each encodes its share; shares gathered). images: the unique
        images [U, W] (alr.views "eval": the one sharded encoder, runtime.encoding.encode) or, under alr.views
        "reference", each sample's augmented image [N, W] (`encode_views`, which needs `epoch`); a sample's
        row is `sample_image`. Every input is encoded once whatever the number of pieces."""
        pieces = tuple(pieces or (self.config["alr"]["score"],))
        if self.views == "reference":
            if epoch is None:
                raise ValueError("alr.views reference: the pass's views are drawn per epoch; pass epoch")
            return self.encode_views(models, pieces, epoch)
        common = {"pieces": pieces, "dtype": FEATURE_DTYPE, "normalize": True, "batch_size": self.encode_batch,
                  "accelerator": self.accelerator}
        with fast_math(self.accelerator.device):  # the forward only; ALR's scores run exact (kernels)
            images = encode(models, self.images, "image", loader=self.image_loader, prepare_images=normalize_uint8,
                            desc="ALR pass: images", **common)
            captions = encode(models, self.texts, "text", prepare_texts=trim_text_padding,
                              desc="ALR pass: captions", **common)
        return [dict(zip(pieces, zip(text, image))) for text, image in zip(captions, images)]

    def encode_views(self, models, pieces, epoch: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """alr.views "reference" (the rebuilt reference code's pass): per model {piece: (captions [N, W],
        images [N, W])} of each sample's training-augmented views, model A scored on view b and model B on
        view a (SCORED_VIEW: each model on the other model's view, as the reciprocal step gives view a to A
        and view b to B). The two views of sample `position` are those `data.TrainViews` (augment=True: image
        flip, pad-crop, erasing AND text augmentation, the training settings) draws from
        SeedSequence([seed, epoch, position], spawn_key=(ALR_VIEW_STREAM,)): fresh draws every epoch, on a
        stream distinct from the training views' (and from the pass's batch order, ALR_BATCH_STREAM). Every
        sample has its own augmented image (no sharing per image_id).

        Mode: docs/method.md does not record whether the reference scores in train or eval mode; the pass
        runs the models in eval mode here as well (the caller's `eval_mode`, as under "eval"): dropout off,
        no gradient.

        Sharded like `runtime.encoding.encode`: each process loads its contiguous share (`shard_indices`)
        through the persistent `view_loader` (keys (epoch, position): workers need no set_epoch), under the
        accelerator's autocast; values L2-normalised in fp32, stored FEATURE_DTYPE, gathered in rank order."""
        accelerator = self.accelerator
        _, per_process = shard_indices(self.num_samples, accelerator)
        device = model_device(models[0])
        keep_on = device if device.type == "cuda" else torch.device("cpu")
        stored = [[tuple(torch.empty(per_process, piece_width(model, piece), dtype=FEATURE_DTYPE, device=keep_on)
                         for _ in range(2)) for piece in pieces] for model in models]  # (captions, images)
        self.view_loader.batch_sampler.set_epoch(epoch)
        start = 0
        show = accelerator.is_local_main_process
        with accelerator.autocast(), fast_math(device):  # the forward only; ALR's scores run exact (kernels)
            for batch in tqdm(self.view_loader, desc="ALR pass: augmented views", unit="batch", disable=not show,
                              leave=False):
                rows = len(batch["index"])
                pixel_values = batch["pixel_values"].to(device, non_blocking=True)
                boxes = batch["erase_boxes"].to(device, non_blocking=True)
                for m, (model, targets) in enumerate(zip(models, stored)):
                    view = SCORED_VIEW[m]
                    image = model.encode_image(normalize_uint8(pixel_values[:, view], boxes[:, view]))
                    input_ids, attention_mask = trim_text_padding(batch["input_ids"][:, view],
                                                                  batch["attention_mask"][:, view])
                    text = model.encode_text(input_ids.to(device), attention_mask.to(device))
                    for piece, (caption_rows, image_rows) in zip(pieces, targets):
                        caption_rows[start:start + rows] = F.normalize(text[PIECES[piece]].float(), dim=-1)
                        image_rows[start:start + rows] = F.normalize(image[PIECES[piece]].float(), dim=-1)
                start += rows
        return [{piece: tuple(gather_shares(rows, self.num_samples, accelerator) for rows in pair)
                 for piece, pair in zip(pieces, targets)} for targets in stored]

    def sample_statistics(self, models, loss_term, epoch: int, diagonals: bool = False):
        """Main process: (losses [M, N], diag_sims [M, N]) float32 on the CPU, per scoring model (M =
        len(models), in eval mode: the caller's business) and sample; None on the other processes.
        Each sample's loss is computed within its batch of `alr_batches` (seed, epoch); diag_sims are the
        cosines of the scored piece (alr.score). diagonals=True adds a third item, {"fused": [M, N],
        "global": [M, N]}: each sample's caption-image cosine in both embeddings (how well each would
        separate noisy pairs: the AUCs of the ALR report), from the same single encoding. The inputs are
        those of alr.views (`encode`); the rest does not depend on it."""
        score = self.config["alr"]["score"]
        features = self.encode(models, ("fused", "global") if diagonals else None, epoch)
        if not self.accelerator.is_main_process:
            return None
        device = self.accelerator.device
        image_of = self.sample_image
        losses = torch.empty(len(models), self.num_samples, device=device)
        sims = torch.empty(len(models), self.num_samples, device=device)
        batches = alr_batches(self.num_samples, self.config["train"]["batch_size"], self.config["seed"], epoch)
        for members, scored in batches:
            members = members.to(device)
            pids, rows = self.pids[members], members[:scored]
            for model_losses, model_sims, pieces in zip(losses, sims, features):
                captions, images = pieces[score]
                text, image = captions[members].float(), images[image_of[members]].float()
                columns = {"text_cols": text, "image_cols": image, "col_pids": pids}
                model_losses[rows], model_sims[rows] = batch_statistics(
                    loss_term, text[:scored], image[:scored], pids[:scored], columns)
        if not diagonals:
            return losses.cpu(), sims.cpu()
        cosines = {name: torch.stack([diagonal_cosines(*pieces[name], image_of) for pieces in features]).cpu()
                   for name in ("fused", "global")}
        return losses.cpu(), sims.cpu(), cosines

    @torch.no_grad()
    def __call__(self, models, loss_term, epoch: int) -> AlrRound:
        """One ALR round before epoch `epoch`. models: the unwrapped (A, B); the first `alr.models` score.
        loss_term: the ALR term (TrainingLoss.alr_term). Returns an `AlrRound` (its state identical on
        every process)."""
        alr_cfg = self.config["alr"]
        chosen = models[: alr_cfg["models"]]
        with contextlib.ExitStack() as stack:
            for model in chosen:
                stack.enter_context(eval_mode(model))
            statistics = self.sample_statistics(chosen, loss_term, epoch, diagonals=True)
        device = self.accelerator.device
        state = AlrState.initial(self.num_samples, device)  # other processes: overwritten by the broadcast
        result, diag_sims, signals = None, None, None
        if statistics is not None:
            losses, sims, cosines = statistics
            signals = {"loss": losses[0], "fused_similarity": cosines["fused"][0],
                       "global_similarity": cosines["global"][0]}
            diag_sims = sims.mean(0)
            result = compute_alr(losses[0], losses[1] if len(losses) > 1 else None, diag_sims, mu=alr_cfg["mu"],
                                 sharpness=alr_cfg["sharpness"], drop_noisy=alr_cfg["drop_noisy"],
                                 mixture=MixtureSettings.from_config(alr_cfg), selection=alr_cfg["selection"],
                                 seed=coin_seed(self.config["seed"], epoch), mu_floor=alr_cfg["mu_floor"])
            state = AlrState(result.weights, result.keep).to(device)
        # the mixture is fitted once, on the main process; keep travels as its bytes (bool stays bool)
        broadcast_from_main(state.weights, state.keep.view(torch.uint8))
        return AlrRound(state, result, diag_sims, signals)


def weight_quantiles(weights: torch.Tensor) -> list[float]:
    """The WEIGHT_QUANTILES of weights [n] (n >= 1)."""
    return [float(q) for q in torch.quantile(weights.double(), torch.tensor(WEIGHT_QUANTILES, dtype=torch.float64))]


def alr_report(result, diag_sims, noisy: torch.Tensor, signals: dict | None = None) -> dict:
    """JSON-able ALR figures of one epoch: mu, kept fraction (of all pairs; of clean and of noisy pairs when the
    flags are known), weights (mean, full-weight fraction, quantiles of all / clean / noisy pairs), consensus
    counts, each model's mixture fit (status, the degenerate rule when one applied); with any truly noisy sample
    also P/R/F1 of the split 'noisy = no model calls it clean' (the samples drop_noisy drops) against the `noisy`
    column."""
    fits = {"A": result.fit_a, **({"B": result.fit_b} if result.fit_b is not None else {})}
    quantiles = {"levels": list(WEIGHT_QUANTILES), "all": weight_quantiles(result.weights)}
    report = {"mu": result.mu, "mean_diag_similarity": float(diag_sims.mean()),
              "kept_fraction": float(result.keep.float().mean()),
              "mean_weight": float(result.weights.mean()),
              "full_weight_fraction": float((result.weights >= 1).float().mean()),
              "consensus_counts": [int((result.consensus == c).sum()) for c in range(3)],
              "mixture": {name: fit.record() for name, fit in fits.items()},
              "weight_quantiles": quantiles}
    if noisy.any():
        report["noise_detection"] = noise_detection_scores(result.consensus == 0, noisy)
        report["mean_weight_noisy"] = float(result.weights[noisy].mean())
        report["mean_weight_clean"] = float(result.weights[~noisy].mean()) if (~noisy).any() else None
        # the share of truly noisy / clean pairs this epoch trains on (keep flag h; hard selection drops pairs)
        report["kept_fraction_noisy"] = float(result.keep[noisy].float().mean())
        report["kept_fraction_clean"] = float(result.keep[~noisy].float().mean()) if (~noisy).any() else None
        quantiles["noisy"] = weight_quantiles(result.weights[noisy])
        if (~noisy).any():
            quantiles["clean"] = weight_quantiles(result.weights[~noisy])
            if signals is not None:  # how well each signal of model A separates noisy pairs (higher loss /
                # lower cosine = noisy): the mixture's input (loss) and the fused vs global diagonal cosine
                report["separation_auc"] = {"loss": separation_auc(signals["loss"], noisy),
                                            "fused_similarity": separation_auc(-signals["fused_similarity"], noisy),
                                            "global_similarity": separation_auc(-signals["global_similarity"], noisy)}
    return report


def report_alr(alr: AlrRound, noisy: torch.Tensor, epoch: int, accelerator, *, global_step: int) -> dict | None:
    """Main process: the epoch's ALR report (returned for metrics.jsonl), its scalars to the trackers and a
    log line; a degenerate mixture fit is logged with the rule applied. Other processes: None. The figure
    over the epochs (alr_weights.png) is the reporting layer's: `reporting.training.plot_run_alr_history`."""
    if not accelerator.is_main_process:
        return None
    report = alr_report(alr.result, alr.diag_sims, noisy, alr.signals)
    scalars = {f"alr/{k}": v for k, v in report.items() if isinstance(v, float)}
    scalars.update({f"alr/noise_{k}": v for k, v in report.get("noise_detection", {}).items()})
    scalars.update({f"alr/auc_{k}": v for k, v in report.get("separation_auc", {}).items()})
    accelerator.log(scalars, step=global_step)
    for name, fit in report["mixture"].items():
        if "rule" in fit:
            accelerator.print(f"epoch {epoch} ALR, model {name}: degenerate mixture ({fit['status']}): {fit['rule']}")
    detection = report.get("noise_detection")
    accelerator.print(f"epoch {epoch} ALR: mu {report['mu']:.3f}, kept {report['kept_fraction']:.1%}, "
                      f"mean weight {report['mean_weight']:.3f}"
                      + (f", noisy-pair detection P {detection['precision']:.1f} R {detection['recall']:.1f} "
                         f"F1 {detection['f1']:.1f}" if detection else "")
                      + (", AUC loss {loss:.3f} fused {fused_similarity:.3f} global {global_similarity:.3f}".format(
                          **report["separation_auc"]) if "separation_auc" in report else ""))
    return report
