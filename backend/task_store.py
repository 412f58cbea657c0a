"""The task store: each task's session, who may touch it when, and its results shared over Redis.

Concurrency model (one backend process: gunicorn's web threads plus the job threads; with
Redis also worker processes):

- **Whose it is.** A :class:`TaskState` belongs to one Label Studio task: its frames, its
  objects, its :class:`LazySession`, its refiner calls keyed by ``video_key`` (the task id and a
  digest of its media) so that no cache ever answers for another task's frames.
- **Writers, one at a time per task.** Propagation and corrections change the session; they run
  under ``state.write_lock`` (held for the whole pass, never by a web thread for longer than the
  request's propagation budget). Writers of different tasks run side by side.
- **Readers never wait for writers.** Predictions, interactive previews and the masks endpoint
  read ``state.view``: an immutable :class:`SessionView` the writer replaces (one assignment)
  after each pass and once a second during a long one. A reader takes the attribute once and
  works on that object: it sees a whole pass, never half a rewrite.
- **Bookkeeping.** ``state.meta_lock`` (held for a few statements) guards the corrections sent
  to jobs, the round counter and the published view's stamp.
- **The store itself.** One lock guards the LRU of states; a task's session is built by one
  thread at a time (striped build locks), so two requests for a new task never build it twice.
- **Workers.** With Redis, the worker that ran a task's latest job stores its view and
  prediction (:class:`ViewStore`); the web process adopts a stored view when it is newer than
  its own, so previews refine against the workers' latest masks. Without Redis the jobs store
  them on disk (:class:`DiskViewStore`), so they survive a restart of the backend.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from lazyxmem_core.lazy import LazySession
from lazyxmem_core.media import FrameSequence
from lazyxmem_core.session_view import SessionView, ViewMasks
from lazyxmem_core.types import Correction

from .edits import start_digest
from .frames import FrameMap
from .labelconfig import LabelConfig

log = logging.getLogger(__name__)


def video_key(task: dict) -> str:
    """Names a task's video in every refiner call: its id and a digest of its media."""
    data = json.dumps(task.get("data") or {}, sort_keys=True, default=str).encode()
    return f"task-{int(task.get('id') or 0)}-{hashlib.sha256(data).hexdigest()[:16]}"


def anchor_corrections(view: SessionView) -> dict[tuple[int, int], Correction]:
    """The human-given masks of a view after each object's first (its start, given by the task):
    the corrections it holds, as masks (a mask correction is taken as it is, so replaying them
    gives the same masks)."""
    return {(t, label): Correction(mask=packed.unpack().astype(bool))
            for label, entries in view.anchors.items() for t, packed in sorted(entries, key=lambda e: e[0])[1:]}


@dataclass(eq=False)
class TaskState:
    """A task's video, its objects and its Lazy session (deferred mode: review frames, no callback)."""

    task_id: int
    cfg: LabelConfig
    frames: FrameSequence
    objects: list[tuple[int, str]]  # (core label value, label text)
    session: LazySession
    fps: float
    task: dict  # as Label Studio sent it: what a job needs to rebuild this
    view: SessionView  # what readers see; replaced whole by publish() / adopt()
    revision: int = 0  # correction rounds in the session's masks: its prediction's "revision"
    corrections: dict[tuple[int, int], Correction] = field(default_factory=dict)  # sent to jobs so far
    applied: dict[tuple[int, int], Correction] = field(default_factory=dict)  # in this session
    rounds: int = 0  # correction rounds sent
    stamp: float = -1.0  # with workers: submission time of the job whose view this is
    frame_map: FrameMap | None = None  # video: how Label Studio numbers its frames (backend.frames)
    write_lock: threading.RLock = field(default_factory=threading.RLock)
    meta_lock: threading.Lock = field(default_factory=threading.Lock)

    @cached_property
    def digest(self) -> str:
        """What the session was built from (the task's media and initial regions)."""
        return start_digest(self.task)

    def publish(self, revision: int | None = None) -> None:
        """Make the session's current results (and their correction round) what readers see;
        the writer calls it, holding ``write_lock``."""
        view = self.session.view()
        with self.meta_lock:
            self.view = view
            if revision is not None:
                self.revision = revision

    def adopt(self, view: SessionView, stamp: float, revision: int) -> None:
        """A newer view made elsewhere (a worker, or this backend before a restart) replaces this
        process's own. A state that knows no corrections (just built) learns the view's corrected
        masks as mask corrections: the next correction job carries them, so a session rebuilt from
        the task keeps them (after a restart, round 2 used to drop round 1's correction)."""
        with self.meta_lock:
            if stamp > self.stamp:
                if not self.corrections and not self.applied:
                    self.corrections.update(anchor_corrections(view))
                self.view, self.stamp, self.revision = view, stamp, max(self.revision, revision)

    def masks(self) -> ViewMasks:
        return self.view.frame_masks()


class TaskStore:
    """The states held by this process: an LRU of at most ``max_sessions`` tasks."""

    STRIPES = 64

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._states: OrderedDict[int, TaskState] = OrderedDict()
        self._lock = threading.Lock()
        self._build_locks = [threading.Lock() for _ in range(self.STRIPES)]

    def held(self, task_id: int) -> TaskState | None:
        with self._lock:
            state = self._states.get(task_id)
            if state is not None:
                self._states.move_to_end(task_id)
            return state

    def keep(self, state: TaskState) -> None:
        with self._lock:
            self._states[state.task_id] = state
            self._states.move_to_end(state.task_id)
            while len(self._states) > self.max_sessions:
                old, _ = self._states.popitem(last=False)
                log.info("task %s: session dropped (LRU, MAX_SESSIONS=%d)", old, self.max_sessions)

    def drop(self, task_id: int, state: TaskState | None = None) -> None:
        """Forget the task's state (only ``state`` itself, when given: not a newer one)."""
        with self._lock:
            if state is None or self._states.get(task_id) is state:
                self._states.pop(task_id, None)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()

    def held_or_build(self, task_id: int, build: Callable[[], TaskState | None],
                      accept: Callable[[TaskState], bool] = lambda s: True) -> TaskState | None:
        """The held state when ``accept`` takes it, else one built by ``build`` and kept; one
        thread builds a task at a time, the others wait and take its result."""
        with self._build_locks[task_id % self.STRIPES]:
            state = self.held(task_id)
            if state is not None and accept(state):
                return state
            state = build()
            if state is not None:
                self.keep(state)
            return state

    def __len__(self) -> int:
        return len(self._states)


class StoredView(NamedTuple):
    """A task's stored masks: the job's submission time, the view, its correction round, the
    prediction posted from it."""

    stamp: float
    view: SessionView
    revision: int
    prediction: dict


class ViewStore:
    """The latest view and prediction of each task, in Redis, written by whichever worker ran its
    latest job. Entries are keyed by task, model version and initial regions (a changed task is
    another entry), ordered by the submission time of the job that made them: a job queued earlier
    never overwrites a later one's, and a plain propagation never overwrites corrected masks."""

    def __init__(self, redis: Any, ttl_s: int = 7 * 86400) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    @staticmethod
    def key(task: dict, model_version: str) -> str:
        return f"lazyxmem:view:{int(task.get('id') or 0)}:{start_digest(task)}:{model_version}"

    def put(self, task: dict, model_version: str, stamp: float, view: SessionView, revision: int,
            prediction: dict, only_if_absent: bool = False) -> bool:
        from redis.exceptions import WatchError

        key = self.key(task, model_version)
        blob = view.to_bytes()
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    old = pipe.hget(key, "stamp")
                    if old is not None and (only_if_absent or float(old) >= stamp):
                        pipe.reset()
                        return False
                    pipe.multi()
                    pipe.hset(key, mapping={"stamp": repr(float(stamp)), "view": blob, "revision": revision,
                                            "prediction": json.dumps(prediction)})
                    pipe.expire(key, self.ttl_s)
                    pipe.execute()
                    return True
                except WatchError:  # another worker wrote in between: compare again
                    continue

    def has(self, task: dict, model_version: str) -> bool:
        """Whether a worker stored a view for the task (no transfer of the view itself)."""
        return bool(self.redis.hexists(self.key(task, model_version), "stamp"))

    def get(self, task: dict, model_version: str, newer_than: float = -1.0) -> tuple[float, SessionView, int] | None:
        """(stamp, view, revision) when the store holds a view newer than ``newer_than``."""
        key = self.key(task, model_version)
        stamp = self.redis.hget(key, "stamp")
        if stamp is None or float(stamp) <= newer_than:
            return None
        blob, revision = self.redis.hmget(key, ["view", "revision"])
        if blob is None:
            return None
        return float(stamp), SessionView.from_bytes(blob), int(revision or 0)

    def prediction(self, task: dict, model_version: str) -> dict | None:
        raw = self.redis.hget(self.key(task, model_version), "prediction")
        return json.loads(raw) if raw else None

    def revision(self, task: dict, model_version: str) -> int:
        """The correction round of the stored masks (0: none stored, or none corrected)."""
        return int(self.redis.hget(self.key(task, model_version), "revision") or 0)

    def latest(self, task_id: int, model_version: str | None) -> StoredView | None:
        """The newest entry of a task, whatever its initial regions (the task itself unknown), made
        by ``model_version`` (None: by any)."""
        best: tuple[float, bytes] | None = None
        pattern = f"lazyxmem:view:{int(task_id)}:*:{model_version or '*'}"
        for key in self.redis.scan_iter(match=pattern, count=100):
            stamp = self.redis.hget(key, "stamp")
            if stamp is not None and (best is None or float(stamp) > best[0]):
                best = (float(stamp), key)
        if best is None:
            return None
        blob, revision, prediction = self.redis.hmget(best[1], ["view", "revision", "prediction"])
        if blob is None:
            return None
        return StoredView(best[0], SessionView.from_bytes(blob), int(revision or 0),
                          json.loads(prediction) if prediction else {})


# What a disk store keeps, at most: past it the least recently written entries are deleted. A
# view is its zlib-packed masks: 0.44-0.66 MB per 100 frames of 854x480 with one object (six
# DAVIS-2016 sequences' masks), so 2 GB holds some 4000 such tasks; the media cache is 20 GB.
DISK_VIEWS_MAX_BYTES = 2 * 2**30


class DiskViewStore:
    """:class:`ViewStore`'s entries on disk, for a backend without Redis: the masks of its jobs
    outlive a restart (a reopened task gets its corrected prediction, ``/tasks/<id>/masks`` answers,
    the revision count continues), and ``lazyxmem ls export`` reads them.

    One file per entry, ``<dir>/task-<id>/<start digest>-<model hash>.view``: a JSON line (stamp,
    revision, model version, the prediction's length), the prediction, then the view's bytes. Files
    are written to a temp file and renamed over (a reader sees the old entry or the new one, never
    half of one); writers (the web process's job threads, a CLI) take a file lock, so "newer stamp
    wins" holds across processes. Private: the directory is 0700, the files 0600.
    """

    RESCAN_S = 60.0  # the folder is measured again at least this often (other processes write too)

    def __init__(self, directory: str | os.PathLike, max_bytes: int = DISK_VIEWS_MAX_BYTES) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._total: int | None = None  # bytes in the store at the last scan, plus those written since
        self._scanned = 0.0

    def _path(self, task: dict, model_version: str) -> Path:
        model = hashlib.sha256(model_version.encode()).hexdigest()[:12]  # a version may hold any character
        return self.dir / f"task-{int(task.get('id') or 0)}" / f"{start_digest(task)}-{model}.view"

    @staticmethod
    def _meta(path: Path) -> dict | None:
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.readline(4096))
            return meta if isinstance(meta, dict) and "stamp" in meta else None
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # another program's file, or a damaged one: not ours to serve
            log.warning("view store: %s unreadable (%s); ignored", path, type(exc).__name__)
            return None

    @staticmethod
    def _read(path: Path) -> StoredView | None:
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.readline(4096))
                prediction = json.loads(f.read(int(meta["prediction_bytes"])))
                view = SessionView.from_bytes(f.read())
            return StoredView(float(meta["stamp"]), view, int(meta["revision"]), prediction)
        except FileNotFoundError:  # evicted or replaced between the listing and the read
            return None
        except Exception as exc:  # noqa: BLE001 - a damaged entry is a missing one, said in the log
            log.warning("view store: %s unreadable (%s); ignored", path, type(exc).__name__)
            return None

    def put(self, task: dict, model_version: str, stamp: float, view: SessionView, revision: int,
            prediction: dict, only_if_absent: bool = False) -> bool:
        path = self._path(task, model_version)
        pred = json.dumps(prediction).encode()
        meta = {"stamp": float(stamp), "revision": int(revision), "model_version": model_version,
                "prediction_bytes": len(pred)}
        blob = view.to_bytes()
        try:
            with self._lock, self._file_lock():
                old = self._meta(path)
                if old is not None and (only_if_absent or float(old["stamp"]) >= stamp):
                    return False
                path.parent.mkdir(mode=0o700, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".put-")  # 0600
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(json.dumps(meta).encode() + b"\n" + pred + blob)
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                self._drop_older(path, model_version, stamp)
                self._evict(keep=path, written=len(pred) + len(blob))
        except OSError as exc:
            # A full or read-only disk must not cost the user the prediction just made: it is
            # answered and posted, only not kept past a restart.
            log.warning("view store: task %s's masks not kept (%s: %s); they will not survive a restart: free space "
                        "in CACHE_DIR or make %s writable", task.get("id"), type(exc).__name__, exc.strerror or exc,
                        self.dir)
            return False
        return True

    def has(self, task: dict, model_version: str) -> bool:
        return self._meta(self._path(task, model_version)) is not None

    def get(self, task: dict, model_version: str, newer_than: float = -1.0) -> tuple[float, SessionView, int] | None:
        path = self._path(task, model_version)
        meta = self._meta(path)  # one line: the common "nothing newer" answer reads no masks
        if meta is None or float(meta["stamp"]) <= newer_than:
            return None
        got = self._read(path)
        return None if got is None or got.stamp <= newer_than else (got.stamp, got.view, got.revision)

    def prediction(self, task: dict, model_version: str) -> dict | None:
        got = self._read(self._path(task, model_version))
        return None if got is None else got.prediction

    def revision(self, task: dict, model_version: str) -> int:
        meta = self._meta(self._path(task, model_version))
        return 0 if meta is None else int(meta["revision"])

    def latest(self, task_id: int, model_version: str | None) -> StoredView | None:
        """The newest entry of a task, whatever its initial regions (the task itself unknown), made
        by ``model_version`` (None: by any)."""
        best: tuple[float, Path] | None = None
        for path in self._entries(self.dir / f"task-{int(task_id)}"):
            meta = self._meta(path)
            if meta is not None and model_version in (None, meta.get("model_version")) and (
                    best is None or float(meta["stamp"]) > best[0]):
                best = (float(meta["stamp"]), path)
        return None if best is None else self._read(best[1])

    # -- housekeeping (under the locks) ----------------------------------------------------------
    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        """An exclusive lock on ``<dir>/.lock``: writers in other processes wait."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # a directory made earlier by hand may be wider
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @staticmethod
    def _entries(directory: Path) -> list[Path]:
        try:
            return [Path(e.path) for e in os.scandir(directory) if e.name.endswith(".view") and e.is_file()]
        except FileNotFoundError:
            return []

    def _drop_older(self, path: Path, model_version: str, stamp: float) -> None:
        """The task's entries for older initial regions: the task was edited since; the latest
        entry is what its masks are now (and the only one ``latest`` should find)."""
        for other in self._entries(path.parent):
            meta = self._meta(other)
            if other != path and meta is not None and meta.get("model_version") == model_version \
                    and float(meta["stamp"]) < stamp:
                other.unlink(missing_ok=True)

    def _evict(self, keep: Path, written: int) -> None:
        """Delete the least recently written entries while the store is over ``max_bytes``. The
        folder is scanned only when the running total says it may be over, or once a minute: a
        scan of 2000 entries took 0.2 s, too long to do on every prediction."""
        now = time.monotonic()
        if self._total is not None and now - self._scanned < self.RESCAN_S and self._total + written <= self.max_bytes:
            self._total += written
            return
        files = []
        for task_dir in self.dir.glob("task-*"):
            for path in self._entries(task_dir):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        self._scanned = now
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            log.info("view store: %s evicted (least recently written; the store holds at most %d MB)",
                     path.relative_to(self.dir), self.max_bytes // 2**20)
            try:
                path.parent.rmdir()  # its task's last entry
            except OSError:
                pass
        self._total = total
