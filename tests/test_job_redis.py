"""The Redis job queue against floods (issue 17), on a real redis-server: the per-project bound,
cancel of queued jobs (RQ's cancel) and of a running one (RQ's stop-job command, turned by
``LazyXMemWorker`` into a stop between two frames), and failed jobs' errors that quote no
unexpected exception. A ``LazyXMemWorker`` runs in this process (burst mode) with a stand-in model
that counts frames, so no engine loads."""
from __future__ import annotations

import threading
import time

import pytest

from backend import worker
from backend.jobs import JobSpec, QueueFull
from backend.redis_queue import RedisQueue, cancel_key
from lazyxmem_core.errors import LazyXMemError
from test_queue import redis_url  # noqa: F401  (the module's own redis-server)


def spec(task_id: int, project: int = 1, video: str = "v.mp4") -> JobSpec:
    task = {"id": task_id, "project": project, "data": {"video": f"/data/upload/1/{video}"}, "annotations": []}
    return JobSpec("propagate", task, "<View/>", "lazyxmem-test")


class FakeModel:
    """``Service.run_job``'s stand-in: ``frames`` frames of ``frame_s`` each, then a post."""

    def __init__(self, frames: int = 3, frame_s: float = 0.0, fail: Exception | None = None) -> None:
        self.frames, self.frame_s, self.fail = frames, frame_s, fail
        self.frames_done: dict[int, int] = {}
        self.posted: list[int] = []

    def run_job(self, spec: JobSpec, progress) -> dict:
        if self.fail is not None:
            raise self.fail
        for _ in range(self.frames):
            progress(1)
            self.frames_done[spec.task_id] = self.frames_done.get(spec.task_id, 0) + 1
            time.sleep(self.frame_s)
        self.posted.append(spec.task_id)
        return {"posted": True}


@pytest.fixture
def queue(redis_url):  # noqa: F811
    q = RedisQueue(redis_url, retries=0, max_queued_per_project=3)
    q.redis.flushdb()
    yield q
    q.redis.flushdb()


def run_worker(url: str, model: FakeModel, monkeypatch) -> None:
    """One LazyXMemWorker in this thread until the queues are empty."""
    monkeypatch.setattr(worker, "_model", model)
    worker.work(url, name=f"test-worker-{time.monotonic_ns()}", burst=True, heartbeat_s=1, grace_s=3,
                maintenance_s=2, preload=False)


def test_per_project_bound_on_redis(queue):
    ids = [queue.submit(spec(t, project=5), 10) for t in (1, 2, 3)]
    with pytest.raises(QueueFull, match=r"project 5 already has 3 jobs queued.*MAX_QUEUED_PER_PROJECT=3"):
        queue.submit(spec(4, project=5), 10)
    assert queue.submit(spec(1, project=5), 10) == ids[0], "the same work again is no new job"
    assert queue.submit(spec(40, project=6), 10), "another project still gets in"
    assert queue.cancel_task(2) == [ids[1]]
    assert queue.status(ids[1])["status"] == "canceled"
    late = queue.submit(spec(4, project=5), 10)  # the canceled job left room: the set healed at the bound
    from rq.job import Job

    Job.fetch(ids[0], connection=queue.redis).delete()  # a job gone out of band (expired, deleted)
    assert queue.submit(spec(5, project=5), 10)
    with pytest.raises(QueueFull):
        queue.submit(spec(6, project=5), 10)
    assert queue.queued_of("5") == 3 and late
    assert queue.counts() == {"queue": "redis", "survives_restart": True, "queued": 4, "running": 0}


def test_cancel_on_redis_drops_queued_jobs_and_stops_the_running_one(queue, redis_url, monkeypatch):  # noqa: F811
    model = FakeModel(frames=2000, frame_s=0.005)
    other = queue.submit(spec(9, project=2, video="c.mp4"), 2000)
    running = queue.submit(spec(7, video="a.mp4"), 2000)  # project 1 has nothing waiting: ahead of project 2's
    queued = queue.submit(spec(7, video="b.mp4"), 2000)  # behind its own project's job
    seen: dict = {}

    def cancel_when_under_way() -> None:
        end = time.time() + 30
        while time.time() < end and model.frames_done.get(7, 0) < 5:
            time.sleep(0.01)
        seen["running"] = queue.status(running)["status"]
        seen["counts"] = queue.counts()
        seen["canceled"] = queue.cancel_task(7)
        seen["frames"] = model.frames_done.get(7, 0)
        seen["queued"] = queue.status(queued)["status"]
        # The other task's job is stopped once it is under way, so the burst worker ends.
        while time.time() < end and model.frames_done.get(9, 0) < 3:
            time.sleep(0.01)
        seen["other"] = queue.cancel_task(9)

    helper = threading.Thread(target=cancel_when_under_way)
    helper.start()
    run_worker(redis_url, model, monkeypatch)
    helper.join(5)
    assert seen["running"] == "running" and sorted(seen["canceled"]) == sorted([running, queued])
    assert seen["counts"] == {"queue": "redis", "survives_restart": True, "queued": 2, "running": 1}
    assert seen["queued"] == "canceled", "a queued job is canceled at once"
    stopped = queue.status(running)
    assert stopped["status"] == "canceled" and stopped["error"] is None and stopped["attempts"] == 1
    assert model.frames_done[7] - seen["frames"] <= 20, "stopped within a few frames (0.1 s) of the command"
    assert model.frames_done[7] < 2000 and 7 not in model.posted
    assert seen["other"] == [other] and queue.status(other)["status"] == "canceled"
    assert queue.cancel_task(7) == []
    again = queue.submit(spec(7, video="b.mp4"), 5)  # canceled work can be asked for again
    assert again == queued and queue.status(again)["status"] == "queued"


def test_cancel_flag_stops_a_job_the_command_missed(queue):
    """A cancel sent while no worker held the job: its flag is read between frames, and the
    worker is told, as the command would, that the stop is intended (no retry)."""

    class Job:
        id, connection = "lx-propagate-7-flag", queue.redis

    class Worker:
        _stopped_job_id = None

    w = Worker()
    worker._stop.clear()
    previous, worker._worker = worker._worker, w
    try:
        check = worker.stop_check(Job())
        assert check() is False
        queue.redis.set(cancel_key(Job.id), b"1")
        time.sleep(worker.CANCEL_POLL_S)
        assert check() is True and w._stopped_job_id == Job.id
    finally:
        worker._worker = previous


def test_failed_jobs_on_redis_name_the_type_only(queue, redis_url, monkeypatch, caplog):  # noqa: F811
    secret = "Token 0123456789abcdef upstream body <html>"
    crash = queue.submit(spec(1), 3)
    run_worker(redis_url, FakeModel(fail=RuntimeError(f"Label Studio answered 500: {secret}")), monkeypatch)
    status = queue.status(crash)
    assert status["status"] == "failed"
    assert status["error"] == "internal error (RuntimeError): see the worker's log"
    assert secret in caplog.text and "task 1" in caplog.text, "the worker's log keeps it"
    bad = queue.submit(spec(2), 3)
    run_worker(redis_url, FakeModel(fail=LazyXMemError("the video has 0 frames\x1b[2J: upload a playable file")),
               monkeypatch)
    status = queue.status(bad)
    assert status["status"] == "failed" and "\x1b" not in status["error"]
    assert status["error"].startswith("the video has 0 frames") and "upload a playable file" in status["error"]


def test_health_counts_answer_within_a_second_when_redis_does_not():
    import socket

    from backend.redis_queue import RedisQueue as Q

    refused = Q("redis://127.0.0.1:1/0").counts()  # nothing listens on port 1
    assert refused["queue"] == "redis" and "unreachable" in refused["error"]
    with socket.socket() as mute:  # accepts connections (the kernel's backlog) but never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        t0 = time.perf_counter()
        silent = Q(f"redis://127.0.0.1:{mute.getsockname()[1]}/0").counts()
        assert time.perf_counter() - t0 < 1.0 and "unreachable (TimeoutError)" in silent["error"]


def test_a_project_with_nothing_waiting_goes_ahead_of_another_projects_backlog(redis_url, monkeypatch):  # noqa: F811
    q = RedisQueue(redis_url, retries=0, max_queued_per_project=100)
    q.redis.flushdb()
    try:
        for t in range(1, 31):  # a flood from project 1
            q.submit(spec(t, project=1), 3)
        q.submit(spec(100, project=2), 3)  # project 2's one job
        q.submit(spec(31, project=1), 3)  # more of the flood: behind its own backlog
        q.submit(spec(101, project=2), 3)  # project 2 has one waiting: it queues behind it
        model = FakeModel(frames=1)
        run_worker(redis_url, model, monkeypatch)
        # project 2's first job goes ahead of the backlog; the rest keep their projects' order
        assert model.posted == [100] + list(range(1, 32)) + [101], model.posted
    finally:
        q.redis.flushdb()
