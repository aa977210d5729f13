"""ALR separability (`scripts/ablate.py --diagnose RUN_DIR ...`): how well the signals ALR uses tell a
run's noisy training pairs from the clean ones, scored with the trainer's own ALR pass. The table and the
loss histograms are drawn by `trpr.reporting.ablation` (write_separability, plot_loss_distributions)."""
from __future__ import annotations

from pathlib import Path

from trpr.reporting.ablation import plot_loss_distributions


def separability(run_dir: Path, noise_rate: float, plot_dir: Path | None = None) -> dict:
    """Scores how well each signal ALR uses tells the noisy training pairs from the clean ones, with a run's
    best/ pair (else last/) and the trainer's own ALR pass (`engine.AlrPass.sample_statistics`: each unique
    image and caption encoded once, un-augmented, every sample's loss within the seeded shuffled batch of
    train.batch_size that the pass would form before the epoch after the checkpoint's). Training set: the
    run's dataset with `noise_rate` of noise from the run's seed.

    Returns per model ("A", "B"): ROC AUC (0.5 = no information) of the per-sample loss (noisy = high), of the
    fused diagonal cosine (noisy = low) and, for comparison, of the global (CLS/EOT) diagonal cosine; the mean
    fused cosine of clean pairs, noisy pairs and of pairs of other identities in the same ALR batches; and the
    split of ALR's own 2-Gaussian mixture on the model's losses (noisy = posterior of the low-loss component
    <= 0.5, the run's alr.gmm_* settings): precision / recall / F1 against the truth. With `plot_dir`, also
    draws the loss distributions of clean and noisy pairs the mixture sees: alr_losses_<run>.png."""
    import numpy as np
    import torch
    import yaml
    from accelerate import Accelerator
    from sklearn.metrics import roc_auc_score

    from trpr import data
    from trpr import modeling
    from trpr.data.tokenizer import get_tokenizer
    from trpr.engine import AlrPass, alr_batches
    from trpr.engine.metrics_log import read_metrics
    from trpr.modeling.alr import MixtureSettings, fit_mixture, noise_detection_scores
    from trpr.modeling.losses import TrainingLoss
    from trpr.runtime.encoding import encode
    from trpr.runtime.run_folder import BEST_DIR, selected_checkpoint

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    chosen = selected_checkpoint(run_dir)
    pair = modeling.ReciprocalPair.from_pretrained(chosen).eval()
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    trained_epoch = (records[-1].get("best_epoch") if chosen.name == BEST_DIR else records[-1]["epoch"]) if records else None
    epoch = (trained_epoch if trained_epoch is not None else -1) + 1  # the ALR pass right after that checkpoint
    splits = data.load_benchmark(config["data"]["dataset"], root=config["data"]["root"], noise_rate=noise_rate,
                                 seed=config["seed"])
    train = splits["train"]
    noisy = torch.tensor(train["noisy"], dtype=torch.bool)
    tokenizer = get_tokenizer()
    loss_term = TrainingLoss.from_config(config["loss"]).alr_term
    alr_pass = AlrPass(train, tokenizer, config, Accelerator(cpu=True))
    with torch.no_grad():
        losses, sims = alr_pass.sample_statistics(pair.models, loss_term, epoch)
        # global embeddings and the fused features of the pairs of other identities (for comparison only)
        image_ids = np.asarray(train["image_id"])
        _, first_rows, image_of = np.unique(image_ids, return_index=True, return_inverse=True)
        images = data.EvalImages(data.keep_rows(train, first_rows), config["data"]["image_size"])
        texts = data.EvalTexts(train, tokenizer)
        batch_size = config["eval"]["batch_size"]
        image_features = encode(pair.models, images, "image", batch_size=batch_size)
        text_features = encode(pair.models, texts, "text", batch_size=batch_size)
    image_of = torch.from_numpy(image_of.reshape(-1).astype(np.int64))
    pids = torch.as_tensor(np.asarray(train["pid"]), dtype=torch.int64)
    truth = noisy.numpy()
    result = {"run": run_dir.name, "checkpoint": chosen.name, "noise_rate": noise_rate, "alr_epoch": epoch,
              "trained_noise_rate": config["data"]["noise_rate"]}
    mixture = MixtureSettings.from_config(config["alr"])
    normalize = torch.nn.functional.normalize
    sample_losses = {}
    for m, name in enumerate(("A", "B")):
        loss, cos = losses[m], sims[m].numpy()
        sample_losses[name] = loss.numpy()
        (text_global, text_fused), (image_global, image_fused) = text_features[m], image_features[m]
        global_cos = torch.nn.functional.cosine_similarity(text_global, image_global[image_of], dim=-1).numpy()
        other = []
        for members, _ in alr_batches(len(train), config["train"]["batch_size"], config["seed"], epoch):
            cosines = normalize(text_fused[members], dim=-1) @ normalize(image_fused[image_of[members]], dim=-1).T
            other.append(cosines[pids[members][:, None] != pids[members][None, :]])
        gmm = noise_detection_scores(fit_mixture(loss, mixture).p_clean <= 0.5, noisy)
        result[name] = {"auc_loss": float(roc_auc_score(truth, sample_losses[name])),
                        "auc_similarity": float(roc_auc_score(truth, -cos)),
                        "auc_global_similarity": float(roc_auc_score(truth, -global_cos)),
                        "cos_clean": float(cos[~truth].mean()), "cos_noisy": float(cos[truth].mean()),
                        "cos_other_identity": float(torch.cat(other).mean()),
                        **{f"gmm_{key}": value for key, value in gmm.items()}}
    if plot_dir is not None:
        plot_loss_distributions(sample_losses, truth, result, plot_dir / f"alr_losses_{run_dir.name}.png")
    return result
