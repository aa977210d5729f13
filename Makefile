# One-command entry points (see README.md).
#   make test   set up .venv (if needed) and run the test suite, offline, Triton interpreted
#   make demo   set up .venv (if needed), train + evaluate 3RTPR on the built-in synth-pedes
PYTHON      ?= python3
VENV        ?= .venv
# torch is installed first so that the project's dependencies (pyproject.toml) never pull another build.
# On a GPU machine, create the venv with your CUDA torch already importable (VENV_FLAGS=--system-site-packages)
# or set TORCH_SPEC to the build you want.
TORCH_SPEC  ?= torch==2.13.0
VENV_FLAGS  ?=
BIN         := $(VENV)/bin
OFFLINE_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup test demo bench gpu-check clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

test: setup
	HF_HOME=$$(mktemp -d) $(OFFLINE_ENV) TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

demo: setup
	rm -rf runs/demo
	OMP_NUM_THREADS=1 $(OFFLINE_ENV) $(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml \
		train_3rtpr.py --config configs/synth-pedes.yaml --output-dir runs/demo
	OMP_NUM_THREADS=1 $(OFFLINE_ENV) $(BIN)/python eval_3rtpr.py --checkpoint runs/demo --dataset synth-pedes \
		--split test --out runs/demo/eval --leaderboard
	OMP_NUM_THREADS=1 $(OFFLINE_ENV) $(BIN)/python eval_3rtpr.py search \
		"a woman in a red long coat with a black handbag" --checkpoint runs/demo --dataset synth-pedes \
		--score A+B/FS --top 8 --out runs/demo/search

bench: setup
	$(BIN)/python -m benchmarks.bench_kernels

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache
