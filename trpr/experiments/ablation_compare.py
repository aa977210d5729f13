"""The fair ablation's two model-selection rules and its paired comparisons (issue 23).

Selection rules (each gives one table; neither changes what the trainer saved):
    trainer    test_metrics.json of best/, chosen by the trainer on val R@1 of the variant's eval.select_row
               (the ensemble controls: ensemble_test_metrics.json of the two best/ models A)
    reference  the reference code's rule max(GE, FS): per run, the epoch whose val max(R@1 of <M>/GE, R@1 of
               <M>/FS) is highest (M = the model of the variant's select_row, A or A+B; the first such epoch
               wins ties), and that epoch's "test" rows of metrics.jsonl (eval.record_test). Not defined for
               the ensemble controls: the per-epoch test rows of a run hold its own A and B, never A + A'.

Comparisons (`COMPARISONS`, data): R@1 of one variant's row minus R@1 of another variant's row, paired by
seed over the seeds both variants finished; `verdict` says whether a component earns its place.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

RULES = {"trainer": "trainer's rule (best/ on val R@1 of the variant's eval.select_row)",
         "reference": "reference rule max(GE, FS) (the epoch with the best val max(R@1 of M/GE, M/FS))"}
EARNS, HURTS, NOT_SHOWN = "earns its place", "hurts", "not shown"


@dataclass(frozen=True)
class Comparison:
    """R@1 of `variant`'s table row `row` minus R@1 of `baseline`'s row `baseline_row` (row labels of
    ablation_plan.VARIANTS' `rows`), per seed."""
    name: str
    question: str
    variant: str
    row: str
    baseline: str
    baseline_row: str


COMPARISONS = (
    Comparison("fused_ge_fs-baseline", "fused representation (GE+FS score) over the global embedding",
               "fused", "A/GE+FS", "baseline", "A/GE"),
    Comparison("fused_fs-baseline", "fused representation (FS score alone) over the global embedding",
               "fused", "A/FS", "baseline", "A/GE"),
    Comparison("alr_hard-fused", "ALR hard selection (one model) over no ALR", "alr_hard", "A/FS", "fused", "A/FS"),
    Comparison("alr-fused", "ALR soft weights (one model) over no ALR", "alr", "A/FS", "fused", "A/FS"),
    Comparison("full_hard-alr_hard", "reciprocal pair (hard selection) over one hard-selection model",
               "full_hard", "A+B/FS", "alr_hard", "A/FS"),
    Comparison("full_hard-ensemble_hard", "reciprocal pair over two independent hard-selection models, ensembled",
               "full_hard", "A+B/FS", "ensemble_hard", "A+A'/FS"),
    Comparison("full-alr", "reciprocal pair (soft weights) over one soft-ALR model", "full", "A+B/FS", "alr", "A/FS"),
    Comparison("full-ensemble", "reciprocal pair over two independent soft-ALR models, ensembled",
               "full", "A+B/FS", "ensemble", "A+A'/FS"),
    Comparison("fused_ref-fused", "image branch as the reference code (all tokens + CLS) over top-k patches",
               "fused_ref", "A/FS", "fused", "A/FS"),
    Comparison("fused_all-fused", "image branch over all patches over top-k patches",
               "fused_all", "A/FS", "fused", "A/FS"),
    Comparison("head_warmup-fused", "one head warm-up epoch (backbone frozen) over none",
               "head_warmup", "A/FS", "fused", "A/FS"),
    Comparison("frozen-fused", "frozen backbone over fine-tuned backbone", "frozen", "A/FS", "fused", "A/FS"),
    # added after the first 108 runs (issue 23's open questions): the method's own score row, and what the pass scores
    Comparison("alr_hard-fused_ge_fs", "ALR hard selection (one model) over no ALR, on the GE+FS score",
               "alr_hard", "A/GE+FS", "fused", "A/GE+FS"),
    Comparison("alr_hard_global-alr_hard", "hard selection scored on the global similarity over the fused one",
               "alr_hard_global", "A/FS", "alr_hard", "A/FS"),
    Comparison("alr_hard_global-fused", "ALR hard selection scored on the global similarity over no ALR",
               "alr_hard_global", "A/FS", "fused", "A/FS"),
    Comparison("alr_hard_global-fused_ge_fs", "ALR hard selection scored on the global similarity over no ALR, "
               "on the GE+FS score", "alr_hard_global", "A/GE+FS", "fused", "A/GE+FS"),
    Comparison("full_hard_global-full_hard", "reciprocal pair with hard selection: global over fused scoring",
               "full_hard_global", "A+B/FS", "full_hard", "A+B/FS"),
    Comparison("full_hard_global-alr_hard_global", "reciprocal pair over one model, both hard selection scored "
               "on the global similarity", "full_hard_global", "A+B/FS", "alr_hard_global", "A/FS"),
    Comparison("full_hard_global-ensemble_hard_global", "reciprocal pair over two independent models, both hard "
               "selection scored on the global similarity", "full_hard_global", "A+B/FS", "ensemble_hard_global",
               "A+A'/FS"),
    Comparison("alr_hard_views-alr_hard", "hard selection scored on augmented views (reference) over eval inputs",
               "alr_hard_views", "A/FS", "alr_hard", "A/FS"),
    Comparison("alr_hard_trl_ref-alr_hard", "TRL temperature as the reference (tau = margin) over tau",
               "alr_hard_trl_ref", "A/FS", "alr_hard", "A/FS"),
    Comparison("alr_hard_global_trl_ref-alr_hard_global", "TRL temperature as the reference over tau, with hard "
               "selection scored on the global similarity", "alr_hard_global_trl_ref", "A/FS", "alr_hard_global",
               "A/FS"),
    Comparison("full_hard_global_trl_ref-full_hard_global", "TRL temperature as the reference over tau, pair with "
               "hard selection scored on the global similarity", "full_hard_global_trl_ref", "A+B/FS",
               "full_hard_global", "A+B/FS"),
    Comparison("full_hard_global_trl_ref-fused_ge_fs", "the noisy recipes' ALR (pair, hard, global, reference TRL "
               "temperature) over no ALR, on the GE+FS score", "full_hard_global_trl_ref", "A+B/GE+FS", "fused",
               "A/GE+FS"),
    Comparison("full_hard_global_trl_ref-baseline", "the noisy recipes' method (pair, hard, global, reference TRL "
               "temperature, GE+FS) over the fine-tuned global baseline", "full_hard_global_trl_ref", "A+B/GE+FS",
               "baseline", "A/GE"),
    Comparison("full_hard_global_trl_ref-ensemble_hard_global_trl_ref", "reciprocal pair over two independent "
               "models, both with the noisy recipes' ALR", "full_hard_global_trl_ref", "A+B/FS",
               "ensemble_hard_global_trl_ref", "A+A'/FS"),
    Comparison("alr_hard_gmm_ref-alr_hard", "mixture settings as the reference (10 / 1e-2 / 5e-4) over RDE's rule",
               "alr_hard_gmm_ref", "A/FS", "alr_hard", "A/FS"),
)


def reference_rule(select_row: str) -> str:
    """The reference rule of a variant with trainer row `select_row`: "A+B/FS" -> "max(A+B/GE, A+B/FS)"."""
    model = select_row.split("/", 1)[0]
    return f"max({model}/GE, {model}/FS)"


def reference_epoch(records: list[dict], rule: str) -> dict | None:
    """The metrics.jsonl record (with "val" and "test") whose val score under `rule` (modeling.pair.selection_r1)
    is highest, the first one on ties; None when no record has both."""
    from trpr.modeling.pair import selection_r1

    best, best_score = None, None
    for record in records:
        if "val" not in record or "test" not in record:
            continue
        score = selection_r1(record["val"], rule)
        if best_score is None or score > best_score:
            best, best_score = record, score
    return best


def read_records(folder: Path) -> list[dict]:
    """The epoch records of a run's metrics.jsonl (blank lines skipped; [] when there is none)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def selected_rows(run, records: list[dict]) -> dict[str, tuple[dict, int | None]]:
    """{rule: (test rows {key: {"R1", "mAP", ...}}, epoch)} of one finished run (ablation_plan.Run) under each
    selection rule that applies to it (see the module docstring)."""
    test = json.loads(run.metrics_file.read_text())
    chosen = {"trainer": (test, records[-1].get("best_epoch") if records else None)}
    if run.partner is None:
        record = reference_epoch(records, reference_rule(run.variant.select_row))
        if record is not None:
            chosen["reference"] = (record["test"], record["epoch"])
    return chosen


def verdict(differences: list[float]) -> str:
    """EARNS when at least 2 seeds, mean > 2 std (sample std) and every difference > 0; HURTS for the mirror
    case (mean < -2 std, every difference < 0); NOT_SHOWN otherwise."""
    if len(differences) < 2:
        return NOT_SHOWN
    mean, std = statistics.fmean(differences), statistics.stdev(differences)
    if mean > 2 * std and all(d > 0 for d in differences):
        return EARNS
    if mean < -2 * std and all(d < 0 for d in differences):
        return HURTS
    return NOT_SHOWN


def paired_difference(table: dict, comparison: Comparison, condition: str, rule: str) -> dict:
    """One comparison in one condition under one rule, from `table` (ablation_report.collect): {"seeds",
    "differences" (R@1 points, variant minus baseline, per seed), "mean", "std" (None with one seed),
    "verdict"}, or {"skipped": reason} when a side was not run or has no row under the rule."""
    sides = []
    for name, label in ((comparison.variant, comparison.row), (comparison.baseline, comparison.baseline_row)):
        cell = table.get(name, {}).get(condition)
        if not cell or not cell.get("finished_seeds"):
            return {"skipped": f"{name} not run"}
        row = cell.get(rule, {}).get(label)
        if row is None:
            return {"skipped": f"{name}: no {label} row under this rule"}
        sides.append(dict(zip(row["seeds"], row["R1"])))
    seeds = sorted(set(sides[0]) & set(sides[1]))
    if not seeds:
        return {"skipped": "no seed finished in both"}
    return summarise(seeds, [sides[0][seed] - sides[1][seed] for seed in seeds])


def summarise(seeds: list[int], differences: list[float]) -> dict:
    """{"seeds", "differences", "mean", "std" (sample std; None with one seed), "verdict"} of paired differences."""
    return {"seeds": seeds, "differences": differences, "mean": statistics.fmean(differences),
            "std": statistics.stdev(differences) if len(differences) > 1 else None, "verdict": verdict(differences)}


def compare_all(table: dict, conditions, rules=tuple(RULES)) -> list[dict]:
    """Every comparison of COMPARISONS in every condition under every rule: [{"name", "question", "variant",
    "row", "baseline", "baseline_row", "condition", "rule", **paired_difference}]."""
    return [{"name": c.name, "question": c.question, "variant": c.variant, "row": c.row, "baseline": c.baseline,
             "baseline_row": c.baseline_row, "condition": condition, "rule": rule,
             **paired_difference(table, c, condition, rule)}
            for rule in rules for c in COMPARISONS for condition in conditions]


# ------------------------------------------------------------------ deviation 7: which epoch to keep
SELECTION_RULES = {"fixed": "the reported row's own val R@1 (eval.select_row = that row)",
                   "reference": "max(GE, FS): the epoch with the best val max(R@1 of M/GE, M/FS)",
                   "last": "the last epoch (no selection)"}


def selection_rule_effect(runs) -> dict:
    """Test R@1 of each run's reported score row, M/GE+FS (M = A, or A+B for the pair variants), at the epoch
    each rule of SELECTION_RULES keeps, from the run's metrics.jsonl (val and test rows of every epoch:
    eval.record_test). Runs without a GE+FS row (the baseline), the ensemble controls and runs without
    per-epoch test rows are left out.

    Returns {variant: {condition: {"seeds": [int], "row": "A/GE+FS", rule: [R@1 per seed], "epochs": {rule:
    [epoch per seed]}}}}."""
    effect: dict = {}
    for run in runs:
        if run.partner is not None or not run.trained:
            continue
        model = run.variant.select_row.split("/", 1)[0]
        row = f"{model}/GE+FS"
        if row not in dict(run.variant.rows).values():
            continue
        records = [r for r in read_records(run.folder) if "val" in r and "test" in r and row in r["test"]]
        if not records:
            continue
        rules = {"fixed": row, "reference": reference_rule(run.variant.select_row)}
        chosen = {name: reference_epoch(records, rule) for name, rule in rules.items()}
        chosen["last"] = records[-1]
        cell = effect.setdefault(run.variant.name, {}).setdefault(
            run.condition, {"seeds": [], "row": row, **{name: [] for name in SELECTION_RULES},
                            "epochs": {name: [] for name in SELECTION_RULES}})
        cell["seeds"].append(run.seed)
        for name, record in chosen.items():
            cell[name].append(record["test"][row]["R1"])
            cell["epochs"][name].append(record["epoch"])
    return effect


def selection_rule_differences(effect: dict) -> list[dict]:
    """Per (variant, condition) of `selection_rule_effect`: the paired difference fixed − reference (R@1 of
    the reported row, per seed) with its mean, std and verdict ("earns its place" = the fixed row keeps the
    better epoch)."""
    results = []
    for variant, conditions in effect.items():
        for condition, cell in conditions.items():
            differences = [a - b for a, b in zip(cell["fixed"], cell["reference"])]
            results.append({"variant": variant, "condition": condition, "row": cell["row"],
                            **summarise(cell["seeds"], differences)})
    return results
