# The two commands: `make run` (the main job) and `make test` (lint, layers, tests).
PYTHON ?= python3
VENV ?= .venv
# CPU build of torch that lies on the development machines' disk; GPU users
# override, e.g. `make TORCH_SPEC='torch==2.13.0' TORCH_INDEX=...`.
TORCH_SPEC ?= torch==2.13.0
PIP_EXTRA ?=
PRESET ?= default
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.rayrec-installed

.PHONY: run test install lint layers unit clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(PIP_EXTRA) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet $(PIP_EXTRA) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/rayrec run --preset $(PRESET)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

layers: $(STAMP)
	$(BIN)/lint-imports

test: $(STAMP) lint layers
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
