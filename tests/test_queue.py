"""Jobs on RQ over a real Redis (Debian's redis-server), with two `lazyxmem worker` processes.

Shows the deployment's guarantees: jobs spread over both workers, a worker killed with SIGKILL
mid-job does not lose its job, and duplicated jobs post their prediction once. The workers post
to a local stand-in for Label Studio's API, which counts the posts.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from backend.jobs import JobSpec, RedisQueue
from lazyxmem_core import __version__
from fake_ls import TOKEN, FakeLabelStudio, serve
from synthetic import make_video

VIDEO_CFG = Path("backend/configs/video.xml").read_text()
WORKER_VERSION = f"lazyxmem-{__version__}-embedded"  # what the workers' engines post under
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def redis_url():
    exe = shutil.which("redis-server")
    assert exe, "redis-server is missing: `make test` installs it (Debian package redis-server)"
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from redis import Redis

    url = f"redis://127.0.0.1:{port}/0"
    wait_until(lambda: _ping(Redis.from_url(url)), 10, "redis-server to answer")
    yield url
    proc.terminate()
    proc.wait(10)


def _ping(r) -> bool:
    try:
        return bool(r.ping())
    except Exception:
        return False


def write_video(path: Path, n: int, size: tuple[int, int], seed: int):
    video = make_video(n_frames=n, size=size, radius=size[0] // 6, seed=seed)
    h, w = size
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (w, h))  # the config's frameRate
    for f in video.frames:
        out.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    out.release()
    FakeLabelStudio.files[f"/data/upload/9/{path.name}"] = path.read_bytes()
    return video


def task_for(task_id: int, name: str, video, size: tuple[int, int]) -> dict:
    h, w = size
    ys, xs = np.nonzero(video.masks[0] == 1)
    kf = {"frame": 1, "x": 100 * xs.min() / w, "y": 100 * ys.min() / h, "width": 100 * (xs.max() + 1 - xs.min()) / w,
          "height": 100 * (ys.max() + 1 - ys.min()) / h, "rotation": 0, "enabled": True}
    region = {"id": "r1", "from_name": "box", "to_name": "video", "type": "videorectangle",
              "value": {"sequence": [kf], "labels": ["Object"]}}
    return {"id": task_id, "data": {"video": f"/data/upload/9/{name}"},
            "annotations": [{"id": 1000 + task_id, "result": [region]}]}


@pytest.fixture(scope="module")
def cluster(redis_url):
    """The stand-in for Label Studio, its videos, and a way to start `lazyxmem worker` processes."""
    server, ls_url = serve()
    folder = Path(tempfile.mkdtemp(prefix="lazyxmem-queue-"))
    short = (72, 96)
    tasks = {}
    for i in range(6):
        name = f"short{i}.avi"
        tasks[100 + i] = task_for(100 + i, name, write_video(folder / name, 24, short, seed=i), short)
    long_size = (180, 240)
    tasks[200] = task_for(200, "long.avi", write_video(folder / "long.avi", 160, long_size, seed=7), long_size)
    env = {**os.environ, "REDIS_URL": redis_url, "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN,
           "LAZYXMEM_ENGINE": "embedded", "LAZYXMEM_REFINER": "embedded", "CACHE_DIR": str(folder / "cache"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str) -> subprocess.Popen:
        log = open(folder / f"{name}.log", "ab")
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "worker", "--name", name, "--heartbeat", "1", "--grace", "3",
             "--maintenance", "2"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        return procs[name]

    def live_workers() -> set[str]:
        from rq import Worker

        return {w.name for w in Worker.all(connection=RedisQueue(redis_url).redis)}

    for name in ("worker-a", "worker-b"):
        start(name)
    wait_until(lambda: {"worker-a", "worker-b"} <= live_workers(), 60, "two registered workers")
    yield {"ls_url": ls_url, "tasks": tasks, "start": start, "procs": procs, "live": live_workers,
           "folder": folder, "queue": RedisQueue(redis_url)}
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    for p in procs.values():
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
    server.shutdown()


def posts_for(task_id: int) -> list[dict]:
    with FakeLabelStudio.lock:
        return [p["json"] for p in FakeLabelStudio.posted
                if p["path"].startswith("/api/predictions") and p["json"].get("task") == task_id]


def spec(task: dict) -> JobSpec:
    return JobSpec("propagate", task, VIDEO_CFG, "lazyxmem-test-embedded")


def finished(queue: RedisQueue, job_id: str) -> dict | None:
    status = queue.status(job_id)
    return status if status and status["status"] in ("finished", "failed") else None


def test_jobs_spread_over_both_workers_and_each_posts_once(cluster):
    queue = cluster["queue"]
    ids = [queue.submit(spec(cluster["tasks"][100 + i]), 24) for i in range(6)]
    assert len(set(ids)) == 6
    done = [wait_until(lambda j=j: finished(queue, j), 120, f"job {j}") for j in ids]
    assert all(d["status"] == "finished" and d["done"] == 24 and d["total"] == 24 for d in done), done
    assert {d["worker"] for d in done} == {"worker-a", "worker-b"}, "both workers take jobs"
    for i in range(6):
        posted = posts_for(100 + i)
        assert len(posted) == 1 and posted[0]["model_version"] == WORKER_VERSION
        assert any(r["type"] == "videorectangle" for r in posted[0]["result"])


def test_duplicated_jobs_post_once(cluster):
    queue = cluster["queue"]
    task = {**cluster["tasks"][105], "id": 150}  # a task nothing has posted for yet
    copy = spec({**task, "annotations": [dict(task["annotations"][0], id=4242)]})
    assert copy.key == spec(task).key, "the key is the content (task, version, regions), not the annotation's id"
    fresh = spec(task)
    ids = {queue.submit(fresh, 24) for _ in range(3)}
    assert len(ids) == 1 and len(queue.queues["batch"]) <= 1
    job_id = ids.pop()
    wait_until(lambda: finished(queue, job_id), 60, "the duplicated job")
    assert queue.submit(fresh, 24) == job_id  # done already: not queued again
    time.sleep(1.0)
    assert len(queue.queues["batch"]) == 0
    # The job record expires (or is deleted) and the same work arrives again: it runs, but the
    # ledger knows its prediction was posted.
    from rq.job import Job

    Job.fetch(job_id, connection=queue.redis).delete()
    deleted_at = time.time()
    assert queue.submit(fresh, 24) == job_id
    status = wait_until(lambda: finished(queue, job_id), 60, "the re-run job")
    assert status["status"] == "finished" and status["started"] >= deleted_at - 1 and status["worker"]
    assert len(posts_for(150)) == 1, "three submissions and a re-run: one post"


def test_backend_queues_long_videos_on_redis_and_reports_worker_progress(cluster, redis_url, tmp_path):
    from backend.app import create_app
    from backend.settings import BackendSettings
    from lazyxmem_core.engines import EngineSettings

    settings = BackendSettings(ls_url=cluster["ls_url"], api_key=TOKEN, cache_dir=str(tmp_path / "cache"),
                               redis_url=redis_url, sync_budget_s=0.0,
                               engine=EngineSettings(engine="embedded", refiner="embedded"))
    client = create_app(settings).test_client()
    task = {**cluster["tasks"][101], "id": 160}
    r = client.post("/predict", json={"tasks": [task], "label_config": VIDEO_CFG, "params": {"context": None}})
    assert r.status_code == 200, r.json
    assert r.json["results"] == [[]], "queued: Label Studio stores nothing, the worker posts"
    job_id = r.json["jobs"]["160"]
    assert client.application.config["model"].tasks.held(160) is None, "a worker builds its own session"
    seen = []

    def done():
        job = client.get(f"/jobs/{job_id}").json
        seen.append(job)
        return job if job["status"] in ("finished", "failed") else None

    job = wait_until(done, 60, "the job through GET /jobs/<id>", interval=0.05)
    assert job["status"] == "finished" and job["done"] == job["total"] == 24 and job["fps"] > 0
    assert job["worker"] in ("worker-a", "worker-b") and job["kind"] == "propagate" and job["task"] == 160
    assert len(posts_for(160)) == 1
    assert client.get("/jobs/lx-nothing").status_code == 404


def test_worker_killed_mid_job_does_not_lose_the_job(cluster):
    queue = cluster["queue"]
    job_id = queue.submit(spec(cluster["tasks"][200]), 160)

    def running():
        s = queue.status(job_id)
        return s if s and s["status"] == "running" and 0 < s["done"] < 160 else None

    first = wait_until(running, 60, "the long job to be under way", interval=0.05)
    victim = cluster["procs"][first["worker"]]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(10)
    assert not posts_for(200), "killed before it could post"
    # The lease lapses (heartbeat 1 s + grace 3 s) and the surviving worker requeues and runs it.
    status = wait_until(lambda: finished(queue, job_id), 120, "the retried job")
    assert status["status"] == "finished", status
    assert status["worker"] != first["worker"] and status["attempts"] == 2 and status["done"] == 160
    posted = posts_for(200)
    assert len(posted) == 1 and any(r["type"] == "videorectangle" for r in posted[0]["result"])
    cluster["start"](first["worker"])  # back to two workers for anything after


def test_post_ledger_lets_one_of_concurrent_duplicates_post(redis_url):
    import threading

    from redis import Redis

    from backend.ls_io import PostLedger

    ledger = PostLedger(Redis.from_url(redis_url))
    posts: list[int] = []

    def post():
        time.sleep(0.3)  # a slow post: the duplicates arrive while it is under way
        posts.append(1)

    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(ledger.post_once("lx-ledger-test", post)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert posts == [1] and sorted(results) == [False, False, False, True]
    # A worker killed after posting but before marking it left only the "posting" flag: the
    # retry asks Label Studio instead of posting again.
    ledger.redis.set("lazyxmem:posting:lx-ledger-2", "1")
    assert ledger.post_once("lx-ledger-2", post, already_posted=lambda: True) is False and posts == [1]
    assert ledger.post_once("lx-ledger-2", post, already_posted=lambda: True) is False


def test_web_process_refines_against_the_workers_latest_masks(cluster, redis_url, tmp_path):
    """With workers, the web process never re-propagates: an interactive edit after a correction
    must see the masks the worker made (task_store.ViewStore), not the web process's first propagation."""
    from backend import convert
    from backend.app import create_app
    from backend.settings import BackendSettings
    from backend.task_store import ViewStore
    from lazyxmem_core.engines import EngineSettings

    settings = BackendSettings(ls_url=cluster["ls_url"], api_key=TOKEN, cache_dir=str(tmp_path / "cache"),
                               redis_url=redis_url, sync_budget_s=0.0,
                               engine=EngineSettings(engine="embedded", refiner="embedded"))
    client = create_app(settings).test_client()
    model = client.application.config["model"]
    store = ViewStore(cluster["queue"].redis)
    task = {**cluster["tasks"][103], "id": 170}
    r = client.post("/predict", json={"tasks": [task], "label_config": VIDEO_CFG, "params": {"context": None}})
    job = wait_until(lambda: finished(cluster["queue"], r.json["jobs"]["170"]), 60, "the propagation")
    assert job["status"] == "finished"
    first = store.get(task, model.model_version)
    assert first is not None and first[1].n_frames == 24 and first[1].done, "the worker stored its view"

    def edit(keyframes: list[dict]) -> list[dict]:
        region = {"id": "lazyxmem-1", "from_name": "box", "to_name": "video", "type": "videorectangle",
                  "value": {"framesCount": 24, "labels": ["Object"], "sequence": keyframes}}
        r = client.post("/predict", json={"tasks": [task], "label_config": VIDEO_CFG,
                                          "params": {"context": {"result": [region]}}})
        assert r.status_code == 200, r.json
        return [k for x in r.json["results"][0]["result"] for k in x["value"]["sequence"]]

    # The annotator drags frame 13's box onto the lower-right part of the frame.
    moved = {"frame": 13, "x": 50.0, "y": 45.0, "width": 40.0, "height": 45.0, "rotation": 0, "enabled": True}
    answer = edit([moved])
    assert [k["frame"] for k in answer] == [13]
    state = model.tasks.held(170)
    assert len(state.session.records) == 0, "the web process did not propagate the video itself"
    assert all((a == b).all() for a, b in zip(state.masks(), first[1].frame_masks()))
    wait_until(lambda: store.get(task, model.model_version, newer_than=first[0]), 60, "the corrected masks")
    # Label Studio now shows frame 13 with the answered box; the annotator edits frame 20 too.
    later = {"frame": 20, "x": 5.0, "y": 5.0, "width": 40.0, "height": 40.0, "rotation": 0, "enabled": True}
    second = edit([dict(answer[0], enabled=True), later])
    assert [k["frame"] for k in second] == [20], "frame 13 already holds the correction: only frame 20 is new"
    assert state.stamp > first[0]
    # The answer is the box as drawn; the web process holds the worker's corrected masks.
    assert max(abs(moved[k] - answer[0][k]) for k in ("x", "y", "width", "height")) < 1e-6
    latest = store.get(task, model.model_version)
    assert all((a == b).all() for a, b in zip(state.masks(), latest[1].frame_masks()))
    # The task reopened once frame 20's correction is in: /predict answers with the workers'
    # latest prediction, both corrections included (not a propagation from the task's regions).
    wait_until(lambda: store.get(task, model.model_version, newer_than=state.stamp), 60, "frame 20's masks")
    r = client.post("/predict", json={"tasks": [task], "label_config": VIDEO_CFG, "params": {"context": None}})
    reopened = r.json["results"][0]
    assert (reopened["model_version"], reopened["revision"]) == (model.model_version, 2), reopened["model_version"]
    track = next(x for x in reopened["result"] if x["type"] == "videorectangle")
    kf13 = next(k for k in track["value"]["sequence"] if k["frame"] == 13)
    assert max(abs(kf13[k] - answer[0][k]) for k in ("x", "y", "width", "height")) <= 1.0


def test_view_store_keeps_the_latest_jobs_view(redis_url):
    from redis import Redis

    from backend.task_store import ViewStore
    from lazyxmem_core.session_view import SessionView
    from lazyxmem_core.types import PackedMask

    def view(offset: int) -> SessionView:
        masks = tuple(PackedMask.pack(np.full((4, 6), (t + offset) % 3, np.uint8)) for t in range(5))
        anchor = PackedMask.pack(np.ones((4, 6), bool))
        return SessionView("task-180-x", 5, (4, 6), (1, 2), masks, {(2, 1): anchor}, {1: ((0, anchor),)},
                           (3,), (1,), 0.25)

    store = ViewStore(Redis.from_url(redis_url))
    task = {"id": 180, "data": {"video": "/data/upload/9/x.mp4"}, "annotations": []}
    newer = view(1)
    assert store.get(task, "v1") is None
    assert store.put(task, "v1", 10.0, newer, 1, prediction={"model_version": "v1-r1", "result": []})
    assert not store.put(task, "v1", 5.0, view(0), 0, {}), "a job queued earlier never overwrites a later one"
    assert not store.put(task, "v1", 20.0, view(0), 0, {}, only_if_absent=True), "a propagation never overwrites"
    stamp, got, revision = store.get(task, "v1")
    assert stamp == 10.0 and revision == 1 and got.n_frames == 5
    assert all((a == b).all() for a, b in zip(got.frame_masks(), newer.frame_masks()))
    assert got.review == (3,) and got.pseudo == (1,) and got.score == 0.25 and got.video_key == "task-180-x"
    assert got.prior(2, 1).all() and got.reference(1, 1)[0] == 0 and got.reference(0, 1) is None
    with pytest.raises(IndexError, match="outside the video"):
        got.frame_masks()[5]
    assert store.get(task, "v1", newer_than=10.0) is None, "nothing newer than what the caller holds"
    assert store.prediction(task, "v1") == {"model_version": "v1-r1", "result": []}
    assert store.prediction(task, "v2") is None
    assert store.get(task, "v2") is None, "another model version is another entry"
    edited = {**task, "annotations": [{"id": 1, "result": [{"id": "r9"}]}]}
    assert store.get(edited, "v1") is None, "changed initial regions are another entry"


def test_progress_meter_total_follows_uncounted_work():
    """A correction on a propagated task starts with nothing 'remaining' (total 0) and then
    re-propagates frames: the meter never shows more done than total, and does not publish
    every frame as if each were the last."""
    from backend.jobs import ProgressMeter

    published: list[dict] = []
    meter = ProgressMeter("job", 7, total=0, publish=published.append)
    for _ in range(8):
        meter(1)
    assert (meter.done, meter.total) == (8, 8)
    assert len(published) == 1 and all(p["done"] <= p["total"] for p in published)
    counted: list[dict] = []
    meter = ProgressMeter("job", 7, total=5, publish=counted.append)
    for _ in range(5):
        meter(1)
    assert [p["done"] for p in counted] == [1, 5]  # the first second's report, then the last frame
