"""Typed, read-only views of a validated run config: one frozen dataclass per section of defaults.yaml.

    config = load_config("synth-pedes", overrides)      # the nested dict (config.yaml, overrides: unchanged)
    run = RunConfig.from_dict(config)                    # typed sections, built once
    run.train.batch_size; run.alr.active(epoch); run.eval.split

The dict stays the config's one written form (config.yaml, the model card, trackers); the sections are
built from it after `configs.validate` and are what the engine reads. Every field name is the key of
defaults.yaml of the same section, so `RunConfig.from_dict` fails loudly when a key is added to
defaults.yaml without a field here (tests/configs/test_load_config.py checks both directions).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class DataSection:
    """Where the samples come from and how they are decoded (docs/method.md §6)."""

    dataset: str
    root: str | None
    noise_rate: float
    noise_file: str | None
    image_size: tuple[int, int]  # (H, W) pixels
    num_workers: int
    image_policy: str


@dataclass(frozen=True)
class ModelSection:
    """The pair's architecture (docs/method.md §1-§2); backbone: a name, a path or a small_clip_config mapping."""

    backbone: Any
    select_ratio: float
    fused_dim: int
    image_tokens: str
    head_seeds: tuple[int, int] | None
    gradient_checkpointing: bool


@dataclass(frozen=True)
class LossSection:
    """The loss terms (docs/method.md §3); read by `modeling.losses.TrainingLoss.from_config` as a mapping."""

    lambda_sdm: float
    lambda_trl: float
    logit_scale: float
    tau: float
    margin: float
    trl_temperature: str


@dataclass(frozen=True)
class AlrSection:
    """Adaptive loss refinement (docs/method.md §4)."""

    enabled: bool
    start_epoch: int
    models: int
    score: str
    views: str
    mu: str | float
    sharpness: float
    mu_floor: str
    drop_noisy: bool
    selection: str
    gmm_max_iter: int
    gmm_tol: float
    gmm_reg_covar: float
    gmm_preset: str

    def active(self, epoch: int) -> bool:
        """Whether epoch `epoch` (0-based) trains with ALR weights: enabled and epoch >= start_epoch."""
        return self.enabled and epoch >= self.start_epoch


@dataclass(frozen=True)
class OptimSection:
    """Adam and its schedule (docs/method.md §7); learning rates in units of the parameter per gradient."""

    backbone_lr: float
    head_lr: float
    weight_decay: float
    bias_lr_factor: float
    betas: tuple[float, float]
    eps: float
    warmup_epochs: int
    warmup_factor: float
    head_warmup_epochs: int


@dataclass(frozen=True)
class TrainSection:
    """The epoch loop: epochs, the GLOBAL batch size (split over the processes), logging and compile."""

    epochs: int
    batch_size: int
    log_every: int
    compile: str | bool
    async_checkpoint: bool


@dataclass(frozen=True)
class EvalSection:
    """Validation and model selection (docs/method.md §5)."""

    split: str | None
    every: int
    select_row: str
    batch_size: int
    record_test: bool


@dataclass(frozen=True)
class LoggingSection:
    trackers: tuple[str, ...]


SECTIONS = {"data": DataSection, "model": ModelSection, "loss": LossSection, "alr": AlrSection,
            "optim": OptimSection, "train": TrainSection, "eval": EvalSection, "logging": LoggingSection}


def _frozen(value):
    """Lists (YAML sequences) as tuples, so that a section is immutable and hashable where its values are."""
    return tuple(_frozen(item) for item in value) if isinstance(value, list) else value


def build_section(cls, values: dict, name: str):
    """`cls(**values)` with lists as tuples; ValueError naming the keys that differ from the fields."""
    names = {field.name for field in fields(cls)}
    if set(values) != names:
        raise ValueError(f"config section {name}: keys {sorted(set(values) - names)} have no field, fields "
                         f"{sorted(names - set(values))} no key (keep trpr/configs/sections.py and defaults.yaml in step)")
    return cls(**{key: _frozen(value) for key, value in values.items()})


@dataclass(frozen=True)
class RunConfig:
    """Every section of a validated config, typed; `seed` seeds heads, data order, augmentation, ALR batches
    and noise. The dict it is built from stays the written form (config.yaml, trackers, model cards)."""

    seed: int
    data: DataSection
    model: ModelSection
    loss: LossSection
    alr: AlrSection
    optim: OptimSection
    train: TrainSection
    eval: EvalSection
    logging: LoggingSection

    @classmethod
    def from_dict(cls, config: dict) -> "RunConfig":
        """The typed view of `config` (a dict from `load_config`, already validated)."""
        extra = set(config) - set(SECTIONS) - {"seed"}
        if extra:
            raise ValueError(f"config: top-level keys {sorted(extra)} have no typed section")
        return cls(seed=config["seed"], **{name: build_section(section, config[name], name)
                                           for name, section in SECTIONS.items()})
