# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HF_STAMP := $(VENV)/.installed-hf

.PHONY: demo test test-fast lint format lessons clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The hf extra (transformers, TRL) for the export and parity tests; torch stays at its pin.
$(HF_STAMP): $(STAMP) requirements-hf.txt
	$(PY) -m pip install --quiet -r requirements-hf.txt -c requirements.txt
	touch $(HF_STAMP)

demo: $(STAMP)  ## set up, then run the default pipeline
	$(VENV)/bin/minidpo demo

test: $(HF_STAMP) lint  ## set up, then run every test
	$(PY) -m pytest -q

test-fast: $(HF_STAMP)  ## skip the slow tests
	$(PY) -m pytest -q -m "not slow"

lessons: $(HF_STAMP)  ## re-execute every lesson notebook in place (outputs kept)
	$(PY) scripts/lessons.py run

lint: $(STAMP)
	$(VENV)/bin/ruff check minidpo tests scripts
	$(VENV)/bin/ruff format --check minidpo tests scripts

format: $(STAMP)
	$(VENV)/bin/ruff format minidpo tests scripts
	$(VENV)/bin/ruff check --fix minidpo tests scripts

clean:
	rm -rf runs .pytest_cache
