"""Cross-validated choice of the embedded propagator's parameters (no interaction).

    python bench/embedded_cv.py [--data DIR] [--composites DIR] [--grid NAME,...] [--out runs/embedded_cv]

Runs each candidate of ``GRID`` on every development sequence (davis2016/) and composite
(bench/composites.py) without interaction, then for each fold of ``composites.FOLDS`` picks the
candidate with the best mean J&F on the *other* fold's DAVIS sequences, among those whose pooled
Spearman(S + F, 1 - IoU) there stays >= 0.4 (a propagator whose uncertainty stops predicting its
errors is no use to the Lazy trigger), and scores this fold with it. Reported: each candidate's
figures per fold, the picks, and J&F / Spearman under cross-validation (every sequence scored with
parameters not chosen on it). Results are cached per candidate in --out, so a rerun only adds
what is new.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from composites import build, default_data, fold_of  # noqa: E402

from lazyxmem_core import metrics  # noqa: E402
from lazyxmem_core.embedded import EmbeddedPropagator  # noqa: E402
from lazyxmem_core.evaluation import EvalSequence, _score, error_pairs, spearman  # noqa: E402
from lazyxmem_core.lazy import LazyConfig, LazySession  # noqa: E402

# Candidates: the previous defaults (floor_logit -4) and one change at a time from them (a small
# grid: two folds of five sequences cannot choose among many without fitting noise). Every
# candidate names its floor, so the grid means the same whatever the current defaults are.
BASE = {"floor_logit": -4.0}
GRID: dict[str, dict] = {
    "previous": BASE,
    "floor-2.5": {"floor_logit": -2.5},
    "floor-6": {"floor_logit": -6.0},
    "beta1.0": {**BASE, "beta": 1.0},
    "beta0.5": {**BASE, "beta": 0.5},
    "sigma3": {**BASE, "sigma": 3.0},
    "gamma0": {**BASE, "gamma": 0.0},
    "mem10": {**BASE, "mem_every": 10},
    "prior100": {**BASE, "prior_count": 100.0},
    "prior10": {**BASE, "prior_count": 10.0},
    "anchor0.9": {**BASE, "anchor_weight": 0.9},
}


def run(folder: Path, params: dict) -> dict:
    seq = EvalSequence.load(folder)
    session = LazySession(EmbeddedPropagator(**params), seq.frames, seq.initial_masks(), config=LazyConfig.off())
    t0 = time.perf_counter()
    records = session.run()
    res = _score(seq, records, time.perf_counter() - t0, session.failure_scores)
    return {"J&F": metrics.summarize(res.scores.values())["J&F"], "fps": len(records) / res.seconds,
            "pairs_S": error_pairs([res], combined=False), "pairs_F": error_pairs([res], combined=True)}


def pooled(results: dict, names: list[str], key: str) -> float:
    return spearman([p for n in names for p in results[n][key]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data()))
    p.add_argument("--composites", default=str(ROOT / "runs" / "composites"))
    p.add_argument("--grid", default="previous,floor-2.5,beta1.0,sigma3,prior100,anchor0.9,prior10",
                   help=f"candidates, from: {', '.join(GRID)}")
    p.add_argument("--out", default=str(ROOT / "runs" / "embedded_cv"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    davis = sorted(q for q in (Path(a.data) / "davis2016").iterdir() if (q / "frames").is_dir())
    folders = davis + build(Path(a.data), Path(a.composites))
    kind = {f.name: ("davis" if f in davis else "composite") for f in folders}
    fold = {f.name: fold_of(f.name) for f in folders}
    table: dict[str, dict] = {}
    for name in a.grid.split(","):
        cache = out / f"{name}.json"
        if cache.is_file() and json.loads(cache.read_text()).get("params") == GRID[name]:
            table[name] = json.loads(cache.read_text())["results"]
        else:
            table[name] = {}
            for f in folders:
                table[name][f.name] = run(f, GRID[name])
                print(f"{name:12s} {f.name:45s} J&F {100 * table[name][f.name]['J&F']:5.1f} "
                      f"{table[name][f.name]['fps']:5.1f} fps", flush=True)
            cache.write_text(json.dumps({"params": GRID[name], "results": table[name]}))

    def names_of(k: int, what: str) -> list[str]:
        return [n for n in fold if fold[n] == k and kind[n] == what]

    lines = ["| candidate | J&F dev f0 | J&F dev f1 | J&F dev | J&F comp | Sp S dev | Sp S+F dev | Sp S comp | Sp S+F comp | fps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c, res in table.items():
        jf = {(k, w): np.mean([res[n]["J&F"] for n in names_of(k, w)]) for k in (0, 1) for w in ("davis", "composite")}
        dev = [n for n in res if kind[n] == "davis"]
        comp = [n for n in res if kind[n] == "composite"]
        lines.append(f"| {c} | {100 * jf[0, 'davis']:.1f} | {100 * jf[1, 'davis']:.1f} | "
                     f"{100 * np.mean([res[n]['J&F'] for n in dev]):.1f} | {100 * np.mean([res[n]['J&F'] for n in comp]):.1f} | "
                     f"{pooled(res, dev, 'pairs_S'):.3f} | {pooled(res, dev, 'pairs_F'):.3f} | "
                     f"{pooled(res, comp, 'pairs_S'):.3f} | {pooled(res, comp, 'pairs_F'):.3f} | "
                     f"{np.mean([res[n]['fps'] for n in res]):.1f} |")
    picks = {}
    for k in (0, 1):
        train = names_of(1 - k, "davis")
        ok = [c for c in table if pooled(table[c], train, "pairs_F") >= 0.4] or list(table)
        picks[k] = max(ok, key=lambda c: np.mean([table[c][n]["J&F"] for n in train]))
    cv = {n: table[picks[fold[n]]][n] for n in fold}
    dev = [n for n in cv if kind[n] == "davis"]
    comp = [n for n in cv if kind[n] == "composite"]
    summary = {
        "picks (fold scored: candidate chosen on the other fold)": picks,
        "J&F dev CV": float(np.mean([cv[n]["J&F"] for n in dev])),
        "J&F composites CV": float(np.mean([cv[n]["J&F"] for n in comp])),
        "Spearman S dev CV": pooled(cv, dev, "pairs_S"), "Spearman S+F dev CV": pooled(cv, dev, "pairs_F"),
        "Spearman S composites CV": pooled(cv, comp, "pairs_S"), "Spearman S+F composites CV": pooled(cv, comp, "pairs_F"),
        "J&F per sequence CV": {n: cv[n]["J&F"] for n in cv},
    }
    lines += ["", json.dumps(summary, indent=1, default=float)]
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
