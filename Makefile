# The two commands of the README: `make run` (set up, then build the DAG) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip warns once per package about index locations of this machine's pip config that lack it: noise.
QUIET_PIP := 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lock lint bench clean-venv flow deploy deployment-run up down

# The Prefect flow and the local stack (pipelines/): ports of `make up`, arguments of `make flow`.
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
SERVE_PORT ?= 8000
FLOW_ARGS ?=

# dvc.yaml commands call `python`: put the venv first on PATH so they run in it.
export PATH := $(abspath $(BIN)):$(PATH)

# `make run` builds the whole DAG; `make run STAGES=package` only what package needs (the action branch).
STAGES ?=
run: $(STAMP)
	dvc repro $(STAGES)

test: $(STAMP)
	python -m pytest $(PYTEST_ARGS)

install: $(STAMP)

# The pipeline as the Prefect flow train-ntu120, no server needed, e.g.
# make flow FLOW_ARGS="--streams joint --epochs 2 -S train.seed=3"
flow: $(STAMP)
	python -m pipelines.flow $(FLOW_ARGS)

# Background: a Prefect server, the train-ntu120/local deployment, the MLflow UI and the model
# service (pids and logs in .run/); `make down` stops them.
up: $(STAMP)
	python -m pipelines.services up --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT) --serve-port $(SERVE_PORT)

down:
	python -m pipelines.services down

# Foreground alternatives to `make up` against a running `prefect server start`.
deploy deployment-run: export PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
deploy: $(STAMP)
	python -m pipelines.deploy

deployment-run: $(STAMP)
	prefect deployment run train-ntu120/local --watch

# Re-install when the lock file or the compiled parser changes.
$(STAMP): requirements.lock setup.py pyproject.toml stages/_skeleton_parser.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24" $(QUIET_PIP)
	$(BIN)/python -m pip install --quiet -r requirements.lock $(QUIET_PIP)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . $(QUIET_PIP)
	$(BIN)/python -c "import stages._skeleton_parser"
	touch $(STAMP)

lint: $(STAMP)
	ruff check .
	ruff format --check .

bench: $(STAMP)
	python -m benchmarks.parse_throughput --files 2000 --rss-sizes 1000,20000
	python -m benchmarks.loader_throughput
	python -m benchmarks.gcn_throughput --rounds 3
	python -m benchmarks.inference_latency --rounds 5
	python -m benchmarks.serve_load

# Re-resolve requirements.in into requirements.lock in a throw-away venv.
lock:
	rm -rf /tmp/ntu-lock-venv && $(PYTHON) -m venv /tmp/ntu-lock-venv
	/tmp/ntu-lock-venv/bin/python -m pip install --quiet -r requirements.in
	{ echo "# Pinned by 'make lock' from requirements.in (python 3.11, linux x86_64). Install: pip install -r requirements.lock"; \
	  /tmp/ntu-lock-venv/bin/python -m pip freeze --all | grep -v '^pip==' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock

clean-venv:
	rm -rf $(VENV)
