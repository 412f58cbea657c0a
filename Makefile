# Quick start: `make run` (the ML backend on :9090) and `make test` (the whole test suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 9090
WORKERS ?= 1
THREADS ?= 4
STAMP := $(VENV)/.installed

.PHONY: run test install bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/gunicorn --bind 0.0.0.0:$(PORT) --workers $(WORKERS) --threads $(THREADS) --timeout 0 backend.wsgi:app

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/embedded_quality.py

clean:
	rm -rf $(VENV) .pytest_cache
