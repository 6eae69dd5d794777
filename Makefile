# n4 — every target sets itself up first, so each works from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install serve test bench clean

install: $(STAMP)

# torch==2.13.0 goes in first and alone: this machine keeps that CPU wheel on local disk, whereas letting pip
# resolve a bare `torch` pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml training/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The training package (n4-train) needs the `n4` just installed; its own tests run in `make test` too.
	$(PY) -m pip install --quiet -e training
	touch $(STAMP)

serve: install
	$(VENV)/bin/n4 serve --host 127.0.0.1 --port 8000

test: install
	$(PY) -m pytest -q -x --durations=15 tests training/tests

bench: install
	$(PY) benchmarks/concurrency.py

clean:
	rm -rf $(VENV) *.egg-info training/*.egg-info
