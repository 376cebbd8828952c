# Two commands set everything up on a fresh machine:
#   make run    create .venv from pyproject.toml, run the whole pipeline (Prefect flow over DVC stages)
#   make test   create .venv, run ruff, mypy and the test suite
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# a busy machine starts Prefect's ephemeral API slowly (default timeout 20 s)
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_LOGGING_LEVEL ?= INFO
export DVC_NO_ANALYTICS := 1
export MPLBACKEND := Agg

.PHONY: venv run repro test lint mlflow-ui mlflow-server services-stop prefect-ui serve ui bench clean

# constraints.txt: the versions the committed numbers were computed with (empty: none)
CONSTRAINTS ?= constraints.txt
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev,team]'
	touch $@

venv: $(VENV)/.installed

run: venv
	python -m flows.pipeline

repro: venv
	dvc repro

lint: venv
	ruff check .
	ruff format --check .
	mypy

# two workers (pytest-xdist), each module in one; the tiny run is built once for both (conftest.py)
TEST_WORKERS ?= 2
test: venv lint
	pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

mlflow-ui: venv
	mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

# a team's tracking server: PostgreSQL in .services/postgres, then mlflow server on it
# (http://127.0.0.1:5000; artifacts through the server); stop PostgreSQL: make services-stop
mlflow-server: venv
	python -m flows.services mlflow-server

services-stop: venv
	python -m flows.services stop

prefect-ui: venv
	prefect server start

# Prefect deployments (needs a server: make prefect-ui, and PREFECT_API_URL set)
serve: venv
	python -m flows.deploy

# the browser UI over the trained models (http://127.0.0.1:7860)
ui: venv
	mri-ensemble ui

# ensemble weight search speed (batched versus a naive loop) and the ensemble's latency and
# peak memory on this machine, by size (both need a finished make run)
bench: venv
	python bench/ensemble_search.py
	python bench/ensemble_cost.py

clean:
	rm -rf .resume data/prepared data/augmented data/predictions models
