"""The Lazy benchmark on DAVIS 2016 (first-frame masks only), all modes side by side.

    python bench/lazy_table.py [--data DIR] [--engine embedded] [--refiner embedded] [--out runs/bench]

Runs: no interaction, pseudo-corrections only, Lazy with the TP robot, Rand-Lazy at Lazy's budget
per sequence (one row per seed with --rand-seeds N, and their mean: one random draw of 9-15
frames is a noisy baseline); prints the paper's Table S1 columns plus fps, Lazy-layer overhead and
Spearman(S_c, 1 - IoU), and writes ``table.md`` and ``bench.json`` under --out.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from lazyxmem_core.engines import EngineSettings, lazy_config
from lazyxmem_core.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    default_data = Path(os.environ.get("LAZYXMEM_DATA", ROOT.parent / "shared" / "data")) / "davis2016"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data))
    p.add_argument("--engine", default="embedded")
    p.add_argument("--refiner", default="embedded")
    p.add_argument("--robot", default="tp", choices=("tp", "error", "box"))
    p.add_argument("--correction", default="refiner", choices=("refiner", "oracle"))
    p.add_argument("--modes", default="none,pseudo,lazy,rand-lazy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rand-seeds", type=int, default=1, help="Rand-Lazy runs, seeds --seed, --seed+1, ...")
    p.add_argument("--no-backward", action="store_true", help="corrections change only the frames after them")
    p.add_argument("--no-sustained", action="store_true", help="only the paper's dS trigger asks the user")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    a = p.parse_args()
    settings = EngineSettings(engine=a.engine, refiner=a.refiner)
    config = lazy_config(settings, backward=False if a.no_backward else None, sustained=not a.no_sustained)
    out = Path(a.out)
    summaries = {}
    for mode in a.modes.split(","):
        budgets = None
        if mode in ("rand-lazy", "every-k") and "lazy" in summaries:
            budgets = {name: s["N_oI"] for name, s in summaries["lazy"]["sequences"].items()}
        seeds = range(a.seed, a.seed + max(1, a.rand_seeds)) if mode == "rand-lazy" else [a.seed]
        for seed in seeds:
            key = f"{mode} (seed {seed})" if len(seeds) > 1 else mode
            summaries[key] = evaluate(a.data, out / key.replace(" ", "_"), mode=mode, settings=settings, config=config,
                                      robot=a.robot, seed=seed, correction=a.correction, save_masks=False, budgets=budgets)
        if len(seeds) > 1:
            runs = [summaries[f"{mode} (seed {seed})"] for seed in seeds]
            summaries[f"{mode} (mean of {len(runs)})"] = {
                k: float(np.mean([r[k] for r in runs])) for k, v in runs[0].items() if isinstance(v, (int, float))}
    rows = ["| mode | J&F | J | F | R@0.1 | R@0.25 | R@0.5 | N_oI | rate % | N_dI | dI | pseudo | fps | lazy layer | Spearman |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, s in summaries.items():
        rows.append(f"| {mode} | {100 * s['J&F']:.1f} | {100 * s['J']:.1f} | {100 * s['F']:.1f} | {100 * s['R@0.1']:.1f} | "
                    f"{100 * s['R@0.25']:.1f} | {100 * s['R@0.5']:.1f} | {s['N_oI']} | {s['interaction_rate']:.2f} | "
                    f"{s['N_dI']:.2f} | {s['dI']:.1f} | {s['pseudo_corrections']} | {s['fps']:.1f} | "
                    f"{100 * s['lazy_overhead']:.1f} % | {s['spearman_S_error']:.3f} |")
    table = "\n".join(rows)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "bench.json").write_text(json.dumps(summaries, indent=2, default=float))


if __name__ == "__main__":
    main()
