"""The CUDA paths on a GPU host: XMem fp32 / AMP against the CPU, speed, memory; SAM; a Lazy run;
SAM 2.1 against the official predictor.

    python bench/gpu_check.py [--seqs DIR] [--xmem-checkpoint XMem.pth] [--sam-checkpoint sam.pth
        --sam-type vit_b] [--sam2-checkpoint sam2.1_hiera_tiny.pt] [--frames 30] [--long 4000]
        [--only STEP ...] [--no-sam2] [--out report.json]

DIR holds DAVIS-layout sequences (<seq>/frames/*.jpg, <seq>/masks/*.png); default
$LAZYXMEM_DATA/davis2016 (LAZYXMEM_DATA defaults to ../shared/data beside the repo). The one with
the most objects on its first annotated frame is used for XMem and SAM 2, the first with a mask
on every frame for SAM and the Lazy run. Without checkpoints the weights are random in the
official layouts (saved to a temporary folder and loaded through the real loaders), so the
masks mean nothing but every number below is about the CUDA code paths themselves:

1. XMem on CUDA (fp32, with cuDNN's default TF32 and with TF32 off) against XMem on the CPU,
   same weights and frames: max |dp| over the frames.
   Then each stage alone (key / value encoder, memory read, decoder), fed the CPU's inputs.
2. XMem on CUDA with AMP (fp16 autocast) against CUDA fp32: max |dp|, mask agreement (IoU).
3. Median ms/frame at 854x480 after warm-up: CUDA fp32, CUDA AMP, CPU (all of the host's cores),
   1 and 2 objects.
4. GPU memory on a long synthetic 480p video (``--long`` frames): peak allocated every 10 % of the
   video, which must level off once long-term memory is full.
5. SAM on CUDA: the checkpoint through the real loader, ms per image encode and per prompt,
   mask agreement with the same refine on the CPU.
6. The whole Lazy loop (evaluation.run_sequence) on CUDA with XMem + SAM and the TP robot,
   with user corrections forced on two frames.
7. SAM 2.1 (``--sam2-checkpoint``, else random tiny weights, the same for both sides) at
   ``--sam2-size`` (1024): our SAM2Propagator in fp32 and in bf16 autocast, and the official
   SAM2VideoPredictor driven the usual way (init_state on the frames as JPEGs, add_new_mask per
   object, propagate_in_video) in fp32 and bf16 autocast, on the first ``--sam2-frames`` frames.
   Median ms/frame after 2 warm-up frames, peak GPU memory, and the max |logit difference|
   between ours and the official per precision (fp32 is the parity figure). Skipped with
   --no-sam2, or when the sam2 package is not installed (unless asked for with --only sam2).
   Without a GPU, ``--device cpu --sam2-size 256 --sam2-frames 4 --only sam2`` smoke-tests it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lazyxmem_core.engines import EngineSettings, lazy_config  # noqa: E402
from lazyxmem_core.evaluation import EvalSequence, run_sequence  # noqa: E402
from lazyxmem_core.metrics import jaccard  # noqa: E402
from lazyxmem_core.types import Click  # noqa: E402
from lazyxmem_core.xmem import XMemConfig, XMemPropagator  # noqa: E402
from lazyxmem_core.xmem.random_weights import save_random_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

DEV = "cuda"  # --device cpu: a smoke test of this script without a GPU


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_xmem(ckpt: str, device: str, frames: list[np.ndarray], given: np.ndarray, amp: bool = False,
             timed: bool = False) -> tuple[list[np.ndarray], list[float]]:
    prop = XMemPropagator.from_checkpoint(ckpt, device=device, config=XMemConfig(amp=amp))
    prop.video_length = len(frames)
    probs, ms = [], []
    for t, f in enumerate(frames):
        sync()
        t0 = time.perf_counter()
        p = prop.step(f, given if t == 0 else None)
        prop.commit()
        sync()
        ms.append(1000 * (time.perf_counter() - t0))
        if not timed:
            probs.append(p)
    return probs, ms


def xmem_checks(ckpt: str, seq: EvalSequence, n: int, report: dict) -> None:
    frames = [seq.frames[t] for t in range(min(n, len(seq.frames)))]
    given = seq.initial_masks()[0]
    labels = sorted(int(v) for v in np.unique(given) if v)
    cpu, _ = run_xmem(ckpt, "cpu", frames, given)
    gpu, _ = run_xmem(ckpt, DEV, frames, given)
    amp, _ = run_xmem(ckpt, DEV, frames, given, amp=True)
    # cuDNN runs fp32 convolutions in TF32 by default on Ampere and later (as the official
    # eval does): the same run with TF32 off tells rounding from a bug.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    exact, _ = run_xmem(ckpt, DEV, frames, given)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    d_exact = [float(np.abs(a - b).max()) for a, b in zip(cpu, exact)]
    d_gpu = [float(np.abs(a - b).max()) for a, b in zip(cpu, gpu)]
    d_amp = [float(np.abs(a - b).max()) for a, b in zip(gpu, amp)]
    iou_amp = [jaccard(a.argmax(0) > 0, b.argmax(0) > 0) for a, b in zip(gpu, amp)]
    report["xmem_parity"] = {
        "sequence": seq.name, "frames": len(frames), "objects": labels,
        "cuda_fp32_vs_cpu_max_abs_dp": max(d_gpu), "cuda_fp32_vs_cpu_median_abs_dp": statistics.median(d_gpu),
        "cuda_fp32_no_tf32_vs_cpu_max_abs_dp": max(d_exact), "tf32_default": tf32[0],
        "cuda_fp32_no_tf32_vs_cpu_per_frame": [float(f"{d:.2g}") for d in d_exact],
        "amp_vs_fp32_max_abs_dp": max(d_amp), "amp_vs_fp32_median_abs_dp": statistics.median(d_amp),
        "amp_vs_fp32_min_fg_iou": min(iou_amp),
    }
    print("xmem parity", json.dumps(report["xmem_parity"]), flush=True)

    speed = {}
    frames480 = [cv2.resize(f, (854, 480)) for f in frames]
    given480 = cv2.resize(given, (854, 480), interpolation=cv2.INTER_NEAREST)
    for nobj in (1, 2):
        g = given480 if nobj == 2 and len(labels) >= 2 else np.where(given480 == labels[0], 1, 0).astype(np.uint8)
        if nobj == 2 and len(labels) < 2:
            continue
        for name, dev, amp_ in (("cuda_fp32", DEV, False), ("cuda_amp", DEV, True), ("cpu", "cpu", False)):
            _, ms = run_xmem(ckpt, dev, frames480, g, amp=amp_, timed=True)
            speed[f"{name}_{nobj}obj_ms"] = statistics.median(ms[2:])
    speed["cpu_threads"] = torch.get_num_threads()
    report["xmem_speed_854x480"] = speed
    print("xmem speed", json.dumps(speed), flush=True)


def stage_checks(ckpt: str, seq: EvalSequence, report: dict) -> None:
    """Each XMem stage on CUDA (TF32 off) against the CPU, fed the CPU's own inputs, so a
    difference is that stage's and not an earlier one's: key and value encoders on frame 0, a
    memory read on frame 1 (memory written from frame 0), the decoder. Relative max |d|."""
    from lazyxmem_core.xmem.inference.core import Geometry, prepare_image, prepare_masks
    from lazyxmem_core.xmem.inference.memory import MemoryConfig, MemoryManager
    from lazyxmem_core.xmem.model import XMemNet
    from lazyxmem_core.xmem.propagator import load_xmem_state_dict

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    sd, _ = load_xmem_state_dict(ckpt)
    nc, ng = XMemNet.from_state_dict(sd).eval(), XMemNet.from_state_dict(sd).eval().to(DEV)
    given = seq.initial_masks()[0]
    labels = sorted(int(v) for v in np.unique(given) if v)
    geo = Geometry.of(*given.shape, 480)
    img = [prepare_image(torch.from_numpy(np.ascontiguousarray(seq.frames[t])), geo) for t in (0, 1)]
    masks = prepare_masks(torch.stack([torch.from_numpy(given == v) for v in labels]).float(), geo)
    out: dict[str, float] = {}

    def rel(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.float(), b.float().cpu()
        out[name] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))

    with torch.inference_mode():
        kc = [nc.encode_key(i) for i in img]
        kg = ng.encode_key(img[0].to(DEV))
        for k in kc[0]:
            rel(f"key_encoder_{k}", kc[0][k], kg[k])
        hid = torch.zeros(len(labels), nc.hidden_dim, *kc[0]["key"].shape[-2:])
        vc, hc = nc.encode_value(img[0], kc[0]["f16"], masks, hid, True)
        vg, hg = ng.encode_value(img[0].to(DEV), kc[0]["f16"].to(DEV), masks.to(DEV), hid.to(DEV), True)
        rel("value_encoder", vc, vg)
        rel("hidden_deep_update", hc, hg)
        reads = []
        for dev in ("cpu", DEV):
            mem = MemoryManager(MemoryConfig(), nc.hidden_dim)
            mem.write(kc[0]["key"][0].to(dev), kc[0]["shrinkage"][0].to(dev), kc[0]["selection"][0].to(dev),
                      vc.to(dev), list(range(len(labels))))
            reads.append(mem.read(kc[1]["key"][0].to(dev), kc[1]["selection"][0].to(dev)))
        rel("memory_readout", reads[0], reads[1])
        dc = nc.decode(kc[1], reads[0], hc)
        dg = ng.decode({k: v.to(DEV) for k, v in kc[1].items()}, reads[0].to(DEV), hc.to(DEV))
        for i, (a, b) in enumerate(zip(dc, dg)):
            rel(f"decoder_output_{i}", a, b)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    report["xmem_stages_rel_max_abs_d"] = out
    print("xmem stages", json.dumps(out), flush=True)


def memory_check(ckpt: str, n: int, report: dict) -> None:
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 255, (48, 96, 3), dtype=np.uint8), (854 + n // 4 + 8, 480),
                      interpolation=cv2.INTER_CUBIC)
    given = np.zeros((480, 854), np.uint8)
    cv2.ellipse(given, (427, 240), (150, 110), 0, 0, 360, 1, -1)
    prop = XMemPropagator.from_checkpoint(ckpt, device=DEV, config=XMemConfig(amp=True))
    prop.video_length = n
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    peaks, elements = [], []
    t0 = time.perf_counter()
    for t in range(n):
        x = (t // 4) % (base.shape[1] - 854)
        prop.step(np.ascontiguousarray(base[:, x:x + 854]), given if t == 0 else None)
        prop.commit()
        if (t + 1) % max(1, n // 10) == 0:
            peaks.append(round(torch.cuda.max_memory_allocated() / 2**20, 1) if DEV == "cuda" else 0.0)
            elements.append(prop.memory_elements)
    sync()
    report["xmem_long_video"] = {"frames": n, "amp": True, "peak_alloc_MiB_every_10pct": peaks,
                                 "memory_elements_every_10pct": elements,
                                 "fps": n / (time.perf_counter() - t0)}
    print("xmem memory", json.dumps(report["xmem_long_video"]), flush=True)


def sam_checks(ckpt: str, sam_type: str, seq: EvalSequence, report: dict) -> None:
    from lazyxmem_core.sam.refiner import SamRefiner

    frame = seq.frames[0]
    gt = seq.gt[0] > 0
    ys, xs = np.nonzero(gt)
    click = Click(float(xs.mean()), float(ys.mean()), True)
    out = {}
    masks = {}
    for dev in (DEV, "cpu"):
        ref = SamRefiner(ckpt, sam_type, device=dev)
        enc, dec = [], []
        for k in range(3 if dev == DEV else 1):
            sync()
            t0 = time.perf_counter()
            m = ref.refine(frame, [click], frame_id=("enc", k))  # a new id: a new encode
            sync()
            enc.append(1000 * (time.perf_counter() - t0))
            t0 = time.perf_counter()
            ref.refine(frame, [click, Click(click.x + 5, click.y, False)], frame_id=("enc", k))
            sync()
            dec.append(1000 * (time.perf_counter() - t0))
        masks[dev] = m
        out[f"{dev}_encode_plus_prompt_ms"] = statistics.median(enc)
        out[f"{dev}_prompt_only_ms"] = statistics.median(dec)
    out["cuda_vs_cpu_mask_iou"] = jaccard(masks[DEV], masks["cpu"])
    out["mask_pixels"] = int(masks[DEV].sum())
    report["sam"] = out
    print("sam", json.dumps(out), flush=True)


def lazy_check(xmem: str, sam: str, sam_type: str, seq: EvalSequence, report: dict) -> None:
    st = EngineSettings(engine="xmem", refiner="sam", xmem_checkpoint=xmem, sam_checkpoint=sam,
                        sam_type=sam_type, device=DEV)
    t0 = time.perf_counter()
    # Random weights rarely trigger a request: force two, so SAM and the IDU write run on CUDA.
    res = run_sequence(seq, "lazy", st, config=lazy_config(st), forced_user={10: [1], 30: [1]})
    report["lazy_cuda"] = {"sequence": seq.name, "frames": len(seq.frames), "interactions": res.interactions,
                           "seconds": time.perf_counter() - t0}
    print("lazy", json.dumps(report["lazy_cuda"]), flush=True)


def sam2_checks(ckpt: str | None, sam2_type: str | None, size: int, seq: EvalSequence | None, n: int,
                report: dict) -> None:
    from PIL import Image

    from lazyxmem_core.sam2.model import VIDEO_PREDICTOR_CLASS, build_model, load_checkpoint
    from lazyxmem_core.sam2.propagator import SAM2Config, SAM2Propagator

    if ckpt:
        ours_model = load_checkpoint(ckpt, sam2_type, size, DEV)
        off = load_checkpoint(ckpt, sam2_type, size, DEV, target=VIDEO_PREDICTOR_CLASS)
    else:
        sam2_type = sam2_type or "tiny"
        ours_model = build_model(sam2_type, size, seed=0).to(DEV)
        off = build_model(sam2_type, size, target=VIDEO_PREDICTOR_CLASS)
        off.load_state_dict(ours_model.state_dict(), strict=True)
        off = off.to(DEV).eval()
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_sam2_"))
    try:
        # The official loader reads a folder of <index>.jpg: the sequence's first annotated frame
        # and the next ones are copied (re-encoded only when not JPEG), and ours decodes the same
        # files the same way (PIL), so both sides see identical pixels.
        if seq is not None:
            start = min(seq.initial_masks())
            given = seq.initial_masks()[start]
            files = seq.frames.files[start:start + n]
            for i, f in enumerate(files):
                if f.suffix.lower() in (".jpg", ".jpeg"):
                    shutil.copyfile(f, tmp / f"{i:05d}.jpg")
                else:
                    Image.open(f).convert("RGB").save(tmp / f"{i:05d}.jpg", quality=95)
            name = seq.name
        else:  # no data: a disc moving on a gradient
            h, w = 480, 854
            grad = np.linspace(40, 200, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
            for i in range(n):
                f = grad.astype(np.uint8).copy()
                cv2.circle(f, (200 + 8 * i, 240), 90, (220, 40, 40), -1)
                Image.fromarray(f).save(tmp / f"{i:05d}.jpg", quality=95)
            given = np.zeros((h, w), np.uint8)
            cv2.circle(given, (200, 240), 90, 1, -1)
            name = "synthetic"
        jpgs = sorted(tmp.glob("*.jpg"))
        frames = [np.asarray(Image.open(p).convert("RGB")) for p in jpgs]
        hw = frames[0].shape[:2]
        labels = sorted(int(v) for v in np.unique(given) if v not in (0, 255))
        given = np.where(np.isin(given, labels), given, 0).astype(np.uint8)

        def peak_start() -> None:
            if DEV == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

        def peak() -> float:
            return round(torch.cuda.max_memory_allocated() / 2**20, 1) if DEV == "cuda" else 0.0

        def run_ours(bf16: bool) -> tuple[list[torch.Tensor], list[float], float]:
            peak_start()
            prop = SAM2Propagator(ours_model, SAM2Config(image_size=size, bf16=bf16), video_length=len(frames))
            logits, ms = [], []
            for t, f in enumerate(frames):
                sync()
                t0 = time.perf_counter()
                prop.step(f, given if t == 0 else None)
                sync()
                t1 = time.perf_counter()
                # The pending step's per-object logits at the video's size, as the official
                # yields them; read outside the timed part (a check, not an API).
                low = torch.cat([prop._pending.outs[k]["pred_masks"].float() for k in prop.labels])
                logits.append(torch.nn.functional.interpolate(low, size=hw, mode="bilinear",
                                                              align_corners=False)[:, 0].cpu())
                t2 = time.perf_counter()
                prop.commit()
                sync()
                ms.append(1000 * (t1 - t0 + time.perf_counter() - t2))
            return logits, ms, peak()

        def run_official(bf16: bool) -> tuple[list[torch.Tensor], list[float], float]:
            peak_start()
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast(DEV, enabled=False)
            with torch.inference_mode(), ctx:
                state = off.init_state(str(tmp))
                for k in labels:
                    off.add_new_mask(state, 0, k, given == k)
                logits, ms = [], []
                gen = off.propagate_in_video(state)
                for _ in frames:
                    sync()
                    t0 = time.perf_counter()
                    _, _, out = next(gen)
                    sync()
                    ms.append(1000 * (time.perf_counter() - t0))
                    logits.append(out[:, 0].float().cpu())
                gen.close()
            return logits, ms, peak()

        def compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
            # SAM 2 sets a whole mask to -1024 when its object score is <= 0: one object found
            # present by one side only gives a ~1000 difference that says nothing about the rest.
            worst = worst_present = 0.0
            presence, ious = 0, []
            for x, y in zip(a, b):
                for xo, yo in zip(x, y):
                    d = float((xo - yo).abs().max())
                    worst = max(worst, d)
                    px, py = bool(xo.max() > -1000), bool(yo.max() > -1000)
                    if px != py:
                        presence += 1
                    elif px:
                        worst_present = max(worst_present, d)
                    ious.append(jaccard(xo.numpy() > 0, yo.numpy() > 0))
            return {"max_abs_logit_diff": worst, "max_abs_logit_diff_both_present": worst_present,
                    "presence_disagreements": presence, "min_mask_iou": min(ious)}

        out: dict = {"sequence": name, "frames": len(frames), "objects": labels, "image_size": size,
                     "type": sam2_type or "read from the checkpoint",
                     "weights": ckpt or "random (seed 0), the same for both",
                     "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                     "tf32_cudnn": torch.backends.cudnn.allow_tf32}
        runs = {"ours_fp32": run_ours(False), "official_fp32": run_official(False)}
        if DEV == "cuda":
            runs["ours_bf16"] = run_ours(True)
            runs["official_bf16"] = run_official(True)
        else:
            out["bf16"] = "skipped: ours' bf16 autocast needs CUDA"
        for key, (_, ms, pk) in runs.items():
            out[f"{key}_ms"] = statistics.median(ms[2:] or ms)
            out[f"{key}_peak_alloc_MiB"] = pk
        out["ours_vs_official_fp32"] = compare(runs["ours_fp32"][0], runs["official_fp32"][0])
        if "ours_bf16" in runs:
            out["ours_vs_official_bf16"] = compare(runs["ours_bf16"][0], runs["official_bf16"][0])
            out["ours_bf16_vs_ours_fp32"] = compare(runs["ours_bf16"][0], runs["ours_fp32"][0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["sam2"] = out
    print("sam2", json.dumps(out), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = Path(os.environ.get("LAZYXMEM_DATA") or ROOT.parent / "shared" / "data") / "davis2016"
    ap.add_argument("--seqs", default=str(data), help=f"DAVIS-layout sequences (default {data})")
    ap.add_argument("--xmem-checkpoint")
    ap.add_argument("--sam-checkpoint")
    ap.add_argument("--sam-type", default="vit_b")
    ap.add_argument("--sam2-checkpoint", help="official SAM 2.1 checkpoint (default: random weights)")
    ap.add_argument("--sam2-type", help="tiny, small, base_plus, large (default: read from the checkpoint; tiny "
                                        "for random weights)")
    ap.add_argument("--sam2-size", type=int, default=1024, help="SAM 2 image size (default 1024)")
    ap.add_argument("--sam2-frames", type=int, help="frames for the SAM 2 step (default --frames)")
    ap.add_argument("--no-sam2", action="store_true", help="skip the SAM 2 step")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--long", type=int, default=4000)
    ap.add_argument("--out")
    ap.add_argument("--only", nargs="*", choices=("xmem", "stages", "memory", "sam", "lazy", "sam2"),
                    help="run these steps only")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    a = ap.parse_args()
    global DEV
    DEV = a.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: run this on a GPU host", file=sys.stderr)
        return 2
    report: dict = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "none", "torch": torch.__version__}
    tmp = Path(tempfile.mkdtemp())
    ckpts: dict[str, str] = {}

    # Random checkpoints are made when a step first needs them: --only sam2 needs neither
    # (nor the segment_anything package).
    def xmem() -> str:
        if "xmem" not in ckpts:
            ckpts["xmem"] = a.xmem_checkpoint or str(save_random_checkpoint(tmp / "xmem_random.pth"))
        return ckpts["xmem"]

    def sam() -> str:
        if "sam" not in ckpts:
            ckpts["sam"] = a.sam_checkpoint
            if ckpts["sam"] is None:
                from segment_anything import sam_model_registry

                torch.manual_seed(0)
                ckpts["sam"] = str(tmp / f"sam_{a.sam_type}_random.pth")
                torch.save(sam_model_registry[a.sam_type]().state_dict(), ckpts["sam"])
        return ckpts["sam"]

    root = Path(a.seqs)
    seqs = [EvalSequence.load(p) for p in sorted(root.iterdir()) if (p / "masks").is_dir()] if root.is_dir() else []
    multi = max(seqs, key=lambda s: len(np.unique(s.initial_masks()[min(s.initial_masks())]))) if seqs else None
    full = next((s for s in seqs if len(s.gt) == len(s.frames)), None)

    def need(seq: EvalSequence | None) -> EvalSequence:
        if seq is None:
            raise RuntimeError(f"no usable DAVIS-layout sequence under {root}: pass --seqs or set LAZYXMEM_DATA")
        return seq

    sam2_frames = a.sam2_frames or a.frames
    steps = [("xmem", lambda: xmem_checks(xmem(), need(multi), a.frames, report)),
             ("stages", lambda: stage_checks(xmem(), need(multi), report)),
             ("memory", lambda: memory_check(xmem(), a.long, report)),
             ("sam", lambda: sam_checks(sam(), a.sam_type, need(full), report)),
             ("lazy", lambda: lazy_check(xmem(), sam(), a.sam_type, need(full), report)),
             ("sam2", lambda: sam2_checks(a.sam2_checkpoint, a.sam2_type, a.sam2_size, multi, sam2_frames, report))]
    failed = []
    for name, fn in steps:
        if a.only and name not in a.only:
            continue
        if name == "sam2" and (a.no_sam2 or importlib.util.find_spec("sam2") is None):
            if a.only and not a.no_sam2:  # asked for by name: a missing package is a failure
                report["sam2_error"] = "the sam2 package is not installed (requirements-sam2.txt)"
                failed.append(name)
            else:
                report["sam2_skipped"] = "--no-sam2" if a.no_sam2 else "the sam2 package is not installed"
            continue
        try:
            fn()
        except Exception as e:  # report every step, not just the first failure
            import traceback

            traceback.print_exc()
            report[f"{name}_error"] = f"{type(e).__name__}: {e}"
            failed.append(name)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
