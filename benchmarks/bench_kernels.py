"""Kernel benchmark: `python -m kernels.bench [--out docs/benchmarks]`.

Measures, on the current machine (CUDA if visible, else CPU):
  * SDM and TRL per-sample losses, forward + backward, at B ∈ {128, 1024, 8192, 32768} and
    D ∈ {512, 2048}: Triton vs PyTorch eager (`kernels.reference`) vs `torch.compile(reference)`,
    median time and extra peak memory; out-of-memory is reported as "OOM".
  * Retrieval metrics at CUHK-PEDES size (6,156 queries × 3,074 images, D = 512) and at
    10⁵ queries × 10⁶ images: Triton rank counting vs the sort-based baseline (full score
    matrix + stable sort, `retrieval_metrics_from_scores`) and the chunked PyTorch path.

Method: a warm-up call first, then the median of repeated runs (`triton.testing.do_bench` on a
GPU; `time.perf_counter` on the CPU), rotating over three independently drawn input sets so
that no cache holds one answer. The device name is written in the output.

On a CPU only the reference paths run, at B ≤ 1024, plus the CPU retrieval comparison (chunked
vs full sort at CUHK size); Triton and torch.compile timings need a GPU.
Writes <out>/kernels_<device-tag>.md and .json and prints the markdown.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.timing import device_name, guarded, peak_extra_mib, time_call

from . import triton_available
from .reference import (retrieval_metrics_from_scores, retrieval_metrics_reference, sdm_loss_reference,
                        trl_loss_reference)

GPU_BATCHES = (128, 1024, 8192, 32768)
CPU_BATCHES = (128, 1024)
DIMS = (512, 2048)
CUHK = (6156, 3074, 512, 1000)              # queries, gallery, D, identities
LARGE = (100_000, 1_000_000, 512, 200_000)
N_INPUT_SETS = 3


# ----------------------------------------------------------------------------- losses
def loss_implementations(device):
    """{loss: {impl: fn(text, image, pids) -> [b]}} available on this device."""
    impls = {"sdm": {"eager": sdm_loss_reference}, "trl": {"eager": trl_loss_reference}}
    if device.type == "cuda" and triton_available():
        from .sdm import sdm_loss_triton
        from .trl import trl_loss_triton
        impls["sdm"]["triton"] = sdm_loss_triton
        impls["trl"]["triton"] = trl_loss_triton
        impls["sdm"]["torch.compile"] = torch.compile(sdm_loss_reference, dynamic=True)
        impls["trl"]["torch.compile"] = torch.compile(trl_loss_reference, dynamic=True)
    return impls


def loss_inputs(batch, dim, device, dtype, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pids = torch.randint(0, max(1, batch // 2), (batch,), generator=gen).to(device)
    text = torch.randn(batch, dim, generator=gen).to(device, dtype).requires_grad_()
    image = torch.randn(batch, dim, generator=gen).to(device, dtype).requires_grad_()
    return text, image, pids


def bench_losses(device, batches, dims, repeats, dtype):
    rows = []
    impls = loss_implementations(device)
    jobs = [(loss, dim, batch, impl) for loss in impls for dim in dims for batch in batches for impl in impls[loss]]
    for loss, dim, batch, impl in tqdm(jobs, desc="losses fwd+bwd", unit="case"):
        fn = impls[loss][impl]

        def measure():
            sets = [loss_inputs(batch, dim, device, dtype, seed) for seed in range(N_INPUT_SETS)]
            rotation = itertools.cycle(sets)

            def step():
                text, image, pids = next(rotation)
                fn(text, image, pids).sum().backward()

            leaves = [t for s in sets for t in s[:2]]
            timing = time_call(step, device, repeats, grad_to_none=leaves)
            return {**timing, "peak_mib": peak_extra_mib(step, device)}

        rows.append({"loss": loss, "B": batch, "D": dim, "impl": impl, "dtype": str(dtype).replace("torch.", ""),
                     **guarded(measure)})
    return rows


# ----------------------------------------------------------------------------- retrieval
def retrieval_problem(n_queries, n_gallery, dim, n_ids, device, dtype, seed):
    """Normalised features with identity structure: gallery [Ng,D], queries [Nq,D], pids."""
    gen = torch.Generator(device=device).manual_seed(seed)
    gallery_pids = torch.arange(n_gallery, device=device) % n_ids
    query_pids = gallery_pids[torch.randint(0, n_gallery, (n_queries,), device=device, generator=gen)]
    centres = torch.randn(n_ids, dim, device=device, generator=gen)
    gallery = torch.nn.functional.normalize(centres[gallery_pids] + torch.randn(n_gallery, dim, device=device,
                                                                                generator=gen), dim=1)
    queries = torch.nn.functional.normalize(centres[query_pids] + 5.0 * torch.randn(n_queries, dim, device=device,
                                                                                    generator=gen), dim=1)
    return queries.to(dtype), gallery.to(dtype), query_pids, gallery_pids


def sort_baseline(queries, gallery, query_pids, gallery_pids):
    """Full score matrix + stable sort (the community's evaluation)."""
    return retrieval_metrics_from_scores(queries.float() @ gallery.float().t(), query_pids, gallery_pids)


def single_threaded(fn):
    """fn run with one intra-op thread (a fair CPU comparison on a loaded, shared machine)."""
    def run(*args):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(threads)
    return run


def bench_retrieval(device, repeats, include_large):
    impls = {"sort (full matrix)": sort_baseline, "chunked torch": retrieval_metrics_reference}
    if device.type == "cpu" and torch.get_num_threads() > 1:
        impls["sort (full matrix), 1 thread"] = single_threaded(sort_baseline)
        impls["chunked torch, 1 thread"] = single_threaded(retrieval_metrics_reference)
    if device.type == "cuda" and triton_available():
        from .retrieval import retrieval_metrics_triton
        impls["triton"] = retrieval_metrics_triton
    sizes = [("CUHK-PEDES", CUHK, torch.float32)]
    if include_large:
        sizes.append(("10^5 x 10^6", LARGE, torch.float16))
    rows = []
    for label, (n_q, n_g, dim, n_ids), dtype in sizes:
        large = n_g >= 10**6
        problems = [retrieval_problem(n_q, n_g, dim, n_ids, device, dtype, seed)
                    for seed in range(1 if large else N_INPUT_SETS)]
        reference_metrics = None
        for impl, fn in tqdm(impls.items(), desc=f"retrieval {label}", unit="impl"):
            if large and impl == "chunked torch":
                rows.append({"size": label, "impl": impl, "dtype": "float16",
                             "status": "skipped (hours on 10^11 pairs)"})
                continue

            def measure():
                nonlocal reference_metrics
                rotation = itertools.cycle(problems)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if large:      # one warm-up run (compiles this shape's kernel variant), one timed run
                        fn(*problems[0])
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        start = time.perf_counter()
                        metrics = fn(*problems[0])
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        timing = {"ms": (time.perf_counter() - start) * 1e3}
                    else:
                        timing = time_call(lambda: fn(*next(rotation)), device, repeats)
                        metrics = fn(*problems[0])
                if reference_metrics is None:
                    reference_metrics = metrics
                    return {**timing, "metrics": metrics, "same_metrics_as_first": None}
                same = all(abs(metrics[k] - reference_metrics[k]) < 1e-9 for k in ("R1", "R5", "R10", "mAP", "mINP"))
                return {**timing, "metrics": metrics, "same_metrics_as_first": same}

            rows.append({"size": label, "impl": impl, "dtype": str(dtype).replace("torch.", ""), **guarded(measure)})
        del problems
    return rows


# ----------------------------------------------------------------------------- report
def _fmt(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def to_markdown(report) -> str:
    lines = [f"# Kernel benchmark — {report['device']}", "",
             f"torch {report['torch']}, triton {report['triton']}, {report['date']}", ""]
    lines += [f"- {note}" for note in report["notes"]] + [""]
    lines += ["## SDM / TRL forward + backward", "",
              "| loss | B | D | impl | dtype | median ms | min ms | extra peak MiB | status |",
              "|---|---:|---:|---|---|---:|---:|---:|---|"]
    for r in report["losses"]:
        lines.append(f"| {r['loss']} | {r['B']} | {r['D']} | {r['impl']} | {r['dtype']} | {_fmt(r.get('ms'), 2)} "
                     f"| {_fmt(r.get('min_ms'), 2)} | {_fmt(r.get('peak_mib'))} | {r['status']} |")
    lines += ["", "## Retrieval metrics", "",
              "| size | impl | dtype | median ms | min ms | R1 | mAP | mINP | same metrics as first row | status |",
              "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in report["retrieval"]:
        m = r.get("metrics") or {}
        same = r.get("same_metrics_as_first")
        lines.append(f"| {r['size']} | {r['impl']} | {r['dtype']} | {_fmt(r.get('ms'), 1)} "
                     f"| {_fmt(r.get('min_ms'), 1)} "
                     f"| {_fmt(m.get('R1'), 2)} | {_fmt(m.get('mAP'), 2)} | {_fmt(m.get('mINP'), 2)} "
                     f"| {'–' if same is None else same} | {r['status']} |")
    speedups = retrieval_speedups(report["retrieval"])
    if speedups:
        lines += [""] + [f"- {s}" for s in speedups]
    return "\n".join(lines) + "\n"


def retrieval_speedups(rows):
    by_key = {(r["size"], r["impl"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for (size, impl), row in by_key.items():
        suffix = ", 1 thread" if impl.endswith(", 1 thread") else ""
        base = by_key.get((size, "sort (full matrix)" + suffix))
        if not impl.startswith("sort") and base:
            ratio = f"{base['ms'] / row['ms']:.1f}x (median)"
            if row.get("min_ms") and base.get("min_ms"):
                ratio += f", {base['min_ms'] / row['min_ms']:.1f}x (min)"
            out.append(f"{size}: {impl} is {ratio} faster than the full sort")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks", help="folder for the markdown + JSON results")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats on the CPU; on a GPU do_bench runs for 10 x repeats ms")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for the whole run (default: torch's own choice)")
    parser.add_argument("--skip-large-retrieval", action="store_true", help="GPU: skip the 10^5 x 10^6 case")
    args = parser.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    notes = []
    if on_gpu:
        notes.append("Loss inputs are bfloat16 (the training dtype); the eager reference upcasts to float32 inside.")
        notes.append("GPU times: triton.testing.do_bench median (and min); 10^5 x 10^6 retrieval: one timed run "
                     "after one warm-up run.")
    else:
        notes.append("CPU run: reference paths only at B <= 1024. Triton and torch.compile timings need a GPU "
                     "(`bash scripts/gpu_check.sh`).")
        notes.append(f"CPU times: median (and min) of {args.repeats} runs (retrieval: {min(args.repeats, 3)}) "
                     f"after one warm-up, {N_INPUT_SETS} rotated input sets; load average at start "
                     f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine inflates the median).")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    report = {
        "device": device_name(device), "torch": torch.__version__, "triton": triton_version,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "notes": notes, "losses": [], "retrieval": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if on_gpu else "cpu"

    def write():     # after each section, so that a run cut short by a time limit keeps what it measured
        (out / f"kernels_{tag}.md").write_text(to_markdown(report))
        (out / f"kernels_{tag}.json").write_text(json.dumps(report, indent=2, default=str))

    report["losses"] = bench_losses(device, GPU_BATCHES if on_gpu else CPU_BATCHES, DIMS, args.repeats,
                                    torch.bfloat16 if on_gpu else torch.float32)
    write()
    report["retrieval"] = bench_retrieval(device, args.repeats if on_gpu else min(args.repeats, 3),
                                          include_large=on_gpu and not args.skip_large_retrieval)
    write()
    print(to_markdown(report))
    print(f"written: {out / f'kernels_{tag}.md'} and .json")


if __name__ == "__main__":
    main()
