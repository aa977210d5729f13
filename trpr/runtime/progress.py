"""Progress bars of every command: live on a terminal, quiet in non-interactive logs.

One call at the start of a command reaches every tqdm bar of the project (data, engine, evaluation)
without touching the call sites:

    quiet_progress_in_logs()   # train_3rtpr.py and eval_3rtpr.py call it first (cli())
"""
from __future__ import annotations

import functools
import os
import sys

LOG_MININTERVAL_S = 60  # seconds between two redraws of a bar when stderr is not a terminal
_TQDM_INIT = None  # tqdm's own __init__, kept when quiet_progress_in_logs replaces it


def quiet_progress_in_logs(stream=None) -> bool:
    """When `stream` (default sys.stderr, where tqdm draws) is not a terminal, redraw every bar at most
    every LOG_MININTERVAL_S seconds (a log then holds a couple of lines per bar instead of one per step):
    tqdm's default `mininterval` in this process, and TQDM_MININTERVAL for the processes it starts
    (tqdm reads TQDM_* once, when it is imported). A TQDM_MININTERVAL or TQDM_DISABLE the user set wins.
    Returns whether it changed anything."""
    stream = sys.stderr if stream is None else stream
    interactive = hasattr(stream, "isatty") and stream.isatty()
    if interactive or "TQDM_MININTERVAL" in os.environ or "TQDM_DISABLE" in os.environ:
        return False
    global _TQDM_INIT
    os.environ["TQDM_MININTERVAL"] = str(LOG_MININTERVAL_S)
    import tqdm.std

    bar = tqdm.std.tqdm  # tqdm.auto's class and the others call its __init__; explicit arguments still win
    if _TQDM_INIT is None:
        _TQDM_INIT = bar.__init__
    bar.__init__ = functools.partialmethod(_TQDM_INIT, mininterval=LOG_MININTERVAL_S)  # once, not stacked
    return True


def restore_progress_defaults() -> None:
    """Undo quiet_progress_in_logs in this process (tqdm's own defaults again; the environment is left)."""
    global _TQDM_INIT
    if _TQDM_INIT is not None:
        import tqdm.std

        tqdm.std.tqdm.__init__, _TQDM_INIT = _TQDM_INIT, None
