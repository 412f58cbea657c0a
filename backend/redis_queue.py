"""Jobs on RQ over Redis, for any number of ``lazyxmem worker`` processes (``backend.worker``).

Redis keeps the jobs, so they survive a restart of the web process and of any worker.

- The per-project bound: a Redis set per project holds the ids of its jobs submitted as queued.
  It is trusted while under the bound (one SCARD per submission); at the bound the ids are
  checked against RQ's job statuses (one pipelined HGET each: O(jobs of that project)) and those
  no longer queued leave the set, so it heals whatever ended a job (a worker, a cancel, an expiry).
- Cancel: a queued job through RQ's ``Job.cancel``; a running one with RQ's stop-job command
  (``rq.command.send_stop_job_command``), which :class:`backend.worker.LazyXMemWorker` turns into a
  stop between two frames, plus a flag key the worker also reads, for a job that started after the
  command was sent. A stopped job ends ``stopped`` in RQ (no retry), ``canceled`` here.
- Fair order between projects: a job whose project has nothing waiting in its lane goes to the
  front of the lane (RQ's ``at_front``), so one project's backlog never holds up a project that
  submits a few jobs; a project that has jobs waiting queues behind them, first in, first out.
  (Exact round-robin would need one RQ queue per project, and RQ's ``RoundRobinWorker`` rotates
  over a fixed list of queues known when the worker starts, the interactive lane included, which
  must come first.) The per-project bound keeps a backlog to ``max_queued_per_project`` jobs.
"""
from __future__ import annotations

import logging
from typing import Any

from .jobs import MAX_QUEUED_PER_PROJECT, JobSpec, queue_full

log = logging.getLogger(__name__)

QUEUE_NAMES = {"interactive": "lazyxmem-interactive", "batch": "lazyxmem"}  # workers listen in this order
QUEUED_STATES = (b"queued", b"deferred", b"scheduled")
INDEX_TTL_S = 7 * 86400  # as long as a job's result is kept


def project_key(project: str) -> str:
    return f"lazyxmem:project-queued:{project}"


def task_key(task_id: int) -> str:
    return f"lazyxmem:task-jobs:{task_id}"


def cancel_key(job_id: str) -> str:
    return f"lazyxmem:cancel:{job_id}"


class RedisQueue:
    """Jobs on RQ over Redis, for any number of worker processes (``lazyxmem worker``)."""

    def __init__(self, url: str, retries: int = 2, timeout_s: int = 6 * 3600,
                 max_queued_per_project: int = MAX_QUEUED_PER_PROJECT) -> None:
        from redis import Redis
        from rq import Queue

        self.redis = Redis.from_url(url)
        # /health's own client: a Redis that stops answering makes the probe say so within 1 s.
        self._probe = Redis.from_url(url, socket_timeout=0.4, socket_connect_timeout=0.4)
        self.queues = {lane: Queue(name, connection=self.redis) for lane, name in QUEUE_NAMES.items()}
        self.retries, self.timeout_s = retries, timeout_s
        self.max_queued_per_project = max_queued_per_project

    def submit(self, spec: JobSpec, total: int) -> str:
        from rq import Retry
        from rq.exceptions import NoSuchJobError
        from rq.job import Job, JobStatus

        job_id = spec.key
        project = spec.project
        # The project's lock keeps two submissions from both seeing room for one; the job's closes
        # the race of two identical submissions both finding no job.
        with self.redis.lock(f"lazyxmem:project-lock:{project}", timeout=30, blocking_timeout=30), \
                self.redis.lock(f"lazyxmem:enqueue-lock:{job_id}", timeout=30, blocking_timeout=30):
            try:
                job = Job.fetch(job_id, connection=self.redis)
                status = job.get_status()
                if status not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, None):
                    log.info("task %s: job %s is already %s", spec.task_id, job_id, status.value)
                    return job_id
                job.delete()
            except NoSuchJobError:
                pass
            queued = self.queued_of(project)
            if queued >= self.max_queued_per_project:
                raise queue_full(project, queued, self.max_queued_per_project)
            self.redis.delete(cancel_key(job_id))  # a cancel of an earlier run is not this one's
            lane = self.queues[spec.lane]
            at_front = len(lane) > 0 and not self.waiting_in(project, lane.name)
            lane.enqueue("backend.worker.run_job", spec, total, job_id=job_id, at_front=at_front,
                                           retry=Retry(max=self.retries) if self.retries > 0 else None,  # RQ refuses max=0
                                           job_timeout=self.timeout_s,
                                           result_ttl=INDEX_TTL_S, failure_ttl=INDEX_TTL_S,
                                           meta={"kind": spec.kind, "task": spec.task_id, "project": project,
                                                 "done": 0, "total": total},
                                           description=f"{spec.kind} task {spec.task_id}")
            with self.redis.pipeline() as pipe:
                for key in (project_key(project), task_key(spec.task_id)):
                    pipe.sadd(key, job_id)
                    pipe.expire(key, INDEX_TTL_S)
                pipe.execute()
        log.info("task %s: %s job %s queued on Redis (%d frames)", spec.task_id, spec.kind, job_id, total)
        return job_id

    def queued_of(self, project: str) -> int:
        """Queued jobs of the project; the set is checked against RQ only when it reaches the bound."""
        key = project_key(project)
        count = self.redis.scard(key)
        if count < self.max_queued_per_project:
            return count
        ids = [m.decode() for m in self.redis.smembers(key)]
        states = self._states(ids)
        gone = [i for i, s in zip(ids, states) if s not in QUEUED_STATES]
        if gone:
            self.redis.srem(key, *gone)
        return len(ids) - len(gone)

    def waiting_in(self, project: str, queue_name: str) -> bool:
        """Whether the project has a job waiting in that RQ queue (checked against RQ, not the set)."""
        from rq.job import Job

        ids = [m.decode() for m in self.redis.smembers(project_key(project))]
        if not ids:
            return False
        with self.redis.pipeline() as pipe:
            for job_id in ids:
                pipe.hmget(Job.key_for(job_id), "status", "origin")
            return any(status in QUEUED_STATES and origin == queue_name.encode() for status, origin in pipe.execute())

    def _states(self, job_ids: list[str]) -> list[bytes | None]:
        from rq.job import Job

        with self.redis.pipeline() as pipe:
            for job_id in job_ids:
                pipe.hget(Job.key_for(job_id), "status")
            return pipe.execute()

    def cancel_task(self, task_id: int) -> list[str]:
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation, NoSuchJobError
        from rq.job import Job

        ids = sorted(m.decode() for m in self.redis.smembers(task_key(task_id)))
        canceled, ended = [], []
        for job_id, state in zip(ids, self._states(ids)):
            if state in QUEUED_STATES:
                try:
                    Job.fetch(job_id, connection=self.redis).cancel()
                except (NoSuchJobError, InvalidJobOperation):  # taken or ended in between
                    ended.append(job_id)
                    continue
                canceled.append(job_id)
            elif state == b"started":
                # The flag first: a worker that picks the job up after the command still sees it.
                self.redis.set(cancel_key(job_id), b"1", ex=INDEX_TTL_S)
                try:
                    send_stop_job_command(self.redis, job_id)
                except (NoSuchJobError, InvalidJobOperation):  # between two workers: the flag does it
                    pass
                canceled.append(job_id)
            else:
                ended.append(job_id)
        if ended:
            self.redis.srem(task_key(task_id), *ended)
        if canceled:
            log.info("task %s: jobs %s canceled on Redis", task_id, ", ".join(canceled))
        return canceled

    def counts(self) -> dict[str, Any]:
        """Two LLENs and two ZCARDs in one round trip: cheap enough for every health probe."""
        from rq.registry import StartedJobRegistry

        try:
            with self._probe.pipeline(transaction=False) as pipe:
                for q in self.queues.values():
                    pipe.llen(q.key)
                    pipe.zcard(StartedJobRegistry(queue=q).key)
                lengths = pipe.execute()
        except Exception as exc:  # the probe says so instead of failing or hanging
            return {"queue": "redis", "survives_restart": True, "error": f"Redis unreachable ({type(exc).__name__})"}
        return {"queue": "redis", "survives_restart": True, "queued": sum(lengths[0::2]),
                "running": sum(lengths[1::2])}

    def resume(self) -> list[str]:
        return []  # Redis kept the jobs; workers' maintenance requeues those of dead workers

    def status(self, job_id: str) -> dict[str, Any] | None:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            job = Job.fetch(job_id, connection=self.redis)
        except NoSuchJobError:
            return None
        meta = job.get_meta()
        status = job.get_status()
        state = status.value if status is not None else None
        state = {"started": "running", "stopped": "canceled"}.get(state, state)
        error = None
        if state == "failed":
            # Never the exception's text (RQ keeps it in the job's result): it may quote Label
            # Studio's reply or the task. The worker logs it with the task id.
            error = f"internal error ({meta.get('error_type') or 'unknown'}): see the worker's log"
        if meta.get("error"):  # bad input: the job ended without a retry (see backend.worker.run_job)
            state, error = "failed", meta["error"]
        return {"id": job_id, "kind": meta.get("kind"), "task": meta.get("task"), "project": meta.get("project"),
                "status": state, "done": meta.get("done", 0), "total": meta.get("total"), "fps": meta.get("fps"),
                "worker": meta.get("worker"), "attempts": meta.get("attempts", 0), "error": error,
                "started": job.started_at.timestamp() if job.started_at else None,
                "finished": job.ended_at.timestamp() if job.ended_at else None}

