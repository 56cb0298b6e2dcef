# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install pinned deps, build, train the small Transformer
#   make test   create .venv, install pinned deps, build, run the whole test suite
# Knobs: MAX_JOBS (parallel compile jobs), FASTTFM_CUDA_ARCHS (default 80;90),
# FASTTFM_SKIP_CUDA_BUILD=1, FASTTFM_SKIP_EMU_BUILD=1, PYTEST_ARGS.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON  ?= python3
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export MAX_JOBS

DEPS_STAMP := $(VENV)/.fasttfm-deps
SOURCES := $(wildcard csrc/*.cu csrc/*.cpp csrc/include/*.h csrc/include/*.cuh csrc/emu/*.h csrc/emu/*.cpp csrc/cpu/*.cpp) setup.py
BUILD_STAMP := build/.fasttfm-built

.PHONY: all deps build test demo info aot bench clean gpu-check

# make gpu-check: prove fasttfm on the visible GPU in one command (fasttfm/gpu_check/). It uses the
# interpreter it is given (GPU_PY, default python3: a GPU image's own torch/triton; no venv, no
# pip), builds in place for that GPU's arch only, and writes bench/results/gpu/ (or GPU_CHECK_OUT).
GPU_PY ?= python3
GPU_CHECK_OUT ?= bench/results/gpu
GPU_CHECK_BUDGET ?= 480
GPU_CHECK_ARGS ?=

all: build

$(DEPS_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

deps: $(DEPS_STAMP)

# In-place build: the extensions land in fasttfm/, ninja rebuilds only what changed, and a .pth
# file puts this checkout on the venv's path (fasttfm maps ./kernels to fasttfm.kernels itself).
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fasttfm-checkout.pth"
	@mkdir -p build && touch $@

build: $(BUILD_STAMP)
	@$(PY) -m fasttfm info

test: build
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: build
	$(PY) -m fasttfm demo

info: build
	$(PY) -m fasttfm info

aot: build
	$(PY) -m fasttfm aot

bench: build
	$(PY) -m fasttfm bench all --quick

gpu-check:
	MAX_JOBS=$$(nproc) $(GPU_PY) -m fasttfm gpu-check --out $(GPU_CHECK_OUT) --budget-s $(GPU_CHECK_BUDGET) $(GPU_CHECK_ARGS)

clean:
	rm -rf build fasttfm/_C*.so fasttfm/_build_info.json
