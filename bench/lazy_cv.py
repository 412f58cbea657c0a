"""Cross-validated choice of the Lazy trigger's parameters (embedded engine, ground-truth corrections).

    python bench/lazy_cv.py [--data DIR] [--grid NAME,...] [--select margin|lazy] [--rand-seeds 5]
                            [--rand-for picks|all|none] [--max-rate 0.02] [--out runs/lazy_cv]

Runs Lazy with each candidate of ``GRID`` (overrides of the engine's Lazy thresholds) on every
development sequence (davis2016/), the simulated user's correction being the ground-truth mask
(the TP robot, correction "oracle"), and Rand-Lazy beside it (the same number of requests per
sequence at random frames, seeds 0..n-1). For each fold of ``composites.FOLDS`` it picks, among
the candidates whose request rate on the *other* fold stays within --max-rate (the issue's 2 % of
object-frames), the one that does best there, and scores this fold with it: every sequence is
scored with trigger parameters not chosen on it. "Best" is, by --select, Lazy's margin over
Rand-Lazy's mean at the same budget (``margin``: the quantity the target is stated in) or Lazy's
J&F (``lazy``, which favours spending the budget, as Rand-Lazy then does too); both rules are
reported when every candidate has Rand-Lazy runs. The held-out margins Lazy - Rand-Lazy and
Lazy - none are reported per fold and pooled, with the random draws' spread. Results are cached
per run under --out (a rerun adds only what is new; processes given parts of the grid can share
one --out).
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from composites import default_data, fold_of  # noqa: E402

from lazyxmem_core import metrics  # noqa: E402
from lazyxmem_core.engines import EngineSettings, lazy_config  # noqa: E402
from lazyxmem_core.evaluation import EvalSequence, random_schedule, run_sequence  # noqa: E402
from lazyxmem_core.lazy import LazyConfig  # noqa: E402

# Candidates: overrides of the engine's Lazy thresholds, each naming every value it changes so the
# grid means the same whatever the current defaults are. "previous" is what shipped before this
# cross-validation (tau_u 1.0, tau_s 5 for 15 frames, tau_f 2.5 rising by 2.5, 8 frames apart);
# "fi2-20-only" is what it chose by Lazy's J&F with 5 Rand-Lazy seeds (shipped until the 20-seed
# run); "fi2-20-delay20-clear", the margin rule's pick with 20 seeds, is the engine's default
# (EmbeddedPropagator.lazy_thresholds).
PREVIOUS = {"tau_u": 1.0, "tau_s": 5.0, "level_run": 15, "tau_f": 2.5, "tau_f_step": 2.5, "min_user_gap": 8,
            "tau_fi": None, "fi_floor": 2.0, "fail_ask": True, "ask_delay": 0, "ask_clear": None}
GRID: dict[str, dict] = {
    "previous": PREVIOUS,
    "tauf2.0": {**PREVIOUS, "tau_f": 2.0},
    "tauf3.0": {**PREVIOUS, "tau_f": 3.0},
    "tauf3.5": {**PREVIOUS, "tau_f": 3.5},
    "step1.0": {**PREVIOUS, "tau_f_step": 1.0},
    "step5.0": {**PREVIOUS, "tau_f_step": 5.0},
    "gap20": {**PREVIOUS, "min_user_gap": 20},
    "no-dS": {**PREVIOUS, "tau_u": 99.0},
    "no-sustained": {**PREVIOUS, "tau_s": None},
    # The integrated failure trigger (LazyConfig.tau_fi): F's excess over fi_floor summed since the
    # object's last request; alone beside dS and the sustained run, or beside a stricter tau_f.
    "fi2-20": {**PREVIOUS, "tau_fi": 20.0, "fi_floor": 2.0},
    "fi2-40": {**PREVIOUS, "tau_fi": 40.0, "fi_floor": 2.0},
    "fi2-20-step5": {**PREVIOUS, "tau_f_step": 5.0, "tau_fi": 20.0, "fi_floor": 2.0},
    "fi2.5-20-tauf3.5": {**PREVIOUS, "tau_f": 3.5, "tau_fi": 20.0, "fi_floor": 2.5},
    "fi2-20-only": {**PREVIOUS, "tau_f_step": 99.0, "tau_u": 99.0, "tau_s": None, "tau_fi": 20.0, "fi_floor": 2.0},
    # Only the integrated trigger asks (tau_f 2.5 still vetoes): slow drift is asked about once it
    # has cost frames, and backward revision repairs the frames before the request.
    "fi2-20-pure": {**PREVIOUS, "tau_u": 99.0, "tau_s": None, "fail_ask": False, "tau_fi": 20.0, "fi_floor": 2.0},
    "fi2-10-pure": {**PREVIOUS, "tau_u": 99.0, "tau_s": None, "fail_ask": False, "tau_fi": 10.0, "fi_floor": 2.0},
    # fi2-20-only asking k frames after a trigger fired (LazyConfig.ask_delay; added with the
    # single-correction gain curves: a correction at the onset of a loss gained less than one at a
    # random frame on 5 of the 7 sequences with requests).
    **{f"fi2-20-delay{k}": {**PREVIOUS, "tau_f_step": 99.0, "tau_u": 99.0, "tau_s": None, "tau_fi": 20.0, "fi_floor": 2.0,
                            "ask_delay": k} for k in (10, 20)},
    # fi2-20-delay20 that asks early where F falls back to fi_floor (LazyConfig.ask_clear; added
    # when the end-to-end tests showed a 20-frame delay flags an object hidden for a few frames
    # only after it is back).
    "fi2-20-delay20-clear": {**PREVIOUS, "tau_f_step": 99.0, "tau_u": 99.0, "tau_s": None, "tau_fi": 20.0,
                             "fi_floor": 2.0, "ask_delay": 20, "ask_clear": 2.0},
}


def _key(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _config(config: LazyConfig) -> dict:
    """The configuration as a cache key: triggers that are off leave their parameters out (they
    change nothing), so the keys of runs made before a trigger existed stay valid."""
    values = asdict(config)
    if values.get("tau_fi") is None:
        values.pop("tau_fi", None)
        values.pop("fi_floor", None)
    if values.get("fail_ask", True):
        values.pop("fail_ask", None)
    if values.get("ask_delay", 0) == 0:
        values.pop("ask_delay", None)
    if values.get("ask_clear") is None:
        values.pop("ask_clear", None)
    return values


# What only the triggers read: Rand-Lazy (its requests forced, its triggers off) runs the same
# whatever these are, so its cache key leaves them out and candidates share its runs.
TRIGGER_ONLY = ("tau_u", "tau_s", "level_run", "tau_f_step", "fail_ask", "ask_delay", "ask_clear", "min_user_gap", "tau_fi", "fi_floor", "user_budget",
                "detect_loss", "loss_ratio", "loss_min_area")


def _rand_config(config: LazyConfig) -> dict:
    return {k: v for k, v in _config(config).items() if k not in TRIGGER_ONLY}


class Runner:
    """Runs (and caches) one sequence in one mode."""

    def __init__(self, out: Path, settings: EngineSettings) -> None:
        self.out, self.settings = out, settings
        self.cache_file = out / "cache.json"
        self.cache: dict[str, dict] = json.loads(self.cache_file.read_text()) if self.cache_file.is_file() else {}

    def _merge(self, key: str | None = None, value: dict | None = None) -> None:
        """Re-reads the cache file under a lock and adds ``key``: several processes (``--grid``
        split between them) can fill one cache."""
        with open(self.out / "cache.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.cache_file.is_file():
                self.cache.update(json.loads(self.cache_file.read_text()))
            if key is not None:
                self.cache[key] = value
                tmp = self.cache_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.cache))
                tmp.replace(self.cache_file)

    def _run(self, key: str, label: str, fn) -> dict:
        if key not in self.cache:
            self._merge()
        if key not in self.cache:
            t0 = time.perf_counter()
            self._merge(key, fn())
            print(f"{label:60s} J&F {100 * self.cache[key]['J&F']:5.1f} N_oI {self.cache[key]['N_oI']:2d} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        return self.cache[key]

    def lazy(self, seq: EvalSequence, config: LazyConfig, name: str) -> dict:
        return self._run(_key("lazy", seq.name, _config(config)), f"lazy {name} {seq.name}",
                         lambda: self._figures(run_sequence(seq, "lazy", self.settings, config, "tp", "oracle")))

    def rand(self, seq: EvalSequence, config: LazyConfig, budget: int, seed: int) -> dict:
        def run() -> dict:  # the schedule only when the run is not cached (initial_masks reads every frame)
            schedule = random_schedule(len(seq.frames), min(seq.initial_masks()), seq.labels, budget, seed)
            return self._figures(run_sequence(seq, "rand-lazy", self.settings, config, "tp", "oracle",
                                              forced_user=schedule))

        # Without requests the schedule is empty whatever the seed: one run serves every seed.
        return self._run(_key("rand", seq.name, _rand_config(config), budget, seed if budget else 0),
                         f"rand seed {seed} n={budget} {seq.name}", run)

    def none(self, seq: EvalSequence) -> dict:
        return self._run(_key("none", seq.name), f"none {seq.name}",
                         lambda: self._figures(run_sequence(seq, "none", self.settings, LazyConfig.off())))

    @staticmethod
    def _figures(res) -> dict:
        return {"J&F": metrics.summarize(res.scores.values())["J&F"], "N_oI": res.n_user,
                "object_frames": int(sum(res.object_frames.values())),
                "requests": {str(k): v for k, v in res.interactions.items()}}


RULES = {"lazy": "select by Lazy J&F on the other fold",
         "margin": "select by Lazy - Rand-Lazy mean on the other fold"}


def held_out(picks: dict[int, str], lazy: dict, rand: dict, none: dict, fold: dict, n_seeds: int, jf) -> dict:
    """Lazy, Rand-Lazy and no interaction with each fold scored by the other fold's pick."""
    cv_lazy = {n: lazy[picks[fold[n]]][n] for n in fold}
    out: dict = {"picks": picks}
    if all(picks[k] in rand for k in (0, 1)):
        cv_rand = [{n: rand[picks[fold[n]]][seed][n] for n in fold} for seed in range(n_seeds)]
        for k, label in ((0, "fold 0"), (1, "fold 1"), (None, "pooled")):
            seeds = [jf(r, k) for r in cv_rand]
            requests = sum(cv_lazy[n]["N_oI"] for n in fold if k is None or fold[n] == k)
            frames = sum(cv_lazy[n]["object_frames"] for n in fold if k is None or fold[n] == k)
            out[label] = {
                "Lazy": jf(cv_lazy, k), "none": jf(none, k), "Rand-Lazy mean": float(np.mean(seeds)),
                "Rand-Lazy sd": float(np.std(seeds, ddof=1)) if len(seeds) > 1 else float("nan"),
                "Rand-Lazy per seed": seeds, "Lazy - Rand-Lazy mean": jf(cv_lazy, k) - float(np.mean(seeds)),
                "Lazy - none": jf(cv_lazy, k) - jf(none, k), "requests": requests, "rate": requests / frames,
                "seeds Lazy beats": int(sum(jf(cv_lazy, k) > s for s in seeds)),
            }
    out["per sequence"] = {
        n: {"fold": fold[n], "candidate": picks[fold[n]], "none": none[n]["J&F"], "Lazy": cv_lazy[n]["J&F"],
            "requests": cv_lazy[n]["requests"],
            **({"Rand-Lazy mean": float(np.mean([rand[picks[fold[n]]][s][n]["J&F"] for s in range(n_seeds)]))}
               if picks[fold[n]] in rand else {})}
        for n in fold}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data()))
    p.add_argument("--grid", default=",".join(GRID), help=f"candidates, from: {', '.join(GRID)}")
    p.add_argument("--rand-seeds", type=int, default=5)
    p.add_argument("--rand-for", choices=("picks", "all", "none"), default="picks",
                   help="which candidates get Rand-Lazy runs (the picks: needed for the held-out margins)")
    p.add_argument("--rand-extra", default="", help="more candidates to run Rand-Lazy for (comma-separated)")
    p.add_argument("--select", choices=("margin", "lazy"), default="margin",
                   help="what a fold's pick maximises on the other fold: Lazy's margin over Rand-Lazy's mean at "
                        "the same budget (needs Rand-Lazy for every candidate), or Lazy's J&F")
    p.add_argument("--max-rate", type=float, default=0.02, help="requests per object-frame a pick may use on its training fold")
    p.add_argument("--out", default=str(ROOT / "runs" / "lazy_cv"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = EngineSettings(engine="embedded", refiner="embedded")
    base = lazy_config(settings)
    runner = Runner(out, settings)
    seqs = [EvalSequence.load(q) for q in sorted((Path(a.data) / "davis2016").iterdir()) if (q / "frames").is_dir()]
    fold = {s.name: fold_of(s.name) for s in seqs}
    names = a.grid.split(",")
    configs = {c: replace(base, **GRID[c]) for c in names}
    none = {s.name: runner.none(s) for s in seqs}
    lazy = {c: {s.name: runner.lazy(s, configs[c], c) for s in seqs} for c in names}

    def rate(c: str, k: int) -> float:
        r = [lazy[c][n] for n in fold if fold[n] == k]
        return sum(x["N_oI"] for x in r) / sum(x["object_frames"] for x in r)

    def jf(res: dict, k: int | None) -> float:
        return float(np.mean([res[n]["J&F"] for n in fold if k is None or fold[n] == k]))

    rand_for = names if a.rand_for == "all" or a.select == "margin" else []
    rand: dict[str, list[dict]] = {}

    def run_rand(c: str) -> None:
        if c not in rand:
            rand[c] = [{s.name: runner.rand(s, configs[c], lazy[c][s.name]["N_oI"], seed) for s in seqs}
                       for seed in range(a.rand_seeds)]

    for c in rand_for:
        run_rand(c)

    def margin(c: str, k: int) -> float:
        return jf(lazy[c], k) - float(np.mean([jf(r, k) for r in rand[c]]))

    def pick(rule: str) -> dict[int, str]:
        picks = {}
        for k in (0, 1):
            ok = [c for c in names if rate(c, 1 - k) <= a.max_rate] or names
            picks[k] = max(ok, key=lambda c: jf(lazy[c], 1 - k) if rule == "lazy" else margin(c, 1 - k))
        return picks

    rules = ["lazy", "margin"] if a.select == "margin" or a.rand_for == "all" else ["lazy"]
    picks_by = {rule: pick(rule) for rule in rules}
    for picks in picks_by.values():
        for c in sorted(set(picks.values())) if a.rand_for != "none" else []:
            run_rand(c)
    for c in a.rand_extra.split(","):
        if c and c in names:
            run_rand(c)

    lines = ["| candidate | Lazy J&F f0 | Lazy J&F f1 | Lazy J&F | requests | rate % f0 | rate % f1 | "
             "Rand-Lazy mean f0 | f1 | all | Rand-Lazy min-max (all) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in names:
        n = sum(x["N_oI"] for x in lazy[c].values())
        row = (f"| {c} | {100 * jf(lazy[c], 0):.1f} | {100 * jf(lazy[c], 1):.1f} | {100 * jf(lazy[c], None):.1f} | {n} | "
               f"{100 * rate(c, 0):.2f} | {100 * rate(c, 1):.2f} |")
        if c in rand:
            per_seed = [jf(r, None) for r in rand[c]]
            row += (f" {100 * np.mean([jf(r, 0) for r in rand[c]]):.1f} | {100 * np.mean([jf(r, 1) for r in rand[c]]):.1f} | "
                    f"{100 * np.mean(per_seed):.1f} | {100 * min(per_seed):.1f}-{100 * max(per_seed):.1f} |")
        else:
            row += " - | - | - | - |"
        lines.append(row)
    lines.append(f"| none | {100 * jf(none, 0):.1f} | {100 * jf(none, 1):.1f} | {100 * jf(none, None):.1f} | 0 | 0 | 0 | - | - | - | - |")

    # Held out: each fold scored with the candidate picked on the other one, by each rule.
    summary: dict = {}
    for rule, picks in picks_by.items():
        summary[RULES[rule]] = held_out(picks, lazy, rand, none, fold, a.rand_seeds, jf)
    chosen = summary[RULES[a.select]]
    lines += ["", "| held out (each fold scored with the other's pick) | rule | fold 0 | fold 1 | pooled |",
              "|---|---|---|---|---|"]
    for rule in picks_by:
        h = summary[RULES[rule]]
        if "pooled" not in h:
            continue
        cell = {k: h[k] for k in ("fold 0", "fold 1", "pooled")}
        lines.append(f"| picks | {rule} | {h['picks'][0]} | {h['picks'][1]} | |")
        for what, fmt in (("Lazy", "{:.1f}"), ("Rand-Lazy mean", "{:.1f}"), ("none", "{:.1f}"),
                          ("Lazy - Rand-Lazy mean", "{:+.1f}"), ("Lazy - none", "{:+.1f}"), ("rate", "{:.2f} %")):
            lines.append(f"| {what} | {rule} | " + " | ".join(fmt.format(100 * cell[f][what]) for f in cell) + " |")
    summary["per sequence below: selection rule"] = a.select
    summary["per sequence (held out)"] = chosen.pop("per sequence")
    lines += ["", json.dumps(summary, indent=1, default=float)]
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()
