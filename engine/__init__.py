"""The training engine of 3RTPR (docs/method.md §3-§7), used by train_3rtpr.py.

    run          resolve_run, RunFolder (lock, early-failure cleanup), check_backbone / check_batch_size /
                 check_images (before any work), load_splits, build_train_loader, build_pair
    sampler      GlobalBatchSampler
    optim        param_groups, lr_factor, build_optimizer(s)
    step         encode_view, reciprocal_step, train_one_epoch, TrainingDiverged
    alr_pass     score_samples (ALR's scoring, shared with scripts/ablate.py), alr_pass, report_alr
    validation   validate, log_validation, final_test
    checkpoint   TrainerState, save_checkpoint / save_last / load_last / resume, atomic folder writes (disk
                 full: DiskFullError), CheckpointError, RNG
    distributed  sync_batch_norms, check_distributed_type
    metrics_log  metrics.jsonl records, curves.png, flat_config

The loss and its data parallelism are `modeling.losses.TrainingLoss`.
"""
from .alr_pass import SampleScores, alr_active, alr_pass, alr_report, plot_alr_weights, report_alr, score_samples
from .checkpoint import (CheckpointError, DiskFullError, TrainerState, initial_alr_state, load_last, recover_checkpoint,
                         resume, rng_state, save_checkpoint, save_last, set_rng_state, tidy_checkpoints,
                         write_folder_atomically)
from .distributed import check_distributed_type, sync_batch_norms
from .metrics_log import append_metrics, flat_config, plot_curves, plot_run_curves, read_metrics, restart_metrics
from .optim import build_optimizer, build_optimizers, current_lrs, lr_factor, param_groups
from .run import (RunFolder, build_clip_source, build_pair, build_train_loader, check_backbone, check_batch_size,
                  check_images, load_splits, resolve_run)
from .sampler import GlobalBatchSampler
from .step import TrainingDiverged, encode_view, reciprocal_step, train_one_epoch, trim_text_padding
from .validation import final_test, log_validation, selection_score, validate, validation_due

__all__ = ["SampleScores", "alr_active", "alr_pass", "alr_report", "plot_alr_weights", "report_alr", "score_samples",
           "CheckpointError", "DiskFullError", "tidy_checkpoints", "TrainerState", "initial_alr_state", "load_last", "recover_checkpoint", "resume", "rng_state",
           "save_checkpoint", "save_last", "set_rng_state", "write_folder_atomically", "check_distributed_type",
           "sync_batch_norms", "append_metrics", "flat_config", "plot_curves", "plot_run_curves", "read_metrics",
           "restart_metrics", "build_optimizer", "build_optimizers", "current_lrs", "lr_factor", "param_groups",
           "RunFolder", "build_clip_source", "build_pair", "build_train_loader", "check_backbone", "check_batch_size",
           "check_images", "load_splits", "resolve_run",
           "GlobalBatchSampler", "TrainingDiverged", "encode_view", "reciprocal_step", "train_one_epoch",
           "trim_text_padding", "final_test", "log_validation", "selection_score", "validate", "validation_due"]
