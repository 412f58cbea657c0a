"""Time per frame of our XMem engine, optionally side by side with the official implementation.

    .venv/bin/python bench/xmem_speed.py [--checkpoint XMem.pth] [--official /path/to/XMem]
        [--frames DIR --mask PNG] [--n 12] [--threads 2] [--profile]

Frames: 854x480 (DAVIS 480p) from --frames/--mask, else a synthetic smooth video. Working size
480 (the official default). Random official-layout weights unless --checkpoint is given. With
--official (a checkout of hkchengrex/XMem, imported at run time, never vendored) both engines
run in this process on the same frames, alternating frame by frame, threads pinned; printed:
median ms/frame after warm-up (frames 0-1: the given frame and the first propagated one) and
the ratio ours / official, for 1 and 2 objects. --profile: torch.profiler table of ours.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lazyxmem_core.xmem import XMemConfig, XMemPropagator
from lazyxmem_core.xmem.random_weights import random_state_dict


def load_video(a) -> tuple[list[np.ndarray], np.ndarray]:
    if a.frames:
        files = sorted(p for p in Path(a.frames).iterdir() if p.suffix.lower() in (".jpg", ".png"))[: a.n]
        frames = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in files]
        mask = (cv2.imread(a.mask, cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8)
        return frames, mask
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 255, (24, 48, 3), dtype=np.uint8), (1000, 480), interpolation=cv2.INTER_CUBIC)
    frames = [np.ascontiguousarray(base[:, 4 * t:4 * t + 854]) for t in range(a.n)]
    mask = np.zeros((480, 854), np.uint8)
    cv2.ellipse(mask, (427, 240), (150, 110), 0, 0, 360, 1, -1)
    return frames, mask


class Official:
    """The official InferenceCore driven as its eval.py does (mask mapper, resize, end flag)."""

    def __init__(self, root: str, ckpt: str, cfg: XMemConfig, n: int) -> None:
        sys.path.insert(0, root)
        from model import resnet

        for name in ("resnet18", "resnet50"):  # no ImageNet download: the checkpoint has every weight
            orig = getattr(resnet, name)
            setattr(resnet, name, lambda pretrained=True, extra_dim=0, _o=orig: _o(False, extra_dim))
        from inference.data.mask_mapper import MaskMapper
        from inference.inference_core import InferenceCore
        from model.network import XMem

        self._core_cls, self._mapper_cls = InferenceCore, MaskMapper
        self.config = {"top_k": cfg.top_k, "mem_every": cfg.mem_every, "deep_update_every": cfg.deep_update_every,
                       "enable_long_term": cfg.long_term, "min_mid_term_frames": cfg.min_mid_term_frames,
                       "max_mid_term_frames": cfg.max_mid_term_frames, "num_prototypes": cfg.num_prototypes,
                       "max_long_term_elements": cfg.max_long_term_elements}
        self.config["enable_long_term_count_usage"] = cfg.count_usage(n)
        with contextlib.redirect_stdout(io.StringIO()):
            self.net = XMem(self.config, ckpt, map_location="cpu").eval()
        self.size, self.n = cfg.size, n
        self.mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        self.std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    def reset(self) -> None:
        self.proc = self._core_cls(self.net, config=self.config)
        self.mapper = self._mapper_cls()
        self.ti = 0

    def step(self, frame: np.ndarray, given: np.ndarray | None) -> torch.Tensor:
        with torch.inference_mode():
            h, w = frame.shape[:2]
            rgb = (torch.from_numpy(frame).permute(2, 0, 1).float() / 255 - self.mean) / self.std
            s = self.size / min(h, w)
            rgb = F.interpolate(rgb[None], (int(h * s), int(w * s)), mode="bilinear", align_corners=False)[0]
            msk = labels = None
            if given is not None:
                msk, labels = self.mapper.convert_mask(given)
                msk = F.interpolate(torch.Tensor(msk)[None], rgb.shape[-2:], mode="nearest")[0]
                self.proc.set_all_labels(list(self.mapper.remappings.values()))
            prob = self.proc.step(rgb, msk, labels, end=(self.ti == self.n - 1))
            self.ti += 1
            return F.interpolate(prob[:, None], (h, w), mode="bilinear", align_corners=False)[:, 0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="official XMem checkpoint (default: random weights in its layout)")
    ap.add_argument("--official", help="path of an official XMem checkout to compare with")
    ap.add_argument("--frames", help="folder of 854x480 frames")
    ap.add_argument("--mask", help="first-frame mask (non-zero = object; split in two halves for 2 objects)")
    ap.add_argument("--n", type=int, default=12, help="frames per run (default 12)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--objects", default="1,2")
    ap.add_argument("--no-winograd", action="store_true", help="direct convolutions in ours")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    frames, mask = load_video(a)
    n = len(frames)
    ckpt = a.checkpoint
    if ckpt is None:
        ckpt = str(Path(tempfile.mkdtemp()) / "random_xmem.pth")
        torch.save(random_state_dict(0), ckpt)
    cfg = XMemConfig(winograd=not a.no_winograd)
    ours = XMemPropagator.from_checkpoint(ckpt, device="cpu", config=cfg)
    ours.video_length = n
    official = Official(a.official, ckpt, cfg, n) if a.official else None
    print(f"{n} frames {frames[0].shape[1]}x{frames[0].shape[0]}, size {cfg.size}, {a.threads} threads, "
          f"winograd {cfg.winograd}, weights {'random' if a.checkpoint is None else a.checkpoint}")
    for n_obj in [int(x) for x in a.objects.split(",")]:
        given = mask.copy()
        if n_obj == 2:
            given[:, given.shape[1] // 2:] *= 2
        ours.reset()
        if official:
            official.reset()
        t_ours, t_off = [], []
        for t, f in enumerate(frames):
            g = given if t == 0 else None
            if official:
                t0 = time.perf_counter()
                official.step(f, g)
                t_off.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ours.step(f, g)
            ours.commit()
            t_ours.append(time.perf_counter() - t0)
        mo = statistics.median(t_ours[2:]) * 1000
        line = f"{n_obj} object(s): ours {mo:.0f} ms/frame (mean {statistics.mean(t_ours[2:]) * 1000:.0f})"
        if official:
            mf = statistics.median(t_off[2:]) * 1000
            line += (f", official {mf:.0f} ms/frame (mean {statistics.mean(t_off[2:]) * 1000:.0f}), "
                     f"ratio {mo / mf:.2f}")
        print(line, flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        ours.reset()
        ours.step(frames[0], mask)
        ours.commit()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for f in frames[1:8]:
                ours.step(f)
                ours.commit()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
