# Every target installs what it needs into .venv first, so `make <target>` works on a fresh clone.
SHELL := /bin/bash
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MODEL ?= yolo11n.yaml
NC ?= 80
IMGSZ ?= 640
BATCH ?= 2
SEED ?= 0
DEVICE ?= cpu
IMAGES ?= assets
INIT ?= perturbed
PRECISION ?= fp32
MODEL_NAME := $(basename $(notdir $(MODEL)))
# A value as one shell word, whatever it holds (spaces, non-ASCII, quotes): paths reach parity unchanged.
q = '$(subst ','\'',$(1))'

# ULTRALYTICS=8.3.200 dumps with that release, from a side environment built on first use (parity/capture/sideenv.py).
ULTRALYTICS ?=
OUT ?= reference_dumps/$(MODEL_NAME)-nc$(NC)-$(IMGSZ)-b$(BATCH)-s$(SEED)-$(IMAGES)-$(INIT)-$(DEVICE)$(if $(ULTRALYTICS),-u$(ULTRALYTICS),)
PARITY = $(if $(ULTRALYTICS),$(PY) -m parity.cli.sideenv $(ULTRALYTICS) --,$(PY) -m parity)
LAYER ?=
INJECT ?=
WHAT ?= all
CANDIDATE ?= builtin

# ultralytics keeps its settings here, never in the home directory.
export YOLO_OFFLINE := 1
export YOLO_CONFIG_DIR := $(CURDIR)/runs/ultralytics-config

.PHONY: help install dump-reference compare fixtures test test-fast bench inspect clean envelope drift

help:
	@echo "make dump-reference   write a reference dump (MODEL NC IMGSZ BATCH SEED DEVICE IMAGES INIT OUT)"
	@echo "make compare          compare the built-in re-implementation against the reference (LAYER INJECT WHAT)"
	@echo "make test             run the whole test suite (what CI runs)"
	@echo "make test-fast        the inner loop: every test not marked slow (docs/testing.md), about a minute"
	@echo "make fixtures         regenerate the small committed dumps in fixtures/"
	@echo "make bench            write docs/benchmarks.md (not part of make test)"
	@echo "make gpu-check        the whole CUDA path on the GPU present, appended to docs/cuda-results.md"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

dump-reference: $(STAMP)
	$(PARITY) dump --model $(call q,$(MODEL)) --nc $(call q,$(NC)) --imgsz $(call q,$(IMGSZ)) \
		--batch $(call q,$(BATCH)) --seed $(call q,$(SEED)) --device $(call q,$(DEVICE)) \
		--images $(call q,$(IMAGES)) --init $(call q,$(INIT)) --out $(call q,$(OUT)) $(if $(FORCE),--force,)

inspect: $(STAMP)
	$(PY) -m parity inspect $(call q,$(OUT))

compare: $(STAMP)
	@test -f $(call q,$(OUT)/manifest.json) || $(MAKE) --no-print-directory dump-reference
	$(PY) -m parity compare --reference $(call q,$(OUT)) --candidate $(call q,$(CANDIDATE)) --what $(call q,$(WHAT)) \
		--device $(call q,$(DEVICE)) $(if $(LAYER),--layer $(call q,$(LAYER)),) $(if $(INJECT),--inject $(call q,$(INJECT)),)

fixtures: $(STAMP)
	$(PY) -m parity.tools.fixtures

test: $(STAMP)
	$(PY) -m pytest -q tests

# The inner loop: leaves out the tests marked slow (builds, full-size captures, the bench smoke run).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) -m benchmarks.bench

# The reference against itself under harmless changes (threads, float64 shadow; CUDA/TF32 where present).
envelope: $(STAMP)
	$(PY) -m parity envelope --model $(call q,$(MODEL)) --nc $(call q,$(NC)) --imgsz $(call q,$(IMGSZ)) \
		--batch $(call q,$(BATCH)) --device $(call q,$(DEVICE)) \
		--out $(call q,envelopes/$(DEVICE)-$(MODEL_NAME)-$(IMGSZ).json) $(if $(FORCE),--force,)

# What changed between two reference dumps: make drift A=dir B=dir
drift: $(STAMP)
	$(PY) -m parity drift $(call q,$(A)) $(call q,$(B))

clean:
	rm -rf runs .pytest_cache

# ---- porting examples (docs/porting-protocol.md): a C++/LibTorch Detect head and a numpy-only port
EXAMPLES_OUT ?= runs/examples
EXAMPLE_NC ?= 38
BIAS ?= clean
NUMPY_LAYERS ?= 0 9 11 12
NUMPY_REF ?= fixtures/yolo11-narrow-nc80-96

.PHONY: example-libtorch example-numpy
example-libtorch: $(STAMP)
	$(MAKE) -C examples/libtorch PYTHON=$(abspath $(PY)) BIAS=$(BIAS)
	@test -f $(EXAMPLES_OUT)/ref-nc$(EXAMPLE_NC)/manifest.json || $(PY) -m parity dump \
		--model fixtures/models/yolo11-narrow.yaml --nc $(EXAMPLE_NC) --imgsz 64 --out $(EXAMPLES_OUT)/ref-nc$(EXAMPLE_NC) --force
	$(PY) -m parity export-layer --reference $(EXAMPLES_OUT)/ref-nc$(EXAMPLE_NC) --layer 23 \
		--out $(EXAMPLES_OUT)/ref-nc$(EXAMPLE_NC)-layer23.safetensors
	examples/libtorch/build/yp_detect_$(BIAS) --layer-file $(EXAMPLES_OUT)/ref-nc$(EXAMPLE_NC)-layer23.safetensors \
		--out $(EXAMPLES_OUT)/libtorch-$(BIAS)-nc$(EXAMPLE_NC).safetensors
	$(PY) -m parity check-layer --layer-file $(EXAMPLES_OUT)/ref-nc$(EXAMPLE_NC)-layer23.safetensors \
		--output $(EXAMPLES_OUT)/libtorch-$(BIAS)-nc$(EXAMPLE_NC).safetensors

example-numpy: $(STAMP)
	@mkdir -p $(EXAMPLES_OUT)/numpy
	for l in $(NUMPY_LAYERS); do $(PY) -m parity export-layer --reference $(NUMPY_REF) --layer $$l \
		--out $(EXAMPLES_OUT)/numpy/layer$$l.safetensors || exit $$?; done
	$(PY) examples/numpy/yp_numpy.py --layer-file $(foreach l,$(NUMPY_LAYERS),$(EXAMPLES_OUT)/numpy/layer$(l).safetensors) \
		--out-dir $(EXAMPLES_OUT)/numpy/out --dump $(EXAMPLES_OUT)/numpy/dump
	for l in $(NUMPY_LAYERS); do $(PY) -m parity check-layer --layer-file $(EXAMPLES_OUT)/numpy/layer$$l.safetensors \
		--output $(EXAMPLES_OUT)/numpy/out/layer$$l.safetensors || exit $$?; done
	$(PY) -m parity compare --reference $(NUMPY_REF) --candidate $(EXAMPLES_OUT)/numpy/dump --what layers

# ---- the Jittor example (docs/porting-jittor.md): its own environment, jittor from the registry, offline flags.
# The compile cache lives in runs/jittor-home (about 5 minutes to build the first time, reused after).
JITTOR_VENV ?= .venv-jittor
JITTOR_HOME ?= $(CURDIR)/runs/jittor-home
JITTOR_STAMP := $(JITTOR_VENV)/.installed

$(JITTOR_STAMP):
	@test -x $(JITTOR_VENV)/bin/python || $(PYTHON_BOOT) -m venv $(JITTOR_VENV)
	$(JITTOR_VENV)/bin/python -m pip install -q jittor==1.3.11.0 numpy safetensors
	@touch $(JITTOR_STAMP)

.PHONY: example-jittor
example-jittor: $(STAMP) $(JITTOR_STAMP)
	PARITY_JITTOR_PYTHON="$(abspath $(JITTOR_VENV))/bin/python" PARITY_JITTOR_HOME="$(JITTOR_HOME)" \
		$(PY) -m pytest -q tests/test_jittor_example.py

# ---- the whole CUDA path on whatever GPU is present (benchmarks/gpu_check.py): appends to docs/cuda-results.md;
# exits 2 without a GPU. `make examples-pytest` runs the user-side pytest example with the plugin.
GPU_CHECK_ARGS ?=
.PHONY: gpu-check examples-pytest
examples-pytest: $(STAMP)
	$(PY) -m pytest -q -p parity.pytest_plugin examples/pytest

gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)
