"""The ``lazyxmem`` command: propagate, score, eval."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .engines import (PROPAGATORS, REFINERS, EngineSettings, build_propagator, build_refiner, lazy_config,
                      propagator_name, refiner_name)
from .errors import LazyXMemError, MediaError
from .lazy import LazyConfig, LazySession
from .weights import SAM2_SIZES, SAM_FILES, SAM_HQ_FILES
from .media import FrameDir, check_mask, open_frames, read_index_mask, write_index_mask

log = logging.getLogger("lazyxmem")


class ProbsWriter:
    """Streams ``prob_t{t}`` arrays into an .npz file, so long videos never sit in memory at once."""

    def __init__(self, path: str | Path) -> None:
        self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def __call__(self, t: int, probs: np.ndarray) -> None:
        with self._zip.open(f"prob_t{t}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(probs, dtype=np.float32))

    def close(self) -> None:
        self._zip.close()


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=PROPAGATORS, default=None, help="propagator (default: auto, or LAZYXMEM_ENGINE)")
    p.add_argument("--xmem-checkpoint", default=None, help="XMem checkpoint (.pth); default XMEM_CHECKPOINT")
    p.add_argument("--refiner", choices=REFINERS, default=None, help="mask refiner (default: auto, or LAZYXMEM_REFINER)")
    p.add_argument("--sam-checkpoint", default=None, help="SAM checkpoint (.pth); default SAM_CHECKPOINT")
    p.add_argument("--sam-type", default=None, choices=tuple(SAM_FILES), help="SAM model type (default vit_h)")
    p.add_argument("--sam-hq-checkpoint", default=None, help="SAM-HQ checkpoint (.pth); default SAM_HQ_CHECKPOINT")
    p.add_argument("--sam-hq-type", default=None, choices=tuple(SAM_HQ_FILES), help="SAM-HQ type (default vit_l)")
    p.add_argument("--sam2-checkpoint", default=None, help="SAM 2.1 checkpoint (.pt); default SAM2_CHECKPOINT")
    p.add_argument("--sam2-type", default=None, choices=tuple(SAM2_SIZES),
                   help="SAM 2.1 model (default: read from the checkpoint)")
    p.add_argument("--sam2-image-size", type=int, default=None,
                   help="SAM 2.1 input side (default 1024, as trained; 512 is about 4x faster)")
    p.add_argument("--sam2-bf16", action="store_true", default=None, help="SAM 2.1 in bfloat16 autocast (CUDA only)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: DEVICE or cpu)")


def _xmem_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("XMem engine (defaults: the official evaluation's)")
    g.add_argument("--size", type=int, default=None, help="resize the shorter side to this (default 480; -1: none)")
    g.add_argument("--mem-every", type=int, default=None, help="memory frame every k frames (default 5)")
    g.add_argument("--deep-update-every", type=int, default=None, help="sensory deep update every k frames (default -1: with memory frames)")
    g.add_argument("--top-k", type=int, default=None, help="top-k memory readout (default 30)")
    g.add_argument("--max-mid-term-frames", type=int, default=None, help="working memory frames before consolidation (default 10)")
    g.add_argument("--min-mid-term-frames", type=int, default=None, help="working memory frames kept after it (default 5)")
    g.add_argument("--max-long-term-elements", type=int, default=None, help="long-term memory size (default 10000)")
    g.add_argument("--num-prototypes", type=int, default=None, help="prototypes per consolidation (default 128)")
    g.add_argument("--no-long-term", action="store_true", help="working memory only")
    g.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    g.add_argument("--no-winograd", action="store_true", help="direct instead of Winograd 3x3 convolutions on the CPU (slower)")


def _xmem_knobs(a: argparse.Namespace) -> dict[str, Any]:
    knobs = {k: getattr(a, k) for k in ("size", "mem_every", "deep_update_every", "top_k", "max_mid_term_frames",
                                         "min_mid_term_frames", "max_long_term_elements", "num_prototypes")}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if a.no_long_term:
        knobs["long_term"] = False
    if a.amp:
        knobs["amp"] = True
    if a.no_winograd:
        knobs["winograd"] = False
    return knobs


def _lazy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tau-u", type=float, default=None, help="trigger above this asks the user (default: the engine's; XMem 0.5)")
    p.add_argument("--tau-p", type=float, default=None, help="trigger above this pseudo-corrects (default: the engine's; XMem 0.2)")
    p.add_argument("--tau-m", type=float, default=None, help="S above this keeps a frame out of memory (default: the engine's; XMem 0.8)")
    p.add_argument("--trigger", choices=("dS", "S"), default="dS", help="what the thresholds compare")
    p.add_argument("--detect-loss", action="store_true", help="also ask the user when an object's area collapses")
    p.add_argument("--user-budget", type=int, default=None, help="at most this many review requests per video")
    p.add_argument("--min-user-gap", type=int, default=None, help="frames between two requests for one object")
    p.add_argument("--tau-s", type=float, default=None,
                   help="sustained uncertainty: ask when S stays above this for --level-run frames (default: the "
                        "engine's; embedded 0.8, XMem off)")
    p.add_argument("--level-run", type=int, default=None, help="frames in a row above --tau-s (default: 15 embedded)")
    p.add_argument("--no-sustained", action="store_true", help="only the paper's dS trigger asks the user")
    for name in ("udu", "pseudo", "idu"):
        p.add_argument(f"--no-{name}", action="store_true", help=f"disable {name.upper()}")
    p.add_argument("--pseudo", action="store_true",
                   help="pseudo-corrections even with the embedded refiner (default: only with SAM)")
    p.add_argument("--pseudo-idu", action="store_true", help="write pseudo-corrected frames to memory")
    p.add_argument("--no-backward", action="store_true",
                   help="a correction changes only the frames after it (the paper); default: also the frames "
                        "back to the object's previous correction")


def _lazy_config(a: argparse.Namespace, settings: EngineSettings) -> LazyConfig:
    return lazy_config(settings, tau_u=a.tau_u, tau_p=a.tau_p, tau_m=a.tau_m, trigger=a.trigger, udu=not a.no_udu,
                       pseudo=False if a.no_pseudo else (True if a.pseudo else None), pseudo_idu=a.pseudo_idu, idu=not a.no_idu,
                       detect_loss=a.detect_loss, user_budget=a.user_budget, min_user_gap=a.min_user_gap,
                       backward=False if a.no_backward else None, tau_s=a.tau_s, level_run=a.level_run,
                       sustained=not a.no_sustained)


def _settings(a: argparse.Namespace) -> EngineSettings:
    return EngineSettings.from_env(engine=a.engine, refiner=a.refiner, xmem_checkpoint=a.xmem_checkpoint,
                                   sam_checkpoint=a.sam_checkpoint, sam_type=a.sam_type, device=a.device,
                                   sam_hq_checkpoint=a.sam_hq_checkpoint, sam_hq_type=a.sam_hq_type,
                                   sam2_checkpoint=a.sam2_checkpoint, sam2_type=a.sam2_type,
                                   sam2_image_size=a.sam2_image_size, sam2_bf16=a.sam2_bf16)


def cmd_propagate(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    frames = open_frames(a.frames, a.video)
    names = frames.names if isinstance(frames, FrameDir) else [f"{i:05d}" for i in range(len(frames))]
    first = frames[0]
    given: dict[int, np.ndarray] = {}
    if a.mask:
        if not 0 <= a.mask_frame < len(frames):
            raise MediaError(f"--mask-frame {a.mask_frame} is outside the video (frames 0..{len(frames) - 1})")
        given[a.mask_frame] = check_mask(read_index_mask(a.mask), first.shape, f"mask {a.mask}")
    else:
        index = {n: i for i, n in enumerate(names)}
        files = sorted(Path(a.masks).glob("*.png")) if Path(a.masks).is_dir() else []
        if not files:
            raise MediaError(f"no .png masks in {a.masks}")
        for p in files:
            if p.stem not in index:
                raise MediaError(f"mask {p.name} matches no frame name (frames are named like {names[0]})")
            given[index[p.stem]] = check_mask(read_index_mask(p), first.shape, f"mask {p}")
    given = {t: m for t, m in given.items() if m.any()}
    if not given:
        raise MediaError("the initial mask is empty: it must contain at least one object (label > 0)")

    settings = _settings(a)
    config = LazyConfig.off() if a.no_lazy else _lazy_config(a, settings)
    propagator = build_propagator(settings, xmem_knobs=_xmem_knobs(a), video_length=len(frames) - min(given))
    refiner = None if (a.no_lazy or settings.refiner == "none") else build_refiner(settings)
    if refiner is None and config.pseudo:
        config = LazyConfig(**{**config.__dict__, "pseudo": False})
    print(f"engine: {propagator_name(settings)}, refiner: {refiner_name(settings) if refiner else 'none'}", file=sys.stderr)
    writer = ProbsWriter(a.save_probs) if a.save_probs else None
    session = LazySession(propagator, frames, given, refiner=refiner, config=config, probs_hook=writer)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with tqdm(total=len(frames) - session.start, unit="frame", desc="propagate") as bar:
            records = session.run(progress=bar.update)
    finally:
        if writer:
            writer.close()
    seconds = time.perf_counter() - t0
    for r in records:
        write_index_mask(out / f"{names[r.index]}.png", r.mask)
    report = session_report(session, names, seconds)
    report_path = Path(a.report) if a.report else out / "report.json"
    report_path.write_text(json.dumps(report, indent=1))
    print(f"{len(records)} frames in {seconds:.1f} s ({len(records) / max(seconds, 1e-9):.1f} fps); "
          f"{len(report['review_frames'])} review frames; masks in {out}, report in {report_path}", file=sys.stderr)
    return 0


def session_report(session: LazySession, names: list[str], seconds: float) -> dict:
    """The per-frame JSON report: S, dS, decision, clicks, memory writes, and the review list."""
    frames = []
    for r in session.ordered_records():
        frames.append({
            "frame": r.index, "name": names[r.index], "decision": r.decision.value, "written": r.written,
            "review": r.review, "given": r.given,
            "objects": {str(label): {
                "area": o.area, "S": round(o.S, 6), "dS": None if o.dS is None else round(o.dS, 6),
                "decision": o.decision.value, "answered": o.answered,
                "clicks": [{"x": c.x, "y": c.y, "positive": c.positive} for c in o.clicks],
            } for label, o in r.objects.items()},
        })
    return {
        "frames_total": len(session.frames), "seconds": round(seconds, 3),
        "config": {k: v for k, v in session.config.__dict__.items()},
        "review_frames": session.review_frames,
        "review_frame_names": [names[t] for t in session.review_frames],
        "pseudo_frames": [f["frame"] for f in frames if f["decision"] == "pseudo"],
        "frames": frames,
    }


def cmd_score(a: argparse.Namespace) -> int:
    from . import metrics

    result = metrics.score_dirs(a.pred, a.gt)
    print(f"{'sequence':24s} {'J&F':>7s} {'J':>7s} {'F':>7s} {'R@0.5':>7s}")
    for name, s in result["sequences"].items():
        print(f"{name:24s} {100 * s['J&F']:7.2f} {100 * s['J']:7.2f} {100 * s['F']:7.2f} {100 * s['R@0.5']:7.2f}")
    print(f"{'ALL':24s} {100 * result['J&F']:7.2f} {100 * result['J']:7.2f} {100 * result['F']:7.2f} {100 * result['R@0.5']:7.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, default=float))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluation import evaluate

    settings = _settings(a)
    summary = evaluate(a.data, a.out, mode=a.mode, sequences=a.sequences, settings=settings,
                       config=_lazy_config(a, settings), robot=a.robot, correction=a.correction, k=a.k, seed=a.seed,
                       save_masks=not a.no_masks)
    print((Path(a.out) / "table.md").read_text())
    print(f"J&F {100 * summary['J&F']:.1f}, N_oI {summary['N_oI']}, rate {100 * summary['interaction_rate']:.2f} %, "
          f"{summary['fps']:.1f} fps, Lazy layer {100 * summary['lazy_overhead']:.1f} % of propagation time, "
          f"Spearman(S, 1-IoU) {summary['spearman_S_error']:.3f}, "
          f"Spearman(S + failure score, 1-IoU) {summary['spearman_failure_error']:.3f}")
    return 0


def cmd_weights_download(a: argparse.Namespace) -> int:
    from . import weights

    if a.model == "xmem":
        path = weights.download_xmem(a.variant, a.dir, a.url, progress=not a.quiet)
    elif a.model == "sam-hq":
        path = weights.download_sam_hq(a.type, a.dir, a.url, progress=not a.quiet)
    elif a.model == "sam2":
        path = weights.download_sam2(a.type, a.dir, a.url, progress=not a.quiet)
    else:
        path = weights.download_sam(a.type, a.dir, a.url, progress=not a.quiet)
    print(path)
    return 0


def _weights_parser(sub: argparse._SubParsersAction) -> None:
    from .weights import SAM2_SIZES, SAM_FILES, SAM_HQ_FILES, XMEM_VARIANTS

    p = sub.add_parser("weights", help="manage model checkpoints")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    d = wsub.add_parser("download", help="download an official checkpoint (resumable, checked by loading it)")
    msub = d.add_subparsers(dest="model", required=True)
    for name, help_ in (("xmem", "XMem release v1.0 checkpoint"), ("sam", "Segment Anything checkpoint"),
                        ("sam-hq", "SAM-HQ checkpoint (the Lazy-XMem paper's refiner: vit_l)"),
                        ("sam2", "SAM 2.1 checkpoint (the sam2 propagator and refiner)")):
        m = msub.add_parser(name, help=help_)
        if name == "xmem":
            m.add_argument("--variant", choices=XMEM_VARIANTS, default="XMem", help="which XMem weights (default XMem)")
        elif name == "sam-hq":
            m.add_argument("--type", choices=tuple(SAM_HQ_FILES), default="vit_l",
                           help="SAM-HQ model type (default vit_l, the paper's)")
        elif name == "sam2":
            m.add_argument("--type", choices=tuple(SAM2_SIZES), default="tiny",
                           help="SAM 2.1 model (default tiny, the fastest; large is the most accurate)")
        else:
            m.add_argument("--type", choices=tuple(SAM_FILES), default="vit_h", help="SAM model type (default vit_h)")
        m.add_argument("--dir", default=None, help="target folder (default: MODEL_DIR or ./models)")
        m.add_argument("--url", default=None,
                       help="mirror: base URL (the file name is appended) or the file's URL; default LAZYXMEM_WEIGHTS_URL "
                            "or the official release")
        m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        m.set_defaults(func=cmd_weights_download)


def build_parser(extend: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The core's commands; ``extend(subparsers)`` lets an application add its own (the backend's)."""
    parser = argparse.ArgumentParser(prog="lazyxmem", description="Lazy-XMem: uncertainty-driven video object segmentation")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("propagate", help="propagate masks through a video and flag frames for review")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--frames", help="folder of frames (.jpg/.png), ordered by name")
    src.add_argument("--video", help="video file")
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--mask", help="index PNG of the initial mask")
    m.add_argument("--masks", help="folder of index PNGs named like the frames (any subset of frames)")
    p.add_argument("--mask-frame", type=int, default=0, help="frame index of --mask (default 0)")
    p.add_argument("--out", required=True, help="output folder for the index PNG masks")
    p.add_argument("--no-lazy", action="store_true", help="plain propagation: no correction, no veto")
    p.add_argument("--save-probs", help="write the propagator's probabilities (prob_t{t}) to this .npz")
    p.add_argument("--report", help="per-frame JSON report (default OUT/report.json)")
    _engine_args(p)
    _xmem_args(p)
    _lazy_args(p)
    p.set_defaults(func=cmd_propagate)

    p = sub.add_parser("score", help="J, F, J&F and R@tau of predictions against ground truth (DAVIS layout)")
    p.add_argument("--pred", required=True, help="folder of <sequence>/*.png predictions")
    p.add_argument("--gt", required=True, help="folder of <sequence>/*.png (or <sequence>/masks/*.png) ground truth")
    p.add_argument("--json", help="write the figures to this JSON file")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("eval", help="run the Lazy session with a simulated user and report Table S1 figures")
    p.add_argument("--data", required=True, help="DAVIS-layout folder: <sequence>/frames, <sequence>/masks")
    p.add_argument("--sequences", nargs="*", help="sequence names (default: all)")
    p.add_argument("--mode", choices=("none", "pseudo", "lazy", "rand-lazy", "every-k"), default="lazy")
    p.add_argument("--robot", choices=("tp", "error", "box"), default="tp",
                   help="simulated user: tp (a click at the object's interior point), error (a click on "
                        "the largest error region), box (the object's bounding box)")
    p.add_argument("--correction", choices=("refiner", "oracle"), default="refiner",
                   help="refiner: clicks go to the refiner; oracle: the GT mask replaces the prediction")
    p.add_argument("--k", type=int, default=None, help="every-k: the period (default: Lazy's budget)")
    p.add_argument("--seed", type=int, default=0, help="Rand-Lazy seed")
    p.add_argument("--no-masks", action="store_true", help="do not write the predicted masks")
    p.add_argument("--out", required=True, help="output folder")
    _engine_args(p)
    _lazy_args(p)
    p.set_defaults(func=cmd_eval)

    _weights_parser(sub)
    if extend is not None:
        extend(sub)
    return parser


def main(argv: list[str] | None = None, extend: Callable[[Any], None] | None = None) -> int:
    args = build_parser(extend).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except LazyXMemError as exc:
        print(f"lazyxmem: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"lazyxmem: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
