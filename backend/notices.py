"""Webhooks as notifications, not data.

Label Studio cannot sign its webhooks, and anyone who reaches the port can post one: a forged
``ANNOTATION_UPDATED`` used to rewrite a task's masks, a forged ``TASKS_CREATED`` to make the
backend fetch its own media and post the result onto any task. So a webhook is read for ids only
(action, project, task, annotation); what changed is read back from Label Studio with the
backend's own key, and only for projects that connected this backend (called ``/setup``).

Whose state is what:

- :class:`ConnectedProjects` is the process's (or, with Redis, every process's) record of the
  projects that called ``/setup``; ``/setup`` writes it, everything else reads it. Kept in a private
  file or in Redis: Label Studio does not call ``/setup`` again when the backend restarts.
- :class:`Notifier` holds notices not handled yet. The request thread only adds to it (bounded:
  ``MAX_PENDING_NOTICES``); one background thread reads Label Studio and hands the result to the
  service, which queues jobs. Notices for the same task (and annotation) coalesce: what is read
  later is the latest anyway. Pending notices live in memory: a restart loses those not yet
  looked up (seconds' worth), never a queued job.
"""
from __future__ import annotations

import heapq
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazyxmem_core.errors import LazyXMemError

from .checks import Malformed, TooLarge, got, whole

log = logging.getLogger(__name__)

IMPORT, ANNOTATION = "import", "annotation"
ACTIONS = {"TASKS_CREATED": IMPORT, "ANNOTATION_CREATED": ANNOTATION, "ANNOTATION_UPDATED": ANNOTATION}


class Busy(LazyXMemError):
    """More notices pending than ``MAX_PENDING_NOTICES``: the webhook is refused (429)."""


class NotYet(Exception):
    """Label Studio does not show the task yet (an upload's webhook can come before its task is
    readable): the notice is looked up again a little later."""


@dataclass(frozen=True)
class Notice:
    kind: str  # IMPORT or ANNOTATION
    project: int
    task: int
    annotation: int | None = None
    attempt: int = 0

    @property
    def key(self) -> tuple:
        return self.kind, self.task, self.annotation


def _id(obj: Any, where: str) -> int:
    if not isinstance(obj, dict):
        raise Malformed(f"{where} must be an object with an 'id', {got(obj)}")
    return whole(obj.get("id"), f"{where}.id", 1)


def notices_from(body: dict, max_tasks: int) -> list[Notice] | None:
    """The notices a webhook body names (None: an action this backend does not act on). Only ids
    are read; task data, results and label configs in the body are ignored."""
    action = body.get("action")
    if action is not None and not isinstance(action, str):
        raise Malformed(f"'action' must be a string, {got(action)}")
    kind = ACTIONS.get(action)
    if kind is None:
        return None
    project = _id(body.get("project"), "project")
    if kind == ANNOTATION:
        annotation = _id(body.get("annotation"), "annotation")
        return [Notice(ANNOTATION, project, _id(body.get("task"), "task"), annotation)]
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise Malformed(f"'tasks' must be a list of tasks, {got(tasks)}")
    if len(tasks) > max_tasks:
        raise TooLarge(f"the webhook lists {len(tasks)} tasks, over MAX_WEBHOOK_TASKS={max_tasks}: pre-annotate a "
                       "large import with `lazyxmem ls preannotate --project N`, or raise the limit")
    return [Notice(IMPORT, project, _id(t, f"tasks[{i}]")) for i, t in enumerate(tasks)]


class ConnectedProjects:
    """The projects that called ``/setup``, with the label config they sent."""

    def __init__(self, path: str | os.PathLike, redis: Any = None) -> None:
        self.path = Path(path)
        self.redis = redis
        self._lock = threading.Lock()
        self._configs: dict[int, str] = {}
        if redis is None:
            self._configs = self._read()

    def _read(self) -> dict[int, str]:
        try:
            return {int(k): str(v) for k, v in json.loads(self.path.read_text()).items()}
        except FileNotFoundError:
            return {}
        except (ValueError, OSError, AttributeError) as exc:
            log.warning("connected projects: %s unreadable (%s); projects must reconnect", self.path, type(exc).__name__)
            return {}

    def add(self, project: int, schema: str) -> None:
        if self.redis is not None:
            self.redis.hset("lazyxmem:projects", str(project), schema)
            return
        with self._lock:
            self._configs = {**self._read(), project: schema}  # another process may have added one
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".projects-")  # 0600
            with os.fdopen(fd, "w") as f:
                json.dump({str(k): v for k, v in self._configs.items()}, f)
            os.replace(tmp, self.path)

    def config(self, project: int) -> str | None:
        """The label config ``/setup`` sent for ``project``; None when it never connected."""
        if self.redis is not None:
            got = self.redis.hget("lazyxmem:projects", str(project))
            return got.decode() if got is not None else None
        with self._lock:
            if project not in self._configs:  # another web process may have taken its /setup
                self._configs = self._read()
            return self._configs.get(project)

    def __contains__(self, project: int) -> bool:
        return self.config(project) is not None


class Notifier:
    """One background thread that looks notices up, in order, and hands them to ``handle``."""

    def __init__(self, handle: Callable[[Notice], None], max_pending: int = 10000,
                 retry_delays: tuple[float, ...] = (2.0, 8.0)) -> None:
        self.handle = handle
        self.max_pending = max_pending
        self.retry_delays = retry_delays
        self._due: list[tuple[float, int, Notice]] = []  # (not before, order, notice)
        self._keys: set[tuple] = set()
        self._order = 0
        self._busy = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._due) + self._busy

    def submit(self, notices: Iterable[Notice]) -> int:
        """Queue ``notices`` (those already pending coalesce); returns how many are new."""
        notices = list(notices)
        with self._cond:
            new = [n for n in dict.fromkeys(notices) if n.key not in self._keys]
            if len(self._due) + len(new) > self.max_pending:
                raise Busy(f"{len(self._due)} webhook notices are pending and this one brings {len(new)} more, "
                           f"over MAX_PENDING_NOTICES={self.max_pending}: Label Studio is sending faster than it "
                           "can be read back; retry later or raise the limit")
            for n in new:
                self._push(n, 0.0)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lazyxmem-notices", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return len(new)

    def _push(self, notice: Notice, delay: float) -> None:
        self._order += 1
        self._keys.add(notice.key)
        heapq.heappush(self._due, (time.monotonic() + delay, self._order, notice))

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """For tests and shutdown: True once nothing is pending or being handled."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._due or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._cond.wait(None if not self._due else max(0.0, self._due[0][0] - time.monotonic()))
                _, _, notice = heapq.heappop(self._due)
                self._keys.discard(notice.key)
                self._busy = True
            try:
                self.handle(notice)
            except NotYet:
                with self._cond:
                    if notice.key in self._keys:
                        pass  # the same notice came again meanwhile: that one is looked up
                    elif notice.attempt < len(self.retry_delays):
                        self._push(Notice(notice.kind, notice.project, notice.task, notice.annotation,
                                          notice.attempt + 1), self.retry_delays[notice.attempt])
                    else:
                        log.info("task %s: Label Studio does not show it after %d look-ups; webhook dropped",
                                 notice.task, notice.attempt + 1)
            except Exception:  # one bad notice must not stop the thread
                log.exception("task %s: %s webhook could not be handled", notice.task, notice.kind)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
