"""Compile every Triton kernel for a CUDA target without a GPU: `python -m trpr.kernels.compile_check`.

The CPU interpreter (TRITON_INTERPRET=1) accepts code that the real compiler rejects (for
example a kernel reading a non-constexpr global), so this lowers each kernel through Triton's
NVIDIA backend down to a cubin with the bundled ptxas, for sm_90 (H100/H200) by default. It
needs the triton package with its NVIDIA backend, not a GPU, and must run WITHOUT
TRITON_INTERPRET=1 (it refuses otherwise).

    python -m trpr.kernels.compile_check [--arch 90] [--dtypes fp32 bf16 fp16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

FEATURE_DTYPES = ("fp32", "bf16", "fp16")

MULTIPLE_OF_16 = frozenset({"line_offset", "elem_offset", "n_lines", "n_elems", "n_state_lines", "line_stride",
                            "elem_stride", "row_offset", "n_rows", "n_cols", "n_row_state", "D", "n_gallery"})
"""Integer arguments that are multiples of 16 at the benchmark shapes (B = 8192 / 32768, chunks of
128·k rows, D = 512 / 2048, a 10⁶ gallery): Triton specialises such launches (`tt.divisibility`),
which decides vector widths and layouts, so the check compiles them the same way."""


def specialisation_attrs(fn, signature: dict) -> dict:
    """Triton's launch-time specialisation of kernel `fn` for `signature`: 16-byte aligned pointers
    (every tensor the kernels get is a whole allocation) and the MULTIPLE_OF_16 integers."""
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
            if kind.startswith("*") or (kind == "i32" and name in MULTIPLE_OF_16)}


def kernel_table(dtype: str):
    """[(name, jit function, signature, constexprs + num_warps (+ num_stages))] for features of `dtype`
    ("fp32", "bf16", "fp16"), with the tile sizes and variants the GPU path launches.

    The loss kernels read float32 slabs whatever the features; `dtype` picks the gradient slab's
    type (bf16 for fp16/bf16 features). Retrieval: fp32 features take the score-slab kernel,
    fp16/bf16 the fused tensor-core kernel.
    """
    from . import retrieval, sdm, slab, trl
    grad_type = "*fp32" if dtype == "fp32" else "*bf16"
    f32, i64 = "*fp32", "*i64"
    sizes = {"n_lines": "i32", "n_elems": "i32", "n_state_lines": "i32"}
    line_args = {"S": f32, "LINE_PID": i64, "ELEM_PID": i64, "STATE": f32, "LOSS": f32, "line_offset": "i32",
                 "elem_offset": "i32", **sizes}
    grad_args = {"S": f32, "G": grad_type, "ROW_PID": i64, "COL_PID": i64, "ROW_STATE": f32, "COL_STATE": f32,
                 "GRAD": f32, "row_offset": "i32", "n_rows": "i32", "n_cols": "i32", "n_row_state": "i32"}
    hyper = {"sdm": {"scale": "fp32", "eps": "fp32", "log_eps": "fp32", "has_state": "i32", "final": "i32"},
             "trl": {"inv_tau": "fp32", "tau": "fp32", "margin": "fp32", "has_state": "i32", "final": "i32"}}
    grad_hyper = {"sdm": {"scale": "fp32", "log_eps": "fp32"}, "trl": {"inv_tau": "fp32"}}
    kernels = {"sdm": (sdm._sdm_line_stats_kernel, sdm._sdm_grad_kernel),
               "trl": (trl._trl_line_stats_kernel, trl._trl_grad_kernel)}
    rows_axis, rows_l, rows_e, rows_w = slab.line_blocks(1 << 15, 1 << 15, lines_contiguous=False)
    cols_axis, cols_l, cols_e, cols_w = slab.line_blocks(1 << 15, 1 << 15, lines_contiguous=True)
    grad_m, grad_n, grad_w = slab.grad_blocks(1 << 15, 1 << 15)
    table = []
    for loss, (line_kernel, grad_kernel) in kernels.items():
        # rows: strided lines with contiguous elements (elem_stride specialised to 1, as Triton does
        # at launch); columns: contiguous lines (line_stride = 1); has_state / final are run-time flags
        table.append((f"{loss} row stats", line_kernel,
                      {**line_args, "line_stride": "i32", "elem_stride": "constexpr", **hyper[loss]},
                      dict(elem_stride=1, AXIS=rows_axis, BLOCK_L=rows_l, BLOCK_E=rows_e,
                           num_warps=rows_w)))
        table.append((f"{loss} column stats", line_kernel,
                      {**line_args, "line_stride": "constexpr", "elem_stride": "i32", **hyper[loss]},
                      dict(line_stride=1, AXIS=cols_axis, BLOCK_L=cols_l, BLOCK_E=cols_e,
                           num_warps=cols_w)))
        table.append((f"{loss} gradient", grad_kernel, {**grad_args, **grad_hyper[loss]},
                      dict(BOTH=True, BLOCK_M=grad_m, BLOCK_N=grad_n, num_warps=grad_w)))
    if dtype == "fp32":
        table.append(("retrieval score slab", retrieval._rank_count_slab_kernel,
                      {"SCORES": f32, "MATCH_POS": "*i32", "MATCH_COUNT": "*i32", "ABOVE": "*i32",
                       "query_offset": "i32", "n_gallery": "i32", "slot_base": "i32", "match_stride": "i32"},
                      dict(SLOTS=retrieval.MAX_SLOTS, BLOCK_G=retrieval.SLAB_BLOCK_G, num_warps=4)))
    else:
        block_q, block_g, block_d, warps, stages = retrieval.gpu_fused_blocks()
        slots = retrieval.MAX_SLOTS if dtype == "bf16" else 5     # fp16: the 10^5 x 10^6 benchmark's 5 matches
        table.append((f"retrieval fused, {slots} slots", retrieval._rank_count_fused_kernel,
                      {"Q": f"*{dtype}", "G": f"*{dtype}", "G_ORIGINAL": "*i32", "MATCH_POS": "*i32",
                       "MATCH_COUNT": "*i32", "SPAN_LO": "*i32", "SPAN_HI": "*i32", "ABOVE": "*i32",
                       "n_queries": "i32", "n_gallery": "i32", "D": "i32", "slot_base": "i32",
                       "match_stride": "i32"},
                      dict(SLOTS=slots, BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_D=block_d, UPCAST=False,
                           PRECISION="tf32", num_warps=warps, num_stages=stages)))
    return table


def register_report(compiled) -> str:
    """" (registers R, spill stack S bytes)" from the cubin via the bundled cuobjdump ("" if unavailable)."""
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cubin = compiled.asm.get("cubin") if hasattr(compiled, "asm") else None
    if cubin is None or not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True).stdout
    fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line
                  for item in line.split() if ":" in item)
    return f" (registers {fields.get('REG', '?')}, spill stack {fields.get('STACK', '?')} B)" if fields else ""


def compile_all(arch: int = 90, dtypes=FEATURE_DTYPES, verbose: bool = True) -> list[str]:
    """Compile every kernel for cuda sm_<arch>; returns the failures ("name dtype: error")."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernels.compile_check needs the real compiler: unset TRITON_INTERPRET")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", arch, 32)
    failures = []
    for dtype in dtypes:
        for name, fn, signature, constexprs in kernel_table(dtype):
            constexprs = dict(constexprs)
            options = {"num_warps": constexprs.pop("num_warps")}
            if "num_stages" in constexprs:
                options["num_stages"] = constexprs.pop("num_stages")
            start = time.perf_counter()
            try:
                source = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                   attrs=specialisation_attrs(fn, signature))
                compiled = triton.compile(source, target=target, options=options)
                status = "ok" + register_report(compiled)
            except Exception as err:  # report every kernel, then fail
                status = f"FAILED: {type(err).__name__}: {str(err).strip().splitlines()[-1][:200]}"
                failures.append(f"{name} {dtype}: {status}")
            if verbose:
                print(f"{name:<24} {dtype:<5} sm_{arch}  {time.perf_counter() - start:5.1f}s  {status}", flush=True)
    return failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability ×10 (90 = H100/H200)")
    parser.add_argument("--dtypes", nargs="+", default=list(FEATURE_DTYPES), choices=FEATURE_DTYPES)
    args = parser.parse_args(argv)
    failures = compile_all(args.arch, args.dtypes)
    if failures:
        print(f"{len(failures)} kernel(s) failed to compile", file=sys.stderr)
        sys.exit(1)
    print("all kernels compiled")


if __name__ == "__main__":
    main()
