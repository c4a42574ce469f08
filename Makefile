# `make demo` and `make test` install what they need into .venv first (idempotent).
# torch comes first and pinned: `pip install torch==2.13.0` takes the CPU build; an unpinned torch
# would pull a multi-GB CUDA build. On a GPU machine, install your CUDA torch before `make install`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[serve,test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ce-ray demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=1200 tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/serve_load.py

clean:
	rm -rf demo_runs runs
