"""Our SAM 2.1 propagator against the official SAM2VideoPredictor on the CPU: time per frame and
memory over a long video, side by side in one run.

    .venv/bin/python bench/sam2_propagator.py [--quick] [--out runs/sam2_propagator.json]
        [--type tiny] [--speed 512:20,1024:8] [--objects 1,3] [--threads N]
        [--long-frames 5000 --long-size 128 --official-frames 600]

Both run on the same random weights: our model is built from the package's config with a seed,
the official predictor from the same config (``target=SAM2VideoPredictor``) and given our state
dict, so both execute the same modules and the times are those of the real code paths (random
weights do not change the amount of work; the masks mean nothing). The official predictor is
driven the usual way: ``init_state`` on a folder of JPEGs, ``add_new_mask`` on frame 0 for each
object, ``propagate_in_video``. Ours is fed the same decoded JPEGs frame by frame (``step`` +
``commit``). No post-processing on either side (the official VOS evaluation's setting).

1. Time per frame at each image size and object count: the two alternate frame by frame (so a
   load change on the host hits both alike), median and p90 over the frames after the warm-up.
   The official figure is the time between two frames yielded by ``propagate_in_video``; its
   ``init_state`` (loading every frame) and ``add_new_mask`` are reported apart. Ours includes the
   per-frame resize and normalisation that the official does up front in ``init_state``.
   SAM 2 reads the last ``num_maskmem - 1`` = 6 frames' memory, so time per frame rises until
   frame 7; a run shorter than that reports a partly filled memory (the same for both).
   The max |logit difference| between the two shows they computed the same thing. At the end of
   each run the bytes each side holds are counted too (ours' ``memory_bytes``; the official's
   outputs per frame and object, and its ``images`` per frame), so the memory at the model's real
   image sizes is measured as well, not only at the long run's reduced one.
2. Memory over a long synthetic video (moving coloured discs with noise, made frame by frame and
   never stored for ours) at a reduced image size. Ours: ``memory_bytes``, the process RSS and
   the time per frame at the sample points. The official predictor keeps every frame (the
   ``images`` tensor, loaded up front, and every frame's outputs), so it runs on a shorter video
   written as JPEGs to a temporary folder (deleted afterwards); its bytes are counted the same
   way (distinct tensor storages) in ``inference_state["output_dict_per_obj"]`` plus ``images``,
   and the growth per frame is extrapolated linearly to the long video's length. Each side runs
   in a fresh process so the RSS of one does not include what the other left behind.
   The default long run is at image size 128: at 256 ours' 5000 frames alone take about 20
   minutes on a 2-core host. What is stored per frame scales with the image size squared (the
   speed runs measure it at 512 and 1024); whether it stays flat does not depend on the size.

Threads: torch's default unless --threads (also in the memory runs' processes). The host's load
average is printed and saved: on a shared, oversubscribed host torch's threads wait on each
other at every parallel region and times rise several-fold (one thread can then be faster).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# propagate_in_video and the JPEG loader draw tqdm bars on stderr: thousands of lines in a log.
# tqdm reads TQDM_* variables when it is imported, so this must precede every import of it.
os.environ.setdefault("TQDM_DISABLE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lazyxmem_core.sam2.model import VIDEO_PREDICTOR_CLASS, build_model  # noqa: E402
from lazyxmem_core.sam2.propagator import SAM2Config, SAM2Propagator  # noqa: E402

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 200, 40)]


class SyntheticVideo:
    """Coloured discs moving on a smooth background, with per-frame noise. Frame t is a pure
    function of t (its noise is seeded by t), so any frame can be made again on demand."""

    def __init__(self, h: int, w: int, objects: int, seed: int = 0) -> None:
        self.h, self.w, self.objects, self.seed = h, w, objects, seed
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.background = np.stack([60 + 60 * xx / w, 70 + 50 * yy / h, 90 + 40 * (xx + yy) / (w + h)],
                                   axis=-1).astype(np.uint8)

    def discs(self, t: int) -> list[tuple[int, int, int]]:
        h, w = self.h, self.w
        out = []
        for k in range(self.objects):
            # Different periods per object: the discs cross and occlude each other now and then.
            cx = w * (k + 1) / (self.objects + 1) + w / 6 * np.cos(t / (23 + 7 * k) + k)
            cy = h / 2 + h / 4 * np.sin(t / (17 + 5 * k) + 2 * k)
            out.append((int(cx), int(cy), max(4, min(h, w) // 7)))
        return out

    def frame(self, t: int) -> np.ndarray:
        f = self.background.copy()
        for k, (cx, cy, r) in enumerate(self.discs(t)):
            cv2.circle(f, (cx, cy), r, COLOURS[k % len(COLOURS)], -1)
        noise = np.random.default_rng((self.seed, t)).integers(0, 24, f.shape, dtype=np.uint8)
        return np.minimum(f.astype(np.uint16) + noise, 255).astype(np.uint8)

    def mask(self, t: int) -> np.ndarray:
        m = np.zeros((self.h, self.w), np.uint8)
        for k, (cx, cy, r) in enumerate(self.discs(t)):
            cv2.circle(m, (cx, cy), r, k + 1, -1)
        return m

    def write_jpegs(self, folder: Path, n: int) -> None:
        """The official loader's layout: <index>.jpg, sorted by the integer in the name."""
        folder.mkdir(parents=True, exist_ok=True)
        for t in range(n):
            Image.fromarray(self.frame(t)).save(folder / f"{t:05d}.jpg", quality=95)


def read_jpeg(path: Path) -> np.ndarray:
    # The decode the official loader does (PIL, RGB), so both sides see the same pixels.
    return np.asarray(Image.open(path).convert("RGB"))


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return -1


def tensor_bytes(obj: Any, seen: dict[int, int] | None = None) -> dict[int, int]:
    """{storage address: bytes} of every tensor reachable through dicts, lists and tuples: a
    storage shared by several tensors (views, the shared pos-enc) counts once."""
    seen = {} if seen is None else seen
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return seen


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def models(sam2_type: str, size: int, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours and the official predictor with the same random weights."""
    ours = build_model(sam2_type, size, seed=seed)
    official = build_model(sam2_type, size, target=VIDEO_PREDICTOR_CLASS)
    official.load_state_dict(ours.state_dict(), strict=True)
    return ours, official.eval()


def our_logits(prop: SAM2Propagator, hw: tuple[int, int]) -> torch.Tensor:
    """Ours' per-object logits on the pending frame at the video's size, as the official yields
    them (its low-resolution logits, bilinear). Reads the pending step's outputs: a benchmark
    check, not an API."""
    low = torch.cat([prop._pending.outs[label]["pred_masks"].float() for label in prop.labels])
    return F.interpolate(low, size=hw, mode="bilinear", align_corners=False)[:, 0]


# --------------------------------------------------------------------------- 1. time per frame
def speed_case(ours_model: torch.nn.Module, off: torch.nn.Module, size: int, n_obj: int, n: int, warmup: int,
               folder: Path, given: np.ndarray) -> dict:
    files = sorted(folder.glob("*.jpg"))[:n]
    frames = [read_jpeg(p) for p in files]
    hw = frames[0].shape[:2]
    g = np.where(given <= n_obj, given, 0).astype(np.uint8)
    with torch.inference_mode():
        t0 = time.perf_counter()
        state = off.init_state(str(folder), offload_video_to_cpu=True)
        init_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k in range(1, n_obj + 1):
            off.add_new_mask(state, 0, k, g == k)
        add_s = time.perf_counter() - t0
    prop = SAM2Propagator(ours_model, SAM2Config(image_size=size), video_length=n)
    gen = off.propagate_in_video(state)
    t_ours, t_off, diff = [], [], 0.0
    for t, f in enumerate(frames):
        # Alternate frame by frame: a change of load on the host hits both sides alike.
        t0 = time.perf_counter()
        prop.step(f, g if t == 0 else None)
        t1 = time.perf_counter()
        mine = our_logits(prop, hw)  # outside the timed part
        t2 = time.perf_counter()
        prop.commit()
        t_ours.append(t1 - t0 + time.perf_counter() - t2)
        t0 = time.perf_counter()
        idx, _, theirs = next(gen)
        t_off.append(time.perf_counter() - t0)
        assert idx == t, (idx, t)
        diff = max(diff, float((mine - theirs[:, 0]).abs().max()))
    gen.close()
    outputs = sum(tensor_bytes(state["output_dict_per_obj"]).values())
    images = sum(tensor_bytes(state["images"]).values())
    row = {"image_size": size, "objects": n_obj, "frames": n, "warmup": warmup, "video": f"{hw[1]}x{hw[0]}",
           "max_abs_logit_diff": diff, "official_init_state_s": init_s, "official_add_new_mask_s": add_s,
           # What each holds after the n frames, at this image size.
           "ours_memory_bytes": prop.memory_bytes, "official_outputs_bytes": outputs,
           "official_outputs_bytes_per_frame_per_object": outputs / (n * n_obj),
           "official_images_bytes_per_frame": images / n}
    for name, ts in (("ours", t_ours), ("official", t_off)):
        timed = [1000 * x for x in ts[warmup:]]
        row[name] = {"median_ms": statistics.median(timed) if timed else float("nan"),
                     "p90_ms": percentile(timed, 90), "per_frame_ms": [round(1000 * x, 1) for x in ts]}
    row["ratio_ours_over_official"] = row["ours"]["median_ms"] / row["official"]["median_ms"]
    return row


# --------------------------------------------------------------------------- 2. memory
def window_ms(times: list[float], end: int, width: int) -> float:
    """Median ms/frame over the ``width`` frames ending at frame ``end`` (1-based count)."""
    part = times[max(0, end - width):end]
    return 1000 * statistics.median(part) if part else float("nan")


def memory_ours(sam2_type: str, size: int, n: int, hw: tuple[int, int], samples: list[int], width: int,
                seed: int, threads: int | None) -> dict:
    """Runs in its own process: the RSS is ours alone."""
    if threads:
        torch.set_num_threads(threads)
    model = build_model(sam2_type, size, seed=seed)
    video = SyntheticVideo(*hw, objects=1, seed=seed)
    prop = SAM2Propagator(model, SAM2Config(image_size=size), video_length=n)
    rss0 = rss_bytes()
    times, rows = [], []
    given = video.mask(0)
    for t in range(n):
        f = video.frame(t)  # made before the clock starts
        t0 = time.perf_counter()
        prop.step(f, given if t == 0 else None)
        prop.commit()
        times.append(time.perf_counter() - t0)
        if t + 1 in samples:
            rows.append({"frame": t + 1, "memory_bytes": prop.memory_bytes,
                         "tensor_bytes_walk": sum(tensor_bytes([m.view() for m in prop._mem.values()]).values()),
                         "rss_bytes": rss_bytes(), "ms_per_frame": window_ms(times, t + 1, width)})
            print(f"  ours   frame {t + 1:5d}: memory {rows[-1]['memory_bytes'] / 2**20:7.2f} MiB, "
                  f"RSS {rows[-1]['rss_bytes'] / 2**20:6.0f} MiB, {rows[-1]['ms_per_frame']:6.0f} ms/frame", flush=True)
    return {"frames": n, "image_size": size, "video": f"{hw[1]}x{hw[0]}", "rss_before_bytes": rss0,
            "samples": rows, "ms_per_frame_all_median": 1000 * statistics.median(times[2:] or times)}


def memory_official(sam2_type: str, size: int, n: int, hw: tuple[int, int], samples: list[int], width: int,
                    seed: int, extrapolate_to: int, threads: int | None) -> dict:
    """Runs in its own process. The JPEGs are written to a temporary folder, removed at the end."""
    if threads:
        torch.set_num_threads(threads)
    _, off = models(sam2_type, size, seed)
    video = SyntheticVideo(*hw, objects=1, seed=seed)
    tmp = Path(tempfile.mkdtemp(prefix="sam2_bench_"))
    try:
        video.write_jpegs(tmp, n)
        rss0 = rss_bytes()
        with torch.inference_mode():
            t0 = time.perf_counter()
            state = off.init_state(str(tmp), offload_video_to_cpu=True)
            init_s = time.perf_counter() - t0
            off.add_new_mask(state, 0, 1, video.mask(0) == 1)
        images = sum(tensor_bytes(state["images"]).values())
        times, rows = [], []
        gen = off.propagate_in_video(state)
        for t in range(n):
            t0 = time.perf_counter()
            idx, _, _ = next(gen)
            times.append(time.perf_counter() - t0)
            if idx + 1 in samples:
                outputs = sum(tensor_bytes(state["output_dict_per_obj"]).values())
                rows.append({"frame": idx + 1, "outputs_bytes": outputs, "images_bytes": images,
                             "tensor_bytes": outputs + images, "rss_bytes": rss_bytes(),
                             "ms_per_frame": window_ms(times, idx + 1, width)})
                print(f"  official frame {idx + 1:5d}: outputs {outputs / 2**20:7.2f} MiB + images "
                      f"{images / 2**20:7.1f} MiB, RSS {rows[-1]['rss_bytes'] / 2**20:6.0f} MiB, "
                      f"{rows[-1]['ms_per_frame']:6.0f} ms/frame", flush=True)
        gen.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Outputs grow with the frames tracked; images were loaded for the whole video up front, so
    # they grow with the video's length. Both are linear: fit the outputs, scale the images.
    xs = np.array([r["frame"] for r in rows], float)
    slope, icpt = np.polyfit(xs, [r["outputs_bytes"] for r in rows], 1) if len(rows) > 1 else (float("nan"), 0.0)
    rss_slope = np.polyfit(xs, [r["rss_bytes"] for r in rows], 1)[0] if len(rows) > 1 else float("nan")
    per_image = images / n
    return {"frames": n, "image_size": size, "video": f"{hw[1]}x{hw[0]}", "rss_before_init_state_bytes": rss0,
            "init_state_s": init_s, "samples": rows,
            "outputs_bytes_per_frame": float(slope), "images_bytes_per_frame": per_image,
            "rss_bytes_per_frame_fit": float(rss_slope),
            "extrapolated": {"frames": extrapolate_to,
                             "outputs_bytes": float(icpt + slope * extrapolate_to),
                             "images_bytes": per_image * extrapolate_to,
                             "tensor_bytes": float(icpt + slope * extrapolate_to + per_image * extrapolate_to)},
            "ms_per_frame_all_median": 1000 * statistics.median(times[2:] or times)}


def in_fresh_process(fn, *args) -> dict:
    # spawn, not fork: a forked child would start with this process's pages (and RSS).
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
        return ex.submit(fn, *args).result()


# --------------------------------------------------------------------------- output
def mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def markdown(report: dict) -> str:
    lines = []
    if report.get("speed"):
        c = report["config"]
        lines += [f"### Time per frame, CPU, {c['type']}, {report['machine']['torch_threads']} threads "
                  f"(median and p90 after {c['warmup']} warm-up frames; video {report['speed'][0]['video']})", "",
                  "| image size | objects | frames | ours median ms | ours p90 ms | official median ms | "
                  "official p90 ms | ours / official | max abs logit diff |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in report["speed"]:
            lines.append(f"| {r['image_size']} | {r['objects']} | {r['frames']} | {r['ours']['median_ms']:.0f} | "
                         f"{r['ours']['p90_ms']:.0f} | {r['official']['median_ms']:.0f} | "
                         f"{r['official']['p90_ms']:.0f} | "
                         f"{r['ratio_ours_over_official']:.2f} | {r['max_abs_logit_diff']:.2g} |")
        lines += ["", "Bytes held at the end of each timing run (tensors, distinct storages):", "",
                  "| image size | objects | frames | ours memory_bytes MiB | official outputs KiB/frame/object | "
                  "official images KiB/frame |", "|---|---|---|---|---|---|"]
        for r in report["speed"]:
            lines.append(f"| {r['image_size']} | {r['objects']} | {r['frames']} | {mib(r['ours_memory_bytes'])} | "
                         f"{r['official_outputs_bytes_per_frame_per_object'] / 1024:.1f} | "
                         f"{r['official_images_bytes_per_frame'] / 1024:.0f} |")
        lines.append("")
    mem = report.get("memory", {})
    if "ours" in mem:
        o = mem["ours"]
        lines += [f"### Ours over a long video: {o['frames']} synthetic frames {o['video']}, image size "
                  f"{o['image_size']}, 1 object (ms/frame: median of the {report['config']['window']} frames "
                  "before the sample)", "",
                  "| frame | memory_bytes MiB | RSS MiB | ms/frame |", "|---|---|---|---|"]
        for r in o["samples"]:
            lines.append(f"| {r['frame']} | {mib(r['memory_bytes'])} | {r['rss_bytes'] / 2**20:.0f} | "
                         f"{r['ms_per_frame']:.0f} |")
        lines.append("")
    if "official" in mem:
        o = mem["official"]
        lines += [f"### Official SAM2VideoPredictor: {o['frames']} synthetic frames {o['video']} (JPEGs), image size "
                  f"{o['image_size']}, 1 object", "",
                  "| frame | outputs MiB | images MiB | tensors MiB | RSS MiB | ms/frame |",
                  "|---|---|---|---|---|---|"]
        for r in o["samples"]:
            lines.append(f"| {r['frame']} | {mib(r['outputs_bytes'])} | {mib(r['images_bytes'])} | "
                         f"{mib(r['tensor_bytes'])} | {r['rss_bytes'] / 2**20:.0f} | {r['ms_per_frame']:.0f} |")
        e = o["extrapolated"]
        lines += ["", f"Official growth: outputs {o['outputs_bytes_per_frame'] / 1024:.1f} KiB/frame (fit), images "
                  f"{o['images_bytes_per_frame'] / 1024:.1f} KiB/frame (loaded up front), RSS "
                  f"{o['rss_bytes_per_frame_fit'] / 1024:.1f} KiB/frame (fit over the samples). **Extrapolated** to "
                  f"{e['frames']} frames: outputs {mib(e['outputs_bytes'])} MiB + images {mib(e['images_bytes'])} MiB "
                  f"= {mib(e['tensor_bytes'])} MiB of tensors.", ""]
    m = report["machine"]
    lines.append(f"Load average (1 min) at start {m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f} on "
                 f"{m['cpus']} CPUs; total {report['seconds']:.0f} s.")
    return "\n".join(lines)


def parse_speed(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        size, n = part.split(":")
        out.append((int(size), int(n)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run with tiny numbers (about a minute)")
    ap.add_argument("--out", default="runs/sam2_propagator.json", help="JSON with every figure")
    ap.add_argument("--type", default="tiny", choices=("tiny", "small", "base_plus", "large"))
    ap.add_argument("--speed", help="image_size:frames,... (default 512:20,1024:8)")
    ap.add_argument("--objects", default="1,3", help="object counts for the timing (default 1,3)")
    ap.add_argument("--warmup", type=int, default=2, help="frames left out of the median and p90")
    ap.add_argument("--video", default="854x480", help="frame size WxH of the timing video")
    ap.add_argument("--long-frames", type=int, help="ours' long video (default 5000)")
    ap.add_argument("--long-size", type=int, help="image size of the memory runs (default 256)")
    ap.add_argument("--long-video", default="320x180", help="frame size WxH of the memory runs")
    ap.add_argument("--long-samples", help="frames to sample ours at (default 500,1000,2000,3000,4000,5000, "
                                           "plus the official's sample points)")
    ap.add_argument("--official-frames", type=int, help="the official's memory run (default 600)")
    ap.add_argument("--official-every", type=int, help="sample the official every N frames (default 100)")
    ap.add_argument("--window", type=int, help="frames in each sampled ms/frame median (default 50)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("speed", "ours-memory", "official-memory"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    quick = a.quick
    speed = parse_speed(a.speed or ("64:4,128:4" if quick else "512:20,1024:8"))
    long_frames = a.long_frames or (200 if quick else 5000)
    long_size = a.long_size or (64 if quick else 128)
    off_frames = a.official_frames or (100 if quick else 600)
    off_every = a.official_every or (50 if quick else 100)
    window = a.window or (20 if quick else 50)
    off_samples = list(range(off_every, off_frames + 1, off_every))
    if a.long_samples:
        ours_samples = [int(x) for x in a.long_samples.split(",")]
    elif quick:
        ours_samples = [100, 200]
    else:
        ours_samples = [500, 1000, 2000, 3000, 4000, 5000]
    # Ours also at the official's points: the two are then compared at the same frame.
    ours_samples = sorted({s for s in ours_samples + off_samples if s <= long_frames})
    objects = [int(x) for x in a.objects.split(",")]
    vw, vh = (int(x) for x in a.video.split("x"))
    lw, lh = (int(x) for x in a.long_video.split("x"))

    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "loadavg_start": os.getloadavg(),
                    "threads_set_by": "--threads" if a.threads else "torch default"},
        "config": {"type": a.type, "speed": speed, "objects": objects, "warmup": a.warmup, "video": a.video,
                   "long_frames": long_frames, "long_size": long_size, "long_video": a.long_video,
                   "official_frames": off_frames, "ours_samples": ours_samples, "official_samples": off_samples,
                   "window": window, "seed": a.seed, "quick": quick, "weights": "random, same for both"},
    }
    try:
        from importlib.metadata import version

        report["machine"]["sam2"] = version("sam2")
    except Exception:  # only a label in the report
        report["machine"]["sam2"] = "unknown"
    print(f"SAM 2.1 {a.type}, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"({report['machine']['threads_set_by']}), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    start = time.perf_counter()

    if "speed" not in a.skip:
        report["speed"] = []
        video = SyntheticVideo(vh, vw, objects=max(objects), seed=a.seed)
        tmp = Path(tempfile.mkdtemp(prefix="sam2_bench_speed_"))
        try:
            folders: dict[int, Path] = {}
            for size, n in speed:
                if n not in folders:  # init_state takes every JPEG of the folder: one folder per length
                    folders[n] = tmp / f"n{n}"
                    video.write_jpegs(folders[n], n)
                ours_model, off = models(a.type, size, a.seed)
                for n_obj in objects:
                    print(f"timing: image size {size}, {n_obj} object(s), {n} frames ...", flush=True)
                    row = speed_case(ours_model, off, size, n_obj, n, a.warmup, folders[n], video.mask(0))
                    report["speed"].append(row)
                    print(f"  ours {row['ours']['median_ms']:.0f} ms (p90 {row['ours']['p90_ms']:.0f}), official "
                          f"{row['official']['median_ms']:.0f} ms (p90 {row['official']['p90_ms']:.0f}), max |dlogit| "
                          f"{row['max_abs_logit_diff']:.2g}", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    report["memory"] = {}
    if "ours-memory" not in a.skip:
        print(f"memory, ours: {long_frames} frames {a.long_video}, image size {long_size} ...", flush=True)
        report["memory"]["ours"] = in_fresh_process(memory_ours, a.type, long_size, long_frames, (lh, lw),
                                                    ours_samples, window, a.seed, a.threads)
    if "official-memory" not in a.skip:
        print(f"memory, official: {off_frames} frames {a.long_video}, image size {long_size} ...", flush=True)
        report["memory"]["official"] = in_fresh_process(memory_official, a.type, long_size, off_frames, (lh, lw),
                                                        off_samples, window, a.seed, long_frames, a.threads)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - start
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print()
    print(markdown(report))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
