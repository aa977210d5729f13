"""Ablation sweep of 3RTPR (issue 7): which part earns its place, on clean and noisy synth-pedes.

Runs `train_3rtpr.py --final-test` once per (variant, condition, seed) as a subprocess, then writes the
table (mean ± std over seeds of test R@1 and mAP), the per-epoch ALR noisy-pair detection figures of the
noisy runs and the plots into the docs folder:

    .venv/bin/python scripts/ablate.py --jobs 2 --epochs 8 --seeds 0 1 2
    .venv/bin/python scripts/ablate.py --report-only          # only rebuild the table from finished runs

Variants (trpr.experiments.ablation_plan.VARIANTS; each row group names the rows it reports):
  baseline      global embedding (model.select_ratio 0), ALR off                 -> row A/GE
  fused         + fused representation (select_ratio from the recipe), ALR off   -> rows A/GE, A/FS, A/GE+FS
  alr           + ALR soft weights, model A's own consensus (alr.models 1)       -> rows A/*
  full          + reciprocal pair: two-model consensus (alr.models 2)            -> rows A/* and A+B/*
The trainer always trains two models, but with ALR off or alr.models 1 model A never sees B, so A's rows
are the one-model result. Model selection is the trainer's (best/ on val R@1 of eval.select_row: A/FS for
the one-model variants, A+B/FS for the pair); the reported numbers are the TEST split's. Every run records
the test rows of every epoch too (eval.record_test), so the report also shows the reference code's rule
max(GE, FS) applied afterwards (ablation_compare), and paired per-seed differences per component.

Proxy mode (`--proxy`): the same table fine-tuned from the pretrained proxy CLIP (scripts/pretrain_proxy.py)
with the paper's recipes: trpr/configs/proxy-clean.yaml (SDM) for the clean condition, trpr/configs/proxy-noisy.yaml
(TRL) for the noisy ones (50 % and 80 %), every run given `--model.backbone <proxy folder>` (a config cannot
hold that cache-dependent path; `--backbone DIR` picks another folder, `--random-init` the same
architecture untrained, as the control). More variants:
  alr_hard      + ALR hard selection, one model (alr.selection reference = the reference's --ccd --ccd-r)
  full_hard     + reciprocal pair with hard selection (alr.models 2)              -> rows A/*, A+B/*
  ensemble_hard control for full_hard: a second, independent alr_hard run (seed + 1000, the same noisy
                training set through --data.noise_file) whose model A is ensembled with model A of the
                alr_hard run of the same seed (rows A+A'/*; evaluated by this script on the test split)
  ensemble      the same control for full (two independent soft-ALR models)
  fused_ref     + fused representation, image branch as the reference code (model.image_tokens reference)
  fused_all     + fused representation, image branch over all patches (model.image_tokens all)
  head_warmup   + fused representation, heads warmed up 1 epoch with the backbone frozen
  frozen        + fused representation, frozen backbone (optim.backbone_lr 0)
  alr_hard_global, full_hard_global, ensemble_hard_global
                alr_hard / full_hard / ensemble_hard with the ALR pass scored on the global similarity
                (alr.score global)
  alr_hard_views  alr_hard with the pass scored on training-augmented views (alr.views reference)
  alr_hard_trl_ref, alr_hard_global_trl_ref
                alr_hard / alr_hard_global with the reference's TRL temperature (loss.trl_temperature reference)
  alr_hard_gmm_ref  alr_hard with the reference's mixture settings (alr.gmm_preset reference)
                (these last variants differ only in the ALR pass or TRL: planned for the noisy conditions only,
                except alr_hard_global, also run on clean data)
Every run's command states the PINNED options (ablation_plan.PINNED: the values the variants were defined
with), so a later change of a project default changes no row.
    .venv/bin/python scripts/ablate.py --proxy --jobs 2 --threads 1      # -> runs/ablation_proxy, docs/results/proxy
The pretrained backbone itself is evaluated once (the zero-shot row, ablation_zeroshot ->
<runs_dir>/zeroshot_test_metrics.json; also by --report-only when missing). The report then also has the ALR
detection per epoch of every noisy condition (P/R/F1 and model A's separation AUCs) and one figure of the
last-epoch ALR weights of clean vs noisy training pairs (alr_weight_distributions.png).

Resumable: a run with test_metrics.json is skipped; a run interrupted after a finished epoch is resumed
(`--resume`); one interrupted before any finished epoch is started again. Runs are ordered seed-major,
so one complete seed of every cell exists before the second seed starts.

Modules: this one (the command line, training the runs, the ensemble controls), `ablation_plan` (variants,
conditions, runs, trainer commands), `ablation_zeroshot` (the zero-shot row), `ablation_report` (ablation.md /
.json), `ablation_compare` (the selection rules and paired comparisons), `alr_analysis` (`--diagnose`);
every table and figure is drawn by `trpr.reporting.ablation`. `scripts/ablate.py` is this module's
command line (`python -m trpr.experiments.ablation_sweep` is the same).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from trpr.experiments.ablation_plan import (CONDITIONS, DEFAULT_CONDITIONS, DEFAULT_VARIANTS, ENSEMBLE_METRICS,
                                            PROXY_CONFIGS, PROXY_VARIANTS, VARIANTS, Run, config_for, noise_file_for,
                                            plan_runs)
from trpr.experiments.ablation_report import write_report
from trpr.experiments.ablation_zeroshot import ensure_zeroshot
from trpr.experiments.alr_analysis import separability
from trpr.reporting.ablation import write_separability

REPO = Path(__file__).resolve().parents[2]  # the checkout (train_3rtpr.py, trpr/configs)


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
    for name in args.variants:
        partner = VARIANTS[name].partner
        if partner is not None and partner not in args.variants:
            parser.error(f"the control {name} pairs each run with the {partner} run of the same seed: "
                         f"add --variants {partner}")
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
        from trpr.experiments.proxy_pretrain import proxy_folder

        args.backbone = str(proxy_folder(proxy_settings()))



def proxy_settings():
    """The default settings of the cached proxy (what `python scripts/pretrain_proxy.py` builds)."""
    from trpr.experiments.proxy_pretrain import ProxySettings

    return ProxySettings()


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
    from trpr.data.tokenizer import get_tokenizer
    from trpr.evaluation import evaluate_pair
    from trpr.runtime.atomic import atomic_write_text
    from trpr.runtime.run_folder import selected_checkpoint

    torch.set_num_threads(threads)
    for run in tqdm(todo, desc="ensemble controls", unit="run"):
        config = yaml.safe_load((run.folder / "config.yaml").read_text())
        members = [selected_checkpoint(member.folder) for member in (run.partner, run)]
        pair = modeling.ReciprocalPair(*(modeling.ReciprocalPair.from_pretrained(folder).a for folder in members))
        splits = data.load_benchmark(config["data"]["dataset"], root=config["data"]["root"] or env["TRPR_CACHE"])
        metrics = evaluate_pair(pair, splits["test_gallery"], splits["test_queries"],
                                           tokenizer=get_tokenizer(), image_size=tuple(config["data"]["image_size"]),
                                           batch_size=config["eval"]["batch_size"])
        atomic_write_text(run.folder / ENSEMBLE_METRICS, json.dumps(
            {"members": [str(folder / "model_a") for folder in members], **metrics}, indent=2) + "\n")
    return missing


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.diagnose:
        results = [separability(Path(run).resolve(), args.diagnose_noise_rate,
                                Path(args.docs_dir)) for run in args.diagnose]
        print(write_separability(results, Path(args.docs_dir)).read_text())
        return 0
    runs = plan_runs(args)
    failed = [] if args.report_only else train_all(runs, args)
    ensure_zeroshot(args)  # once per sweep (its runs_dir); --report-only too when it is missing
    report = write_report(runs, args, failed)
    print(f"ablation: report written to {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
