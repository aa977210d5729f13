"""The training engine of 3RTPR (docs/method.md §3-§7), used by train_3rtpr.py.

    run          resolve_run, RunFolder (lock, early-failure cleanup), check_backbone / check_batch_size /
                 finished_epochs, train_data_record / check_train_data (what --resume continues on),
                 check_images (before any work), load_splits, build_train_loader, build_pair, head_seeds
    sampler      GlobalBatchSampler
    optim        param_groups, lr_factor, build_optimizer(s)
    step         batch_to_device, encode_view, reciprocal_step, start_epoch, train_one_epoch, TrainingDiverged
    compilation  train.compile (regional torch.compile of the encoder layers), fast-math settings
    timing       per-phase epoch timing (PhaseClock, StepClock, epoch_timing, format_timing)
    alr_pass     AlrPass (the per-epoch ALR pass), alr_batches, batch_statistics (ALR's scoring),
                 report_alr (the epoch's ALR record, scalars, log line)
    validation   validate, log_validation, final_test
    checkpoint   TrainerState, CheckpointWriter (background writes), save_checkpoint / save_last / load_last /
                 resume, atomic folder writes (disk full: DiskFullError), CheckpointError, RNG
    distributed  sync_batch_norms, check_distributed_type
    metrics_log  metrics.jsonl records, flat_config

The loss and its data parallelism are `modeling.losses.TrainingLoss`. The engine emits records only: the
figures drawn from them (curves.png, alr_weights.png) are `trpr.reporting.training`'s.
"""
from .alr_pass import AlrPass, AlrRound, alr_batches, alr_report, batch_statistics, report_alr
from .alr_state import AlrState
from .batch import TrainBatch, batch_to_device
from .checkpoint import (CheckpointError, CheckpointWriter, DiskFullError, TrainerState, load_last,
                         resume, rng_state, save_checkpoint, save_last, set_rng_state,
                         tidy_checkpoints, write_folder_atomically)
from .compilation import compile_model, fast_math, fast_math_enabled, resolve_compile_mode
from .distributed import check_distributed_type, sync_batch_norms
from .metrics_log import EpochRecord, append_metrics, flat_config, read_metrics, restart_metrics
from .optim import build_optimizer, build_optimizers, current_lrs, lr_factor, param_groups
from .run import (RunFolder, build_clip_source, build_pair, build_train_loader, check_backbone, check_batch_size,
                  check_images, check_train_data, finished_epochs, head_seeds, load_splits, resolve_run,
                  saved_counters, train_data_record)
from .sampler import GlobalBatchSampler
from .step import (EpochSteps, TrainingDiverged, encode_view, reciprocal_step, start_epoch, train_one_epoch,
                   trim_text_padding)
from .timing import PhaseClock, StepClock, epoch_timing, format_timing
from .validation import final_test, log_validation, selection_score, test_recording_due, validate, validation_due

__all__ = ["AlrPass", "AlrRound", "AlrState", "alr_batches", "alr_report", "batch_statistics", "report_alr",
           "CheckpointError", "CheckpointWriter", "DiskFullError", "TrainerState", "load_last",
           "resume", "rng_state", "save_checkpoint", "save_last", "set_rng_state",
           "tidy_checkpoints", "write_folder_atomically", "check_distributed_type",
           "sync_batch_norms", "append_metrics", "flat_config", "read_metrics",
           "restart_metrics", "EpochRecord", "EpochSteps", "build_optimizer", "build_optimizers", "current_lrs", "lr_factor", "param_groups",
           "RunFolder", "build_clip_source", "build_pair", "build_train_loader", "check_backbone", "check_batch_size",
           "check_images", "check_train_data", "finished_epochs", "head_seeds", "load_splits", "resolve_run",
           "saved_counters", "train_data_record", "GlobalBatchSampler", "TrainBatch", "TrainingDiverged",
           "batch_to_device", "encode_view", "reciprocal_step", "start_epoch", "train_one_epoch", "trim_text_padding",
           "compile_model", "fast_math", "fast_math_enabled", "resolve_compile_mode", "PhaseClock", "StepClock", "epoch_timing",
           "format_timing", "final_test", "log_validation", "selection_score", "test_recording_due", "validate", "validation_due"]
