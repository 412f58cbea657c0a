"""Throughput of the job queue with 1 and 2 workers, side by side in one run.

A real redis-server, `lazyxmem worker` processes on the embedded engine, and image-sequence tasks
made of real DAVIS-2016 frames (854x480) with their first-frame masks, served by a local stand-in
for Label Studio that also receives the predictions. For each worker count: start the workers,
wait until they are registered and warmed up, enqueue every task, time until the last job is done.
Reports frames per second over all jobs and the 2-worker / 1-worker ratio (repeats: medians).

    .venv/bin/python bench/queue_throughput.py [--tasks 6] [--frames 40] [--repeats 1]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from label_studio_sdk.converter.brush import mask2rle  # noqa: E402

from backend.jobs import JobSpec, RedisQueue  # noqa: E402
from fake_ls import TOKEN, FakeLabelStudio, serve  # noqa: E402

CONFIG = (ROOT / "backend" / "configs" / "image_sequence.xml").read_text()


def image_tasks(data: Path, n_tasks: int, n_frames: int) -> list[dict]:
    tasks = []
    for i, seq in enumerate(sorted(p for p in data.iterdir() if (p / "frames").is_dir())[:n_tasks]):
        frames = sorted((seq / "frames").glob("*.jpg"))[:n_frames]
        urls = []
        for f in frames:
            key = f"/data/upload/bench/{seq.name}/{f.name}"
            FakeLabelStudio.files[key] = f.read_bytes()
            urls.append(key)
        mask = cv2.imread(str(sorted((seq / "masks").glob("*.png"))[0]), cv2.IMREAD_GRAYSCALE) > 0
        h, w = mask.shape
        region = {"id": "m1", "from_name": "mask", "to_name": "frames", "type": "brushlabels", "item_index": 0,
                  "original_width": w, "original_height": h,
                  "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": ["Object"]}}
        tasks.append({"id": 1 + i, "data": {"frames": urls}, "annotations": [{"id": 100 + i, "result": [region]}]})
    return tasks


def run(redis_url: str, env: dict, tasks: list[dict], n_workers: int, tag: str, log_dir: Path) -> float:
    queue = RedisQueue(redis_url)
    queue.redis.flushdb()
    procs = [subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--name", f"{tag}-w{i}"],
                              env=env, cwd=ROOT, stdout=open(log_dir / f"{tag}-w{i}.log", "wb"),
                              stderr=subprocess.STDOUT) for i in range(n_workers)]
    try:
        from rq import Worker

        deadline = time.time() + 120
        while len(Worker.all(connection=queue.redis)) < n_workers:
            if time.time() > deadline:
                raise SystemExit("workers did not start: see " + str(log_dir))
            time.sleep(0.2)
        frames = sum(len(t["data"]["frames"]) for t in tasks)
        t0 = time.perf_counter()
        ids = [queue.submit(JobSpec("propagate", t, CONFIG, f"bench-{tag}"), len(t["data"]["frames"])) for t in tasks]
        while True:
            states = [queue.status(j) for j in ids]
            if all(s and s["status"] in ("finished", "failed") for s in states):
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        failed = [s for s in states if s["status"] == "failed"]
        if failed:
            raise SystemExit(f"{len(failed)} job(s) failed: {failed[0]['error']}")
        return frames / wall
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


def main() -> None:
    default = Path(os.environ.get("LAZYXMEM_DATA", ROOT.parent / "shared" / "data")) / "davis2016"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default)
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--frames", type=int, default=40, help="frames per task")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    exe = shutil.which("redis-server")
    if not exe:
        raise SystemExit("redis-server is missing: `make test` (sysdeps) installs it")
    tmp = Path(tempfile.mkdtemp(prefix="lazyxmem-queue-bench-"))
    port = 6400 + os.getpid() % 500
    redis = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    server, ls_url = serve()
    try:
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{port}/0"
        tasks = image_tasks(args.data, args.tasks, args.frames)
        env = {**os.environ, "REDIS_URL": url, "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN,
               "LAZYXMEM_ENGINE": "embedded", "LAZYXMEM_REFINER": "embedded", "CACHE_DIR": str(tmp / "cache"),
               "PYTHONPATH": str(ROOT)}
        fps: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.repeats):
            for n in (1, 2):
                fps[n].append(run(url, env, tasks, n, f"r{r}-n{n}", tmp))
                print(f"repeat {r}: {n} worker(s): {fps[n][-1]:.2f} frames/s", flush=True)
        one, two = statistics.median(fps[1]), statistics.median(fps[2])
        print(f"\n{len(tasks)} tasks x {args.frames} frames at 854x480, embedded engine, {os.cpu_count()} CPU cores")
        print("| workers | frames/s |\n|---|---|")
        print(f"| 1 | {one:.2f} |\n| 2 | {two:.2f} |")
        print(f"ratio 2/1: {two / one:.2f}")
    finally:
        server.shutdown()
        redis.terminate()


if __name__ == "__main__":
    main()
