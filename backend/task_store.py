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
  its own, so previews refine against the workers' latest masks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lazyxmem_core.lazy import LazySession
from lazyxmem_core.media import FrameSequence
from lazyxmem_core.session_view import SessionView, ViewMasks
from lazyxmem_core.types import Correction

from .edits import start_digest
from .labelconfig import LabelConfig

log = logging.getLogger(__name__)


def video_key(task: dict) -> str:
    """Names a task's video in every refiner call: its id and a digest of its media."""
    data = json.dumps(task.get("data") or {}, sort_keys=True, default=str).encode()
    return f"task-{int(task.get('id') or 0)}-{hashlib.sha256(data).hexdigest()[:16]}"


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
    revision: int = 0  # correction rounds in the session's masks: the "-rN" of its prediction
    corrections: dict[tuple[int, int], Correction] = field(default_factory=dict)  # sent to jobs so far
    applied: dict[tuple[int, int], Correction] = field(default_factory=dict)  # in this session
    rounds: int = 0  # correction rounds sent
    stamp: float = -1.0  # with workers: submission time of the job whose view this is
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
        """A newer view made elsewhere (a worker) replaces this process's own."""
        with self.meta_lock:
            if stamp > self.stamp:
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
