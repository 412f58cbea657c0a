"""The project's prediction version (``Service.check_version_soon``): an event that comes while a
look is under way is not lost."""
from __future__ import annotations

import threading
import time

import backend.service as service_module
from backend.service import Service
from backend.settings import BackendSettings


class SlowLabelStudio:
    """``show_our_version`` as Label Studio answers it: the first look is still waiting for its
    answer when the prediction is posted, and is refused (no prediction carries the version yet)."""

    configured = True

    def __init__(self) -> None:
        self.looks: list[str] = []
        self.first_under_way = threading.Event()
        self.release = threading.Event()

    def show_our_version(self, project: int, ours: str) -> str:
        self.looks.append(ours)
        if len(self.looks) == 1:
            self.first_under_way.set()
            self.release.wait(10)
            raise RuntimeError("400: no prediction has this model version")
        return "moved"


def wait_for(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_a_post_during_a_refused_look_gets_a_look_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(service_module, "VERSION_DELAY_S", 0.01)
    service = Service(BackendSettings(ls_url="http://127.0.0.1:9", api_key="k", cache_dir=str(tmp_path / "cache")))
    ls = service.ls = SlowLabelStudio()
    service.check_version_soon(5)  # after the /predict answer
    assert ls.first_under_way.wait(10)
    service.check_version_soon(5)  # the prediction is posted while that look waits
    service.check_version_soon(5)  # (and another event: still one look after it, not two)
    ls.release.set()
    assert wait_for(lambda: len(ls.looks) == 2), ls.looks
    assert wait_for(lambda: service._version_checks[5][0] is not None)  # settled: no look for a while
    service.check_version_soon(5)
    time.sleep(0.2)
    assert len(ls.looks) == 2


def test_a_look_that_settles_is_not_repeated_for_events_during_it(tmp_path, monkeypatch):
    monkeypatch.setattr(service_module, "VERSION_DELAY_S", 0.01)
    service = Service(BackendSettings(ls_url="http://127.0.0.1:9", api_key="k", cache_dir=str(tmp_path / "cache")))
    ls = service.ls = SlowLabelStudio()
    ls.looks.append("an earlier look")  # the next look is answered at once: "moved"
    service.check_version_soon(6)
    service.check_version_soon(6)  # during the look (its timer has not fired yet)
    assert wait_for(lambda: service._version_checks.get(6, (None,))[0] is not None)
    time.sleep(0.2)
    assert ls.looks == ["an earlier look", service.model_version]
