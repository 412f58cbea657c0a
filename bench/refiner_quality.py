"""How much a refiner repairs a corrupted mask given one simulated click (DAVIS 2016 frames).

For sampled frames: corrupt the ground truth (erode, shift, cut a part, add a false-positive
blob), give the refiner the corrupted prior and one click from a simulated user (metrics.md:
"tp" = GT interior point, positive; "error" = interior point of the largest error region,
positive on a false negative, negative on a false positive), and compare IoU before / after.
Also: a click with no prior, and the GT box with no prior.

    LAZYXMEM_DATA=../shared/data python bench/refiner_quality.py --step 15
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lazyxmem_core.embedded.refiner import GrabCutRefiner  # noqa: E402
from lazyxmem_core.types import Box, Click  # noqa: E402


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return 1.0 if u == 0 else float(np.logical_and(a, b).sum() / u)


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    d = cv2.distanceTransform(np.pad(mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(x), int(y)


def tp_click(gt: np.ndarray) -> Click:
    x, y = interior_point(gt)
    return Click(x, y, True)


def error_click(prior: np.ndarray, gt: np.ndarray) -> Click | None:
    best = None
    for err, positive in ((gt & ~prior, True), (prior & ~gt, False)):
        n, lab, stats, _ = cv2.connectedComponentsWithStats(err.astype(np.uint8), connectivity=8)
        if n > 1:
            k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            if best is None or stats[k, cv2.CC_STAT_AREA] > best[0]:
                best = (stats[k, cv2.CC_STAT_AREA], lab == k, positive)
    if best is None:
        return None
    x, y = interior_point(best[1])
    return Click(x, y, best[2])


def corrupt(gt: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    s = math.sqrt(gt.sum())
    m = gt.astype(np.uint8)
    if kind == "erode":
        k = max(3, int(0.12 * s)) | 1
        return cv2.erode(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))).astype(bool)
    if kind == "shift":
        a = rng.uniform(0, 2 * math.pi)
        d = 0.15 * s
        mat = np.float32([[1, 0, d * math.cos(a)], [0, 1, d * math.sin(a)]])
        return cv2.warpAffine(m, mat, (gt.shape[1], gt.shape[0]), flags=cv2.INTER_NEAREST).astype(bool)
    ys, xs = np.nonzero(gt)
    if kind == "cut":  # drop the part beyond a random line: about 30 % of the object
        a = rng.uniform(0, 2 * math.pi)
        proj = xs * math.cos(a) + ys * math.sin(a)
        thr = np.quantile(proj, 0.7)
        out = gt.copy()
        sel = proj > thr
        out[ys[sel], xs[sel]] = False
        return out
    if kind == "blob":  # a false-positive disc beside the object
        r = max(4, int(0.3 * s))
        dist = cv2.distanceTransform((~gt).astype(np.uint8), cv2.DIST_L2, 5)
        ring = np.argwhere((dist > r + 2) & (dist < r + 0.5 * s))
        out = gt.copy().astype(np.uint8)
        if len(ring):
            y, x = ring[rng.integers(len(ring))]
            cv2.circle(out, (int(x), int(y)), r, 1, -1)
        return out.astype(bool)
    raise ValueError(kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("LAZYXMEM_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--step", type=int, default=15, help="every step-th frame of each sequence")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    rng = np.random.default_rng(args.seed)
    ref = GrabCutRefiner()
    rows: dict[str, list[tuple[float, float, float]]] = {}

    def run(name: str, frame, gt, prior, clicks=(), box=None, fid=None) -> None:
        t = time.perf_counter()
        out = ref.refine(frame, clicks, box=box, prior=prior, frame_id=fid)
        dt = time.perf_counter() - t
        before = iou(prior, gt) if prior is not None else float("nan")
        rows.setdefault(name, []).append((before, iou(out, gt), dt))

    seqs = sorted(p for p in (Path(args.data) / "davis2016").iterdir() if p.is_dir())
    for seq in seqs:
        frames = sorted((seq / "frames").glob("*.jpg"))
        for fp in frames[::args.step]:
            gt = cv2.imread(str(seq / "masks" / (fp.stem + ".png")), cv2.IMREAD_GRAYSCALE) > 127
            if gt.sum() < 100:
                continue
            frame = cv2.cvtColor(cv2.imread(str(fp)), cv2.COLOR_BGR2RGB)
            fid = (seq.name, fp.stem)
            for kind in ("erode", "shift", "cut", "blob"):
                prior = corrupt(gt, kind, rng)
                run(f"{kind:5s} + tp click", frame, gt, prior, [tp_click(gt)], fid=fid)
                ec = error_click(prior, gt)
                if ec is not None:
                    sign = "+" if ec.positive else "-"
                    run(f"{kind:5s} + error click ({sign})", frame, gt, prior, [ec], fid=fid)
            run("no prior + tp click", frame, gt, None, [tp_click(gt)], fid=fid)
            ys, xs = np.nonzero(gt)
            run("no prior + GT box", frame, gt, None, box=Box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), fid=fid)

    print(f"{'case':28s} {'n':>4s} {'IoU prior':>9s} {'IoU refined':>11s} {'ms mean':>8s} {'ms p95':>7s}")
    all_t = []
    for name in sorted(rows):
        r = np.array(rows[name])
        all_t.extend(r[:, 2])
        print(f"{name:28s} {len(r):4d} {np.nanmean(r[:, 0]) if not np.isnan(r[:, 0]).all() else float('nan'):9.3f} "
              f"{r[:, 1].mean():11.3f} {1000 * r[:, 2].mean():8.1f} {1000 * np.percentile(r[:, 2], 95):7.1f}")
    print(f"all calls: {len(all_t)}, mean {1000 * np.mean(all_t):.1f} ms, max {1000 * np.max(all_t):.1f} ms")


if __name__ == "__main__":
    main()
