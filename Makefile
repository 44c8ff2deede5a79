# Two set-up commands do everything on a fresh machine:
#   make run    create .venv, install translator, run the main job (a tiny training run for now)
#   make test   create .venv, install translator with its dev tools, lint, run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TRANSLATOR_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install run test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/translator train --config configs/tiny.yaml --run-dir runs/tiny

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
