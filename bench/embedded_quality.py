"""Quality and speed of the embedded propagator alone on DAVIS 2016 (first-frame mask only).

Usage: python bench/embedded_quality.py [--seqs a,b] [--jf] [--threads 2]
Reads $LAZYXMEM_DATA/davis2016/<seq>/{frames,masks} (default ../shared/data beside the repo).
Prints per sequence J (mean IoU, first and last frame excluded), optionally F (boundary
F-measure) and the Spearman correlation of the Lazy controller's S_c with 1 - IoU, then the means
and the propagation speed (step + commit).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from scipy.stats import spearmanr
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lazyxmem_core.embedded import EmbeddedPropagator  # noqa: E402
from lazyxmem_core.metrics import f_measure, jaccard  # noqa: E402
from lazyxmem_core.uncertainty import object_uncertainty  # noqa: E402


def run_sequence(seq_dir: Path, jf: bool, **kw) -> dict:
    frames = sorted((seq_dir / "frames").glob("*.jpg"))
    masks = sorted((seq_dir / "masks").glob("*.png"))
    prop = EmbeddedPropagator(**kw)
    js, fs, ss, errs, secs = [], [], [], [], 0.0
    for i, (fp, mp) in enumerate(zip(frames, masks)):
        rgb = cv2.cvtColor(cv2.imread(str(fp)), cv2.COLOR_BGR2RGB)
        gt = cv2.imread(str(mp), cv2.IMREAD_GRAYSCALE) > 127
        t = time.perf_counter()
        probs = prop.step(rgb, gt.astype(np.uint8) if i == 0 else None)
        prop.commit()
        secs += time.perf_counter() - t
        if i == 0 or i == len(frames) - 1:
            continue
        pred = probs.argmax(axis=0) == 1
        j = jaccard(pred, gt)
        js.append(j)
        if jf:
            fs.append(f_measure(pred, gt))
            ss.append(object_uncertainty(probs, pred).S)
            errs.append(1.0 - j)
    return {"J": float(np.mean(js)), "F": float(np.mean(fs)) if fs else float("nan"),
            "S": ss, "err": errs, "frames": len(frames), "secs": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="", help="comma-separated subset of sequences")
    ap.add_argument("--jf", action="store_true", help="also boundary F and Spearman(S_c, 1-IoU)")
    ap.add_argument("--threads", type=int, default=2, help="OpenCV threads (the target machine has 2 cores)")
    args = ap.parse_args()
    cv2.setNumThreads(args.threads)
    data = Path(os.environ.get("LAZYXMEM_DATA", ROOT.parent / "shared" / "data")) / "davis2016"
    if not data.is_dir():
        sys.exit(f"no DAVIS 2016 data at {data}: set LAZYXMEM_DATA to the folder holding davis2016/")
    seqs = args.seqs.split(",") if args.seqs else sorted(p.name for p in data.iterdir() if p.is_dir())
    res = {}
    for seq in tqdm(seqs, desc="sequences"):
        res[seq] = run_sequence(data / seq, args.jf)
    for seq, r in res.items():
        extra = f"  F {100 * r['F']:5.1f}" if args.jf else ""
        print(f"{seq:16s} J {100 * r['J']:5.1f}{extra}  {r['frames'] / r['secs']:5.1f} fps")
    mj = np.mean([r["J"] for r in res.values()])
    fps = sum(r["frames"] for r in res.values()) / sum(r["secs"] for r in res.values())
    line = f"{'mean':16s} J {100 * mj:5.1f}"
    if args.jf:
        mf = np.mean([r["F"] for r in res.values()])
        rho = spearmanr(sum((r["S"] for r in res.values()), []), sum((r["err"] for r in res.values()), [])).statistic
        line += f"  F {100 * mf:5.1f}  J&F {50 * (mj + mf):5.1f}  Spearman(S,1-IoU) {rho:.3f}"
    print(line + f"  {fps:.1f} fps (step+commit, {args.threads} threads)")


if __name__ == "__main__":
    main()
