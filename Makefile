# `make demo` and `make test` set up .venv on first use (Python 3.11, everything pinned) and are
# quick once it exists. `make setup` alone does the set-up.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# Re-run the set-up when any of these change.
SETUP_INPUTS := requirements/base.txt requirements/nodeps.txt requirements/constraints.txt \
	pyproject.toml setup.py backends/reference_torch/pyproject.toml backends/mindspore/pyproject.toml backends/jax/pyproject.toml backends/numpy/pyproject.toml \
	sglang_fx/system_libs.py
STAMP := $(VENV)/.sglang-fx-setup
# pip warns once per package about the machine-wide extra index dirs that do not exist.
QUIET := sed "/is ignored: it is neither a file nor a directory/d"

.PHONY: setup demo test conformance bench bench-serving bench-w8a8 dist clean

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c requirements/constraints.txt -r requirements/base.txt 2>&1 | $(QUIET)
	$(PIP) install --no-deps -c requirements/constraints.txt -r requirements/nodeps.txt 2>&1 | $(QUIET)
	rm -rf *.egg-info backends/*/*.egg-info  # stale metadata in the source tree shadows the installed entry points
	$(PIP) install --no-deps --no-build-isolation -e . -e backends/reference_torch -e backends/mindspore -e backends/jax -e backends/numpy 2>&1 | $(QUIET)
	$(VENV)/bin/sglang-fx setup-cpu-host
	$(VENV)/bin/sglang-fx install-system-libs  # libibverbs for Mooncake (PD); pinned .debs, no root
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q

conformance: setup
	$(VENV)/bin/sglang-fx conformance --backend reference_torch
	$(VENV)/bin/sglang-fx conformance --backend mindspore
	$(VENV)/bin/sglang-fx conformance --backend jax
	$(VENV)/bin/sglang-fx conformance --backend numpy

# An sdist and a wheel of each distribution (sglang-fx and its backends) in dist/, each wheel built
# from its sdist (tools/dist.py).
dist: setup
	rm -rf dist
	$(PY) tools/dist.py --out dist

clean:
	rm -rf $(VENV) build dist *.egg-info backends/*/*.egg-info

bench: setup
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/sglang_decode.py
	$(PY) benchmarks/sglang_decode.py --model smollm2 --batch 1 --batch 8 --batch 32 --steps 32 --repeats 3
	$(PY) benchmarks/parallel.py
	$(PY) benchmarks/warmup.py

bench-serving: setup
	$(PY) benchmarks/serving.py

bench-w8a8: setup
	$(PY) benchmarks/w8a8.py
