"""Where an epoch's time goes: per-phase seconds and samples/s, for the console line and metrics.jsonl.

Phases of one epoch (seconds):
    alr          the ALR pass (scoring, mixture, weights)
    train        the training loop as a whole (wall clock), made of
      data_wait    the main process blocked on the DataLoader (host clock around `next(batches)`)
      compute      the steps themselves: transfer issue, forward, loss, backward, optimizer
    validation   validation (model selection)
    checkpoint   the blocking part of the checkpoint (snapshot; the write runs in the background:
                 `checkpoint_write_s`, recorded when it finishes)
    epoch        the whole epoch
and the rates steps_samples_per_s = samples / compute (the speed of the step alone) and
epoch_samples_per_s = samples / epoch (what the user gets).

On CUDA the device is synchronised only at phase boundaries (`PhaseClock.phase`), never per step: a
step's compute time is the interval between two CUDA events recorded around it (recording an event
does not block the host); the intervals are read once, after the training phase's closing
synchronisation (`StepClock.totals`). On the CPU the host clock times the steps directly.
"""
from __future__ import annotations

import contextlib
import time

import torch


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """Wall-clock seconds per named phase of one epoch, the device synchronised at both ends of a phase.

        clock = PhaseClock(device)
        with clock.phase("validation"):
            ...
        clock.seconds["validation"]
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def elapsed(self) -> float:
        """Seconds since the clock was made (the epoch so far)."""
        return time.perf_counter() - self.started


class StepClock:
    """Data wait and compute time of the steps of one training loop, without a host sync per step.

        clock = StepClock(device)
        batch = clock.next_batch(batches)     # host time blocked on the loader -> data_wait
        clock.step_started(); step(batch); clock.step_finished()
        clock.totals()                        # {"data_wait_s", "compute_s"} (call after a synchronisation)
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.data_wait_s = 0.0
        self._host_compute_s = 0.0
        self._events: list[tuple] = []
        self._start = None

    def next_batch(self, batches):
        """next(batches), its waiting time added to data_wait (StopIteration passes through)."""
        start = time.perf_counter()
        try:
            return next(batches)
        finally:
            self.data_wait_s += time.perf_counter() - start

    def step_started(self) -> None:
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def step_finished(self) -> None:
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._start, end))
        else:
            self._host_compute_s += time.perf_counter() - self._start

    def totals(self) -> dict[str, float]:
        """{"data_wait_s", "compute_s"}: on CUDA the device must have been synchronised since the last step
        (PhaseClock does it when the training phase ends); the event intervals are summed here."""
        compute = self._host_compute_s + sum(start.elapsed_time(end) for start, end in self._events) / 1e3
        return {"data_wait_s": self.data_wait_s, "compute_s": compute}


def epoch_timing(phases: dict[str, float], steps: dict[str, float], epoch_s: float, samples: int) -> dict:
    """The "time" entry of an epoch record: seconds per phase (alr_s, train_s, data_wait_s, compute_s,
    validation_s, checkpoint_s, epoch_s; a phase that did not run is 0) and the two rates."""
    timing = {f"{name}_s": phases.get(name, 0.0) for name in ("alr", "train", "validation", "checkpoint")}
    timing.update(data_wait_s=steps.get("data_wait_s", 0.0), compute_s=steps.get("compute_s", 0.0), epoch_s=epoch_s)
    timing["samples"] = samples
    timing["steps_samples_per_s"] = samples / timing["compute_s"] if timing["compute_s"] > 0 else None
    timing["epoch_samples_per_s"] = samples / epoch_s if epoch_s > 0 else None
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in timing.items()}


def format_timing(timing: dict) -> str:
    """One console fragment: '68.2 s (ALR 1.1, data wait 0.3, compute 66.0, validation 0.5, checkpoint 0.2);
    1010 samples/s steps, 998 samples/s epoch'."""
    parts = [("ALR", "alr_s"), ("data wait", "data_wait_s"), ("compute", "compute_s"),
             ("validation", "validation_s"), ("checkpoint", "checkpoint_s")]
    phases = ", ".join(f"{label} {timing[key]:.1f}" for label, key in parts if timing.get(key))
    rates = [f"{timing[key]:.0f} samples/s {label}" for label, key in
             (("steps", "steps_samples_per_s"), ("epoch", "epoch_samples_per_s")) if timing.get(key)]
    return f"{timing['epoch_s']:.1f} s ({phases}); " + ", ".join(rates)
