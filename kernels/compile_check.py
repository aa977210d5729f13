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
    """[(name, jit function, signature, constexprs + num_warps)] for features of `dtype` ("fp32", "bf16",
    "fp16"), with the tile sizes the GPU path launches."""
    import torch

    from . import retrieval, sdm, trl
    from .similarity_tiles import gpu_blocks
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    upcast = dtype == "fp32"
    meta = dict(UPCAST=upcast, PRECISION="ieee" if upcast else "tf32")
    block_m, block_n, block_d, warps = gpu_blocks(torch_dtype)
    tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, **meta)
    block_q, block_g, block_dq, warps_q = retrieval.gpu_retrieval_blocks(torch_dtype, 10**5)
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
         dict(BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_D=block_dq, SLOTS=8, num_warps=warps_q, **meta)),
    ]


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
            warps = constexprs.pop("num_warps")
            start = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                          target=target, options={"num_warps": warps})
                status = "ok" + register_report(compiled)
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
