# Quick start: `make run` (the ML backend on :9090) and `make test` (the whole test suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 9090
WORKERS ?= 1
THREADS ?= 4
STAMP := $(VENV)/.installed
# Label Studio itself (for the end-to-end tests) lives in its own venv: its pins clash with ours.
LS_VERSION ?= 1.23.2
LS_VENV ?= .venv-ls
LS_STAMP := $(LS_VENV)/.installed-$(LS_VERSION)
# Debian packages the tests need: a browser for Playwright, ffmpeg for H.264 test videos, redis-server
# for the job-queue tests, and
# docker-compose to validate the compose file (no Docker engine needed for `config`).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test install install-e2e sysdeps bench clean

$(STAMP): requirements.txt requirements-sam2.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --no-build-isolation -r requirements-sam2.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(LS_STAMP):
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LS_VENV)/bin/python -m pip install --quiet label-studio==$(LS_VERSION)
	touch $(LS_STAMP)

# Installs only what is missing, so it costs nothing once done. Never `playwright install`:
# the tests drive Debian's /usr/bin/chromium.
sysdeps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium fonts-liberation"; \
	command -v ffmpeg >/dev/null 2>&1 || missing="$$missing ffmpeg"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
		echo "apt-get install:$$missing"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

install: $(STAMP)

install-e2e: $(STAMP) $(LS_STAMP) sysdeps

# Binds 127.0.0.1 unless basic auth is set (BASIC_AUTH_USER/BASIC_AUTH_PASS); HOST=0.0.0.0 without
# it is refused unless ALLOW_OPEN=1 (scripts/bind_address.sh says why and how).
run: $(STAMP)
	@bind=$$(HOST="$(HOST)" PORT="$(PORT)" sh scripts/bind_address.sh) || exit $$?; \
	echo "gunicorn --bind $$bind"; \
	exec $(VENV)/bin/gunicorn --bind "$$bind" --workers $(WORKERS) --threads $(THREADS) --timeout 0 backend.wsgi:app

test: $(STAMP) $(LS_STAMP) sysdeps
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/embedded_quality.py

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache
