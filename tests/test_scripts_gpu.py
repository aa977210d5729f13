"""The GPU-image tooling, as far as a CPU machine can run it: scripts/gpu_check.sh (syntax, and its CPU
smoke mode end to end), scripts/fetch_gpu_wheels.sh (dry run) and `make setup` over an interpreter whose
environment already holds torch (VENV_FLAGS=--system-site-packages: nothing reinstalls torch)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_script(command, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run for a script whose children may outlive it (its `tee`, the workers of a step it timed
    out): the script gets its own process group, killed at the timeout, so reading its output can never
    wait forever on an orphan that holds the pipe (the test then fails instead of hanging the suite)."""
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command} did not finish (or left a child holding its output) within {timeout} s:\n"
                    + stdout[-3000:] + stderr[-3000:])
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "fetch_gpu_wheels.sh")]).returncode == 0


def test_gpu_check_cpu_smoke(tmp_path):
    """GPU_CHECK_CPU_SMOKE=1: throughput (steps + loop), accelerate launch training (2 epochs, ALR from 1),
    evaluation with the leaderboard and the summary, on the CPU with a tiny model; at most 8 files.
    (~50 s of CPU time in four Python starts, most of it imports.)"""
    out = tmp_path / "out"
    environment = dict(os.environ, **OFFLINE, GPU_CHECK_CPU_SMOKE="1", OUT=str(out), PYTHON=sys.executable,
                       GPU_CHECK_WORK=str(tmp_path / "work"), GPU_CHECK_BUDGET_S="280", OMP_NUM_THREADS="1")
    environment.pop("PYTHONPATH", None)
    finished = run_script(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=environment,
                          timeout=420)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and {"log.txt", "steps.tsv", "summary.md", "throughput.json", "e2e_metrics.jsonl",
                                "leaderboard.md"} <= set(files), files
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines())
    assert steps == {"device": "0", "training throughput": "0", "end-to-end training": "0",
                     "evaluation + leaderboard": "0", "search": "skipped", "kernel tests (CUDA)": "skipped",
                     "kernel benchmark": "skipped"}, steps
    records = [json.loads(line) for line in (out / "e2e_metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and "alr" in records[1] and records[1]["time"]["alr_s"] > 0
    rows = json.loads((out / "throughput.json").read_text())["rows"]
    assert [(row["mode"], row["status"]) for row in rows] == [("steps", "ok"), ("loop", "ok")]
    summary = (out / "summary.md").read_text()
    assert finished.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # printed last
    assert "| loop | off |" in summary and "| 1 |" in summary and "epoch ÷ steps" in summary


def test_fetch_gpu_wheels_dry_run_names_the_missing_packages():
    finished = subprocess.run(["bash", str(ROOT / "scripts" / "fetch_gpu_wheels.sh"), "--dry-run"],
                              capture_output=True, text=True, check=True)
    command = finished.stdout
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    pins = [line.split(" ;")[0] for line in lock
            if line.split("==")[0] in ("datasets", "evaluate", "dill", "multiprocess")
            and ("python_full_version" not in line or ">= '3.1" in line)]
    assert len(pins) == 4, pins  # the versions CI tests, the Python 3.12 line of each
    for wheel in (*pins, "--python-version 3.12", "--no-deps", "--only-binary=:all:", "-d .whl"):
        assert wheel in command, wheel
    assert "torch" not in command


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_setup_over_an_environment_with_torch_keeps_its_torch(tmp_path):
    """`make setup VENV_FLAGS=--system-site-packages` with PYTHON = this interpreter, whose environment holds
    torch (a virtual environment, like the GPU image's python3): the new venv imports that torch, installs no
    torch of its own, and holds the project (editable). Offline: --no-index, no build isolation."""
    venv = tmp_path / "venv"
    finished = subprocess.run(["make", "-C", str(ROOT), "setup", f"PYTHON={sys.executable}", f"VENV={venv}",
                               "VENV_FLAGS=--system-site-packages --without-pip",
                               "PIP_FLAGS=--no-index --no-build-isolation"],
                              capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    import torch

    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import sysconfig, torch; from trpr import engine; print(torch.__file__); print(torch.__version__); "
                            "print(engine.__file__); print(sysconfig.get_path('purelib'))"],
                           capture_output=True, text=True, check=True, cwd=tmp_path)
    torch_file, version, engine_file, own_site = probe.stdout.split()
    assert Path(torch_file).resolve() == Path(torch.__file__).resolve() and version == torch.__version__
    assert Path(engine_file).resolve() == (ROOT / "trpr" / "engine" / "__init__.py").resolve()
    assert not list(Path(own_site).glob("torch*")), list(Path(own_site).iterdir())
    assert (venv / "torch-constraint.txt").read_text().strip() == f"torch=={torch.__version__}"
