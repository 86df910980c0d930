# FedLens: `make demo` runs the platform, `make test` runs the whole test suite.
# Both create the virtual environment in .venv on first use, from the pinned requirements.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MANAGE := $(BIN)/python manage.py
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps record which requirements the environment holds; a changed file reinstalls.
$(VENV)/.base-installed: requirements/base.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements/base.txt
	touch $@

$(VENV)/.dev-installed: requirements/dev.txt $(VENV)/.base-installed
	$(BIN)/pip install --quiet -r requirements/dev.txt
	touch $@

# The synthetic set is generated on first use; each run starts a new 4-site experiment.
demo: $(VENV)/.base-installed
	$(MANAGE) migrate --noinput
	$(MANAGE) bootstrap_admin
	$(MANAGE) collectstatic --noinput --verbosity 0
	@echo "FedLens on http://$(HOST):$(PORT)/ (API docs at /api/docs/, admin at /admin/)"
	$(MANAGE) demo --host $(HOST) --port $(PORT)

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) test-output .pytest_cache .ruff_cache .mypy_cache
