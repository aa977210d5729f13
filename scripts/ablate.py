"""Ablation sweep of 3RTPR (issue 7): which part earns its place, on clean and noisy synth-pedes.

Runs `train_3rtpr.py --final-test` once per (variant, condition, seed) as a subprocess, then writes the
table (mean ± std over seeds of test R@1 and mAP), the per-epoch ALR noisy-pair detection figures of the
noisy runs and the plots into the docs folder:

    .venv/bin/python scripts/ablate.py --jobs 2 --epochs 8 --seeds 0 1 2
    .venv/bin/python scripts/ablate.py --report-only          # only rebuild the table from finished runs

Variants (each adds one part to the previous one):
  baseline  global embedding (model.select_ratio 0), ALR off        -> row A/FS (= A/GE when select_ratio 0)
  fused     + fused representation (select_ratio from the recipe)   -> row A/FS
  alr       + ALR with model A's own consensus (alr.models 1)       -> row A/FS
  full      + reciprocal pair: two-model consensus (alr.models 2)   -> rows A/FS and A+B/FS
The trainer always trains two models, but with ALR off or alr.models 1 model A never sees B, so A's row
is the one-model result. Model selection is the trainer's (best/ on val R@1 of eval.select_row: A/FS for
the one-model variants, A+B/FS for the full method); the reported numbers are the TEST split's.

Resumable: a run with test_metrics.json is skipped; a run interrupted after a finished epoch is resumed
(`--resume`); one interrupted before any finished epoch is started again. Runs are ordered seed-major,
so one complete seed of every cell exists before the second seed starts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
METRICS = ("R1", "mAP")


@dataclass(frozen=True)
class Variant:
    """One row group of the table: the trainer overrides and the evaluate_pair rows it reports."""
    name: str
    label: str
    overrides: tuple[tuple[str, str], ...]
    rows: tuple[tuple[str, str], ...]  # (row label in the table, evaluate_pair key)
    select_row: str


VARIANTS = {
    "baseline": Variant("baseline", "CLIP baseline: global embedding, one model, no ALR",
                        (("model.select_ratio", "0.0"), ("alr.enabled", "false")),
                        (("A", "A/FS"),), "A/FS"),
    "fused": Variant("fused", "+ fused representation",
                     (("alr.enabled", "false"),), (("A", "A/FS"),), "A/FS"),
    "alr": Variant("alr", "+ ALR (model A's own consensus)",
                   (("alr.enabled", "true"), ("alr.models", "1")), (("A", "A/FS"),), "A/FS"),
    "full": Variant("full", "+ reciprocal pair (full 3RTPR)",
                    (("alr.enabled", "true"), ("alr.models", "2")),
                    (("A", "A/FS"), ("A+B", "A+B/FS")), "A+B/FS"),
}
CONDITIONS = {"clean": "0.0", "noisy": "0.5"}
CONDITION_LABELS = {"clean": "clean", "noisy": "50% noisy correspondence"}


@dataclass
class Run:
    variant: Variant
    condition: str
    seed: int
    folder: Path
    command: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.variant.name}-{self.condition}-seed{self.seed}"

    @property
    def finished(self) -> bool:
        return (self.folder / "test_metrics.json").is_file()

    def check_same_command(self) -> None:
        """A run folder written by a different command (other epochs, --set, config) is not this run."""
        recorded = self.folder / "command.txt"
        if not recorded.is_file():
            return
        previous = recorded.read_text().split()
        if "--resume" in previous:
            at = previous.index("--resume")
            previous = previous[:at] + previous[at + 2:]
        if previous != self.command:
            raise SystemExit(f"ablate: {recorded} holds another command than this sweep plans for {self.name}:\n"
                             f"  recorded: {' '.join(previous)}\n  planned:  {' '.join(self.command)}\n"
                             f"use another --runs-dir (or delete that run folder)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/synth-pedes.yaml", help="recipe every run starts from")
    parser.add_argument("--runs-dir", default="runs/ablation", help="one run folder per (variant, condition, seed)")
    parser.add_argument("--docs-dir", default="docs/results", help="where ablation.md/.json and the PNGs go")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs of every run (default: the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads per run (default: CPU cores // jobs, at least 1)")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an extra trainer override for every run, e.g. --set loss.lambda_sdm=1.0 (repeatable)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; rebuild the report")
    parser.add_argument("--diagnose", nargs="+", metavar="RUN_DIR", default=None,
                        help="train nothing: how well each run's best/ models separate the noisy training pairs "
                             "(ROC AUC of the per-sample loss and of the fused diagonal similarity, on the training "
                             "set with --diagnose-noise-rate of noise from the run's seed) -> "
                             "DOCS_DIR/alr_separability.md")
    parser.add_argument("--diagnose-noise-rate", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1 (got {args.jobs})")
    for item in args.extra:
        if "=" not in item or not item.split("=", 1)[0].strip():
            parser.error(f"--set {item!r}: expected SECTION.KEY=VALUE")
    return args


def plan_runs(args) -> list[Run]:
    """Every run of the sweep, seed-major (seed, then condition, then variant)."""
    runs_dir = Path(args.runs_dir).resolve()
    runs = []
    for seed in args.seeds:
        for condition in args.conditions:
            for name in args.variants:
                variant = VARIANTS[name]
                run = Run(variant, condition, seed, runs_dir / f"{name}-{condition}-seed{seed}")
                run.command = train_command(run, args)
                run.check_same_command()
                runs.append(run)
    return runs


def train_command(run: Run, args) -> list[str]:
    """The trainer command line of one run (without --resume)."""
    overrides = [("seed", str(run.seed)), ("data.noise_rate", CONDITIONS[run.condition]),
                 ("eval.select_row", run.variant.select_row), ("logging.trackers", "[]")]
    if args.epochs is not None:
        overrides.append(("train.epochs", str(args.epochs)))
    overrides += list(run.variant.overrides)
    overrides += [tuple(item.split("=", 1)) for item in args.extra]
    command = [sys.executable, "train_3rtpr.py", "--config", args.config]
    for key, value in overrides:
        command += [f"--{key.strip()}", value.strip()]
    return command + ["--output-dir", str(run.folder), "--final-test"]


def run_environment(threads: int, cache: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    env.setdefault("TRPR_CACHE", str(cache))
    return env


def execute(run: Run, env: dict) -> tuple[Run, int, float]:
    """Trains one run (resuming when it has a finished epoch); its output goes to <run>/train.log."""
    command = list(run.command)
    if (run.folder / "last").is_dir():
        command += ["--resume", str(run.folder)]
    elif run.folder.exists():
        shutil.rmtree(run.folder)  # started but no finished epoch: start again
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "command.txt").write_text(" ".join(command) + "\n")
    start = time.time()
    with open(run.folder / "train.log", "a") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - start
    if code == 0:
        (run.folder / "wall_time_s.txt").write_text(f"{seconds:.1f}\n")
    return run, code, seconds


def train_all(runs: list[Run], args) -> list[str]:
    """Trains the unfinished runs, `args.jobs` at a time. Returns the names of failed runs."""
    todo = [run for run in runs if not run.finished]
    print(f"ablation: {len(runs) - len(todo)} of {len(runs)} runs already finished, {len(todo)} to train")
    if not todo:
        return []
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    cache = Path(args.runs_dir).resolve() / "cache"
    env = run_environment(threads, cache)
    prepare_dataset(args, env)
    failed = []
    progress = tqdm(total=len(todo), desc="ablation runs", unit="run")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on their subprocess
        futures = [pool.submit(execute, run, env) for run in todo]
        for future in as_completed(futures):
            run, code, seconds = future.result()
            progress.update(1)
            status = "ok" if code == 0 else f"FAILED (exit {code}, see {run.folder / 'train.log'})"
            progress.write(f"{run.name}: {status}, {seconds / 60:.1f} min")
            if code != 0:
                failed.append(run.name)
    progress.close()
    return failed


def prepare_dataset(args, env: dict) -> None:
    """Generates the synthetic dataset once, before parallel runs could race to write it."""
    import yaml

    recipe = yaml.safe_load((REPO / args.config).read_text()) or {}
    dataset = (recipe.get("data") or {}).get("dataset", "")
    for item in args.extra:  # --set data.dataset=... wins over the recipe
        key, value = item.split("=", 1)
        if key.strip() == "data.dataset":
            dataset = value.strip()
    if not str(dataset).startswith("synth-pedes"):
        return
    code = ("import data; data.load_benchmark(" + repr(dataset) + ")")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


# ============================================================================================ report
def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "not run"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f} (1 seed)"


def collect(runs: list[Run]) -> dict:
    """{variant: {condition: {row label: {"seeds": [...], "R1": [...], "mAP": [...], "best_epochs": [...]}}}}
    from the finished runs' test_metrics.json, plus the ALR detection figures per epoch of each run."""
    table: dict = {}
    for run in runs:
        if not run.finished:
            continue
        test = json.loads((run.folder / "test_metrics.json").read_text())
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
        ensemble = table.setdefault("_ensemble", {}).setdefault(run.variant.name, {}).setdefault(
            run.condition, {"seeds": [], "R1": [], "mAP": []})
        ensemble["seeds"].append(run.seed)
        for metric in METRICS:
            ensemble[metric].append(test["A+B/FS"][metric])
        alr = [{"epoch": r["epoch"], **r["alr"].get("noise_detection", {}),
                "mean_weight_noisy": r["alr"].get("mean_weight_noisy"),
                "mean_weight_clean": r["alr"].get("mean_weight_clean"),
                "consensus_counts": r["alr"].get("consensus_counts")} for r in records if "alr" in r]
        if alr:
            cell.setdefault("_alr", {})[str(run.seed)] = alr
    return table


def table_markdown(table: dict, variants: list[str], conditions: list[str]) -> str:
    header = "| variant | model | " + " | ".join(
        f"{CONDITION_LABELS[c]}: R@1 | {CONDITION_LABELS[c]}: mAP | seeds" for c in conditions) + " |"
    lines = [header, "|" + "---|" * (2 + 3 * len(conditions))]
    for name in variants:
        variant = VARIANTS[name]
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


def ensemble_markdown(table: dict, variants: list[str], conditions: list[str]) -> str:
    """A+B/FS of every variant's run: what ensembling the two trained models gives, with or without
    reciprocal learning (for variants 1-3 B never influenced A; this is not one of the method's rows)."""
    lines = ["| variant | " + " | ".join(f"{CONDITION_LABELS[c]}: A+B R@1 | {CONDITION_LABELS[c]}: A+B mAP"
                                          for c in conditions) + " |", "|---|" + "---|" * (2 * len(conditions))]
    for name in variants:
        cells = []
        for condition in conditions:
            row = table.get("_ensemble", {}).get(name, {}).get(condition)
            cells += [format_cell(row["R1"]), format_cell(row["mAP"])] if row else ["not run", "not run"]
        lines.append(f"| {VARIANTS[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alr_markdown(table: dict, variants: list[str]) -> str:
    """Per-epoch noisy-pair detection (noisy = no model calls the pair clean), mean over seeds."""
    blocks = []
    for name in variants:
        per_seed = table.get(name, {}).get("noisy", {}).get("_alr")
        if not per_seed:
            continue
        epochs = sorted({entry["epoch"] for entries in per_seed.values() for entry in entries})
        lines = [f"**{VARIANTS[name].label}** (seeds {', '.join(sorted(per_seed))})", "",
                 "| epoch | precision (%) | recall (%) | F1 (%) | mean w, noisy pairs | mean w, clean pairs | seeds |",
                 "|---|---|---|---|---|---|---|"]
        for epoch in epochs:
            entries = [e for entries in per_seed.values() for e in entries if e["epoch"] == epoch]
            cells = []
            for metric in ("precision", "recall", "f1", "mean_weight_noisy", "mean_weight_clean"):
                values = [e[metric] for e in entries if e.get(metric) is not None]
                digits = 3 if metric.startswith("mean_weight") else 1
                cells.append(format_cell(values, digits) if values else "–")
            lines.append(f"| {epoch} | " + " | ".join(cells) + f" | {len(entries)} |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "(no noisy run with ALR has finished)"


def plot_table(table: dict, variants: list[str], conditions: list[str], path: Path) -> None:
    """Bar chart of test R@1 (mean ± std over seeds) per variant row and condition."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, bars = [], {c: ([], []) for c in conditions}
    for name in variants:
        for label, _ in VARIANTS[name].rows:
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
                 label=CONDITION_LABELS[condition])
    axis.set_xticks(range(len(labels)), labels, fontsize=8)
    axis.set_ylabel("test R@1 (%)")
    axis.set_title("synth-pedes ablation (mean ± std over seeds)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_alr(table: dict, variants: list[str], path: Path) -> bool:
    """Per-epoch noisy-pair detection precision / recall of the noisy runs (mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {name: table.get(name, {}).get("noisy", {}).get("_alr") for name in variants}
    series = {name: per_seed for name, per_seed in series.items() if per_seed}
    if not series:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100, sharey=True)
    for name, per_seed in series.items():
        epochs = sorted({e["epoch"] for entries in per_seed.values() for e in entries})
        for axis, metric in zip(axes, ("precision", "recall")):
            means = [statistics.fmean([e[metric] for entries in per_seed.values() for e in entries
                                       if e["epoch"] == epoch and metric in e]) for epoch in epochs]
            axis.plot(epochs, means, marker="o", label=VARIANTS[name].label)
    for axis, metric in zip(axes, ("precision", "recall")):
        axis.set_xlabel("epoch")
        axis.set_title(f"noisy-pair detection {metric}")
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def copy_histogram(runs: list[Run], docs_dir: Path) -> str | None:
    """Copies the last ALR weight histogram of the first finished noisy full run (else any ALR run)."""
    ordered = sorted((r for r in runs if r.finished),
                     key=lambda r: (r.variant.name != "full", r.condition != "noisy", r.seed))
    for run in ordered:
        pngs = sorted(run.folder.glob("alr_weights_epoch*.png"), key=lambda p: int(p.stem.split("epoch")[1]))
        if pngs:
            target = docs_dir / f"alr_weights_{run.name}_{pngs[-1].stem.split('_')[-1]}.png"
            shutil.copyfile(pngs[-1], target)
            return target.name
    return None


def write_report(runs: list[Run], args, failed: list[str]) -> Path:
    docs_dir = Path(args.docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    table = collect(runs)
    plot_table(table, args.variants, args.conditions, docs_dir / "ablation_r1.png")
    has_alr_plot = plot_alr(table, args.variants, docs_dir / "alr_detection.png")
    histogram = copy_histogram(runs, docs_dir)
    sweep = ["scripts/ablate.py", "--config", args.config, "--seeds", *map(str, args.seeds),
             "--variants", *args.variants, "--conditions", *args.conditions]
    if args.epochs is not None:
        sweep += ["--epochs", str(args.epochs)]
    for item in args.extra:
        sweep += ["--set", item]
    wall = [float((r.folder / "wall_time_s.txt").read_text()) for r in runs
            if (r.folder / "wall_time_s.txt").is_file()]
    example = next((r for r in runs if r.finished), runs[0] if runs else None)
    lines = ["# synth-pedes ablation (written by scripts/ablate.py)", "",
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
    lines += [table_markdown(table, args.variants, args.conditions), "", "![test R@1](ablation_r1.png)", "",
              "## Ensemble A+B of the same runs (not a method row)", "",
              "Both models of every run, summed FS similarities. For the baseline, + fused and + ALR variants "
              "model B never influenced model A: the gain over A is plain two-model ensembling.", "",
              ensemble_markdown(table, args.variants, args.conditions), "",
              "## ALR noisy-pair detection per epoch (noisy runs)", "",
              "Predicted noisy = no model calls the pair clean (consensus 0); precision/recall against the "
              "generator's `noisy` flag; mean ± std over seeds. w = the ALR weight.", "",
              alr_markdown(table, args.variants), ""]
    if has_alr_plot:
        lines += ["![ALR detection](alr_detection.png)", ""]
    if histogram:
        lines += [f"ALR weight histogram of one run (last epoch): ![ALR weights]({histogram})", ""]
    (docs_dir / "ablation.md").write_text("\n".join(lines))
    (docs_dir / "ablation.json").write_text(json.dumps(
        {"command": sweep, "runs_planned": len(runs), "runs_finished": sum(r.finished for r in runs),
         "failed": failed, "table": table}, indent=2) + "\n")
    return docs_dir / "ablation.md"


# ========================================================================================= diagnosis
def separability(run_dir: Path, noise_rate: float) -> dict:
    """Encodes the (noisy) training set with a run's best/ pair, un-augmented, in index-order batches of
    train.batch_size as the ALR pass does, and scores how well each signal ALR uses tells noisy pairs
    from clean ones: ROC AUC (0.5 = no information) of each model's per-sample loss (noisy = high) and
    of the fused diagonal cosine (noisy = low); also the mean cosine of clean pairs, noisy pairs and
    non-matching pairs of the batch (other identities)."""
    import torch
    import yaml
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader

    import data
    import modeling
    from data.transforms import get_tokenizer
    from engine import score_samples
    from modeling.losses import TrainingLoss
    from modeling.run_folder import selected_checkpoint

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    chosen = selected_checkpoint(run_dir)
    pair = modeling.ReciprocalPair.from_pretrained(chosen).eval()
    splits = data.load_benchmark(config["data"]["dataset"], root=config["data"]["root"], noise_rate=noise_rate,
                                 seed=config["seed"])
    train = splits["train"]
    noisy = torch.tensor(train["noisy"], dtype=torch.bool)
    views = data.TrainViews(train, get_tokenizer(), config["data"]["image_size"], num_views=1, augment=False)
    loader = DataLoader(views, batch_size=config["train"]["batch_size"], shuffle=False)
    loss_term = TrainingLoss.from_config(config["loss"]).alr_term
    losses = {"A": [], "B": []}
    diag, off_diag = {"A": [], "B": []}, {"A": [], "B": []}
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"separability {run_dir.name}", leave=False):
            for name, model in zip(("A", "B"), pair.models):
                scores = score_samples(model, batch, loss_term, "cpu")
                losses[name].append(scores.losses)
                normalize = torch.nn.functional.normalize
                cosines = normalize(scores.text, dim=-1) @ normalize(scores.image, dim=-1).T
                diag[name].append(cosines.diagonal())
                other = batch["pid"][:, None] != batch["pid"][None, :]
                off_diag[name].append(cosines[other])
    truth = noisy.numpy()
    result = {"run": run_dir.name, "checkpoint": chosen.name, "noise_rate": noise_rate,
              "trained_noise_rate": config["data"]["noise_rate"]}
    for name in ("A", "B"):
        loss, cos = torch.cat(losses[name]).numpy(), torch.cat(diag[name]).numpy()
        result[name] = {"auc_loss": float(roc_auc_score(truth, loss)), "auc_similarity": float(roc_auc_score(truth, -cos)),
                        "cos_clean": float(cos[~truth].mean()), "cos_noisy": float(cos[truth].mean()),
                        "cos_other_identity": float(torch.cat(off_diag[name]).mean())}
    return result


def write_separability(results: list[dict], docs_dir: Path) -> Path:
    lines = ["| run (trained at noise rate) | model | AUC of loss | AUC of −similarity | cos clean pairs | "
             "cos noisy pairs | cos other identities |", "|---|---|---|---|---|---|---|"]
    for result in results:
        for name in ("A", "B"):
            r = result[name]
            lines.append(f"| {result['run']} ({result['trained_noise_rate']}) | {name} | {r['auc_loss']:.3f} | "
                         f"{r['auc_similarity']:.3f} | {r['cos_clean']:.3f} | {r['cos_noisy']:.3f} | "
                         f"{r['cos_other_identity']:.3f} |")
    docs_dir.mkdir(parents=True, exist_ok=True)
    path = docs_dir / "alr_separability.md"
    noise = sorted({r["noise_rate"] for r in results})
    path.write_text(f"Training set with {', '.join(map(str, noise))} noisy correspondence (the run's seed), "
                    f"each run's best/ models, un-augmented, batches in index order as in the ALR pass. "
                    f"AUC 0.5 = the signal carries no information about which pairs are noisy.\n\n"
                    + "\n".join(lines) + "\n")
    (docs_dir / "alr_separability.json").write_text(json.dumps(results, indent=2) + "\n")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.diagnose:
        results = [separability(Path(run).resolve(), args.diagnose_noise_rate) for run in args.diagnose]
        print(write_separability(results, Path(args.docs_dir)).read_text())
        return 0
    runs = plan_runs(args)
    failed = [] if args.report_only else train_all(runs, args)
    report = write_report(runs, args, failed)
    print(f"ablation: report written to {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
