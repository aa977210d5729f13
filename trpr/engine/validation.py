"""Validation during training (model selection for best/) and the final test (--final-test).

They read the typed config (`configs.RunConfig`): the eval section, and the data section's image size and
workers where they encode."""
from __future__ import annotations

import json
from pathlib import Path

from trpr import modeling
from trpr.configs.sections import EvalSection, RunConfig
from trpr.evaluation import evaluate_pair
from trpr.modeling.pair import selection_r1
from trpr.runtime.run_folder import TEST_METRICS_FILE, selected_checkpoint


def test_recording_due(evaluation: EvalSection, splits) -> bool:
    """eval.record_test: the test split is evaluated after every validation and recorded in metrics.jsonl
    ("test"), for analyses that compare selection rules (the ablation sweep); best/ never reads it."""
    return evaluation.record_test and "test_gallery" in splits


def validation_due(evaluation: EvalSection, epoch: int, epochs: int) -> bool:
    """Whether to validate after `epoch` of `epochs` (train.epochs): eval.split is set and the epoch is a
    multiple of eval.every (counting from 1) or the last one."""
    if evaluation.split is None:
        return False
    return (epoch + 1) % evaluation.every == 0 or epoch == epochs - 1


def validate(pair, splits, tokenizer, settings: RunConfig, accelerator,
             split: str | None = None) -> dict[str, dict[str, float]]:
    """evaluation.evaluate_pair of the pair on `<split>_gallery` / `_queries` (default eval.split): rows "A/GE"
    ... "A+B/GE+FS" -> {"R1","R5","R10","mAP","mINP"} percent, identical on every process. The models are
    evaluated in eval mode and left in training mode; data.num_workers workers decode the gallery."""
    split = split or settings.eval.split
    for model in pair.models:
        model.eval()
    metrics = evaluate_pair(pair, splits[f"{split}_gallery"], splits[f"{split}_queries"], tokenizer=tokenizer,
                            image_size=settings.data.image_size, batch_size=settings.eval.batch_size,
                            accelerator=accelerator, num_workers=settings.data.num_workers)
    for model in pair.models:
        model.train()
    return metrics


def selection_score(metrics: dict, evaluation: EvalSection) -> float:
    """The R@1 (percent) of the eval.select_row row (of the best of its rows for a max(...) rule): the score
    best/ is chosen by."""
    return selection_r1(metrics, evaluation.select_row)


def log_validation(metrics: dict, epoch: int, evaluation: EvalSection, accelerator, *, global_step: int,
                   improved: bool) -> None:
    """Validation metrics to the trackers (val/<row>/<metric>) and a log line with the GE+FS rows."""
    accelerator.log({f"val/{row}/{name}": value for row, values in metrics.items()
                     for name, value in values.items()}, step=global_step)
    select_row = evaluation.select_row
    accelerator.print(f"epoch {epoch} {evaluation.split} R@1: "
                      + ", ".join(f"{row} {values['R1']:.2f}" for row, values in metrics.items()
                                  if row.endswith("GE+FS"))
                      + f"; selection row {select_row} {selection_score(metrics, evaluation):.2f}"
                      + (" (best so far)" if improved else ""))


def final_test(run_dir: Path, splits, tokenizer, settings: RunConfig, accelerator) -> dict:
    """--final-test: evaluate best/ (else last/) on the test split once; writes test_metrics.json
    (main process) and returns the rows."""
    if "test_gallery" not in splits:
        raise SystemExit(f"--final-test: dataset {settings.data.dataset} has no test split")
    chosen = selected_checkpoint(run_dir)
    pair = modeling.ReciprocalPair.from_pretrained(chosen).to(accelerator.device).eval()
    metrics = evaluate_pair(pair, splits["test_gallery"], splits["test_queries"], tokenizer=tokenizer,
                            image_size=settings.data.image_size, batch_size=settings.eval.batch_size,
                            accelerator=accelerator, num_workers=settings.data.num_workers)
    if accelerator.is_main_process:
        (run_dir / TEST_METRICS_FILE).write_text(json.dumps({"checkpoint": chosen.name, **metrics}, indent=2) + "\n")
    accelerator.print(f"test ({chosen.name}/): " + ", ".join(f"{row} R@1 {v['R1']:.2f}" for row, v in metrics.items()))
    return metrics
