"""The layout of a training run folder: written by `engine` (train_3rtpr.py), read by `evaluation`
(eval_3rtpr.py) and the scripts. The one home of these names (docs/design.md, "Run folder"), of the
folder's lock and of the recovery after an interrupted checkpoint swap.

    RUN_DIR/
      config.yaml               CONFIG_FILE: the resolved config
      best/                     BEST_DIR: ReciprocalPair folder, the best validation epoch
      last/                     LAST_DIR: ReciprocalPair folder + training_state/ (STATE_DIR)
      metrics.jsonl             METRICS_FILE: one JSON record per epoch
      test_metrics.json         TEST_METRICS_FILE: --final-test
      noise_permutation.npy     NOISE_PERMUTATION_FILE: when noise was generated
      curves.png                CURVES_FILE: losses and validation R@1 per epoch
      alr_weights.png           ALR_WEIGHTS_FILE: ALR weight distributions (+ noisy-pair P/R/F1) per epoch
      .run.lock                 RUN_LOCK_FILE: the training process that owns the folder (RunLock)
      .replaced/                REPLACED_DIR: --overwrite's previous run until the new run's first last/ is saved
      .<name>.tmp / .<name>.old while best/ or last/ is being replaced (swap_paths)
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
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
ALR_STATE_NAME = "alr_state"  # inside last/training_state/, written by engine.state_files.save_state
ALR_STATE_FILE = ALR_STATE_NAME + ".safetensors"
RUN_LOCK_FILE = ".run.lock"
REPLACED_DIR = ".replaced"  # --overwrite: the previous run, kept until the new one has saved its first epoch
# files that make a folder recognisable as a run folder (what --overwrite may replace)
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, BEST_DIR, LAST_DIR, REPLACED_DIR)


def selected_checkpoint(run_dir: str | Path) -> Path | None:
    """The pair folder a run is evaluated with: best/ when it exists, else last/; None when neither."""
    for name in CHECKPOINT_DIRS:
        if (Path(run_dir) / name).is_dir():
            return Path(run_dir) / name
    return None


# ------------------------------------------------------------------------------ interrupted swaps
def swap_paths(folder: str | Path) -> tuple[Path, Path]:
    """(`.<name>.tmp`, `.<name>.old`) beside `folder`: the new copy being written and the previous copy
    while an atomic swap replaces `folder` (engine.checkpoint.write_folder_atomically)."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.tmp", folder.parent / f".{folder.name}.old"


def interrupted_swap(folder: str | Path) -> Path | None:
    """`.<name>.old` when a swap of `folder` was interrupted between its two renames (`folder` missing,
    the previous copy left under `.<name>.old`), else None."""
    old = swap_paths(folder)[1]
    return old if not Path(folder).exists() and old.is_dir() else None


def recover_interrupted_swap(folder: str | Path) -> Path | None:
    """`folder` if complete; after a crash between the two renames of an atomic swap, the previous copy
    `.<name>.old` is moved back first. Half-written `.<name>.tmp` folders are never used. None when
    neither exists. OSError when the move fails (e.g. a read-only folder)."""
    folder = Path(folder)
    old = interrupted_swap(folder)
    if old is not None:
        old.rename(folder)
    return folder if folder.exists() else None


# ------------------------------------------------------------------------------------- the lock
class RunFolderBusy(RuntimeError):
    """The run folder's lock is held by a running process; `holder` is its lock record (may be {})."""

    def __init__(self, run_dir: Path, holder: dict):
        self.run_dir, self.holder = run_dir, holder
        super().__init__(f"run folder {run_dir} is in use by {describe_holder(holder)}: wait for it to finish or stop "
                         f"it (a crashed run does not keep the lock), or choose another --output-dir")


def describe_holder(holder: dict | None) -> str:
    """"pid 123 on host gpu1 (started 2025-01-01 12:00:00)" from a lock record."""
    if not holder:
        return "another process"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _flock():
    import fcntl

    return fcntl


class RunLock:
    """One process at a time owns a run folder: an exclusive flock on RUN_DIR/.run.lock, a file that
    holds the owner's record {"pid", "host", "started"}. The kernel drops an flock when its process
    ends, however it ends (kill -9 included), so a lock file left by a crashed run is stale: the next
    `acquire` takes it over and returns the dead owner's record. Used by the training's main process only.

        lock = RunLock(run_dir); stale = lock.acquire(); ...; lock.release()
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RUN_LOCK_FILE
        self._descriptor: int | None = None
        self.supported = True

    def acquire(self, wait_s: float = 2.0) -> dict | None:
        """Take the lock (retrying for `wait_s` seconds: a probe by `lock_holder` holds it for an
        instant). Returns the record of a crashed previous owner (stale lock taken over), else None.
        Raises RunFolderBusy when a running process holds it. On a file system without flock support
        the folder is used unlocked (`supported` becomes False)."""
        fcntl = _flock()
        deadline = time.monotonic() + wait_s
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                if time.monotonic() >= deadline:
                    raise RunFolderBusy(self.run_dir, _read_record(self.path)) from None
                time.sleep(0.1)
                continue
            except OSError as error:
                os.close(descriptor)
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    self.supported = False
                    return None
                raise
            try:  # the file may have been unlinked by its releasing owner in between: lock the current one
                same = os.fstat(descriptor).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(descriptor)
                continue
            break
        previous = _read_record(self.path)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(descriptor)
        self._descriptor = descriptor
        return previous or None

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._descriptor is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._descriptor)
        self._descriptor = None


def lock_holder(run_dir: str | Path) -> dict | None:
    """The lock record of the running process that owns `run_dir` ({} when it has not written it yet),
    or None when no running process does (no lock file, or a stale one). Read-only: probes the flock
    with a shared lock held for an instant."""
    path = Path(run_dir) / RUN_LOCK_FILE
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    fcntl = _flock()
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_record(path)
    except OSError:
        return None
    finally:
        os.close(descriptor)  # closing drops a shared lock taken above
    return None
