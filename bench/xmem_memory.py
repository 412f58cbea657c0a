"""Memory use of the XMem engine over a long video: RSS and memory elements stay bounded.

    .venv/bin/python bench/xmem_memory.py [--frames 5000] [--height 96 --width 160] [--checkpoint PATH]

A synthetic video (a textured background panning, an object moving on it) at reduced resolution
with no resize (size -1), long-term memory on with the official settings (mem_every 5, 5..10
working frames, 128 prototypes, 10000 long-term elements). Prints, every 500 frames, the process
RSS (VmRSS from /proc/self/status) and the number of memory elements (working + long-term).
Random official-layout weights unless --checkpoint is given.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lazyxmem_core.xmem import XMemConfig, XMemPropagator
from lazyxmem_core.xmem.model import XMemNet
from lazyxmem_core.xmem.random_weights import random_state_dict


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=5000)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--checkpoint")
    ap.add_argument("--max-long-term-elements", type=int, default=10000,
                    help="official 10000 fills long-term memory by about frame 2000; a smaller cap fills it sooner")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    h, w = a.height, a.width
    cfg = XMemConfig(size=-1, max_long_term_elements=a.max_long_term_elements)
    if a.checkpoint:
        prop = XMemPropagator.from_checkpoint(a.checkpoint, device="cpu", config=cfg)
    else:
        prop = XMemPropagator(XMemNet.from_state_dict(random_state_dict(0)), cfg)
    prop.video_length = a.frames
    rng = np.random.default_rng(0)
    pano = cv2.resize(rng.integers(0, 255, (h // 8, 4 * w // 8, 3), dtype=np.uint8), (4 * w, h),
                      interpolation=cv2.INTER_CUBIC)
    print(f"{a.frames} frames {w}x{h} (size -1), long-term on: mem_every {cfg.mem_every}, working "
          f"{cfg.min_mid_term_frames}..{cfg.max_mid_term_frames} frames, {cfg.num_prototypes} prototypes, "
          f"max {cfg.max_long_term_elements} long-term elements; {(h + 15) // 16 * ((w + 15) // 16)} elements per memory frame")
    print(f"{'frame':>6} {'RSS MB':>8} {'elements':>9} {'working':>8} {'long':>6} {'ms/frame':>9}")
    t0 = time.perf_counter()
    for t in range(a.frames):
        x = int((np.sin(t / 50) + 1) * 1.4 * w)  # pan back and forth: the object's look keeps changing
        frame = np.ascontiguousarray(pano[:, x:x + w])
        cy, cx = h // 2 + int(h / 4 * np.sin(t / 17)), w // 2 + int(w / 4 * np.cos(t / 23))
        cv2.circle(frame, (cx, cy), h // 6, (220, 40, 40), -1)
        given = None
        if t == 0:
            given = np.zeros((h, w), np.uint8)
            cv2.circle(given, (cx, cy), h // 6, 1, -1)
        prop.step(frame, given)
        prop.commit()
        if (t + 1) % a.every == 0:
            mem = prop._core.memory
            ms = (time.perf_counter() - t0) / a.every * 1000
            print(f"{t + 1:6d} {rss_mb():8.0f} {prop.memory_elements:9d} {mem.work.size:8d} {mem.long.size:6d} {ms:9.1f}",
                  flush=True)
            t0 = time.perf_counter()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
