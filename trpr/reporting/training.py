"""The figures of a training run, drawn from the epoch records the engine writes (metrics.jsonl):
curves.png (loss and validation R@1 per epoch) and alr_weights.png (ALR over the epochs). The engine emits
records only; train_3rtpr.py asks this module to draw."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trpr.engine.alr_pass import WEIGHT_QUANTILES
from trpr.engine.metrics_log import read_metrics
from trpr.modeling.pair import selection_r1
from trpr.runtime.atomic import atomic_path
from trpr.runtime.run_folder import ALR_WEIGHTS_FILE, CURVES_FILE


def plot_curves(records: list[dict], select_row: str, path: Path) -> None:
    """curves.png: per-epoch mean training loss of A and B, and validation R@1 of `select_row` (a row, or a
    max(...) rule: the best of its rows)."""
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
    r1_axis.plot([r["epoch"] for r in validated], [selection_r1(r["val"], select_row) for r in validated], marker="o")
    r1_axis.set_xlabel("epoch")
    r1_axis.set_ylabel(f"val R@1 {select_row} (%)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_run_curves(run_dir: Path, select_row: str, accelerator) -> None:
    """Main process: RUN_DIR/curves.png from RUN_DIR/metrics.jsonl."""
    if accelerator.is_main_process:
        plot_curves(read_metrics(run_dir), select_row, run_dir / CURVES_FILE)


def plot_alr_history(records: list[dict], path: Path) -> np.ndarray:
    """ONE figure of ALR over the epochs -> PNG at `path` (written atomically; rewritten every epoch).

    records: epoch records {"epoch", "alr": alr_report(...)} in epoch order (records without
    "weight_quantiles" are skipped). Left: per group (clean / noisy pairs when the noisy flag is known,
    else all pairs) the median weight with its 25-75 % and 5-95 % bands, the minimum and the mean; when some
    epoch drops pairs (hard selection, drop_noisy) the kept share per group instead (`plot_kept_fractions`;
    under hard selection every weight is 1). Right: noisy-pair
    precision / recall / F1 when known, else the full-weight and kept fractions.
    Returns the RGB image [H, W, 3] uint8 for the trackers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if "weight_quantiles" in r.get("alr", {})]
    epochs = [r["epoch"] for r in records]
    figure, (weight_axis, right_axis) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    groups = [g for g in ("clean", "noisy") if records and g in records[-1]["alr"]["weight_quantiles"]] or ["all"]
    if any(r["alr"]["kept_fraction"] < 1.0 for r in records):  # pairs dropped (hard selection, drop_noisy)
        plot_kept_fractions(weight_axis, records, epochs, groups)
        groups = []  # the weights of the kept pairs stay in metrics.jsonl
    for group, colour in zip(groups, ("tab:blue", "tab:red", "tab:grey")):
        rows = [r["alr"]["weight_quantiles"] for r in records]
        levels = rows[0]["levels"] if rows else list(WEIGHT_QUANTILES)
        band = {level: np.array([row[group][levels.index(level)] if group in row else np.nan for row in rows])
                for level in (0.0, 0.05, 0.25, 0.5, 0.75, 0.95)}
        label = {"all": "all pairs", "clean": "clean pairs", "noisy": "noisy pairs"}[group]
        weight_axis.fill_between(epochs, band[0.05], band[0.95], color=colour, alpha=0.12, linewidth=0)
        weight_axis.fill_between(epochs, band[0.25], band[0.75], color=colour, alpha=0.3, linewidth=0)
        weight_axis.plot(epochs, band[0.5], color=colour, marker="o", label=f"{label}: median (bands 25-75, 5-95 %)")
        weight_axis.plot(epochs, band[0.0], color=colour, linestyle=":", label=f"{label}: minimum")
        mean_key = {"all": "mean_weight", "clean": "mean_weight_clean", "noisy": "mean_weight_noisy"}[group]
        weight_axis.plot(epochs, [r["alr"].get(mean_key) if r["alr"].get(mean_key) is not None else np.nan
                                  for r in records], color=colour, linestyle="--", label=f"{label}: mean")
    if groups:
        weight_axis.set_ylim(-0.02, 1.05)
        weight_axis.set_ylabel("ALR weight w")
        weight_axis.set_title("ALR weight distribution per epoch")
    weight_axis.set_xlabel("epoch")
    weight_axis.legend(fontsize=7, loc="lower left")
    detection = [r["alr"].get("noise_detection") for r in records]
    if any(detection):
        for metric in ("precision", "recall", "f1"):
            right_axis.plot(epochs, [d[metric] if d else np.nan for d in detection], marker="o", label=metric)
        right_axis.set_ylabel("%")
        right_axis.set_ylim(-2, 102)
        right_axis.set_title("noisy-pair detection (no model calls it clean)")
    else:
        right_axis.plot(epochs, [100 * r["alr"]["full_weight_fraction"] for r in records], marker="o",
                        label="pairs at full weight")
        right_axis.plot(epochs, [100 * r["alr"]["kept_fraction"] for r in records], marker="o", label="pairs kept")
        right_axis.set_ylabel("% of training pairs")
        right_axis.set_title("ALR (no noisy flags known)")
    right_axis.set_xlabel("epoch")
    right_axis.legend(fontsize=7)
    for axis in (weight_axis, right_axis):
        axis.xaxis.get_major_locator().set_params(integer=True)
    figure.tight_layout()
    with atomic_path(path) as partial:
        figure.savefig(partial, format="png")
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


def plot_kept_fractions(axis, records: list[dict], epochs: list[int], groups: list[str]) -> None:
    """The left panel of `plot_alr_history` when ALR drops pairs: per epoch the share (%) of the clean, the
    noisy (when the flags are known) and of all training pairs that the epoch trains on."""
    keys = {"clean": ("kept_fraction_clean", "tab:blue", "clean pairs"),
            "noisy": ("kept_fraction_noisy", "tab:red", "noisy pairs")}
    for group in groups:
        if group in keys:
            key, colour, label = keys[group]
            axis.plot(epochs, [100 * r["alr"][key] if r["alr"].get(key) is not None else np.nan for r in records],
                      color=colour, marker="o", label=f"{label} kept")
    axis.plot(epochs, [100 * r["alr"]["kept_fraction"] for r in records], color="tab:grey", marker="o",
              linestyle="--", label="all pairs kept")
    axis.set_ylim(-2, 102)
    axis.set_ylabel("% of the training pairs")
    axis.set_title("pairs ALR keeps for training, per epoch")


def plot_run_alr_history(run_dir: Path, epoch: int, report: dict) -> np.ndarray:
    """RUN_DIR/alr_weights.png over every epoch so far: the ALR records of metrics.jsonl before `epoch`
    and this epoch's `report` (engine.report_alr's record). Returns the RGB image for the trackers."""
    history = [r for r in read_metrics(run_dir, before_epoch=epoch) if "alr" in r] + [{"epoch": epoch, "alr": report}]
    return plot_alr_history(history, run_dir / ALR_WEIGHTS_FILE)
