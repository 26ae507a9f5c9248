# Two commands for a fresh machine with only python3 and make: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The real coding agents the tests run under tokenwatch (docs/agents.md); versions tried.
AGENTS_DIR := .coding-agents
AGENTS_STAMP := $(AGENTS_DIR)/.installed
AGENTS := @openai/codex@0.171.0 @anthropic-ai/claude-code@2.1.332 @google/gemini-cli@0.61.0
RUNTIME := $(VENV)/.installed-runtime

.PHONY: demo test lint typecheck check bench clean postgres-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The demo needs tokenwatch only; the test toolchain (pytest, ruff, mypy...) comes with `make test`.
$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUNTIME)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(RUNTIME) $(STAMP)

# Without npm the tests that need these skip, saying so (and this is tried again next time).
$(AGENTS_STAMP): Makefile
	@if command -v npm > /dev/null; then \
		npm install --prefix $(AGENTS_DIR) --no-audit --no-fund --loglevel=error $(AGENTS) \
		&& touch $(AGENTS_STAMP); \
	else \
		echo "npm not found: the tests with real coding agents will be skipped"; \
	fi

# The fleet tests start a throwaway PostgreSQL cluster of their own (tests/postgres_fixtures.py):
# they need the server's binaries, not a running server. As root on Debian this installs them;
# elsewhere it says what to install (without them those tests skip, and fail under CI=true).
postgres-server:
	@if ls /usr/lib/postgresql/*/bin/postgres > /dev/null 2>&1 || command -v postgres > /dev/null; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; \
	else \
		echo "PostgreSQL's server is not installed: the fleet tests will skip (install Debian's postgresql package, or your system's PostgreSQL server, as root)"; \
	fi

demo: $(RUNTIME)
	$(BIN)/tokenwatch demo

test: $(STAMP) $(AGENTS_STAMP) postgres-server
	$(BIN)/ruff check tokenwatch tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check tokenwatch tests bench
	$(BIN)/ruff format --check tokenwatch tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Every benchmark, in a form that finishes in a few minutes; see docs/benchmarks.md for full runs.
bench: $(STAMP)
	$(BIN)/python bench/ledger.py --events 200000 --stored 1000000
	$(BIN)/python bench/ingest.py --events 20000
	$(BIN)/python bench/proxy.py --quick
	$(BIN)/python bench/client.py --calls 100
	$(BIN)/python bench/detect.py
	$(BIN)/python bench/rules.py
	$(BIN)/python bench/processes.py
	$(BIN)/python bench/tui.py --seconds 10
	$(BIN)/python bench/bench_tokens.py
	$(BIN)/python bench/fleet.py --rounds 2 --calls 500

clean:
	rm -rf $(VENV) $(AGENTS_DIR) build *.egg-info
