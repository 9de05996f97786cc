# Two commands on a fresh machine with Python 3.11+: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test lint bench dev clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed: run make PYTHON=python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## The main job: sources, API, Dagster (webserver + daemon) enriching via the sensor; UI on :3000 until Ctrl-C.
## DEMO_EXIT=1 make demo exits once the summary is printed.
demo: $(STAMP)
	$(BIN)/enrichment demo

## Lint, then pytest; its fixtures start a throwaway PostgreSQL and an Elasticsearch-compatible server.
## The browser tests need Debian's chromium: installed here when missing and this shell is root.
test: $(STAMP)
	scripts/ensure-chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

## Fix what ruff can fix and format the tree.
lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Benchmarks (by hand; each prints its figure and its ratio against a baseline measured in the same run).
bench: $(STAMP)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/claim.py
	$(BIN)/python bench/enrich.py
	$(BIN)/python bench/hydrate.py
	$(BIN)/python bench/read.py
	$(BIN)/python bench/reindex.py
	$(BIN)/python bench/search_nested.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/staleness.py

## `dagster dev` on the SQLite instance under .enrichment/dagster, against ENRICHMENT_* / ELASTICSEARCH_URL
## and the sources from your environment (`make demo` starts all of those for you instead).
dev: $(STAMP)
	$(BIN)/python -c 'from enrichment_assets.dev.local_dagster import write_instance_yaml; write_instance_yaml(".enrichment/dagster")'
	ENRICHMENT_DATABASE_URL=$${ENRICHMENT_DATABASE_URL:-sqlite:///$(CURDIR)/.enrichment/facts.db} \
	DAGSTER_HOME=$(CURDIR)/.enrichment/dagster $(BIN)/dagster dev -w workspace.yaml

clean:
	rm -rf $(VENV) .enrichment
