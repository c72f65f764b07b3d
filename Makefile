# One entry point for people and CI. Each target creates the virtual environment first
# (Python 3.11, exact pins from requirements.txt, the `vdm` package in editable mode) and
# reinstalls only when requirements.txt or pyproject.toml changes.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-requirements
# Stage commands in dvc.yaml call `python`: make it this venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro smoke test lint bench-data plots gpu-check gpu-pack

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	cp requirements.txt $@

setup: $(STAMP)

repro: $(STAMP)  ## run the whole pipeline (only what changed reruns)
	dvc repro

smoke: $(STAMP)  ## the whole pipeline in about a minute (synthetic data, small model), as a --temp experiment
	python scripts/preset.py smoke -- --temp

plots: $(STAMP)  ## dvc plots show with vega inline (no CDN), checked in headless Chromium
	python scripts/offline_plots.py --check

test: $(STAMP) lint  ## lint + the whole test suite (offline; a worker a core, one thread each: about 15 minutes on 2 cores)
	OMP_NUM_THREADS=1 python -m pytest -q -n auto --dist loadgroup

lint: $(STAMP)
	ruff check .
	ruff format --check .

bench-data: $(STAMP)  ## preprocess benchmark: 10,000 synthetic sprites
	python benchmarks/preprocess.py

gpu-check: $(STAMP)  ## on a CUDA machine: tests, benchmark, a resumable 500k-image run in 8 minutes -> reports/gpu-check
	python scripts/gpu_check.py --out reports/gpu-check

gpu-pack: $(STAMP)  ## gpu-pack/ for a bare GPU machine: the splits (xz) and the wheels it lacks; prints the command to run there
	python scripts/gpu_pack.py
