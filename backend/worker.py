"""``lazyxmem worker``: an RQ worker that runs propagation jobs with one model per process.

Jobs run in the worker's own process (no fork per job), so the engines load once and keep their
GPU memory, and sessions stay cached between jobs of the same task. A heartbeat thread renews
the job's lease while it runs: when a worker dies (SIGKILL, OOM killer, lost host), the lease
lapses after ``heartbeat + grace`` seconds and a surviving worker's maintenance requeues the job.

A job is canceled (``DELETE /tasks/<id>/jobs``, ``backend.redis_queue.RedisQueue.cancel_task``)
between two frames: RQ's stop-job command reaches :meth:`LazyXMemWorker.kill_horse` (there is no
horse: the job runs here), the job's progress meter then raises ``JobCanceled`` and RQ marks the
job stopped, never retried. A failed job's status names the exception's type only; its text and
traceback are in this worker's log.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job
from rq.worker import WorkerStatus

from lazyxmem_core.errors import LazyXMemError

from .jobs import JobCanceled, JobSpec, ProgressMeter, job_error
from .redis_queue import QUEUE_NAMES, cancel_key
from .settings import log_level

log = logging.getLogger("lazyxmem.worker")

_model: Any = None
_model_lock = threading.Lock()
# The job running in this process was asked to stop (set by the stop-job command); one job at a time.
_stop = threading.Event()
_worker: LazyXMemWorker | None = None
CANCEL_POLL_S = 1.0  # how often a running job also reads its cancel flag in Redis


def model() -> Any:
    """This process's one model instance (engines load on first use and stay)."""
    global _model
    with _model_lock:
        if _model is None:
            from .service import Service

            _model = Service()
        return _model


def stop_check(job: Job | None) -> Callable[[], bool] | None:
    """The meter's per-frame question "canceled?": the stop-job command's event, or (read at
    most once a second) the job's cancel flag, for a cancel sent before this worker took the job."""
    if job is None:
        return None
    worker, last = _worker, [0.0]

    def canceled() -> bool:
        if _stop.is_set():
            return True
        now = time.monotonic()
        if now - last[0] < CANCEL_POLL_S:
            return False
        last[0] = now
        try:
            if not job.connection.exists(cancel_key(job.id)):
                return False
        except RedisError:  # Redis away for a moment: the job goes on, a later frame asks again
            log.warning("job %s: its cancel flag could not be read", job.id, exc_info=True)
            return False
        if worker is not None:
            worker._stopped_job_id = job.id  # as the stop-job command does: RQ marks it stopped, no retry
        return True

    return canceled


def run_job(spec: JobSpec, total: int) -> dict:
    """The function RQ calls. Bad input (a task that cannot be served) ends the job with the
    error in its status rather than a retry: retrying would fail the same way."""
    job = get_current_job()
    meta_lock = threading.Lock()

    def publish(values: dict) -> None:
        if job is None:
            return
        with meta_lock:
            job.meta.update(values)
            job.save_meta()

    if job is not None:
        publish({"attempts": int(job.meta.get("attempts", 0)) + 1, "worker": job.worker_name or socket.gethostname(),
                 "done": 0, "error": None, "error_type": None})
    meter = ProgressMeter(job.id if job else spec.key, spec.task_id, total, publish=publish, canceled=stop_check(job))
    log.info("task %s: %s job %s started (attempt %s)", spec.task_id, spec.kind, spec.key,
             job.meta.get("attempts") if job else 1)
    try:
        out = model().run_job(spec, meter)
    except LazyXMemError as exc:
        message = job_error(exc)
        log.error("task %s: %s job %s cannot be done: %s", spec.task_id, spec.kind, spec.key, message)
        publish({"error": message})
        return {"posted": False, "error": message}
    except JobCanceled:
        log.info("task %s: %s job %s canceled after %d frames", spec.task_id, spec.kind, spec.key, meter.done)
        publish({"done": meter.done, "fps": meter.fps})
        raise  # RQ marks it stopped (the worker's _stopped_job_id), not failed: no retry
    except Exception as exc:
        # The status names the type only (backend.redis_queue.RedisQueue.status); RQ retries it.
        log.exception("task %s: %s job %s failed", spec.task_id, spec.kind, spec.key)
        publish({"error_type": type(exc).__name__})
        raise
    publish({"done": meter.done, "fps": meter.fps})
    return out


class LazyXMemWorker(SimpleWorker):
    """A SimpleWorker whose running job keeps a short, renewed lease (see the module docstring)."""

    grace_s = 30

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return int(self.job_monitoring_interval + self.grace_s)

    def kill_horse(self, sig: Any = None) -> None:
        """RQ's stop-job command ends here (after setting ``_stopped_job_id``): the job runs in
        this process, so it is asked to stop at its next frame instead of a horse being killed."""
        _stop.set()

    def execute_job(self, job: Job, queue: Queue) -> None:
        global _worker
        _worker = self
        _stop.clear()
        execution = self.prepare_execution(job)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.job_monitoring_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception:  # a missed beat only shortens the lease; the next one may pass
                    log.warning("worker %s: heartbeat for job %s failed", self.name, job.id, exc_info=True)

        beat = threading.Thread(target=renew, name="lazyxmem-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)


def work(redis_url: str, name: str | None = None, burst: bool = False, heartbeat_s: int = 10,
         grace_s: int = 30, maintenance_s: int = 30, preload: bool = True) -> None:
    """Run a worker on the ``lazyxmem`` queue until stopped (or, with ``burst``, until it is empty)."""
    from redis import Redis

    connection = Redis.from_url(redis_url)
    if preload:
        m = model()
        m.refiner()  # load the weights now, not inside the first job
        log.info("worker %s: model %s ready on %s", name or socket.gethostname(), m.model_version,
                 m.settings.engine.device)
    # Queues in priority order: a worker takes the interactive lane's jobs first.
    queues = [Queue(QUEUE_NAMES[lane], connection=connection) for lane in ("interactive", "batch")]
    worker = LazyXMemWorker(queues, connection=connection, name=name,
                            job_monitoring_interval=heartbeat_s, maintenance_interval=maintenance_s,
                            # the idle loop wakes every worker_ttl - 15 s; maintenance runs there
                            worker_ttl=max(maintenance_s, 1) + 15)
    worker.grace_s = grace_s
    worker.work(burst=burst, with_scheduler=False, logging_level=log_level())
