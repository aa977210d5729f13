"""The one timing helper of every benchmark script (kernels, retrieval, encoders, training throughput).

    time_call(fn, device, repeats, grad_to_none=None) -> {"ms": median, "min_ms": fastest}
    time_steps(fn, device, steps, warmup=1, before=None) -> {"ms", "min_ms", "total_s"}: every call timed alone
    time_sequence(fn, device, steps, warmup=1) -> {"ms", "total_s"}: the calls timed as one sequence
    peak_extra_mib(fn, device) -> extra CUDA MiB of one call (None on the CPU)
    guarded(measure) -> {"status": "ok" | "OOM" | "error: ...", **measure()}
    device_name(device) -> the card's name, or "CPU <processor> (<n> threads)"
    matmul_tflops(device, dtype, size) -> measured TFLOP/s of one size³ matrix product (a device's peak)

`time_call`: on a GPU `triton.testing.do_bench` times the call (CUDA events, L2 flushed between calls); on
the CPU `time_steps` after one warm-up call. `time_steps` (long or stateful calls such as training steps,
where do_bench's call-count estimate does not apply): `time.perf_counter` around each call, the device
synchronised before and after. Milliseconds throughout (seconds for total_s).
"""
from __future__ import annotations

import platform
import statistics
import sys
import time

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()} ({threads} thread{'' if threads == 1 else 's'})"


def time_call(fn, device, repeats, grad_to_none=None) -> dict:
    """{"ms": median, "min_ms": fastest} milliseconds of fn() after warm-up."""
    if device.type == "cuda":
        import triton.testing
        median, fastest = triton.testing.do_bench(fn, warmup=10, rep=max(20, 10 * repeats),
                                                  grad_to_none=grad_to_none, quantiles=[0.5, 0.0])
        return {"ms": float(median), "min_ms": float(fastest)}

    def clear_grads():
        for t in grad_to_none:
            t.grad = None

    timed = time_steps(fn, device, repeats, warmup=1, before=clear_grads if grad_to_none else None)
    return {"ms": timed["ms"], "min_ms": timed["min_ms"]}


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device, steps, warmup=1, before=None) -> dict:
    """{"ms": median, "min_ms": fastest, "total_s": sum} of `steps` calls of fn() after `warmup` untimed
    calls, each timed on its own with the device synchronised around it; before() runs untimed first."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(steps):
        if before is not None:
            before()
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return {"ms": statistics.median(samples), "min_ms": min(samples), "total_s": sum(samples) / 1e3}


def time_sequence(fn, device, steps, warmup=1) -> dict:
    """{"ms": mean per call, "total_s"} of `steps` calls of fn() run back to back after `warmup` untimed
    calls, the device synchronised only before the first and after the last (calls that never wait on the
    device, such as training steps, overlap their host work with the device's as they do in training)."""
    for _ in range(warmup):
        fn()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _synchronize(device)
    total = time.perf_counter() - start
    return {"ms": total / steps * 1e3, "total_s": total}


def peak_extra_mib(fn, device):
    """Extra CUDA memory (MiB) that one call of fn allocates at its peak; None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def guarded(measure):
    """Run measure() -> dict; out-of-memory becomes {"status": "OOM"}, any other error its text (printed)."""
    try:
        return {"status": "ok", **measure()}
    except torch.OutOfMemoryError:
        return {"status": "OOM"}
    except Exception as err:     # a CPU allocation failure, or any error: recorded, the run goes on
        text = str(err).strip()
        if "out of memory" in text.lower() or "not enough memory" in text.lower():
            return {"status": "OOM"}
        first_line = text.splitlines()[0][:120] if text else ""
        print(f"benchmark case failed: {type(err).__name__}: {text[:2000]}", file=sys.stderr)
        return {"status": f"error: {type(err).__name__}: {first_line}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def matmul_tflops(device, dtype, size: int = 8192) -> float:
    """TFLOP/s of a [size, size] @ [size, size] product in `dtype` on random data (median of
    `time_call`), the ceiling a GEMM-bound kernel is measured against (datasheet rates are leads)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    timing = time_call(lambda: a @ b, device, repeats=3)
    return 2.0 * size ** 3 / (timing["ms"] * 1e-3) / 1e12
