# Two commands do all set-up on a fresh machine (Python >= 3.10 with venv):
#   make demo   - start the service on the demo model, classify the demo slide via POST /v1/classify
#   make test   - run the test suite
#   make bench  - the CPU benchmark table (xmag bench) into out/bench
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# cuCIM's wheel declares CUDA libraries (~2.6 GB) it does not need to read slides
# on the CPU, so it is installed without its declared dependencies; the ones it
# does need are in the dev extra of pyproject.toml.
CUCIM_WHEEL := cucim-cu12==26.10.0

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "$(CUCIM_WHEEL)"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/xmag demo --out out

test: $(VENV)/.installed
	XMAG_REQUIRE_CUCIM=1 $(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/xmag bench --out out/bench

clean:
	rm -rf $(VENV) out
