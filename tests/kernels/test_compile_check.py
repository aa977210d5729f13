"""Every Triton kernel compiles for sm_90 (H100/H200) with the real compiler, no GPU needed, and
without register spills; the kernel modules import nothing beyond torch and triton.

The interpreter used by the other kernel tests accepts code the compiler rejects, so this runs
`python -m trpr.kernels.compile_check` in a subprocess without TRITON_INTERPRET.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _nvidia_backend_present() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _nvidia_backend_present(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_all_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")      # compile for real, not from a cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # fp32 + fp16: every loss kernel variant, the score-slab and the fused retrieval kernel (the
    # 5-slot variant: the 8-slot one, built for bf16 by the full check, takes ~4x longer in ptxas)
    proc = subprocess.run([sys.executable, "-m", "trpr.kernels.compile_check", "--dtypes", "fp32", "fp16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" ok") == 14, proc.stdout
    assert "spill stack 0 B" in proc.stdout and proc.stdout.count("spill stack 0 B") == proc.stdout.count(" ok")


def test_kernels_import_only_torch_and_triton():
    """The GPU image lacks datasets/evaluate: importing every kernel module must not pull them (or transformers)."""
    code = ("import sys, trpr.kernels, trpr.kernels.sdm, trpr.kernels.trl, trpr.kernels.slab, trpr.kernels.retrieval, trpr.kernels.reference\n"
            "heavy = ('datasets', 'evaluate', 'transformers', 'accelerate', 'sklearn')\n"
            "bad = sorted(m for m in heavy if m in sys.modules)\n"
            "print('pulled:', bad)\n"
            "sys.exit(1 if bad else 0)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
