"""XMemPropagator: the core's Propagator protocol on top of XMem inference."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LazyXMemError
from ..xmem_layout import load_xmem_state_dict
from .inference.core import Geometry, Pending, XMemCore, prepare_image, prepare_masks
from .inference.memory import MemoryConfig
from .model.fastconv import winograd_available
from .model.network import XMemNet, aggregate


@dataclass(frozen=True)
class XMemConfig:
    """Inference knobs; the defaults are the official evaluation's."""

    size: int = 480  # shorter side of the working resolution; -1: the frame's own
    mem_every: int = 5
    deep_update_every: int = -1  # -1: deep update on every memory frame
    top_k: int = 30
    min_mid_term_frames: int = 5
    max_mid_term_frames: int = 10
    max_long_term_elements: int = 10000
    num_prototypes: int = 128
    long_term: bool = True
    amp: bool = False  # autocast on CUDA only
    # NNPACK Winograd 3x3 convs in the mask paths on the CPU: ~3x fewer multiplications, ~1e-5
    # relative rounding (outputs stay within 1e-5 of the direct convolution's; see bench/).
    winograd: bool = True

    def __post_init__(self) -> None:
        if self.mem_every < 1:
            raise LazyXMemError(f"mem_every must be >= 1, got {self.mem_every}")
        if self.top_k < 1:
            raise LazyXMemError(f"top_k must be >= 1, got {self.top_k}")
        if self.long_term and not 1 <= self.min_mid_term_frames < self.max_mid_term_frames:
            raise LazyXMemError("need 1 <= min_mid_term_frames < max_mid_term_frames, got "
                             f"{self.min_mid_term_frames} and {self.max_mid_term_frames}")
        if self.long_term and not 0 < self.num_prototypes < self.max_long_term_elements:
            raise LazyXMemError("need 0 < num_prototypes < max_long_term_elements")

    @classmethod
    def knobs(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def count_usage(self, video_length: int | None) -> bool:
        """Long-term usage counting, decided per video as the official eval does: only when
        the video is long enough to fill long-term memory (unknown length: count)."""
        if not self.long_term:
            return False
        if video_length is None:
            return True
        per_frame = self.num_prototypes / (self.max_mid_term_frames - self.min_mid_term_frames)
        return video_length * per_frame >= self.max_long_term_elements


def resolve_device(device: str | torch.device | None) -> torch.device:
    d = torch.device(device or "cpu")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise LazyXMemError(f"device {d} was asked for (DEVICE / --device) but CUDA is not available: use cpu")
    return d


class XMemPropagator:
    """XMem (Cheng & Schwing 2022) as a Propagator: step() segments, commit() writes memory."""

    def __init__(self, net: XMemNet, config: XMemConfig | None = None, device: str | torch.device | None = None,
                 video_length: int | None = None) -> None:
        self.device = resolve_device(device)
        self.config = config or XMemConfig()
        self.net = net.to(self.device)
        self.video_length = video_length  # frames in the video when known (usage counting, last frame)
        self._core = XMemCore(net, MemoryConfig(), self.config.mem_every, self.config.deep_update_every)
        self.reset()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None,
                        config: XMemConfig | None = None, **knobs: Any) -> XMemPropagator:
        """Load an official checkpoint (XMem, XMem-s012, XMem-no-sensory, stage 0); CheckpointError if bad."""
        config = replace(config or XMemConfig(), **knobs)
        dev = resolve_device(device)
        sd, _ = load_xmem_state_dict(path)
        wino = config.winograd and dev.type == "cpu" and winograd_available()
        return cls(XMemNet.from_state_dict(sd, winograd=wino), config, dev)

    # ------------------------------------------------------------------ protocol
    @property
    def labels(self) -> list[int]:
        return sorted(self._order)

    @property
    def memory_elements(self) -> int:
        """Keys in working + long-term memory (a bounded number with long-term memory on)."""
        return self._core.memory.num_elements

    def reset(self) -> None:
        self._order: list[int] = []  # label of each internal object index (order of appearance)
        self._geo: Geometry | None = None
        self._pending: Pending | None = None
        self._core.reset()

    def _autocast(self):
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def step(self, frame: np.ndarray, given: np.ndarray | None = None) -> np.ndarray:
        if self._pending is not None:
            raise RuntimeError("step() called twice without commit(): call commit() after every step()")
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise LazyXMemError(f"frame must be RGB uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
        h, w = frame.shape[:2]
        if self._geo is None:
            if given is None or not np.any(given):
                raise LazyXMemError("the first frame needs a `given` index mask with at least one object (non-zero label)")
            self._geo = Geometry.of(h, w, self.config.size)
            cfg = self.config
            self._core.mem_cfg = MemoryConfig(cfg.top_k, cfg.long_term, cfg.count_usage(self.video_length),
                                              cfg.min_mid_term_frames, cfg.max_mid_term_frames,
                                              cfg.num_prototypes, cfg.max_long_term_elements)
            self._core.reset()
        elif (h, w) != self._geo.frame_hw:
            raise LazyXMemError(f"frame size {(h, w)} differs from the video's {self._geo.frame_hw}: call reset() first")
        geo = self._geo
        given_t, given_objects = None, []
        if given is not None:
            if given.shape != (h, w):
                raise LazyXMemError(f"given mask is {given.shape}, the frame is {(h, w)}")
            present = [int(v) for v in np.unique(given) if v != 0]
            self._order += [v for v in present if v not in self._order]
            given_objects = [self._order.index(v) for v in present]
            g = torch.from_numpy(np.ascontiguousarray(given)).to(self.device)
            onehot = torch.stack([(g == v) for v in self._order]).float()
            given_t = prepare_masks(onehot, geo)
        with torch.inference_mode(), self._autocast():
            image = prepare_image(torch.from_numpy(np.ascontiguousarray(frame)).to(self.device), geo)
            pending = self._core.step(image, given_t, given_objects)
            # As officially, a given frame's output is its aggregated mask at the working resolution,
            # upsampled (soft edges when resized); the Lazy session outputs the annotation exactly.
            probs = self._to_frame(pending.probs.float())
        self._pending = pending
        return probs.cpu().numpy()

    def commit(self, mask: np.ndarray | None = None, write: bool | None = None) -> bool:
        p = self._pending
        if p is None:
            raise RuntimeError("commit() without a pending step(): call step() first")
        probs = None
        with torch.inference_mode(), self._autocast():
            if mask is not None:
                if mask.shape != self._geo.frame_hw:
                    raise LazyXMemError(f"commit mask is {mask.shape}, the frame is {self._geo.frame_hw}")
                unknown = {int(v) for v in np.unique(mask)} - {0, *self._order}
                if unknown:
                    raise LazyXMemError(f"commit mask has labels {sorted(unknown)} never given to step(); known: {self.labels}")
                m = torch.from_numpy(np.ascontiguousarray(mask)).to(self.device)
                probs = aggregate(prepare_masks(torch.stack([(m == v) for v in self._order]).float(), self._geo))
            last = self.video_length is not None and self._core.ti == self.video_length - 1 and write is None
            written = self._core.commit(p, write, probs, last=last)
        self._pending = None
        return written

    def snapshot(self) -> Any:
        # Tensors are never modified in place, so sharing them is a copy (copy-on-write).
        return {"core": self._core.state(), "order": list(self._order), "geo": self._geo, "pending": self._pending}

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict) or "core" not in state:
            raise LazyXMemError("restore() needs a state returned by XMemPropagator.snapshot()")
        self._core.set_state(state["core"])
        self._order, self._geo, self._pending = list(state["order"]), state["geo"], state["pending"]

    # ------------------------------------------------------------------ helpers
    def _channel_order(self) -> list[int]:
        """Internal channel (background first) for each output channel (labels ascending)."""
        return [0] + [1 + self._order.index(v) for v in self.labels]

    def _to_frame(self, probs: torch.Tensor) -> torch.Tensor:
        geo = self._geo
        probs = geo.unpad(probs)
        if geo.resized:
            probs = torch.nn.functional.interpolate(probs[:, None], size=geo.frame_hw, mode="bilinear",
                                                    align_corners=False)[:, 0]
        return probs[self._channel_order()]
