# The two set-up commands of the README: `make run` and `make test`.
# Both install what is missing first (Debian packages, .venv, the package) via scripts/bootstrap.sh.

VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bootstrap lint typecheck bench bench-quick config-check clean

# `make run PORT=8090`: the API on another port
PORT ?= 8080

run: bootstrap
	$(BIN)/dispatcher dev --port $(PORT)

test: bootstrap
	$(BIN)/python -m pytest -q

bootstrap:
	@scripts/bootstrap.sh

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check dispatcher tests bench

typecheck: bootstrap
	$(BIN)/mypy dispatcher bench

config-check: bootstrap
	$(BIN)/dispatcher config check

bench: bootstrap
	$(BIN)/python bench/throughput.py

bench-quick: bootstrap
	$(BIN)/python bench/throughput.py --deliveries 1000

clean:
	rm -rf var/ .pytest_cache .mypy_cache .ruff_cache
