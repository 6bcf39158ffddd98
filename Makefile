# Two commands do all set-up on a fresh machine (Python >= 3.10 with venv):
#   make demo   - start the service on the demo model, classify the demo slide via POST /v1/classify
#   make test   - run the test suite
#   make bench  - the CPU benchmark table (xmag bench) into out/bench
#   make lint   - ruff (lint and format), mypy on the core, the import-linter layer contracts
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# cuCIM's wheel declares CUDA libraries (~2.6 GB) it does not need to read slides
# on the CPU, so it is installed without its declared dependencies; the ones it
# does need are in the dev extra of pyproject.toml.
CUCIM_WHEEL := cucim-cu12==26.10.0
# The Triton Inference Server the `triton` backend is tested against: the one bundled in
# nvidia-pytriton (Triton 2.51, Python backend only). It needs numpy<2, so it gets its own venv.
TRITON_VENV ?= .venv-triton
# Debian's packages the deployment tests run for real: promtool and prometheus, docker-compose.
DEPLOY_TOOLS := prometheus docker-compose
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench clean deploy-tools

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "$(CUCIM_WHEEL)"
	touch $@

$(TRITON_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install --quiet "nvidia-pytriton==0.7.0" "numpy<2" "onnxruntime>=1.20,<2"
	touch $@

# The tests start their own Prometheus on a free port, so the system service the package starts
# under systemd is stopped and disabled again.
deploy-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v docker-compose >/dev/null \
		|| { $(SUDO) apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEPLOY_TOOLS) \
		&& if [ -d /run/systemd/system ]; then $(SUDO) systemctl disable --now prometheus; fi; }

demo: $(VENV)/.installed
	$(BIN)/xmag demo --out out

# import-linter reads a regular install (build/layers), run from inside it: in the editable install
# the faces' folders are mapped into the xmag namespace by an import hook, which it does not follow.
lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	rm -rf build/layers build/lib  # setuptools never removes deleted files from build/lib
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --target build/layers .
	cd build/layers && $(abspath $(BIN))/lint-imports $(abspath pyproject.toml)

test: lint $(TRITON_VENV)/.installed deploy-tools
	XMAG_REQUIRE_CUCIM=1 XMAG_TRITON_PYTHON=$(abspath $(TRITON_VENV))/bin/python $(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/xmag bench --out out/bench

clean:
	rm -rf $(VENV) $(TRITON_VENV) out build
