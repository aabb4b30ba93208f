# Every target sets itself up: a fresh machine needs only python3 (3.11+) and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench chaos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/parley dev $(ARGS)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check services shared tests loadtest
	$(BIN)/mypy services shared

# the fault-injection scenarios only (tests/test_chaos.py, test_cluster.py, …); `make test` runs them too
chaos: $(STAMP)
	$(BIN)/pytest -m chaos $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m loadtest.bench $(ARGS)
	$(BIN)/python -m loadtest.transcript_bench $(ARGS)
	$(BIN)/python -m loadtest.cluster_bench $(ARGS)

clean:
	rm -rf $(VENV) .parley .pytest_cache
