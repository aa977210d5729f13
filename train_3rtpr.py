"""Train 3RTPR: a reciprocal pair of CLIP models with fused representations and adaptive loss refinement.

    accelerate launch [--config_file accelerate_configs/X.yaml] train_3rtpr.py \
        --config configs/<recipe>.yaml [--section.key VALUE ...] --output-dir RUN_DIR [--resume RUN_DIR] [--final-test]
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
     every phase (engine/timing.py), also printed.
Epochs are counted from 0. The run folder layout is described in docs/design.md ("Run folder").
The pieces live in `engine/` (one module each) and `modeling.losses`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import configs
import engine
from data.transforms import get_tokenizer
from modeling.losses import TrainingLoss


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """(known arguments, the remaining --section.key VALUE overrides)."""
    parser = argparse.ArgumentParser(prog="train_3rtpr.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any config key can be overridden: --train.epochs 2 --alr.sharpness 3 ...")
    parser.add_argument("--config", help="recipe YAML (configs/*.yaml); with --resume: the run's config.yaml")
    parser.add_argument("--output-dir", help="run folder (created); default with --resume: the resumed folder")
    parser.add_argument("--resume", help="run folder to continue from its last finished epoch")
    parser.add_argument("--final-test", action="store_true",
                        help="after training, evaluate best/ (else last/) on the test split")
    return parser.parse_known_args(argv)


def main(argv=None) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    args, overrides = parse_args(argv)
    config, run_dir = engine.resolve_run(overrides, config_path=args.config, output_dir=args.output_dir,
                                         resume_dir=args.resume)
    trackers = config["logging"]["trackers"]
    accelerator = Accelerator(log_with=trackers or None, project_dir=str(run_dir))
    engine.check_distributed_type(accelerator)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    set_seed(config["seed"])
    engine.configure_fast_math(device)

    # ---- data (fails early on a missing dataset, before any model is built)
    engine.prepare_run_folder(config, run_dir, accelerator)
    splits = engine.load_splits(config, run_dir, accelerator)
    noisy = torch.tensor(splits["train"]["noisy"], dtype=torch.bool)
    tokenizer = get_tokenizer()
    loader = engine.build_train_loader(splits["train"], tokenizer, config, rank, world,
                                       pin_memory=device.type == "cuda")
    alr_pass = engine.AlrPass(splits["train"], tokenizer, config, accelerator)  # loaders kept for the run

    # ---- the reciprocal pair (compiled per train.compile), its loss, optimizers and schedulers
    pair = engine.build_pair(config, world).to(device)
    compile_mode = engine.resolve_compile_mode(config["train"]["compile"], device)
    for model in pair.models:
        model.clip.check_text_padding = False  # checked on the host before the copy (engine.batch_to_device)
        engine.compile_model(model, compile_mode)
    models = list(pair.models)  # the unwrapped modules (saving, ALR pass, validation)
    wrapped = list(accelerator.prepare(*models))  # DDP wrappers (training forward)
    optimizers, schedulers = engine.build_optimizers(models, config, accelerator)
    loss = TrainingLoss.from_config(config["loss"], rank=rank, world_size=world)

    # ---- fresh start or resume
    alr_state = engine.initial_alr_state(len(loader.dataset), device)
    state = engine.TrainerState()
    if args.resume:
        alr_state, state = engine.resume(args.resume, models, optimizers, schedulers, accelerator)
    engine.restart_metrics(run_dir, state.epoch + 1, accelerator)
    if trackers:
        accelerator.init_trackers("3rtpr", config=engine.flat_config(config))
    epochs = config["train"]["epochs"]
    samples_per_epoch = len(loader) * config["train"]["batch_size"]
    accelerator.print(f"3RTPR: {len(loader.dataset)} training samples, {len(loader)} steps/epoch of "
                      f"{config['train']['batch_size']} on {world} process(es), epochs {state.epoch + 1}..{epochs - 1}, "
                      f"compile {compile_mode}, run folder {run_dir}")

    checkpoints = engine.CheckpointWriter(run_dir, pair, optimizers, schedulers, accelerator,
                                          background=config["train"]["async_checkpoint"])
    batches = engine.start_epoch(loader, state.epoch + 1) if state.epoch + 1 < epochs else None
    try:
        for epoch in range(state.epoch + 1, epochs):
            clock = engine.PhaseClock(device)
            record = {"epoch": epoch}
            # ---- 1. adaptive loss refinement
            if engine.alr_active(config, epoch):
                with clock.phase("alr"):
                    alr = alr_pass(models, loss.alr_term, epoch)
                    alr_state = {"weights": alr["weights"], "keep": alr["keep"]}
                    report = engine.report_alr(alr, noisy, epoch, run_dir, accelerator,
                                               global_step=state.global_step, trackers=trackers)
                if report is not None:
                    record["alr"] = report

            # ---- 2. one epoch of reciprocal training (raises TrainingDiverged before anything is saved)
            with clock.phase("train"):
                epoch_record, state.global_step = engine.train_one_epoch(
                    wrapped, optimizers, loader, alr_state, loss, accelerator, epoch=epoch, epochs=epochs,
                    global_step=state.global_step, log_every=config["train"]["log_every"], batches=batches)
            step_times = {key: epoch_record.pop(key) for key in ("data_wait_s", "compute_s")}
            epoch_record.pop("steps")
            record.update(epoch_record)
            # the workers decode the next epoch's first batches during validation and the checkpoint
            batches = engine.start_epoch(loader, epoch + 1) if epoch + 1 < epochs else None

            # ---- 3. validation and best/
            improved = False
            if engine.validation_due(config, epoch):
                with clock.phase("validation"):
                    record["val"] = engine.validate(pair, splits, tokenizer, config, accelerator)
                score = engine.selection_score(record["val"], config)
                improved = state.improves(score)
                if improved:
                    state.best_score, state.best_epoch = score, epoch
                engine.log_validation(record["val"], epoch, config, accelerator, global_step=state.global_step,
                                      improved=improved)
            for scheduler in schedulers:
                scheduler.step()

            # ---- 4. checkpoint: a snapshot now, written in the background; the epoch's metrics record is
            # appended once its last/ is in place (a record always has its checkpoint)
            state.epoch = epoch
            with clock.phase("checkpoint"):
                checkpoints.snapshot(alr_state, state, improved=improved)
            timing = engine.epoch_timing(clock.seconds, step_times, clock.elapsed(), samples_per_epoch)
            record.update(best_epoch=state.best_epoch, epoch_time_s=timing["epoch_s"], time=timing)
            checkpoints.write(after=lambda seconds, record=record: engine.append_metrics(
                run_dir, {**record, "time": {**record["time"], "checkpoint_write_s": round(seconds, 4)}}))
            accelerator.log({f"time/{key}": value for key, value in timing.items() if value is not None},
                            step=state.global_step)
            accelerator.print(f"epoch {epoch}: loss A {record['loss_a']:.4f}, loss B {record['loss_b']:.4f}, "
                              + engine.format_timing(timing))
        checkpoints.wait()
    finally:
        checkpoints.close()
    accelerator.wait_for_everyone()

    engine.plot_run_curves(run_dir, config["eval"]["select_row"], accelerator)
    if args.final_test:
        engine.final_test(run_dir, splits, tokenizer, config, accelerator)
    accelerator.end_training()
    return run_dir


def cli() -> None:
    """Console entry point (`3rtpr-train`): configuration and divergence errors end as one line."""
    try:
        main()
    except (configs.ConfigError, engine.TrainingDiverged) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    cli()
