# maskdistill: `make all` runs the whole chain offline on the bundled photos; `make test` runs the tests.
# `make all DATA=path TEACHER=name TEACHER_WEIGHTS=file` runs the chain on other data or teachers.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin

DATA ?= data/imagenet-sample-64
TEACHER ?= clip_vit_base_patch16
# The bundled run uses a random teacher because published weights cannot be fetched offline.
# Naming another TEACHER on the command line switches to its published weights unless
# TEACHER_WEIGHTS is given too.
TEACHER_WEIGHTS ?= $(if $(filter command line,$(origin TEACHER)),,random)
STUDENT ?= vit_tiny_patch16
OUT ?= out/all
PRESET ?= configs/cpu_small.yaml

.PHONY: help install test all bench clean

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## Create .venv with pinned torch and the package (editable)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test,tensorboard]"
	touch $@

test: install ## Run the test suite
	$(PY) -m pytest -q

all: install ## Cache targets, pretrain, extract the student and run it in timm, on the sample photos
	@echo "== stage one: teacher $(TEACHER), weights: $(if $(TEACHER_WEIGHTS),$(TEACHER_WEIGHTS),published)"
	rm -rf $(OUT)
	$(BIN)/maskdistill cache-targets --config $(PRESET) --data $(DATA) --out $(OUT)/cache \
		--teacher $(TEACHER) $(if $(TEACHER_WEIGHTS),--teacher-weights $(TEACHER_WEIGHTS))
	$(BIN)/maskdistill inspect $(OUT)/cache --show 8 -o $(OUT)/views.png
	@echo "== stage two: student $(STUDENT) from the cache"
	$(BIN)/maskdistill pretrain --config $(PRESET) --cache $(OUT)/cache --student $(STUDENT) --out $(OUT)/run
	@echo "== extract the student and run it in timm"
	$(BIN)/maskdistill extract-student $(OUT)/run/checkpoint-last.pt -o $(OUT)/student.safetensors --verify
	@echo "== done: weights in $(OUT)/student.safetensors"

bench: install ## Run the benchmarks and rewrite docs/benchmarks.md
	$(PY) -m benchmarks.run_all

clean: ## Remove outputs of make all (the README's hand-run folders under out/ stay)
	rm -rf $(OUT)
