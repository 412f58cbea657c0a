"""Session fixtures for the end-to-end tests: a real Label Studio 1.23.2 and the backend on loopback.

Label Studio starts once per session (about 30 s on a fresh data dir); every test makes its own
project, so tests do not see each other's tasks.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ls_harness import (Backend, LabelStudio, serving_backend, start_label_studio,  # noqa: E402
                        stop_process)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/e2e needs the real servers: mark it so `-m "not e2e"` skips it.
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def label_studio(e2e_dir: Path) -> Iterator[LabelStudio]:
    ls = start_label_studio(e2e_dir)
    try:
        yield ls
    finally:
        stop_process(ls.proc)


@pytest.fixture(scope="session")
def backend_server(label_studio: LabelStudio, e2e_dir: Path) -> Iterator[Backend]:
    with serving_backend(label_studio, e2e_dir) as backend:
        yield backend


@pytest.fixture
def ls_page(label_studio: LabelStudio):
    """A fresh logged-in Playwright page (Debian's chromium) per test."""
    from ls_harness import browser_page

    with browser_page(label_studio) as page:
        yield page
