"""The evaluation harness: runs sessions with a simulated user on DAVIS-layout data and reports
the paper's Table S1 figures (J&F, R@tau, N_dI, N_oI, dI, interaction rate), per-sequence CSV and
a plot per sequence of S_c / dS_c over time with the trigger frames and the IoU."""
from __future__ import annotations

import csv
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from . import metrics
from .engines import EngineSettings, build_propagator, build_refiner, lazy_config
from .errors import MediaError
from .lazy import LazyConfig, LazySession
from .media import FrameDir, read_index_mask, write_index_mask
from .robot import CorrectionMode, Robot, simulated_user
from .types import Decision, FrameRecord

log = logging.getLogger(__name__)

Mode = Literal["none", "pseudo", "lazy", "rand-lazy", "every-k"]
MODES: tuple[str, ...] = ("none", "pseudo", "lazy", "rand-lazy", "every-k")


@dataclass
class EvalSequence:
    """A DAVIS-layout sequence: ``<dir>/frames/*.jpg`` and ``<dir>/masks/*.png`` (any subset of frames)."""

    name: str
    frames: FrameDir
    gt: dict[int, np.ndarray]  # frame index -> index mask

    @classmethod
    def load(cls, path: str | Path) -> EvalSequence:
        path = Path(path)
        frames = FrameDir(path / "frames")
        mask_dir = path / "masks"
        if not mask_dir.is_dir():
            raise MediaError(f"sequence {path} has no masks/ folder")
        index = {name: i for i, name in enumerate(frames.names)}
        gt = {}
        for p in sorted(mask_dir.glob("*.png")):
            if p.stem not in index:
                raise MediaError(f"mask {p} has no frame of the same name in {path / 'frames'}")
            gt[index[p.stem]] = read_index_mask(p)
        if not gt:
            raise MediaError(f"sequence {path} has no ground-truth masks")
        return cls(path.name, frames, gt)

    def initial_masks(self) -> dict[int, np.ndarray]:
        """The semi-supervised protocol: each object's mask on the first frame where it appears."""
        given: dict[int, np.ndarray] = {}
        seen: set[int] = set()
        for t in sorted(self.gt):
            labels = {int(v) for v in np.unique(self.gt[t]) if v not in (0, 255)}
            new = labels - seen
            if new:
                given[t] = np.where(np.isin(self.gt[t], list(new)), self.gt[t], 0).astype(np.uint8)
                seen |= new
        if not given:
            raise MediaError(f"sequence {self.name}: no object in any ground-truth mask")
        return given

    @property
    def labels(self) -> list[int]:
        return sorted({int(v) for m in self.gt.values() for v in np.unique(m) if v not in (0, 255)})


@dataclass
class SequenceResult:
    name: str
    records: list[FrameRecord]
    scores: dict[int, metrics.ObjectScores]
    interactions: dict[int, list[int]]  # label -> frames with an answered user correction
    pseudo: int
    object_frames: dict[int, int]  # label -> frames the object is tracked on
    seconds: float
    ious: dict[int, list[float]] = field(default_factory=dict)  # label -> IoU per GT frame (NaN elsewhere)
    failure: dict[int, dict[int, float]] = field(default_factory=dict)  # frame -> label -> failure score F
    figures: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)  # (frame, label) -> F's figures

    @property
    def n_user(self) -> int:
        return sum(len(v) for v in self.interactions.values())


def _config_for(mode: str, base: LazyConfig) -> LazyConfig:
    if mode == "none":
        return LazyConfig.off()
    if mode == "pseudo":  # the paper's "pseudo-corrections only" row, whatever the refiner
        return LazyConfig(**{**base.__dict__, "user": False, "pseudo": True})
    if mode == "lazy":
        return base
    if mode in ("rand-lazy", "every-k"):
        return LazyConfig(**{**base.__dict__, "user": False, "detect_loss": False})
    raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")


def run_sequence(
    seq: EvalSequence,
    mode: str,
    settings: EngineSettings,
    config: LazyConfig | None = None,
    robot: Robot = "tp",
    correction: CorrectionMode = "refiner",
    forced_user: dict[int, list[int]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SequenceResult:
    """Run one sequence in one mode and score it against its ground truth."""
    cfg = _config_for(mode, config or lazy_config(settings))
    given = seq.initial_masks()
    propagator = build_propagator(settings, video_length=len(seq.frames) - min(given))
    refiner = build_refiner(settings) if (cfg.pseudo or mode != "none") else None
    user = simulated_user(seq.gt, robot, correction) if mode != "none" else None
    session = LazySession(propagator, seq.frames, given, refiner=refiner, config=cfg,
                          user=user, forced_user=forced_user, video_key=f"eval:{seq.name}")
    t0 = time.perf_counter()
    records = session.run(progress=progress)
    seconds = time.perf_counter() - t0
    res = _score(seq, records, seconds, session.failure_scores)
    res.figures = dict(session.failure_figures)
    return res


def _score(seq: EvalSequence, records: list[FrameRecord], seconds: float,
           failure: dict[int, dict[int, float]] | None = None) -> SequenceResult:
    by_index = {r.index: r for r in records}
    gt_frames = sorted(t for t in seq.gt if t in by_index)
    labels = seq.labels
    preds = [by_index[t].mask for t in gt_frames]
    gts = [seq.gt[t] for t in gt_frames]
    scores = metrics.score_sequence(preds, gts, labels=labels)
    interactions = {label: [] for label in labels}
    pseudo = 0
    first_seen: dict[int, int] = {}
    for r in records:
        for label, o in r.objects.items():
            first_seen.setdefault(label, r.index)
            if o.decision is Decision.USER and o.answered:
                interactions.setdefault(label, []).append(r.index)
            elif o.decision is Decision.PSEUDO:
                pseudo += 1
    n = len(seq.frames)
    object_frames = {label: n - first_seen.get(label, 0) for label in labels}
    ious = {label: [float("nan")] * n for label in labels}
    for t, p, g in zip(gt_frames, preds, gts):
        for label in labels:
            ious[label][t] = metrics.jaccard(p == label, g == label)
    return SequenceResult(seq.name, records, scores, interactions, pseudo, object_frames, seconds, ious,
                          dict(failure or {}))


def error_pairs(results: Sequence[SequenceResult], combined: bool) -> list[tuple[float, float]]:
    """(score, 1 - IoU) per object-frame with ground truth, given frames left out; the score is S,
    or S + F (the failure score, where the object has an anchor) with ``combined``."""
    pairs = []
    for r in results:
        for rec in r.records:
            if rec.given:
                continue
            for label, iou in r.ious.items():
                if label in rec.objects and not np.isnan(iou[rec.index]):
                    F = r.failure.get(rec.index, {}).get(label, 0.0) if combined else 0.0
                    pairs.append((rec.objects[label].S + F, 1.0 - iou[rec.index]))
    return pairs


def random_schedule(seq_len: int, start: int, labels: Sequence[int], count: int, seed: int) -> dict[int, list[int]]:
    """Rand-Lazy: ``count`` user requests at random (frame, object) pairs after the first frame."""
    pairs = [(t, label) for t in range(start + 1, seq_len) for label in labels]
    rng = random.Random(seed)
    chosen = rng.sample(pairs, min(count, len(pairs)))
    schedule: dict[int, list[int]] = {}
    for t, label in sorted(chosen):
        schedule.setdefault(t, []).append(label)
    return schedule


def every_k_schedule(seq_len: int, start: int, labels: Sequence[int], count: int | None = None,
                     k: int | None = None) -> dict[int, list[int]]:
    """Every-k: a request for every object every k frames; with ``count`` (and no k), that budget
    spread evenly over the video."""
    if k is not None:
        return {t: list(labels) for t in range(start + k, seq_len, k)}
    per_object = round((count or 0) / max(1, len(labels)))
    if per_object <= 0:
        return {}
    step = (seq_len - start) / (per_object + 1)
    frames = sorted({min(seq_len - 1, start + max(1, round(step * i))) for i in range(1, per_object + 1)})
    return {t: list(labels) for t in frames}


def evaluate(
    data: str | Path,
    out: str | Path,
    mode: str = "lazy",
    sequences: Sequence[str] | None = None,
    settings: EngineSettings | None = None,
    config: LazyConfig | None = None,
    robot: Robot = "tp",
    correction: CorrectionMode = "refiner",
    k: int | None = None,
    seed: int = 0,
    save_masks: bool = True,
    show_progress: bool = True,
    budgets: dict[str, int] | None = None,
) -> dict:
    """Evaluate every sequence of a DAVIS-layout folder and write the report files into ``out``.

    Rand-Lazy and every-k (without k) spend Lazy's number of user corrections per sequence: taken
    from ``budgets`` {sequence: count} when given, else from a Lazy run made here first.
    """
    from tqdm import tqdm

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    settings = settings or EngineSettings.from_env()
    data, out = Path(data), Path(out)
    names = list(sequences) if sequences else sorted(p.name for p in data.iterdir() if (p / "frames").is_dir())
    if not names:
        raise MediaError(f"no sequence in {data}: expected <sequence>/frames and <sequence>/masks folders")
    out.mkdir(parents=True, exist_ok=True)
    results: list[SequenceResult] = []
    for name in names:
        if not (data / name).is_dir():
            raise MediaError(f"sequence {name} not found in {data}")
        seq = EvalSequence.load(data / name)
        start = min(seq.initial_masks())
        forced = None
        if mode in ("rand-lazy", "every-k"):
            budget = None
            if budgets is not None and name in budgets:
                budget = budgets[name]  # Lazy's count from a run the caller already made
            elif mode == "rand-lazy" or k is None:
                budget = run_sequence(seq, "lazy", settings, config, robot, correction).n_user
            forced = (random_schedule(len(seq.frames), start, seq.labels, budget or 0, seed)
                      if mode == "rand-lazy" else every_k_schedule(len(seq.frames), start, seq.labels, budget, k))
        with tqdm(total=len(seq.frames) - start, desc=f"{mode} {name}", unit="frame",
                  disable=not show_progress, leave=False) as bar:
            res = run_sequence(seq, mode, settings, config, robot, correction, forced, progress=bar.update)
        results.append(res)
        if save_masks:
            write_sequence_masks(out / "masks" / name, seq.frames.names, res.records)
        plot_sequence(res, out / "plots" / f"{name}.png")
        log.info("%s: J&F %.3f, %d user, %d pseudo, %.1f fps", name,
                 metrics.summarize(res.scores.values())["J&F"], res.n_user, res.pseudo,
                 len(res.records) / max(res.seconds, 1e-9))
    summary = summarise(results, mode)
    write_reports(results, summary, out, mode)
    return summary


def write_sequence_masks(folder: Path, names: Sequence[str], records: list[FrameRecord]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        write_index_mask(folder / f"{names[r.index]}.png", r.mask)


def summarise(results: list[SequenceResult], mode: str) -> dict:
    all_objects = [s for r in results for s in r.scores.values()]
    figures = metrics.summarize(all_objects)
    interactions = {(r.name, label): frames for r in results for label, frames in r.interactions.items()}
    object_frames = {(r.name, label): n for r in results for label, n in r.object_frames.items()}
    work = metrics.workload(interactions, object_frames)
    frames = sum(len(r.records) for r in results)
    seconds = sum(r.seconds for r in results)
    prop = sum(rec.seconds for r in results for rec in r.records)
    lazy = sum(rec.lazy_seconds for r in results for rec in r.records)
    summary = {
        "mode": mode,
        **{key: figures[key] for key in ("J&F", "J", "F", "R@0.1", "R@0.25", "R@0.5")},
        "N_dI": work["N_dI"], "N_oI": work["N_oI"], "dI": work["dI"],
        # A fraction in [0, 1] like J&F and R@ (metrics.workload gives percent).
        "interaction_rate": work["interaction_rate"] / 100.0,
        "pseudo_corrections": sum(r.pseudo for r in results),
        "fps": frames / seconds if seconds else float("nan"),
        "lazy_overhead": lazy / prop if prop else float("nan"),
        # How well uncertainty predicts failure (the paper's measure): Spearman(S_c, 1 - IoU) per
        # object-frame, pooled; and the same for S + F, the score with the object-level failure signal.
        "spearman_S_error": spearman(error_pairs(results, combined=False)),
        "spearman_failure_error": spearman(error_pairs(results, combined=True)),
        "frames": frames,
        "sequences": {},
    }
    for r in results:
        f = metrics.summarize(r.scores.values())
        w = metrics.workload({k: v for k, v in interactions.items() if k[0] == r.name},
                             {k: v for k, v in object_frames.items() if k[0] == r.name})
        summary["sequences"][r.name] = {
            **{key: f[key] for key in ("J&F", "J", "F", "R@0.1", "R@0.25", "R@0.5")},
            "N_oI": w["N_oI"], "interaction_rate": w["interaction_rate"] / 100.0, "pseudo_corrections": r.pseudo,
            "fps": len(r.records) / r.seconds if r.seconds else float("nan"),
            "spearman_S_error": spearman(error_pairs([r], combined=False)),
            "spearman_failure_error": spearman(error_pairs([r], combined=True)),
        }
    return summary


def spearman(pairs: list[tuple[float, float]]) -> float:
    if len(pairs) < 3:
        return float("nan")
    from scipy.stats import spearmanr

    a, b = np.asarray(pairs, dtype=np.float64).T
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _fmt(v: float, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def write_reports(results: list[SequenceResult], summary: dict, out: Path, mode: str) -> None:
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, default=float)
    with open(out / "per_sequence.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sequence", "J&F", "J", "F", "R@0.1", "R@0.25", "R@0.5", "N_oI", "interaction_rate",
                    "pseudo_corrections", "fps"])
        for name, s in summary["sequences"].items():
            w.writerow([name] + [f"{s[k]:.4f}" for k in ("J&F", "J", "F", "R@0.1", "R@0.25", "R@0.5")]
                       + [s["N_oI"], f"{s['interaction_rate']:.5f}", s["pseudo_corrections"], f"{s['fps']:.2f}"])
    s = summary
    lines = [
        "| Method | J&F | R@0.1 | R@0.25 | R@0.5 | N_dI | N_oI | dI | rate % |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {mode} | {_fmt(s['J&F'])} | {_fmt(s['R@0.1'])} | {_fmt(s['R@0.25'])} | {_fmt(s['R@0.5'])} | "
        f"{_fmt(s['N_dI'], False) if s['N_oI'] else '-'} | {s['N_oI'] if mode != 'none' else '-'} | "
        f"{_fmt(s['dI'], False)} | {_fmt(100 * s['interaction_rate'], False) if mode != 'none' else '-'} |",
        "",
        "| Sequence | J&F | J | F | R@0.5 | N_oI | pseudo | fps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, q in s["sequences"].items():
        lines.append(f"| {name} | {_fmt(q['J&F'])} | {_fmt(q['J'])} | {_fmt(q['F'])} | {_fmt(q['R@0.5'])} | "
                     f"{q['N_oI']} | {q['pseudo_corrections']} | {q['fps']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot_sequence(res: SequenceResult, path: Path) -> None:
    """S_c and dS_c over time with the trigger frames, and the IoU where ground truth exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    labels = sorted({label for r in res.records for label in r.objects})
    fig, axes = plt.subplots(len(labels), 1, figsize=(10, 3.2 * len(labels)), squeeze=False)
    for ax, label in zip(axes[:, 0], labels):
        ts = [r.index for r in res.records if label in r.objects]
        S = [r.objects[label].S for r in res.records if label in r.objects]
        dS = [np.nan if r.objects[label].dS is None else r.objects[label].dS for r in res.records if label in r.objects]
        ax.plot(ts, S, color="tab:blue", lw=1.2, label="S (masked entropy)")
        ax.plot(ts, dS, color="tab:orange", lw=1.0, label="dS")
        F = [res.failure.get(r.index, {}).get(label, np.nan) for r in res.records if label in r.objects]
        if not np.all(np.isnan(F)):
            ax.plot(ts, F, color="tab:purple", lw=1.0, label="F (failure score)")
        for r in res.records:
            o = r.objects.get(label)
            if o is None:
                continue
            if o.decision is Decision.USER:
                ax.axvline(r.index, color="tab:red", lw=1.5, alpha=0.8)
            elif o.decision is Decision.PSEUDO:
                ax.axvline(r.index, color="tab:green", lw=0.8, ls="--", alpha=0.7)
        ax.set_ylabel("uncertainty")
        ax.set_xlabel("frame")
        ax2 = ax.twinx()
        iou = res.ious.get(label)
        if iou is not None:
            ax2.plot(range(len(iou)), iou, "k.", ms=3, label="IoU")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("IoU")
        ax.set_title(f"{res.name} object {label}: red = user request, green dashed = pseudo-correction")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
