"""Progress bars of every command: live on a terminal, quiet in non-interactive logs.

tqdm reads its defaults from TQDM_* environment variables (tqdm >= 4.66), so one call at the start of a
command reaches every bar of the project (data, engine, evaluation) and of the processes it launches,
without touching the call sites:

    quiet_progress_in_logs()   # train_3rtpr.py and eval_3rtpr.py call it first
"""
from __future__ import annotations

import os
import sys

LOG_MININTERVAL_S = 60  # seconds between two redraws of a bar when stderr is not a terminal


def quiet_progress_in_logs(stream=None) -> bool:
    """When `stream` (default sys.stderr, where tqdm draws) is not a terminal, set TQDM_MININTERVAL so a bar
    is redrawn at most every LOG_MININTERVAL_S seconds (a log then holds a few lines per bar instead of
    one per step). A TQDM_MININTERVAL or TQDM_DISABLE the user set wins. Returns whether it was set."""
    stream = sys.stderr if stream is None else stream
    interactive = hasattr(stream, "isatty") and stream.isatty()
    if interactive or "TQDM_MININTERVAL" in os.environ or "TQDM_DISABLE" in os.environ:
        return False
    os.environ["TQDM_MININTERVAL"] = str(LOG_MININTERVAL_S)
    return True
