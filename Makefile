# `make demo` and `make test` install what they need into .venv first (idempotent).
# torch comes first and pinned: `pip install torch==2.13.0` takes the CPU build; an unpinned torch
# would pull a multi-GB CUDA build. On a GPU machine, install your CUDA torch before `make install`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast bench clean constraints

# Versions come from constraints.txt (what CI tested); CONSTRAINTS= installs the newest within the floors.
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

# torch comes from pip (it finds the CPU build on this machine's disk; uv would download it), the rest from uv: the
# same versions (constraints.txt), bytecode compiled as pip does, 45 s for the whole install from a fresh venv instead
# of ~85 s. Where uv cannot install, pip does it all.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(PIP_C)
	$(PY) -m pip install -q uv $(PIP_C) && $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) -e ".[serve,test]" $(PIP_C) \
	  || $(PY) -m pip install -q -e ".[serve,test]" $(PIP_C)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ce-ray demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=1200 --durations=40 tests

# The edit-test loop: every test that starts no Ray (no `slow`, no `ray` marker).
test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not ray" tests

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/serve_load.py

# Re-pin constraints.txt from the current .venv (after `make install CONSTRAINTS=` to take new versions).
constraints:
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf demo_runs runs
