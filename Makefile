# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (`make lint` for CI's lint).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
CUDA_STAMP := $(VENV)/.cuda-$(shell cat pyproject.toml | md5sum | cut -c1-8)
PYTEST_WORKERS ?= 2

.PHONY: demo test test-all test-gpu lint venv clean notebooks

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,hf,lint]"
	rm -f $(VENV)/.installed-*; touch $(STAMP)

venv: $(STAMP)

# notebooks/README.md: the Jupyter extra (not part of `make venv`: CI does not need a Lab server).
notebooks: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[notebooks]"
	$(BIN)/jupyter lab notebooks/

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python experiments/demo.py

test: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --durations=15 tests

test-all: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --durations=15 -m "not gpu and not tpu" tests

# The GPU tests on CUDA (tests/conftest.py picks the platform from -m and stops when JAX finds no GPU);
# one process, so that the tests have the GPU's memory to themselves.
$(CUDA_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[cuda]"
	rm -f $(VENV)/.cuda-*; touch $(CUDA_STAMP)

test-gpu: $(CUDA_STAMP)
	env -u JAX_PLATFORMS $(BIN)/python -m pytest -p no:xdist --durations=15 -m gpu tests

# What CI enforces: ruff (rules and line length in pyproject.toml) and mypy on the public API ([tool.mypy]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
