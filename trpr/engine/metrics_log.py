"""The run's epoch records (metrics.jsonl) and tracker-friendly config (the curves figure drawn from the
records: `trpr.reporting.training`)."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from trpr.runtime.atomic import atomic_write_text
from trpr.runtime.run_folder import METRICS_FILE


@dataclass
class EpochRecord:
    """One epoch's line of metrics.jsonl, filled phase by phase by the trainer (train_3rtpr.py):
    alr: `engine.report_alr`'s record (ALR epochs, main process); steps: `train_one_epoch`'s summary;
    val / test: `engine.validate` rows (when due); best_epoch: the best/ epoch so far; time:
    `engine.epoch_timing`. `as_dict` is the JSON record."""

    epoch: int
    alr: dict | None = None
    steps: "EpochSteps | None" = None
    val: dict | None = None
    test: dict | None = None
    best_epoch: int | None = None
    time: dict | None = None

    def as_dict(self, checkpoint_write_s: float | None = None) -> dict:
        """{"epoch", ["alr"], "step", "loss_a", "loss_b", "lr_backbone", "lr_head", ["val"], ["test"],
        "best_epoch", "epoch_time_s", "time"} in this order; the background write's seconds, once known,
        go into "time" as "checkpoint_write_s"."""
        record = {"epoch": self.epoch}
        if self.alr is not None:
            record["alr"] = self.alr
        steps = self.steps
        record.update(step=steps.step, loss_a=steps.loss_a, loss_b=steps.loss_b, lr_backbone=steps.lr_backbone,
                      lr_head=steps.lr_head)
        for name in ("val", "test"):
            if getattr(self, name) is not None:
                record[name] = getattr(self, name)
        record.update(best_epoch=self.best_epoch, epoch_time_s=self.time["epoch_s"], time=dict(self.time))
        if checkpoint_write_s is not None:
            record["time"]["checkpoint_write_s"] = round(checkpoint_write_s, 4)
        return record


def append_metrics(run_dir: Path, record: dict) -> None:
    """Append one epoch record as a JSON line to RUN_DIR/metrics.jsonl."""
    with open(run_dir / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path, before_epoch: int | None = None) -> list[dict]:
    """The epoch records of RUN_DIR/metrics.jsonl (those with epoch < before_epoch when given).
    A torn last line (the process died while appending it) is dropped with a warning; any other line
    that is not a JSON record raises ValueError naming the file and the line."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("not an epoch record")
        except ValueError as error:
            if position == len(lines) - 1:
                warnings.warn(f"{path}: line {number} is incomplete (the run stopped while writing it); dropped",
                              stacklevel=2)
                break
            raise ValueError(f"{path}: line {number} is not an epoch record ({error}); remove or fix that line") from None
        records.append(record)
    return [r for r in records if before_epoch is None or r["epoch"] < before_epoch]


def restart_metrics(run_dir: Path, start_epoch: int, accelerator, last_record: dict | None = None) -> None:
    """Main process: drop the records of the epochs that will be (re)done (all of them for a new run) and
    a torn last line. `last_record`: the record saved with the checkpoint resumed from
    (TrainerState.epoch_record); when metrics.jsonl lacks it (killed between the checkpoint and the
    append) it is put back. The file is rewritten atomically."""
    if not accelerator.is_main_process:
        return
    path = run_dir / METRICS_FILE
    if start_epoch <= 0:
        path.unlink(missing_ok=True)
        return
    kept = read_metrics(run_dir, before_epoch=start_epoch)
    if last_record is not None and last_record.get("epoch") == start_epoch - 1 and \
            all(record["epoch"] != start_epoch - 1 for record in kept):
        kept.append(last_record)
        accelerator.print(f"{path}: epoch {start_epoch - 1}'s record restored from the checkpoint (the run "
                          "stopped before appending it)")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def flat_config(config: dict, prefix: str = "") -> dict:
    """Tracker-friendly {dotted key: int|float|str|bool}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and not (prefix + key == "model.backbone"):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
