# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# CI and machines without a GPU take the CPU build; GPU nodes: make TORCH_SPEC='torch>=2.4'
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test test-fast test-optuna lint format bench screenshots clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,mnist,bench]"
	touch $@

demo: install
	$(BIN)/hpsearch run examples/digits.yaml --jobs 2

# Every tier: unit, integration (PostgreSQL, processes) and system (the CLI as a user runs it).
test: install
	$(BIN)/pytest

# The unit tier alone (unmarked tests, in process; tests/conftest.py), under 2 minutes.
test-fast: install
	$(BIN)/pytest -m "not integration and not system"

# /docs, /redoc and the dashboard rendered in a headless Chromium (Debian's `chromium`), as
# tests/test_browser.py checks them; the screenshots stay in screenshots/ to look at.
screenshots: install
	HPSEARCH_SCREENSHOTS=$(CURDIR)/screenshots $(BIN)/pytest tests/test_browser.py
	@echo "screenshots: $(CURDIR)/screenshots/docs.png $(CURDIR)/screenshots/dashboard.png"

# The Optuna-facing tests at the oldest and newest Optuna that pyproject.toml admits, each in a
# virtualenv of its own (about 20 minutes; not part of `make test`).
test-optuna:
	bash .ci/optuna-bounds

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Every benchmark, each rewriting its own section of BENCHMARKS.md (about an hour and a half
# on 2 cores; bench/service.py and bench/chaos.py need PostgreSQL, see their docstrings).
bench: install
	$(BIN)/python bench/samplers.py
	$(BIN)/python bench/search_quality.py
	$(BIN)/python bench/service.py
	$(BIN)/python bench/delete.py
	$(BIN)/python bench/chaos.py
	$(BIN)/python bench/throughput.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/compile.py --write
	$(BIN)/python bench/importance.py --write

clean:
	rm -rf $(VENV) hpsearch.db hpsearch.db-* hpsearch.db.claim-lock *.egg-info
