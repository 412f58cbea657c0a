"""Speed of propagation plus the Lazy layer (S, F, triggers) for one object at 854x480.

    python bench/lazy_speed.py [--seqs camel,car-shadow] [--threads 2] [--repeat 2]

Runs the embedded engine under its shipped Lazy configuration in deferred mode (requests become
review frames, nobody answers them: the cost a task pays before any correction) and without the
Lazy layer (LazyConfig.off()), frames decoded up front. Reports per sequence the best of
--repeat runs: wall-clock fps, and frames per process CPU second (the speed on one idle core:
a lower bound on what 2 idle cores give, which a shared machine's wall clock does not show),
with the 1-minute load average before each run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from composites import default_data  # noqa: E402

from lazyxmem_core.embedded import EmbeddedPropagator  # noqa: E402
from lazyxmem_core.engines import EngineSettings, lazy_config  # noqa: E402
from lazyxmem_core.evaluation import EvalSequence  # noqa: E402
from lazyxmem_core.lazy import LazyConfig, LazySession  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data()))
    p.add_argument("--seqs", default="camel,car-shadow")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    cv2.setNumThreads(a.threads)
    settings = EngineSettings(engine="embedded", refiner="embedded")
    configs = {"propagation only": LazyConfig.off(), "with the Lazy layer": lazy_config(settings)}
    for name in a.seqs.split(","):
        seq = EvalSequence.load(Path(a.data) / "davis2016" / name)
        frames = [seq.frames[i] for i in range(len(seq.frames))]
        h, w = frames[0].shape[:2]
        for label, config in configs.items():
            best = None
            for _ in range(a.repeat):
                load = os.getloadavg()[0]
                session = LazySession(EmbeddedPropagator(), frames, seq.initial_masks(), config=config)
                w0, c0 = time.perf_counter(), time.process_time()
                session.run()
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                n = len(frames)
                run = (n / wall, n / cpu, load)
                best = run if best is None or run[0] > best[0] else best
            print(f"{name} {w}x{h} {label}: {best[0]:.1f} fps wall clock, {best[1]:.1f} frames per CPU second "
                  f"({a.threads} OpenCV threads, load average {best[2]:.1f} before)", flush=True)


if __name__ == "__main__":
    main()
