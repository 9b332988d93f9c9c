# The two commands of the README: `make run` and `make test`. Both set up .venv first when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup run study test test-e2e test-all lint gpu-check
setup:
	@bash scripts/setup.sh

run: setup
	$(PY) launch/run.py $(ARGS)

study: setup
	$(PY) launch/study.py $(ARGS)

test: lint
	$(PY) -m pytest -q $(ARGS)

# Whole runs, fault scenarios and the default warm start (CI runs them after `make test`).
test-e2e: setup
	$(PY) -m pytest -q -m "e2e and not slow and not gpu" $(ARGS)

# On a GPU machine: one table of what a cluster user needs to know (bench/gpu_check.py); elsewhere one line, exit 0.
gpu-check: setup
	$(PY) bench/gpu_check.py $(ARGS)

test-all: setup
	$(PY) -m pytest -q -m "" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check vigos_ray workers launch tests bench
	$(VENV)/bin/ruff format --check vigos_ray workers launch tests bench
