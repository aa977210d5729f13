"""The ablation sweep's report: the finished runs' test metrics under both model-selection rules
(ablation_compare) and their per-epoch ALR records collected into one table (`collect`), the zero-shot row
(ablation_zeroshot), the paired comparisons, the last ALR weights of the noisy runs, and docs_dir/ablation.md
+ ablation.json with the figures (drawn by `trpr.reporting.ablation`)."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from trpr.experiments.ablation_compare import (RULES, SELECTION_RULES, compare_all, read_records, selected_rows,
                                              selection_rule_differences, selection_rule_effect)
from trpr.experiments.ablation_plan import CONDITION_LABELS, VARIANTS, Run
from trpr.experiments.ablation_zeroshot import read_zeroshot
from trpr.reporting.ablation import (AUC_METRICS, alr_markdown, comparison_markdown, ensemble_markdown, plot_alr,
                                     plot_differences, plot_table, plot_weight_distributions,
                                     selection_rule_markdown, table_markdown)

METRICS = ("R1", "mAP")


def collect(runs: list[Run], zeroshot: dict | None = None) -> dict:
    """{variant: {condition: {"finished_seeds": [...], <rule>: {row label: {"key", "seeds", "R1", "mAP",
    "epochs"}}, "_alr": {seed: [alr_epoch_entry ...]}}}} of the finished runs under each selection rule of
    ablation_compare.RULES that applies (the epochs: the selected one of each seed), plus "_ensemble":
    {variant: {condition: {"seeds", "R1", "mAP"}}} (A+B/FS of every non-control run, trainer's rule) and
    "_zeroshot" (ablation_zeroshot.read_zeroshot's record, or None)."""
    table: dict = {"_zeroshot": zeroshot}
    for run in runs:
        if not run.finished:
            continue
        records = read_records(run.folder)
        cell = table.setdefault(run.variant.name, {}).setdefault(run.condition, {"finished_seeds": []})
        cell["finished_seeds"].append(run.seed)
        chosen = selected_rows(run, records)
        for rule, (test, epoch) in chosen.items():
            for label, key in run.variant.rows:
                row = cell.setdefault(rule, {}).setdefault(
                    label, {"key": key, "seeds": [], "R1": [], "mAP": [], "epochs": []})
                row["seeds"].append(run.seed)
                row["epochs"].append(epoch)
                for metric in METRICS:
                    row[metric].append(test[key][metric])
        if run.partner is None:  # the control's own A+B is not an ensemble of independent models
            test = chosen["trainer"][0]
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
    recall / F1, model A's separation AUC of its loss, fused and global diagonal similarity (auc_loss,
    auc_fused_similarity, auc_global_similarity; 0..1), mean, 5 % quantile and median weight of noisy and
    clean pairs, mu, kept fraction, consensus counts and each model's mixture status."""
    alr = record["alr"]
    quantiles = alr.get("weight_quantiles", {})
    levels = quantiles.get("levels", [])
    entry = {"epoch": record["epoch"], **alr.get("noise_detection", {}),
             **{f"auc_{signal}": value for signal, value in alr.get("separation_auc", {}).items()},
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


def sweep_command(args) -> list[str]:
    """The sweep's command line as the report prints it."""
    sweep = ["scripts/ablate.py", *(["--proxy"] if args.proxy else []), "--config", args.config,
             *(["--noisy-config", args.noisy_config] if args.noisy_config else []),
             *(["--backbone", args.backbone] if args.backbone else []), "--seeds", *map(str, args.seeds),
             "--variants", *args.variants, "--conditions", *args.conditions]
    if args.epochs is not None:
        sweep += ["--epochs", str(args.epochs)]
    for item in args.extra:
        sweep += ["--set", item]
    return sweep


SELECTION_TEXT = {
    "trainer": "best/ as the trainer chose it: the epoch with the best val R@1 of the variant's own row "
               "(eval.select_row: A/FS, A+B/FS for the pair variants); its test_metrics.json (the ensemble "
               "controls: ensemble_test_metrics.json of the two best/ models A).",
    "reference": "the reference code's rule, applied afterwards: per run, the epoch whose val max(R@1 of M/GE, "
                 "R@1 of M/FS) is highest (M = A, or A+B for the pair variants; the first such epoch on ties), "
                 "and that epoch's test rows from metrics.jsonl (eval.record_test; never used to select). "
                 "n/a for the ensemble controls: their A+A' rows come from one evaluation of the two best/ "
                 "models, and the per-epoch test records of a run hold only its own models A and B, so there "
                 "is no A+A' per epoch to select from.",
}
VERDICT_TEXT = ("R@1 of the named row of the variant minus R@1 of the named row of its baseline, test split, "
                "paired by seed over the seeds both finished. Verdict: **earns its place** only when the mean "
                "difference > 2 × its sample std, every seed's difference has the same (positive) sign and at "
                "least 2 seeds agree; **hurts** for the mirror case; **not shown** otherwise.")


def write_report(runs: list[Run], args, failed: list[str]) -> Path:
    docs_dir = Path(args.docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    table = collect(runs, read_zeroshot(args.runs_dir))
    variants = {name: VARIANTS[name] for name in args.variants}
    conditions = {condition: CONDITION_LABELS[condition] for condition in args.conditions}
    comparisons = compare_all(table, conditions)
    plot_table(table, variants, conditions, docs_dir / "ablation_r1.png", RULES)
    has_differences = plot_differences(comparisons, conditions, RULES, docs_dir / "ablation_differences.png")
    noisy_conditions = tuple(c for c in args.conditions if c != "clean")
    if args.proxy:
        has_alr_plot = plot_alr(table, variants, docs_dir / "alr_detection.png",
                                {c: CONDITION_LABELS[c] for c in noisy_conditions}, ("f1", *AUC_METRICS))
        histogram = "alr_weight_distributions.png" if plot_weight_distributions(
            alr_weight_cells(runs, args), variants, conditions, docs_dir / "alr_weight_distributions.png") else None
    else:
        has_alr_plot = plot_alr(table, variants, docs_dir / "alr_detection.png", {"noisy": CONDITION_LABELS["noisy"]})
        histogram = copy_histogram(runs, docs_dir)
    sweep = sweep_command(args)
    wall = [float((r.folder / "wall_time_s.txt").read_text()) for r in runs
            if (r.folder / "wall_time_s.txt").is_file()]
    example = next((r for r in runs if r.finished), runs[0] if runs else None)
    title = "synth-pedes ablation" + (" fine-tuned from the proxy CLIP" if args.proxy and not args.random_init else
                                      " of the proxy architecture from random init" if args.proxy else "")
    zeroshot = table["_zeroshot"]
    lines = [f"# {title} (written by scripts/ablate.py)", "",
             f"Sweep: `.venv/bin/python {' '.join(sweep)}` — {sum(r.finished for r in runs)} of {len(runs)} "
             f"planned runs finished" + (f"; failed: {', '.join(failed)}" if failed else "") + ".",
             "Test split; mean ± std (sample std) over the seeds that finished (column `seeds`). \"not run\": no "
             "finished run of the variant in that condition.", ""]
    if example is not None:
        lines += ["One run's trainer command (the others differ in seed, noise rate and the variant's overrides):",
                  "", "```", " ".join(Path(c).name if c == sys.executable else c for c in example.command), "```", ""]
    if wall:
        lines += [f"Wall time per run: {statistics.fmean(wall) / 60:.1f} min mean over {len(wall)} runs "
                  f"({args.jobs} in parallel).", ""]
    lines += ["Zero-shot row: " + (f"the backbone `{zeroshot['backbone']}` itself, no fine-tuning, global embedding "
                                   f"(A/GE) on the test split of {zeroshot['dataset']} "
                                   "(<runs_dir>/zeroshot_test_metrics.json); the same number in every condition "
                                   "(noise only touches the training set)." if zeroshot else
                                   "not evaluated (no pretrained backbone, or the sweep has not evaluated it yet)."),
              ""]
    for letter, rule in zip("ab", RULES):
        lines += [f"## ({letter}) Model selection: {RULES[rule]}", "", SELECTION_TEXT[rule], "",
                  table_markdown(table, variants, conditions, rule), ""]
    lines += ["![test R@1](ablation_r1.png)", "", "## Paired differences: does each component earn its place?", "",
              VERDICT_TEXT, ""]
    for letter, rule in zip("ab", RULES):
        lines += [f"### ({letter}) {RULES[rule]}", "", comparison_markdown(comparisons, conditions, rule), ""]
    if has_differences:
        lines += ["![paired differences](ablation_differences.png)", ""]
    effect = selection_rule_effect(runs)
    rule_differences = selection_rule_differences(effect)
    lines += ["## Which epoch to keep: the fixed row vs max(GE, FS) (deviation 7)", "",
              "Test R@1 of the score each variant reports (M/GE+FS; M = A, A+B for the pair variants) at the epoch "
              "each rule keeps, all read from the same runs' per-epoch records (val rows select, test rows "
              "report): " + "; ".join(f"**{name}** = {text}" for name, text in SELECTION_RULES.items()) +
              ". The runs themselves selected on their FS row (table (a)); this section only re-reads their "
              "records. Verdict as above, for fixed − max(GE, FS).", "",
              selection_rule_markdown(effect, rule_differences, variants, conditions), ""]
    lines += ["## Ensemble A+B of the same runs (not a method row)", "",
              "Both models of every run, summed FS similarities (trainer's rule). For the variants without the "
              "reciprocal pair model B never influenced model A: the gain over A is plain two-model ensembling.", "",
              ensemble_markdown(table, variants, conditions), "",
              "## ALR noisy-pair detection per epoch (noisy runs)", "",
              "Predicted noisy = no model calls the pair clean (consensus 0); precision/recall against the "
              "generator's `noisy` flag; AUC = model A's ROC AUC of its per-sample loss, of its (negated) fused "
              "and global diagonal similarity for the noisy pairs (0.5 = no information); mean ± std over seeds. "
              "w = the ALR weight.", ""]
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
         "failed": failed, "rules": RULES, "table": table, "comparisons": comparisons,
         "selection_rules": {"rules": SELECTION_RULES, "effect": effect, "differences": rule_differences}},
        indent=2) + "\n")
    return docs_dir / "ablation.md"
