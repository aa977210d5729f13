"""Preflight of scripts/gpu_check.sh: is this machine able to run the steps that follow? (<= 10 s)

    python -m trpr.benchmarks.preflight [--status FILE] [--require-cuda]

Prints the versions (python, torch + its CUDA, triton, transformers, huggingface_hub, accelerate,
datasets) and one line per check, and appends "<check> ok|fail|absent" lines to FILE as each check
ends (a check killed by the time limit leaves no line: unknown, and the script runs its steps anyway):

  cuda      a CUDA device answers (a 1-element product, synchronised); "absent" without CUDA
            (a failure with --require-cuda)
  triton    a 1-element Triton kernel launches and returns the right value: on CUDA, or in the
            interpreter (TRITON_INTERPRET=1) on the CPU. Triton builds a C launcher at its first launch
            and needs a C compiler and Python.h: the failure line says which is missing.
  datasets  `import datasets` (the GPU image lacks it: the carried wheels, scripts/fetch_gpu_wheels.sh)

Exit status 0 whatever failed (the script reads FILE); 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

VERSIONED = ("torch", "triton", "transformers", "huggingface_hub", "accelerate", "datasets")


def version_line() -> str:
    """One line: python, then each of VERSIONED with its version (or MISSING and why)."""
    parts = [f"python {platform.python_version()}"]
    for name in VERSIONED:
        try:
            module = importlib.import_module(name)
            version = getattr(module, "__version__", "?")
            if name == "torch":
                version += f" (CUDA {module.version.cuda})"
            parts.append(f"{name} {version}")
        except Exception as error:  # noqa: BLE001 - a broken install is what we report
            parts.append(f"{name} MISSING ({type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''})")
    return " | ".join(parts)


def check_cuda() -> tuple[str, str]:
    """("ok" | "fail" | "absent", detail)."""
    import torch

    if not torch.cuda.is_available():
        return "absent", "torch.cuda.is_available() is False"
    try:
        x = torch.ones(1, device="cuda")
        value = float((x @ x).item())
        torch.cuda.synchronize()
        if value != 1.0:
            return "fail", f"1-element product gave {value}"
        return "ok", torch.cuda.get_device_name(0)
    except Exception as error:  # noqa: BLE001
        return "fail", f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def build_tools() -> list[str]:
    """What Triton's launcher build needs and is missing: a C compiler, Python.h."""
    missing = []
    if not any(shutil.which(cc) for cc in (os.environ.get("CC") or "cc", "gcc", "clang")):
        missing.append("a C compiler (cc/gcc/clang)")
    include = sysconfig.get_paths().get("include") or ""
    if not Path(include, "Python.h").exists():
        missing.append(f"Python.h (not in {include}; the python3-dev package)")
    return missing


def check_triton(on_cuda: bool) -> tuple[str, str]:
    """Launch a 1-element kernel (out = in + 1) on CUDA, or in the interpreter on the CPU."""
    try:
        import torch
        import triton
        import triton.language as tl
    except Exception as error:  # noqa: BLE001
        return "fail", f"import triton: {type(error).__name__}: {error}"
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "absent", "no CUDA device and TRITON_INTERPRET is not 1"

    @triton.jit
    def add_one(X, Y):
        tl.store(Y, tl.load(X) + 1.0)

    try:
        x = torch.ones(1, device="cuda" if on_cuda else "cpu")
        y = torch.zeros_like(x)
        add_one[(1,)](x, y)
        if float(y.item()) != 2.0:
            return "fail", f"kernel wrote {float(y.item())}, expected 2.0"
        return "ok", "1-element kernel launched" + (" (interpreter)" if not on_cuda else "")
    except Exception as error:  # noqa: BLE001
        missing = build_tools() if on_cuda else []
        hint = f"; missing: {', '.join(missing)}" if missing else ""
        return "fail", f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}{hint}"


def check_datasets() -> tuple[str, str]:
    try:
        import datasets

        return "ok", f"datasets {datasets.__version__}"
    except Exception as error:  # noqa: BLE001
        return "fail", (f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''} "
                        "(carry the wheels: scripts/fetch_gpu_wheels.sh, docs/benchmarks.md)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--status", type=Path, help="append '<check> <ok|fail|absent>' lines here")
    parser.add_argument("--require-cuda", action="store_true", help="no CUDA device is a failure")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    print(version_line(), flush=True)

    def report(check: str, status: str, detail: str) -> None:
        if check == "cuda" and status == "absent" and args.require_cuda:
            status = "fail"
        label = "ok" if status == "ok" else ("FAILED" if status == "fail" else "absent")
        print(f"preflight {check}: {label} - {detail}", flush=True)
        if args.status is not None:
            with args.status.open("a") as status_file:
                status_file.write(f"{check} {status}\n")

    cuda, detail = check_cuda()
    report("cuda", cuda, detail)
    report("triton", *check_triton(cuda == "ok"))
    report("datasets", *check_datasets())
    print(f"preflight: {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
