# FedLens: `make demo` runs the platform, `make test` runs the whole test suite.
# Both create the virtual environment in .venv on first use, from the pinned requirements.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MANAGE := $(BIN)/python manage.py
HOST ?= 127.0.0.1
PORT ?= 8000

# Browser libraries come from npm at build time (pinned in package-lock.json), never a CDN.
CHART_JS := visualization/static/visualization/vendor/chart.umd.min.js

.PHONY: demo test lint browser clean

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

$(CHART_JS): package.json package-lock.json
	npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	mkdir -p $(dir $@)
	cp node_modules/chart.js/dist/chart.umd.min.js $@

# The synthetic set is generated on first use; each run starts a new 4-site experiment.
demo: $(VENV)/.base-installed $(CHART_JS)
	$(MANAGE) migrate --noinput
	$(MANAGE) bootstrap_admin
	$(MANAGE) collectstatic --noinput --verbosity 0
	@echo "FedLens on http://$(HOST):$(PORT)/ (API docs at /api/docs/, admin at /admin/)"
	$(MANAGE) demo --host $(HOST) --port $(PORT)

test: $(VENV)/.dev-installed $(CHART_JS) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The browser test drives Debian's Chromium; install it when it is missing (needs root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver

clean:
	rm -rf $(VENV) node_modules $(dir $(CHART_JS)) test-output .pytest_cache .ruff_cache .mypy_cache
