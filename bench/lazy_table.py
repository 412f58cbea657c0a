"""The Lazy benchmark (first-frame masks only), all modes and both correction kinds side by side.

    python bench/lazy_table.py [--data DIR] [--engine embedded] [--refiner embedded] [--rand-seeds 5]
                               [--score combined|S] [--jobs 1] [--out runs/bench]

Rows: no interaction; then for each correction kind -- ``click`` (the TP robot's click, turned
into a mask by the refiner: GrabCut for the embedded one) and ``mask`` (the ground-truth mask, an
upper bound on what a correction can give) -- Lazy and Rand-Lazy at Lazy's budget per sequence
(one run per seed; the table gives their mean, below it the draws' spread and Lazy's margins,
and ``bench.json`` each draw). Columns: the paper's Table S1 figures, fps, the Lazy layer's share
of the time, and the pooled Spearman with 1 - IoU of S alone and of S + F (the failure
score, ``lazyxmem_core/failure.py``). A second table gives the per-sequence Spearman of the run
without interaction, and, for data with ``composites.FOLDS``, the figures per fold. Writes
``table.md`` (the README's table) and ``bench.json`` under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from composites import fold_of  # noqa: E402

from lazyxmem_core.engines import EngineSettings, lazy_config  # noqa: E402
from lazyxmem_core.evaluation import evaluate  # noqa: E402

KINDS = {"click": "refiner", "mask": "oracle"}  # row label -> the evaluation's correction mode


def _row(name: str, s: dict) -> str:
    return (f"| {name} | {100 * s['J&F']:.1f} | {100 * s['J']:.1f} | {100 * s['F']:.1f} | {100 * s['R@0.5']:.1f} | "
            f"{s['N_oI']:.1f} | {100 * s['interaction_rate']:.2f} | {s['fps']:.1f} | "
            f"{100 * s['lazy_overhead']:.1f} % | {s['spearman_S_error']:.3f} | {s['spearman_failure_error']:.3f} |")


def _mean(runs: list[dict]) -> dict:
    """The runs' mean figures, over all sequences and per sequence."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    if "sequences" in runs[0]:
        mean["sequences"] = {n: _mean([r["sequences"][n] for r in runs]) for n in runs[0]["sequences"]}
    return mean


def main() -> None:
    data_root = Path(os.environ.get("LAZYXMEM_DATA", ROOT.parent / "shared" / "data"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(data_root / "davis2016"))
    p.add_argument("--engine", default="embedded")
    p.add_argument("--refiner", default="embedded")
    p.add_argument("--kinds", default="click,mask", help="correction kinds: click (robot click -> refiner), mask (GT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rand-seeds", type=int, default=5, help="Rand-Lazy runs, seeds --seed, --seed+1, ...")
    p.add_argument("--score", choices=("combined", "S"), default=None,
                   help="what the triggers use (default: the engine's; S = the paper's triggers)")
    p.add_argument("--no-backward", action="store_true", help="corrections change only the frames after them")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, one process each (the fps column then shares the cores between them)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench"))
    a = p.parse_args()
    settings = EngineSettings(engine=a.engine, refiner=a.refiner)
    config = lazy_config(settings, backward=False if a.no_backward else None, score=a.score)
    out = Path(a.out)
    kinds = a.kinds.split(",")
    seeds = range(a.seed, a.seed + max(1, a.rand_seeds))
    futures: dict[str, Future] = {}

    with ProcessPoolExecutor(max(1, a.jobs)) as pool:
        def submit(key: str, mode: str, correction: str = "refiner", seed: int = 0, budgets: dict | None = None) -> None:
            futures[key] = pool.submit(evaluate, a.data, out / key.replace(" ", "_").replace(",", ""), mode=mode,
                                       settings=settings, config=config, robot="tp", correction=correction, seed=seed,
                                       save_masks=False, budgets=budgets, show_progress=False)
            futures[key].add_done_callback(lambda f: f.exception() or print(_row(key, f.result()), flush=True))

        submit("none", "none")
        for kind in kinds:
            submit(f"Lazy, {kind}", "lazy", KINDS[kind])
        for kind in kinds:  # Rand-Lazy spends Lazy's number of requests per sequence
            budgets = {name: s["N_oI"] for name, s in futures[f"Lazy, {kind}"].result()["sequences"].items()}
            for seed in seeds:
                submit(f"Rand-Lazy, {kind}, seed {seed}", "rand-lazy", KINDS[kind], seed, budgets)
        runs = {key: f.result() for key, f in futures.items()}

    # The table: no interaction, then per kind Lazy and the mean of the Rand-Lazy draws (each draw
    # is in bench.json; their spread is in the margins below).
    summaries: dict[str, dict] = {"none": runs["none"]}
    margins = ["", "Lazy against the random draws (J&F):", "",
               "| correction | Lazy | Rand-Lazy mean | sd | min-max | Lazy - Rand-Lazy mean | Lazy - none | draws Lazy beats | rate % |",
               "|---|---|---|---|---|---|---|---|---|"]
    for kind in kinds:
        lazy = summaries[f"Lazy, {kind}"] = runs[f"Lazy, {kind}"]
        draws = [runs[f"Rand-Lazy, {kind}, seed {seed}"] for seed in seeds]
        summaries[f"Rand-Lazy, {kind}, mean of {len(seeds)}"] = _mean(draws)
        jf = [r["J&F"] for r in draws]
        margins.append(
            f"| {kind} | {100 * lazy['J&F']:.1f} | {100 * np.mean(jf):.1f} | "
            f"{100 * np.std(jf, ddof=1) if len(jf) > 1 else float('nan'):.1f} | {100 * min(jf):.1f}-{100 * max(jf):.1f} | "
            f"{100 * (lazy['J&F'] - np.mean(jf)):+.1f} | {100 * (lazy['J&F'] - summaries['none']['J&F']):+.1f} | "
            f"{sum(lazy['J&F'] > x for x in jf)} of {len(jf)} | {100 * lazy['interaction_rate']:.2f} |")

    header = ["| mode | J&F | J | F | R@0.5 | N_oI | rate % | fps | Lazy layer | Spearman S | Spearman S+F |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = header + [_row(k, s) for k, s in summaries.items()]
    per_seq = ["", "Spearman with 1 - IoU per sequence, no interaction:", "",
               "| sequence | J&F | S | S+F |", "|---|---|---|---|"]
    for name, s in summaries["none"]["sequences"].items():
        per_seq.append(f"| {name} | {100 * s['J&F']:.1f} | {s['spearman_S_error']:.3f} | {s['spearman_failure_error']:.3f} |")
    folds = _folds(summaries)
    table = "\n".join(rows + margins + per_seq + folds)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "bench.json").write_text(json.dumps({**summaries, **runs}, indent=2, default=float))


def _folds(summaries: dict[str, dict]) -> list[str]:
    """Mean J&F per cross-validation fold for each row (data named as the development folds)."""
    names = list(summaries["none"]["sequences"])
    try:
        fold = {n: fold_of(n) for n in names}
    except ValueError:
        return []
    lines = ["", "J&F per fold (mean over its sequences):", "", "| mode | fold 0 | fold 1 |", "|---|---|---|"]
    for key, s in summaries.items():
        means = [np.mean([s["sequences"][n]["J&F"] for n in names if fold[n] == k] or [np.nan]) for k in (0, 1)]
        lines.append(f"| {key} | {100 * means[0]:.1f} | {100 * means[1]:.1f} |")
    return lines


if __name__ == "__main__":
    main()
