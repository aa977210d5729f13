#!/usr/bin/env bash
# The GPU check: ONE call on one H100/H200, at most 6 minutes, at most 8 result files under $OUT.
#   bash scripts/gpu_check.sh                 # results under ${OUT:-gpu_check_out}/, summary table printed last
#   GPU_CHECK_CPU_SMOKE=1 bash scripts/gpu_check.sh   # its CPU-possible steps, tiny settings (CI): throughput,
#                                                     # training, evaluation (no device probe, search, kernels)
# Wheels: a `.whl/` folder (scripts/fetch_gpu_wheels.sh: datasets, evaluate, dill, multiprocess, which the
# GPU image lacks) is installed first into /tmp/site (pip --no-index) when `import datasets` fails.
#
# Steps, the most valuable first; each has its own limit and all share one deadline (GPU_CHECK_BUDGET_S,
# default 340 s; a step that would start with under 15 s left is skipped and says so; a failing step does
# not stop the others):
#   1. device, versions                                                              (log.txt)
#   2. training throughput: the trainer's step, eager and regional-compiled, and its real loop on
#      synth-pedes-small (decode, augment, pinned copies, 8 workers)   python -m trpr.benchmarks.train_throughput
#                                                                                     (throughput.json)
#   3. end to end: accelerate launch bf16 (accelerate_configs/single_gpu_bf16.yaml), the full ViT-B/16
#      architecture at random init through a backbone mapping, the paper recipe (trpr/configs/cuhk-pedes.yaml) on
#      synth-pedes-small, 2 epochs, ALR from epoch 1; then eval_3rtpr.py --leaderboard on the test split and
#      one `search`                                          (e2e_metrics.jsonl: per-phase times; leaderboard.md)
#   4. the CUDA kernel tests, compiled (TRITON_INTERPRET=0): tests/test_kernels_*.py (pytest-xdist: -n 8)
#   5. the quick kernel benchmark: python -m trpr.benchmarks.bench_kernels --quick    (bench/kernels_gpu_quick.*)
#   6. the summary table, printed last                                                (summary.md)
# Files under $OUT: log.txt, steps.tsv, summary.md, throughput.json, e2e_metrics.jsonl, leaderboard.md,
# bench/kernels_gpu_quick.md, bench/kernels_gpu_quick.json (8). The run folder and caches live in $WORK.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
WORK="${GPU_CHECK_WORK:-}"
[ -n "$WORK" ] || { WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"; REMOVE_WORK=1; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRPR_CACHE="$WORK/cache" MPLBACKEND=Agg
LOG="$OUT/log.txt"
STEPS_FILE="$OUT/steps.tsv"
: > "$LOG"
: > "$STEPS_FILE"
exec > >(tee -a "$LOG") 2>&1

VIT_B16='{projection_dim: 512, text_hidden_size: 512, text_intermediate_size: 2048, text_num_hidden_layers: 12, text_num_attention_heads: 8, vision_hidden_size: 768, vision_intermediate_size: 3072, vision_num_hidden_layers: 12, vision_num_attention_heads: 12, vision_patch_size: 16}'
TINY='{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, projection_dim: 32}'
QUERY="a woman in a red long coat with a black handbag"
if [ "$SMOKE" = 1 ]; then
    BUDGET="${GPU_CHECK_BUDGET_S:-150}"
    export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    DATASET=synth-pedes-tiny
    THROUGHPUT_ARGS=(--device cpu --backbone "$TINY" --image-size 32 16 --dataset "$DATASET" --batch-size 8
                     --steps 2 --warmup 1 --num-workers 0 --compile off)
    LAUNCH_CONFIG=accelerate_configs/cpu.yaml
    TRAIN_ARGS=(--config synth-pedes --data.dataset "$DATASET" --data.image_size "[32, 16]"
                --model.backbone "$TINY" --model.fused_dim 64 --train.batch_size 48 --data.num_workers 0)
    EVAL_WORKERS=0
else
    BUDGET="${GPU_CHECK_BUDGET_S:-340}"
    export TRITON_INTERPRET=0
    DATASET=synth-pedes-small
    THROUGHPUT_ARGS=(--mode both --compile off,regional --steps 20 --warmup 5 --num-workers 8)
    LAUNCH_CONFIG=accelerate_configs/single_gpu_bf16.yaml
    TRAIN_ARGS=(--config cuhk-pedes --data.dataset "$DATASET" --model.backbone "$VIT_B16"
                --data.num_workers 8)
    EVAL_WORKERS=8
fi
DEADLINE=$((SECONDS + BUDGET))
RUN_DIR="$WORK/e2e_run"

record() {  # record NAME STATUS SECONDS NOTE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS_FILE"
}

run_step() {  # run_step NAME LIMIT_S CMD...: in its own process group, killed whole when over its limit
    local name=$1 want=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt 15 ]; then
        echo "=== $name: skipped (budget spent) ==="
        record "$name" "skipped" 0 "budget spent"
        return 1
    fi
    local limit=$((want < left ? want : left))
    local start=$SECONDS
    echo "=== $name (limit ${limit}s) ==="
    setsid "$@" &
    local pid=$!
    ( sleep "$limit"; kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null ) &
    local watchdog=$!
    wait "$pid"
    local rc=$?
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    local took=$((SECONDS - start))
    if [ "$took" -ge "$limit" ] && [ "$rc" -ne 0 ]; then
        record "$name" "timeout" "$took" "limit ${limit}s"
    else
        record "$name" "$rc" "$took" ""
    fi
    return "$rc"
}

# ---- 1. device, versions (and the wheels the image lacks)
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PYTHON" -c "import datasets, evaluate" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
[ "$SMOKE" = 1 ] || "$PYTHON" - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA device)")
for name in ("triton", "transformers", "accelerate", "datasets", "evaluate", "numpy", "pyarrow"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}")
    except Exception as error:
        print(f"  {name}: MISSING ({type(error).__name__})")
PY
record "device" 0 0 ""

# ---- 2. training throughput: step (eager, regional compile) and the real loop, side by side
run_step "training throughput" 130 "$PYTHON" -m trpr.benchmarks.train_throughput "${THROUGHPUT_ARGS[@]}" \
    --json "$OUT/throughput.json"

# ---- 3. end to end: train 2 epochs (ALR from epoch 1), evaluate with the leaderboard, one search
if run_step "end-to-end training" 150 "$PYTHON" -m accelerate.commands.launch --config_file "$LAUNCH_CONFIG" \
        train_3rtpr.py "${TRAIN_ARGS[@]}" --train.epochs 2 --alr.start_epoch 1 --logging.trackers "[]" \
        --output-dir "$RUN_DIR"; then
    run_step "evaluation + leaderboard" 45 "$PYTHON" eval_3rtpr.py --checkpoint "$RUN_DIR" --dataset "$DATASET" \
        --split test --out "$WORK/eval" --leaderboard --num-workers "$EVAL_WORKERS"
    if [ "$SMOKE" = 1 ]; then  # one Python start less (CI time); the search CLI: tests/test_eval_cli.py
        record "search" "skipped" 0 "CPU smoke"
    else
        run_step "search" 30 "$PYTHON" eval_3rtpr.py search "$QUERY" --checkpoint "$RUN_DIR" --dataset "$DATASET" \
            --top 5 --out "$WORK/search"
    fi
fi
cp "$RUN_DIR/metrics.jsonl" "$OUT/e2e_metrics.jsonl" 2>/dev/null
cp "$WORK/eval/leaderboard.md" "$OUT/leaderboard.md" 2>/dev/null

# ---- 4. CUDA kernel tests, 5. quick kernel benchmark (GPU only)
if [ "$SMOKE" = 1 ]; then
    record "kernel tests (CUDA)" "skipped" 0 "CPU smoke"
    record "kernel benchmark" "skipped" 0 "CPU smoke"
else
    XDIST=()
    "$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
    run_step "kernel tests (CUDA)" 150 "$PYTHON" -m pytest -q -p no:cacheprovider "${XDIST[@]}" tests/test_kernels_*.py
    run_step "kernel benchmark" 100 "$PYTHON" -m trpr.benchmarks.bench_kernels --quick --out "$OUT/bench" --budget-s 85
fi

# ---- 6. summary, printed last
"$PYTHON" -m trpr.benchmarks.gpu_check_summary "$OUT" | tee "$OUT/summary.md"
[ "${REMOVE_WORK:-0}" = 1 ] && rm -rf "$WORK"
exit 0
