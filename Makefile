# gptexp: every target that needs the environment creates .venv first when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP_FLAGS ?= -q
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help install test lint clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml constraints-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints-dev.txt torch==2.13.0 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -m pip install $(PIP_FLAGS) -c constraints-dev.txt -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	@# The book's package is our oracle; its metadata asks for tensorflow, which it does not need here.
	$(PY) -m pip install $(PIP_FLAGS) --no-deps llms-from-scratch==1.0.19 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import gptexp, torch, mlflow, optuna, llms_from_scratch" && touch $(STAMP)

install: $(STAMP) ## create .venv with the package and its dev tools (torch pinned to the CPU wheel)

test: $(STAMP) ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check, ruff format --check and mypy on gptexp/ (settings in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy gptexp/

clean: ## remove the environment, caches and build outputs (not mlruns/ or data/raw/)
	rm -rf $(VENV) build dist *.egg-info .pytest_cache data/cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

PORT ?= 5000
CONFIG ?= configs/gpt2-124m.yaml
SWEEP ?= configs/sweep.yaml
SWEEP_ARGS ?=

HOST ?= 127.0.0.1
BACKEND ?=
STORAGE ?= sqlite:///$(CURDIR)/mlruns/optuna.db

.PHONY: train sweep ui dashboard server

train: $(STAMP) ## the book's chapter-5 job (CONFIG=configs/gpt2-124m.yaml), tracked in MLflow
	$(VENV)/bin/gptexp train --config $(CONFIG)

sweep: $(STAMP) ## the default Optuna sweep (SWEEP=configs/sweep.yaml, SWEEP_ARGS="--workers 2 ..."), nested MLflow runs
	$(VENV)/bin/gptexp sweep --config $(SWEEP) $(SWEEP_ARGS)

ui: $(STAMP) ## the MLflow UI on the project's store in its model-training view, on 127.0.0.1 (PORT=5000); prints the URLs
	@mkdir -p mlruns
	@export MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns/mlflow.db}"; \
	$(PY) -m gptexp.ui_view --base "http://127.0.0.1:$(PORT)"; \
	exec $(VENV)/bin/mlflow ui --backend-store-uri "$$MLFLOW_TRACKING_URI" \
		--default-artifact-root "$(CURDIR)/mlruns/artifacts" --host 127.0.0.1 --port $(PORT)

dashboard: PORT = 8080
dashboard: $(STAMP) ## optuna-dashboard, live, on the sweep's storage (STORAGE=..., default mlruns/optuna.db), on 127.0.0.1 (PORT=8080)
	@$(PY) -c "import optuna_dashboard" 2>/dev/null || { echo "make dashboard needs optuna-dashboard: $(PY) -m pip install -c constraints-dev.txt -e '.[dashboard]'" >&2; exit 2; }
	@echo "optuna-dashboard on $(STORAGE): http://127.0.0.1:$(PORT)/dashboard/"
	$(VENV)/bin/optuna-dashboard "$(STORAGE)" --host 127.0.0.1 --port $(PORT)

server: $(STAMP) ## an MLflow tracking server for sweeps across machines (HOST=127.0.0.1 PORT=5000, BACKEND=postgresql://...)
	$(VENV)/bin/gptexp server --host $(HOST) --port $(PORT) $(if $(BACKEND),--backend-store-uri "$(BACKEND)")

.PHONY: reproduce report bench paper
EXP ?=

reproduce: $(STAMP) ## rerun the book's chapter-5 job (experiments/ch05-verdict.yaml) and check every eval point against the book
	$(VENV)/bin/gptexp reproduce ch05-verdict

paper: $(STAMP) ## a paper experiment (EXP=ctx-stride-ablation): train its cells x seeds (skipping finished ones), check, write table/figure/checklist to paper/EXP
	@test -n "$(EXP)" || { echo "make paper needs EXP=..., e.g. make paper EXP=ctx-stride-ablation (a study spec in experiments/)" >&2; exit 2; }
	@# A failed check (exit 1) still writes the outputs, so the differing numbers can be read; bad input (2) stops.
	@rc=0; $(VENV)/bin/gptexp reproduce "$(EXP)" --quiet || rc=$$?; test $$rc -le 1 || exit $$rc; \
		$(VENV)/bin/gptexp report --experiment "$(EXP)" --aggregate && exit $$rc

report: $(STAMP) ## a table of the latest sweep's trials (else the latest experiment's runs), best first
	$(VENV)/bin/gptexp report

bench: $(STAMP) ## measure gptexp against the book's implementation, and data prepare against tiktoken (bench-results/*.json)
	$(PY) -m gptexp.bench
	$(PY) -m gptexp.bench.data_prepare

.PHONY: data
SOURCE ?=

data: $(STAMP) ## tokenize a corpus into data/cache ahead of training (SOURCE=registry name, .txt file or folder)
	@test -n "$(SOURCE)" || { echo "make data needs SOURCE=..., e.g. make data SOURCE=the-verdict or SOURCE=path/to/folder" >&2; exit 2; }
	$(VENV)/bin/gptexp data prepare "$(SOURCE)"

.PHONY: gpu-check

gpu-check: $(STAMP) ## on a CUDA machine: fast-vs-book parity, 124M bf16+compile tokens/s and MFU, a DDP run on every GPU (nccl)
	$(PY) scripts/gpu_check.py
