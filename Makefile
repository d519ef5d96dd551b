# The two commands of the README. Each one sets up .venv on first use (or when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test test-all bench docs
quickstart: $(VENV)/.installed
	$(VENV)/bin/substrate quickstart

test: $(VENV)/.installed
	$(PY) -m pytest

test-all: $(VENV)/.installed
	$(PY) -m pytest -m ""

# where `make docs` writes the API reference (CI: a temporary folder)
API ?= docs/api
docs: $(VENV)/.installed
	$(PY) docs/build_api.py $(API)

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_step.py
	$(PY) benchmarks/bench_gradient.py
	$(PY) benchmarks/bench_ep_epoch.py
	$(PY) benchmarks/bench_devices.py
	$(PY) benchmarks/bench_er.py
	$(PY) benchmarks/bench_dpm_memory.py

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned, so that nothing pulls a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@
