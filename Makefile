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
OUT ?= reference_dumps/$(MODEL_NAME)-nc$(NC)-$(IMGSZ)-b$(BATCH)-s$(SEED)-$(IMAGES)-$(INIT)-$(DEVICE)
LAYER ?=
INJECT ?=
WHAT ?= all
CANDIDATE ?= builtin

# ultralytics keeps its settings here, never in the home directory.
export YOLO_OFFLINE := 1
export YOLO_CONFIG_DIR := $(CURDIR)/runs/ultralytics-config

.PHONY: help install dump-reference compare fixtures test bench inspect clean

help:
	@echo "make dump-reference   write a reference dump (MODEL NC IMGSZ BATCH SEED DEVICE IMAGES INIT OUT)"
	@echo "make compare          compare the built-in re-implementation against the reference (LAYER INJECT WHAT)"
	@echo "make test             run the test suite"
	@echo "make fixtures         regenerate the small committed dumps in fixtures/"
	@echo "make bench            write docs/benchmarks.md (not part of make test)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

dump-reference: $(STAMP)
	$(PY) -m parity dump --model $(MODEL) --nc $(NC) --imgsz $(IMGSZ) --batch $(BATCH) --seed $(SEED) \
		--device $(DEVICE) --images $(IMAGES) --init $(INIT) --out $(OUT) $(if $(FORCE),--force,)

inspect: $(STAMP)
	$(PY) -m parity inspect $(OUT)

compare: $(STAMP)
	@test -f $(OUT)/manifest.json || $(MAKE) --no-print-directory dump-reference
	$(PY) -m parity compare --reference $(OUT) --candidate $(CANDIDATE) --what $(WHAT) --device $(DEVICE) \
		$(if $(LAYER),--layer $(LAYER),) $(if $(INJECT),--inject $(INJECT),)

fixtures: $(STAMP)
	$(PY) -m parity.fixtures

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m parity.bench

clean:
	rm -rf runs .pytest_cache
