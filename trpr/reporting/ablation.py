"""The ablation sweep's tables and figures (trpr.experiments.ablation_*): the R@1 / mAP table of each model
selection rule with the zero-shot row, the paired differences (table and plot), the ensemble table, the
per-epoch ALR detection tables and plot, the last-epoch ALR weight histograms, and the ALR separability
table and loss histograms of `--diagnose`.

`table` is `trpr.experiments.ablation_report.collect`'s {variant: {condition: {rule: {row: {...}}, "_alr":
...}}, "_ensemble": ..., "_zeroshot": ...}; `variants` maps
each shown variant's name to its definition (`.label`, `.rows`: trpr.experiments.ablation_plan.Variant), in
table order; `conditions` maps each shown condition to its label, in table order.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path


AUC_METRICS = ("auc_loss", "auc_fused_similarity", "auc_global_similarity")
AXIS_LABELS = {"precision": "%", "recall": "%", "f1": "%", "auc_loss": "ROC AUC", "auc_fused_similarity": "ROC AUC",
               "auc_global_similarity": "ROC AUC"}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "not run"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f} (1 seed)"


def table_markdown(table: dict, variants: dict, conditions: dict[str, str], rule: str = "trainer") -> str:
    """Test R@1 and mAP (mean ± std over seeds) of every variant's rows under one selection rule, the
    zero-shot backbone (table["_zeroshot"]) first. A cell is "not run" when the variant has no finished run
    in that condition, "n/a" when it has but the rule does not apply (ensemble controls under the reference
    rule, runs without per-epoch test records)."""
    header = "| variant | row | " + " | ".join(
        f"{conditions[c]}: R@1 | {conditions[c]}: mAP | seeds" for c in conditions) + " |"
    lines = [header, "|" + "---|" * (2 + 3 * len(conditions))]
    zeroshot = table.get("_zeroshot")
    if zeroshot is not None:
        row = zeroshot["A/GE"]
        cells = [f"{row['R1']:.2f}", f"{row['mAP']:.2f}", "–"] * len(conditions)
        lines.append("| zero-shot: the pretrained backbone, no fine-tuning (test split, one evaluation) | A/GE | "
                     + " | ".join(cells) + " |")
    else:
        lines.append("| zero-shot: the pretrained backbone, no fine-tuning | A/GE | "
                     + " | ".join(["not evaluated"] * 3 * len(conditions)) + " |")
    for name in variants:
        variant = variants[name]
        for label, key in variant.rows:
            cells = []
            for condition in conditions:
                cell = table.get(name, {}).get(condition, {})
                row = cell.get(rule, {}).get(label)
                if row is not None:
                    cells += [format_cell(row["R1"]), format_cell(row["mAP"]), str(len(row["seeds"]))]
                else:
                    missing = "n/a" if cell.get("finished_seeds") else "not run"
                    cells += [missing, missing, "0"]
            lines.append(f"| {variant.label} | {label} ({key}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_markdown(results: list[dict], conditions: dict[str, str], rule: str) -> str:
    """The paired differences of one selection rule (trpr.experiments.ablation_compare.compare_all's
    entries): per comparison and condition the seeds, the per-seed R@1 differences, mean ± std and verdict."""
    lines = ["| comparison | rows (R@1 of variant − R@1 of baseline) | condition | seeds | per-seed difference "
             "| mean ± std | verdict |", "|---|---|---|---|---|---|---|"]
    for entry in (e for e in results if e["rule"] == rule):
        rows = f"{entry['variant']} {entry['row']} − {entry['baseline']} {entry['baseline_row']}"
        condition = conditions[entry["condition"]]
        if "skipped" in entry:
            lines.append(f"| {entry['question']} | {rows} | {condition} | – | – | – "
                         f"| skipped: {entry['skipped']} |")
            continue
        per_seed = ", ".join(f"{seed}: {d:+.2f}" for seed, d in zip(entry["seeds"], entry["differences"]))
        spread = f"{entry['mean']:+.2f} ± {entry['std']:.2f}" if entry["std"] is not None else \
            f"{entry['mean']:+.2f} (1 seed)"
        lines.append(f"| {entry['question']} | {rows} | {condition} | {len(entry['seeds'])} | {per_seed} | {spread} "
                     f"| {entry['verdict']} |")
    return "\n".join(lines)


def ensemble_markdown(table: dict, variants: dict, conditions: dict[str, str]) -> str:
    """A+B/FS of every variant's run: what ensembling the two trained models gives, with or without
    reciprocal learning (for variants 1-3 B never influenced A; this is not one of the method's rows)."""
    lines = ["| variant | " + " | ".join(f"{conditions[c]}: A+B R@1 | {conditions[c]}: A+B mAP"
                                          for c in conditions) + " |", "|---|" + "---|" * (2 * len(conditions))]
    for name in (v for v in variants if variants[v].partner is None):
        cells = []
        for condition in conditions:
            row = table.get("_ensemble", {}).get(name, {}).get(condition)
            cells += [format_cell(row["R1"]), format_cell(row["mAP"])] if row else ["not run", "not run"]
        lines.append(f"| {variants[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alr_markdown(table: dict, variants: dict, condition: str = "noisy") -> str:
    """Per-epoch noisy-pair detection (noisy = no model calls the pair clean) and model A's separation AUCs
    (missing in records written before they existed: "–") of one noisy condition, mean ± std over seeds."""
    from trpr.modeling.alr import FIT_OK

    blocks = []
    for name in variants:
        per_seed = table.get(name, {}).get(condition, {}).get("_alr")
        if not per_seed:
            continue
        epochs = sorted({entry["epoch"] for entries in per_seed.values() for entry in entries})
        lines = [f"**{variants[name].label}** (seeds {', '.join(sorted(per_seed))})", "",
                 "| epoch | precision (%) | recall (%) | F1 (%) | AUC loss | AUC fused sim. | AUC global sim. "
                 "| mean w, noisy pairs | 5 % quantile w, noisy | median w, noisy | mean w, clean pairs | mu "
                 "| degenerate mixture fits | seeds |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for epoch in epochs:
            entries = [e for entries in per_seed.values() for e in entries if e["epoch"] == epoch]
            cells = []
            for metric in ("precision", "recall", "f1", *AUC_METRICS, "mean_weight_noisy", "q05_weight_noisy",
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


def plot_table(table: dict, variants: dict, conditions: dict[str, str], path: Path,
               rules: dict[str, str] | None = None) -> None:
    """Bar chart of test R@1 (mean ± std over seeds) per variant row and condition, one panel per selection
    rule (`rules`: {rule: title, shown up to its first " ("}; default the trainer's only); the zero-shot
    backbone as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = rules or {"trainer": "trainer's rule"}
    labels = [f"{name} {label}" for name in variants for label, _ in variants[name].rows]
    figure, axes = plt.subplots(len(rules), 1, figsize=(max(7.0, 0.32 * len(labels) + 2), 4.6 * len(rules)),
                                dpi=100, squeeze=False)
    width = 0.8 / max(len(conditions), 1)
    zeroshot = table.get("_zeroshot")
    for axis, (rule, title) in zip(axes[:, 0], rules.items()):
        for offset, condition in enumerate(conditions):
            means, stds = [], []
            for name in variants:
                for label, _ in variants[name].rows:
                    row = table.get(name, {}).get(condition, {}).get(rule, {}).get(label)
                    mean, std = mean_std(row["R1"]) if row else (float("nan"), None)
                    means.append(mean)
                    stds.append(std or 0.0)
            positions = [i + (offset - (len(conditions) - 1) / 2) * width for i in range(len(labels))]
            axis.bar(positions, means, width, yerr=stds, capsize=3, label=conditions[condition])
        if zeroshot is not None:
            axis.axhline(zeroshot["A/GE"]["R1"], color="black", linestyle="--", linewidth=1,
                         label="zero-shot backbone (A/GE)")
        axis.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90)
        axis.set_ylabel("test R@1 (%)")
        axis.set_title(f"{title.split(' (')[0]}: mean ± std over seeds", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_differences(results: list[dict], conditions: dict[str, str], rules: dict[str, str], path: Path) -> bool:
    """The paired R@1 differences (trpr.experiments.ablation_compare.compare_all's entries) as horizontal
    bars (mean ± std over seeds) with each seed's difference as a dot, one panel per selection rule; False
    (nothing drawn) when no comparison could be made."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = [e for e in results if "skipped" not in e]
    if not made:
        return False
    names = list(dict.fromkeys(e["name"] for e in made))
    shown = [rule for rule in rules if any(e["rule"] == rule for e in made)]
    figure, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 0.5 * len(names) * len(conditions) + 1.5),
                                dpi=100, squeeze=False, sharey=True)
    height = 0.8 / max(len(conditions), 1)
    for axis, rule in zip(axes[0], shown):
        for offset, condition in enumerate(conditions):
            entries = {e["name"]: e for e in made if e["rule"] == rule and e["condition"] == condition}
            positions = [i + (offset - (len(conditions) - 1) / 2) * height for i in range(len(names))]
            means = [entries[n]["mean"] if n in entries else float("nan") for n in names]
            stds = [(entries[n]["std"] or 0.0) if n in entries else 0.0 for n in names]
            axis.barh(positions, means, height, xerr=stds, capsize=3, label=conditions[condition])
            for position, name in zip(positions, names):
                if name in entries:
                    axis.plot(entries[name]["differences"], [position] * len(entries[name]["differences"]), "k.",
                              markersize=4)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_yticks(range(len(names)), names, fontsize=7)
        axis.set_xlabel("test R@1 difference (points), variant − baseline")
        axis.set_title(rules[rule].split(" (")[0], fontsize=9)
        axis.legend(fontsize=7)
    axes[0][0].invert_yaxis()  # the comparisons top-down in COMPARISONS order (the y axis is shared)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def plot_alr(table: dict, variants: dict, path: Path, conditions: dict[str, str],
             metrics: tuple[str, ...] = ("precision", "recall")) -> bool:
    """Per-epoch noisy-pair detection metrics of the noisy runs (mean over seeds; `metrics`: keys of
    ablation_report.alr_epoch_entry, e.g. "f1" and AUC_METRICS): one row of panels per noisy condition, one
    panel per metric. False (nothing drawn) when no noisy run has ALR records."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = {condition: {name: table.get(name, {}).get(condition, {}).get("_alr") for name in variants}
            for condition in conditions}
    grid = {c: {n: per_seed for n, per_seed in series.items() if per_seed} for c, series in grid.items()}
    grid = {c: series for c, series in grid.items() if series}
    if not grid:
        return False
    names = [name for name in variants if any(name in series for series in grid.values())]
    # one style per variant, the same in every panel: 10 colours x 2 line styles x 2 markers
    colours = plt.get_cmap("tab10").colors
    style = {name: dict(color=colours[i % 10], linestyle=("-", "--")[i // 10 % 2], marker=("o", "s")[i // 20 % 2])
             for i, name in enumerate(names)}
    figure, axes = plt.subplots(len(grid), len(metrics), figsize=(4 * len(metrics), 3.2 * len(grid)), dpi=100,
                                squeeze=False)
    for row, (condition, series) in enumerate(grid.items()):
        for name, per_seed in series.items():
            epochs = sorted({e["epoch"] for entries in per_seed.values() for e in entries})
            for axis, metric in zip(axes[row], metrics):
                values = [[e[metric] for entries in per_seed.values() for e in entries
                           if e["epoch"] == epoch and e.get(metric) is not None] for epoch in epochs]
                points = [(epoch, statistics.fmean(v)) for epoch, v in zip(epochs, values) if v]
                if points:
                    axis.plot(*zip(*points), label=variants[name].label, markersize=4, **style[name])
        for axis, metric in zip(axes[row], metrics):
            axis.set_xlabel("epoch")
            axis.set_ylabel(AXIS_LABELS.get(metric, metric))
            axis.set_title(f"{conditions[condition]}: {metric}" if len(grid) > 1 else f"noisy-pair detection {metric}",
                           fontsize=9)
            axis.xaxis.get_major_locator().set_params(integer=True)
    handles = {label: handle for axis in axes.flat for handle, label in zip(*axis.get_legend_handles_labels())}
    columns = 2 if len(handles) > 6 else 1
    rows_of_legend = -(-len(handles) // columns)
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=columns, fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, min(0.6, 0.2 * rows_of_legend / (3.2 * len(grid))), 1, 1))
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


def selection_rule_markdown(effect: dict, differences: list[dict], variants: dict, conditions: dict[str, str]) -> str:
    """Deviation 7's table (trpr.experiments.ablation_compare.selection_rule_effect / _differences): per variant
    and condition the test R@1 of the reported GE+FS row at the epoch kept by the fixed row, by max(GE, FS)
    and at the last epoch (mean ± std over seeds), the kept epochs, and the paired fixed − max(GE, FS)."""
    lines = ["| variant | row | condition | seeds | fixed row | max(GE, FS) | last epoch | kept epochs "
             "(fixed / max / last) | fixed − max(GE, FS) per seed | mean ± std | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(d["variant"], d["condition"]): d for d in differences}
    for name in variants:
        for condition in conditions:
            cell = effect.get(name, {}).get(condition)
            if cell is None:
                continue
            diff = by_key[(name, condition)]
            epochs = " / ".join(",".join(map(str, cell["epochs"][rule])) for rule in ("fixed", "reference", "last"))
            per_seed = ", ".join(f"{s}: {d:+.2f}" for s, d in zip(diff["seeds"], diff["differences"]))
            spread = (f"{diff['mean']:+.2f} ± {diff['std']:.2f}" if diff["std"] is not None
                      else f"{diff['mean']:+.2f} (1 seed)")
            lines.append(f"| {name} | {cell['row']} | {conditions[condition]} | {len(cell['seeds'])} | "
                         f"{format_cell(cell['fixed'])} | {format_cell(cell['reference'])} | "
                         f"{format_cell(cell['last'])} | {epochs} | {per_seed} | {spread} | {diff['verdict']} |")
    return "\n".join(lines)
