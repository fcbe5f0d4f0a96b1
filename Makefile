# The two commands of the README: `make run` (set up, then build the DAG) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip warns once per package about index locations of this machine's pip config that lack it: noise.
QUIET_PIP := 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lock lint bench clean-venv

# dvc.yaml commands call `python`: put the venv first on PATH so they run in it.
export PATH := $(abspath $(BIN)):$(PATH)

run: $(STAMP)
	dvc repro

test: $(STAMP)
	python -m pytest $(PYTEST_ARGS)

install: $(STAMP)

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

# Re-resolve requirements.in into requirements.lock in a throw-away venv.
lock:
	rm -rf /tmp/ntu-lock-venv && $(PYTHON) -m venv /tmp/ntu-lock-venv
	/tmp/ntu-lock-venv/bin/python -m pip install --quiet -r requirements.in
	{ echo "# Pinned by 'make lock' from requirements.in (python 3.11, linux x86_64). Install: pip install -r requirements.lock"; \
	  /tmp/ntu-lock-venv/bin/python -m pip freeze --all | grep -v '^pip==' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock

clean-venv:
	rm -rf $(VENV)
