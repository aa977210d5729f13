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
  4. last/ (models + optimizers, schedulers, RNG, ALR state) written atomically; a line in metrics.jsonl.
Epochs are counted from 0. The run folder layout is described in docs/design.md ("Run folder").
The pieces live in `engine/` (one module each) and `modeling.losses`.
"""
from __future__ import annotations

import argparse
import sys
import time
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
    world, rank = accelerator.num_processes, accelerator.process_index
    set_seed(config["seed"])

    # ---- data (fails early on a missing dataset, before any model is built)
    engine.prepare_run_folder(config, run_dir, accelerator)
    splits = engine.load_splits(config, run_dir, accelerator)
    noisy = torch.tensor(splits["train"]["noisy"], dtype=torch.bool)
    tokenizer = get_tokenizer()
    loader = engine.build_train_loader(splits["train"], tokenizer, config, rank, world)
    alr_pass = engine.AlrPass(splits["train"], tokenizer, config, accelerator)  # loaders kept for the run

    # ---- the reciprocal pair, its loss, optimizers and schedulers
    pair = engine.build_pair(config, world).to(accelerator.device)
    models = list(pair.models)  # the unwrapped modules (saving, ALR pass, validation)
    wrapped = list(accelerator.prepare(*models))  # DDP wrappers (training forward)
    optimizers, schedulers = engine.build_optimizers(models, config, accelerator)
    loss = TrainingLoss.from_config(config["loss"], rank=rank, world_size=world)

    # ---- fresh start or resume
    alr_state = engine.initial_alr_state(len(loader.dataset), accelerator.device)
    state = engine.TrainerState()
    if args.resume:
        alr_state, state = engine.resume(args.resume, models, optimizers, schedulers, accelerator)
    engine.restart_metrics(run_dir, state.epoch + 1, accelerator)
    if trackers:
        accelerator.init_trackers("3rtpr", config=engine.flat_config(config))
    epochs = config["train"]["epochs"]
    accelerator.print(f"3RTPR: {len(loader.dataset)} training samples, {len(loader)} steps/epoch of "
                      f"{config['train']['batch_size']} on {world} process(es), epochs {state.epoch + 1}..{epochs - 1}, "
                      f"run folder {run_dir}")

    for epoch in range(state.epoch + 1, epochs):
        epoch_start = time.time()
        record = {"epoch": epoch}
        # ---- 1. adaptive loss refinement
        if engine.alr_active(config, epoch):
            alr = alr_pass(models, loss.alr_term, epoch)
            alr_state = {"weights": alr["weights"], "keep": alr["keep"]}
            report = engine.report_alr(alr, noisy, epoch, run_dir, accelerator, global_step=state.global_step,
                                       trackers=trackers)
            if report is not None:
                record["alr"] = report

        # ---- 2. one epoch of reciprocal training
        epoch_record, state.global_step = engine.train_one_epoch(
            wrapped, optimizers, loader, alr_state, loss, accelerator, epoch=epoch, epochs=epochs,
            global_step=state.global_step, log_every=config["train"]["log_every"])
        record.update(epoch_record)

        # ---- 3. validation and best/
        improved = False
        if engine.validation_due(config, epoch):
            record["val"] = engine.validate(pair, splits, tokenizer, config, accelerator)
            score = engine.selection_score(record["val"], config)
            improved = state.improves(score)
            if improved:
                state.best_score, state.best_epoch = score, epoch
            engine.log_validation(record["val"], epoch, config, accelerator, global_step=state.global_step,
                                  improved=improved)
        for scheduler in schedulers:
            scheduler.step()

        # ---- 4. checkpoints and the epoch record (checkpoint first: a record always has its checkpoint)
        state.epoch = epoch
        engine.save_checkpoint(run_dir, pair, optimizers, schedulers, alr_state, state, accelerator, improved=improved)
        record.update(best_epoch=state.best_epoch, epoch_time_s=time.time() - epoch_start)
        if accelerator.is_main_process:
            engine.append_metrics(run_dir, record)
        accelerator.print(f"epoch {epoch}: loss A {record['loss_a']:.4f}, loss B {record['loss_b']:.4f}, "
                          f"{record['epoch_time_s']:.1f}s")

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
