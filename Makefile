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

.PHONY: setup repro test test-fast test-all bench ui lint dvcgen clean

# The ROI JPEG decoder (pipeline/data/jpeg.py): a C file against the system's libjpeg(-turbo), loaded with ctypes.
# Without gcc or the libjpeg headers it is skipped with a message, and training decodes whole images instead.
ROIJPEG := pipeline/data/native/_roijpeg.so
CC ?= cc
setup: $(VENV)/.installed $(ROIJPEG)

$(ROIJPEG): pipeline/data/native/roijpeg.c
	@$(CC) -O2 -Wall -shared -fPIC -o $@ $< -ljpeg \
	  || echo "roijpeg: not built (needs a C compiler and libjpeg-turbo headers, e.g. apt-get install gcc libjpeg-dev);" \
	          "train decoding falls back to whole-image decodes"

# Idempotent: rebuilds only when requirements.txt changed or the venv is missing.
$(VENV)/.installed: requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest

# The inner loop: unit and pure-Python tests, no Ray, servers or subprocesses (the conftest refuses them there).
test-fast: setup
	PIPELINE_TEST_TIER=fast $(BIN)/python -m pytest -m "not slow and not ray and not e2e and not server and not subprocess and not heavy"

test-all: setup
	$(BIN)/python -m pytest -m "slow or not slow"

bench: setup
	$(BIN)/python -m bench

# The GPU acceptance check (docs/gpu-check.md): no `make setup` (the GPU machine has no registry, Ray, MLflow or
# DVC): the venv's Python when there is one, else python3; wheels in .whl/ (bench/fetch_gpu_wheels.sh) installed
# first where that Python lacks them. Without a GPU it runs the CPU plumbing check. Arguments: GPU_CHECK_ARGS.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	GPU_PYTHON=$(GPU_PYTHON) bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

lint: setup
	$(BIN)/ruff check pipeline stages tests bench
	$(BIN)/python -m pipeline.dvcgen --check

# dvc.yaml is generated (pipeline/dvcgen.py): rerun after editing a stage's imports, identity.py or the stage table.
dvcgen: setup
	$(BIN)/python -m pipeline.dvcgen

clean:
	rm -rf data models tune metrics plots reports ray_results mlflow.db mlruns mlartifacts dvc.lock

# --- cluster and MLflow server (docs/cluster.md, infra/mlflow/README.md) ---------------------------------
RAY_CLUSTER ?= infra/ray/cluster-aws.yaml
GIT_COMMIT = $(shell git rev-parse HEAD 2>/dev/null || echo unknown)

.PHONY: cluster-up cluster-dashboard cluster-submit cluster-down mlflow-server mlflow-server-down

# `ray up` drives EC2 through boto3, which the pipeline itself does not need.
cluster-up: setup
	$(BIN)/python -c "import boto3" 2>/dev/null || $(BIN)/python -m pip install --quiet boto3
	$(BIN)/ray up -y $(RAY_CLUSTER)

# Forwards the head's dashboard (and Jobs API) to http://127.0.0.1:8265; keep it running.
cluster-dashboard: setup
	$(BIN)/ray dashboard $(RAY_CLUSTER)

# Submits the DAG to the cluster RAY_ADDRESS names (default: the forwarded dashboard); needs RAY_AUTH_TOKEN.
cluster-submit: setup
	RAY_ADDRESS=$${RAY_ADDRESS:-http://127.0.0.1:8265} RAY_AUTH_MODE=token \
	$(BIN)/ray job submit --working-dir . --runtime-env infra/ray/runtime_env.yaml \
	  --metadata-json '{"git_commit": "$(GIT_COMMIT)"}' --no-wait -- bash infra/ray/entrypoint.sh

cluster-down: setup
	$(BIN)/ray down -y $(RAY_CLUSTER)

# Local MLflow stack (PostgreSQL + basic auth) on http://127.0.0.1:5000; fill infra/mlflow/*.env first.
mlflow-server:
	docker compose -f infra/mlflow/docker-compose.yaml up -d --build

mlflow-server-down:
	docker compose -f infra/mlflow/docker-compose.yaml down

.PHONY: mlflow-local serve-model
# MLflow server without Docker: SQLite + local artifacts in mlflow-server/, 127.0.0.1 only; settings from the env
# (infra/mlflow/local/serve.sh). Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
mlflow-local: setup
	infra/mlflow/local/serve.sh

# Serves a registered model on http://127.0.0.1:5001/invocations (PATH has .venv/bin: mlflow execs uvicorn from it)
MODEL ?= models:/resnet18-synthetic@champion
serve-model: setup
	$(BIN)/mlflow models serve -m "$(MODEL)" --env-manager local -h 127.0.0.1 -p 5001

# docs/parameters.md is generated from the schema's field descriptions (tests/test_config.py keeps it in sync).
.PHONY: docs
docs: setup
	$(BIN)/python -m pipeline.config docs/parameters.md
