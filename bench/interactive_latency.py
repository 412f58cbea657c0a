"""Interactive answers under load: one backend process, 16 predictions at once, a reviewer clicking.

The backend runs as ``make run`` starts it (gunicorn, 1 worker, 4 threads, the embedded engine)
against a local stand-in for Label Studio that serves the media and receives the predictions.
Tasks are image sequences of real DAVIS-2016 frames (854x480, ``LAZYXMEM_DATA`` or
``../shared/data``) with their first-frame masks, all of one size. Two review tasks are predicted
first. Then, side by side in one run:

1. idle: the reviewer's clicks alone (alternating between the two review tasks, one click every
   ``--gap`` s, each on a frame of the track, at the object's centre);
2. load: the same clicks while 16 other tasks are sent to /predict at once (16 concurrent
   requests), until every one of the 16 predictions has arrived (returned or posted).

Reports the interactive latency (median, p95, max) in both phases, and when the predictions were
complete.

    .venv/bin/python bench/interactive_latency.py [--tasks 16] [--frames 30] [--gap 0.5]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from label_studio_sdk.converter.brush import mask2rle  # noqa: E402

from fake_ls import TOKEN, FakeLabelStudio, serve  # noqa: E402

CONFIG = (ROOT / "backend" / "configs" / "image_sequence.xml").read_text()


def windows(data: Path, n_frames: int) -> list[tuple[Path, int]]:
    """Distinct clips: each sequence's first ``n_frames`` frames, then the next window of each."""
    seqs = sorted(p for p in data.iterdir() if (p / "frames").is_dir())
    return [(seq, w) for w in range(10) for seq in seqs
            if len(list((seq / "masks").glob("*.png"))) >= (w + 1) * n_frames]


def make_tasks(clips: list[tuple[Path, int]], n_frames: int, first_id: int) -> list[dict]:
    tasks = []
    for i, (seq, window) in enumerate(clips):
        frames = sorted((seq / "frames").glob("*.jpg"))[window * n_frames:(window + 1) * n_frames]
        masks = sorted((seq / "masks").glob("*.png"))[window * n_frames:(window + 1) * n_frames]
        urls = []
        for f in frames:
            key = f"/data/upload/bench/{seq.name}/{f.name}"
            FakeLabelStudio.files[key] = f.read_bytes()
            urls.append(key)
        gt = [cv2.imread(str(m), cv2.IMREAD_GRAYSCALE) > 0 for m in masks]
        h, w = gt[0].shape
        region = {"id": "m1", "from_name": "mask", "to_name": "frames", "type": "brushlabels", "item_index": 0,
                  "original_width": w, "original_height": h,
                  "value": {"format": "rle", "rle": mask2rle(gt[0].astype(np.uint8) * 255), "brushlabels": ["Object"]}}
        tasks.append({"id": first_id + i, "data": {"frames": urls},
                      "annotations": [{"id": 1000 + first_id + i, "result": [region]}], "_gt": gt})
    return tasks


def public(task: dict) -> dict:
    return {k: v for k, v in task.items() if not k.startswith("_")}


def click(task: dict, t: int) -> dict:
    gt = task["_gt"][t]
    ys, xs = np.nonzero(gt)
    h, w = gt.shape
    i = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))  # the object pixel nearest its centre
    return {"from_name": "clicks", "to_name": "frames", "type": "keypointlabels", "item_index": t,
            "is_positive": True, "original_width": w, "original_height": h,
            "value": {"x": 100 * xs[i] / w, "y": 100 * ys[i] / h, "width": 0.5, "keypointlabels": ["Object"]}}


def predict(url: str, tasks: list[dict], context: dict | None = None) -> dict:
    r = requests.post(f"{url}/predict", json={"tasks": [public(t) for t in tasks], "label_config": CONFIG,
                                              "project": "1.0", "params": {"context": context}}, timeout=300)
    r.raise_for_status()
    return r.json()


def reviewer(url: str, review: list[dict], n_frames: int, gap: float, stop: threading.Event,
             rng: random.Random) -> list[float]:
    """Clicks alternating between the review tasks until ``stop``; returns each answer's latency."""
    latencies, i = [], 0
    while not stop.is_set():
        task = review[i % len(review)]
        t = rng.randrange(1, n_frames)
        t0 = time.perf_counter()
        out = predict(url, [task], {"result": [click(task, t)]})
        latencies.append(time.perf_counter() - t0)
        assert out["results"][0]["result"], f"task {task['id']}: no answer for frame {t}"
        i += 1
        stop.wait(gap)
    return latencies


def posted_tasks() -> set[int]:
    return {int(p["json"]["task"]) for p in FakeLabelStudio.posted if p["path"].startswith("/api/predictions")}


def summary(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=20) if len(xs) >= 2 else xs * 19
    return f"n={len(xs):3d}  median {statistics.median(xs):.3f} s  p95 {q[18]:.3f} s  max {max(xs):.3f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between a reviewer's clicks")
    ap.add_argument("--idle-clicks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=4, help="gunicorn threads (make run: THREADS=4)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    data = Path(os.environ.get("LAZYXMEM_DATA") or ROOT.parent / "shared" / "data") / "davis2016"
    rng = random.Random(a.seed)
    clips = windows(data, a.frames)
    if len(clips) < a.tasks + 2:
        raise SystemExit(f"{len(clips)} clips of {a.frames} frames in {data}: use fewer --frames or --tasks")
    load = make_tasks(clips[:a.tasks], a.frames, first_id=101)
    review = make_tasks(clips[-2:], a.frames, first_id=1)
    ls, ls_url = serve()
    port = ls.server_address[1] + 1
    url = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="lazyxmem-bench-"))
    env = {**os.environ, "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN, "CACHE_DIR": str(tmp / "cache"),
           "LAZYXMEM_ENGINE": "embedded", "LAZYXMEM_REFINER": "embedded", "MAX_SESSIONS": str(a.tasks + 4),
           "LOG_LEVEL": "WARNING"}
    log = open(tmp / "backend.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "--bind", f"127.0.0.1:{port}",
                             "--workers", "1", "--threads", str(a.threads), "--timeout", "0", "backend.wsgi:app"],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        for task in review:  # the reviewer's tasks are held, as after their pre-annotation
            assert predict(url, [task])["results"][0]["result"]
        print(f"{a.tasks} tasks of {a.frames} frames at {load[0]['_gt'][0].shape[1]}x{load[0]['_gt'][0].shape[0]}, "
              f"gunicorn 1 worker x {a.threads} threads, {os.cpu_count()} cores")

        stop = threading.Event()
        idle = []
        for _ in range(a.idle_clicks):
            task = review[len(idle) % 2]
            t = rng.randrange(1, a.frames)
            t0 = time.perf_counter()
            predict(url, [task], {"result": [click(task, t)]})
            idle.append(time.perf_counter() - t0)
            time.sleep(a.gap)
        time.sleep(5)  # the idle phase's correction jobs finish

        before = posted_tasks()
        returned: set[int] = set()
        t_start = time.perf_counter()
        with ThreadPoolExecutor(1) as clicker, ThreadPoolExecutor(len(load)) as batch:
            clicks = clicker.submit(reviewer, url, review, a.frames, a.gap, stop, rng)

            def one(task: dict) -> None:
                if predict(url, [task])["results"][0]:
                    returned.add(task["id"])

            list(batch.map(one, load))
            t_sent = time.perf_counter() - t_start
            ids = {t["id"] for t in load}
            while not ids <= (returned | (posted_tasks() - before)):
                time.sleep(0.2)
            t_done = time.perf_counter() - t_start
            stop.set()
            loaded = clicks.result()
        print(f"idle:  interactive {summary(idle)}")
        print(f"load:  interactive {summary(loaded)}")
        print(f"load:  16 /predict calls answered after {t_sent:.1f} s ({len(returned)} in the request, "
              f"{len(ids - returned)} queued and posted); every prediction in after {t_done:.1f} s")
        p95 = statistics.quantiles(loaded, n=20)[18]
        print(f"p95 under load / p95 idle: {p95 / statistics.quantiles(idle, n=20)[18]:.2f}; "
              f"target p95 <= 1 s: {'met' if p95 <= 1.0 else 'NOT met'}")
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # a correction job still running in the worker
            proc.kill()
            proc.wait(10)
        ls.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
