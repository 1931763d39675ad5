# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Embedded default: everything under the repo, nothing calls out.
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW_CONFIG := $(CURDIR)/airflow.cfg
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN ?= sqlite:///$(AIRFLOW_HOME)/airflow.db
export DO_NOT_TRACK := 1
export BENTOML_DO_NOT_TRACK := true
export SCARF_ANALYTICS := false
export AIRFLOW__USAGE_DATA_COLLECTION__ENABLED := False
export GX_ANALYTICS_ENABLED := false
export EVIDENTLY_DISABLE_TELEMETRY := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export AWS_EC2_METADATA_DISABLED := true
export PYTHONUNBUFFERED := 1
# Compiled modules are cached under .venv/pycache (not beside the sources): with PYTHONDONTWRITEBYTECODE
# set and an install without .pyc files, every process (each Airflow task, CLI call, server) compiled
# Airflow, MLflow, torch or Great Expectations again: their imports took 2-2.5x as long.
unexport PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX := $(CURDIR)/$(VENV)/pycache

.PHONY: install services browser test test-fast lint demo up down serve bench-ingest bench-train bench-drift bench-serve bench-balance bench-digits bench-views bench-int8 bench-export bench-catalog lock clean

install: $(STAMP)

# --no-compile: byte-compiling all ~45,000 installed modules takes ~60 s; Python compiles those it imports.

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -r requirements.txt -c constraints.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check ml plugins dags tests bench bentos
	$(BIN)/lint-imports

# Debian's Chromium and ChromeDriver for the browser test (tests/e2e/test_browser.py); nothing else downloads a browser.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "tests/e2e/test_browser.py needs Chromium: sudo apt-get install -y chromium chromium-driver (skipped without it)"; \
	  fi; \
	fi

# PostgreSQL and Redis for the production profile (this machine kind has them; started when down).
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || { \
	  echo "starting PostgreSQL"; pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start || true; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
	  echo "starting Redis"; redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true; }

# Two pytest-xdist workers, one test file at a time each, in collection order (the long e2e files
# first): most tests wait on servers and subprocesses, so two share the 2-core machine.
TEST_WORKERS ?= 2

test: install browser services
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: install
	$(BIN)/pytest tests/unit tests/dags

demo: install
	$(BIN)/python -m ml.demo

# PROFILE=production: Airflow on PostgreSQL + CeleryExecutor (Redis) with two workers, an MLflow
# server, S3 and two service replicas (profiles/production.yaml); default: the embedded stack.
PROFILE ?= embedded
STACK := $(if $(filter production,$(PROFILE)),ml.ops.production,ml.ops.stack)

up: install
	$(BIN)/python -m $(STACK) up

down: install
	$(BIN)/python -m $(STACK) down

serve: install
	$(BIN)/mlops serve

bench-ingest: install
	$(BIN)/python bench/ingest.py

bench-train: install
	$(BIN)/python bench/train.py --images 5000

bench-drift: install
	$(BIN)/python bench/drift.py --quality --images 10000

bench-serve: install
	@command -v wrk >/dev/null || { echo "bench-serve needs wrk: apt-get install wrk"; exit 1; }
	$(BIN)/python bench/serve.py

bench-balance: install
	@command -v wrk >/dev/null || { echo "bench-balance needs wrk: apt-get install wrk"; exit 1; }
	$(BIN)/python bench/balance.py

bench-digits: install
	$(BIN)/python bench/digits.py

bench-views: install
	$(BIN)/python bench/view_parity.py

bench-int8: install
	$(BIN)/python bench/int8.py

bench-export: install
	$(BIN)/python bench/export.py

bench-catalog: install
	$(BIN)/python bench/catalog_growth.py

lock:
	rm -rf /tmp/mlops-lock && $(PYTHON) -m venv /tmp/mlops-lock
	/tmp/mlops-lock/bin/pip install --quiet -r requirements.txt
	(echo "# Full resolved set (pip freeze of a clean install of requirements.txt). Regenerate with \`make lock\`."; \
	  /tmp/mlops-lock/bin/pip freeze --exclude-editable) > constraints.txt

clean:
	rm -rf .airflow .data mlruns reports
