"""How much the embedded refiner repairs a *propagated* mask from one TP click (DAVIS 2016).

This is the situation of a user correction in the Lazy controller: the embedded propagator
runs with only the first-frame mask; on frames where its mask is poor (IoU < ``--below``) the
TP robot clicks the GT interior point, and the refiner gets that click, ``prior`` = the
propagated mask and ``reference`` = (frame 0, GT mask 0). Reports mean IoU of the prior and of
the refined mask (overall and per sequence) and milliseconds per call.

Propagated masks are cached (``--cache``, one .npz per sequence) since propagation dominates.

    LAZYXMEM_DATA=../shared/data python bench/refiner_user_click.py
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
from lazyxmem_core.embedded import EmbeddedPropagator, GrabCutRefiner  # noqa: E402
from lazyxmem_core.robot import tp_click  # noqa: E402


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.count_nonzero(a | b)
    return 1.0 if u == 0 else np.count_nonzero(a & b) / u


def load_sequence(seq_dir: Path) -> tuple[list[Path], list[np.ndarray]]:
    frames = sorted((seq_dir / "frames").glob("*.jpg"))
    masks = [cv2.imread(str(seq_dir / "masks" / (f.stem + ".png")), cv2.IMREAD_GRAYSCALE) > 127 for f in frames]
    return frames, masks


def rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def propagated(seq_dir: Path, cache: Path) -> np.ndarray:
    """(T, H, W) bool masks of the embedded propagator given only frame 0's GT (cached)."""
    out = cache / f"{seq_dir.name}.npz"
    if out.exists():
        return np.load(out)["pred"]
    frames, masks = load_sequence(seq_dir)
    prop = EmbeddedPropagator()
    preds = []
    for t, f in enumerate(frames):
        probs = prop.step(rgb(f), given=masks[0].astype(np.uint8) if t == 0 else None)
        prop.commit()
        preds.append(np.argmax(probs, 0) == 1)
    pred = np.stack(preds)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, pred=pred)
    return pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("LAZYXMEM_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--cache", default="/tmp/refiner_user_click_cache")
    ap.add_argument("--below", type=float, default=0.8, help="only frames whose prior IoU is below this")
    ap.add_argument("--per-seq", type=int, default=8, help="frames sampled per sequence")
    ap.add_argument("--no-reference", action="store_true", help="call the refiner without the reference")
    args = ap.parse_args()
    cv2.setNumThreads(1)

    root = Path(args.data)
    root = root / "davis2016" if (root / "davis2016").is_dir() else root
    seqs = sorted(p for p in root.iterdir() if (p / "frames").is_dir())
    if not seqs:
        raise SystemExit(f"no sequences under {root}: set LAZYXMEM_DATA or --data")
    refiner = GrabCutRefiner()
    rows, times = [], []
    for seq in seqs:
        frames, masks = load_sequence(seq)
        pred = propagated(seq, Path(args.cache))
        bad = [t for t in range(1, len(frames)) if iou(pred[t], masks[t]) < args.below and masks[t].any()]
        # Evenly spaced sample of the poor frames: deterministic and spread over the video.
        pick = [bad[int(i)] for i in np.linspace(0, len(bad) - 1, min(args.per_seq, len(bad)))] if bad else []
        reference = (rgb(frames[0]), masks[0])
        before, after = [], []
        for t in pick:
            frame = rgb(frames[t])
            click = tp_click(masks[t], pred[t])
            t0 = time.perf_counter()
            out = refiner.refine(frame, clicks=[click], prior=pred[t], frame_id=(seq.name, t),
                                 reference=None if args.no_reference else reference)
            times.append(time.perf_counter() - t0)
            before.append(iou(pred[t], masks[t]))
            after.append(iou(out, masks[t]))
        rows.append((seq.name, len(pick), before, after))
        if pick:
            print(f"{seq.name:16s} n={len(pick):2d}  prior {np.mean(before):.3f}  refined {np.mean(after):.3f}  "
                  + " ".join(f"{a:.2f}>{b:.2f}" for a, b in zip(before, after)), flush=True)
    allb = [v for r in rows for v in r[2]]
    alla = [v for r in rows for v in r[3]]
    print(f"ALL n={len(allb)}  prior IoU {np.mean(allb):.3f}  refined IoU {np.mean(alla):.3f}  "
          f"{1000 * np.mean(times):.0f} ms/call (max {1000 * np.max(times):.0f})")


if __name__ == "__main__":
    main()
