"""Train 3RTPR: a reciprocal pair of CLIP models with fused representations and adaptive loss refinement.

    accelerate launch [--config_file accelerate_configs/X.yaml] train_3rtpr.py \
        --config trpr/configs/<recipe>.yaml [--section.key VALUE ...] --output-dir RUN_DIR [--resume RUN_DIR] [--final-test]
    python train_3rtpr.py ...   (one process; installed: 3rtpr-train ...)

Every epoch (docs/method.md §3-§7):
  1. from `alr.start_epoch` on, ALR: a no-grad pass of both models over the training set (each unique image
     and caption encoded once, sharded across processes; losses within seeded shuffled batches of the
     training batch size), a Gaussian mixture per model on the per-sample losses, a two-model consensus and
     per-sample weights w (and keep flags h), identical on every process;
  2. training: model A on augmented view 0, model B on view 1 of every sample; the loss gathers the
     features of the whole global batch (with gradient) so the per-sample SDM / TRL losses span it;
     L = lambda_sdm * sum(h w l_sdm) / sum(h) + lambda_trl * sum(h w l_trl); each model steps its
     own Adam on its own loss;
  3. validation on `eval.split` every `eval.every` epochs (best/ keeps the best `eval.select_row` R@1);
  4. last/ (models + optimizers, schedulers, RNG, ALR state) written atomically in the background from a
     snapshot taken at the end of the epoch; then the epoch's line in metrics.jsonl, with the time of
     every phase (trpr/engine/timing.py), also printed.
Epochs are counted from 0. The run folder layout is described in docs/design.md ("Run folder").
The pieces live in `trpr/engine/` (one module each) and `modeling.losses`; the figures (curves.png,
alr_weights.png) are drawn by `trpr/reporting/training.py` from the engine's records.
"""
from __future__ import annotations

import argparse
import errno
import signal
import sys
from pathlib import Path

import torch

from trpr import configs
from trpr import engine
from trpr import kernels
from trpr.data.tokenizer import get_tokenizer
from trpr.runtime.progress import quiet_progress_in_logs
from trpr.runtime.run_folder import RunFolderBusy
from trpr.modeling.losses import TrainingLoss
from trpr.reporting.training import plot_run_alr_history, plot_run_curves


HELP_EPILOG = """config sections and keys (defaults from trpr/configs/defaults.yaml, where each is explained);
override any of them on the command line as --section.key VALUE (VALUE is YAML: 2, 1e-4, true, null, [64, 32]):
{keys}

examples:
  train_3rtpr.py --config synth-pedes --output-dir runs/demo --train.epochs 4
  train_3rtpr.py --resume runs/demo --train.epochs 20      (continue, here with more epochs)
A run folder is used by one training at a time; a new run needs an empty (or new) --output-dir."""


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """(known arguments, the remaining --section.key VALUE overrides)."""
    parser = argparse.ArgumentParser(prog="train_3rtpr.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=HELP_EPILOG.format(keys=configs.describe_keys()))
    parser.add_argument("--config", help="recipe YAML (trpr/configs/*.yaml, on top of trpr/configs/defaults.yaml); "
                                         "with --resume: the run's config.yaml")
    parser.add_argument("--output-dir", help="run folder (created; must be empty); default with --resume: the resumed folder")
    parser.add_argument("--resume", help="run folder to continue from its last finished epoch")
    parser.add_argument("--allow-changed-data", action="store_true",
                        help="with --resume: continue even though the training data differs from the data the run "
                             "was trained on (refused otherwise; the per-sample ALR weights then start afresh)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the previous run in --output-dir (its checkpoints, metrics, logs)")
    parser.add_argument("--final-test", action="store_true",
                        help="after training, evaluate best/ (else last/) on the test split")
    return parser.parse_known_args(argv)


def main(argv=None) -> Path:
    """Parse, check what can be checked before any work (config, backbone), then train in the run folder
    (`engine.RunFolder`: locked while the run lives; removed when the run fails before its first epoch)."""
    from accelerate import Accelerator

    args, overrides = parse_args(argv)
    if args.allow_changed_data and not args.resume:
        raise configs.ConfigError("--allow-changed-data applies to --resume only")
    config, run_dir = engine.resolve_run(overrides, config_path=args.config, output_dir=args.output_dir,
                                         resume_dir=args.resume)
    epochs = config["train"]["epochs"]
    complete = bool(args.resume) and engine.finished_epochs(run_dir) == epochs
    if not complete:
        engine.check_backbone(config)
    trackers = config["logging"]["trackers"]
    accelerator = Accelerator(log_with=trackers or None, project_dir=str(run_dir))
    engine.check_distributed_type(accelerator)
    engine.check_batch_size(config, accelerator.num_processes)
    with engine.RunFolder(run_dir, accelerator, resume_dir=args.resume, overwrite=args.overwrite) as run_folder:
        if complete:  # nothing to train: config.yaml, checkpoints and figures stay as they are
            engine.restart_metrics(run_dir, epochs, accelerator,  # a torn last line is still dropped
                                   last_record=(engine.saved_counters(run_dir) or {}).get("epoch_record"))
            accelerator.print(f"{run_dir}: the run is already complete ({epochs} of {epochs} epochs finished); nothing "
                              f"was trained or changed (pass --train.epochs {epochs + 1} or more to train further)")
            return run_dir
        return train(args, config, run_dir, accelerator, run_folder)


def train(args: argparse.Namespace, config: dict, run_dir: Path, accelerator, run_folder) -> Path:
    """The training itself, in an owned run folder: data, models, (resume), epochs, final test.
    config: the validated dict (written to config.yaml); the loop reads its typed sections (`settings`)."""
    from accelerate.utils import set_seed

    settings = configs.RunConfig.from_dict(config)
    trackers = settings.logging.trackers
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    set_seed(settings.seed)

    # ---- data (fails early on a missing dataset, a batch larger than it or bad images, before any model is built)
    splits = engine.load_splits(config, run_dir, accelerator)
    train_data = engine.train_data_record(splits["train"], f"{settings.data.dataset}/train")
    data_changed = args.resume and engine.check_train_data(args.resume, train_data,
                                                           allow_changed=args.allow_changed_data)
    noisy = torch.tensor(splits["train"]["noisy"], dtype=torch.bool)
    tokenizer = get_tokenizer()
    loader = engine.build_train_loader(splits["train"], tokenizer, config, rank, world,
                                       pin_memory=device.type == "cuda")
    alr_pass = engine.AlrPass(splits["train"], tokenizer, config, accelerator)  # loaders kept for the run

    # ---- the reciprocal pair (compiled per train.compile), its loss, optimizers and schedulers
    pair = engine.build_pair(config, world).to(device)
    compile_mode = engine.resolve_compile_mode(settings.train.compile, device)
    for model in pair.models:
        model.clip.check_text_padding = False  # checked on the host before the copy (engine.batch_to_device)
        engine.compile_model(model, compile_mode)
    models = list(pair.models)  # the unwrapped modules (saving, ALR pass, validation)
    wrapped = list(accelerator.prepare(*models))  # DDP wrappers (training forward)
    optimizers, schedulers = engine.build_optimizers(models, settings.optim, settings.train.epochs, accelerator)
    loss = TrainingLoss.from_config(config["loss"], rank=rank, world_size=world)

    # ---- fresh start or resume
    alr_state = engine.AlrState.initial(len(loader.dataset), device)  # w = 1, h = True until the first ALR pass
    state = engine.TrainerState()
    if args.resume:
        alr_state, state = engine.resume(args.resume, models, optimizers, schedulers, accelerator)
        if data_changed:  # per-sample weights of other rows: start afresh (--allow-changed-data)
            alr_state = engine.AlrState.initial(len(loader.dataset), device)
        if settings.train.epochs < state.epoch + 1:  # checked early by engine.resolve_run; here after recovery
            raise configs.ConfigError(f"--resume {args.resume}: train.epochs {settings.train.epochs} is fewer "
                                      f"than the {state.epoch + 1} epoch(s) the run has finished")
    state.train_data = train_data  # saved with every last/: --resume compares (engine.check_train_data)
    run_folder.start(config)  # the real work begins: config.yaml
    engine.restart_metrics(run_dir, state.epoch + 1, accelerator, last_record=state.epoch_record)
    if trackers:
        accelerator.init_trackers("3rtpr", config=engine.flat_config(config))
    epochs = settings.train.epochs
    samples_per_epoch = len(loader) * settings.train.batch_size
    accelerator.print(f"3RTPR: {len(loader.dataset)} training samples, {len(loader)} steps/epoch of "
                      f"{settings.train.batch_size} on {world} process(es), epochs {state.epoch + 1}..{epochs - 1}, "
                      f"compile {compile_mode}, run folder {run_dir}")

    checkpoints = engine.CheckpointWriter(run_dir, pair, optimizers, schedulers, accelerator,
                                          background=settings.train.async_checkpoint)
    batches = engine.start_epoch(loader, state.epoch + 1) if state.epoch + 1 < epochs else None
    try:
        for epoch in range(state.epoch + 1, epochs):
            clock = engine.PhaseClock(device)
            record = engine.EpochRecord(epoch)  # the epoch's line of metrics.jsonl, filled phase by phase
            # ---- 1. adaptive loss refinement
            if settings.alr.active(epoch):
                with clock.phase("alr"):
                    alr = alr_pass(models, loss.alr_term, epoch)
                    alr_state = alr.state
                    report = engine.report_alr(alr, noisy, epoch, accelerator, global_step=state.global_step)
                    if report is not None:  # main process: the ALR figure over the epochs so far
                        image = plot_run_alr_history(run_dir, epoch, report)
                        if "tensorboard" in trackers:
                            accelerator.get_tracker("tensorboard").log_images(
                                {"alr/weights": image[None]}, step=state.global_step, dataformats="NHWC")
                record.alr = report

            # ---- 2. one epoch of reciprocal training (raises TrainingDiverged before anything is saved)
            with clock.phase("train"):
                record.steps, state.global_step = engine.train_one_epoch(
                    wrapped, optimizers, loader, alr_state, loss, accelerator, epoch=epoch, epochs=epochs,
                    global_step=state.global_step, log_every=settings.train.log_every, batches=batches,
                    freeze_backbone=epoch < settings.optim.head_warmup_epochs)
            # the workers decode the next epoch's first batches during validation and the checkpoint
            batches = engine.start_epoch(loader, epoch + 1) if epoch + 1 < epochs else None

            # ---- 3. validation and best/
            improved = False
            if engine.validation_due(settings.eval, epoch, epochs):
                with clock.phase("validation"):
                    try:
                        record.val = engine.validate(pair, splits, tokenizer, settings, accelerator)
                    except kernels.NonFiniteFeatures as error:  # a diverged model is never ranked or saved
                        raise engine.TrainingDiverged(
                            f"validation after epoch {epoch}, step {state.global_step}: {error}; stopping without "
                            "saving this epoch (lower optim.backbone_lr / optim.head_lr)") from None
                    if engine.test_recording_due(settings.eval, splits):  # eval.record_test: analysis only
                        record.test = engine.validate(pair, splits, tokenizer, settings, accelerator, split="test")
                score = engine.selection_score(record.val, settings.eval)
                improved = state.improves(score)
                if improved:
                    state.best_score, state.best_epoch = score, epoch
                engine.log_validation(record.val, epoch, settings.eval, accelerator, global_step=state.global_step,
                                      improved=improved)
            for scheduler in schedulers:
                scheduler.step()

            # ---- 4. checkpoint: a snapshot now, written in the background; the epoch's metrics record is
            # saved inside last/ (so --resume puts it back if the run dies before the append) and appended
            # to metrics.jsonl once last/ is in place (a record always has its checkpoint)
            state.epoch = epoch
            with clock.phase("checkpoint"):
                checkpoints.snapshot(alr_state, state, improved=improved)
            record.best_epoch = state.best_epoch
            record.time = timing = engine.epoch_timing(clock.seconds, record.steps.step_times(), clock.elapsed(),
                                                       samples_per_epoch)

            def saved(write_s: float, record=record) -> None:  # in the writer, once last/ is in place
                engine.append_metrics(run_dir, record.as_dict(checkpoint_write_s=write_s))
                run_folder.release_replaced()  # --overwrite: the previous run goes once an epoch of this one is saved

            checkpoints.write(epoch_record=record.as_dict(), after=saved)
            accelerator.log({f"time/{key}": value for key, value in timing.items() if value is not None},
                            step=state.global_step)
            accelerator.print(f"epoch {epoch}: loss A {record.steps.loss_a:.4f}, loss B {record.steps.loss_b:.4f}, "
                              + engine.format_timing(timing))
        checkpoints.wait()
    finally:
        checkpoints.close()
    accelerator.wait_for_everyone()

    plot_run_curves(run_dir, settings.eval.select_row, accelerator)
    if args.final_test:
        engine.final_test(run_dir, splits, tokenizer, settings, accelerator)
    accelerator.end_training()
    return run_dir


# ordinary failures that end as one line (exit status 1) instead of a traceback
ONE_LINE_ERRORS = (configs.ConfigError, engine.TrainingDiverged, engine.CheckpointError, RunFolderBusy)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that the run folder is cleaned up as after any
    failure (an `--overwrite` run that has no epoch on disk puts the previous run back)."""


def _raise_terminated(signum, frame):
    raise Terminated()


def cli() -> None:
    """Console entry point (`3rtpr-train`): configuration, run-folder, checkpoint, divergence and
    disk-full errors end as one line; so do Ctrl-C (exit status 130) and SIGTERM (143)."""
    quiet_progress_in_logs()
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main()
    except KeyboardInterrupt as error:
        name, status = ("SIGTERM", 143) if isinstance(error, Terminated) else ("Ctrl-C", 130)
        print(f"error: interrupted ({name}); the unfinished epoch was not saved (a run with a finished epoch "
              "continues with --resume)", file=sys.stderr)
        sys.exit(status)
    except ONE_LINE_ERRORS as error:
        sys.exit(f"error: {error}")
    except OSError as error:  # out of disk space anywhere (checkpoints say more: engine.DiskFullError)
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if isinstance(error, engine.DiskFullError):
            sys.exit(f"error: {error.strerror}")
        sys.exit(f"error: no space left on {error.filename or 'the output device'} ({error.strerror}); free space, "
                 "then continue with --resume")
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


if __name__ == "__main__":
    cli()
