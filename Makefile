# resnet-pipeline: `make repro` runs the whole DAG on the embedded synthetic dataset; `make test` tests it.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The venv's tools first on PATH: dvc.yaml's `python -m stages.X` must resolve to the venv's Python.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK := true
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup repro test test-all bench ui lint clean

setup: $(VENV)/.installed

# Idempotent: rebuilds only when requirements.txt changed or the venv is missing.
$(VENV)/.installed: requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m "slow or not slow"

bench: setup
	$(BIN)/python -m bench

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

lint: setup
	$(BIN)/ruff check pipeline stages tests bench

clean:
	rm -rf data models tune metrics plots reports ray_results mlflow.db mlartifacts dvc.lock
