# Two commands for a fresh machine:  make serve  (set up + train the demo on first run + serve)
#                                    make test   (set up + run the test suite)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MEDCL_PORT ?= 3000
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build onto CPU-only machines.
TORCH_SPEC ?= torch==2.13.0
# Extra pip arguments for torch only, e.g. TORCH_PIP_ARGS="--index-url <PyTorch CPU wheel index>"
TORCH_PIP_ARGS ?=

.PHONY: setup serve test demo clean

$(BIN)/.medcl-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[train,serve,dev]'
	touch $@

setup: $(BIN)/.medcl-installed

# Trains the demo model on the carried BloodMNIST subset if no demo package exists yet, then serves it.
serve: setup
	MEDCL_PORT=$(MEDCL_PORT) $(BIN)/medcl demo serve

test: setup
	$(BIN)/python -m pytest -q -ra tests

clean:
	rm -rf $(VENV) .medcl runs
