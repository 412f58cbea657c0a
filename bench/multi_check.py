"""The multi-object development material (``$LAZYXMEM_DATA/multi``), without interaction.

    python bench/multi_check.py [--data DIR] [--engine embedded]

* ``caps``: two objects (the second appears on frame 33), ground truth on 5 frames: J&F there and
  the figures of S and of S + F on those object-frames.
* ``bmx-trees-2obj``: rider and bike given separately on the first frame of ``davis2016/bmx-trees``;
  only their union has ground truth on every frame, so the union is scored (J&F), and Spearman is
  taken between the objects' mean S (or S + F) and the union's error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from composites import default_data  # noqa: E402

from lazyxmem_core import metrics  # noqa: E402
from lazyxmem_core.engines import EngineSettings, build_propagator  # noqa: E402
from lazyxmem_core.evaluation import EvalSequence, error_pairs, run_sequence, spearman  # noqa: E402
from lazyxmem_core.lazy import LazyConfig, LazySession  # noqa: E402
from lazyxmem_core.media import FrameDir, read_index_mask  # noqa: E402


def caps(data: Path, settings: EngineSettings) -> str:
    seq = EvalSequence.load(data / "multi" / "caps")
    res = run_sequence(seq, "none", settings)
    jf = metrics.summarize(res.scores.values())["J&F"]
    return (f"caps: J&F {100 * jf:.1f} on {len(seq.gt)} annotated frames, "
            f"Spearman S {spearman(error_pairs([res], False)):.3f}, S+F {spearman(error_pairs([res], True)):.3f} "
            f"({len(error_pairs([res], False))} object-frames)")


def bmx_two_objects(data: Path, settings: EngineSettings) -> str:
    seq_dir = data / "davis2016" / "bmx-trees"
    frames = FrameDir(seq_dir / "frames")
    given = read_index_mask(data / "multi" / "bmx-trees-2obj" / "masks" / "00000.png")
    gts = [read_index_mask(p) > 0 for p in sorted((seq_dir / "masks").glob("*.png"))]
    session = LazySession(build_propagator(settings, video_length=len(frames)), frames, {0: given},
                          config=LazyConfig.off())
    records = session.run()
    preds = [(r.mask > 0).astype(np.uint8) for r in records]
    scores = metrics.score_sequence(preds, [g.astype(np.uint8) for g in gts], labels=[1])
    jf = metrics.summarize(scores.values())["J&F"]
    pairs_s, pairs_f = [], []
    for r, g in zip(records[1:], gts[1:]):
        err = 1.0 - metrics.jaccard(r.mask > 0, g)
        S = [o.S for o in r.objects.values()]
        F = [session.failure_scores.get(r.index, {}).get(v, 0.0) for v in r.objects]
        pairs_s.append((float(np.mean(S)), err))
        pairs_f.append((float(np.mean(np.add(S, F))), err))
    return (f"bmx-trees-2obj (union scored): J&F {100 * jf:.1f}, Spearman S {spearman(pairs_s):.3f}, "
            f"S+F {spearman(pairs_f):.3f} ({len(pairs_s)} frames)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data()))
    p.add_argument("--engine", default="embedded")
    a = p.parse_args()
    settings = EngineSettings(engine=a.engine, refiner="embedded")
    print(caps(Path(a.data), settings))
    print(bmx_two_objects(Path(a.data), settings))


if __name__ == "__main__":
    main()
