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

ROOT = Path(__file__).resolve().parents[2]
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
    assert steps == {"preflight": "0", "training throughput": "0", "end-to-end training": "0",
                     "evaluation + leaderboard": "0", "search": "skipped", "kernel tests (CUDA)": "skipped",
                     "kernel benchmark": "skipped"}, steps
    records = [json.loads(line) for line in (out / "e2e_metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and "alr" in records[1] and records[1]["time"]["alr_s"] > 0
    rows = json.loads((out / "throughput.json").read_text())["rows"]
    assert [(row["mode"], row["status"]) for row in rows] == [("steps", "ok"), ("loop", "ok")]
    summary = (out / "summary.md").read_text()
    assert finished.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # printed last
    assert "| loop | off |" in summary and "| 1 |" in summary and "epoch ÷ steps" in summary
    assert "preflight triton: ok" in finished.stdout and "preflight datasets: ok" in finished.stdout


# the GPU figures these stand for are estimates (docs/benchmarks.md), not measurements
STEP_ESTIMATES_S = {"preflight": 8, "kernel tests (CUDA)": 45, "kernel benchmark": 60, "training throughput": 80,
                    "end-to-end training": 125, "evaluation + leaderboard": 25, "search": 15}
GPU_ORDER = list(STEP_ESTIMATES_S)
FAKE_PYTHON = r"""#!/usr/bin/env bash
# a stand-in for python3: each step sleeps its estimated GPU time x FAKE_SCALE; the summary runs for real
case "$*" in
  *gpu_check_summary*) exec "{real}" "$@" ;;
  "-c import"*) exit 0 ;;
  *trpr.benchmarks.preflight*) step="preflight"; estimate={preflight}
      [ -n "${{FAKE_FAIL:-}}" ] && echo "$FAKE_FAIL fail" >> "$4" && echo "preflight $FAKE_FAIL: FAILED - fake" ;;
  *"-m pytest"*) step="kernel tests (CUDA)"; estimate={kernel tests (CUDA)} ;;
  *bench_kernels*) step="kernel benchmark"; estimate={kernel benchmark} ;;
  *train_throughput*) step="training throughput"; estimate={training throughput} ;;
  *accelerate.commands.launch*) step="end-to-end training"; estimate={end-to-end training} ;;
  *"eval_3rtpr.py search"*) step="search"; estimate={search} ;;
  *eval_3rtpr.py*) step="evaluation + leaderboard"; estimate={evaluation + leaderboard} ;;
  *) echo "fake python: unexpected call: $*" >&2; exit 3 ;;
esac
echo "$step" >> "$FAKE_LOG"
sleep "$(awk -v s="$estimate" -v k="$FAKE_SCALE" 'BEGIN {{ print s * k }}')"
"""


def fake_gpu_run(tmp_path, scale: float, **extra) -> tuple[subprocess.CompletedProcess, dict, list, Path]:
    """scripts/gpu_check.sh in GPU mode with FAKE_PYTHON and GPU_CHECK_TIME_SCALE = scale."""
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON.format(real=sys.executable, **STEP_ESTIMATES_S))
    fake.chmod(0o755)
    out = tmp_path / "out"
    environment = dict(os.environ, **OFFLINE, OUT=str(out), PYTHON=str(fake), GPU_CHECK_WORK=str(tmp_path / "work"),
                       GPU_CHECK_TIME_SCALE=str(scale), FAKE_SCALE=str(scale), FAKE_LOG=str(tmp_path / "calls"),
                       **extra)
    environment.pop("GPU_CHECK_BUDGET_S", None)
    environment.pop("GPU_CHECK_CPU_SMOKE", None)
    finished = run_script(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=tmp_path, env=environment,
                          timeout=120)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return finished, {row[0]: row for row in rows}, calls, out


def test_gpu_check_starts_every_step_in_order_and_fits_its_budget(tmp_path):
    """Each step sleeping its estimated GPU time (scaled by 1/20): every step starts, in the issue's order
    (preflight, kernel tests, kernel benchmark, throughput, end to end, evaluation, search), none is cut by
    the shared deadline, and the whole run (limits + kill grace included) fits the budget."""
    import re

    scale = 0.05
    finished, steps, calls, out = fake_gpu_run(tmp_path, scale)
    assert calls == GPU_ORDER, calls
    assert [name for name in steps] == GPU_ORDER and all(row[1] == "0" for row in steps.values()), steps
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    budget = max(int(b) for b in re.findall(r'BUDGET="\$\{GPU_CHECK_BUDGET_S:-(\d+)\}"', script))  # GPU, not smoke
    assert budget == 480
    limits = {name: float(limit) for name, limit in re.findall(r"=== (.+) \(limit ([\d.]+) s\) ===", finished.stdout)}
    wanted = {name: int(limit) for name, limit in re.findall(r'run_step "([^"]+)" (\d+) ', script)}
    assert set(wanted) == set(GPU_ORDER)
    for name in GPU_ORDER:   # no step's limit was cut by the deadline
        assert limits[name] == pytest.approx(wanted[name] * scale, abs=0.002), (name, limits, wanted)
        assert STEP_ESTIMATES_S[name] < wanted[name]      # each estimate fits its limit, with margin
    grace_s = 3
    assert sum(wanted.values()) + grace_s * len(wanted) + 15 <= budget, (sum(wanted.values()), budget)
    took = float(re.search(r"gpu check: ([\d.]+) s of a ([\d.]+)-s budget", finished.stdout).group(1))
    assert took <= budget * scale, (took, budget * scale)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert "wheels: no .whl/ folder" in (out / "summary.md").read_text()


def test_a_failed_preflight_check_skips_the_steps_that_need_it(tmp_path):
    """datasets failing the preflight: the kernel steps still run; throughput, training, evaluation and
    search are skipped, each with a reason, and the summary lists the failure."""
    finished, steps, calls, out = fake_gpu_run(tmp_path, 0.02, FAKE_FAIL="datasets")
    assert calls == ["preflight", "kernel tests (CUDA)", "kernel benchmark"], calls
    assert [name for name in steps] == GPU_ORDER
    for name in GPU_ORDER[3:]:
        assert steps[name][1] == "skipped", steps[name]
    assert steps["training throughput"][3] == "needs datasets (preflight failed)"
    assert "no trained run" in steps["search"][3]
    assert "preflight: FAILED datasets" in finished.stdout
    assert "- preflight datasets: FAILED - fake" in (out / "summary.md").read_text()


def test_summary_survives_truncated_and_missing_files(tmp_path):
    """A step killed mid-write: truncated throughput.json, kernel JSON and JSONL line; the summary says so."""
    from trpr.benchmarks.gpu_check_summary import summary

    (tmp_path / "bench").mkdir()
    (tmp_path / "steps.tsv").write_text("preflight\t0\t3.2\t\nkernel benchmark\ttimeout\t75.0\tlimit 75 s\n")
    (tmp_path / "throughput.json").write_text('{"device": "H100", "rows": [{"mode": "ste')
    (tmp_path / "bench" / "kernels_gpu_quick.json").write_text('{"notes": ["FALLBACK: torch.compile off"], "los')
    (tmp_path / "e2e_metrics.jsonl").write_text('{"epoch": 0, "loss_a": 1.0, "loss_b": 2.0, "time": {}}\n{"epoch": 1, "lo')
    text = summary(tmp_path)
    assert "throughput.json: truncated or malformed" in text
    assert "kernels_gpu_quick.json: truncated or malformed" in text
    assert "| 0 | 1.0000 | 2.0000 |" in text and "line 2: truncated or malformed record" in text
    assert "| kernel benchmark | timeout | 75.0 | limit 75 s |" in text
    # a complete bench report with a FALLBACK note and a throughput run that stopped early
    (tmp_path / "bench" / "kernels_gpu_quick.json").write_text(json.dumps(
        {"notes": ["FALLBACK: torch.mm(out_dtype=float32) probe failed (x)"], "losses": [], "retrieval": []}))
    (tmp_path / "throughput.json").write_text(json.dumps({"device": "H100", "rows": [], "complete": False}))
    text = summary(tmp_path)
    assert "- FALLBACK: torch.mm(out_dtype=float32) probe failed (x)" in text
    assert "throughput.json is incomplete" in text


def test_fetch_gpu_wheels_dry_run_names_the_missing_packages():
    finished = subprocess.run(["bash", str(ROOT / "scripts" / "fetch_gpu_wheels.sh"), "--dry-run"],
                              capture_output=True, text=True, check=True)
    command = finished.stdout
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    pins = [line.split(" ;")[0] for line in lock
            if line.split("==")[0] in ("datasets", "evaluate", "dill", "multiprocess")
            and ("python_full_version" not in line or ">= '3.1" in line)]
    assert len(pins) == 4, pins  # the versions CI tests, the Python 3.12 line of each
    for wheel in (*pins, "huggingface_hub==1.33.0", "--python-version 3.12", "--no-deps", "--only-binary=:all:", "-d .whl"):
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
