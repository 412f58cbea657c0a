"""One lane of the in-process queue: a thread taking jobs fairly between projects.

A single FIFO let one project's flood (a forged webhook, a 3000-task import) push every other
project's work back by hours. Here each project has its own FIFO, and the thread takes next from
the project served least recently (a project never served, or not since its queue emptied, goes
first), so with two projects the jobs alternate whatever the length of either backlog.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class FairLane:
    """Job ids per project, run one at a time by ``run(job_id)`` on this lane's thread."""

    def __init__(self, name: str, run: Callable[[str], None]) -> None:
        self.name = name
        self._run = run
        self._queues: dict[str, deque[str]] = {}  # project -> its queued job ids, oldest first
        self._served: dict[str, int] = {}  # project -> when (a counter) its last job was taken
        self._clock = itertools.count(1)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, project: str, job_id: str) -> None:
        with self._cond:
            self._queues.setdefault(project, deque()).append(job_id)
            if self._thread is None:  # started on first use: a queue nobody submits to holds no thread
                self._thread = threading.Thread(target=self._loop, name=f"lazyxmem-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, job_id: str) -> bool:
        """Take a queued job out; False when it is not queued here (running, done or unknown)."""
        with self._cond:
            for project, queue in self._queues.items():
                if job_id in queue:
                    queue.remove(job_id)
                    if not queue:
                        del self._queues[project]
                    return True
        return False

    def queued(self, project: str | None = None) -> int:
        with self._cond:
            if project is not None:
                return len(self._queues.get(project, ()))
            return sum(len(q) for q in self._queues.values())

    def _take(self) -> str:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._queues))
            project = min(self._queues, key=lambda p: self._served.get(p, 0))  # ties: first queued
            job_id = self._queues[project].popleft()
            if not self._queues[project]:
                del self._queues[project]
            # Forget projects with nothing queued (the memory stays bounded), except this one: its
            # next job, submitted while this one runs, waits for the others' turn.
            self._served = {p: t for p, t in self._served.items() if p in self._queues}
            self._served[project] = next(self._clock)
            return job_id

    def _loop(self) -> None:
        while True:
            job_id = self._take()
            try:
                self._run(job_id)
            except Exception:  # run() reports its own failures; this thread must outlive any
                log.exception("lane %s: job %s escaped its runner", self.name, job_id)
