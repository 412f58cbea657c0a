"""Disk size and read time of a video's frame store, raw against JPEG-compressed, side by side.

    LAZYXMEM_DATA=../shared/data .venv/bin/python bench/frame_store.py [--sequence dog] [--repeat 3]

Writes the DAVIS sequence as a video (MJPG in AVI: OpenCV writes it everywhere) at its own size
and upscaled to 1920x1080, opens each with ``VideoFrames`` twice (raw store, and compressed by a
``raw_limit_mb`` of 0), and prints bytes on disk per frame, the median time to read a frame in
order (raw: a memory-mapped copy; compressed: a JPEG decode) and the mean absolute difference of
the compressed frames from the raw ones.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lazyxmem_core.media import FrameDir, VideoFrames  # noqa: E402


def write_video(frames: FrameDir, path: Path, size: tuple[int, int] | None) -> None:
    h, w = frames[0].shape[:2]
    out_wh = size or (w, h)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, out_wh)
    for f in frames:
        bgr = cv2.cvtColor(f, cv2.COLOR_RGB2BGR)
        writer.write(cv2.resize(bgr, out_wh, interpolation=cv2.INTER_CUBIC) if size else bgr)
    writer.release()


def read_ms(store: VideoFrames, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        for t in range(len(store)):
            store._cache.clear()  # time the decode, not the cache (the raw store has none)
            t0 = time.perf_counter()
            np.asarray(store[t]).sum(dtype=np.int64)  # touch every pixel: a memmap read is lazy
            times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("LAZYXMEM_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--sequence", default="dog")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    cv2.setNumThreads(1)
    root = Path(a.data)
    root = root / "davis2016" if (root / "davis2016").is_dir() else root
    frames = FrameDir(root / a.sequence / "frames")
    print(f"{a.sequence}: {len(frames)} frames; median ms to read one frame, {a.repeat} passes")
    print(f"{'size':>10} | {'raw KB/frame':>12} {'ms':>6} | {'JPEG KB/frame':>13} {'ms':>6} | {'mean abs diff':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in (None, (1920, 1080)):
            path = Path(tmp) / "v.avi"
            write_video(frames, path, size)
            raw, jpeg = VideoFrames(path), VideoFrames(path, raw_limit_mb=0)
            assert not raw.compressed and jpeg.compressed
            diff = np.mean([np.abs(jpeg[t].astype(np.int16) - raw[t]).mean() for t in range(len(raw))])
            h, w = raw[0].shape[:2]
            n = len(raw)
            print(f"{f'{w}x{h}':>10} | {raw.stored_bytes / n / 1024:12.0f} {read_ms(raw, a.repeat):6.2f} | "
                  f"{jpeg.stored_bytes / n / 1024:13.0f} {read_ms(jpeg, a.repeat):6.2f} | {diff:13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
