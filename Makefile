# Two commands on a fresh machine with python3: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run demo test lint bench clean

$(BIN)/k2stream: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,kafka]'
	touch $@

run: $(BIN)/k2stream  ## stream live Binance (BTCUSDT, ETHUSDT) into data/trades.db
	$(BIN)/k2stream run

demo: $(BIN)/k2stream  ## the same pipeline against the bundled exchange, offline
	$(BIN)/k2stream demo --duration 20

test: $(BIN)/k2stream  ## lint, type-check and the whole test suite
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest

bench: $(BIN)/k2stream
	$(BIN)/python bench/pipeline_throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
