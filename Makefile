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

# The schedule tests start a Ray head of their own and submit to its Jobs API: in a
# process where the session's Ray already ran (ray.init turns on token auth for the
# process) that head never takes jobs, so they run in a pytest process of their own.
SCHEDULE_TESTS := tests/integration/pipelines/test_schedule.py

test: $(STAMP) lint layers
	$(BIN)/python -m pytest $(PYTEST_ARGS) --ignore=$(SCHEDULE_TESTS)
	$(BIN)/python -m pytest $(PYTEST_ARGS) $(SCHEDULE_TESTS)

clean-venv:
	rm -rf $(VENV)
