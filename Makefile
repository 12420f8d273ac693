# Quick start: `make demo` and `make test` each create .venv and install what they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REFVENV ?= /tmp/eqv2-refvenv

.PHONY: venv install install-test install-adsorbml demo demo-toy demo-calculator test test-reference wheel wheel-smoke bench bench-relax clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: 2.13.0 is the cached CPU wheel on our machines; pyproject only asks for torch>=2.4
	$(BIN)/pip install -q torch==2.13.0

venv: $(BIN)/python

install: venv
	$(BIN)/pip install -q -e .

install-test: venv
	$(BIN)/pip install -q -e ".[test]"

# the main job: adsorption energies with AdsorbML on the shipped distilled model, SevenNet single
# points on the top k (a few minutes on 2 CPU cores)
demo: install-adsorbml
	$(BIN)/adsorbml demo

# the plumbing demo: EMT-trained model, EMT as "DFT", ground truth and success/speedup metrics
demo-toy: install-adsorbml
	$(BIN)/adsorbml demo --toy

# energies and forces through the ASE calculator and the batch API (seconds)
demo-calculator: install
	$(BIN)/python examples/demo.py

install-adsorbml: venv
	$(BIN)/pip install -q -e ".[adsorbml,teacher]"

test: install-test
	$(BIN)/python -m pytest -q

# a wheel in dist/ (carries the shipped model as eqv2_calc/shipped/); built from a clean clone
wheel: venv
	rm -rf dist && git clone -q . dist/src && $(BIN)/python -m pip wheel -q --no-deps -w dist dist/src && rm -rf dist/src
	@ls dist/*.whl

# acceptance check of the packaging: clean clone -> wheel -> fresh venv -> calculator and
# `adsorbml demo --placements 1` from /tmp (tests committed HEAD; needs PyPI)
wheel-smoke:
	.ci/wheel_smoke.sh

# Parity checks against the live fairchem 1.10 reference (needs ../shared/reference/setup_refvenv.sh)
test-reference: install-test
	EQV2_REFVENV=$(REFVENV) $(BIN)/python -m pytest -q -m reference

bench: install
	$(BIN)/python benchmarks/forward.py

bench-relax: install
	$(BIN)/python benchmarks/relax.py

clean:
	rm -rf $(VENV) build dist *.egg-info
