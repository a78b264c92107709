# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast lint format bench headline clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch first: a plain `torch` requirement would pull CUDA wheels.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(PY) train.py $(ARGS)

# The default suite skips nothing but the CUDA tests on a machine without a GPU.
test: $(STAMP)
	$(PY) -m pytest $(ARGS)

# The fast tier, run after every edit: no process, at most 10 optimizer steps a test
# (tests/conftest.py fails a test that breaks either rule; docs/development.md).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" -n auto $(ARGS)

# ruff: lint and formatting (configured in pyproject.toml); CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) bench/train_speed.py

# The report of the committed z = 40 runs, and its headline table copied into README.md.
headline: $(STAMP)
	$(PY) -m surgery.report results/literature/runs --out results/literature --headline results/literature/headline.yaml
	$(PY) scripts/headline.py

clean:
	rm -rf $(VENV) outputs multirun
