# The two commands of the README. Each one sets up .venv on first use (or when pyproject.toml changes).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test test-all bench docs warmup
quickstart: $(VENV)/.installed
	$(VENV)/bin/substrate quickstart

test: $(VENV)/.installed
	$(PY) -m pytest

test-all: $(VENV)/.installed
	$(PY) -m pytest -m ""

# compiles the kernels of the common paths into Numba's cache (the set-up below runs it once)
warmup: $(VENV)/.installed
	$(VENV)/bin/substrate warmup

# where `make docs` writes the API reference (CI: a temporary folder)
API ?= docs/api
docs: $(VENV)/.installed
	$(PY) docs/build_api.py $(API)

# every bench through benchmarks/results.py: benchmarks/results/<bench>.json beside its printed table,
# then the README's performance block regenerated from those files
# bench_compile last: it is the longest (every path of `substrate warmup` compiled from an empty cache)
BENCHES := bench_step bench_activations bench_gradient bench_implicit bench_ep_epoch bench_devices bench_er \
	bench_dpm_memory bench_pvrnn_train bench_circuit_dc bench_compile
bench: $(VENV)/.installed
	for b in $(BENCHES); do $(PY) benchmarks/results.py benchmarks/$$b.py || exit 1; done
	$(PY) benchmarks/readme_table.py

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned, so that nothing pulls a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(VENV)/bin/substrate warmup
	touch $@
