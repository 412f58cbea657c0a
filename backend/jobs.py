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
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lazyxmem_core.types import Correction

from .edits import initial_regions

log = logging.getLogger(__name__)

KINDS = ("propagate", "correct", "annotation")
LANES = ("interactive", "batch")
Progress = Callable[[int], None]


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
    revision: int = 0  # correction round, named in the posted prediction's version ("-r2")
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
        done; returns the job id either way."""

    def status(self, job_id: str) -> dict[str, Any] | None:
        """Progress of a job: status, done / total frames, fps, error; None when unknown."""


class ProgressMeter:
    """Frames done / total and fps of a running job: published every second, logged every ``log_every`` s."""

    def __init__(self, job_id: str, task_id: int, total: int, log_every: float = 5.0,
                 publish: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.job_id, self.task_id, self.total = job_id, task_id, total
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


class LocalQueue:
    """In-process jobs, one thread per lane (the default: no Redis needed)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._pools = {lane: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"lazyxmem-{lane}")
                       for lane in LANES}
        self.jobs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def submit(self, spec: JobSpec, total: int) -> str:
        job_id = spec.key
        with self._lock:
            if job_id in self.jobs and self.jobs[job_id]["status"] != "failed":
                log.info("task %s: job %s is already %s", spec.task_id, job_id, self.jobs[job_id]["status"])
                return job_id
            job = {"id": job_id, "kind": spec.kind, "lane": spec.lane, "task": spec.task_id, "status": "queued", "done": 0,
                   "total": total, "fps": None, "error": None, "started": None, "finished": None}
            self.jobs[job_id] = job

        def run() -> None:
            job["status"], job["started"] = "running", time.time()
            meter = ProgressMeter(job_id, spec.task_id, total, publish=job.update)
            try:
                self.runner(spec, meter)
                job["status"] = "finished"
            except Exception as exc:  # a failed job is reported, the server lives on
                log.exception("task %s: %s job %s failed", spec.task_id, spec.kind, job_id)
                job["status"], job["error"] = "failed", f"{type(exc).__name__}: {exc}"
            job.update(done=meter.done, fps=meter.fps, finished=time.time())

        self._pools[spec.lane].submit(run)
        return job_id

    def status(self, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        return dict(job) if job is not None else None


QUEUE_NAMES = {"interactive": "lazyxmem-interactive", "batch": "lazyxmem"}  # workers listen in this order


class RedisQueue:
    """Jobs on RQ over Redis, for any number of worker processes (``lazyxmem worker``)."""

    def __init__(self, url: str, retries: int = 2, timeout_s: int = 6 * 3600) -> None:
        from redis import Redis
        from rq import Queue

        self.redis = Redis.from_url(url)
        self.queues = {lane: Queue(name, connection=self.redis) for lane, name in QUEUE_NAMES.items()}
        self.retries, self.timeout_s = retries, timeout_s

    def submit(self, spec: JobSpec, total: int) -> str:
        from rq import Retry
        from rq.exceptions import NoSuchJobError
        from rq.job import Job, JobStatus

        job_id = spec.key
        # The lock closes the race of two identical submissions both finding no job.
        with self.redis.lock(f"lazyxmem:enqueue-lock:{job_id}", timeout=30, blocking_timeout=30):
            try:
                job = Job.fetch(job_id, connection=self.redis)
                status = job.get_status()
                if status not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, None):
                    log.info("task %s: job %s is already %s", spec.task_id, job_id, status.value)
                    return job_id
                job.delete()
            except NoSuchJobError:
                pass
            self.queues[spec.lane].enqueue("backend.worker.run_job", spec, total, job_id=job_id,
                               retry=Retry(max=self.retries), job_timeout=self.timeout_s,
                               result_ttl=7 * 86400, failure_ttl=7 * 86400,
                               meta={"kind": spec.kind, "task": spec.task_id, "done": 0, "total": total},
                               description=f"{spec.kind} task {spec.task_id}")
        log.info("task %s: %s job %s queued on Redis (%d frames)", spec.task_id, spec.kind, job_id, total)
        return job_id

    def status(self, job_id: str) -> dict[str, Any] | None:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            job = Job.fetch(job_id, connection=self.redis)
        except NoSuchJobError:
            return None
        meta = job.get_meta()
        status = job.get_status()
        error = None
        if status is not None and status.value == "failed":
            result = job.latest_result()
            error = (result.exc_string or "").strip().splitlines()[-1] if result and result.exc_string else "failed"
        state = status.value if status is not None else None
        if state == "started":
            state = "running"
        if meta.get("error"):  # bad input: the job ended without a retry (see backend.worker.run_job)
            state, error = "failed", meta["error"]
        return {"id": job_id, "kind": meta.get("kind"), "task": meta.get("task"), "status": state,
                "done": meta.get("done", 0), "total": meta.get("total"), "fps": meta.get("fps"),
                "worker": meta.get("worker"), "attempts": meta.get("attempts", 0), "error": error,
                "started": job.started_at.timestamp() if job.started_at else None,
                "finished": job.ended_at.timestamp() if job.ended_at else None}


def make_queue(runner: Runner, redis_url: str | None, retries: int = 2, timeout_s: int = 6 * 3600) -> JobQueue:
    return RedisQueue(redis_url, retries, timeout_s) if redis_url else LocalQueue(runner)
