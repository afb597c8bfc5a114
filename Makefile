# `make test` is the project's test command (README.md); `make demo` the first thing to run.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CUDA_HOME ?= $(shell tools/cuda_home.sh)
# CUDA architectures built when nvcc is present: the visible GPU's own, otherwise Turing, Ampere
# (its sm_80 cubin runs on 8.6 / 8.9 too) and Hopper, with Hopper's PTX for anything newer (the
# driver compiles it there). Three at most: CI compiles them on 2 cores. Override as you like.
GPU_CAPABILITY := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' \r' | grep -E '^[0-9]+\.[0-9]+$$')
TORCH_CUDA_ARCH_LIST ?= $(or $(GPU_CAPABILITY),7.5;8.0;9.0+PTX)
export MAX_JOBS ?= 2

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := build/.ext-stamp

.PHONY: venv build data test test-unit test-all bench demo clean

venv: $(DEPS_STAMP)
$(DEPS_STAMP): constraints.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -r requirements-dev.txt
	touch $@

# CUDA kernels are compiled whenever a toolkit is found (FORCE_CUDA=1: no GPU is needed to build).
build: $(BUILD_STAMP)
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	@if [ -n "$(CUDA_HOME)" ]; then \
	  echo "building CPU + CUDA operators (CUDA_HOME=$(CUDA_HOME), TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST))"; \
	  FORCE_CUDA=1 CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" \
	    $(PIP) install -q --no-build-isolation --no-deps -c constraints.txt -e . ; \
	else \
	  echo "no CUDA toolkit found: building CPU operators only"; \
	  $(PIP) install -q --no-build-isolation --no-deps -c constraints.txt -e . ; \
	fi
	$(PY) -c "import scop_ext; print('scop_ext build:', scop_ext.build_info())"
	mkdir -p build && touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist package (needs root; CI's fresh machine runs
# this). Elsewhere put the four IDX files in a folder and pass --data-root (README, "Data").
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
data:
	@if [ -f $(FASHION_MNIST) ]; then echo "Fashion-MNIST: installed"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi

# `slow` tests (AddressSanitizer, kill loops, the rest of the model zoo) run only in test-all.
test: build
	$(PY) -m pytest -q -ra -m "not slow"

# The edit-test loop, under 2 minutes: the operators against their reference, ScopConv2d and
# Lemma 2, selection and surgery on small nets, and the package's layering.
UNIT_TESTS := tests/ops/test_ops.py tests/nn tests/prune/test_select.py tests/prune/test_surgery.py \
	tests/prune/test_flops.py tests/test_layering.py
test-unit: build
	$(PY) -m pytest -q -ra -m "not slow" $(UNIT_TESTS)

test-all: build
	$(PY) -m pytest -q -ra

bench: build
	$(PY) benchmarks/speed.py --write benchmarks/README.md

demo: build
	$(VENV)/bin/scop demo --out runs/demo

# On a CUDA machine, in under 8 minutes: build for its GPU, run the CUDA tests, the CUDA benchmark
# rows and the demo on cuda; one summary in runs/gpu-check/summary.md. No GPU: one line, exit 1.
.PHONY: gpu-check
gpu-check:
	@PY=$(PY) tools/gpu_check.sh

clean:
	rm -rf build scop_ext/_C*.so scop_ext/_C_build.json *.egg-info
