"""The ablation sweep's report: the finished runs' test metrics and per-epoch ALR records collected into one
table (`collect`), the last ALR weights of the noisy runs, and docs_dir/ablation.md + ablation.json with the
figures (drawn by `trpr.reporting.ablation`)."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from trpr.experiments.ablation_plan import CONDITION_LABELS, VARIANTS, Run
from trpr.reporting.ablation import (alr_markdown, ensemble_markdown, plot_alr, plot_table, plot_weight_distributions,
                                     table_markdown)

METRICS = ("R1", "mAP")


def collect(runs: list[Run]) -> dict:
    """{variant: {condition: {row label: {"seeds": [...], "R1": [...], "mAP": [...], "best_epochs": [...]}}}}
    from the finished runs' test_metrics.json, plus the ALR detection figures per epoch of each run."""
    table: dict = {}
    for run in runs:
        if not run.finished:
            continue
        test = json.loads(run.metrics_file.read_text())
        records = [json.loads(line) for line in (run.folder / "metrics.jsonl").read_text().splitlines()
                   if line.strip()]
        best_epoch = records[-1].get("best_epoch") if records else None
        cell = table.setdefault(run.variant.name, {}).setdefault(run.condition, {})
        for label, key in run.variant.rows:
            row = cell.setdefault(label, {"key": key, "seeds": [], "R1": [], "mAP": [], "best_epochs": []})
            row["seeds"].append(run.seed)
            row["best_epochs"].append(best_epoch)
            for metric in METRICS:
                row[metric].append(test[key][metric])
        if run.partner is None:  # the control's own A+B is not an ensemble of independent models
            ensemble = table.setdefault("_ensemble", {}).setdefault(run.variant.name, {}).setdefault(
                run.condition, {"seeds": [], "R1": [], "mAP": []})
            ensemble["seeds"].append(run.seed)
            for metric in METRICS:
                ensemble[metric].append(test["A+B/FS"][metric])
        alr = [alr_epoch_entry(r) for r in records if "alr" in r]
        if alr:
            cell.setdefault("_alr", {})[str(run.seed)] = alr
    return table


def alr_epoch_entry(record: dict) -> dict:
    """The ALR figures of one epoch's metrics record (engine.alr_report's fields): noisy-pair precision /
    recall / F1, mean, 5 % quantile and median weight of noisy and clean pairs, mu, kept fraction, consensus
    counts and each model's mixture status."""
    alr = record["alr"]
    quantiles = alr.get("weight_quantiles", {})
    levels = quantiles.get("levels", [])
    entry = {"epoch": record["epoch"], **alr.get("noise_detection", {}),
             "mean_weight_noisy": alr.get("mean_weight_noisy"), "mean_weight_clean": alr.get("mean_weight_clean"),
             "mu": alr.get("mu"), "kept_fraction": alr.get("kept_fraction"),
             "consensus_counts": alr.get("consensus_counts"),
             "mixture_status": {name: fit.get("status") for name, fit in alr.get("mixture", {}).items()}}
    for group in ("noisy", "clean"):
        for level, key in ((0.05, "q05"), (0.5, "median")):
            if group in quantiles and level in levels:
                entry[f"{key}_weight_{group}"] = quantiles[group][levels.index(level)]
    return entry


def run_alr_weights(run: Run, root: Path) -> tuple | None:
    """(weights float [N], noisy bool [N]) of a noisy run's last ALR pass (last/training_state/alr_state.safetensors)
    and its training set's noisy flags (from the run's noise permutation), or None when either is missing."""
    import torch
    import yaml

    from trpr.runtime.run_folder import ALR_STATE_FILE, LAST_DIR, NOISE_PERMUTATION_FILE, STATE_DIR

    states = [run.folder / LAST_DIR / STATE_DIR / ALR_STATE_FILE]
    states = [path for path in states if path.is_file()]
    config_path = run.folder / "config.yaml"
    if not states or not config_path.is_file():
        return None
    config = yaml.safe_load(config_path.read_text())
    permutation = config["data"].get("noise_file") or run.folder / NOISE_PERMUTATION_FILE
    if not Path(permutation).is_file():
        return None
    from trpr import data

    flags = data.load_benchmark(config["data"]["dataset"], root=config["data"]["root"] or root,
                                noise_file=permutation)["train"]["noisy"]
    from trpr.engine.state_files import StateFileError, load_state

    try:  # safetensors + JSON: nothing is unpickled
        weights = load_state(states[0])["weights"].numpy()
    except (StateFileError, KeyError, TypeError):
        return None
    if len(weights) != len(flags):
        return None
    return weights, __import__("numpy").asarray(flags, dtype=bool)


def alr_weight_cells(runs: list[Run], args) -> dict:
    """{(noisy condition, variant with ALR): [(weights, noisy flags) of each trained seed's last ALR pass]}
    (`run_alr_weights`), for `reporting.ablation.plot_weight_distributions`."""
    root = Path(os.environ.get("TRPR_CACHE") or Path(args.runs_dir).resolve() / "cache")
    cells: dict = {}
    for run in runs:
        if run.condition == "clean" or not run.trained or ("alr.enabled", "true") not in run.variant.overrides:
            continue
        found = run_alr_weights(run, root)
        if found is not None:
            cells.setdefault((run.condition, run.variant.name), []).append(found)
    return cells


def copy_histogram(runs: list[Run], docs_dir: Path) -> str | None:
    """Copies the ALR figure over the epochs (the trainer's alr_weights.png) of the first finished noisy full
    run (else any ALR run)."""
    from trpr.runtime.run_folder import ALR_WEIGHTS_FILE

    ordered = sorted((r for r in runs if r.finished),
                     key=lambda r: (r.variant.name != "full", r.condition != "noisy", r.seed))
    for run in ordered:
        figure = run.folder / ALR_WEIGHTS_FILE
        if figure.is_file():
            target = docs_dir / f"alr_weights_{run.name}.png"
            shutil.copyfile(figure, target)
            return target.name
    return None


def write_report(runs: list[Run], args, failed: list[str]) -> Path:
    docs_dir = Path(args.docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    table = collect(runs)
    variants = {name: VARIANTS[name] for name in args.variants}
    conditions = {condition: CONDITION_LABELS[condition] for condition in args.conditions}
    plot_table(table, variants, conditions, docs_dir / "ablation_r1.png")
    noisy_conditions = tuple(c for c in args.conditions if c != "clean")
    if args.proxy:
        has_alr_plot = plot_alr(table, variants, docs_dir / "alr_detection.png",
                                {c: CONDITION_LABELS[c] for c in noisy_conditions}, ("precision", "recall", "f1"))
        histogram = "alr_weight_distributions.png" if plot_weight_distributions(
            alr_weight_cells(runs, args), variants, conditions, docs_dir / "alr_weight_distributions.png") else None
    else:
        has_alr_plot = plot_alr(table, variants, docs_dir / "alr_detection.png", {"noisy": CONDITION_LABELS["noisy"]})
        histogram = copy_histogram(runs, docs_dir)
    sweep = ["scripts/ablate.py", *(["--proxy"] if args.proxy else []), "--config", args.config,
             *(["--noisy-config", args.noisy_config] if args.noisy_config else []),
             *(["--backbone", args.backbone] if args.backbone else []), "--seeds", *map(str, args.seeds),
             "--variants", *args.variants, "--conditions", *args.conditions]
    if args.epochs is not None:
        sweep += ["--epochs", str(args.epochs)]
    for item in args.extra:
        sweep += ["--set", item]
    wall = [float((r.folder / "wall_time_s.txt").read_text()) for r in runs
            if (r.folder / "wall_time_s.txt").is_file()]
    example = next((r for r in runs if r.finished), runs[0] if runs else None)
    title = "synth-pedes ablation" + (" fine-tuned from the proxy CLIP" if args.proxy and not args.random_init else
                                      " of the proxy architecture from random init" if args.proxy else "")
    lines = [f"# {title} (written by scripts/ablate.py)", "",
             f"Sweep: `.venv/bin/python {' '.join(sweep)}` — {sum(r.finished for r in runs)} of {len(runs)} "
             f"planned runs finished" + (f"; failed: {', '.join(failed)}" if failed else "") + ".",
             "Test split, model selected on val R@1 of the variant's own row; mean ± std (sample std) over the "
             "seeds that finished (column `seeds`).", ""]
    if example is not None:
        lines += ["One run's trainer command (the others differ in seed, noise rate and the variant's overrides):",
                  "", "```", " ".join(Path(c).name if c == sys.executable else c for c in example.command), "```", ""]
    if wall:
        lines += [f"Wall time per run: {statistics.fmean(wall) / 60:.1f} min mean over {len(wall)} runs "
                  f"({args.jobs} in parallel).", ""]
    lines += [table_markdown(table, variants, conditions), "", "![test R@1](ablation_r1.png)", "",
              "## Ensemble A+B of the same runs (not a method row)", "",
              "Both models of every run, summed FS similarities. For the baseline, + fused and + ALR variants "
              "model B never influenced model A: the gain over A is plain two-model ensembling.", "",
              ensemble_markdown(table, variants, conditions), "",
              "## ALR noisy-pair detection per epoch (noisy runs)", "",
              "Predicted noisy = no model calls the pair clean (consensus 0); precision/recall against the "
              "generator's `noisy` flag; mean ± std over seeds. w = the ALR weight.", ""]
    if args.proxy:
        for condition in noisy_conditions:
            lines += [f"### {CONDITION_LABELS[condition]}", "", alr_markdown(table, variants, condition), ""]
    else:
        lines += [alr_markdown(table, variants), ""]
    if has_alr_plot:
        lines += ["![ALR detection](alr_detection.png)", ""]
    if histogram and args.proxy:
        lines += ["Last-epoch ALR weights of clean vs noisy training pairs, pooled over seeds:", "",
                  f"![ALR weights]({histogram})", ""]
    elif histogram:
        lines += [f"ALR weight histogram of one run (last epoch): ![ALR weights]({histogram})", ""]
    (docs_dir / "ablation.md").write_text("\n".join(lines))
    (docs_dir / "ablation.json").write_text(json.dumps(
        {"command": sweep, "runs_planned": len(runs), "runs_finished": sum(r.finished for r in runs),
         "failed": failed, "table": table}, indent=2) + "\n")
    return docs_dir / "ablation.md"
