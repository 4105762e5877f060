# Quick start: `make demo` (installs into .venv, runs the demo), `make test` (installs, runs the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-sd-scripts test lint format bench reproduce clean

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python tools/demo.py --output_dir outputs/demo

demo-sd-scripts: $(STAMP)
	$(BIN)/python tools/demo_sd_scripts.py --output_dir outputs/demo-sd-scripts

test: $(STAMP)
	$(BIN)/python -m pytest tests

# ruff (lint + format check) on the whole tree, mypy on the core (pyproject.toml configures both)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/bench_network.py
	$(BIN)/python bench/bench_trainer.py

# the paper's ablations on the demo world (docs/results.md); QUICK=1 for the 1-seed version
reproduce: $(STAMP)
	$(BIN)/python bench/reproduce.py $(if $(QUICK),--quick --output_dir outputs/reproduce-quick)

clean:
	rm -rf $(VENV) outputs .pytest_cache
