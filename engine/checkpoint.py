"""Checkpoints of a training run: atomic folder writes, best/ and last/ (with the training state), RNG
state and resume. The folder names are `modeling.run_folder`'s.

last/ = ReciprocalPair.save_pretrained + training_state/ with optimizer_{a,b}.pt, scheduler_{a,b}.pt,
scaler.pt (mixed precision), alr_state.pt ({"weights" [N], "keep" [N] bool}), trainer_state.json
(TrainerState) and rng_<process>.pt (one per process).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import modeling
from modeling.run_folder import ALR_STATE_FILE, BEST_DIR, LAST_DIR, STATE_DIR, TRAINER_STATE_FILE


@dataclass
class TrainerState:
    """Counters of a run: the last finished epoch (-1 before the first), the global step, the best
    validation score (eval.select_row R@1, percent) and its epoch (None before any validation)."""

    epoch: int = -1
    global_step: int = 0
    best_score: float | None = None
    best_epoch: int | None = None

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


def write_folder_atomically(final: Path, write, accelerator) -> None:
    """Run write(tmp_folder) on every process into `.<name>.tmp`, fsync it, then swap it in for `final`
    (old copy renamed to `.<name>.old` first, removed last). A crash at any point leaves either the old or
    the new complete folder under `final` or `.<name>.old`, never a half-written `final`."""
    tmp = final.parent / f".{final.name}.tmp"
    old = final.parent / f".{final.name}.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        _fsync_path(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def recover_checkpoint(folder: Path) -> Path | None:
    """`folder` if complete; after a crash between the two renames of write_folder_atomically, the
    previous copy `.<name>.old` is moved back. Half-written `.<name>.tmp` folders are never used."""
    old = folder.parent / f".{folder.name}.old"
    if not folder.exists() and old.exists():
        old.rename(folder)
    return folder if folder.exists() else None


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
    """last/ = the pair + training_state/ (optimizers, schedulers, loss scaler, per-process RNG, ALR, counters)."""
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

    write_folder_atomically(run_dir / LAST_DIR, write, accelerator)


def save_checkpoint(run_dir: Path, pair, optimizers, schedulers, alr_state: dict, trainer_state: TrainerState,
                    accelerator, *, improved: bool) -> None:
    """End of an epoch: best/ (the pair) when the validation score improved, then last/."""
    if improved:
        write_folder_atomically(run_dir / BEST_DIR, lambda folder: pair.save_pretrained(folder)
                                if accelerator.is_main_process else None, accelerator)
    save_last(run_dir, pair, optimizers, schedulers, alr_state, trainer_state, accelerator)


def load_last(last_dir: Path, models, optimizers, schedulers, accelerator) -> tuple[dict, TrainerState]:
    """Restore weights, optimizer/scheduler/scaler/RNG states from last/; returns (alr_state, trainer_state)."""
    state_dir = last_dir / STATE_DIR
    saved = modeling.ReciprocalPair.from_pretrained(last_dir)
    for model, saved_model in zip(models, saved.models):
        model.load_state_dict(saved_model.state_dict())
    for name, optimizer, scheduler in zip("ab", optimizers, schedulers):
        optimizer.load_state_dict(torch.load(state_dir / f"optimizer_{name}.pt", map_location="cpu"))
        scheduler.load_state_dict(torch.load(state_dir / f"scheduler_{name}.pt"))
    if accelerator.scaler is not None and (state_dir / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(state_dir / "scaler.pt"))
    rng_file = state_dir / f"rng_{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file}: missing; resume with the number of processes of the original run")
    set_rng_state(torch.load(rng_file, weights_only=False))
    alr_state = {k: v.to(accelerator.device) for k, v in torch.load(state_dir / ALR_STATE_FILE).items()}
    return alr_state, TrainerState(**json.loads((state_dir / TRAINER_STATE_FILE).read_text()))


def resume(resume_dir: Path, models, optimizers, schedulers, accelerator) -> tuple[dict, TrainerState]:
    """--resume RUN_DIR: recover last/ after a crash mid-swap, then `load_last`; SystemExit without a
    finished epoch."""
    last_dir = Path(resume_dir) / LAST_DIR
    if accelerator.is_main_process:
        recover_checkpoint(last_dir)
    accelerator.wait_for_everyone()
    if not last_dir.is_dir():
        raise SystemExit(f"--resume {resume_dir}: no finished epoch to resume from (no {LAST_DIR}/)")
    alr_state, trainer_state = load_last(last_dir, models, optimizers, schedulers, accelerator)
    accelerator.print(f"resumed from {last_dir}: epoch {trainer_state.epoch} finished, "
                      f"step {trainer_state.global_step}")
    return alr_state, trainer_state
