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
SOURCES := $(wildcard csrc/*.cu csrc/*.cuh csrc/*.cpp csrc/include/*.h csrc/include/*.cuh csrc/emu/*.h csrc/emu/*.cpp \
  csrc/cpu/*.cpp csrc/cpu/*.h) setup.py
BUILD_STAMP := build/.fasttfm-built

.PHONY: all deps build test demo info aot bench clean gpu-check test-compat

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

# `make test-compat`: the oldest supported pair (torch 2.11 + triton 3.6, numpy >= 2.4; the GPU image's
# versions) in its own venv from the registry, a build in a copy of this tree (the in-place .so files
# stay those of $(VENV)), then a fast subset: every op in cpu and emu modes, bf16 emulation through
# the public API, the HF integration (torch.compile fullgraph) and the Triton static report for sm_90.
COMPAT_VENV  ?= .venv-compat
COMPAT_PY    := $(COMPAT_VENV)/bin/python
COMPAT_PINS  ?= torch==2.11.0 triton==3.6.0 "numpy>=2.4" transformers==5.17.0
COMPAT_EXTRA ?= ninja pybind11 "setuptools>=77" wheel pytest pytest-benchmark matplotlib
COMPAT_DIR   ?= build/compat
# The build compiles the bindings and the emulator against torch 2.11; set COMPAT_BUILD_ENV= to also
# compile the CUDA kernels (nvcc, several minutes on 2 cores).
COMPAT_BUILD_ENV ?= FASTTFM_SKIP_CUDA_BUILD=1
# The subset: every op's test file (cpu and emu parametrizations; cuda ones skip without a GPU),
# minus what does not depend on the torch/triton versions or repeats a covered path slowly: the
# full static reports of test_aot (the sm_90 Triton report runs above), the emulator's ASan and
# ucontext builds, nvcc checks of the emulator's test kernels, the interpreted opcheck, fp32
# dropout in the interpreter.
COMPAT_TESTS ?= tests/test_layer_norm.py tests/test_softmax.py tests/test_cross_entropy.py \
  tests/test_linear_cross_entropy.py tests/test_attention.py tests/test_attention_decode.py \
  tests/test_emulate_bf16.py tests/test_mha.py tests/test_patch.py tests/test_hf.py tests/test_emu.py \
  tests/test_aot.py
COMPAT_K     ?= not cuda and not static_report and not asan and not ucontext and not (opcheck and emu) \
  and not (dropout_matches and float32)

test-compat:
	@if [ "$$(cat $(COMPAT_VENV)/.fasttfm-compat-deps 2>/dev/null)" != '$(COMPAT_PINS) $(COMPAT_EXTRA)' ]; then \
	  set -e; test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV); \
	  $(COMPAT_PY) -m pip install --quiet --upgrade pip; \
	  $(COMPAT_PY) -m pip install --quiet $(COMPAT_PINS) $(COMPAT_EXTRA); \
	  echo '$(COMPAT_PINS) $(COMPAT_EXTRA)' > $(COMPAT_VENV)/.fasttfm-compat-deps; fi
	rm -rf $(COMPAT_DIR) && mkdir -p $(COMPAT_DIR)
	tar -cf - --exclude=./.git --exclude=./build --exclude='./.venv*' --exclude='*.so' --exclude=__pycache__ \
	  --exclude=./runs --exclude=./out --exclude=./fasttfm/_build_info.json . | tar -xf - -C $(COMPAT_DIR)
	cd $(COMPAT_DIR) && $(COMPAT_BUILD_ENV) $(abspath $(COMPAT_PY)) setup.py -q build_ext --inplace
	cd $(COMPAT_DIR) && $(abspath $(COMPAT_PY)) -m fasttfm info
	cd $(COMPAT_DIR) && $(abspath $(COMPAT_PY)) -m fasttfm aot --only triton --arch 90
	cd $(COMPAT_DIR) && $(abspath $(COMPAT_PY)) -m pytest $(COMPAT_TESTS) -k '$(COMPAT_K)' -p no:cacheprovider $(PYTEST_ARGS)
