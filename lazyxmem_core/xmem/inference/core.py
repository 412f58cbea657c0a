"""Per-frame XMem inference in two phases: ``step`` segments a frame (no memory change except
usage counting, as officially), ``commit`` decides and performs the memory / sensory update.

Objects are kept in internal order (order of first appearance, then label value); the
propagator maps them to channels by label. Everything here is torch, at the working resolution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..model.network import IMAGENET_MEAN, IMAGENET_STD, XMemNet, aggregate
from .memory import MemoryConfig, MemoryManager


@dataclass(frozen=True)
class Geometry:
    """Frame size, working size (shorter side resized) and the centred padding to a multiple of 16."""

    frame_hw: tuple[int, int]
    work_hw: tuple[int, int]
    pad: tuple[int, int, int, int]  # left, right, top, bottom

    @classmethod
    def of(cls, h: int, w: int, size: int) -> Geometry:
        if size > 0:
            # torchvision's Resize(int) rule: shorter side -> size, longer side truncated.
            short, long = min(h, w), max(h, w)
            new_long = int(size * long / short)
            work = (size, new_long) if h <= w else (new_long, size)
        else:
            work = (h, w)
        ph, pw = (-work[0]) % 16, (-work[1]) % 16
        return cls((h, w), work, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    @property
    def resized(self) -> bool:
        return self.work_hw != self.frame_hw

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        l, r, t, b = self.pad
        return x[..., t:x.shape[-2] - b, l:x.shape[-1] - r]


def prepare_image(frame: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised, resized (bilinear, no antialias), padded (1, 3, H', W')."""
    x = frame.permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    x = x.sub_(mean).div_(std)[None]
    if geo.resized:
        x = F.interpolate(x, size=geo.work_hw, mode="bilinear", align_corners=False, antialias=False)
    return F.pad(x, geo.pad)


def prepare_masks(onehot: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """float (n, H, W) masks -> nearest-resized and padded to the working grid (n, H', W')."""
    if geo.resized:
        onehot = F.interpolate(onehot[None], size=geo.work_hw, mode="nearest")[0]
    return F.pad(onehot, geo.pad)


@dataclass
class Pending:
    """What step computed for the frame, kept until commit (tensors are never modified)."""

    image: torch.Tensor
    feats: dict[str, torch.Tensor]
    probs: torch.Tensor  # (n+1, H', W') padded working resolution, internal order
    n_objects: int
    given: bool
    decoded: tuple[torch.Tensor, ...] | None  # (g16, g8, g4, logits4) when the frame was segmented


class XMemCore:
    def __init__(self, net: XMemNet, mem_cfg: MemoryConfig, mem_every: int = 5, deep_update_every: int = -1) -> None:
        self.net = net
        self.mem_cfg = mem_cfg
        self.mem_every = mem_every
        self.deep_update_every = deep_update_every
        self.reset()

    def reset(self) -> None:
        self.memory = MemoryManager(self.mem_cfg, self.net.hidden_dim)
        self.n_objects = 0
        self.ti = -1  # index of the last stepped frame
        self.since_mem = 0  # accepted frames since the last memory frame
        self.last_deep_ti = -abs(self.deep_update_every)  # first memory frame is always deep-updated

    def state(self) -> dict[str, Any]:
        return {"memory": self.memory.clone(), "n_objects": self.n_objects, "ti": self.ti,
                "since_mem": self.since_mem, "last_deep_ti": self.last_deep_ti}

    def set_state(self, s: dict[str, Any]) -> None:
        self.memory = s["memory"].clone()
        self.n_objects, self.ti, self.since_mem, self.last_deep_ti = s["n_objects"], s["ti"], s["since_mem"], s["last_deep_ti"]

    # ------------------------------------------------------------------ step
    def step(self, image: torch.Tensor, given: torch.Tensor | None, given_objects: list[int]) -> Pending:
        """image (1, 3, H', W'); given: (n_total, H', W') one-hot over all objects (rows of objects
        not in ``given_objects`` are ignored); n_total may exceed the current count (new objects)."""
        self.ti += 1
        with record_function("xmem.encode_key"):
            feats = self.net.encode_key(image)
        n_total = self.n_objects if given is None else given.shape[0]
        mem_objects = self.memory.objects
        segment = bool(mem_objects) and (given is None or len(given_objects) != n_total)
        decoded = None
        pred = None
        if segment:
            with record_function("xmem.read_memory"):
                readout = self.memory.read(feats["key"][0], feats["selection"][0])
            with record_function("xmem.decode"):
                decoded = self.net.decode(feats, readout, self.memory.hidden)
            logits = F.interpolate(decoded[3], scale_factor=4, mode="bilinear", align_corners=False)
            probs = aggregate(torch.sigmoid(logits[:, 0]))  # (n_mem + 1, H', W')
            pred = probs[1:]
        if given is None:
            if pred is None:
                raise ValueError("the first frame needs a given mask")
        else:
            masks = given.float().clone()  # rows of objects not given get their prediction
            if pred is not None:
                pred = pred.clone()
                pred[:, given.sum(0) > 0.5] = 0  # the given objects own their pixels
                for i in range(pred.shape[0]):
                    if i not in given_objects:
                        masks[i] = pred[i]
            probs = aggregate(masks)
        self.n_objects = probs.shape[0] - 1
        return Pending(image, feats, probs, self.n_objects, given is not None, decoded)

    # ------------------------------------------------------------------ commit
    def schedule_write(self, p: Pending) -> bool:
        return p.given or self.since_mem + 1 >= self.mem_every

    def commit(self, p: Pending, write: bool | None, probs: torch.Tensor | None = None, last: bool = False) -> bool:
        """write None: the official schedule; False: veto; True: write now (schedule restarts).
        probs: replaces the frame's own (n+1, H', W') probabilities for the memory value.
        last: the video's last frame (officially never a memory frame, and no hidden update:
        nothing comes after it, so outputs cannot change)."""
        vetoed = write is False
        if write is None:
            write = self.schedule_write(p) and not last
        if set(range(p.n_objects)) - set(self.memory.objects):
            write = True  # a new object must enter memory, or it could not be read out later
        sync = self.deep_update_every < 0
        deep = write and (sync or self.ti - self.last_deep_ti >= self.deep_update_every)
        mem = self.memory
        if p.decoded is not None and mem.hidden is not None and not last and not (sync and write):
            with record_function("xmem.update_hidden"):
                mem.hidden = self.net.update_hidden(*p.decoded, mem.hidden)
        if p.given:
            mem.add_hidden(p.n_objects, p.feats["key"])
        if write:
            probs = p.probs if probs is None else probs
            f = p.feats
            with record_function("xmem.encode_value"):
                value, hidden = self.net.encode_value(p.image, f["f16"], probs[1:], mem.hidden, deep)
            with record_function("xmem.write_memory"):
                mem.write(f["key"][0], f["shrinkage"][0], f["selection"][0], value, list(range(p.n_objects)))
            if deep:
                mem.hidden = hidden
                self.last_deep_ti = self.ti
            self.since_mem = 0
        elif not vetoed:
            self.since_mem += 1
        return write
