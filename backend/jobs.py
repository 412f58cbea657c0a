"""Background jobs behind one small interface: in-process threads, or RQ over Redis.

Two lanes: ``interactive`` (a reviewer's corrections being re-propagated) and ``batch``
(pre-annotation). Each lane has its own thread in-process, its own RQ queue with workers (which
take the interactive queue first), so a correction never waits behind another task's
pre-annotation.

A job is a :class:`JobSpec`: everything a worker needs to redo it from scratch (the task as
Label Studio sent it, the label config, the corrections), so any worker process can take it.
Its id is a digest of (task, model version, what it computes), which makes jobs idempotent:
submitting the same work twice returns the first job, and a prediction is posted once per id
(``backend.ls_io.PostLedger``), even when a killed worker's job is retried elsewhere.

Hostile or runaway input must not take the queue over: each project may hold at most
``max_queued_per_project`` queued jobs (:class:`QueueFull`, a 422, past it), in-process lanes take
jobs round-robin between projects (:mod:`backend.lanes`), and ``cancel_task`` drops a task's queued
jobs and stops its running one between two frames (:class:`JobCanceled`, raised by the meter).
A failed job's error never quotes an unexpected exception (:func:`job_error`): its text may carry
Label Studio's reply or a request's content; the log has it. In-process jobs are journalled on
disk (:mod:`backend.journal`) and re-queued by :meth:`LocalQueue.resume` after a restart.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lazyxmem_core.errors import LazyXMemError
from lazyxmem_core.types import Correction

from .checks import safe_message, shown
from .edits import initial_regions
from .journal import Journal
from .lanes import FairLane

log = logging.getLogger(__name__)

KINDS = ("propagate", "correct", "annotation")
LANES = ("interactive", "batch")
Progress = Callable[[int], None]
MAX_QUEUED_PER_PROJECT = 200  # queued (not running) jobs of one project, both lanes together


class QueueFull(LazyXMemError):
    """A project already has as many queued jobs as allowed: the submission is refused (422)."""


class JobCanceled(Exception):
    """Raised by a canceled job's progress meter between two frames: the job ends "canceled"."""


def queue_full(project: str, queued: int, limit: int) -> QueueFull:
    return QueueFull(f"project {shown(project, 40) if project else '(none)'} already has {queued} jobs queued, "
                     f"the most MAX_QUEUED_PER_PROJECT={limit} allows: wait for them to run, cancel a task's jobs "
                     "(DELETE /tasks/<id>/jobs) or raise MAX_QUEUED_PER_PROJECT")


def job_error(exc: BaseException) -> str:
    """What a failed job's status may say: a :class:`LazyXMemError`'s message (it says what is wrong
    with the input), never the text of anything else (an HTTP error quotes Label Studio's reply,
    a KeyError the task's content); the caller logs the traceback."""
    if isinstance(exc, LazyXMemError):
        return safe_message(str(exc))
    return f"internal error ({type(exc).__name__}): see the backend's log"


@dataclass(frozen=True)
class JobSpec:
    """One unit of work for a worker. ``kind``:

    - ``propagate``: segment the task's video from its initial regions, post the prediction;
    - ``correct``: apply ``corrections`` (what the user gave: clicks, a box or a mask, per
      (frame, object); the session turns them into masks), re-propagate, post;
    - ``annotation``: the frames where ``annotation`` differs from the prediction become corrections.
    """

    kind: str
    task: dict
    label_config: str
    model_version: str
    corrections: dict[tuple[int, int], Correction] = field(default_factory=dict)
    annotation: dict | None = None
    revision: int = 0  # correction round: the posted prediction's "revision" (and its log line)
    # When the web process queued it: of two jobs' masks for one task, the later job's are newer.
    submitted: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown job kind {self.kind!r}: one of {', '.join(KINDS)}")

    @property
    def lane(self) -> str:
        return "batch" if self.kind == "propagate" else "interactive"

    @property
    def task_id(self) -> int:
        return int(self.task.get("id") or 0)

    @property
    def project(self) -> str:
        """Label Studio's project id of the task ("" when the task JSON does not say): the unit of
        fairness and of the queued-jobs bound."""
        return str(self.task.get("project") or "")

    @property
    def key(self) -> str:
        """Content digest: the same task, model version and corrections give the same id."""
        h = hashlib.sha256()
        data = self.task.get("data") or {}
        what = {"kind": self.kind, "task": self.task_id, "version": self.model_version, "data": data,
                "regions": initial_regions(self.task),
                "annotation": (self.annotation or {}).get("result")}
        h.update(json.dumps(what, sort_keys=True, default=str).encode())
        for (t, value), corr in sorted(self.corrections.items()):
            h.update(f"{t}:{value}".encode())
            if corr.mask is not None:
                h.update(np.packbits(np.asarray(corr.mask, bool)).tobytes())
            h.update(repr((corr.clicks, corr.box)).encode())
        return f"lx-{self.kind}-{self.task_id}-{h.hexdigest()[:20]}"


Runner = Callable[[JobSpec, Progress], Any]


class PriorityGate:
    """Propagation steps aside, between two frames, while an interactive answer is being
    computed in this process (at most ``max_pause_s`` at a time, so batch work never starves)."""

    def __init__(self, max_pause_s: float = 5.0) -> None:
        self.max_pause_s = max_pause_s
        self._active = 0
        self._cond = threading.Condition()

    @contextmanager
    def interactive(self) -> Iterator[None]:
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def yield_to_interactive(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._active == 0, timeout=self.max_pause_s)



class JobQueue(Protocol):
    def submit(self, spec: JobSpec, total: int) -> str:
        """Queue ``spec`` (``total`` frames to process) unless the same work is queued, running or
        done; returns the job id either way. :class:`QueueFull` past the project's bound."""

    def status(self, job_id: str) -> dict[str, Any] | None:
        """Progress of a job: status, done / total frames, fps, error; None when unknown."""

    def cancel_task(self, task_id: int) -> list[str]:
        """Drop the task's queued jobs, ask its running one to stop; the ids of both."""

    def counts(self) -> dict[str, Any]:
        """For /health, cheap: the queue's kind, whether it survives a restart, queued and running."""

    def resume(self) -> list[str]:
        """Re-queue what a previous process left unfinished (in-process journal); the ids."""


class ProgressMeter:
    """Frames done / total and fps of a running job: published every second, logged every ``log_every`` s."""

    def __init__(self, job_id: str, task_id: int, total: int, log_every: float = 5.0,
                 publish: Callable[[dict[str, Any]], None] | None = None,
                 canceled: Callable[[], bool] | None = None) -> None:
        self.job_id, self.task_id, self.total = job_id, task_id, total
        self.canceled = canceled  # asked once per frame: True stops the job there (JobCanceled)
        self.done = 0
        self.started = time.time()
        self.log_every = log_every
        self.publish = publish
        self._published = self._logged = 0.0

    @property
    def fps(self) -> float:
        return round(self.done / max(1e-6, time.time() - self.started), 2)

    def __call__(self, n: int) -> None:
        # A correction re-propagates frames nobody counted up front (forward and backward): the
        # total follows the work instead of showing more done than there is, and the meter keeps
        # its once-a-second / every-5-s rhythm rather than reporting every frame as the last.
        if self.canceled is not None and self.canceled():
            raise JobCanceled(f"job {self.job_id} canceled after {self.done} frames")
        last = self.done < self.total <= self.done + n
        self.done += n
        self.total = max(self.total, self.done)
        now = time.time()
        if self.publish is not None and (now - self._published >= 1.0 or last):
            self.publish({"done": self.done, "total": self.total, "fps": self.fps})
            self._published = now
        if now - self._logged >= self.log_every or last:
            log.info("task %s: job %s %d/%d frames, %.1f fps", self.task_id, self.job_id, self.done,
                     self.total, self.fps)
            self._logged = now


_EXITING = threading.Event()
_QUEUES: weakref.WeakSet[LocalQueue] = weakref.WeakSet()


@atexit.register
def _stop_running_jobs(timeout_s: float = 30.0) -> None:
    """At process exit, running in-process jobs stop at their next frame (journalled: the next
    start resumes them) before the interpreter goes: a job thread still inside OpenCV when it
    does makes the process abort (exit status 134) instead of exiting."""
    _EXITING.set()
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and any(q.running() for q in list(_QUEUES)):
        time.sleep(0.05)


class LocalQueue:
    """In-process jobs, one thread per lane taking jobs fairly between projects (the default: no
    Redis needed). With a ``journal_dir``, queued and running jobs survive a restart: call
    :meth:`resume` once the runner can run."""

    def __init__(self, runner: Runner, journal_dir: str | None = None,
                 max_queued_per_project: int = MAX_QUEUED_PER_PROJECT, retries: int = 2) -> None:
        self.runner = runner
        self.max_queued_per_project = max_queued_per_project
        self.retries = retries  # of a journalled job whose process died under it, before it is dropped
        self.journal = Journal(journal_dir) if journal_dir else None
        self.jobs: dict[str, dict[str, Any]] = {}
        self._live: dict[str, _Live] = {}  # queued and running jobs: what runs them, how to stop them
        self._lock = threading.Lock()
        self._lanes = {lane: FairLane(lane, self._run) for lane in LANES}
        self._running: set[str] = set()
        _QUEUES.add(self)

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def submit(self, spec: JobSpec, total: int) -> str:
        return self._add(spec, total, resumed=None)

    def _add(self, spec: JobSpec, total: int, resumed: int | None) -> str:
        """Queue a new job (``resumed`` None: the project's bound applies, the journal gets it) or
        one from the journal (``resumed``: its starts in earlier processes; never refused)."""
        job_id = spec.key
        with self._lock:
            if job_id in self.jobs and self.jobs[job_id]["status"] not in ("failed", "canceled"):
                log.info("task %s: job %s is already %s", spec.task_id, job_id, self.jobs[job_id]["status"])
                return job_id
            project = spec.project
            if resumed is None:
                queued = sum(lane.queued(project) for lane in self._lanes.values())
                if queued >= self.max_queued_per_project:
                    raise queue_full(project, queued, self.max_queued_per_project)
                self._journal_add(job_id, spec, total, 0)
            self.jobs[job_id] = {"id": job_id, "kind": spec.kind, "lane": spec.lane, "task": spec.task_id,
                                 "project": project, "status": "queued", "done": 0, "total": total, "fps": None,
                                 "error": None, "started": None, "finished": None}
            self._live[job_id] = _Live(spec, total, resumed or 0)
            self._lanes[spec.lane].put(project, job_id)
        return job_id

    def status(self, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        return dict(job) if job is not None else None

    def cancel_task(self, task_id: int) -> list[str]:
        canceled = []
        with self._lock:
            for job_id, live in list(self._live.items()):
                if live.spec.task_id != task_id:
                    continue
                canceled.append(job_id)
                if self._lanes[live.spec.lane].remove(job_id):
                    self._end(job_id, "canceled")
                else:  # running, or taken by its lane an instant ago: it stops at its next frame
                    live.stop.set()
        if canceled:
            log.info("task %s: jobs %s canceled", task_id, ", ".join(canceled))
        return canceled

    def counts(self) -> dict[str, Any]:
        queued = sum(lane.queued() for lane in self._lanes.values())
        return {"queue": "in-process", "survives_restart": self.journal is not None, "queued": queued,
                "running": max(0, len(self._live) - queued)}

    def resume(self) -> list[str]:
        if self.journal is None:
            return []
        ids = []
        for spec, total, attempts in self.journal.load(JobSpec):
            if attempts > self.retries:  # it took the process down with it each time
                log.error("task %s: %s job %s was started %d times and never ended: not re-queued (JOB_RETRIES=%d)",
                          spec.task_id, spec.kind, spec.key, attempts, self.retries)
                self.journal.remove(spec.key)
                continue
            log.info("task %s: %s job %s re-queued after a restart (%d frames, %d earlier starts)",
                     spec.task_id, spec.kind, spec.key, total, attempts)
            ids.append(self._add(spec, total, resumed=attempts))
        return ids

    def _run(self, job_id: str) -> None:
        with self._lock:
            live, job = self._live[job_id], self.jobs[job_id]
            if live.stop.is_set():  # canceled between its lane taking it and now
                self._end(job_id, "canceled")
                return
            if _EXITING.is_set():  # the process is going: the journal keeps it for the next start
                return
            job["status"], job["started"] = "running", time.time()
            self._running.add(job_id)
            # Counted before it runs: a job that kills the process is dropped after JOB_RETRIES restarts.
            self._journal_add(job_id, live.spec, live.total, live.attempts + 1)
        spec = live.spec
        meter = ProgressMeter(job_id, spec.task_id, live.total, publish=job.update,
                              canceled=lambda: live.stop.is_set() or _EXITING.is_set())
        error = None
        try:
            self.runner(spec, meter)
            status = "finished"
        except JobCanceled:
            if not live.stop.is_set():  # stopped by the process exiting, not by a cancel
                log.info("task %s: %s job %s interrupted by the exit after %d frames; journalled for the next start",
                         spec.task_id, spec.kind, job_id, meter.done)
                with self._lock:
                    self._running.discard(job_id)
                return
            log.info("task %s: %s job %s canceled after %d frames", spec.task_id, spec.kind, job_id, meter.done)
            status = "canceled"
        except Exception as exc:  # a failed job is reported, the server lives on
            log.exception("task %s: %s job %s failed", spec.task_id, spec.kind, job_id)
            status, error = "failed", job_error(exc)
        job.update(done=meter.done, fps=meter.fps)
        with self._lock:
            self._running.discard(job_id)
            self._end(job_id, status, error)

    def _end(self, job_id: str, status: str, error: str | None = None) -> None:
        """The job is over (caller holds the lock): its record says how, its journal entry goes."""
        self.jobs[job_id].update(status=status, error=error, finished=time.time())
        self._live.pop(job_id, None)
        if self.journal is not None:
            self.journal.remove(job_id)

    def _journal_add(self, job_id: str, spec: JobSpec, total: int, attempts: int) -> None:
        if self.journal is None:
            return
        try:
            self.journal.add(job_id, spec, total, attempts)
        except OSError:  # a full disk: the job still runs, it only would not survive a restart
            log.warning("task %s: job %s could not be journalled; a restart would lose it", spec.task_id,
                        job_id, exc_info=True)


@dataclass
class _Live:
    spec: JobSpec
    total: int
    attempts: int  # starts in earlier processes (from the journal)
    stop: threading.Event = field(default_factory=threading.Event)


def make_queue(runner: Runner, redis_url: str | None, retries: int = 2, timeout_s: int = 6 * 3600, *,
               journal_dir: str | None = None, max_queued_per_project: int = MAX_QUEUED_PER_PROJECT) -> JobQueue:
    """RQ over Redis when ``redis_url`` is set, else in-process (journalled in ``journal_dir``)."""
    if redis_url:
        from .redis_queue import RedisQueue

        return RedisQueue(redis_url, retries, timeout_s, max_queued_per_project)
    return LocalQueue(runner, journal_dir, max_queued_per_project, retries)


def __getattr__(name: str) -> Any:
    # RedisQueue lives in backend.redis_queue (which imports this module); older imports still work.
    if name in ("RedisQueue", "QUEUE_NAMES"):
        from . import redis_queue

        return getattr(redis_queue, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
