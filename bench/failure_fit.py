"""Fit the failure score's weights by cross-validation, and report Spearman for S and for S + F.

    python bench/failure_fit.py [--data DIR] [--composites DIR] [--engine embedded] [--out runs/failure_fit]

Runs every development sequence (davis2016/) and composite (bench/composites.py) without
interaction, records per object-frame S, the failure figures (lazyxmem_core/failure.py) and the
error 1 - IoU, then for each fold of ``composites.FOLDS`` fits non-negative weights on the other
fold (coordinate ascent of the pooled Spearman of S + w.f on a grid) and scores this fold with
them. Reported: pooled Spearman of S alone and of S + F under cross-validation (each sequence
scored with weights not fitted on it), on DAVIS and on the composites, per sequence, and the
weights fitted on everything (what ``failure.DEFAULT_WEIGHTS`` should hold).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from composites import build, default_data, fold_of  # noqa: E402

from lazyxmem_core.engines import EngineSettings  # noqa: E402
from lazyxmem_core.evaluation import EvalSequence, run_sequence, spearman  # noqa: E402
from lazyxmem_core.failure import FEATURES  # noqa: E402

GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def collect(folder: Path, settings: EngineSettings) -> list[dict]:
    """One row per object-frame with ground truth (given frames left out)."""
    seq = EvalSequence.load(folder)
    res = run_sequence(seq, "none", settings)
    rows = []
    for rec in res.records:
        if rec.given:
            continue
        for label, iou in res.ious.items():
            if label not in rec.objects or np.isnan(iou[rec.index]):
                continue
            figs = res.figures.get((rec.index, label), {})
            rows.append({"seq": seq.name, "t": rec.index, "label": label, "S": rec.objects[label].S,
                         "err": 1.0 - iou[rec.index], **figs})
    return rows


def score(rows: list[dict], w: dict[str, float]) -> np.ndarray:
    return np.array([r["S"] + sum(w[k] * r.get(k, 0.0) for k in w) for r in rows])


def rho(rows: list[dict], w: dict[str, float] | None) -> float:
    if not rows:
        return float("nan")
    s = score(rows, w) if w else np.array([r["S"] for r in rows])
    return spearman(list(zip(s, [r["err"] for r in rows])))


def fit(rows: list[dict], passes: int = 3) -> dict[str, float]:
    """Non-negative weights maximising the pooled Spearman of S + w.f on ``rows``."""
    w = {k: 0.0 for k in FEATURES}
    best = rho(rows, w)
    for _ in range(passes):
        changed = False
        for k in FEATURES:
            for v in GRID:
                trial = {**w, k: v}
                r = rho(rows, trial)
                if r > best + 1e-4:
                    best, w, changed = r, trial, True
        if not changed:
            break
    return w


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data()))
    p.add_argument("--composites", default=str(ROOT / "runs" / "composites"))
    p.add_argument("--engine", default="embedded")
    p.add_argument("--out", default=str(ROOT / "runs" / "failure_fit"))
    p.add_argument("--reuse", action="store_true", help="reuse the rows cached in --out")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "rows.json"
    if a.reuse and cache.is_file():
        rows = json.loads(cache.read_text())
    else:
        settings = EngineSettings(engine=a.engine, refiner="embedded")
        davis = sorted(p for p in (Path(a.data) / "davis2016").iterdir() if (p / "frames").is_dir())
        folders = davis + build(Path(a.data), Path(a.composites))
        rows = []
        for folder in folders:
            got = collect(folder, settings)
            print(f"{folder.name:45s} {len(got):4d} object-frames  Spearman S {rho(got, None):6.3f}", flush=True)
            rows += got
        cache.write_text(json.dumps(rows))
    for r in rows:
        r["fold"] = fold_of(r["seq"])
        r["kind"] = "composite" if r["seq"].startswith(("f0-", "f1-")) else "davis"
    # fitted[k]: weights fitted on the other fold, used to score fold k.
    fitted = {k: fit([r for r in rows if r["fold"] != k]) for k in (0, 1)}
    report: dict = {"weights_per_fold": fitted}
    lines = ["| material | object-frames | Spearman S | Spearman S + F (CV) |", "|---|---|---|---|"]
    for kind in ("davis", "composite"):
        sel = [r for r in rows if r["kind"] == kind]
        s_cv = np.array([score([r], fitted[r["fold"]])[0] for r in sel])
        r_cv = spearman(list(zip(s_cv, [r["err"] for r in sel])))
        r_s = rho(sel, None)
        report[kind] = {"spearman_S": r_s, "spearman_S_plus_F_cv": r_cv, "object_frames": len(sel)}
        lines.append(f"| {kind} | {len(sel)} | {r_s:.3f} | {r_cv:.3f} |")
    lines += ["", "| sequence | Spearman S | Spearman S + F (CV) |", "|---|---|---|"]
    report["sequences"] = {}
    for name in sorted({r["seq"] for r in rows}):
        sel = [r for r in rows if r["seq"] == name]
        r_s, r_f = rho(sel, None), rho(sel, fitted[sel[0]["fold"]])
        report["sequences"][name] = {"spearman_S": r_s, "spearman_S_plus_F_cv": r_f}
        lines.append(f"| {name} | {r_s:.3f} | {r_f:.3f} |")
    report["weights_all"] = fit(rows)
    lines += ["", f"weights per fold (fitted on the other): {fitted}", f"weights on all: {report['weights_all']}"]
    print("\n".join(lines))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
