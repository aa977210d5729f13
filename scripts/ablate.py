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

Proxy mode (`--proxy`): the same table fine-tuned from the pretrained proxy CLIP (scripts/pretrain_proxy.py)
with the paper's recipes: trpr/configs/proxy-clean.yaml (SDM) for the clean condition, trpr/configs/proxy-noisy.yaml
(TRL) for the noisy ones (50 % and 80 %), every run given `--model.backbone <proxy folder>` (a config cannot
hold that cache-dependent path; `--backbone DIR` picks another folder, `--random-init` the same
architecture untrained, as the control). Two more variants:
  fused_all + fused representation with the image branch over all patches (model.image_tokens all)
  ensemble  control for reciprocal learning: a second, independent "+ ALR" run (seed + 1000, the same
            noisy training set through --data.noise_file) whose model A is ensembled with model A of
            the "+ ALR" run of the same seed (row A+A'/FS; evaluated by this script on the test split)
    .venv/bin/python scripts/ablate.py --proxy --jobs 2 --threads 1      # -> runs/ablation_proxy, docs/results/proxy
The report then also has the ALR detection per epoch of every noisy condition and one figure of the
last-epoch ALR weights of clean vs noisy training pairs (alr_weight_distributions.png).

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
    "fused_all": Variant("fused_all", "+ fused representation, image branch over all patches",
                         (("alr.enabled", "false"), ("model.image_tokens", "all")), (("A", "A/FS"),), "A/FS"),
    "ensemble": Variant("ensemble", "control: two independent + ALR models, ensembled",
                        (("alr.enabled", "true"), ("alr.models", "1")), (("A+A'", "A+B/FS"),), "A/FS"),
}
DEFAULT_VARIANTS = ["baseline", "fused", "alr", "full"]
PROXY_VARIANTS = ["baseline", "fused", "fused_all", "alr", "full", "ensemble"]
CONDITIONS = {"clean": "0.0", "noisy": "0.5", "noisy80": "0.8"}
CONDITION_LABELS = {"clean": "clean", "noisy": "50% noisy correspondence", "noisy80": "80% noisy correspondence"}
DEFAULT_CONDITIONS = ["clean", "noisy"]
PROXY_CONFIGS = {"clean": "proxy-clean", "noisy": "proxy-noisy"}
TWIN_SEED_OFFSET = 1000  # the ensemble control's second model: seed + 1000
ENSEMBLE_METRICS = "ensemble_test_metrics.json"


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

    partner: "Run | None" = None  # ensemble control: the "+ ALR" run whose model A joins this run's A

    @property
    def trained(self) -> bool:
        return (self.folder / "test_metrics.json").is_file()

    @property
    def finished(self) -> bool:
        """Trained (and, for the ensemble control, its ensemble evaluated)."""
        return self.trained and (self.partner is None or (self.folder / ENSEMBLE_METRICS).is_file())

    @property
    def command_file(self) -> Path:
        """The trainer command of the run, beside its folder (the trainer wants a new run's folder empty)."""
        return self.folder.parent / f"{self.name}.command.txt"

    @property
    def log_file(self) -> Path:
        """The trainer's output, beside the run folder."""
        return self.folder.parent / f"{self.name}.log"

    @property
    def metrics_file(self) -> Path:
        """The test metrics the table reads (the ensemble's for the control)."""
        return self.folder / (ENSEMBLE_METRICS if self.partner is not None else "test_metrics.json")

    def check_same_command(self) -> None:
        """A run folder written by a different command (other epochs, --set, config) is not this run."""
        recorded = next((path for path in (self.command_file, self.folder / "command.txt") if path.is_file()), None)
        if recorded is None:
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
    parser.add_argument("--config", default=None,
                        help="recipe every run starts from (default synth-pedes; --proxy: "
                             "proxy-clean for clean runs, proxy-noisy for noisy ones)")
    parser.add_argument("--noisy-config", default=None, help="recipe of the noisy runs (default: --config)")
    parser.add_argument("--proxy", action="store_true",
                        help="fine-tune from the pretrained proxy CLIP with the proxy recipes; defaults become "
                             f"--variants {' '.join(PROXY_VARIANTS)} --conditions {' '.join(CONDITIONS)} "
                             "--runs-dir runs/ablation_proxy --docs-dir docs/results/proxy")
    parser.add_argument("--backbone", default=None, metavar="DIR",
                        help="model.backbone of every run (a transformers CLIP folder); --proxy: default the "
                             "cached proxy of scripts/pretrain_proxy.py's default settings")
    parser.add_argument("--random-init", action="store_true",
                        help="with --proxy: the proxy's architecture from random init instead (the control; "
                             "runs/ablation_proxy_random, docs/results/proxy_random_init)")
    parser.add_argument("--runs-dir", default=None, help="one run folder per (variant, condition, seed) "
                                                         "(default runs/ablation)")
    parser.add_argument("--docs-dir", default=None, help="where ablation.md/.json and the PNGs go (default docs/results)")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs of every run (default: the recipe's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                        help=f"default {' '.join(DEFAULT_VARIANTS)}")
    parser.add_argument("--conditions", nargs="+", default=None, choices=list(CONDITIONS),
                        help=f"default {' '.join(DEFAULT_CONDITIONS)}")
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
    if args.random_init and not args.proxy:
        parser.error("--random-init belongs to --proxy (the proxy's architecture, untrained)")
    if args.random_init and args.backbone:
        parser.error("--random-init and --backbone exclude each other")
    apply_mode_defaults(args)
    if "ensemble" in args.variants and "alr" not in args.variants:
        parser.error("the ensemble control pairs each run with the '+ ALR' run of the same seed: add --variants alr")
    return args


def apply_mode_defaults(args) -> None:
    """Fills the options left unset with the defaults of the from-scratch mode or of --proxy."""
    if not args.proxy:
        args.config = args.config or "synth-pedes"
        args.runs_dir = args.runs_dir or "runs/ablation"
        args.docs_dir = args.docs_dir or "docs/results"
        args.variants = args.variants or list(DEFAULT_VARIANTS)
        args.conditions = args.conditions or list(DEFAULT_CONDITIONS)
        return
    suffix = "_random" if args.random_init else ""
    args.noisy_config = args.noisy_config or (args.config or PROXY_CONFIGS["noisy"])
    args.config = args.config or PROXY_CONFIGS["clean"]
    args.runs_dir = args.runs_dir or f"runs/ablation_proxy{suffix}"
    args.docs_dir = args.docs_dir or ("docs/results/proxy_random_init" if args.random_init else "docs/results/proxy")
    args.variants = args.variants or list(PROXY_VARIANTS)
    args.conditions = args.conditions or list(CONDITIONS)
    if args.random_init:
        args.backbone = json.dumps(proxy_settings().architecture(), separators=(",", ":"))
    elif args.backbone is None:
        args.backbone = str(load_pretrain_proxy().proxy_folder(proxy_settings()))


def load_pretrain_proxy():
    """scripts/pretrain_proxy.py as a module."""
    import importlib.util

    if "pretrain_proxy" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pretrain_proxy", REPO / "scripts" / "pretrain_proxy.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["pretrain_proxy"] = module
        spec.loader.exec_module(module)
    return sys.modules["pretrain_proxy"]


def proxy_settings():
    """The default settings of the cached proxy (what `python scripts/pretrain_proxy.py` builds)."""
    return load_pretrain_proxy().ProxySettings()


def config_for(condition: str, args) -> str:
    """The recipe of one condition's runs."""
    return args.noisy_config if condition != "clean" and args.noisy_config else args.config


def noise_file_for(condition: str, seed: int, args) -> Path:
    """The noise permutation the ensemble control's second model trains with: the one the "+ ALR" run of
    the same (condition, seed) generates (written by prepare_dataset)."""
    return Path(args.runs_dir).resolve() / "noise" / f"{condition}-seed{seed}.npy"


def plan_runs(args) -> list[Run]:
    """Every run of the sweep, seed-major (seed, then condition, then variant)."""
    runs_dir = Path(args.runs_dir).resolve()
    runs = []
    for seed in args.seeds:
        for condition in args.conditions:
            planned = {}
            for name in args.variants:
                variant = VARIANTS[name]
                run = Run(variant, condition, seed, runs_dir / f"{name}-{condition}-seed{seed}")
                planned[name] = run
            if "ensemble" in planned:
                planned["ensemble"].partner = planned["alr"]
            for run in planned.values():
                run.command = train_command(run, args)
                run.check_same_command()
                runs.append(run)
    return runs


def train_command(run: Run, args) -> list[str]:
    """The trainer command line of one run (without --resume)."""
    seed, noise = run.seed, [("data.noise_rate", CONDITIONS[run.condition])]
    if run.partner is not None:  # the control's second model: another seed, the partner's noisy training set
        seed += TWIN_SEED_OFFSET
        if run.condition != "clean":
            noise = [("data.noise_rate", "0.0"), ("data.noise_file", str(noise_file_for(run.condition, run.seed, args)))]
    overrides = [("seed", str(seed)), *noise, ("eval.select_row", run.variant.select_row), ("logging.trackers", "[]")]
    if args.epochs is not None:
        overrides.append(("train.epochs", str(args.epochs)))
    if args.backbone is not None:
        overrides.append(("model.backbone", args.backbone))
    overrides += list(run.variant.overrides)
    overrides += [tuple(item.split("=", 1)) for item in args.extra]
    command = [sys.executable, "train_3rtpr.py", "--config", config_for(run.condition, args)]
    for key, value in overrides:
        command += [f"--{key.strip()}", value.strip()]
    return command + ["--output-dir", str(run.folder), "--final-test"]


def run_environment(threads: int, cache: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
    env.setdefault("TRPR_CACHE", str(cache))
    return env


def execute(run: Run, env: dict) -> tuple[Run, int, float]:
    """Trains one run (resuming when it has a finished epoch); its command and output go beside the run
    folder (<runs>/<name>.command.txt, <runs>/<name>.log): the trainer starts a new run only in an empty
    or new folder."""
    command = list(run.command)
    if (run.folder / "last").is_dir():
        command += ["--resume", str(run.folder)]
    elif run.folder.exists():
        shutil.rmtree(run.folder)  # started but no finished epoch: start again
    run.folder.parent.mkdir(parents=True, exist_ok=True)
    run.command_file.write_text(" ".join(command) + "\n")
    start = time.time()
    with open(run.log_file, "a") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - start
    if code == 0:
        (run.folder / "wall_time_s.txt").write_text(f"{seconds:.1f}\n")
    return run, code, seconds


def train_all(runs: list[Run], args) -> list[str]:
    """Trains the unfinished runs, `args.jobs` at a time, then evaluates the ensemble controls. Returns the
    names of failed runs."""
    todo = [run for run in runs if not run.trained]
    print(f"ablation: {len(runs) - len(todo)} of {len(runs)} runs already finished, {len(todo)} to train")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    env = run_environment(threads, Path(args.runs_dir).resolve() / "cache")
    if not todo:
        return evaluate_ensembles(runs, env, threads)
    if args.backbone is not None and not args.backbone.startswith("{") and not Path(args.backbone).is_dir():
        raise SystemExit(f"ablate: backbone folder {args.backbone} does not exist; build the proxy first "
                         f"(python scripts/pretrain_proxy.py, or make proxy) or pass --backbone DIR")
    prepare_dataset(runs, args, env)
    failed = []
    progress = tqdm(total=len(todo), desc="ablation runs", unit="run")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on their subprocess
        futures = [pool.submit(execute, run, env) for run in todo]
        for future in as_completed(futures):
            run, code, seconds = future.result()
            progress.update(1)
            status = "ok" if code == 0 else f"FAILED (exit {code}, see {run.log_file})"
            progress.write(f"{run.name}: {status}, {seconds / 60:.1f} min")
            if code != 0:
                failed.append(run.name)
    progress.close()
    return failed + evaluate_ensembles(runs, env, threads)


def recipe_dataset(config: str, args) -> str:
    """data.dataset of a recipe file (`--set data.dataset=...` wins)."""
    from trpr import configs

    dataset = configs.load_config(configs.resolve_recipe(config, relative_to=REPO))["data"]["dataset"]
    for item in args.extra:
        key, value = item.split("=", 1)
        if key.strip() == "data.dataset":
            dataset = value.strip()
    return str(dataset)


def prepare_dataset(runs: list[Run], args, env: dict) -> None:
    """Generates the synthetic dataset once, before parallel runs could race to write it, and writes the
    noise permutations the ensemble controls' second models train with (the ones the trainer generates
    for the partner "+ ALR" run: same dataset, rate and seed, same code)."""
    datasets = {recipe_dataset(config_for(condition, args), args) for condition in args.conditions}
    for dataset in sorted(d for d in datasets if d.startswith("synth-pedes")):
        code = ("from trpr import data; data.load_benchmark(" + repr(dataset) + ")")
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    for run in runs:
        if run.partner is None or run.condition == "clean" or run.trained:
            continue
        target = noise_file_for(run.condition, run.seed, args)
        if target.is_file():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        dataset = recipe_dataset(config_for(run.condition, args), args)
        code = (f"from trpr import data; data.load_benchmark({dataset!r}, noise_rate={CONDITIONS[run.condition]}, "
                f"seed={run.seed}, noise_out={str(target)!r})")
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


def evaluate_ensembles(runs: list[Run], env: dict, threads: int) -> list[str]:
    """For every trained ensemble control whose partner is trained: model A of the partner (+ ALR run) and
    model A of the control (best/, else last/) as one pair, evaluated on the test split ->
    <control>/ensemble_test_metrics.json (rows A/..., B/..., A+B/...; A+B/FS is the table's A+A'/FS).
    Returns the names of controls whose partner failed."""
    todo = [run for run in runs if run.partner is not None and run.trained and not run.finished]
    missing = [run.name for run in todo if not run.partner.trained]
    todo = [run for run in todo if run.partner.trained]
    if not todo:
        return missing
    import torch
    import yaml

    from trpr import data
    from trpr import modeling
    from trpr.data.transforms import get_tokenizer
    from trpr.evaluation import evaluate_pair
    from trpr.modeling.run_folder import selected_checkpoint

    torch.set_num_threads(threads)
    for run in tqdm(todo, desc="ensemble controls", unit="run"):
        config = yaml.safe_load((run.folder / "config.yaml").read_text())
        members = [selected_checkpoint(member.folder) for member in (run.partner, run)]
        pair = modeling.ReciprocalPair(*(modeling.ReciprocalPair.from_pretrained(folder).a for folder in members))
        splits = data.load_benchmark(config["data"]["dataset"], root=config["data"]["root"] or env["TRPR_CACHE"])
        metrics = evaluate_pair(pair, splits["test_gallery"], splits["test_queries"],
                                           tokenizer=get_tokenizer(), image_size=tuple(config["data"]["image_size"]),
                                           batch_size=config["eval"]["batch_size"])
        tmp = run.folder / (ENSEMBLE_METRICS + ".tmp")
        tmp.write_text(json.dumps({"members": [str(folder / "model_a") for folder in members], **metrics}, indent=2) + "\n")
        os.replace(tmp, run.folder / ENSEMBLE_METRICS)
    return missing


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
    for name in (v for v in variants if v != "ensemble"):
        cells = []
        for condition in conditions:
            row = table.get("_ensemble", {}).get(name, {}).get(condition)
            cells += [format_cell(row["R1"]), format_cell(row["mAP"])] if row else ["not run", "not run"]
        lines.append(f"| {VARIANTS[name].label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alr_markdown(table: dict, variants: list[str], condition: str = "noisy") -> str:
    """Per-epoch noisy-pair detection (noisy = no model calls the pair clean) of one noisy condition,
    mean over seeds."""
    from trpr.modeling.alr import FIT_OK

    blocks = []
    for name in variants:
        per_seed = table.get(name, {}).get(condition, {}).get("_alr")
        if not per_seed:
            continue
        epochs = sorted({entry["epoch"] for entries in per_seed.values() for entry in entries})
        lines = [f"**{VARIANTS[name].label}** (seeds {', '.join(sorted(per_seed))})", "",
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


def plot_alr(table: dict, variants: list[str], path: Path, conditions: tuple[str, ...] = ("noisy",),
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
                axis.plot(epochs, means, marker="o", label=VARIANTS[name].label)
        for axis, metric in zip(axes[row], metrics):
            axis.set_xlabel("epoch")
            axis.set_title(f"{CONDITION_LABELS[condition]}: {metric}" if len(grid) > 1 else f"noisy-pair detection {metric}",
                           fontsize=9)
        axes[row][0].set_ylabel("%")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def run_alr_weights(run: Run, root: Path) -> tuple | None:
    """(weights float [N], noisy bool [N]) of a noisy run's last ALR pass (last/training_state/alr_state.safetensors)
    and its training set's noisy flags (from the run's noise permutation), or None when either is missing."""
    import torch
    import yaml

    from trpr.modeling.run_folder import ALR_STATE_FILE, LAST_DIR, NOISE_PERMUTATION_FILE, STATE_DIR

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


def plot_weight_distributions(runs: list[Run], args, path: Path) -> bool:
    """One figure: histograms of the last-epoch ALR weights of clean vs noisy training pairs, pooled over
    seeds; rows = noisy conditions, columns = the variants with ALR. False when no run has them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    root = Path(os.environ.get("TRPR_CACHE") or Path(args.runs_dir).resolve() / "cache")
    cells: dict = {}
    for run in runs:
        if run.condition == "clean" or not run.trained or run.variant.name not in ("alr", "full", "ensemble"):
            continue
        found = run_alr_weights(run, root)
        if found is not None:
            cells.setdefault((run.condition, run.variant.name), []).append(found)
    if not cells:
        return False
    conditions = [c for c in args.conditions if any(key[0] == c for key in cells)]
    variants = [v for v in args.variants if any(key[1] == v for key in cells)]
    figure, axes = plt.subplots(len(conditions), len(variants), figsize=(4.2 * len(variants), 3.2 * len(conditions)),
                                dpi=100, squeeze=False)
    bins = np.linspace(0, 1, 41)
    for row, condition in enumerate(conditions):
        for column, name in enumerate(variants):
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
            axis.set_title(f"{VARIANTS[name].label}\n{CONDITION_LABELS[condition]}, {len(pieces)} seed(s)", fontsize=8)
            axis.set_xlabel("ALR weight w, last epoch")
            axis.legend(fontsize=7)
    axes[0][0].set_ylabel("training pairs")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def copy_histogram(runs: list[Run], docs_dir: Path) -> str | None:
    """Copies the ALR figure over the epochs (the trainer's alr_weights.png) of the first finished noisy full
    run (else any ALR run)."""
    from trpr.modeling.run_folder import ALR_WEIGHTS_FILE

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
    plot_table(table, args.variants, args.conditions, docs_dir / "ablation_r1.png")
    noisy_conditions = tuple(c for c in args.conditions if c != "clean")
    if args.proxy:
        has_alr_plot = plot_alr(table, args.variants, docs_dir / "alr_detection.png", noisy_conditions,
                                ("precision", "recall", "f1"))
        histogram = "alr_weight_distributions.png" if plot_weight_distributions(
            runs, args, docs_dir / "alr_weight_distributions.png") else None
    else:
        has_alr_plot = plot_alr(table, args.variants, docs_dir / "alr_detection.png")
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
    lines += [table_markdown(table, args.variants, args.conditions), "", "![test R@1](ablation_r1.png)", "",
              "## Ensemble A+B of the same runs (not a method row)", "",
              "Both models of every run, summed FS similarities. For the baseline, + fused and + ALR variants "
              "model B never influenced model A: the gain over A is plain two-model ensembling.", "",
              ensemble_markdown(table, args.variants, args.conditions), "",
              "## ALR noisy-pair detection per epoch (noisy runs)", "",
              "Predicted noisy = no model calls the pair clean (consensus 0); precision/recall against the "
              "generator's `noisy` flag; mean ± std over seeds. w = the ALR weight.", ""]
    if args.proxy:
        for condition in noisy_conditions:
            lines += [f"### {CONDITION_LABELS[condition]}", "", alr_markdown(table, args.variants, condition), ""]
    else:
        lines += [alr_markdown(table, args.variants), ""]
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


# ========================================================================================= diagnosis
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
    from trpr.data.transforms import get_tokenizer
    from trpr.engine import AlrPass, alr_batches
    from trpr.engine.metrics_log import read_metrics
    from trpr.evaluation.features import encode_dataset
    from trpr.modeling.alr import MixtureSettings, fit_mixture, noise_detection_scores
    from trpr.modeling.losses import TrainingLoss
    from trpr.modeling.run_folder import BEST_DIR, selected_checkpoint

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
        image_features = encode_dataset(pair.models, images, "image", batch_size=batch_size)
        text_features = encode_dataset(pair.models, texts, "text", batch_size=batch_size)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.diagnose:
        results = [separability(Path(run).resolve(), args.diagnose_noise_rate,
                                Path(args.docs_dir)) for run in args.diagnose]
        print(write_separability(results, Path(args.docs_dir)).read_text())
        return 0
    runs = plan_runs(args)
    failed = [] if args.report_only else train_all(runs, args)
    report = write_report(runs, args, failed)
    print(f"ablation: report written to {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
