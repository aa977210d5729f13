"""Setting up a training run: config and run folder, datasets, the training loader, the pair."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

import configs
import data
import modeling
from modeling.run_folder import CHECKPOINT_DIRS, CONFIG_FILE, NOISE_PERMUTATION_FILE

from .distributed import sync_batch_norms
from .sampler import GlobalBatchSampler


def resolve_run(overrides: list[str], *, config_path=None, output_dir=None, resume_dir=None) -> tuple[dict, Path]:
    """(resolved config, run folder) of a new run (config_path + output_dir) or a resumed one
    (resume_dir: its config.yaml; output_dir defaults to it). overrides: --section.key VALUE tokens.
    Raises configs.ConfigError with a one-line message."""
    if resume_dir:
        resume_dir = Path(resume_dir)
        if config_path:
            raise configs.ConfigError("give either --config or --resume (a resumed run uses its own config.yaml)")
        if not (resume_dir / CONFIG_FILE).is_file():
            raise configs.ConfigError(f"--resume {resume_dir}: no {CONFIG_FILE} (not a run folder)")
        return configs.load_config(resume_dir / CONFIG_FILE, overrides), Path(output_dir) if output_dir else resume_dir
    if not config_path or not output_dir:
        raise configs.ConfigError("--config and --output-dir are required (or --resume RUN_DIR)")
    config = configs.load_config(config_path, overrides)
    run_dir = Path(output_dir)
    if any((run_dir / name).exists() for name in CHECKPOINT_DIRS):
        raise configs.ConfigError(f"--output-dir {run_dir} already holds a run (last/ or best/); "
                                  f"continue it with --resume {run_dir} or choose another folder")
    return config, run_dir


def prepare_run_folder(config: dict, run_dir: Path, accelerator) -> None:
    """Create the run folder and write the resolved config.yaml (main process); every process waits."""
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        configs.save_config(config, run_dir / CONFIG_FILE)
    accelerator.wait_for_everyone()


def load_splits(config: dict, run_dir: Path, accelerator):
    """data.load_benchmark for the config's data section (synth-pedes is generated once, by the main
    process; a generated noise permutation is saved in the run folder). SystemExit naming the config
    entry when the dataset is missing or has no eval.split."""
    data_cfg = config["data"]
    generate_noise = data_cfg["noise_rate"] > 0 and not data_cfg["noise_file"]
    noise_out = run_dir / NOISE_PERMUTATION_FILE if generate_noise and accelerator.is_main_process else None
    with accelerator.main_process_first():
        try:
            splits = data.load_benchmark(data_cfg["dataset"], root=data_cfg["root"], noise_rate=data_cfg["noise_rate"],
                                         noise_file=data_cfg["noise_file"], seed=config["seed"], noise_out=noise_out)
        except (FileNotFoundError, ValueError, OSError) as error:
            raise SystemExit(f"config data.dataset={data_cfg['dataset']!r} (data.root={data_cfg['root']!r}): {error}")
    eval_split = config["eval"]["split"]
    if eval_split is not None and f"{eval_split}_gallery" not in splits:
        raise SystemExit(f"config eval.split={eval_split!r}: dataset {data_cfg['dataset']} has no such split "
                         f"(splits: {', '.join(splits.keys())}); use --eval.split null to keep the last epoch")
    return splits


def build_train_loader(train_split, tokenizer, config: dict, rank: int, world_size: int, *,
                       pin_memory: bool = False) -> DataLoader:
    """DataLoader of TrainViews (two augmented views per sample, uint8 pixels + erase boxes: normalised on
    the device by `engine.step.view_pixels`) over this process's share of each global batch
    (GlobalBatchSampler wrapped in data.EpochKeyedBatches: every sample's augmentation is a function of
    (seed, epoch, position), whichever worker decodes it). With data.num_workers > 0 the workers persist
    across epochs; pin_memory (on CUDA) lets batches be copied to the device without blocking.
    Start an epoch with `engine.start_epoch(loader, epoch)`."""
    data_cfg = config["data"]
    train_views = data.TrainViews(train_split, tokenizer, data_cfg["image_size"], num_views=2, augment=True,
                                  seed=config["seed"], output="uint8")
    sampler = GlobalBatchSampler(len(train_views), config["train"]["batch_size"], rank, world_size, config["seed"])
    workers = data_cfg["num_workers"]
    # the loader's own generator: starting an epoch never draws from the global RNG (resume stays exact)
    return DataLoader(train_views, batch_sampler=data.EpochKeyedBatches(sampler), num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(config["seed"]))


def build_clip_source(backbone):
    """config model.backbone -> what TRPRModel.from_clip takes: a name/path, or a random-init small config."""
    if isinstance(backbone, dict):
        return modeling.small_clip_config(**backbone)
    return backbone


def head_seeds(config: dict) -> tuple[int, int]:
    """The fused-head initialisation seeds of models A and B: `model.head_seeds` when given, else derived
    from the run `seed` as (2 seed, 2 seed + 1): distinct for A and B, and different for every run seed
    (seed 0 gives (0, 1), the fixed default of earlier releases)."""
    explicit = config["model"]["head_seeds"]
    if explicit is not None:
        return int(explicit[0]), int(explicit[1])
    return 2 * config["seed"], 2 * config["seed"] + 1


def build_pair(config: dict, world_size: int = 1) -> modeling.ReciprocalPair:
    """The reciprocal pair of the config's model section (on the CPU; fused heads from `head_seeds`),
    gradient checkpointing set, its BatchNorm statistics synchronised across processes when world_size > 1."""
    model_cfg = config["model"]
    pair = modeling.ReciprocalPair.from_clip(build_clip_source(model_cfg["backbone"]),
                                             head_seeds=head_seeds(config),
                                             select_ratio=model_cfg["select_ratio"], fused_dim=model_cfg["fused_dim"],
                                             image_size=tuple(config["data"]["image_size"]),
                                             image_tokens=model_cfg["image_tokens"])
    for model in pair.models:
        model.set_gradient_checkpointing(model_cfg["gradient_checkpointing"])
        if world_size > 1:
            sync_batch_norms(model)
    return pair
