"""The ablation sweep's tables and figures (trpr.experiments.ablation_*): the R@1 / mAP table, the
ensemble table, the per-epoch ALR detection tables and plot, the last-epoch ALR weight histograms, and the
ALR separability table and loss histograms of `--diagnose`.

`table` is `trpr.experiments.ablation_report.collect`'s {variant: {condition: {row: {...}}}}; `variants` maps
each shown variant's name to its definition (`.label`, `.rows`: trpr.experiments.ablation_plan.Variant), in
table order; `conditions` maps each shown condition to its label, in table order.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "not run"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f} (1 seed)"


def table_markdown(table: dict, variants: dict, conditions: dict[str, str]) -> str:
    header = "| variant | model | " + " | ".join(
        f"{conditions[c]}: R@1 | {conditions[c]}: mAP | seeds" for c in conditions) + " |"
    lines = [header, "|" + "---|" * (2 + 3 * len(conditions))]
    for name in variants:
        variant = variants[name]
        for label, key in variant.rows:
            cells = []
            for condition in conditions:
                row = table.get(name, {}).get(condition, {}).get(label)
                if row is None:
                    cells += ["not run", "not run", "0"]
                else:
                    cells += [format_cell(row["R1"]), format_cell(row["mAP"]), str(len(row["seeds"]))]
            lines.append(f"| {variant.label} | {label} ({key}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ensemble_markdown(table: dict, variants: dict, conditions: dict[str, str]) -> str:
    """A+B/FS of every variant's run: what ensembling the two trained models gives, with or without
    reciprocal learning (for variants 1-3 B never influenced A; this is not one of the method's rows)."""
    lines = ["| variant | " + " | ".join(f"{conditions[c]}: A+B R@1 | {conditions[c]}: A+B mAP"
                                          for c in conditions) + " |", "|---|" + "---|" * (2 * len(conditions))]
    for name in (v for v in variants if v != "ensemble"):
        cells = []
        for condition in conditions:
            row = table.get("_ensemble", {}).get(name, {}).get(condition)
            cells += [format_cell(row["R1"]), format_cell(row["mAP"])] if row else ["not run", "not run"]
        lines.append(f"| {variants[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alr_markdown(table: dict, variants: dict, condition: str = "noisy") -> str:
    """Per-epoch noisy-pair detection (noisy = no model calls the pair clean) of one noisy condition,
    mean over seeds."""
    from trpr.modeling.alr import FIT_OK

    blocks = []
    for name in variants:
        per_seed = table.get(name, {}).get(condition, {}).get("_alr")
        if not per_seed:
            continue
        epochs = sorted({entry["epoch"] for entries in per_seed.values() for entry in entries})
        lines = [f"**{variants[name].label}** (seeds {', '.join(sorted(per_seed))})", "",
                 "| epoch | precision (%) | recall (%) | F1 (%) | mean w, noisy pairs | 5 % quantile w, noisy "
                 "| median w, noisy | mean w, clean pairs | mu | degenerate mixture fits | seeds |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for epoch in epochs:
            entries = [e for entries in per_seed.values() for e in entries if e["epoch"] == epoch]
            cells = []
            for metric in ("precision", "recall", "f1", "mean_weight_noisy", "q05_weight_noisy",
                           "median_weight_noisy", "mean_weight_clean", "mu"):
                values = [e[metric] for e in entries if e.get(metric) is not None]
                digits = 1 if metric in ("precision", "recall", "f1") else 3
                cells.append(format_cell(values, digits) if values else "–")
            statuses = [status for e in entries for status in e.get("mixture_status", {}).values()]
            degenerate = [status for status in statuses if status != FIT_OK]
            cells.append(f"{len(degenerate)} of {len(statuses)}" + (f" ({', '.join(sorted(set(degenerate)))})"
                                                                   if degenerate else ""))
            lines.append(f"| {epoch} | " + " | ".join(cells) + f" | {len(entries)} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "(no noisy run with ALR has finished)"


def plot_table(table: dict, variants: dict, conditions: dict[str, str], path: Path) -> None:
    """Bar chart of test R@1 (mean ± std over seeds) per variant row and condition."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, bars = [], {c: ([], []) for c in conditions}
    for name in variants:
        for label, _ in variants[name].rows:
            labels.append(f"{name}\n{label}")
            for condition in conditions:
                row = table.get(name, {}).get(condition, {}).get(label)
                mean, std = mean_std(row["R1"]) if row else (float("nan"), None)
                bars[condition][0].append(mean)
                bars[condition][1].append(std or 0.0)
    figure, axis = plt.subplots(figsize=(7, 3.6), dpi=100)
    width = 0.8 / max(len(conditions), 1)
    for offset, condition in enumerate(conditions):
        positions = [i + (offset - (len(conditions) - 1) / 2) * width for i in range(len(labels))]
        axis.bar(positions, bars[condition][0], width, yerr=bars[condition][1], capsize=3,
                 label=conditions[condition])
    axis.set_xticks(range(len(labels)), labels, fontsize=8)
    axis.set_ylabel("test R@1 (%)")
    axis.set_title("synth-pedes ablation (mean ± std over seeds)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_alr(table: dict, variants: dict, path: Path, conditions: dict[str, str],
             metrics: tuple[str, ...] = ("precision", "recall")) -> bool:
    """Per-epoch noisy-pair detection metrics of the noisy runs (mean over seeds): one row of panels per
    noisy condition, one panel per metric."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = {condition: {name: table.get(name, {}).get(condition, {}).get("_alr") for name in variants}
            for condition in conditions}
    grid = {c: {n: per_seed for n, per_seed in series.items() if per_seed} for c, series in grid.items()}
    grid = {c: series for c, series in grid.items() if series}
    if not grid:
        return False
    figure, axes = plt.subplots(len(grid), len(metrics), figsize=(4 * len(metrics), 3.2 * len(grid)), dpi=100,
                                sharey=True, squeeze=False)
    for row, (condition, series) in enumerate(grid.items()):
        for name, per_seed in series.items():
            epochs = sorted({e["epoch"] for entries in per_seed.values() for e in entries})
            for axis, metric in zip(axes[row], metrics):
                means = [statistics.fmean([e[metric] for entries in per_seed.values() for e in entries
                                           if e["epoch"] == epoch and metric in e]) for epoch in epochs]
                axis.plot(epochs, means, marker="o", label=variants[name].label)
        for axis, metric in zip(axes[row], metrics):
            axis.set_xlabel("epoch")
            axis.set_title(f"{conditions[condition]}: {metric}" if len(grid) > 1 else f"noisy-pair detection {metric}",
                           fontsize=9)
        axes[row][0].set_ylabel("%")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def plot_weight_distributions(cells: dict, variants: dict, conditions: dict[str, str], path: Path) -> bool:
    """One figure: histograms of the last-epoch ALR weights of clean vs noisy training pairs, pooled over
    seeds; rows = noisy conditions, columns = the variants with ALR. cells: {(condition, variant):
    [(weights float [N], noisy bool [N]) per seed]}. False when there are none."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not cells:
        return False
    rows = [c for c in conditions if any(key[0] == c for key in cells)]
    names = [v for v in variants if any(key[1] == v for key in cells)]
    figure, axes = plt.subplots(len(rows), len(names), figsize=(4.2 * len(names), 3.2 * len(rows)),
                                dpi=100, squeeze=False)
    bins = np.linspace(0, 1, 41)
    for row, condition in enumerate(rows):
        for column, name in enumerate(names):
            axis = axes[row][column]
            pieces = cells.get((condition, name))
            if not pieces:
                axis.set_axis_off()
                continue
            weights = np.concatenate([w for w, _ in pieces])
            noisy = np.concatenate([n for _, n in pieces])
            axis.hist(weights[~noisy], bins=bins, alpha=0.7, label=f"clean pairs (mean {weights[~noisy].mean():.3f})")
            axis.hist(weights[noisy], bins=bins, alpha=0.7, label=f"noisy pairs (mean {weights[noisy].mean():.3f})")
            axis.set_yscale("log")
            axis.set_ylim(bottom=0.8)
            axis.set_title(f"{variants[name].label}\n{conditions[condition]}, {len(pieces)} seed(s)", fontsize=8)
            axis.set_xlabel("ALR weight w, last epoch")
            axis.legend(fontsize=7)
    axes[0][0].set_ylabel("training pairs")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def plot_loss_distributions(sample_losses: dict, truth, result: dict, path: Path) -> None:
    """Histograms of each model's per-sample losses, clean vs noisy pairs (what the ALR mixture is fit to)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, len(sample_losses), figsize=(5 * len(sample_losses), 3.4), dpi=100, squeeze=False)
    for axis, (name, loss) in zip(axes[0], sample_losses.items()):
        bins = np.linspace(loss.min(), loss.max(), 50)
        axis.hist(loss[~truth], bins=bins, alpha=0.6, label="clean pairs")
        axis.hist(loss[truth], bins=bins, alpha=0.6, label="noisy pairs")
        r = result[name]
        axis.set_title(f"model {name}: AUC {r['auc_loss']:.3f}; mixture split P {r['gmm_precision']:.0f} "
                       f"R {r['gmm_recall']:.0f} F1 {r['gmm_f1']:.0f}", fontsize=8)
        axis.set_xlabel("per-sample loss")
        axis.legend(fontsize=7)
    axes[0][0].set_ylabel("training pairs")
    figure.suptitle(f"{result['run']} ({result['checkpoint']}/), {100 * result['noise_rate']:.0f}% noise, "
                    f"ALR pass before epoch {result['alr_epoch']}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def write_separability(results: list[dict], docs_dir: Path) -> Path:
    lines = ["| run (trained at noise rate) | model | AUC of loss | AUC of −similarity | AUC of −global similarity | "
             "cos clean pairs | cos noisy pairs | cos other identities | mixture split P / R / F1 (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for name in ("A", "B"):
            r = result[name]
            lines.append(f"| {result['run']} ({result['trained_noise_rate']}) | {name} | {r['auc_loss']:.3f} | "
                         f"{r['auc_similarity']:.3f} | {r['auc_global_similarity']:.3f} | {r['cos_clean']:.3f} | "
                         f"{r['cos_noisy']:.3f} | "
                         f"{r['cos_other_identity']:.3f} | {r['gmm_precision']:.1f} / {r['gmm_recall']:.1f} / "
                         f"{r['gmm_f1']:.1f} |")
    docs_dir.mkdir(parents=True, exist_ok=True)
    path = docs_dir / "alr_separability.md"
    noise = sorted({r["noise_rate"] for r in results})
    path.write_text(f"Training set with {', '.join(map(str, noise))} noisy correspondence (the run's seed), "
                    f"each run's best/ models, scored by the trainer's ALR pass (engine.AlrPass: un-augmented, "
                    f"seeded shuffled batches of train.batch_size, the pass after the checkpoint's epoch). "
                    f"AUC 0.5 = the signal carries no information about which pairs are noisy. Mixture split: "
                    f"ALR's 2-Gaussian mixture on the model's own losses, noisy = posterior of the low-loss "
                    f"component <= 0.5 (one model; the trainer's consensus needs both).\n\n"
                    + "\n".join(lines) + "\n")
    (docs_dir / "alr_separability.json").write_text(json.dumps(results, indent=2) + "\n")
    return path
