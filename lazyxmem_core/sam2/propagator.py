"""SAM2Propagator: SAM 2.1 as the core's Propagator, frames streamed one at a time, memory bounded.

What each frame reads is the official model's own rule (``SAM2Base.track_step``): every
conditioning frame of the object (its annotated and corrected frames), the mask memory of the
last ``num_maskmem - 1`` frames and the object pointers of the last ``max_obj_ptrs_in_encoder - 1``.
The official video predictor keeps every frame's outputs forever; here a frame's outputs are
dropped as soon as no later frame can read them, and the conditioning frames are capped (the
object's first annotation and its most recent corrections stay), so memory and time per frame
are flat however long the video. On a video whose objects have at most ``max_cond_frames``
conditioning frames each, the outputs equal the official predictor's (``tests/test_sam2_propagator.py``).

Per frame each object is decoded separately (batch 1, as officially) on the frame's image
features, computed once for all objects. The per-object logits ``L_k`` become probabilities as
``softmax(0, L_1, ..., L_N)``: the background logit is 0, so one object gets exactly
``(1 - sigmoid(L), sigmoid(L))``, an object beats the background where its logit is positive and
the argmax over objects is the one with the highest logit, which is the official non-overlap rule.

Memory writes follow the Lazy protocol: ``commit(write=False)`` (UDU) stores nothing for the
frame, so later frames never read it (SAM 2 skips a missing entry); ``commit(mask, write=True)``
(IDU) encodes each object the correction changed with the frame's own image features as a
conditioning frame, which no later pass overwrites (the others are written as predicted).
SAM 2's object score (``object_score_logits``; <= 0: the object is absent and its mask a
constant, where pixel entropy says nothing) is exposed per object as
:attr:`SAM2Propagator.object_scores` for the Lazy controller.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import LazyXMemError
from .model import shared_model

IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SAM2Config:
    image_size: int = 1024  # the model's input side (trained at 1024; 512 is ~4x faster)
    max_cond_frames: int = 16  # conditioning frames kept per object (annotated, corrected)
    bf16: bool = False  # bfloat16 autocast, CUDA only

    def __post_init__(self) -> None:
        if self.max_cond_frames < 1:
            raise LazyXMemError(f"max_cond_frames must be >= 1, got {self.max_cond_frames}")


@dataclass
class _Memory:
    """One object's memory: outputs by frame index. Entries are never modified once stored
    (a trimmed entry is replaced by a new dict), so a snapshot is a copy of the two dicts."""

    cond: dict[int, dict] = field(default_factory=dict)
    non_cond: dict[int, dict] = field(default_factory=dict)
    first: int = 0  # the frame the object was first given on: kept when the cap is hit

    def copy(self) -> _Memory:
        return _Memory(dict(self.cond), dict(self.non_cond), self.first)

    def view(self) -> dict[str, dict]:
        return {"cond_frame_outputs": self.cond, "non_cond_frame_outputs": self.non_cond}


@dataclass
class _Pending:
    t: int
    feats: tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]
    outs: dict[int, dict]  # label -> track_step output on this frame
    given: set[int]
    probs: torch.Tensor  # (N+1, H, W), kept to tell which objects a commit's mask corrected


class SAM2Propagator:
    """SAM 2.1 (Ravi et al. 2024) as a Propagator: step() segments, commit() writes memory."""

    def __init__(self, model: torch.nn.Module, config: SAM2Config | None = None, video_length: int | None = None) -> None:
        self.model = model
        self.config = config or SAM2Config()
        if int(model.image_size) != self.config.image_size:
            raise LazyXMemError(f"the model was built for image size {model.image_size}, the config says "
                                f"{self.config.image_size}")
        self.device = next(model.parameters()).device
        if self.config.bf16 and self.device.type != "cuda":
            raise LazyXMemError("bf16 needs a CUDA device: drop --sam2-bf16 or use --device cuda")
        self.video_length = video_length  # frames to be tracked, when known (SAM 2's pointer encoding uses it)
        self._mean = torch.tensor(IMG_MEAN, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(IMG_STD, dtype=torch.float32)[:, None, None]
        self.reset()

    @classmethod
    def from_checkpoint(cls, path: str | Path, sam2_type: str | None = None, device: str = "cpu",
                        config: SAM2Config | None = None, video_length: int | None = None) -> SAM2Propagator:
        config = config or SAM2Config()
        return cls(shared_model(path, sam2_type, config.image_size, device), config, video_length)

    # ------------------------------------------------------------------ protocol
    @property
    def labels(self) -> list[int]:
        return sorted(self._mem)

    @property
    def object_scores(self) -> dict[int, float]:
        """SAM 2's object score per label on the last stepped frame (> 0: present)."""
        return dict(self._scores)

    @property
    def memory_bytes(self) -> int:
        """Bytes of the tensors this task's memory holds (distinct storages)."""
        seen: dict[int, int] = {}
        for mem in self._mem.values():
            for store in (mem.cond, mem.non_cond):
                for out in store.values():
                    for v in out.values():
                        for x in (v if isinstance(v, list) else [v]):
                            if isinstance(x, torch.Tensor):
                                s = x.untyped_storage()
                                seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    def reset(self) -> None:
        self._mem: dict[int, _Memory] = {}
        self._t = 0
        self._hw: tuple[int, int] | None = None
        self._pending: _Pending | None = None
        self._scores: dict[int, float] = {}
        self._pos_enc: list[torch.Tensor] | None = None  # maskmem_pos_enc is one constant per model size

    def _autocast(self):
        if self.config.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, frame: np.ndarray, given: np.ndarray | None = None) -> np.ndarray:
        if self._pending is not None:
            raise RuntimeError("step() called twice without commit(): call commit() after every step()")
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise LazyXMemError(f"frame must be RGB uint8 (H, W, 3), got {getattr(frame, 'dtype', None)} "
                                f"{getattr(frame, 'shape', None)}")
        hw = frame.shape[:2]
        if self._hw is None:
            if given is None or not np.any(given):
                raise LazyXMemError("the first frame needs a `given` index mask with at least one object (non-zero label)")
            self._hw = hw
        elif hw != self._hw:
            raise LazyXMemError(f"frame size {hw} differs from the video's {self._hw}: call reset() first")
        given_labels: list[int] = []
        if given is not None:
            if given.shape != hw:
                raise LazyXMemError(f"given mask is {given.shape}, the frame is {hw}")
            given_labels = [int(v) for v in np.unique(given) if v != 0]
        t = self._t
        with torch.inference_mode(), self._autocast():
            feats = self._features(frame)
            outs: dict[int, dict] = {}
            for label in given_labels:
                if label not in self._mem:
                    self._mem[label] = _Memory(first=t)
                outs[label] = self._track(t, feats, self._mem[label], mask=given == label)
            for label in self.labels:
                if label not in outs:
                    outs[label] = self._track(t, feats, self._mem[label])
            logits = torch.cat([outs[label]["pred_masks"].float() for label in self.labels])  # (N, 1, h, w)
            logits = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)[:, 0]
            probs = torch.softmax(torch.cat([logits.new_zeros((1, *hw)), logits]), dim=0)
        self._scores = {label: float(outs[label]["object_score_logits"].float().reshape(-1)[0]) for label in self.labels}
        self._pending = _Pending(t, feats, outs, set(given_labels), probs)
        return probs.cpu().numpy().astype(np.float32, copy=False)

    def commit(self, mask: np.ndarray | None = None, write: bool | None = None) -> bool:
        p = self._pending
        if p is None:
            raise RuntimeError("commit() without a pending step(): call step() first")
        if mask is not None:
            if mask.shape != self._hw:
                raise LazyXMemError(f"commit mask is {mask.shape}, the frame is {self._hw}")
            unknown = {int(v) for v in np.unique(mask)} - {0, *self._mem}
            if unknown:
                raise LazyXMemError(f"commit mask has labels {sorted(unknown)} never given to step(); known: {self.labels}")
        # The prediction's index mask only when there is a mask to compare (not on the hot path).
        predicted = None if mask is None else self.predicted_mask()
        written = False
        with torch.inference_mode(), self._autocast():
            for label in self.labels:
                mem, out = self._mem[label], p.outs[label]
                # An object the mask leaves as predicted is written as predicted: only what a
                # correction changed is pinned (a conditioning frame is never dropped by the window).
                changed = mask is not None and not np.array_equal(mask == label, predicted == label)
                if label in p.given:  # an annotation always enters memory, as a conditioning frame
                    mem.cond[p.t] = self._memory_entry(p, out, from_mask=True)
                    mem.non_cond.pop(p.t, None)
                    self._cap_cond(mem)
                elif write is True and changed:
                    # IDU: the corrected object is kept like an annotation (never re-tracked over).
                    corrected = self._track(p.t, p.feats, mem, mask=mask == label)
                    mem.cond[p.t] = self._memory_entry(p, corrected, from_mask=True)
                    mem.non_cond.pop(p.t, None)
                    self._cap_cond(mem)
                elif write is False:
                    self._trim(mem, p.t)
                    continue  # UDU: the frame stays out of the memory later frames read
                elif changed:
                    corrected = self._track(p.t, p.feats, mem, mask=mask == label)
                    mem.non_cond[p.t] = self._memory_entry(p, corrected, from_mask=True)
                else:
                    mem.non_cond[p.t] = self._memory_entry(p, out, from_mask=False)
                written = True
                self._trim(mem, p.t)
        self._pending = None
        self._t += 1
        return written

    def predicted_mask(self) -> np.ndarray:
        """The pending frame's index mask as predicted (argmax of step()'s probabilities)."""
        if self._pending is None:
            raise RuntimeError("predicted_mask() needs a pending step(): call step() first")
        return torch.tensor([0, *self.labels])[self._pending.probs.argmax(0).cpu()].numpy()

    def snapshot(self) -> Any:
        # Stored entries are never modified in place: copying the dicts copies the state.
        return {"mem": {k: m.copy() for k, m in self._mem.items()}, "t": self._t, "hw": self._hw,
                "pending": self._pending, "scores": dict(self._scores), "pos": self._pos_enc}

    def restore(self, state: Any) -> None:
        if not isinstance(state, dict) or "mem" not in state:
            raise LazyXMemError("restore() needs a state returned by SAM2Propagator.snapshot()")
        self._mem = {k: m.copy() for k, m in state["mem"].items()}
        self._t, self._hw, self._pending = state["t"], state["hw"], state["pending"]
        self._scores, self._pos_enc = dict(state["scores"]), state["pos"]

    # ------------------------------------------------------------------ model calls
    def _features(self, frame: np.ndarray) -> tuple:
        """The frame's backbone features, prepared as the official predictor does: PIL resize
        to image_size x image_size (its default filter), [0, 1], ImageNet mean and std."""
        side = self.config.image_size
        img = np.asarray(Image.fromarray(frame).resize((side, side))) / 255.0
        x = (torch.from_numpy(img).permute(2, 0, 1).float() - self._mean) / self._std
        backbone = self.model.forward_image(x[None].to(self.device))
        _, vision_feats, vision_pos, feat_sizes = self.model._prepare_backbone_features(backbone)
        return vision_feats, vision_pos, feat_sizes

    def _mask_input(self, mask: np.ndarray) -> torch.Tensor:
        """A bool mask at the frame's size as SAM 2's mask input (add_new_mask's resizing)."""
        m = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None].to(self.device)
        side = self.config.image_size
        if m.shape[-2:] != (side, side):
            m = F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
            m = (m >= 0.5).float()
        return m

    def _track(self, t: int, feats: tuple, mem: _Memory, mask: np.ndarray | None = None) -> dict:
        vision_feats, vision_pos, feat_sizes = feats
        return self.model.track_step(
            frame_idx=t, is_init_cond_frame=mask is not None, current_vision_feats=vision_feats,
            current_vision_pos_embeds=vision_pos, feat_sizes=feat_sizes, point_inputs=None,
            mask_inputs=None if mask is None else self._mask_input(mask), output_dict=mem.view(),
            num_frames=self.video_length if self.video_length is not None else 1 << 30,
            run_mem_encoder=False)

    def _memory_entry(self, p: _Pending, out: dict, from_mask: bool) -> dict:
        """Encode one object's output on frame p.t into a memory entry. A mask input is encoded
        from its low-resolution logits upsampled (as the official predictor encodes prompts);
        a prediction from its high-resolution logits (as track_step does)."""
        vision_feats, _, feat_sizes = p.feats
        if from_mask:
            side = self.config.image_size
            high = F.interpolate(out["pred_masks"].float(), size=(side, side), mode="bilinear",
                                 align_corners=False)
        else:
            high = out["pred_masks_high_res"]
        features, pos = self.model._encode_new_memory(
            current_vision_feats=vision_feats, feat_sizes=feat_sizes, pred_masks_high_res=high,
            object_score_logits=out["object_score_logits"], is_mask_from_pts=from_mask)
        if self._pos_enc is None:
            self._pos_enc = [x[0:1].clone() for x in pos]
        return {"maskmem_features": features.to(torch.bfloat16), "maskmem_pos_enc": self._pos_enc,
                "obj_ptr": out["obj_ptr"], "object_score_logits": out["object_score_logits"]}

    # ------------------------------------------------------------------ bounded memory
    def _cap_cond(self, mem: _Memory) -> None:
        """At most max_cond_frames conditioning frames: the object's first one and the latest."""
        while len(mem.cond) > self.config.max_cond_frames:
            oldest = min((t for t in mem.cond if t != mem.first), default=None)
            if oldest is None:
                break
            del mem.cond[oldest]

    def _trim(self, mem: _Memory, t: int) -> None:
        """Drop what no later frame reads: mask memory older than num_maskmem - 1 frames, and
        object pointers older than max_obj_ptrs_in_encoder - 1 frames."""
        mask_window = self.model.num_maskmem - 1
        ptr_window = max(self.model.max_obj_ptrs_in_encoder - 1, mask_window)
        for s in [s for s in mem.non_cond if s <= t - ptr_window]:
            del mem.non_cond[s]
        for s, out in list(mem.non_cond.items()):
            if s <= t - mask_window and "maskmem_features" in out:
                mem.non_cond[s] = {"obj_ptr": out["obj_ptr"]}
