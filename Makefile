# Two set-up commands do everything on a fresh machine:
#   make run    create .venv, install translator, translate sample sentences with the shipped model
#   make test   create .venv, install translator with its dev tools, lint, run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TRANSLATOR_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install run tiny test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The main job: English -> French with the shipped model (saved_models/en-fr).
run: install
	$(VENV)/bin/translator translate --model saved_models/en-fr --scores \
	  "A man in an orange hat is looking at something." \
	  "This function returns a list of all the files in the directory." \
	  "The president met the prime minister in Paris." \
	  "The committee approved the budget for next year." \
	  "I don't think Tom knows where Mary lives."

# The quick start: a tiny model trained on Multi30k in about a minute.
tiny: install
	$(VENV)/bin/translator train --config configs/tiny.yaml --run-dir runs/tiny

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest

# Every benchmark, one after the other (each prints ratios measured in its own run).
bench: install
	$(PY) bench/cells.py
	$(PY) bench/data.py --config configs/en_fr.yaml
	$(PY) bench/train.py --config configs/multi30k_lstm.yaml
	$(PY) bench/decode.py --model saved_models/en-fr
	$(PY) bench/load.py --model saved_models/en-fr
	$(PY) bench/roofline.py --model saved_models/en-fr

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
