# One-command entry points (see README.md).
#   make test          set up .venv (if needed) from the lock and run the test suite, offline, Triton interpreted
#   make demo          set up .venv (if needed), fine-tune 3RTPR from the shipped pretrained proxy CLIP on synth-pedes
#                      (50 % noisy captions), evaluate it, search once
#   make app           the photo-search web app (3rtpr-app) on runs/demo, the synth-pedes test images as gallery
#   make browser       Debian's chromium + chromium-driver for the browser test, when missing (root only)
#   make screenshot    regenerate docs/app_screenshot.png from runs/demo (needs chromium: make browser)
# For maintainers:
#   make lock          regenerate requirements.lock (exact versions, torch excluded) from pyproject.toml with uv
#   make test-latest   a fresh .venv-latest with the NEWEST releases pyproject.toml allows (no lock), then the suite:
#                      how the next upstream break is found before a user finds it
PYTHON      ?= python3
VENV        ?= .venv
# torch is installed first so that the project's dependencies (pyproject.toml) never pull another build:
# then requirements.txt (= requirements.lock, the exact set CI tested, + the project, editable) is installed
# under a constraint pinning the torch already there.
# On a GPU machine keep its CUDA torch: make setup VENV_FLAGS=--system-site-packages (the new venv sees the
# packages of $(PYTHON), also when $(PYTHON) itself lives in a virtual environment: scripts/inherit_site_packages.py),
# or set TORCH_SPEC to the build you want. PIP_FLAGS: extra pip options (e.g. --no-index --no-build-isolation).
TORCH_SPEC  ?= torch==2.13.0
VENV_FLAGS  ?=
PIP_FLAGS   ?=
BIN         := $(VENV)/bin
OFFLINE_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: setup test demo bench gpu-check gpu-wheels clean lock test-latest app browser screenshot
setup: $(VENV)/.installed

# REQUIREMENTS: what is installed after torch; `make test-latest` passes the project alone (no lock).
REQUIREMENTS ?= -r requirements.txt
$(VENV)/.installed: pyproject.toml requirements.txt requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(findstring system-site-packages,$(VENV_FLAGS)),$(PYTHON) scripts/inherit_site_packages.py $(VENV))
	$(BIN)/python -m pip install -q $(PIP_FLAGS) --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(PIP_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install -q $(PIP_FLAGS) --constraint $(VENV)/torch-constraint.txt $(REQUIREMENTS)
	$(BIN)/python -c "import torch, transformers; print('setup: torch', torch.__version__, 'from', torch.__file__, '| transformers', transformers.__version__)"
	touch $@

# requirements.lock from pyproject.toml's bounds and its [tool.uv] settings (torch left out, triton paired with it)
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade uv
	$(BIN)/uv pip compile pyproject.toml --upgrade -o requirements.lock

# The newest releases pyproject.toml allows, in a venv of their own (torch: TORCH_SPEC, installed first as always)
LATEST_VENV ?= .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) test VENV=$(LATEST_VENV) REQUIREMENTS='--upgrade --upgrade-strategy eager -e .[test,app]'
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/versions.txt
	@echo "test-latest: passed with the versions in $(LATEST_VENV)/versions.txt (diff them against requirements.lock)"

test: setup
	HF_HOME=$$(mktemp -d) $(OFFLINE_ENV) TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

# The demo fine-tunes the pretrained proxy CLIP shipped in trpr/pretrained/proxy_clip (model card inside) exactly as a
# user fine-tunes openai/clip-vit-base-patch16: --model.backbone DIR. DEMO_RECIPE: the recipe and its options
# (README "What the demo does" says why this one); the from-scratch demo of earlier releases is
# make demo DEMO_RECIPE="--config synth-pedes" DEMO_BACKBONE= (empty: the recipe's own random-init backbone).
DEMO_RECIPE ?= --config proxy-noisy --data.noise_rate 0.5
DEMO_BACKBONE ?= trpr/pretrained/proxy_clip
demo: setup
	rm -rf runs/demo
	OMP_NUM_THREADS=1 $(OFFLINE_ENV) $(BIN)/accelerate launch --config_file accelerate_configs/cpu.yaml \
		train_3rtpr.py $(DEMO_RECIPE) $(if $(DEMO_BACKBONE),--model.backbone $(DEMO_BACKBONE)) --output-dir runs/demo
	OMP_NUM_THREADS=1 $(OFFLINE_ENV) $(BIN)/python eval_3rtpr.py --checkpoint runs/demo --dataset synth-pedes \
		--split test --out runs/demo/eval --leaderboard
	OMP_NUM_THREADS=1 $(OFFLINE_ENV) $(BIN)/python eval_3rtpr.py search \
		"a woman in a red long coat with a black handbag" --checkpoint runs/demo --dataset synth-pedes \
		--top 8 --out runs/demo/search

# The app on the demo run; the gallery is the synth-pedes test images, exported once to a plain folder.
APP_GALLERY ?= runs/demo/gallery
APP_PORT    ?= 7860
app: setup
	test -d runs/demo || { echo "make app: runs/demo is missing: run make demo first"; exit 2; }
	$(OFFLINE_ENV) $(BIN)/python scripts/app_screenshot.py --run runs/demo --gallery $(APP_GALLERY) --export-only
	$(OFFLINE_ENV) $(BIN)/3rtpr-app --checkpoint runs/demo --gallery $(APP_GALLERY) --port $(APP_PORT)

screenshot: setup
	test -d runs/demo || { echo "make screenshot: runs/demo is missing: run make demo first"; exit 2; }
	$(OFFLINE_ENV) $(BIN)/python scripts/app_screenshot.py --run runs/demo --gallery $(APP_GALLERY) \
		--out docs/app_screenshot.png

# The browser test (tests/test_app_served.py) drives Debian's chromium through chromium-driver (selenium).
# Installed here when missing and running as root with apt-get (CI: .ci/run); a no-op when both exist.
# Elsewhere nothing is installed and the test skips, saying why (CI sets TRPR_REQUIRE_BROWSER=1: it fails).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		echo "browser: $$(chromium --version 2>/dev/null | head -1), chromedriver present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "browser: chromium/chromedriver missing and not root (or no apt-get): tests/test_app_served.py will skip;" \
		     "install them with: sudo apt-get install chromium chromium-driver"; \
	fi

bench: setup
	$(BIN)/python -m trpr.benchmarks.bench_kernels

gpu-check:
	bash scripts/gpu_check.sh

gpu-wheels:
	bash scripts/fetch_gpu_wheels.sh

clean:
	rm -rf $(VENV) $(LATEST_VENV) .pytest_cache

# The pretrained proxy CLIP (trpr/experiments/proxy_pretrain.py, ~15 CPU-minutes on one thread): built once, cached under
# $TRPR_CACHE (default ~/.cache/3rtpr) in a folder named after its settings, reused when present, then compared
# with the fp16 copy the repository ships in trpr/pretrained/proxy_clip (the demo's backbone; model card inside).
# make proxy-ship rewrites that copy from the build.
PROXY_THREADS ?= 1
.PHONY: proxy proxy-ship
proxy: setup
	OMP_NUM_THREADS=$(PROXY_THREADS) $(OFFLINE_ENV) nice -n 10 $(BIN)/python -m trpr.experiments.proxy_ship --threads $(PROXY_THREADS)

proxy-ship: setup
	OMP_NUM_THREADS=$(PROXY_THREADS) $(OFFLINE_ENV) nice -n 10 $(BIN)/python -m trpr.experiments.proxy_ship --threads $(PROXY_THREADS) --write
