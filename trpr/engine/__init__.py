"""The training engine of 3RTPR (docs/method.md §3-§7), used by train_3rtpr.py.

This package exports what train_3rtpr.py, the benchmarks and the experiments use; everything else is
imported from its module (`from trpr.engine.checkpoint import load_last`, `engine.optim.lr_factor`).

    run          resolve_run, RunFolder (lock, early-failure cleanup), check_backbone / check_batch_size /
                 finished_epochs, train_data_record / check_train_data (what --resume continues on),
                 check_images (before any work), load_splits, build_train_loader, build_pair, head_seeds
    sampler      GlobalBatchSampler
    optim        param_groups, lr_factor, build_optimizer(s)
    batch        TrainBatch, batch_to_device (the one way a batch reaches the device)
    alr_state    AlrState (per-sample weights float32 [N] and keep flags bool [N]; alr_state.safetensors)
    step         encode_view, reciprocal_step, start_epoch, train_one_epoch -> EpochSteps, TrainingDiverged
    compilation  train.compile (regional torch.compile of the encoder layers), fast-math settings
    timing       per-phase epoch timing (PhaseClock, StepClock, epoch_timing, format_timing)
    alr_pass     AlrPass (the per-epoch ALR pass) -> AlrRound, alr_batches, batch_statistics (ALR's scoring),
                 report_alr (the epoch's ALR record, scalars, log line)
    validation   validate, log_validation, final_test
    checkpoint   TrainerState, CheckpointWriter (background writes; background=False: blocking), load_last /
                 resume, atomic folder writes (disk full: DiskFullError), CheckpointError, RNG
    distributed  sync_batch_norms, check_distributed_type
    metrics_log  EpochRecord (an epoch's metrics.jsonl line), append_metrics / read_metrics / restart_metrics,
                 flat_config

The loss and its data parallelism are `modeling.losses.TrainingLoss`. The engine emits records only: the
figures drawn from them (curves.png, alr_weights.png) are `trpr.reporting.training`'s.
"""
# the submodules, reachable as engine.<module> (tests, benchmarks)
from . import (alr_pass, alr_state, batch, checkpoint, compilation, distributed, metrics_log, optim, run, sampler,
               state_files, step, timing, validation)
from .alr_pass import AlrPass, alr_batches, alr_report, report_alr
from .alr_state import AlrState
from .batch import batch_to_device
from .checkpoint import CheckpointError, CheckpointWriter, DiskFullError, TrainerState, resume
from .compilation import compile_model, resolve_compile_mode
from .distributed import check_distributed_type
from .metrics_log import EpochRecord, append_metrics, flat_config, read_metrics, restart_metrics
from .optim import build_optimizer, build_optimizers
from .run import (RunFolder, build_clip_source, build_pair, build_train_loader, check_backbone, check_batch_size,
                  check_train_data, finished_epochs, load_splits, resolve_run, saved_counters, train_data_record)
from .step import TrainingDiverged, reciprocal_step, start_epoch, train_one_epoch
from .timing import PhaseClock, epoch_timing, format_timing
from .validation import final_test, log_validation, selection_score, test_recording_due, validate, validation_due

__all__ = ["AlrPass", "alr_batches", "alr_report", "report_alr", "AlrState", "batch_to_device",
           "CheckpointError", "CheckpointWriter", "DiskFullError", "TrainerState", "resume",
           "compile_model", "resolve_compile_mode", "check_distributed_type", "EpochRecord", "append_metrics",
           "flat_config", "read_metrics", "restart_metrics", "build_optimizer", "build_optimizers", "RunFolder",
           "build_clip_source", "build_pair", "build_train_loader", "check_backbone", "check_batch_size",
           "check_train_data", "finished_epochs", "load_splits", "resolve_run", "saved_counters", "train_data_record",
           "TrainingDiverged", "reciprocal_step", "start_epoch", "train_one_epoch", "PhaseClock", "epoch_timing",
           "format_timing", "final_test", "log_validation", "selection_score", "test_recording_due", "validate",
           "validation_due"]
