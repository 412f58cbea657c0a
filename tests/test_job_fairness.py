"""The in-process job queue against floods and restarts (issue 17): round-robin between projects,
a bound on one project's queued jobs, cancel of a task's queued and running jobs, job errors that
quote no unexpected exception, and a journal that survives a kill -9 of the web process."""
from __future__ import annotations

import base64
import logging
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from backend.jobs import JobCanceled, JobSpec, LocalQueue, QueueFull, make_queue
from lazyxmem_core.errors import LazyXMemError

ROOT = Path(__file__).resolve().parents[1]


def spec(task_id: int, project: int | None = 1, kind: str = "propagate", video: str = "v.mp4") -> JobSpec:
    task = {"id": task_id, "data": {"video": f"/data/upload/1/{video}"}, "annotations": []}
    if project is not None:
        task["project"] = project
    return JobSpec(kind, task, "<View/>", "lazyxmem-test")


def wait_until(check, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ended(queue: LocalQueue, job_id: str) -> dict | None:
    s = queue.status(job_id)
    return s if s and s["status"] in ("finished", "failed", "canceled") else None


class Runner:
    """Records the order jobs run in; jobs of ``hold`` tasks wait for ``release`` first."""

    def __init__(self, frames: int = 3, frame_s: float = 0.0, hold: tuple[int, ...] = (),
                 frames_of: dict[int, int] | None = None) -> None:
        self.frames, self.frame_s, self.hold = frames, frame_s, hold
        self.frames_of = frames_of or {}  # task id -> its frames, where not ``frames``
        self.release = threading.Event()
        self.order: list[int] = []
        self.posted: list[int] = []
        self.frames_done: dict[int, int] = {}

    def __call__(self, spec: JobSpec, progress) -> dict:
        self.order.append(spec.task_id)
        if spec.task_id in self.hold:
            assert self.release.wait(30), "the test never released the job"
        for _ in range(self.frames_of.get(spec.task_id, self.frames)):
            progress(1)
            self.frames_done[spec.task_id] = self.frames_done.get(spec.task_id, 0) + 1
            time.sleep(self.frame_s)
        self.posted.append(spec.task_id)  # what a real runner does last: post the prediction
        return {"posted": True}


def test_spec_project_comes_from_the_task():
    assert spec(1, project=42).project == "42"
    assert spec(1, project=None).project == ""
    assert spec(1, project=42).key == spec(1, project=43).key, "the id is the work, not where it was filed"


def test_a_flood_from_one_project_does_not_hold_back_another():
    runner = Runner(frames=1, hold=(1,))
    queue = LocalQueue(runner, max_queued_per_project=100)
    first = queue.submit(spec(1, project=1), 1)
    wait_until(lambda: queue.status(first)["status"] == "running", 5, "the first job to start")
    flood = [queue.submit(spec(task_id, project=1), 1) for task_id in range(2, 52)]  # 50 more from project 1
    other = queue.submit(spec(900, project=2), 1)
    assert queue.counts() == {"queue": "in-process", "survives_restart": False, "queued": 51, "running": 1}
    runner.release.set()
    for job_id in [first, other, *flood]:
        assert wait_until(lambda j=job_id: ended(queue, j), 10, job_id)["status"] == "finished"
    assert runner.order[:3] == [1, 900, 2], "project 2's one job runs next, not after project 1's 50"
    assert runner.order[2:] == list(range(2, 52)), "first in, first out within a project"


def test_round_robin_between_three_projects_with_backlogs():
    runner = Runner(frames=1, hold=(1,))
    queue = LocalQueue(runner)
    wait_for = [queue.submit(spec(1, project=1), 1)]
    wait_until(lambda: queue.status(wait_for[0])["status"] == "running", 5, "the first job to start")
    for project, tasks in ((1, (11, 12, 13)), (2, (21, 22, 23)), (3, (31, 32))):
        wait_for += [queue.submit(spec(t, project=project), 1) for t in tasks]
    runner.release.set()
    for job_id in wait_for:
        wait_until(lambda j=job_id: ended(queue, j), 10, job_id)
    assert runner.order == [1, 21, 31, 11, 22, 32, 12, 23, 13]


def test_interactive_lane_never_waits_behind_batch():
    runner = Runner(frames=1, hold=(1,))
    queue = LocalQueue(runner)
    batch = queue.submit(spec(1), 1)
    wait_until(lambda: queue.status(batch)["status"] == "running", 5, "the batch job to start")
    fix = queue.submit(spec(2, kind="correct"), 1)
    assert wait_until(lambda: ended(queue, fix), 5, "the correction")["status"] == "finished"
    assert queue.status(batch)["status"] == "running"
    runner.release.set()
    wait_until(lambda: ended(queue, batch), 5, "the batch job")


def test_per_project_bound_refuses_with_a_clear_error():
    runner = Runner(frames=1, hold=(1,))
    queue = LocalQueue(runner, max_queued_per_project=3)
    running = queue.submit(spec(1, project=7), 1)
    wait_until(lambda: queue.status(running)["status"] == "running", 5, "the first job to start")
    queued = [queue.submit(spec(t, project=7), 1) for t in (2, 3, 4)]  # the running one is not counted
    with pytest.raises(QueueFull) as refused:
        queue.submit(spec(5, project=7), 1)
    assert isinstance(refused.value, LazyXMemError), "the routes answer LazyXMemError with a 422"
    message = str(refused.value)
    assert "project 7" in message and "3 jobs queued" in message and "MAX_QUEUED_PER_PROJECT=3" in message
    assert "DELETE /tasks/<id>/jobs" in message
    assert queue.submit(spec(2, project=7), 1) == queued[0], "the same work again is no new job"
    other = queue.submit(spec(6, project=8), 1)  # another project still gets in
    runner.release.set()
    for job_id in [running, *queued, other]:
        assert wait_until(lambda j=job_id: ended(queue, j), 5, job_id)["status"] == "finished"
    late = queue.submit(spec(5, project=7), 1)  # room again once the backlog ran
    assert wait_until(lambda: ended(queue, late), 5, "the job refused before")["status"] == "finished"
    assert runner.order == [1, 6, 2, 3, 4, 5], "project 8 first: project 7 was just served"


def test_cancel_drops_queued_jobs_and_stops_the_running_one_between_frames():
    runner = Runner(frames=2000, frame_s=0.005, frames_of={8: 3, 9: 3})
    queue = LocalQueue(runner)
    running = queue.submit(spec(7, video="a.mp4"), 2000)
    wait_until(lambda: runner.frames_done.get(7, 0) >= 5, 5, "the job to be under way")
    queued = queue.submit(spec(7, video="b.mp4"), 2000)  # same task, other work: behind it in the lane
    correction = queue.submit(spec(8, kind="correct"), 1)
    other = queue.submit(spec(9, video="c.mp4"), 5)
    assert queue.status(queued)["status"] == "queued"
    canceled = queue.cancel_task(7)
    frames_then = runner.frames_done[7]
    assert sorted(canceled) == sorted([running, queued])
    assert queue.status(queued)["status"] == "canceled" and queue.status(queued)["finished"]
    stopped = wait_until(lambda: ended(queue, running), 5, "the running job to stop")
    assert stopped["status"] == "canceled" and stopped["error"] is None
    assert runner.frames_done[7] - frames_then <= 2, "it stops at its next frame"
    assert stopped["done"] == runner.frames_done[7] < 2000
    assert 7 not in runner.posted and runner.order.count(7) == 1, "stopped before posting, the queued one never ran"
    assert wait_until(lambda: ended(queue, other), 60, "the other task")["status"] == "finished"
    assert ended(queue, correction)["status"] == "finished"
    assert queue.cancel_task(7) == [] and queue.cancel_task(12345) == []
    again = queue.submit(spec(7, video="b.mp4"), 5)  # a canceled job can be asked for again
    assert again == queued and queue.status(again)["status"] in ("queued", "running")
    queue.cancel_task(7)


def test_meter_raises_job_canceled_once_asked():
    from backend.jobs import ProgressMeter

    stop = threading.Event()
    meter = ProgressMeter("job", 1, 10, canceled=stop.is_set)
    meter(1)
    stop.set()
    with pytest.raises(JobCanceled):
        meter(1)
    assert meter.done == 1


def test_failed_job_error_never_quotes_an_unexpected_exception(caplog):
    secret = "Token 0123456789abcdef upstream body <html>"

    def runner(spec: JobSpec, progress) -> None:
        if spec.task_id == 1:
            raise RuntimeError(f"POST /api/predictions answered 500: {secret}")
        raise LazyXMemError("the video has 0 frames\x1b[2J: upload a playable file")

    queue = LocalQueue(runner)
    crash, bad = queue.submit(spec(1), 1), queue.submit(spec(2), 1)
    with caplog.at_level(logging.ERROR, logger="backend.jobs"):
        crashed = wait_until(lambda: ended(queue, crash), 5, "the crashing job")
        refused = wait_until(lambda: ended(queue, bad), 5, "the bad-input job")
    assert crashed["status"] == "failed"
    assert crashed["error"] == "internal error (RuntimeError): see the backend's log"
    assert secret in caplog.text and "task 1" in caplog.text, "the log keeps what the status leaves out"
    assert refused["status"] == "failed" and "\x1b" not in refused["error"]
    assert refused["error"].startswith("the video has 0 frames") and "upload a playable file" in refused["error"]


# -- restarts ------------------------------------------------------------------------------------
def test_journal_is_private_and_emptied_as_jobs_end(tmp_path):
    runner = Runner(frames=1, hold=(1,))
    journal = tmp_path / "jobs"
    queue = LocalQueue(runner, journal_dir=str(journal))
    assert stat.S_IMODE(journal.stat().st_mode) == 0o700
    ids = [queue.submit(spec(1), 1), queue.submit(spec(2), 1), queue.submit(spec(3), 1)]
    mine = queue.journal.dir  # this process's folder, beside the lock it holds
    assert mine.parent == journal and stat.S_IMODE(mine.stat().st_mode) == 0o700
    # The running job's entry is being rewritten (its start counted) meanwhile: a ".tmp-" file of
    # that atomic write may show for a moment; it is not an entry.
    files = sorted(p.name for p in mine.iterdir() if not p.name.startswith(".tmp-"))
    assert files == sorted(f"{i}.job" for i in ids)
    assert all(stat.S_IMODE((mine / f).stat().st_mode) == 0o600 for f in files)
    assert queue.counts()["survives_restart"] is True
    queue.cancel_task(3)
    assert not (mine / f"{ids[2]}.job").exists(), "a canceled job leaves the journal"
    runner.release.set()
    for job_id in ids[:2]:
        wait_until(lambda j=job_id: ended(queue, j), 5, job_id)
    assert list(mine.iterdir()) == [], "finished jobs leave the journal"


def test_jobs_survive_a_kill_9_of_the_web_process(tmp_path):
    """A process queues three jobs (one running, two waiting) and is killed with SIGKILL; a new
    queue on the same journal runs all three."""
    journal = tmp_path / "jobs"
    script = textwrap.dedent(f"""
        import sys, threading, time
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
        from test_job_fairness import spec
        from backend.jobs import LocalQueue

        def runner(spec, progress):
            progress(1)
            print("running", spec.task_id, flush=True)
            threading.Event().wait()  # until killed

        queue = LocalQueue(runner, journal_dir={str(journal)!r})
        for task_id in (1, 2, 3):
            queue.submit(spec(task_id, project=task_id), 10)
        print("queued", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT, text=True)
    try:
        assert sorted(proc.stdout.readline().strip() for _ in range(2)) == ["queued", "running 1"]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert len(list(journal.rglob("lx-*.job"))) == 3
    runner = Runner(frames=2)
    queue = LocalQueue(runner, journal_dir=str(journal))
    assert runner.order == [], "nothing runs before resume(): the service may not be built yet"
    resumed = queue.resume()
    assert sorted(resumed) == sorted(spec(t, project=t).key for t in (1, 2, 3))
    for job_id in resumed:
        status = wait_until(lambda j=job_id: ended(queue, j), 10, job_id)
        assert status["status"] == "finished" and status["done"] == 2
    assert runner.order == [1, 2, 3], "re-queued in the order they were first submitted"
    assert list(journal.rglob("*.job")) == []


def test_a_job_that_keeps_killing_the_process_is_dropped_after_the_retries(tmp_path, caplog):
    from backend.journal import Journal

    journal = Journal(tmp_path / "jobs")
    journal.add(spec(1).key, spec(1), 5, attempts=3)  # started three times, the process died each time
    journal.add(spec(2).key, spec(2), 5, attempts=1)
    journal.close()  # its process is gone
    runner = Runner(frames=1)
    queue = LocalQueue(runner, journal_dir=str(tmp_path / "jobs"), retries=2)
    with caplog.at_level(logging.INFO, logger="backend.jobs"):
        assert queue.resume() == [spec(2).key]
    assert "started 3 times and never ended" in caplog.text and "task 1" in caplog.text
    assert "task 2: propagate job" in caplog.text and "re-queued after a restart" in caplog.text
    wait_until(lambda: ended(queue, spec(2).key), 5, "the resumed job")
    assert runner.order == [2] and list((tmp_path / "jobs").rglob("*.job")) == []


def test_corrupt_journal_files_are_moved_aside_not_fatal(tmp_path, caplog):
    from backend.journal import Journal

    folder = tmp_path / "jobs"
    journal = Journal(folder)
    good = spec(3)
    journal.add(good.key, good, 4)
    journal.close()
    (folder / "lx-propagate-1-0000.job").write_bytes(b"\x80\x05truncated")
    (folder / "lx-propagate-2-0000.job").write_bytes(pickle.dumps({"spec": "not a spec", "total": 1, "attempts": 0}))
    misfiled = spec(4)  # a real spec under another job's name
    (folder / f"{spec(5).key}.job").write_bytes(pickle.dumps({"spec": misfiled, "total": 1, "attempts": 0}))
    (folder / ".tmp-abc.job").write_bytes(b"half a write")
    runner = Runner(frames=1)
    queue = LocalQueue(runner, journal_dir=str(folder))
    with caplog.at_level(logging.ERROR, logger="backend.journal"):
        assert queue.resume() == [good.key]
    assert sorted(p.name for p in (folder / "corrupt").iterdir()) == sorted(
        ["lx-propagate-1-0000.job", "lx-propagate-2-0000.job", f"{spec(5).key}.job"])
    assert caplog.text.count("moved to") == 3
    assert not (folder / ".tmp-abc.job").exists()
    wait_until(lambda: ended(queue, good.key), 5, "the good job")
    assert runner.order == [3]


def test_a_live_sibling_process_keeps_its_jobs(tmp_path):
    """Web processes sharing CACHE_DIR (gunicorn WORKERS): one starting takes over the jobs of
    processes that are gone, never those of one still running them."""
    from backend.journal import Journal

    sibling = Journal(tmp_path / "jobs")  # its lock held, as by a live process
    sibling.add(spec(1).key, spec(1), 3)
    runner = Runner(frames=1)
    queue = LocalQueue(runner, journal_dir=str(tmp_path / "jobs"))
    assert queue.resume() == [] and (sibling.dir / f"{spec(1).key}.job").exists()
    sibling.close()  # the sibling dies: the kernel drops its lock
    later = LocalQueue(runner, journal_dir=str(tmp_path / "jobs"))
    assert later.resume() == [spec(1).key] and not sibling.dir.exists()
    wait_until(lambda: ended(later, spec(1).key), 5, "the taken-over job")
    assert runner.order == [1] and list((tmp_path / "jobs").rglob("*.job")) == []


def test_journal_in_a_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    from backend.journal import Journal, JournalError

    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(JournalError, match="belongs to uid .* point CACHE_DIR"):
        Journal(tmp_path)


def test_journal_dir_opened_up_is_made_private_again(tmp_path):
    from backend.journal import Journal

    folder = tmp_path / "jobs"
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)
    Journal(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_make_queue_passes_the_journal_and_the_bound(tmp_path):
    queue = make_queue(Runner(), None, 2, 60, journal_dir=str(tmp_path / "jobs"), max_queued_per_project=5)
    assert isinstance(queue, LocalQueue) and queue.max_queued_per_project == 5
    assert queue.journal is not None and queue.counts()["survives_restart"] is True
    assert make_queue(Runner(), None).counts()["survives_restart"] is False


# -- the routes ----------------------------------------------------------------------------------
def test_cancel_route_and_health_fields(tmp_path):
    from backend.app import create_app
    from backend.settings import BackendSettings
    from lazyxmem_core.engines import EngineSettings

    settings = BackendSettings(cache_dir=str(tmp_path / "cache"), basic_auth_user="ann", basic_auth_pass="pw",
                               engine=EngineSettings(engine="embedded", refiner="embedded"))
    app = create_app(settings)
    runner = Runner(frames=1, hold=(5,))
    queue = app.config["model"].jobs = LocalQueue(runner)
    client = app.test_client()
    auth = {"Authorization": "Basic " + base64.b64encode(b"ann:pw").decode()}
    running = queue.submit(spec(5, video="a.mp4"), 1)
    wait_until(lambda: queue.status(running)["status"] == "running", 5, "the job to start")
    queued = queue.submit(spec(5, video="b.mp4"), 1)
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json["jobs"] == {"queue": "in-process", "survives_restart": False, "queued": 1, "running": 1}
    assert client.delete("/tasks/5/jobs").status_code == 401, "behind basic auth like every other route"
    r = client.delete("/tasks/5/jobs", headers=auth)
    assert r.status_code == 200 and sorted(r.json["canceled"]) == sorted([running, queued])
    assert client.get(f"/jobs/{queued}", headers=auth).json["status"] == "canceled"
    runner.release.set()  # the held job is released and stops at its first frame
    assert wait_until(lambda: ended(queue, running), 5, "the running job")["status"] == "canceled"
    assert runner.posted == []
    assert client.delete("/tasks/5/jobs", headers=auth).json == {"canceled": []}


def test_journal_round_trips_a_correction_job_with_its_masks(tmp_path):
    """A correction job carries numpy masks, clicks and a box: what the journal gives back after a
    restart is the same work (same id, same masks)."""
    import numpy as np

    from backend.journal import Journal
    from lazyxmem_core.types import Correction

    mask = np.zeros((6, 8), bool)
    mask[2:4, 3:6] = True
    task = {"id": 4, "project": 2, "data": {"video": "/data/upload/1/v.mp4"}, "annotations": []}
    job = JobSpec("correct", task, "<View/>", "lazyxmem-test", revision=2,
                  corrections={(3, 1): Correction(mask=mask), (5, 2): Correction(box=(1.0, 2.0, 5.0, 6.0))})
    journal = Journal(tmp_path / "jobs")
    journal.add(job.key, job, 12, attempts=1)
    journal.close()
    [(back, total, attempts)] = Journal(tmp_path / "jobs").load(JobSpec)
    assert back.key == job.key and (total, attempts) == (12, 1) and back.revision == 2
    assert np.array_equal(back.corrections[(3, 1)].mask, mask) and back.corrections[(5, 2)].box == (1.0, 2.0, 5.0, 6.0)
    assert back.submitted == job.submitted and back.project == "2"


def test_a_job_running_when_the_process_exits_stops_at_its_frame_and_resumes_at_the_next_start(tmp_path):
    """Exiting with a job under way (inside native code between frames) used to abort the
    process (status 134); now the job stops at its next frame, stays journalled and resumes."""
    journal = tmp_path / "jobs"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
        from test_job_fairness import spec
        from backend.jobs import LocalQueue

        def runner(spec, progress):
            for _ in range(10_000):
                time.sleep(0.01)
                progress(1)

        queue = LocalQueue(runner, journal_dir={str(journal)!r})
        queue.submit(spec(1, project=1), 10_000)
        while not queue.running():
            time.sleep(0.01)
        print("running", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and "running" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    assert len(list(journal.rglob("lx-*.job"))) == 1, "the interrupted job is kept for the next start"
    runner = Runner(frames=2)
    queue = LocalQueue(runner, journal_dir=str(journal))
    (job_id,) = queue.resume()
    assert wait_until(lambda: ended(queue, job_id), 10, job_id)["status"] == "finished"
