"""Memory a Lazy session keeps for deferred corrections over a long video, with and without the
``max_snapshots`` cap, side by side in one run.

    .venv/bin/python bench/session_memory.py [--engine xmem|embedded] [--frames 1500]
        [--height 96 --width 160] [--cap 32] [--max-long-term-elements 10000]

Two sessions step through the same synthetic video (a textured background panning, an object
moving on it) in lockstep: one with the cap, one without. Every 10 % of the video it prints, per
session, the propagator states kept and the bytes they hold (every distinct tensor and array
counted once: XMem's states share the tensors they have in common), and the bytes of the
per-frame output masks as the session keeps them (packed) and as they would be raw. At the end
one correction in the middle of the video is applied to both and the frames each replays are
timed.

XMem runs with random official-layout weights (no download) at ``--height x --width`` without
resizing. Random weights are uncertain everywhere, so the UDU veto would keep every frame out of
memory; it is off here, so memory is written every 5 frames as a trained model's would be.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lazyxmem_core import Correction, LazyConfig, LazySession  # noqa: E402


class SyntheticVideo:
    """A panning textured background with a red disc moving on it (frames made on demand)."""

    def __init__(self, n: int, h: int, w: int) -> None:
        rng = np.random.default_rng(0)
        self.n, self.h, self.w = n, h, w
        self.pano = cv2.resize(rng.integers(0, 255, (h // 8, 4 * w // 8, 3), dtype=np.uint8), (4 * w, h),
                               interpolation=cv2.INTER_CUBIC)

    def disc(self, t: int) -> tuple[int, int, int]:
        h, w = self.h, self.w
        return w // 2 + int(w / 4 * np.cos(t / 23)), h // 2 + int(h / 4 * np.sin(t / 17)), h // 6

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, t: int) -> np.ndarray:
        x = int((np.sin(t / 50) + 1) * 1.4 * self.w)
        frame = np.ascontiguousarray(self.pano[:, x:x + self.w])
        cx, cy, r = self.disc(t)
        cv2.circle(frame, (cx, cy), r, (220, 40, 40), -1)
        return frame


def held_bytes(obj: Any, seen: dict[int, int] | None = None) -> dict[int, int]:
    """{buffer id: bytes} of every tensor and array reachable from ``obj`` (shared ones once)."""
    seen = {} if seen is None else seen
    stack, visited = [obj], set()
    while stack:
        o = stack.pop()
        if id(o) in visited:
            continue
        visited.add(id(o))
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif isinstance(o, np.ndarray):
            base = o
            while isinstance(base.base, np.ndarray):
                base = base.base
            seen[id(base)] = base.nbytes
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            stack.extend(vars(o).values())
    return seen


def propagator(engine: str, frames: int, long_term: int) -> Any:
    if engine == "embedded":
        from lazyxmem_core.embedded import EmbeddedPropagator

        return EmbeddedPropagator()
    from lazyxmem_core.xmem import XMemConfig, XMemPropagator
    from lazyxmem_core.xmem.model import XMemNet
    from lazyxmem_core.xmem.random_weights import random_state_dict

    prop = XMemPropagator(XMemNet.from_state_dict(random_state_dict(0)), XMemConfig(size=-1, max_long_term_elements=long_term))
    prop.video_length = frames
    return prop


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("xmem", "embedded"), default="xmem")
    ap.add_argument("--frames", type=int, default=1500)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--cap", type=int, default=LazyConfig().max_snapshots)
    ap.add_argument("--max-long-term-elements", type=int, default=10000,
                    help="XMem's long-term cap; each kept state grows until long-term memory is full, "
                         "which a smaller cap reaches sooner")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    video = SyntheticVideo(a.frames, a.height, a.width)
    given = np.zeros((a.height, a.width), np.uint8)
    cx, cy, r = video.disc(0)
    cv2.circle(given, (cx, cy), r, 1, -1)
    caps = {"capped": a.cap, "uncapped": 10 ** 9}
    sessions = {name: LazySession(propagator(a.engine, a.frames, a.max_long_term_elements), video, {0: given},
                                  config=LazyConfig(pseudo=False, udu=False, max_snapshots=cap))
                for name, cap in caps.items()}
    print(f"{a.engine}, {a.frames} frames {a.width}x{a.height}, a state kept every "
          f"{LazyConfig().snapshot_every} frames; capped: at most {a.cap}")
    print(f"{'frame':>6} | {'capped: states':>15} {'MB':>7} | {'uncapped: states':>17} {'MB':>7} | "
          f"{'masks MB':>8} {'raw MB':>8}")
    step = max(1, a.frames // 10)
    for end in range(step, a.frames + 1, step):
        row = []
        for s in sessions.values():
            s.run(until=end)
            row.append((len(s._snapshots), sum(held_bytes([st for st, _ in s._snapshots.values()]).values()) / 2**20))
        recs = sessions["capped"].records.values()
        packed = sum(len(rec.packed.data) for rec in recs) / 2**20
        raw = sum(int(np.prod(rec.packed.shape)) * np.dtype(rec.packed.dtype).itemsize for rec in recs) / 2**20
        print(f"{end:6d} | {row[0][0]:15d} {row[0][1]:7.1f} | {row[1][0]:17d} {row[1][1]:7.1f} | "
              f"{packed:8.2f} {raw:8.1f}", flush=True)
    t = a.frames // 2 + 3
    fix = np.zeros_like(given, bool)
    cx, cy, r = video.disc(t)
    cv2.circle(fix.view(np.uint8), (cx, cy), r, 1, -1)
    for name, s in sessions.items():
        t0 = time.perf_counter()
        resume = s.correct({(t, 1): Correction(mask=fix)})
        print(f"correction on frame {t}, {name}: resumed at frame {resume}, {a.frames - resume} frames "
              f"re-propagated in {time.perf_counter() - t0:.1f} s", flush=True)
    same = all((sessions["capped"].records[u].mask == sessions["uncapped"].records[u].mask).all()
               for u in range(a.frames))
    print(f"masks after the correction identical in both sessions: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
