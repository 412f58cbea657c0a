"""Background jobs behind one small interface: in-process threads, or RQ over Redis.

A job is a :class:`JobSpec`: everything a worker needs to redo it from scratch (the task as
Label Studio sent it, the label config, the corrections), so any worker process can take it.
Its id is a digest of (task, model version, what it computes), which makes jobs idempotent:
submitting the same work twice returns the first job, and a prediction is posted once per id
(:class:`PostLedger`), even when a killed worker's job is retried elsewhere.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lazyxmem_core.types import Correction, PackedMask

log = logging.getLogger(__name__)

KINDS = ("propagate", "correct", "annotation")
Progress = Callable[[int], None]


def initial_regions(task: dict) -> list[dict]:
    """The regions of the task's latest annotation (or draft): where its objects are defined."""
    anns = [a for a in (task.get("annotations") or []) if not a.get("was_cancelled")]
    anns += list(task.get("drafts") or [])
    if not anns:
        return []
    latest = max(anns, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))
    return latest.get("result") or []


def start_digest(task: dict) -> str:
    """What a session is built from: the task's media and its initial regions."""
    what = {"data": task.get("data") or {}, "regions": initial_regions(task)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class JobSpec:
    """One unit of work for a worker. ``kind``:

    - ``propagate``: segment the task's video from its initial regions, post the prediction;
    - ``correct``: apply ``corrections`` (final masks per (frame, object)), re-propagate, post;
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


class JobQueue(Protocol):
    def submit(self, spec: JobSpec, total: int) -> str:
        """Queue ``spec`` (``total`` frames to process) unless the same work is queued, running or
        done; returns the job id either way."""

    def status(self, job_id: str) -> dict[str, Any] | None:
        """Progress of a job: status, done / total frames, fps, error; None when unknown."""


class PostLedger:
    """Remembers which job ids have posted their prediction (in memory, or in Redis when shared)."""

    def __init__(self, redis: Any = None, ttl_s: int = 30 * 86400) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self._posted: set[str] = set()
        self._lock = threading.Lock()

    def post_once(self, key: str, post: Callable[[], Any], already_posted: Callable[[], bool] | None = None) -> bool:
        """Run ``post`` unless ``key`` has posted already; returns whether it posted.

        With Redis, a lock serialises duplicates running at once. A worker killed between its post
        and the mark leaves a "posting" flag; the retry then asks ``already_posted`` (Label
        Studio's own record) rather than posting blindly.
        """
        if self.redis is None:
            with self._lock:
                if key in self._posted:
                    return False
                post()
                self._posted.add(key)
                return True
        with self.redis.lock(f"lazyxmem:post-lock:{key}", timeout=60, blocking_timeout=120):
            if self.redis.exists(f"lazyxmem:posted:{key}"):
                return False
            flag = f"lazyxmem:posting:{key}"
            if self.redis.exists(flag) and already_posted is not None and already_posted():
                self.redis.set(f"lazyxmem:posted:{key}", "1", ex=self.ttl_s)
                return False
            self.redis.set(flag, "1", ex=self.ttl_s)
            post()
            self.redis.set(f"lazyxmem:posted:{key}", "1", ex=self.ttl_s)
            return True


class MaskStore:
    """The latest masks of each task, in Redis, written by whichever worker ran its latest job.

    With workers, the web process never re-propagates: its own session still holds the masks of
    the first propagation, so an interactive click after a correction would refine against a
    stale prior and compare boxes with a stale track. It reads the workers' masks from here.
    Entries are keyed by task, model version and initial regions (a changed task is another
    entry), ordered by the submission time of the job that made them: a job queued earlier never
    overwrites a later one's masks, and a plain propagation never overwrites corrected masks.
    """

    def __init__(self, redis: Any, ttl_s: int = 7 * 86400) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    @staticmethod
    def key(task: dict, model_version: str) -> str:
        return f"lazyxmem:masks:{int(task.get('id') or 0)}:{start_digest(task)}:{model_version}"

    def put(self, task: dict, model_version: str, stamp: float, masks: Sequence[np.ndarray],
            only_if_absent: bool = False, prediction: dict | None = None) -> bool:
        """Store ``masks`` (one (H, W) index mask per frame), and the prediction made from them,
        unless newer ones are there."""
        from redis.exceptions import WatchError

        # One zip member a frame, written one at a time: a session's masks go in as it keeps them
        # (zlib-packed), neither unpacked nor compressed again.
        packed = masks.packed if isinstance(masks, FrameMasks) else (lambda t: PackedMask.pack(masks[t]))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for t in range(len(masks)):
                p = packed(t)
                zf.writestr(f"{t}:{p.dtype}:{'x'.join(map(str, p.shape))}", p.data)
        key = self.key(task, model_version)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    old = pipe.hget(key, "stamp")
                    if old is not None and (only_if_absent or float(old) >= stamp):
                        pipe.reset()
                        return False
                    pipe.multi()
                    pipe.hset(key, mapping={"stamp": repr(float(stamp)), "masks": buf.getvalue(),
                                            "prediction": json.dumps(prediction)})
                    pipe.expire(key, self.ttl_s)
                    pipe.execute()
                    return True
                except WatchError:  # another worker wrote in between: compare again
                    continue

    def get(self, task: dict, model_version: str, newer_than: float = -1.0) -> tuple[float, StoredMasks] | None:
        """(stamp, masks) when the store holds masks newer than ``newer_than``, else None."""
        key = self.key(task, model_version)
        stamp = self.redis.hget(key, "stamp")
        if stamp is None or float(stamp) <= newer_than:
            return None
        # Read apart from the stamp so an unchanged entry costs no transfer; a write in between
        # only makes the masks newer than the stamp says (the next call reads them again).
        blob = self.redis.hget(key, "masks")
        if blob is None:
            return None
        return float(stamp), StoredMasks(blob)

    def prediction(self, task: dict, model_version: str) -> dict | None:
        """The prediction the latest job made for ``task`` (None when no job stored one)."""
        raw = self.redis.hget(self.key(task, model_version), "prediction")
        return json.loads(raw) if raw else None


class FrameMasks(Sequence):
    """Per-frame index masks kept packed (``packed(t)``) and unpacked one per read: a long video's
    are never all decoded at once. Handles the indexing: negative indices, slices, bounds."""

    n: int

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, t):  # type: ignore[override]
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(self.n))]
        t = int(t) + (self.n if t < 0 else 0)
        if not 0 <= t < self.n:
            raise IndexError(f"frame {t} is outside the video (0..{self.n - 1})")
        return self.packed(t).unpack()

    def packed(self, t: int) -> PackedMask:
        raise NotImplementedError


class StoredMasks(FrameMasks):
    """The masks a worker stored, unpacked one frame per read (854x480: 400 KB a frame raw, a
    few KB in the blob)."""

    def __init__(self, blob: bytes) -> None:
        self._zip = zipfile.ZipFile(io.BytesIO(blob))
        self._members = self._zip.namelist()
        self.n = len(self._members)
        self._lock = threading.Lock()  # the zip reader seeks in one shared buffer

    def packed(self, t: int) -> PackedMask:
        name = self._members[t]
        _, dtype, shape = name.split(":")
        with self._lock:
            data = self._zip.read(name)
        return PackedMask(tuple(int(v) for v in shape.split("x")), dtype, data)


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
        self.done += n
        now, last = time.time(), self.done >= self.total
        if self.publish is not None and (now - self._published >= 1.0 or last):
            self.publish({"done": self.done, "total": self.total, "fps": self.fps})
            self._published = now
        if now - self._logged >= self.log_every or last:
            log.info("task %s: job %s %d/%d frames, %.1f fps", self.task_id, self.job_id, self.done,
                     self.total, self.fps)
            self._logged = now


class LocalQueue:
    """In-process jobs on a thread pool (the default: no Redis needed)."""

    def __init__(self, runner: Runner, workers: int = 1) -> None:
        self.runner = runner
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lazyxmem-job")
        self.jobs: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def submit(self, spec: JobSpec, total: int) -> str:
        job_id = spec.key
        with self._lock:
            if job_id in self.jobs and self.jobs[job_id]["status"] != "failed":
                log.info("task %s: job %s is already %s", spec.task_id, job_id, self.jobs[job_id]["status"])
                return job_id
            job = {"id": job_id, "kind": spec.kind, "task": spec.task_id, "status": "queued", "done": 0,
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

        self._pool.submit(run)
        return job_id

    def status(self, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        return dict(job) if job is not None else None


QUEUE_NAME = "lazyxmem"


def queue_settings() -> dict[str, Any]:
    """RQ job settings from the environment (empty means the default)."""
    return {"retries": int(os.environ.get("JOB_RETRIES") or 2),
            "timeout_s": int(os.environ.get("JOB_TIMEOUT_S") or 6 * 3600)}


class RedisQueue:
    """Jobs on RQ over Redis, for any number of worker processes (``lazyxmem worker``)."""

    def __init__(self, url: str, name: str = QUEUE_NAME) -> None:
        from redis import Redis
        from rq import Queue

        self.redis = Redis.from_url(url)
        self.queue = Queue(name, connection=self.redis)

    def submit(self, spec: JobSpec, total: int) -> str:
        from rq import Retry
        from rq.exceptions import NoSuchJobError
        from rq.job import Job, JobStatus

        job_id = spec.key
        conf = queue_settings()
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
            self.queue.enqueue("backend.worker.run_job", spec, total, job_id=job_id,
                               retry=Retry(max=conf["retries"]), job_timeout=conf["timeout_s"],
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


def make_queue(runner: Runner, redis_url: str | None) -> JobQueue:
    return RedisQueue(redis_url) if redis_url else LocalQueue(runner)
