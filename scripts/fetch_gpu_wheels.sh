#!/usr/bin/env bash
# Download into .whl/ the wheels of the project's dependencies that the GPU image lacks, so that they can
# travel with the working tree to a GPU machine without a package index (docs/benchmarks.md, "GPU check").
#   bash scripts/fetch_gpu_wheels.sh              # -> .whl/*.whl (about 1 MB)
#   bash scripts/fetch_gpu_wheels.sh --dry-run    # print the pip command only
# The image (Python 3.12, torch 2.11+cu130, triton 3.6, transformers 5.17, accelerate 1.15, numpy 2.5,
# pyarrow 25, safetensors, huggingface_hub, pillow, scikit-learn, pyyaml, tqdm, matplotlib, tensorboard,
# pandas, fsspec, xxhash, requests, pytest, pytest-xdist) has every dependency of pyproject.toml except
# `datasets` and `evaluate`; of their own requirements it lacks `dill` and `multiprocess`. The versions are
# those of requirements.lock (what CI tests), read from it. Pure-Python wheels: --no-deps, one version of each.
# Plus huggingface_hub: datasets needs >= 1.31, the image's transformers 5.17 needs < 2.0 (the lock's 2.x
# serves the newer transformers of CI), so GPU_IMAGE_HUB pins the newest 1.x (1.33.0; unverified on the image).
# On the GPU machine scripts/gpu_check.sh installs them (pip --no-index --target /tmp/site).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS_DIR="${WHEELS_DIR:-.whl}"
GPU_IMAGE_WHEELS=()
for name in datasets evaluate dill multiprocess; do
    # the Python 3.12 line of the lock (lines without a marker hold for every Python)
    pin=$(grep -E "^${name}==[^ ;]+( ; .*python_full_version >= '3.1[12]'.*)?$" requirements.lock | head -n 1 | cut -d' ' -f1)
    [ -n "$pin" ] || { echo "fetch_gpu_wheels: $name is not pinned in requirements.lock" >&2; exit 1; }
    GPU_IMAGE_WHEELS+=("$pin")
done
GPU_IMAGE_HUB="${GPU_IMAGE_HUB:-huggingface_hub==1.33.0}"
GPU_IMAGE_WHEELS+=("$GPU_IMAGE_HUB")

command=("$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
         -d "$WHEELS_DIR" "${GPU_IMAGE_WHEELS[@]}")
if [ "${1:-}" = "--dry-run" ]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
mkdir -p "$WHEELS_DIR"
"${command[@]}"
ls -l "$WHEELS_DIR"
