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

.PHONY: demo test lint audit system-packages clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps record which requirements the environment holds; a changed file reinstalls.
$(VENV)/.base-installed: requirements/base.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements/base.txt
	touch $@

# The suite's environment is the lock file: dev.txt's requirements (base.txt's among them)
# and everything they pull in, each at one version with its hashes; pip refuses a file whose
# hash differs. torch's hash is the local CPU wheel's (/opt/wheels, found through pip's
# find-links). After changing a pin, run the pip-compile command in the lock file's header.
$(VENV)/.dev-installed: requirements/lock.txt requirements/dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r requirements/lock.txt
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

test: $(VENV)/.dev-installed $(CHART_JS) system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite in three parts, by marker (pyproject.toml); together they are `make test`.
#   test-unit         fast tests: no real worker process, browser or whole experiment, and none
#                     that needs PostgreSQL or Redis specifically
#   test-integration  tests that use PostgreSQL, Redis or real Celery worker processes
#   test-e2e          the real browser and whole experiments from start to end
.PHONY: test-unit test-integration test-e2e
UNIT_TESTS := not (postgres or redis or worker or browser or e2e)
INTEGRATION_TESTS := (postgres or redis or worker) and not (browser or e2e)
E2E_TESTS := browser or e2e

test-unit: $(VENV)/.dev-installed $(CHART_JS) system-packages
	$(BIN)/python -m pytest -m "$(UNIT_TESTS)" $(PYTEST_ARGS)

test-integration: $(VENV)/.dev-installed $(CHART_JS) system-packages
	$(BIN)/python -m pytest -m "$(INTEGRATION_TESTS)" $(PYTEST_ARGS)

test-e2e: $(VENV)/.dev-installed $(CHART_JS) system-packages
	$(BIN)/python -m pytest -m "$(E2E_TESTS)" $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Known vulnerabilities in the locked releases. pip-audit asks PyPI's per-release API (or
# OSV), which CI's network does not reach, so this is its own target, not part of `make
# test`. The feed knows releases, not local build labels such as torch's +cpu. No advisory
# is ignored; one that does not reach FedLens goes here as --ignore-vuln ID with the reason.
audit: $(VENV)/.dev-installed
	grep -oE '^[A-Za-z0-9_.-]+==[^ +\\]+' requirements/lock.txt > $(VENV)/audit-releases.txt
	$(BIN)/pip-audit --strict --no-deps --disable-pip --progress-spinner off \
		-r $(VENV)/audit-releases.txt

# Programs some tests run, from Debian's packages, installed when missing (needs root):
# Chromium for the browser test, Prometheus and promtool, docker-compose for `config -q`;
# iproute2, nftables, openssl and redis-server for the three-host test of real sites.
SYSTEM_PACKAGES := chromium chromium-driver prometheus docker-compose iproute2 nftables openssl \
	redis-server
system-packages:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && \
	command -v promtool >/dev/null && command -v docker-compose >/dev/null && \
	command -v ip >/dev/null && command -v nft >/dev/null && command -v openssl >/dev/null && \
	command -v redis-server >/dev/null || \
	( DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES) || \
	  ( apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES) ) )

clean:
	rm -rf $(VENV) node_modules $(dir $(CHART_JS)) test-output .pytest_cache .ruff_cache .mypy_cache
