"""Checkpoints of a training run: atomic folder writes, best/ and last/ (with the training state), RNG
state and resume. The folder names are `runtime.run_folder`'s.

last/ = ReciprocalPair.save_pretrained + training_state/ with optimizer_{a,b}.safetensors,
scheduler_{a,b}.safetensors, scaler.safetensors (mixed precision), alr_state.safetensors (`AlrState`:
{"weights" [N] float32, "keep" [N] bool}), trainer_state.json (TrainerState, with the epoch's metrics record) and
rng_<process>.safetensors (one per process). Every state file is written by `state_files.save_state`
(tensors in safetensors, the rest as JSON): nothing in a run folder is ever unpickled. A last/ of the
earlier pickled format (`*.pt`) is refused on --resume with one line (`OLD_FORMAT_HINT`).

Failures: a write that runs out of disk space removes its temporary folder, keeps the previous copy and
raises DiskFullError ("no space left on <path>, N GB needed"); unreadable or mismatched checkpoint files on
--resume raise CheckpointError naming the file. $TRPR_KILL_AT=<point> SIGKILLs the process at a named
point of a swap (`kill_point`, fault injection for the tests).
"""
from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from trpr import modeling
from trpr.runtime.atomic import fsync_path, fsync_tree
from trpr.runtime.errors import first_line
from trpr.runtime.run_folder import (ALR_STATE_NAME, BEST_DIR, CHECKPOINT_DIRS, LAST_DIR, STATE_DIR, TRAINER_STATE_FILE,
                                     recover_interrupted_swap, swap_paths)

from .alr_state import AlrState
from .state_files import StateFileError, load_state, save_state, state_path
from .step import TrainingDiverged, non_finite_weights

KILL_POINT_ENV = "TRPR_KILL_AT"
# training_state/ layout: 1 = pickled .pt files (refused), 2 = engine.state_files (trainer_state.json holds it)
TRAINING_STATE_VERSION = 2
OLD_FORMAT_HINT = ("training state in the earlier pickled .pt format, which is never read (unpickling a file can run "
                   "code); its weights (best/, last/) still evaluate, but the run cannot be resumed: start a new run")
GB = 1e9


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (unreadable file, a model that does not match the config); the
    message is one line naming the file."""


class DiskFullError(OSError):
    """A checkpoint write ran out of disk space (errno ENOSPC); the message says where and how much is needed."""


@dataclass
class TrainerState:
    """Counters of a run: the last finished epoch (-1 before the first), the global step, the best
    validation score (eval.select_row R@1, percent) and its epoch (None before any validation), and the
    metrics.jsonl record of the last finished epoch (saved with last/, so a run killed between the
    checkpoint and the metrics append gets it back on --resume), and the training data's identity
    (`engine.train_data_record`: name, rows, content fingerprint; --resume compares it)."""

    epoch: int = -1
    global_step: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    epoch_record: dict | None = None
    train_data: dict | None = None

    def improves(self, score: float) -> bool:
        """Whether `score` beats the best so far (the first score always does)."""
        return self.best_score is None or score > self.best_score


# ---------------------------------------------------------------------------------------- atomic writes
def kill_point(name: str) -> None:
    """Fault injection: SIGKILL this process here when $TRPR_KILL_AT equals `name` (e.g. "last:swapped")."""
    if os.environ.get(KILL_POINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder` (0 when absent)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else 0


def tensor_bytes(*state) -> int:
    """Bytes of every tensor inside nested dicts / lists / modules (state dicts, optimizer states)."""
    total = 0
    for item in state:
        if isinstance(item, torch.nn.Module):
            item = item.state_dict()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            total += tensor_bytes(*item.values())
        elif isinstance(item, (list, tuple)):
            total += tensor_bytes(*item)
    return total


def _is_disk_full(error: BaseException, folder: Path, still_needed: int) -> bool:
    """Whether a failed write ran out of space: ENOSPC / EDQUOT anywhere in the exception chain (torch and
    safetensors wrap it in RuntimeError / SafetensorError), or less free space than the write still needed."""
    seen = error
    while seen is not None:
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < max(still_needed, 1 << 20)
    except OSError:
        return False


def write_folder_atomically(final: Path, write, accelerator, *, needed_bytes: int = 0) -> None:
    """Run write(tmp_folder) on every process into `.<name>.tmp`, fsync it, then swap it in for `final`
    (old copy renamed to `.<name>.old` first, removed last). A crash at any point leaves either the old or
    the new complete folder under `final` or `.<name>.old`, never a half-written `final`.
    A write that fails (main process) removes `.<name>.tmp` and keeps `final`; out of disk space it raises
    DiskFullError naming the folder, the free space and the size needed (`needed_bytes`, an estimate; at
    least the size of the previous copy)."""
    tmp, old = swap_paths(final)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        write(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            fsync_tree(tmp)
    except Exception as error:
        if not accelerator.is_main_process:
            raise
        written = folder_bytes(tmp)
        needed = max(needed_bytes, folder_bytes(final), written)
        full = _is_disk_full(error, final.parent, needed - written)
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        free = shutil.disk_usage(final.parent).free
        kept = f"the previous {final.name}/ is kept" if final.exists() else f"no {final.name}/ was written"
        raise DiskFullError(errno.ENOSPC, f"no space left on {final.parent} while writing {final.name}/, "
                                          f"{needed / GB:.2f} GB needed ({free / GB:.2f} GB free); {kept} - free "
                                          f"space, then continue with --resume") from error
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            kill_point(f"{final.name}:old-renamed")
        tmp.rename(final)
        fsync_path(final.parent)
        kill_point(f"{final.name}:swapped")
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


# -------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------- best/ and last/
def save_rng_states(state_dir: Path, states: list[dict]) -> None:
    """rng_<process>.safetensors for each process's RNG state (`rng_state()`), in process order."""
    for process, state in enumerate(states):
        save_state(state, state_path(state_dir, f"rng_{process}"))


def last_bytes(pair, snapshot: dict) -> int:
    """Bytes of the tensors a last/ holds (the pair, optimizer states, ALR state): the disk space a write
    of last/ needs, give or take the file headers."""
    return tensor_bytes(pair, [state["state"] for state in snapshot["optimizers"]],
                        snapshot["alr_state"].state_dict())


def write_last(folder: Path, pair, snapshot: dict) -> None:
    """Fill a last/ folder: the pair (`save_pretrained`) + training_state/ from a `training_snapshot`."""
    pair.save_pretrained(folder)
    state_dir = folder / STATE_DIR
    state_dir.mkdir()
    for name, optimizer_state, scheduler_state in zip("ab", snapshot["optimizers"], snapshot["schedulers"]):
        save_state(optimizer_state, state_path(state_dir, f"optimizer_{name}"))
        save_state(scheduler_state, state_path(state_dir, f"scheduler_{name}"))
    if snapshot["scaler"] is not None:
        save_state(snapshot["scaler"], state_path(state_dir, "scaler"))
    snapshot["alr_state"].save(state_path(state_dir, ALR_STATE_NAME))
    counters = {"format_version": TRAINING_STATE_VERSION, **snapshot["trainer_state"]}
    (state_dir / TRAINER_STATE_FILE).write_text(json.dumps(counters, indent=2) + "\n")
    save_rng_states(state_dir, snapshot["rng"])


def gather_rng_states(accelerator) -> list[dict] | None:
    """Every process's `rng_state()`, in process order, on the main process (None elsewhere)."""
    if accelerator.num_processes == 1:
        return [rng_state()]
    from accelerate.utils import gather_object

    states = gather_object([rng_state()])
    return states if accelerator.is_main_process else None


def refuse_non_finite(pair, trainer_state: TrainerState, accelerator) -> None:
    """TrainingDiverged (one line naming the epoch and step) when a weight of the pair is NaN or infinite:
    such weights are never written to best/ or last/ (a last resort: training checks them first)."""
    for model, bad in zip("AB", non_finite_weights(pair.models, accelerator)):
        if bad:
            raise TrainingDiverged(f"non-finite weights of model {model} after epoch {trainer_state.epoch}, global "
                                   f"step {trainer_state.global_step}: not saved "
                                   "(the run diverged: lower optim.backbone_lr / optim.head_lr)")


def training_snapshot(optimizer_states, schedulers, alr_state: AlrState, trainer_state: TrainerState, accelerator,
                      copy_tensors=None) -> dict:
    """What training_state/ holds, detached from the live objects: {"optimizers": [state_dict per model],
    "schedulers", "scaler", "alr_state" (an AlrState on the host), "trainer_state" (dict), "rng" [per process]}.
    optimizer_states: the optimizers' state dicts; copy_tensors(state_dicts) -> copies (the live tensors
    are kept when None: the caller writes before the next step)."""
    states = [optimizer.state_dict() for optimizer in optimizer_states]
    return {"optimizers": copy_tensors(states) if copy_tensors is not None else states,
            "schedulers": [copy.deepcopy(scheduler.state_dict()) for scheduler in schedulers],
            "scaler": copy.deepcopy(accelerator.scaler.state_dict()) if accelerator.scaler is not None else None,
            "alr_state": alr_state.host_copy(),
            "trainer_state": asdict(trainer_state), "rng": gather_rng_states(accelerator)}


class _ThisProcessOnly:
    """Stands in for the Accelerator in `write_folder_atomically` when the main process writes alone (in a
    background thread: no collective may run there)."""

    is_main_process = is_local_main_process = True
    process_index, num_processes = 0, 1

    def wait_for_everyone(self) -> None:
        pass

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs)


def _load_file(path: Path):
    """`state_files.load_state(path)` (never unpickles) with a missing, foreign or damaged file as a
    one-line CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        return load_state(path)
    except StateFileError as error:
        raise CheckpointError(f"{error}; the file is damaged or was not written by trpr") from None


def check_state_format(state_dir: Path) -> None:
    """CheckpointError (one line) when training_state/ is of the earlier pickled format (`*.pt` files and
    no trainer state of this format: such files are never opened) or of a newer format than
    TRAINING_STATE_VERSION (trainer_state.json's format_version)."""
    pickled = sorted(state_dir.glob("*.pt")) if state_dir.is_dir() else []
    if pickled and not state_path(state_dir, ALR_STATE_NAME).is_file():
        raise CheckpointError(f"{state_dir}: {OLD_FORMAT_HINT}")
    state_file = state_dir / TRAINER_STATE_FILE
    try:
        version = json.loads(state_file.read_text()).get("format_version", TRAINING_STATE_VERSION)
    except (OSError, ValueError, AttributeError):
        return  # missing or damaged: load_last names it
    if isinstance(version, bool) or not isinstance(version, int) or version > TRAINING_STATE_VERSION:
        raise CheckpointError(f"{state_file}: format_version {version!r} is newer than this trpr resumes "
                              f"({TRAINING_STATE_VERSION}); upgrade trpr to continue this run")


def _load_into(target, state, path: Path) -> None:
    """target.load_state_dict(state) (an optimizer, scheduler or scaler); a mismatch names the file."""
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError) as error:
        raise CheckpointError(f"{path}: does not match this run's {type(target).__name__} "
                              f"({first_line(error)}); resume with the config the run was started with") from error


def _check_same_shapes(model, saved_model, folder: Path) -> None:
    """CheckpointError naming the first parameter whose shape (or presence) differs between the model the
    config builds and the one saved in `folder`, with both shapes."""
    mine, theirs = model.state_dict(), saved_model.state_dict()
    hint = "the config's model.* / data.image_size differ from the run that wrote it; resume with its config.yaml"
    for name, tensor in theirs.items():
        if name not in mine:
            raise CheckpointError(f"{folder}: holds {name} {list(tensor.shape)}, which the config's model does not "
                                  f"have ({hint})")
        if mine[name].shape != tensor.shape:
            raise CheckpointError(f"{folder}: {name} is {list(tensor.shape)} in the checkpoint but "
                                  f"{list(mine[name].shape)} in the model the config builds ({hint})")
    missing = sorted(set(mine) - set(theirs))
    if missing:
        raise CheckpointError(f"{folder}: lacks {missing[0]} {list(mine[missing[0]].shape)} of the model the config "
                              f"builds ({hint})")


class CheckpointWriter:
    """best/ and last/ at the end of every epoch, written by a background thread so that the next epoch
    starts while 3.76 GB (ViT-B/16 pair + Adam states) go to disk.

        writer = CheckpointWriter(run_dir, pair, optimizers, schedulers, accelerator)
        writer.snapshot(alr_state, state, improved=...)   # blocking: copies the state (device -> host)
        writer.write(after=callback)                      # returns at once; after(write_seconds) runs
                                                          # in the writer once last/ is in place
        writer.wait()                                     # the write finished (its error re-raised)
        writer.close()                                    # at the end, also after an error

    `snapshot` copies the pair's weights and the optimizer states into host buffers made once (pinned on
    CUDA, so the copy runs at full PCIe speed) and takes the schedulers, scaler, ALR state, counters and
    every process's RNG state; nothing of the live training state is read after it returns, so the
    files are exactly the state at that moment and `--resume` is exact.
    `snapshot` first waits for the previous epoch's write: at most one write is in flight.
    Folders are swapped in atomically (`write_folder_atomically`): a crash mid-write leaves the previous
    complete last/ (and `--resume` continues from it). Only the main process writes (the other processes'
    RNG states are gathered to it); background=False writes in `write` itself.
    """

    def __init__(self, run_dir: Path, pair, optimizers, schedulers, accelerator, *, background: bool = True):
        self.run_dir, self.pair, self.optimizers, self.schedulers = Path(run_dir), pair, optimizers, schedulers
        self.accelerator, self.background = accelerator, background
        self.pin = torch.cuda.is_available() and next(pair.parameters()).is_cuda
        self._host_pair = None        # the pair's structure over host buffers (made at the first snapshot)
        self._host_optimizers = None  # optimizer state dicts over host buffers
        self._pending = None          # (snapshot, improved) between snapshot() and write()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------------------------ host buffers
    def _host_like(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=self.pin)

    def _copy_pair(self):
        """The pair's parameters and buffers copied into a host twin (same module structure and names)."""
        if self._host_pair is None:
            memo = {}
            for tensor in list(self.pair.parameters()) + list(self.pair.buffers()):
                host = self._host_like(tensor)
                memo[id(tensor)] = torch.nn.Parameter(host, requires_grad=False) \
                    if isinstance(tensor, torch.nn.Parameter) else host
            self._host_pair = copy.deepcopy(self.pair, memo)
            for module in self._host_pair.modules():
                module.__dict__.pop("_compiled_call_impl", None)  # regional compile: not for the twin
        host_state = self._host_pair.state_dict(keep_vars=True)
        for name, tensor in self.pair.state_dict(keep_vars=True).items():
            host_state[name].data.copy_(tensor.detach(), non_blocking=True)
        return self._host_pair

    def _copy_optimizer_states(self, states: list[dict]) -> list[dict]:
        """Optimizer state dicts with every tensor copied into host buffers (made at the first call)."""
        if self._host_optimizers is None:
            self._host_optimizers = [{"state": {index: {key: self._host_like(value)
                                                        if isinstance(value, torch.Tensor) else value
                                                        for key, value in entry.items()}
                                                for index, entry in state["state"].items()}}
                                     for state in states]
        copies = []
        for state, host in zip(states, self._host_optimizers):
            for index, entry in state["state"].items():
                host_entry = host["state"].setdefault(index, {})
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor):
                        if key not in host_entry or host_entry[key].shape != value.shape:
                            host_entry[key] = self._host_like(value)
                        host_entry[key].copy_(value.detach(), non_blocking=True)
                    else:
                        host_entry[key] = value
            copies.append({"state": host["state"], "param_groups": copy.deepcopy(state["param_groups"])})
        return copies

    # -------------------------------------------------------------------------------------- the epoch
    def snapshot(self, alr_state: AlrState, trainer_state: TrainerState, *, improved: bool) -> None:
        """Copy the training state for this epoch's checkpoint (every process; blocking)."""
        self.wait()
        refuse_non_finite(self.pair, trainer_state, self.accelerator)
        host_pair = self._copy_pair() if self.accelerator.is_main_process else None
        snapshot = training_snapshot(self.optimizers, self.schedulers, alr_state, trainer_state, self.accelerator,
                                     copy_tensors=self._copy_optimizer_states
                                     if self.accelerator.is_main_process else None)
        if self.pin:
            torch.cuda.synchronize()  # the non-blocking copies have landed
        self._pending = (host_pair, snapshot, improved) if self.accelerator.is_main_process else None

    def write(self, after=None, epoch_record: dict | None = None) -> None:
        """Write the snapshot's best/ (if improved) and last/ (main process; in the background unless
        background=False), then call after(write_seconds) there. `epoch_record` (the epoch's metrics
        record, complete only after the snapshot) is saved in last/ as `TrainerState.epoch_record`."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if epoch_record is not None:
            pending[1]["trainer_state"]["epoch_record"] = copy.deepcopy(epoch_record)
        if self.background:
            self._thread = threading.Thread(target=self._run, args=(*pending, after), name="checkpoint-writer")
            self._thread.start()
        else:
            self._write(*pending, after)

    def _write(self, host_pair, snapshot: dict, improved: bool, after) -> None:
        started = time.perf_counter()
        writer = _ThisProcessOnly()
        if improved:
            write_folder_atomically(self.run_dir / BEST_DIR, host_pair.save_pretrained, writer,
                                    needed_bytes=tensor_bytes(host_pair))
        write_folder_atomically(self.run_dir / LAST_DIR, lambda folder: write_last(folder, host_pair, snapshot),
                                writer, needed_bytes=last_bytes(host_pair, snapshot))
        if after is not None:
            after(time.perf_counter() - started)

    def _run(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised in the training thread by wait()
            self._error = error

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Let a write in flight finish (a finished epoch is never lost to an error in a later one); its
        own error, if any, is printed rather than raised (an exception may already be propagating)."""
        try:
            self.wait()
        except BaseException as error:  # noqa: BLE001
            print(f"checkpoint write failed: {type(error).__name__}: {error}", file=sys.stderr)


def load_last(last_dir: Path, models, optimizers, schedulers, accelerator) -> tuple[AlrState, TrainerState]:
    """Restore weights, optimizer/scheduler/scaler/RNG states from last/; returns (alr_state, trainer_state).
    A damaged or missing file, or a model of another size than the config's, raises CheckpointError
    (one line naming the file and, for a size mismatch, both shapes)."""
    state_dir = last_dir / STATE_DIR
    check_state_format(state_dir)
    try:
        saved = modeling.ReciprocalPair.from_pretrained(last_dir)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{last_dir}: cannot load the models ({first_line(error)})") from error
    for member, model, saved_model in zip(("model_a", "model_b"), models, saved.models):
        _check_same_shapes(model, saved_model, last_dir / member)
        model.load_state_dict(saved_model.state_dict())
    for name, optimizer, scheduler in zip("ab", optimizers, schedulers):
        for target, path in ((optimizer, state_path(state_dir, f"optimizer_{name}")),
                             (scheduler, state_path(state_dir, f"scheduler_{name}"))):
            _load_into(target, _load_file(path), path)
    scaler_file = state_path(state_dir, "scaler")
    if accelerator.scaler is not None and scaler_file.is_file():
        _load_into(accelerator.scaler, _load_file(scaler_file), scaler_file)
    rng_file = state_path(state_dir, f"rng_{accelerator.process_index}")
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file}: missing; resume with the number of processes of the original run")
    rng_loaded = _load_file(rng_file)
    try:
        set_rng_state(rng_loaded)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{rng_file}: not an RNG state ({first_line(error)})") from None
    alr_file = state_path(state_dir, ALR_STATE_NAME)
    try:
        alr_state = AlrState.from_state_dict(_load_file(alr_file)).to(accelerator.device)
    except ValueError as error:
        raise CheckpointError(f"{alr_file}: {error}") from None
    state_file = state_dir / TRAINER_STATE_FILE
    try:
        counters = json.loads(state_file.read_text())
        known = set(TrainerState.__dataclass_fields__)
        trainer_state = TrainerState(**{key: value for key, value in counters.items() if key in known})
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{state_file}: unreadable ({first_line(error)})") from error
    return alr_state, trainer_state


def tidy_checkpoints(run_dir: Path) -> None:
    """Main process, at the start of a resumed run: move back a previous copy an interrupted swap left
    (`.<name>.old` without `<name>/`) and delete the half-written `.<name>.tmp` and superseded
    `.<name>.old` folders (they would hold disk space until the next save)."""
    for name in CHECKPOINT_DIRS:
        folder = Path(run_dir) / name
        recover_interrupted_swap(folder)
        tmp, old = swap_paths(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)


def resume(resume_dir: Path, models, optimizers, schedulers, accelerator) -> tuple[AlrState, TrainerState]:
    """--resume RUN_DIR: recover best/ and last/ after a crash mid-swap (`tidy_checkpoints`), then
    `load_last`; SystemExit without a finished epoch, CheckpointError (prefixed "--resume RUN_DIR:") when
    last/ cannot be used."""
    last_dir = Path(resume_dir) / LAST_DIR
    if accelerator.is_main_process:
        tidy_checkpoints(Path(resume_dir))
    accelerator.wait_for_everyone()
    if not last_dir.is_dir():
        raise SystemExit(f"--resume {resume_dir}: no finished epoch to resume from (no {LAST_DIR}/)")
    try:
        alr_state, trainer_state = load_last(last_dir, models, optimizers, schedulers, accelerator)
    except CheckpointError as error:
        raise CheckpointError(f"--resume {resume_dir}: {error}") from error
    accelerator.print(f"resumed from {last_dir}: epoch {trainer_state.epoch} finished, "
                      f"step {trainer_state.global_step}")
    return alr_state, trainer_state
