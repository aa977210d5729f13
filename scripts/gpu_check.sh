#!/usr/bin/env bash
# The GPU check: ONE call on one H100/H200, at most 480 s of work (GPU_CHECK_BUDGET_S), at most 8 result
# files under $OUT. The call to make, the wheels to carry and the budget's reasons: docs/benchmarks.md.
#   bash scripts/gpu_check.sh                        # results under ${OUT:-gpu_check_out}/, summary printed last
#   GPU_CHECK_CPU_SMOKE=1 bash scripts/gpu_check.sh  # the CPU-possible steps with tiny settings (CI)
# Wheels: a `.whl/` folder (scripts/fetch_gpu_wheels.sh: datasets, evaluate, dill, multiprocess and a
# huggingface_hub that both datasets and the image's transformers accept) is installed into /tmp/site
# (pip --no-index) when `import datasets` fails; a missing folder is said.
#
# Steps, in this order (limit s / estimated GPU s; estimates unmeasured, docs/benchmarks.md):
#   0. preflight: versions, CUDA usable, a 1-element Triton kernel, `import datasets`      10 /  8
#      (a failed check skips the steps that need it, with one line saying why)
#   1. the CUDA kernel tests, compiled (TRITON_INTERPRET=0): tests/kernels/ + tests/benchmarks/test_bench_kernels.py   75 / 45
#   2. the quick kernel benchmark (Triton + eager rows first, torch.compile last in its budget) 75 / 60
#   3. training throughput: the trainer's step eager + regional compile, and its loop, 10 steps 90 / 80
#   4. end to end: accelerate launch bf16, ViT-B/16 at random init, the paper recipe on
#      synth-pedes-small, 2 epochs, ALR from epoch 1, eval batches of 100 (400 / 800 / 1,600 /
#      3,200 items: no partial batch, no recompile)                                          135 / 125
#   5. eval_3rtpr.py --leaderboard on the test split (GPU)                                      30 / 25
#   6. one `eval_3rtpr.py search` (GPU)                                                         25 / 15
#   7. the summary table, printed last                                                          (summary.md)
# The limits add up to 440 s; with 3 s of kill grace per step and the wheels / summary, they fit the
# 480-s budget. Each step runs in its own process group, killed at its limit; a step that would start
# with under 15 s of budget left is skipped and says so; a failing step does not stop the others. Every
# result file is written as its rows come in, so a step killed at its limit keeps what it measured.
# Files under $OUT: log.txt, steps.tsv, summary.md, throughput.json, e2e_metrics.jsonl, leaderboard.md,
# bench/kernels_gpu_quick.md, bench/kernels_gpu_quick.json (8). The run folder and caches live in $WORK.
# GPU_CHECK_TIME_SCALE (default 1) multiplies every limit and the budget (tests/scripts/test_gpu_check.py runs
# the script with a fake interpreter that sleeps each step's estimate, scaled down).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
SCALE="${GPU_CHECK_TIME_SCALE:-1}"
WORK="${GPU_CHECK_WORK:-}"
[ -n "$WORK" ] || { WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"; REMOVE_WORK=1; }
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRPR_CACHE="$WORK/cache" MPLBACKEND=Agg
LOG="$OUT/log.txt"
STEPS_FILE="$OUT/steps.tsv"
PREFLIGHT="$WORK/preflight.status"
: > "$LOG"
: > "$STEPS_FILE"
: > "$PREFLIGHT"
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
    EVAL_ARGS=(--num-workers 0)
    NEEDS_GPU=""                 # CPU smoke: no CUDA needed
else
    BUDGET="${GPU_CHECK_BUDGET_S:-480}"
    export TRITON_INTERPRET=0
    DATASET=synth-pedes-small
    THROUGHPUT_ARGS=(--mode both --compile off,regional --steps 10 --warmup 3 --num-workers 8)
    LAUNCH_CONFIG=accelerate_configs/single_gpu_bf16.yaml
    # eval.batch_size 100 divides the val (400 images, 800 captions) and ALR (1,600 / 3,200) passes: no
    # partial last batch, so no extra compiled graphs for it
    TRAIN_ARGS=(--config cuhk-pedes --data.dataset "$DATASET" --model.backbone "$VIT_B16"
                --data.num_workers 8 --eval.batch_size 100)
    EVAL_ARGS=(--num-workers 8 --batch-size 100)
    NEEDS_GPU="cuda "
fi
RUN_DIR="$WORK/e2e_run"

now_ms() { local t="${EPOCHREALTIME//[.,]/}"; echo $((t / 1000)); }
scaled_ms() { awk -v s="$1" -v k="$SCALE" 'BEGIN { printf "%d", s * k * 1000 }'; }   # seconds -> scaled ms
as_s() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }                           # ms -> "s.mmm"
START_MS=$(now_ms)
DEADLINE_MS=$((START_MS + $(scaled_ms "$BUDGET")))
MIN_LEFT_MS=$(scaled_ms 15)
GRACE_MS=$(scaled_ms 3)

record() {  # record NAME STATUS SECONDS NOTE
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$STEPS_FILE"
}

failed_need() {  # failed_need "cuda triton datasets": the first of them the preflight found failing
    local need
    for need in $1; do
        grep -qx "$need fail" "$PREFLIGHT" && { echo "$need"; return 0; }
    done
    return 1
}

run_step() {  # run_step NAME LIMIT_S "NEEDS" CMD...: own process group, killed whole when over its limit
    local name=$1 want_ms
    want_ms=$(scaled_ms "$2")
    local needs=$3
    shift 3
    local failed
    if failed=$(failed_need "$needs"); then
        echo "=== $name: skipped ($failed failed the preflight) ==="
        record "$name" "skipped" 0 "needs $failed (preflight failed)"
        return 1
    fi
    local left_ms=$((DEADLINE_MS - $(now_ms)))
    if [ "$left_ms" -lt "$MIN_LEFT_MS" ]; then
        echo "=== $name: skipped (budget spent) ==="
        record "$name" "skipped" 0 "budget spent"
        return 1
    fi
    local limit_ms=$((want_ms < left_ms ? want_ms : left_ms))
    local start_ms
    start_ms=$(now_ms)
    echo "=== $name (limit $(as_s "$limit_ms") s) ==="
    setsid "$@" &
    local pid=$!
    ( sleep "$(as_s "$limit_ms")"; kill -TERM -- "-$pid" 2>/dev/null; sleep "$(as_s "$GRACE_MS")"
      kill -KILL -- "-$pid" 2>/dev/null ) &
    local watchdog=$!
    wait "$pid"
    local rc=$?
    kill "$watchdog" 2>/dev/null
    wait "$watchdog" 2>/dev/null
    local took_ms=$(($(now_ms) - start_ms))
    if [ "$took_ms" -ge "$limit_ms" ] && [ "$rc" -ne 0 ]; then
        record "$name" "timeout" "$(as_s "$took_ms")" "limit $(as_s "$limit_ms") s"
    else
        record "$name" "$rc" "$(as_s "$took_ms")" ""
    fi
    return "$rc"
}

# ---- wheels the image lacks, then 0. preflight
if ls .whl/*.whl >/dev/null 2>&1; then
    if ! "$PYTHON" -c "import datasets" 2>/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
            && echo "wheels: installed $(ls .whl/*.whl | wc -l) from .whl/ into /tmp/site" \
            || echo "wheels: FAILED to install .whl/ (see above)"
    fi
else
    echo "wheels: no .whl/ folder (not carried? scripts/fetch_gpu_wheels.sh, docs/benchmarks.md); datasets must already import"
fi
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
PREFLIGHT_ARGS=(--status "$PREFLIGHT")
[ "$SMOKE" = 1 ] || PREFLIGHT_ARGS+=(--require-cuda)
run_step "preflight" 10 "" "$PYTHON" -m trpr.benchmarks.preflight "${PREFLIGHT_ARGS[@]}"
grep -q " fail$" "$PREFLIGHT" && echo "preflight: FAILED $(grep ' fail$' "$PREFLIGHT" | cut -d' ' -f1 | tr '\n' ' ')- the steps that need them are skipped"

# ---- 1. CUDA kernel tests, 2. quick kernel benchmark (GPU only)
if [ "$SMOKE" = 1 ]; then
    record "kernel tests (CUDA)" "skipped" 0 "CPU smoke"
    record "kernel benchmark" "skipped" 0 "CPU smoke"
else
    XDIST=()
    "$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
    run_step "kernel tests (CUDA)" 75 "cuda triton" "$PYTHON" -m pytest -q -p no:cacheprovider "${XDIST[@]}" \
        tests/kernels tests/benchmarks/test_bench_kernels.py
    run_step "kernel benchmark" 75 "cuda triton" "$PYTHON" -m trpr.benchmarks.bench_kernels --quick \
        --out "$OUT/bench" --budget-s "$(awk -v k="$SCALE" 'BEGIN { print 62 * k }')"
fi

# ---- 3. training throughput: step (eager, regional compile) and the real loop, side by side
run_step "training throughput" 90 "${NEEDS_GPU}triton datasets" "$PYTHON" -m trpr.benchmarks.train_throughput \
    "${THROUGHPUT_ARGS[@]}" --json "$OUT/throughput.json"

# ---- 4. end to end: train 2 epochs (ALR from epoch 1), 5. evaluate with the leaderboard, 6. one search
if run_step "end-to-end training" 135 "${NEEDS_GPU}triton datasets" "$PYTHON" -m accelerate.commands.launch \
        --config_file "$LAUNCH_CONFIG" train_3rtpr.py "${TRAIN_ARGS[@]}" --train.epochs 2 --alr.start_epoch 1 \
        --logging.trackers "[]" --output-dir "$RUN_DIR"; then
    run_step "evaluation + leaderboard" 30 "${NEEDS_GPU}datasets" "$PYTHON" eval_3rtpr.py --checkpoint "$RUN_DIR" \
        --dataset "$DATASET" --split test --out "$WORK/eval" --leaderboard "${EVAL_ARGS[@]}"
    if [ "$SMOKE" = 1 ]; then  # one Python start less (CI time); the search CLI: tests/test_eval_3rtpr.py
        record "search" "skipped" 0 "CPU smoke"
    else
        run_step "search" 25 "cuda datasets" "$PYTHON" eval_3rtpr.py search "$QUERY" --checkpoint "$RUN_DIR" \
            --dataset "$DATASET" --top 5 --batch-size 100 --device auto --out "$WORK/search"
    fi
else
    record "evaluation + leaderboard" "skipped" 0 "no trained run (end-to-end training did not finish)"
    record "search" "skipped" 0 "no trained run (end-to-end training did not finish)"
fi
cp "$RUN_DIR/metrics.jsonl" "$OUT/e2e_metrics.jsonl" 2>/dev/null
cp "$WORK/eval/leaderboard.md" "$OUT/leaderboard.md" 2>/dev/null
rm -f "$OUT"/.*.tmp "$OUT"/bench/.*.tmp 2>/dev/null   # a report killed mid-rename (runtime.atomic): never an extra file

# ---- 7. summary, printed last
echo "gpu check: $(as_s $(($(now_ms) - START_MS))) s of a $(as_s "$(scaled_ms "$BUDGET")")-s budget"
"$PYTHON" -m trpr.benchmarks.gpu_check_summary "$OUT" | tee "$OUT/summary.md"
[ "${REMOVE_WORK:-0}" = 1 ] && rm -rf "$WORK"
exit 0
