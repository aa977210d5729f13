"""The ablation sweep's plan: its variants (row groups) and conditions, the runs one sweep trains, and each
run's trainer command line (trpr.experiments.ablation_sweep trains them, ablation_report tabulates them)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Variant:
    """One row group of the table: the trainer overrides, the evaluate_pair rows it reports, the row whose
    validation R@1 picks best/ (the trainer's eval.select_row) and, for an ensemble control, the variant
    whose model A is ensembled with this run's model A."""
    name: str
    label: str
    overrides: tuple[tuple[str, str], ...]
    rows: tuple[tuple[str, str], ...]  # (row label in the table, evaluate_pair key)
    select_row: str
    partner: str | None = None


ONE_MODEL_ROWS = (("A/GE", "A/GE"), ("A/FS", "A/FS"), ("A/GE+FS", "A/GE+FS"))
PAIR_ROWS = ONE_MODEL_ROWS + (("A+B/GE", "A+B/GE"), ("A+B/FS", "A+B/FS"), ("A+B/GE+FS", "A+B/GE+FS"))
ENSEMBLE_ROWS = (("A+A'/GE", "A+B/GE"), ("A+A'/FS", "A+B/FS"), ("A+A'/GE+FS", "A+B/GE+FS"))
NO_ALR = (("alr.enabled", "false"),)
HARD = (("alr.enabled", "true"), ("alr.selection", "reference"))
VARIANTS = {
    "baseline": Variant("baseline", "CLIP baseline: global embedding, one model, no ALR",
                        (("model.select_ratio", "0.0"), ("alr.enabled", "false")), (("A/GE", "A/GE"),), "A/FS"),
    "fused": Variant("fused", "+ fused representation (top-k image tokens)", NO_ALR, ONE_MODEL_ROWS, "A/FS"),
    "fused_all": Variant("fused_all", "+ fused representation, image branch over all patches",
                         NO_ALR + (("model.image_tokens", "all"),), ONE_MODEL_ROWS, "A/FS"),
    "fused_ref": Variant("fused_ref", "+ fused representation, image branch as the reference code (all tokens + CLS)",
                         NO_ALR + (("model.image_tokens", "reference"),), ONE_MODEL_ROWS, "A/FS"),
    "head_warmup": Variant("head_warmup", "+ fused representation, heads warmed up 1 epoch (backbone frozen)",
                           NO_ALR + (("optim.head_warmup_epochs", "1"),), ONE_MODEL_ROWS, "A/FS"),
    "frozen": Variant("frozen", "+ fused representation, frozen backbone (optim.backbone_lr 0)",
                      NO_ALR + (("optim.backbone_lr", "0.0"),), ONE_MODEL_ROWS, "A/FS"),
    "alr": Variant("alr", "+ ALR soft weights (model A's own consensus)",
                   (("alr.enabled", "true"), ("alr.models", "1")), ONE_MODEL_ROWS, "A/FS"),
    "full": Variant("full", "+ reciprocal pair, ALR soft weights (two-model consensus)",
                    (("alr.enabled", "true"), ("alr.models", "2")), PAIR_ROWS, "A+B/FS"),
    "alr_hard": Variant("alr_hard", "+ ALR hard selection, one model (= the reference's --ccd --ccd-r)",
                        HARD + (("alr.models", "1"),), ONE_MODEL_ROWS, "A/FS"),
    "full_hard": Variant("full_hard", "+ reciprocal pair, ALR hard selection (two-model consensus)",
                         HARD + (("alr.models", "2"),), PAIR_ROWS, "A+B/FS"),
    "ensemble": Variant("ensemble", "control: two independent soft-ALR models, ensembled",
                        (("alr.enabled", "true"), ("alr.models", "1")), ENSEMBLE_ROWS, "A/FS", partner="alr"),
    "ensemble_hard": Variant("ensemble_hard", "control: two independent hard-selection models, ensembled",
                             HARD + (("alr.models", "1"),), ENSEMBLE_ROWS, "A/FS", partner="alr_hard"),
    "alr_hard_global": Variant("alr_hard_global", "+ ALR hard selection, one model, pass scored on the GLOBAL "
                               "similarity (alr.score global)",
                               HARD + (("alr.models", "1"), ("alr.score", "global")), ONE_MODEL_ROWS, "A/FS"),
    "full_hard_global": Variant("full_hard_global", "+ reciprocal pair, ALR hard selection, pass scored on the "
                                "GLOBAL similarity (alr.score global)",
                                HARD + (("alr.models", "2"), ("alr.score", "global")), PAIR_ROWS, "A+B/FS"),
    "ensemble_hard_global": Variant("ensemble_hard_global", "control: two independent hard-selection models "
                                    "scored on the global similarity, ensembled",
                                    HARD + (("alr.models", "1"), ("alr.score", "global")), ENSEMBLE_ROWS, "A/FS",
                                    partner="alr_hard_global"),
    "alr_hard_views": Variant("alr_hard_views", "+ ALR hard selection, one model, pass scored on training-"
                              "augmented views as the reference (alr.views reference)",
                              HARD + (("alr.models", "1"), ("alr.views", "reference")), ONE_MODEL_ROWS, "A/FS"),
    "alr_hard_trl_ref": Variant("alr_hard_trl_ref", "+ ALR hard selection, one model, TRL temperature as the "
                                "reference (loss.trl_temperature reference)",
                                HARD + (("alr.models", "1"), ("loss.trl_temperature", "reference")),
                                ONE_MODEL_ROWS, "A/FS"),
    "alr_hard_global_trl_ref": Variant("alr_hard_global_trl_ref", "+ ALR hard selection, one model, pass scored "
                                       "on the global similarity, TRL temperature as the reference",
                                       HARD + (("alr.models", "1"), ("alr.score", "global"),
                                               ("loss.trl_temperature", "reference")), ONE_MODEL_ROWS, "A/FS"),
    "full_hard_global_trl_ref": Variant("full_hard_global_trl_ref", "+ reciprocal pair, ALR hard selection scored "
                                        "on the global similarity, TRL temperature as the reference (the noisy "
                                        "recipes' defaults since 2026-12-07)",
                                        HARD + (("alr.models", "2"), ("alr.score", "global"),
                                                ("loss.trl_temperature", "reference")), PAIR_ROWS, "A+B/FS"),
    "ensemble_hard_global_trl_ref": Variant("ensemble_hard_global_trl_ref", "control: two independent models with "
                                            "the noisy recipes' ALR (hard, global score, reference TRL temperature), "
                                            "ensembled",
                                            HARD + (("alr.models", "1"), ("alr.score", "global"),
                                                    ("loss.trl_temperature", "reference")), ENSEMBLE_ROWS, "A/FS",
                                            partner="alr_hard_global_trl_ref"),
    "alr_hard_gmm_ref": Variant("alr_hard_gmm_ref", "+ ALR hard selection, one model, mixture settings as the "
                                "reference (alr.gmm_preset reference)",
                                HARD + (("alr.models", "1"), ("alr.gmm_preset", "reference")), ONE_MODEL_ROWS, "A/FS"),
}
# Options every run states unless its variant sets them: the values the proxy ablation's variants were defined
# with, so that a later change of a project default (docs/method.md §10.7) changes no row of the table. A run
# folder recorded before an option was pinned is still this run when its config.yaml holds the pinned value.
PINNED = (("model.image_tokens", "topk"), ("alr.selection", "project"), ("alr.score", "fused"),
          ("loss.trl_temperature", "tau"))
DEFAULT_VARIANTS = ["baseline", "fused", "alr", "full"]
# The fair proxy ablation (issue 23), in the order a partial sweep should reach them: the comparisons the
# method stands on first (no ALR -> hard selection -> pair vs independent pair), then the fidelity rows.
PROXY_VARIANTS = ["baseline", "fused", "alr_hard", "full_hard", "ensemble_hard", "alr", "full", "ensemble",
                  "fused_ref", "fused_all", "head_warmup", "frozen", "alr_hard_global", "full_hard_global",
                  "ensemble_hard_global", "alr_hard_views", "alr_hard_trl_ref", "alr_hard_gmm_ref",
                  "alr_hard_global_trl_ref", "full_hard_global_trl_ref", "ensemble_hard_global_trl_ref"]
# variants that differ from alr_hard / full_hard only in the ALR pass or the noisy recipe's TRL: the sweep plans them
# for the noisy conditions only (on clean data hard selection only drops clean pairs, measured by alr_hard and
# alr_hard_global; the proxy's clean recipe trains SDM, so no TRL temperature either)
NOISY_ONLY_VARIANTS = ("full_hard_global", "ensemble_hard_global", "alr_hard_views", "alr_hard_trl_ref",
                       "alr_hard_global_trl_ref", "full_hard_global_trl_ref", "ensemble_hard_global_trl_ref",
                       "alr_hard_gmm_ref")
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

    def pinned_options(self) -> list[tuple[str, str]]:
        """The PINNED options this run's command states (those its variant does not set itself)."""
        own = {key for key, _ in self.variant.overrides}
        return [(key, value) for key, value in PINNED if key not in own]

    def recorded_before_pinning(self, previous: list[str]) -> bool:
        """Whether `previous` is this run's command as recorded before some PINNED options existed: the planned
        command without the pinned options `previous` lacks, and the run's resolved config.yaml holds those
        options' pinned values (the defaults of that time)."""
        missing = [(key, value) for key, value in self.pinned_options() if f"--{key}" not in previous]
        flags = {f"--{key}" for key, _ in missing}
        stripped, skip = [], False
        for word in self.command:
            if skip:
                skip = False
            elif word in flags:
                skip = True
            else:
                stripped.append(word)
        config_path = self.folder / "config.yaml"
        if not missing or previous != stripped or not config_path.is_file():
            return False
        import yaml

        config = yaml.safe_load(config_path.read_text()) or {}
        for key, value in missing:
            section, name = key.split(".", 1)
            if str(config.get(section, {}).get(name)) != value:
                return False
        return True

    def check_same_command(self) -> None:
        """A run folder written by a different command (other epochs, --set, config) is not this run."""
        recorded = next((path for path in (self.command_file, self.folder / "command.txt") if path.is_file()), None)
        if recorded is None:
            return
        previous = recorded.read_text().split()
        if "--resume" in previous:
            at = previous.index("--resume")
            previous = previous[:at] + previous[at + 2:]
        if previous != self.command and not self.recorded_before_pinning(previous):
            raise SystemExit(f"ablate: {recorded} holds another command than this sweep plans for {self.name}:\n"
                             f"  recorded: {' '.join(previous)}\n  planned:  {' '.join(self.command)}\n"
                             f"use another --runs-dir (or delete that run folder)")



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
                if condition == "clean" and name in NOISY_ONLY_VARIANTS:
                    continue
                variant = VARIANTS[name]
                run = Run(variant, condition, seed, runs_dir / f"{name}-{condition}-seed{seed}")
                planned[name] = run
            for run in planned.values():
                if run.variant.partner is not None:
                    run.partner = planned[run.variant.partner]
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
    overrides = [("seed", str(seed)), *noise, ("eval.select_row", run.variant.select_row), ("logging.trackers", "[]"),
                 ("eval.record_test", "true")]  # every epoch's test rows: the report compares selection rules
    if args.epochs is not None:
        overrides.append(("train.epochs", str(args.epochs)))
    if args.backbone is not None:
        overrides.append(("model.backbone", args.backbone))
    overrides += run.pinned_options() + list(run.variant.overrides)
    overrides += [tuple(item.split("=", 1)) for item in args.extra]
    command = [sys.executable, "train_3rtpr.py", "--config", config_for(run.condition, args)]
    for key, value in overrides:
        command += [f"--{key.strip()}", value.strip()]
    return command + ["--output-dir", str(run.folder), "--final-test"]

