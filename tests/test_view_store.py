"""The disk view store (backend.task_store.DiskViewStore): a backend without Redis keeps its jobs'
masks across a restart, with ViewStore's rules (newer stamp wins, only_if_absent), private files
written whole, and a bound on its size."""
from __future__ import annotations

import os
import stat
import threading

import numpy as np
import pytest

from backend.task_store import DiskViewStore
from lazyxmem_core.session_view import SessionView
from lazyxmem_core.types import PackedMask
from test_queue import redis_url  # noqa: F401 - a real redis-server, for ViewStore

MODEL = "lazyxmem-test-embedded"


def view(offset: int, n: int = 5, shape: tuple[int, int] = (4, 6)) -> SessionView:
    rng = np.random.default_rng(offset)
    masks = tuple(PackedMask.pack(rng.integers(0, 3, shape).astype(np.uint8)) for _ in range(n))
    anchor = PackedMask.pack(np.ones(shape, bool))
    return SessionView("task-1-x", n, shape, (1, 2), masks, {(2, 1): anchor}, {1: ((0, anchor),)}, (3,), (1,), 0.25)


def task(task_id: int = 1, start: float = 10.0) -> dict:
    region = {"id": "r1", "type": "videorectangle", "from_name": "box", "to_name": "video",
              "value": {"sequence": [{"frame": 1, "x": start, "y": 10.0, "width": 20.0, "height": 20.0}],
                        "labels": ["Object"]}}
    return {"id": task_id, "data": {"video": "/data/upload/1/v.avi"}, "annotations": [{"id": 7, "result": [region]}]}


def same(a: SessionView, b: SessionView) -> bool:
    return a.labels == b.labels and all((x == y).all() for x, y in zip(a.frame_masks(), b.frame_masks()))


def test_an_entry_survives_a_new_store_on_the_same_folder(tmp_path):
    t, v = task(), view(1)
    pred = {"result": [{"id": "lazyxmem-1"}], "model_version": MODEL + "-r2"}
    assert DiskViewStore(tmp_path / "views").put(t, MODEL, 5.0, v, 2, pred)
    again = DiskViewStore(tmp_path / "views")  # a restarted process
    assert again.has(t, MODEL) and not again.has(t, "another-model") and not again.has(task(2), MODEL)
    stamp, got, revision = again.get(t, MODEL)
    assert stamp == 5.0 and revision == 2 and same(got, v) and got.review == (3,) and got.anchors.keys() == {1}
    assert again.prediction(t, MODEL) == pred and again.revision(t, MODEL) == 2
    assert again.get(t, MODEL, newer_than=5.0) is None  # nothing newer than what the caller has
    latest = again.latest(1, MODEL)
    assert latest.stamp == 5.0 and latest.prediction == pred and same(latest.view, v)
    assert again.latest(1, "another-model") is None and again.latest(1, None) is not None and again.latest(9, None) is None
    assert again.revision(task(2), MODEL) == 0 and again.prediction(task(2), MODEL) is None


def test_newer_stamp_wins_and_only_if_absent_never_overwrites(tmp_path):
    store, t = DiskViewStore(tmp_path / "views"), task()
    assert store.put(t, MODEL, 10.0, view(1), 1, {"v": 1})
    assert not store.put(t, MODEL, 9.0, view(2), 0, {"v": 2})  # a job queued earlier finished later
    assert not store.put(t, MODEL, 10.0, view(2), 0, {"v": 2})
    assert not store.put(t, MODEL, 99.0, view(3), 0, {"v": 3}, only_if_absent=True)  # a plain propagation
    assert store.prediction(t, MODEL) == {"v": 1} and same(store.get(t, MODEL)[1], view(1))
    assert store.put(t, MODEL, 11.0, view(4), 2, {"v": 4})
    assert store.prediction(t, MODEL) == {"v": 4} and store.revision(t, MODEL) == 2


def test_racing_writers_leave_the_newest_entry(tmp_path):
    store, t = DiskViewStore(tmp_path / "views"), task()
    views = {s: view(s) for s in range(12)}
    threads = [threading.Thread(target=store.put, args=(t, MODEL, float(s), views[s], s, {"s": s})) for s in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stamp, got, revision = store.get(t, MODEL)
    assert stamp == 11.0 and revision == 11 and same(got, views[11]) and store.prediction(t, MODEL) == {"s": 11}
    assert not [p for p in (tmp_path / "views").rglob(".put-*")], "no temp file left behind"


def test_files_are_private_and_written_whole(tmp_path):
    store, t = DiskViewStore(tmp_path / "views"), task()
    store.put(t, MODEL, 1.0, view(1), 0, {})
    entries = list((tmp_path / "views").rglob("*.view"))
    assert len(entries) == 1 and entries[0].parent.name == "task-1"
    assert stat.S_IMODE(os.stat(tmp_path / "views").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(entries[0].parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(entries[0]).st_mode) == 0o600


def test_a_damaged_entry_is_a_missing_one(tmp_path, caplog):
    store, t = DiskViewStore(tmp_path / "views"), task()
    store.put(t, MODEL, 1.0, view(1), 0, {})
    path = next((tmp_path / "views").rglob("*.view"))
    path.write_bytes(path.read_bytes()[:200])  # cut short (by hand: the store never writes half a file)
    assert store.get(t, MODEL) is None and store.latest(1, MODEL) is None
    assert "unreadable" in caplog.text
    path.write_bytes(b"not json\n")
    assert not store.has(t, MODEL) and store.put(t, MODEL, 2.0, view(2), 0, {})  # replaced by the next job
    assert same(store.get(t, MODEL)[1], view(2))


def test_an_edited_task_keeps_only_its_latest_entry(tmp_path):
    """New initial regions are a new entry; the older one goes, so ``latest`` finds the masks of
    the task as it is now."""
    store = DiskViewStore(tmp_path / "views")
    store.put(task(start=10.0), MODEL, 1.0, view(1), 0, {"old": True})
    store.put(task(start=30.0), MODEL, 2.0, view(2), 0, {"old": False})
    assert not store.has(task(start=10.0), MODEL) and store.has(task(start=30.0), MODEL)
    assert store.latest(1, MODEL).prediction == {"old": False}


def test_the_store_is_bounded_least_recently_written_go_first(tmp_path):
    big = view(0, n=20, shape=(64, 64))
    size = len(big.to_bytes())
    store = DiskViewStore(tmp_path / "views", max_bytes=int(3.5 * size))
    for i in range(1, 7):
        assert store.put(task(i), MODEL, float(i), view(i, n=20, shape=(64, 64)), 0, {})
        os.utime(next((tmp_path / "views" / f"task-{i}").glob("*.view")), (i, i))  # written in this order
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "views").glob("task-*"))
    assert kept == [4, 5, 6], kept  # the three most recently written fit; the empty task folders went too
    total = sum(p.stat().st_size for p in (tmp_path / "views").rglob("*.view"))
    assert total <= 3.5 * size
    assert same(store.get(task(6), MODEL)[1], view(6, n=20, shape=(64, 64)))


def test_a_full_disk_loses_the_entry_not_the_prediction(tmp_path, monkeypatch, caplog):
    import errno
    import tempfile

    store, t = DiskViewStore(tmp_path / "views"), task()
    store.put(t, MODEL, 1.0, view(1), 0, {"v": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    assert store.put(t, MODEL, 2.0, view(2), 1, {"v": 2}) is False  # no exception for the caller
    assert "not kept" in caplog.text and "No space left on device" in caplog.text and "CACHE_DIR" in caplog.text
    assert store.prediction(t, MODEL) == {"v": 1}  # the older entry is intact


def _put_in_process(directory: str, stamp: float) -> bool:
    return DiskViewStore(directory).put(task(), MODEL, stamp, view(int(stamp)), int(stamp), {"s": stamp})


def test_writers_in_other_processes_keep_newer_stamp_wins(tmp_path):
    """The web process and a CLI (``ls export --recompute``) may write at once: a file lock orders them."""
    import multiprocessing

    stamps = [float(s) for s in range(1, 9)]
    # spawn, not fork: a fork of this multi-threaded test process can copy a lock another thread holds
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.starmap(_put_in_process, [(str(tmp_path / "views"), s) for s in reversed(stamps)])
    stamp, got, revision = DiskViewStore(tmp_path / "views").get(task(), MODEL)
    assert stamp == 8.0 and revision == 8 and same(got, view(8))


@pytest.fixture(params=["disk", "redis"])
def any_store(request, tmp_path):
    if request.param == "disk":
        return DiskViewStore(tmp_path / "views")
    from redis import Redis

    from backend.task_store import ViewStore

    redis = Redis.from_url(request.getfixturevalue("redis_url"))
    redis.flushdb()
    return ViewStore(redis)


def test_both_stores_answer_alike(any_store):
    """What the service and the masks route call, on Redis and on disk."""
    store = any_store
    assert store.latest(1, MODEL) is None and store.revision(task(), MODEL) == 0 and not store.has(task(), MODEL)
    assert store.put(task(), MODEL, 3.0, view(1), 2, {"v": 1})
    assert not store.put(task(), MODEL, 2.0, view(2), 5, {"v": 2})
    assert store.put(task(2), MODEL, 9.0, view(3), 0, {"v": 3})
    assert store.revision(task(), MODEL) == 2 and store.prediction(task(), MODEL) == {"v": 1}
    latest = store.latest(1, MODEL)
    assert latest.stamp == 3.0 and latest.revision == 2 and latest.prediction == {"v": 1} and same(latest.view, view(1))
    assert store.latest(1, "another-model") is None and store.latest(1, None).stamp == 3.0
    assert store.latest(2, None).prediction == {"v": 3}


def test_a_views_corrections_are_its_anchors_after_each_objects_start():
    from backend.task_store import anchor_corrections

    a0, a6, b3 = (np.zeros((4, 6), bool) for _ in range(3))
    a0[0, 0] = a6[1:3, 1:4] = b3[2, 5] = True
    anchors = {1: ((6, PackedMask.pack(a6)), (0, PackedMask.pack(a0))), 2: ((3, PackedMask.pack(b3)),)}
    v = SessionView("task-1-x", 8, (4, 6), (1, 2), (None,) * 8, {}, anchors, (), (), 0.0)
    got = anchor_corrections(v)
    assert list(got) == [(6, 1)] and (got[(6, 1)].mask == a6).all() and got[(6, 1)].clicks == ()
