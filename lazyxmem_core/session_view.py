"""What a Lazy session has made so far, as an immutable value, and the one way a correction
becomes a mask.

A :class:`SessionView` is what readers get: the output masks (packed), the review and
auto-corrected frames, the forward masks of corrected frames and the human-given anchors. It
never changes once made, so a web thread can answer from it while a job re-propagates the
session it came from; the writer publishes a new view when it is done. It serialises to bytes,
so a worker can hand it to the web process (through Redis).

:func:`correction_mask` is the one place where clicks, a box or a mask become an object's mask
on a frame: the Lazy loop (pseudo-corrections, answered requests, replayed corrections), the
preview a reviewer sees at once, and the harness all call it with the same inputs.
"""
from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .protocols import Refiner
from .refine_common import prior_inside
from .types import Correction, FrameRef, PackedMask


def frame_ref(video_key: str | None, t: int) -> FrameRef | None:
    """The cache key of frame ``t`` of a video; None (the refiner hashes the pixels) without a key."""
    return None if video_key is None else FrameRef(video_key, int(t))


def correction_mask(refiner: Refiner | None, frames: Sequence[np.ndarray], t: int, corr: Correction,
                    prior: np.ndarray | None, reference: tuple[int, np.ndarray] | None,
                    video_key: str | None) -> np.ndarray:
    """The bool (H, W) mask that ``corr`` sets for one object on frame ``t``.

    A mask is taken as it is. Clicks and a box go to the refiner with ``prior`` (the object's
    forward-propagated mask on ``t``; with a box only its part inside the box: the box says where
    the object is, and a prediction elsewhere, the mistake being corrected, must not pull the
    refined mask back to it) and ``reference``: (frame index, mask) of the object's latest
    human-given mask before ``t``.
    """
    frame = frames[t]
    if corr.mask is not None:
        mask = np.asarray(corr.mask).astype(bool)
        if mask.shape != frame.shape[:2]:
            raise ValueError(f"correction mask on frame {t} is {mask.shape[1]}x{mask.shape[0]}, "
                             f"the frame is {frame.shape[1]}x{frame.shape[0]}")
        return mask
    if refiner is None:
        raise ValueError("click and box corrections need a refiner; give a mask instead, or configure a refiner")
    if corr.box is not None and prior is not None:
        prior = prior_inside(prior, corr.box)
    ref = None if reference is None else (frames[reference[0]], reference[1])
    mask = refiner.refine(frame, clicks=corr.clicks, box=corr.box, prior=prior,
                          frame_id=frame_ref(video_key, t), reference=ref)
    return np.asarray(mask, dtype=bool)


class ViewMasks(Sequence):
    """A view's per-frame index masks, unpacked one per read (a long video's are never all
    decoded at once); frames the session has not reached are empty."""

    def __init__(self, view: SessionView) -> None:
        self.view = view
        self._empty: PackedMask | None = None  # packed once, shared by every frame not reached

    def __len__(self) -> int:
        return self.view.n_frames

    def __getitem__(self, t):  # type: ignore[override]
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(len(self)))]
        return self.packed(t).unpack()

    def __iter__(self) -> Iterator[np.ndarray]:
        for t in range(len(self)):
            yield self[t]

    def packed(self, t: int) -> PackedMask:
        n = len(self)
        t = int(t) + (n if t < 0 else 0)
        if not 0 <= t < n:
            raise IndexError(f"frame {t} is outside the video (0..{n - 1})")
        p = self.view.masks[t]
        if p is not None:
            return p
        if self._empty is None:
            self._empty = PackedMask.pack(np.zeros(self.view.shape, np.uint8))
        return self._empty


@dataclass(frozen=True)
class SessionView:
    """An immutable copy of a session's results (see the module docstring)."""

    video_key: str | None
    n_frames: int
    shape: tuple[int, int]
    labels: tuple[int, ...]
    masks: tuple[PackedMask | None, ...]  # output index mask per frame; None: not reached
    forward: Mapping[tuple[int, int], PackedMask]  # (frame, label) -> forward mask, where replaced
    anchors: Mapping[int, tuple[tuple[int, PackedMask], ...]]  # label -> human-given masks, by frame
    review: tuple[int, ...]  # frames with an unanswered user request
    pseudo: tuple[int, ...]  # frames the controller corrected itself
    score: float  # 1 - mean masked entropy over the visible object-frames (higher: more certain)
    # label -> per-frame uncertainty of the object (the score the triggers use; None: not reached,
    # or the object is absent there); what the reviewer's ordered list is made from.
    uncertainty: Mapping[int, tuple[float | None, ...]] = field(default_factory=dict)
    # label -> frames where that object's correction was asked and not answered (``review`` is their union)
    requests: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """Every frame from the first one reached to the end has its mask."""
        first = self.first
        return first is not None and all(m is not None for m in self.masks[first:])

    @property
    def first(self) -> int | None:
        return next((t for t, m in enumerate(self.masks) if m is not None), None)

    def reached(self, t: int) -> bool:
        return 0 <= t < self.n_frames and self.masks[t] is not None

    def frame_masks(self) -> ViewMasks:
        return ViewMasks(self)

    def prior(self, t: int, label: int) -> np.ndarray:
        """The object's forward-propagated mask on frame ``t``: what a correction there refines."""
        fwd = self.forward.get((t, label))
        if fwd is not None:
            return fwd.unpack().astype(bool)
        if not self.reached(t):
            raise ValueError(f"frame {t} has not been propagated yet")
        return self.masks[t].unpack() == label

    def reference(self, t: int, label: int) -> tuple[int, np.ndarray] | None:
        """(frame, mask) of the object's latest human-given mask before frame ``t``."""
        before = [(s, m) for s, m in self.anchors.get(label, ()) if s < t]
        if not before:
            return None
        s, m = before[-1]
        return s, m.unpack().astype(bool)

    def preview(self, frames: Sequence[np.ndarray], refiner: Refiner | None, t: int, label: int,
                corr: Correction) -> np.ndarray:
        """The mask ``corr`` gives object ``label`` on frame ``t``: the same mask the
        re-propagation after it (:meth:`LazySession.correct`) puts there."""
        if label not in self.labels:
            raise ValueError(f"object {label} is not in this video (objects: {list(self.labels)})")
        return correction_mask(refiner, frames, t, corr, self.prior(t, label), self.reference(t, label),
                               self.video_key)

    # -- bytes (a worker hands its view to the web process) ------------------------------------
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # members are zlib-packed already
            meta = {"video_key": self.video_key, "n_frames": self.n_frames, "shape": list(self.shape),
                    "labels": list(self.labels), "review": list(self.review), "pseudo": list(self.pseudo),
                    "score": self.score,
                    "uncertainty": {str(k): list(v) for k, v in self.uncertainty.items()},
                    "requests": {str(k): list(v) for k, v in self.requests.items()}}
            zf.writestr("meta.json", json.dumps(meta))
            for t, p in enumerate(self.masks):
                if p is not None:
                    zf.writestr(_name("m", p, t), p.data)
            for (t, label), p in self.forward.items():
                zf.writestr(_name("f", p, t, label), p.data)
            for label, entries in self.anchors.items():
                for t, p in entries:
                    zf.writestr(_name("a", p, t, label), p.data)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> SessionView:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            meta = json.loads(zf.read("meta.json"))
            masks: list[PackedMask | None] = [None] * meta["n_frames"]
            forward: dict[tuple[int, int], PackedMask] = {}
            anchors: dict[int, list[tuple[int, PackedMask]]] = {}
            for name in zf.namelist():
                if name == "meta.json":
                    continue
                kind, dtype, shape, *where = name.split(":")
                p = PackedMask(tuple(int(v) for v in shape.split("x")), dtype, zf.read(name))
                idx = [int(v) for v in where]
                if kind == "m":
                    masks[idx[0]] = p
                elif kind == "f":
                    forward[(idx[0], idx[1])] = p
                else:
                    anchors.setdefault(idx[1], []).append((idx[0], p))
        return cls(meta["video_key"], meta["n_frames"], tuple(meta["shape"]), tuple(meta["labels"]),
                   tuple(masks), forward, {k: tuple(sorted(v, key=lambda e: e[0])) for k, v in anchors.items()},
                   tuple(meta["review"]), tuple(meta["pseudo"]), float(meta["score"]),
                   {int(k): tuple(v) for k, v in meta.get("uncertainty", {}).items()},
                   {int(k): tuple(v) for k, v in meta.get("requests", {}).items()})


def _name(kind: str, p: PackedMask, *where: int) -> str:
    return ":".join([kind, p.dtype, "x".join(map(str, p.shape)), *map(str, where)])
