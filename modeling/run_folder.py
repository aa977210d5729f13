"""The layout of a training run folder: written by `engine` (train_3rtpr.py), read by `evaluation`
(eval_3rtpr.py) and the scripts. The one home of these names (docs/design.md, "Run folder").

    RUN_DIR/
      config.yaml               CONFIG_FILE: the resolved config
      best/                     BEST_DIR: ReciprocalPair folder, the best validation epoch
      last/                     LAST_DIR: ReciprocalPair folder + training_state/ (STATE_DIR)
      metrics.jsonl             METRICS_FILE: one JSON record per epoch
      test_metrics.json         TEST_METRICS_FILE: --final-test
      noise_permutation.npy     NOISE_PERMUTATION_FILE: when noise was generated
      curves.png                CURVES_FILE: losses and validation R@1 per epoch
      alr_weights.png           ALR_WEIGHTS_FILE: ALR weight distributions (+ noisy-pair P/R/F1) per epoch
"""
from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TEST_METRICS_FILE = "test_metrics.json"
NOISE_PERMUTATION_FILE = "noise_permutation.npy"
CURVES_FILE = "curves.png"
ALR_WEIGHTS_FILE = "alr_weights.png"  # rewritten every ALR epoch
BEST_DIR, LAST_DIR = "best", "last"
CHECKPOINT_DIRS = (BEST_DIR, LAST_DIR)  # in order of preference
STATE_DIR = "training_state"  # inside last/
TRAINER_STATE_FILE = "trainer_state.json"  # inside last/training_state/
ALR_STATE_FILE = "alr_state.pt"  # inside last/training_state/


def selected_checkpoint(run_dir: str | Path) -> Path | None:
    """The pair folder a run is evaluated with: best/ when it exists, else last/; None when neither."""
    for name in CHECKPOINT_DIRS:
        if (Path(run_dir) / name).is_dir():
            return Path(run_dir) / name
    return None
