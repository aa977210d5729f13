#!/usr/bin/env bash
# GPU check for one H100/H200 (budget: under 8 minutes). Run from anywhere:
#   bash scripts/gpu_check.sh            # results under ${OUT:-gpu_check_out}/
#   PYTHON=/path/to/python bash scripts/gpu_check.sh
# Steps (each with its own time limit; a failing step does not stop the others):
#   1. the kernel tests on CUDA, compiled (TRITON_INTERPRET=0): tests/test_kernels_*.py
#   2. python -m benchmarks.bench_kernels --quick   -> $OUT/bench/kernels_gpu_quick.{md,json}
#   3. python -m benchmarks.train_throughput        (only if the training benchmark exists)
#   4. a short summary table, printed last          -> $OUT/summary.md
# Needs torch with CUDA, triton, pytest (no datasets/evaluate: the kernel tests do not import them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
STEPS_FILE="$OUT/steps.tsv"
: > "$STEPS_FILE"

run_step() {  # run_step NAME LIMIT_S LOGFILE CMD...
    local name=$1 limit=$2 log=$3
    shift 3
    local start=$SECONDS
    echo "=== $name (limit ${limit}s) ==="
    timeout "$limit" "$@" > >(tee "$log") 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$log" >> "$STEPS_FILE"
    return 0
}

{
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA DEVICE')"
} 2>&1 | tee "$OUT/device.txt"

run_step "kernel tests (CUDA, compiled)" 140 "$OUT/kernel_tests.log" \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels_losses.py tests/test_kernels_retrieval.py \
    --junitxml "$OUT/kernel_tests.xml"
run_step "kernel benchmark" 120 "$OUT/bench.log" "$PYTHON" -m benchmarks.bench_kernels --quick --out "$OUT/bench"
if [ -f benchmarks/train_throughput.py ]; then
    run_step "training throughput" 90 "$OUT/train_throughput.log" "$PYTHON" -m benchmarks.train_throughput \
        --json "$OUT/train_throughput.json"
else
    printf '%s\t%s\t%s\t%s\n' "training throughput" "skipped" "0" "benchmarks/train_throughput.py not present" >> "$STEPS_FILE"
fi

"$PYTHON" - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("\n# GPU check summary\n")
print((out / "device.txt").read_text().strip().replace("\n", "  \n"))
print("\n| step | exit | seconds | log |\n|---|---|---:|---|")
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, secs, log = line.split("\t")
    print(f"| {name} | {rc} | {secs} | {log} |")
tests = (out / "kernel_tests.log")
if tests.exists():
    last = [l for l in tests.read_text().splitlines() if " passed" in l or " failed" in l or " error" in l]
    print(f"\nkernel tests: {last[-1] if last else 'no pytest summary line'}")
bench = out / "bench" / "kernels_gpu_quick.json"
if bench.exists():
    report = json.loads(bench.read_text())
    rows = {(r["loss"], r["B"], r["D"], r["impl"]): r for r in report["losses"]}
    print("\n| loss | B | D | triton ms | eager ms | compile ms | triton MiB | eager MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    def cell(r, key):
        if r is None:
            return "–"
        if r["status"] != "ok":
            return r["status"]
        return f"{r[key]:.2f}" if r.get(key) is not None else "–"
    for (loss, b, d, impl), r in rows.items():
        if impl != "triton":
            continue
        eager, comp = rows.get((loss, b, d, "eager")), rows.get((loss, b, d, "torch.compile"))
        print(f"| {loss} | {b} | {d} | {cell(r, 'ms')} | {cell(eager, 'ms')} | {cell(comp, 'ms')} "
              f"| {cell(r, 'peak_mib')} | {cell(eager, 'peak_mib')} |")
    print("\n| retrieval | impl | median ms | status |\n|---|---|---:|---|")
    for r in report["retrieval"]:
        ms = f"{r['ms']:.1f}" if r.get("ms") is not None else "–"
        print(f"| {r['size']} | {r['impl']} | {ms} | {r['status']} |")
else:
    print("\nno benchmark JSON (see bench.log)")
PY
