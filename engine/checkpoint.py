"""Checkpoints of a training run: atomic folder writes, best/ and last/ (with the training state), RNG
state and resume. The folder names are `modeling.run_folder`'s.

last/ = ReciprocalPair.save_pretrained + training_state/ with optimizer_{a,b}.pt, scheduler_{a,b}.pt,
scaler.pt (mixed precision), alr_state.pt ({"weights" [N], "keep" [N] bool}), trainer_state.json
(TrainerState, with the epoch's metrics record) and rng_<process>.pt (one per process).

Failures: a write that runs out of disk space removes its temporary folder, keeps the previous copy and
raises DiskFullError ("no space left on <path>, N GB needed"); unreadable or mismatched checkpoint files on
--resume raise CheckpointError naming the file. $TRPR_KILL_AT=<point> SIGKILLs the process at a named
point of a swap (`kill_point`, fault injection for the tests).
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import modeling
from evaluation.checkpoints import first_line
from modeling.run_folder import (ALR_STATE_FILE, BEST_DIR, CHECKPOINT_DIRS, LAST_DIR, STATE_DIR, TRAINER_STATE_FILE,
                                 recover_interrupted_swap, swap_paths)

KILL_POINT_ENV = "TRPR_KILL_AT"
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
    checkpoint and the metrics append gets it back on --resume)."""

    epoch: int = -1
    global_step: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    epoch_record: dict | None = None

    def improves(self, score: float) -> bool:
        """Whether `score` beats the best so far (the first score always does)."""
        return self.best_score is None or score > self.best_score


def initial_alr_state(num_samples: int, device) -> dict:
    """ALR state before the first ALR pass: every weight 1, every sample kept."""
    return {"weights": torch.ones(num_samples, device=device),
            "keep": torch.ones(num_samples, dtype=torch.bool, device=device)}


# ---------------------------------------------------------------------------------------- atomic writes
def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` (and itself) to disk."""
    for path in sorted(folder.rglob("*")) + [folder]:
        _fsync_path(path)


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
            _fsync_tree(tmp)
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
        _fsync_path(final.parent)
        kill_point(f"{final.name}:swapped")
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def recover_checkpoint(folder: Path) -> Path | None:
    """`folder` if complete; after a crash between the two renames of write_folder_atomically, the
    previous copy `.<name>.old` is moved back (modeling.run_folder.recover_interrupted_swap)."""
    return recover_interrupted_swap(folder)


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
def save_last(run_dir: Path, pair, optimizers, schedulers, alr_state: dict, trainer_state: TrainerState,
              accelerator) -> None:
    """last/ = the pair + training_state/ (optimizers, schedulers, loss scaler, per-process RNG, ALR, counters
    and the epoch record `trainer_state.epoch_record`)."""
    def write(folder: Path) -> None:
        state_dir = folder / STATE_DIR
        if accelerator.is_main_process:
            pair.save_pretrained(folder)
            state_dir.mkdir()
            for name, optimizer, scheduler in zip("ab", optimizers, schedulers):
                torch.save(optimizer.state_dict(), state_dir / f"optimizer_{name}.pt")
                torch.save(scheduler.state_dict(), state_dir / f"scheduler_{name}.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), state_dir / "scaler.pt")
            torch.save({key: value.cpu() for key, value in alr_state.items()}, state_dir / ALR_STATE_FILE)
            (state_dir / TRAINER_STATE_FILE).write_text(json.dumps(asdict(trainer_state), indent=2) + "\n")
        accelerator.wait_for_everyone()
        torch.save(rng_state(), state_dir / f"rng_{accelerator.process_index}.pt")

    needed = tensor_bytes(pair, [optimizer.state_dict()["state"] for optimizer in optimizers], alr_state)
    write_folder_atomically(run_dir / LAST_DIR, write, accelerator, needed_bytes=needed)


def save_checkpoint(run_dir: Path, pair, optimizers, schedulers, alr_state: dict, trainer_state: TrainerState,
                    accelerator, *, improved: bool) -> None:
    """End of an epoch: best/ (the pair) when the validation score improved, then last/. Set
    `trainer_state.epoch_record` to the epoch's metrics record first: it is saved with last/."""
    if improved:
        write_folder_atomically(run_dir / BEST_DIR, lambda folder: pair.save_pretrained(folder)
                                if accelerator.is_main_process else None, accelerator, needed_bytes=tensor_bytes(pair))
    save_last(run_dir, pair, optimizers, schedulers, alr_state, trainer_state, accelerator)


def _load_file(path: Path, **kwargs):
    """torch.load(path) with a missing or damaged file as a one-line CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the checkpoint is incomplete)")
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except Exception as error:  # torch raises RuntimeError / UnpicklingError / EOFError ... for damaged files
        raise CheckpointError(f"{path}: unreadable, the file is damaged ({first_line(error)})") from error


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


def load_last(last_dir: Path, models, optimizers, schedulers, accelerator) -> tuple[dict, TrainerState]:
    """Restore weights, optimizer/scheduler/scaler/RNG states from last/; returns (alr_state, trainer_state).
    A damaged or missing file, or a model of another size than the config's, raises CheckpointError
    (one line naming the file and, for a size mismatch, both shapes)."""
    state_dir = last_dir / STATE_DIR
    try:
        saved = modeling.ReciprocalPair.from_pretrained(last_dir)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{last_dir}: cannot load the models ({first_line(error)})") from error
    for member, model, saved_model in zip(("model_a", "model_b"), models, saved.models):
        _check_same_shapes(model, saved_model, last_dir / member)
        model.load_state_dict(saved_model.state_dict())
    for name, optimizer, scheduler in zip("ab", optimizers, schedulers):
        for target, path in ((optimizer, state_dir / f"optimizer_{name}.pt"),
                             (scheduler, state_dir / f"scheduler_{name}.pt")):
            _load_into(target, _load_file(path), path)
    if accelerator.scaler is not None and (state_dir / "scaler.pt").is_file():
        _load_into(accelerator.scaler, _load_file(state_dir / "scaler.pt"), state_dir / "scaler.pt")
    rng_file = state_dir / f"rng_{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file}: missing; resume with the number of processes of the original run")
    set_rng_state(_load_file(rng_file, weights_only=False))
    alr_state = {k: v.to(accelerator.device) for k, v in _load_file(state_dir / ALR_STATE_FILE).items()}
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


def resume(resume_dir: Path, models, optimizers, schedulers, accelerator) -> tuple[dict, TrainerState]:
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
