# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --disable-pip-version-check
# Offline by default: no usage telemetry from MLflow (its UI too), dvc commands or a Prefect server started here
# (make server); set any of them to override. tasks/__init__.py sets the same defaults for every madloop process.
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: setup demo test test-fast ui repro lock serve server slurm slurm-down

# torch 2.14.1 / torchvision 0.29.1 come from this machine's local wheels with Python 3.11's pip
# (see DEVELOPERS.md); requirements.lock pins every package, pyproject.toml states the ranges.
# --no-cache-dir: the venv alone is about 6 GB (torch's CUDA build); a second copy in pip's cache is disk that a
# CI machine may not have (one CI run failed with "No space left on device" during this install).
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-cache-dir -r requirements.lock
	$(PIP) install -q --no-deps -e .
	@touch $@

setup: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/madloop run --overwrite

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

# While you work (DEVELOPERS.md): no end-to-end flows, no Prefect server, no model training, no repository checks.
test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow and not fit and not repo" -p no:cacheprovider

# Two processes, not ~15: one web worker, and no job runner (it runs MLflow's GenAI jobs, with a pool of consumers).
ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db \
		--host 127.0.0.1 --port 5000 --workers 1

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# A Prefect server (API, UI on http://127.0.0.1:4200, scheduler) without telemetry; then PREFECT_API_URL.
server: $(STAMP)
	$(BIN)/prefect server start

# The default study on a schedule (docs/scale-out.md); needs `make server` and PREFECT_API_URL.
CRON ?= 0 3 * * *
serve: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/madloop serve --cron "$(CRON)"

lock: $(STAMP)
	$(PIP) freeze --exclude-editable | grep -v '^madloop' > requirements.lock

# A real single-node Slurm on this machine, for the Slurm test and benchmark (tests/test_slurm.py,
# benchmarks/slurm_overhead.py): installs slurm-wlm and munge with apt-get when missing (root), writes
# /etc/slurm/slurm.conf when there is none, starts munged, slurmctld and slurmd. A Slurm that answers is left as it is.
slurm:
	@bash tools/slurm.sh up

# Stops the daemons `make slurm` started (and only those).
slurm-down:
	@bash tools/slurm.sh down
