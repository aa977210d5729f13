"""Compile every Triton kernel for a CUDA target without a GPU: `python -m kernels.compile_check`.

The CPU interpreter (TRITON_INTERPRET=1) accepts code that the real compiler rejects (for
example a kernel reading a non-constexpr global), so this lowers each kernel through Triton's
NVIDIA backend down to a cubin with the bundled ptxas, for sm_90 (H100/H200) by default. It
needs the triton package with its NVIDIA backend, not a GPU, and must run WITHOUT
TRITON_INTERPRET=1 (it refuses otherwise).

    python -m kernels.compile_check [--arch 90] [--dtypes fp32 bf16 fp16]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

FEATURE_DTYPES = ("fp32", "bf16", "fp16")


def kernel_table(dtype: str):
    """[(name, jit function, signature, constexprs)] for features of `dtype` ("fp32", "bf16", "fp16")."""
    from . import retrieval, sdm, trl
    upcast = dtype == "fp32"
    meta = dict(UPCAST=upcast, PRECISION="ieee" if upcast else "tf32")
    tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, **meta)
    feats = {"R": f"*{dtype}", "C": f"*{dtype}", "ROW_PID": "*i64", "COL_PID": "*i64"}
    sizes = {"n_rows": "i32", "n_cols": "i32", "D": "i32"}
    f32 = "*fp32"
    return [
        ("sdm forward", sdm._sdm_forward_kernel,
         {**feats, "LOSS": f32, "LSE": f32, "LOGQ_POS": f32, **sizes, "scale": "fp32", "eps": "fp32",
          "log_eps": "fp32"}, tiles),
        ("sdm backward rows", sdm._sdm_backward_rows_kernel,
         {**feats, "LOSS": f32, "LSE": f32, "LOGQ_POS": f32, "GRAD": f32, "D_ROWS": f32, **sizes,
          "scale": "fp32", "log_eps": "fp32"}, tiles),
        ("sdm backward cols", sdm._sdm_backward_cols_kernel,
         {**feats, "LOSS": f32, "LSE": f32, "LOGQ_POS": f32, "GRAD": f32, "D_COLS": f32, **sizes,
          "scale": "fp32", "log_eps": "fp32"}, tiles),
        ("trl forward", trl._trl_forward_kernel,
         {**feats, "LOSS": f32, "LSE_POS": f32, "LSE_NEG": f32, "ACTIVE": f32, **sizes, "inv_tau": "fp32",
          "tau": "fp32", "margin": "fp32", "no_negative_lse": "fp32"}, tiles),
        ("trl backward rows", trl._trl_backward_rows_kernel,
         {**feats, "LSE_POS": f32, "LSE_NEG": f32, "ACTIVE_GRAD": f32, "D_ROWS": f32, **sizes,
          "inv_tau": "fp32"}, tiles),
        ("trl backward cols", trl._trl_backward_cols_kernel,
         {**feats, "LSE_POS": f32, "LSE_NEG": f32, "ACTIVE_GRAD": f32, "D_COLS": f32, **sizes,
          "inv_tau": "fp32"}, tiles),
        ("retrieval count", retrieval._count_above_kernel,
         {"Q": f"*{dtype}", "G": f"*{dtype}", "G_ORIGINAL": "*i32", "MATCH_START": "*i32", "MATCH_COUNT": "*i32",
          "SPAN_LO": "*i32", "SPAN_HI": "*i32", "ABOVE": "*i32", "n_queries": "i32", "n_gallery": "i32",
          "D": "i32", "slot_base": "i32", "n_slots": "i32", "above_stride": "i32"},
         dict(BLOCK_Q=64, BLOCK_G=128, BLOCK_D=64, SLOTS=4, **meta)),
    ]


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
            start = time.perf_counter()
            try:
                triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                               options={"num_warps": 4})
                status = "ok"
            except Exception as err:  # report every kernel, then fail
                status = f"FAILED: {type(err).__name__}: {str(err).strip().splitlines()[-1][:200]}"
                failures.append(f"{name} {dtype}: {status}")
            if verbose:
                print(f"{name:<20} {dtype:<5} sm_{arch}  {time.perf_counter() - start:5.1f}s  {status}", flush=True)
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
