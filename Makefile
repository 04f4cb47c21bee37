# Two commands a new user needs: `make serve` and `make test`.
# Each creates or refreshes a local virtual environment (.venv) from pyproject.toml.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
PRESET ?=
PYTEST_ARGS ?=

.PHONY: serve test venv system-deps docker-up lint soak bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on hosts without CUDA
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	./.ci/system-deps

# the Docker engine and base image of the image test (tests/docker/test_image.py)
docker-up:
	./.ci/docker-up

serve: $(STAMP)
	$(BIN)/shotstream serve --host $(HOST) --port $(PORT) $(if $(PRESET),--preset $(PRESET),)

test: $(STAMP) system-deps docker-up
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check model cache server clients training tests bench docker
	$(BIN)/ruff format --check model cache server clients training tests bench docker

soak: $(STAMP) system-deps
	$(BIN)/python -m pytest -m slow -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache artifacts
