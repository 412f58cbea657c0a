"""`make run` does not open the backend to every interface without basic auth unless told to.

The check is scripts/bind_address.sh (what `make run` binds), run here directly, and `make run`
itself with HOST=0.0.0.0 and no auth, which must stop before gunicorn starts.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bind_address.sh"


def bind(**env: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(["sh", str(SCRIPT)], env={**base, **env}, capture_output=True, text=True, timeout=10)


def test_without_auth_it_listens_on_loopback_and_says_how_to_open_it():
    r = bind()
    assert r.returncode == 0 and r.stdout.strip() == "127.0.0.1:9090"
    assert "BASIC_AUTH_USER" in r.stderr and "HOST=0.0.0.0" in r.stderr and "ALLOW_OPEN=1" in r.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20"])
def test_an_open_address_without_auth_is_refused_with_status_2(host):
    r = bind(HOST=host)
    assert r.returncode == 2 and r.stdout == ""
    assert f"refusing to listen on {host}:9090 without basic auth" in r.stderr and "ALLOW_OPEN=1" in r.stderr
    # one of the two auth variables is not auth
    assert bind(HOST=host, BASIC_AUTH_USER="ann").returncode == 2


def test_auth_or_an_explicit_allow_opens_it():
    assert bind(BASIC_AUTH_USER="ann", BASIC_AUTH_PASS="s3cret").stdout.strip() == "0.0.0.0:9090"
    assert bind(HOST="0.0.0.0", BASIC_AUTH_USER="ann", BASIC_AUTH_PASS="s3cret", PORT="9191").stdout.strip() \
        == "0.0.0.0:9191"
    r = bind(HOST="0.0.0.0", ALLOW_OPEN="1")
    assert r.returncode == 0 and r.stdout.strip() == "0.0.0.0:9090"
    assert bind(HOST="::", ALLOW_OPEN="1").stdout.strip() == "[::]:9090"  # gunicorn's form for IPv6
    assert bind(HOST="127.0.0.1").stdout.strip() == "127.0.0.1:9090"
    assert bind(HOST="0.0.0.0", ALLOW_OPEN="yes").returncode == 2  # only 1 accepts the risk


def test_make_run_uses_the_check_and_stops_before_gunicorn():
    dry = subprocess.run(["make", "-n", "-o", ".venv/.installed", "run"], cwd=REPO, capture_output=True, text=True,
                         timeout=30)
    assert dry.returncode == 0 and "scripts/bind_address.sh" in dry.stdout and "--bind 0.0.0.0" not in dry.stdout
    env = {k: v for k, v in os.environ.items() if k not in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "ALLOW_OPEN")}
    r = subprocess.run(["make", "-s", "-o", ".venv/.installed", "run", "HOST=0.0.0.0", "PORT=9"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "refusing to listen on 0.0.0.0:9" in r.stderr
    assert "gunicorn --bind" not in r.stdout
