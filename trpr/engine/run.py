"""Setting up a training run: config and run folder (ownership, early-failure cleanup), the checks done
before any work (backbone, batch size, images), datasets, the training loader, the pair."""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from trpr import configs
from trpr import data
from trpr import modeling
from trpr.data.arrow_splits import column_values
from trpr.data.images import ImageCheckError, image_check_summary
from trpr.modeling.hub import check_pretrained_clip
from trpr.runtime.run_folder import (CONFIG_FILE, LAST_DIR, NOISE_PERMUTATION_FILE, REPLACED_DIR, RUN_LOCK_FILE,
                                     RUN_MARKERS, STATE_DIR, TRAINER_STATE_FILE, RunLock, describe_holder, swap_paths)

from .distributed import sync_batch_norms
from .optim import freeze_backbone
from .sampler import GlobalBatchSampler


def resolve_run(overrides: list[str], *, config_path=None, output_dir=None, resume_dir=None) -> tuple[dict, Path]:
    """(resolved config, run folder) of a new run (config_path + output_dir) or a resumed one
    (resume_dir: its config.yaml; output_dir defaults to it). overrides: --section.key VALUE tokens.
    Raises configs.ConfigError with a one-line message. Whether the folder may be used is decided by
    `RunFolder` (under its lock)."""
    if resume_dir:
        resume_dir = Path(resume_dir)
        if config_path:
            raise configs.ConfigError("give either --config or --resume (a resumed run uses its own config.yaml)")
        if not (resume_dir / CONFIG_FILE).is_file():
            raise configs.ConfigError(f"--resume {resume_dir}: no {CONFIG_FILE} (not a run folder)")
        if output_dir and Path(output_dir).absolute().resolve() != resume_dir.absolute().resolve():
            raise configs.ConfigError(f"--resume {resume_dir} --output-dir {output_dir}: a run is continued in its own "
                                      f"folder; to continue a copy, copy the folder first (cp -r {resume_dir} "
                                      f"{output_dir}) and --resume {output_dir}")
        config = configs.load_config(resume_dir / CONFIG_FILE, overrides)
        check_resume(resume_dir, config)
        return config, resume_dir
    if not config_path or not output_dir:
        raise configs.ConfigError("--config and --output-dir are required (or --resume RUN_DIR)")
    return configs.load_config(config_path, overrides), Path(output_dir)


def check_resume(resume_dir: Path, config: dict) -> None:
    """Before anything is read or written: the run's training state must be of a format this trpr
    resumes (`checkpoint.check_state_format`: CheckpointError), and config train.epochs must not be fewer
    than the epochs it has finished (ConfigError: resuming would train nothing and shrink config.yaml).
    Reads last/ (or the `.last.old` an interrupted swap left) without changing anything."""
    from .checkpoint import CheckpointError, check_state_format

    state_dir = _last_state_dir(resume_dir)
    try:
        check_state_format(state_dir)
    except CheckpointError as error:
        raise CheckpointError(f"--resume {resume_dir}: {error}") from None
    done = finished_epochs(resume_dir)
    if done is None:
        return  # no finished epoch or a damaged state: `checkpoint.resume` says so
    epochs = config["train"]["epochs"]
    if epochs < done:
        raise configs.ConfigError(f"--resume {resume_dir}: train.epochs {epochs} is fewer than the {done} epoch(s) "
                                  f"the run has finished; pass --train.epochs {done} or more to continue it "
                                  "(nothing was changed)")


def _last_state_dir(run_dir: Path) -> Path:
    """last/training_state of a run folder (or of the `.last.old` an interrupted swap left)."""
    last = Path(run_dir) / LAST_DIR
    if not last.is_dir():
        last = swap_paths(last)[1]
    return last / STATE_DIR


def saved_counters(run_dir: Path) -> dict | None:
    """trainer_state.json of the run's last/ (read only), or None when absent or unreadable."""
    try:
        counters = json.loads((_last_state_dir(run_dir) / TRAINER_STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return counters if isinstance(counters, dict) else None


def finished_epochs(run_dir: Path) -> int | None:
    """How many epochs the run in `run_dir` has finished (its last/ trainer state), None when unknown."""
    try:
        return int((saved_counters(run_dir) or {})["epoch"]) + 1
    except (KeyError, TypeError, ValueError):
        return None


def train_data_record(split, name: str) -> dict:
    """What identifies the training data a run trains on (saved in trainer_state.json as `train_data`):
    {"name", "rows", "fingerprint"}. The fingerprint (16 hex) hashes every row's identity, image id,
    caption, noise flag and image: its path relative to the folder all training images share (so a dataset
    moved to another root keeps its fingerprint), or a hash of embedded image bytes. Taken after noise and
    the image check, i.e. of the rows the epochs index."""
    import hashlib
    import os

    from trpr.data.arrow_splits import column_values

    images = column_values(split, "image")
    paths = [image.get("path") for image in images if not image.get("bytes") and image.get("path")]
    base = os.path.commonpath(paths) if len(paths) > 1 else (os.path.dirname(paths[0]) if paths else "")
    columns = [column_values(split, key) if key in split.column_names else [None] * len(split)
               for key in ("pid", "image_id", "caption", "noisy")]
    digest = hashlib.blake2b(b"3rtpr-train-data-v1", digest_size=8)
    for image, *values in zip(images, *columns):
        if image.get("bytes"):
            where = "bytes:" + hashlib.blake2b(image["bytes"], digest_size=8).hexdigest()
        else:
            where = os.path.relpath(image["path"], base) if base else str(image.get("path"))
        digest.update(json.dumps([where, *values]).encode() + b"\n")
    return {"name": name, "rows": len(split), "fingerprint": digest.hexdigest()}


def check_train_data(resume_dir: Path, record: dict, *, allow_changed: bool = False) -> bool:
    """--resume: compare the training data now (`record`, from `train_data_record`) with the data the run
    was trained on (its last/ trainer state). Unchanged (or a run saved before the record existed): False.
    Changed: ConfigError naming what changed, or with `allow_changed` a note and True (the caller then
    starts the per-sample ALR state afresh)."""
    saved = (saved_counters(resume_dir) or {}).get("train_data")
    if not isinstance(saved, dict) or saved.get("fingerprint") == record["fingerprint"]:
        return False
    if saved.get("rows") != record["rows"]:
        what = f"it has {record['rows']} rows, the run was trained on {saved.get('rows')}"
    else:
        what = f"same {record['rows']} rows, different content"
    change = (f"the training data changed since the run was saved ({record['name']}: {what}; content fingerprint "
              f"{saved.get('fingerprint')} -> {record['fingerprint']})")
    if not allow_changed:
        raise configs.ConfigError(f"--resume {resume_dir}: {change}; restore the data, or pass --allow-changed-data "
                                  "to continue on the new data")
    print(f"note: --allow-changed-data: {change}; continuing on the new data, per-sample ALR weights start afresh",
          file=sys.stderr)
    return True


# ----------------------------------------------------------------------------------------- the run folder
def _entries(run_dir: Path) -> list[Path]:
    """What the folder holds, the lock file aside."""
    return sorted(p for p in run_dir.iterdir() if p.name != RUN_LOCK_FILE) if run_dir.is_dir() else []


def _remove(paths) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class RunFolder:
    """The run folder of one training, owned by its main process while the run lives.

        with RunFolder(run_dir, accelerator, resume_dir=args.resume, overwrite=args.overwrite) as folder:
            ...                   # checks and data loading: a failure here leaves the folder as it was
            folder.start(config)  # the real work begins: config.yaml is written
            ...                   # training

    On entry the main process creates the folder and takes its lock (`runtime.run_folder.RunLock`: a
    running training into the same folder is refused; the stale lock of a crashed one is taken over with a
    note). A new run (or a resumed one written to another folder) needs an empty folder; with `overwrite`
    a previous run's folder (never a folder that is not a run folder) is moved aside into `.replaced/`,
    deleted once the new run's first epoch is on disk (its last/: `release_replaced`, called by the
    checkpoint writer) and put back if the run fails before that. Every process gets the same outcome: the
    main process's error is broadcast and raised everywhere.
    On exit the lock is released; after a failure, a folder that this process created (or found empty)
    and that holds no finished epoch (no last/) is removed (emptied), so failed runs leave nothing behind.
    """

    def __init__(self, run_dir: Path, accelerator, *, resume_dir=None, overwrite: bool = False):
        self.run_dir, self.accelerator = Path(run_dir), accelerator
        self.in_place = resume_dir is not None and Path(resume_dir).resolve() == self.run_dir.resolve()
        self.overwrite = overwrite
        self.lock = RunLock(self.run_dir)
        self.replaced = self.run_dir / REPLACED_DIR
        self.created = self.was_empty = False

    def __enter__(self) -> "RunFolder":
        error = None
        if self.accelerator.is_main_process:
            try:
                try:
                    self._open()
                except OSError as failure:
                    raise configs.ConfigError(f"--output-dir {self.run_dir}: {failure}") from failure
            except (configs.ConfigError, RuntimeError) as failure:
                self.lock.release()
                if self.created:
                    shutil.rmtree(self.run_dir, ignore_errors=True)
                error = failure
        self._agree(error)
        return self

    def _open(self) -> None:
        if self.in_place and self.overwrite:
            raise configs.ConfigError("--overwrite would delete the run that --resume continues; drop one of them")
        try:  # atomic: of two runs started at once, only one counts as the folder's creator
            self.run_dir.mkdir(parents=True)
            self.created = True
        except FileExistsError:
            self.created = False
        stale = self.lock.acquire()
        if stale is not None:
            print(f"note: {self.run_dir} was locked by {describe_holder(stale)}, which is no longer running "
                  "(crashed or killed); taking the folder over", file=sys.stderr)
        entries = _entries(self.run_dir)
        self.was_empty = not entries
        if self.in_place or not entries:
            return
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:6]) + (", ..." if len(entries) > 6 else "")
        if not any((self.run_dir / marker).exists() for marker in RUN_MARKERS):
            raise configs.ConfigError(f"--output-dir {self.run_dir} is not empty and is not a run folder ({names}); "
                                      "choose an empty or new folder")
        if not self.overwrite:
            raise configs.ConfigError(f"--output-dir {self.run_dir} already holds a run ({names}); continue it with "
                                      f"--resume {self.run_dir}, replace it with --overwrite, or choose another folder")
        if self.replaced.exists():  # an earlier --overwrite died before its run started: that copy is the previous run
            _remove(p for p in entries if p != self.replaced)
        else:
            self.replaced.mkdir()
            for entry in entries:
                entry.rename(self.replaced / entry.name)
        self.was_empty = True

    def _agree(self, error: BaseException | None) -> None:
        """Raise the main process's error on every process (one line on the others)."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            message = [str(error) if error is not None else None]
            broadcast_object_list(message)
            if error is None and message[0] is not None:
                raise SystemExit(f"error: {message[0]}")
        if error is not None:
            raise error

    def start(self, config: dict) -> None:
        """The real work begins: the main process writes the resolved config.yaml (a run replaced by
        --overwrite stays in `.replaced/` until `release_replaced`); every process waits."""
        if self.accelerator.is_main_process:
            configs.save_config(config, self.run_dir / CONFIG_FILE)
        self.accelerator.wait_for_everyone()

    def release_replaced(self) -> None:
        """Main process, once the new run's first last/ is in place: delete the run --overwrite replaced
        (until then a failure puts it back). Safe to call from the checkpoint-writer thread and repeatedly."""
        if self.accelerator.is_main_process and self.replaced.exists() and (self.run_dir / LAST_DIR).is_dir():
            shutil.rmtree(self.replaced, ignore_errors=True)
            print(f"note: --overwrite: the previous run in {self.run_dir} was deleted (the new run's first epoch "
                  "is saved)", file=sys.stderr)

    def __exit__(self, kind, error, traceback) -> None:
        if not self.accelerator.is_main_process:
            return
        self.lock.release()
        if kind is None or self.in_place or (self.run_dir / LAST_DIR).exists():
            self.release_replaced()
            return
        if self.created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        elif self.replaced.exists():  # failed before the new run's first epoch was saved: the previous run comes back
            _remove(p for p in _entries(self.run_dir) if p != self.replaced)
            for entry in list(self.replaced.iterdir()):
                entry.rename(self.run_dir / entry.name)
            self.replaced.rmdir()
        elif self.was_empty:
            _remove(_entries(self.run_dir))


# ----------------------------------------------------------------------------- checks before any work
def check_backbone(config: dict) -> None:
    """Before anything is built or written: a model.backbone name must be a usable local folder, or a
    Hub model that is cached or can be downloaded (modeling.hub.check_pretrained_clip; HF_HUB_OFFLINE
    honoured, no retries). SystemExit with one actionable line otherwise."""
    backbone = config["model"]["backbone"]
    if isinstance(backbone, dict):
        return
    try:
        check_pretrained_clip(backbone)
    except OSError as error:
        raise SystemExit(f"error: config model.backbone={backbone!r}: {error}") from None


def check_batch_size(config: dict, world_size: int, num_samples: int | None = None) -> None:
    """train.batch_size (the global batch) must split evenly over the processes and, once the training set
    is known (`num_samples`), not exceed it. SystemExit naming the value and the fix."""
    batch = config["train"]["batch_size"]
    if batch % world_size:
        raise SystemExit(f"error: config train.batch_size={batch} is the global batch and must be divisible by the "
                         f"{world_size} processes")
    if num_samples == 0:
        raise SystemExit(f"error: the training set of {config['data']['dataset']} is empty (no usable sample is left); "
                         "check the dataset (python -m trpr.data.check) and its images")
    if num_samples is not None and batch > num_samples:
        raise SystemExit(f"error: config train.batch_size={batch} is larger than the training set of "
                         f"{config['data']['dataset']} ({num_samples} samples): use --train.batch_size {num_samples} "
                         "or less")


def _image_check(split, name: str, policy: str, accelerator):
    """data.verify_images of one split inside main_process_first (the main process decodes and caches,
    the others read the cache); the 'error' policy ends as one line (the full list printed before it)."""
    with accelerator.main_process_first():
        try:
            return data.verify_images(split, policy=policy, name=name,
                                      progress=None if accelerator.is_main_process else False)
        except ImageCheckError as error:
            listing, headline, first = image_check_summary(error)
            if accelerator.is_main_process:
                print(listing, file=sys.stderr)
            raise SystemExit(f"error: config data.image_policy=error: {headline} (first: {first}); fix or remove "
                             "them, or pass --data.image_policy skip to train without them") from None


def check_images(splits, config: dict, accelerator):
    """Decode every image of the training split and of the validation gallery once before training
    (data.verify_images: parallel, cached per dataset) under config data.image_policy: "error" ->
    SystemExit naming the files; "skip" -> the splits without them (data.keep_rows; validation queries of
    a skipped gallery image go with it). Returns the (possibly reduced) splits."""
    policy, dataset = config["data"]["image_policy"], config["data"]["dataset"]
    keys = ["train"] + ([f"{config['eval']['split']}_gallery"] if config["eval"]["split"] else [])
    for key in keys:
        check = _image_check(splits[key], f"{dataset}/{key}", policy, accelerator)
        if len(check.keep) == check.num_rows:
            continue
        if len(check.keep) == 0:
            raise SystemExit(f"error: config data.image_policy=skip: every image of {dataset}/{key} is unusable "
                             f"({len(check.bad)} file(s), listed above), so nothing is left to "
                             f"{'train' if key == 'train' else 'validate'} on; fix or replace the images")
        splits[key] = data.keep_rows(splits[key], check.keep)
        if key.endswith("_gallery"):
            queries_key = key.replace("_gallery", "_queries")
            kept = set(column_values(splits[key], "image_id"))
            image_ids = column_values(splits[queries_key], "image_id")
            splits[queries_key] = data.keep_rows(splits[queries_key],
                                                 [i for i, image_id in enumerate(image_ids) if image_id in kept])
        accelerator.print(f"data.image_policy=skip: {key} keeps {len(check.keep)} of {check.num_rows} rows "
                          f"({len(check.bad)} unusable image(s) skipped)")
    return splits


def load_splits(config: dict, run_dir: Path, accelerator):
    """data.load_benchmark for the config's data section (synth-pedes is generated once, by the main
    process; a generated noise permutation is saved in the run folder), then, before anything is built,
    the batch size against the training set (`check_batch_size`) and the images (`check_images`).
    SystemExit naming the config entry when the dataset is missing or unreadable, has no eval.split, or
    fails a check."""
    data_cfg = config["data"]
    generate_noise = data_cfg["noise_rate"] > 0 and not data_cfg["noise_file"]
    noise_out = run_dir / NOISE_PERMUTATION_FILE if generate_noise and accelerator.is_main_process else None
    with accelerator.main_process_first():
        try:
            splits = data.load_benchmark(data_cfg["dataset"], root=data_cfg["root"], noise_rate=data_cfg["noise_rate"],
                                         noise_file=data_cfg["noise_file"], seed=config["seed"], noise_out=noise_out)
        except (FileNotFoundError, ValueError, OSError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SystemExit(f"error: config data.dataset={data_cfg['dataset']!r} (data.root={data_cfg['root']!r}): "
                             f"{message}") from None
    eval_split = config["eval"]["split"]
    if eval_split is not None and f"{eval_split}_gallery" not in splits:
        raise SystemExit(f"error: config eval.split={eval_split!r}: dataset {data_cfg['dataset']} has no such split "
                         f"(splits: {', '.join(splits.keys())}); use --eval.split null to keep the last epoch")
    check_batch_size(config, accelerator.num_processes, len(splits["train"]))
    splits = check_images(splits, config, accelerator)
    check_batch_size(config, accelerator.num_processes, len(splits["train"]))
    return splits


def build_train_loader(train_split, tokenizer, config: dict, rank: int, world_size: int, *,
                       pin_memory: bool = False) -> DataLoader:
    """DataLoader of TrainViews (two augmented views per sample, uint8 pixels + erase boxes: normalised on
    the device by `engine.batch.TrainBatch.pixels`) over this process's share of each global batch
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
    gradient checkpointing set, its BatchNorm statistics synchronised across processes when world_size > 1;
    with optim.backbone_lr 0 the backbone is frozen (`optim.freeze_backbone`: no gradients, no optimizer group)."""
    model_cfg = config["model"]
    pair = modeling.ReciprocalPair.from_clip(build_clip_source(model_cfg["backbone"]),
                                             head_seeds=head_seeds(config),
                                             select_ratio=model_cfg["select_ratio"], fused_dim=model_cfg["fused_dim"],
                                             image_size=tuple(config["data"]["image_size"]),
                                             image_tokens=model_cfg["image_tokens"])
    for model in pair.models:
        model.set_gradient_checkpointing(model_cfg["gradient_checkpointing"])
        if config["optim"]["backbone_lr"] == 0:
            freeze_backbone(model)  # before the DDP wrap: DDP only ever sees the heads as trainable
        if world_size > 1:
            sync_batch_norms(model)
    pair.run_record = {"config": copy.deepcopy(config), "results": {}}  # best/ and last/ cards name the recipe
    return pair
