# The two commands: `make demo` and `make test` (README). Both build .venv/ first.
#
# torch is installed on its own line, before everything else, so the CPU venv never pulls a CUDA
# build: on this project's machines `torch==2.13.0` resolves to the CPU wheel. Elsewhere, point pip
# at the CPU wheels, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# The Docker image installs the CUDA build instead (see Dockerfile).

PYTHON     ?= $(shell command -v python3.11 || command -v python3)
VENV       := .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test test-gpu gpu-wheels lint bench venv clean-volume

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -c "import torch, transformers, peft, trl, runpod; print('venv ready: torch', torch.__version__, '| cuda', torch.cuda.is_available())"
	touch $@

# A real training job on a tiny model, through handler.py, with the embedded defaults:
# volume ./.volume, artifacts in ./.volume/artifacts, records in ./.volume/records.sqlite3.
demo: venv
	$(PY) demo/build_demo.py
	$(PY) handler.py --test_input "$$($(PY) demo/show.py input)"
	$(PY) demo/show.py result

# Checks the layering (lint-imports), starts what the tests need (scripts/test.sh), runs the whole suite.
test: venv
	bash scripts/test.sh $(PYTEST_ARGS)

# The `gpu`-marked tests (tests/test_gpu.py and others): on a machine without CUDA each one skips with
# its reason shown (-rs) and this exits 0. GPU_PY runs them with another interpreter (the GPU machine's
# own Python: scripts/gpu-check.sh); by default the venv's. Only the modules that hold gpu-marked tests
# are collected: the GPU machine lacks what others import (requests, boto3, psycopg, hypothesis), and
# one module that fails to import stops the whole run.
GPU_PY ?= $(PY)
GPU_TEST_FILES = $(shell grep -l 'mark\.gpu' tests/test_*.py)
test-gpu: $(if $(filter $(PY),$(GPU_PY)),venv)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLCONFIGDIR=$${MPLCONFIGDIR:-/tmp/mpl-test-gpu} \
		$(GPU_PY) -m pytest -m gpu -rs -p no:cacheprovider $(PYTEST_ARGS) $(GPU_TEST_FILES)

# The wheels the GPU check carries to a machine without a package registry (scripts/gpu-wheels.sh).
gpu-wheels: venv
	bash scripts/gpu-wheels.sh

# The layering contracts alone (.importlinter); `make test` runs them too.
lint: venv
	bash scripts/lint_imports.sh

# The worker against a padded Trainer + PEFT and TRL's defaults, side by side (bench/run.py;
# BENCHMARKS.md). BENCH_ARGS=--quick: the small model, under 10 minutes on 2 cores.
BENCH_ARGS ?=
bench: venv
	$(PY) bench/run.py $(BENCH_ARGS)

clean-volume:
	rm -rf .volume
