"""Kernel benchmark: `python -m trpr.benchmarks.bench_kernels [--quick] [--out DIR] [--budget-s S]`.

Measures on this machine (CUDA if visible, else CPU), forward + backward of the per-sample losses
with per-sample weights (as in training), and the retrieval metrics:

  * SDM and TRL: the Triton path (`backend="triton"`: cuBLAS slabs + Triton kernels), the PyTorch
    reference ("eager") and `torch.compile(reference, dynamic=False)` compiled once per shape,
    beside the GEMM bound: the 4 B×B×D products (8·B²·D FLOP) at this device's measured matrix
    rate (`benchmarks.timing.matmul_tflops`: bf16 on a GPU, float32 on the CPU). Ratios:
    compile ÷ triton and eager ÷ triton (speed-ups), triton ÷ bound (distance to the bound).
  * Retrieval at CUHK-PEDES size (6,156 × 3,074, D = 512, float32): Triton vs the full-matrix
    stable sort (IRRA's protocol) vs the chunked PyTorch path, metrics compared exactly; and
    10⁵ queries × 10⁶ images (fp16, the fused kernel): one warm-up + one timed run, its ranks
    compared on 2,000 sampled queries with float32 scores of the same features.

`--quick` (for scripts/gpu_check.sh, ≤ 90 s on an H100 including every compilation): D = 2048 at
B ∈ {128, 1024, 8192, 32768}, torch.compile at B = 8192 only, both retrieval sizes. Order: Triton and
eager loss rows first, then retrieval, then the compile cases, which are skipped (and said so) once
`--budget-s` would be exceeded, or all with `--compile off`. The report files are rewritten after every
row, so a run killed part-way keeps every row it finished. Fallbacks (the slabs' out_dtype probe failed,
compile off, Triton missing) are listed in the report's notes as "FALLBACK: ...". Without `--quick`:
B ∈ {128, 1024, 8192, 32768} × D ∈ {512, 2048} (CPU: B ≤ 1024), compile at every shape.
On the CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set here): their
times check the path end to end, they are no speed figure; the CPU retrieval skips Triton.

Timing: `benchmarks.timing.time_call` (do_bench median on a GPU, perf_counter median on the CPU),
rotating over three input sets. Results: <out>/kernels_<cpu|gpu>[_quick].{md,json} (default out:
./bench_out, never a tracked folder unless asked, e.g. `--out docs/benchmarks`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from trpr.benchmarks.timing import device_name, guarded, matmul_tflops, peak_extra_mib, time_call
from trpr.runtime.atomic import atomic_write_text

DEFAULT_OUT = "bench_out"
N_INPUT_SETS = 3
CUHK = ("CUHK-PEDES", 6156, 3074, 512, 1000, torch.float32)        # queries, gallery, D, identities
LARGE = ("10^5 x 10^6", 100_000, 1_000_000, 512, 200_000, torch.float16)
LARGE_CHECK_QUERIES = 2000
COMPILE_ESTIMATE_S = 30.0
"""Expected seconds to compile one reference loss (forward + backward) with torch.compile on a GPU
host; a compile case starts only if the time budget leaves this much."""


def loss_cases(on_gpu: bool, quick: bool):
    """[(B, D, with_compile)] in the order they run."""
    if quick:
        return [(128, 2048, False), (1024, 2048, False), (8192, 2048, True), (32768, 2048, False)] if on_gpu \
            else [(128, 512, False), (1024, 512, True)]
    batches = (128, 1024, 8192, 32768) if on_gpu else (128, 1024)
    return [(b, d, True) for d in (512, 2048) for b in batches]


# ----------------------------------------------------------------------------- losses
def loss_inputs(batch, dim, device, dtype, seed):
    """Un-normalised features [B, D] (leaves with grad), pids with ~2 samples per identity, weights."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pids = torch.randint(0, max(1, batch // 2), (batch,), generator=gen).to(device)
    text = torch.randn(batch, dim, generator=gen).to(device, dtype).requires_grad_()
    image = torch.randn(batch, dim, generator=gen).to(device, dtype).requires_grad_()
    weights = torch.rand(batch, generator=gen).to(device)
    return text, image, pids, weights


def loss_functions(loss: str):
    """{impl: fn(text, image, pids, weights=...)} of one loss; "torch.compile" is built per shape."""
    from trpr import kernels
    from trpr.kernels.reference import sdm_loss_reference, trl_loss_reference
    public = {"sdm": kernels.sdm_loss, "trl": kernels.trl_loss}[loss]
    reference = {"sdm": sdm_loss_reference, "trl": trl_loss_reference}[loss]
    return {"triton": lambda *a, **k: public(*a, backend="triton", **k), "eager": reference}, reference


def measure_loss(fn, batch, dim, device, dtype, repeats):
    """{"ms", "min_ms", "peak_mib"} of fn's forward + backward (weighted loss summed)."""
    sets = [loss_inputs(batch, dim, device, dtype, seed) for seed in range(N_INPUT_SETS)]
    rotation = itertools.cycle(sets)

    def step():
        text, image, pids, weights = next(rotation)
        fn(text, image, pids, weights=weights).sum().backward()

    leaves = [t for s in sets for t in s[:2]]
    timing = time_call(step, device, repeats, grad_to_none=leaves)
    return {**timing, "peak_mib": peak_extra_mib(step, device)}


def bench_losses(device, cases, repeats, dtype, peak_tflops, progress, emit) -> list:
    """Triton and eager rows {loss, B, D, impl, status, ms, ...} of every case, each passed to `emit` as soon
    as it is measured (the caller writes the report then). Returns the compile jobs [(loss, B, D, reference)]
    for `bench_compiled`, which runs them last."""
    compile_jobs = []
    for loss in ("sdm", "trl"):
        impls, reference = loss_functions(loss)
        for batch, dim, with_compile in cases:
            bound = 8.0 * batch * batch * dim / (peak_tflops * 1e12) * 1e3
            emit({"loss": loss, "B": batch, "D": dim, "impl": "GEMM bound", "status": "ok", "ms": bound})
            for impl, fn in impls.items():
                progress.set_postfix_str(f"{loss} B={batch} D={dim} {impl}")
                emit({"loss": loss, "B": batch, "D": dim, "impl": impl,
                      **guarded(lambda: measure_loss(fn, batch, dim, device, dtype, repeats))})
                progress.update()
            if with_compile:
                compile_jobs.append((loss, batch, dim, reference))
    return compile_jobs


def bench_compiled(device, compile_jobs, repeats, dtype, deadline, progress, emit, enabled: bool = True) -> None:
    """torch.compile rows of `compile_jobs`, each emitted when measured; a job that would start with less
    than COMPILE_ESTIMATE_S left before `deadline`, or all of them when not `enabled`, is emitted as skipped."""
    for loss, batch, dim, reference in compile_jobs:
        progress.set_postfix_str(f"{loss} B={batch} D={dim} torch.compile")
        base = {"loss": loss, "B": batch, "D": dim, "impl": "torch.compile"}
        if not enabled:
            emit({**base, "status": "skipped (--compile off)"})
            continue
        if deadline is not None and time.monotonic() + COMPILE_ESTIMATE_S > deadline:
            emit({**base, "status": "skipped (time budget)"})
            continue

        def compiled_measure():
            compiled = torch.compile(reference, dynamic=False)
            text, image, pids, weights = loss_inputs(batch, dim, device, dtype, seed=99)
            start = time.perf_counter()
            compiled(text, image, pids, weights=weights).sum().backward()       # compiles forward + backward
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compile_s = time.perf_counter() - start
            return {**measure_loss(compiled, batch, dim, device, dtype, repeats), "compile_s": compile_s}

        emit({**base, **guarded(compiled_measure)})
        progress.update()


def fallback_notes(device, compile_enabled: bool) -> list[str]:
    """One "FALLBACK: ..." line per way this run measures something other than the fast path: the
    slabs' bf16 products upcast (out_dtype probe failed), torch.compile off, Triton missing."""
    from trpr.kernels import triton_available
    from trpr.kernels.slab import gemm_path

    notes = []
    if not triton_available():
        notes.append("FALLBACK: triton is not installed: the triton rows fail and retrieval skips Triton")
    elif device.type == "cuda":
        path, fallback = gemm_path(device)
        if fallback:
            notes.append(path)
    if not compile_enabled:
        notes.append("FALLBACK: torch.compile off (--compile off): no compile column")
    return notes


# ----------------------------------------------------------------------------- retrieval
def retrieval_problem(n_queries, n_gallery, dim, n_ids, device, dtype, seed):
    """Normalised features with identity structure: queries [Nq,D], gallery [Ng,D], their pids."""
    gen = torch.Generator(device=device).manual_seed(seed)
    gallery_pids = torch.arange(n_gallery, device=device) % n_ids
    query_pids = gallery_pids[torch.randint(0, n_gallery, (n_queries,), device=device, generator=gen)]
    centres = torch.randn(n_ids, dim, device=device, generator=gen)
    gallery = torch.nn.functional.normalize(centres[gallery_pids] + torch.randn(n_gallery, dim, device=device,
                                                                                generator=gen), dim=1)
    queries = torch.nn.functional.normalize(centres[query_pids] + 5.0 * torch.randn(n_queries, dim, device=device,
                                                                                    generator=gen), dim=1)
    return queries.to(dtype), gallery.to(dtype), query_pids, gallery_pids


def sort_baseline(queries, gallery, query_pids, gallery_pids, **kw):
    """Full float32 score matrix + stable sort (the community's evaluation)."""
    from trpr.kernels.reference import retrieval_metrics_from_scores
    return retrieval_metrics_from_scores(queries.float() @ gallery.float().t(), query_pids, gallery_pids, **kw)


def _synchronized(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_retrieval(device, repeats, sizes, progress):
    from trpr.kernels.reference import retrieval_metrics_reference
    impls = {"sort (full matrix)": sort_baseline, "chunked torch": retrieval_metrics_reference}
    if device.type == "cuda":
        from trpr.kernels.retrieval import retrieval_metrics_triton
        impls["triton"] = retrieval_metrics_triton
    rows = []
    for label, n_q, n_g, dim, n_ids, dtype in sizes:
        large = n_g >= 10**6
        problems = [retrieval_problem(n_q, n_g, dim, n_ids, device, dtype, seed)
                    for seed in range(1 if large else N_INPUT_SETS)]
        base = {"size": label, "dtype": str(dtype).replace("torch.", "")}
        sort_metrics = None
        for impl, fn in impls.items():
            progress.set_postfix_str(f"retrieval {label} {impl}")
            if large and impl != "triton":
                rows.append({**base, "impl": impl, "status": "skipped (a 400 GB score matrix / hours)"})
                continue

            def measure():
                rotation = itertools.cycle(problems)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if large:          # one warm-up run (compiles the kernel), one timed run
                        fn(*problems[0])
                        _synchronized(device)
                        start = time.perf_counter()
                        metrics = fn(*problems[0], per_query=True)
                        _synchronized(device)
                        return {"ms": (time.perf_counter() - start) * 1e3, "metrics": metrics,
                                **large_rank_check(problems[0], metrics)}
                    timing = time_call(lambda: fn(*next(rotation)), device, repeats)
                    return {**timing, "metrics": fn(*problems[0])}

            row = {**base, "impl": impl, **guarded(measure)}
            metrics = row.pop("metrics", None)
            if metrics is not None:
                row["metrics"] = {k: metrics[k] for k in ("R1", "R5", "R10", "mAP", "mINP")}
                if impl.startswith("sort"):
                    sort_metrics = row["metrics"]
                elif sort_metrics is not None:
                    row["identical_to_sort"] = row["metrics"] == sort_metrics
            rows.append(row)
            progress.update()
        del problems
    return rows


def large_rank_check(problem, metrics):
    """Per-query first ranks and AP of the first LARGE_CHECK_QUERIES queries against float32
    scores of the same features (score-slab kernel): how many queries differ."""
    from trpr.kernels.retrieval import retrieval_metrics_triton
    queries, gallery, query_pids, gallery_pids = problem
    n = min(LARGE_CHECK_QUERIES, queries.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check = retrieval_metrics_triton(queries[:n].float(), gallery.float(), query_pids[:n], gallery_pids,
                                         per_query=True)
    same = (check["first_rank"] == metrics["first_rank"][:n]) & torch.isclose(
        check["AP"], metrics["AP"][:n], rtol=1e-12, atol=0, equal_nan=True)
    return {"checked_queries": n, "differing_queries": int((~same).sum())}


# ----------------------------------------------------------------------------- report
def _fmt(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def loss_table(rows) -> list[str]:
    """Markdown rows: one line per (loss, B, D) with the implementations side by side."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["loss"], r["B"], r["D"]), {})[r["impl"]] = r
    lines = ["| loss | B | D | triton ms | eager ms | compile ms | GEMM bound ms | compile ÷ triton | eager ÷ triton "
             "| triton ÷ bound | triton MiB | eager MiB | compile MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(impl_row):
        if impl_row is None:
            return None, "–"
        if impl_row["status"] != "ok":
            return None, impl_row["status"]
        return impl_row["ms"], _fmt(impl_row["ms"])

    def ratio(a, b):
        return "–" if a is None or b is None else f"{a / b:.2f}x"

    for (loss, batch, dim), impls in by_case.items():
        (t, t_s), (e, e_s), (c, c_s), (g, g_s) = (ms(impls.get(k)) for k in
                                                  ("triton", "eager", "torch.compile", "GEMM bound"))
        mib = [_fmt((impls.get(k) or {}).get("peak_mib"), 0) for k in ("triton", "eager", "torch.compile")]
        lines.append(f"| {loss} | {batch} | {dim} | {t_s} | {e_s} | {c_s} | {_fmt(g, 3)} | {ratio(c, t)} "
                     f"| {ratio(e, t)} | {ratio(t, g)} | {' | '.join(mib)} |")
    return lines


def retrieval_table(rows) -> list[str]:
    sort_ms = {r["size"]: r["ms"] for r in rows if r["impl"].startswith("sort") and r.get("status") == "ok"}
    lines = ["| size | impl | dtype | median ms | sort ÷ impl | R1 | mAP | mINP | identical to sort | status |",
             "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        m = r.get("metrics") or {}
        speed = sort_ms.get(r["size"])
        ratio = f"{speed / r['ms']:.1f}x" if speed and r.get("ms") else "–"
        same = r.get("identical_to_sort")
        if "differing_queries" in r:
            same = f"{r['checked_queries'] - r['differing_queries']} of {r['checked_queries']} sampled queries " \
                   "rank as with float32 scores"
        lines.append(f"| {r['size']} | {r['impl']} | {r['dtype']} | {_fmt(r.get('ms'), 1)} | {ratio} "
                     f"| {_fmt(m.get('R1'))} | {_fmt(m.get('mAP'))} | {_fmt(m.get('mINP'))} "
                     f"| {'–' if same is None else same} | {r['status']} |")
    return lines


def to_markdown(report) -> str:
    lines = [f"# Kernel benchmark — {report['device']}", "",
             f"torch {report['torch']}, triton {report['triton']}, {report['date']}, mode {report['mode']}, "
             f"{report['wall_s']:.0f} s wall", ""]
    lines += [f"- {note}" for note in report["notes"]] + [""]
    lines += ["## SDM / TRL forward + backward (median ms)", ""] + loss_table(report["losses"])
    compile_s = [f"{r['loss']} B={r['B']} D={r['D']}: {r['compile_s']:.0f} s" for r in report["losses"]
                 if r.get("compile_s") is not None]
    if compile_s:
        lines += ["", "torch.compile warm-up: " + "; ".join(compile_s)]
    lines += ["", "## Retrieval metrics", ""] + retrieval_table(report["retrieval"])
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the GPU-check subset (<= 90 s on an H100)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the markdown + JSON results")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats (CPU); a GPU's do_bench runs for 10 x repeats ms (default 3, quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget: compile cases that would pass it are skipped (quick default 85)")
    parser.add_argument("--skip-retrieval", action="store_true")
    parser.add_argument("--compile", choices=["on", "off"], default="on",
                        help="torch.compile rows (run last, within --budget-s); off: skipped and said so")
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is imported
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 3)
    budget = args.budget_s if args.budget_s is not None else (85.0 if args.quick else None)
    deadline = None if budget is None else start + budget
    dtype = torch.bfloat16 if on_gpu else torch.float32
    peak = matmul_tflops(device, dtype, 8192 if on_gpu else 1024)
    cases = loss_cases(on_gpu, args.quick)
    sizes = [] if args.skip_retrieval else ([CUHK, LARGE] if on_gpu else [CUHK])
    notes = [f"Loss inputs {str(dtype).replace('torch.', '')} [B, D] with per-sample weights; pids ~2 samples per "
             "identity. triton = `backend=\"triton\"` (cuBLAS similarity slabs + Triton kernels).",
             f"GEMM bound = 8·B²·D FLOP (4 B×B×D products) at {peak:.3g} TFLOP/s, the measured rate of a "
             f"{'8192' if on_gpu else '1024'}³ {str(dtype).replace('torch.', '')} matrix product on this device.",
             f"Times: median of {'do_bench' if on_gpu else 'perf_counter'} runs ({repeats} repeats), "
             f"{N_INPUT_SETS} rotated input sets; MiB = extra peak CUDA memory of one call."]
    if not on_gpu:
        notes.append("CPU: the triton column runs the Triton interpreter (TRITON_INTERPRET=1): a check of the path, "
                     "not a speed figure. Load average at start "
                     f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    report = {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "mode": "quick" if args.quick else "full",
              "peak_tflops": peak, "notes": notes, "losses": [], "retrieval": [], "wall_s": 0.0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{'gpu' if on_gpu else 'cpu'}{'_quick' if args.quick else ''}"

    def write():     # after every row, so that a run cut short keeps what it measured
        report["wall_s"] = time.monotonic() - start
        for suffix, text in ((".md", to_markdown(report)), (".json", json.dumps(report, indent=2, default=str))):
            atomic_write_text(out / f"{stem}{suffix}", text)   # a rename: never a half-written report

    def emit(row):   # every row is written as it comes in: a run killed later keeps what it measured
        report["losses"].append(row)
        write()

    compile_enabled = args.compile == "on"
    write()
    n_jobs = 2 * (2 * len(cases) + sum(c for _, _, c in cases)) + 3 * len(sizes)
    with tqdm(total=n_jobs, desc="kernel benchmark", unit="case", disable=None) as progress:
        compile_jobs = bench_losses(device, cases, repeats, dtype, peak, progress, emit)
        report["notes"] += fallback_notes(device, compile_enabled)    # after the first slab products ran
        write()
        if sizes:
            report["retrieval"] = bench_retrieval(device, repeats, sizes, progress)
            write()
        bench_compiled(device, compile_jobs, repeats, dtype, deadline, progress, emit, compile_enabled)
        write()
    print(to_markdown(report))
    print(f"written: {out / stem}.md and .json ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
