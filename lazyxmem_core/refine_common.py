"""Shared by the refiners: input checks and a small per-frame LRU cache (the frame stores use it too).

Every refiner validates the same prompt arguments and keys its per-frame work (SAM's image
embedding, GrabCut's colour conversion) the same way, so both live here.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import numpy as np
from scipy import ndimage

from .types import Box, Click, FrameRef

T = TypeVar("T")


def check_prompts(
    frame: np.ndarray,
    clicks: Sequence[Click],
    box: Box | None,
    prior: np.ndarray | None,
) -> tuple[tuple[Click, ...], Box | None, np.ndarray | None]:
    """Validate a refine() call; return the clicks as a tuple, the box clipped to the frame and
    the prior as a bool array (or None). Raises ValueError saying what is wrong."""
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3:
        shape = getattr(frame, "shape", None)
        raise ValueError(f"frame must be an RGB array of shape (H, W, 3), got shape {shape}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 RGB, got dtype {frame.dtype}: convert with "
                         "np.clip(x, 0, 255).astype(np.uint8)")
    h, w = frame.shape[:2]
    clicks = tuple(clicks)
    for c in clicks:
        if not isinstance(c, Click):
            raise ValueError(f"clicks must be Click objects, got {type(c).__name__}")
        if not (0 <= c.x < w and 0 <= c.y < h):
            raise ValueError(f"click ({c.x}, {c.y}) lies outside the {w}x{h} frame: clicks are "
                             "pixel coordinates with 0 <= x < width and 0 <= y < height")
    if box is not None:
        if not isinstance(box, Box):
            raise ValueError(f"box must be a Box, got {type(box).__name__}")
        x0, y0 = max(0.0, float(box.x0)), max(0.0, float(box.y0))
        x1, y1 = min(float(w), float(box.x1)), min(float(h), float(box.y1))
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"box {box} does not overlap the {w}x{h} frame")
        box = Box(x0, y0, x1, y1)
    if prior is not None:
        prior = np.asarray(prior)
        if prior.shape != (h, w):
            raise ValueError(f"prior mask has shape {prior.shape} but the frame is {h}x{w}: "
                             "pass a (H, W) mask at the frame's resolution")
        prior = prior.astype(bool, copy=False)
    return clicks, box, prior


def frame_key(frame: np.ndarray, frame_id: FrameRef | None) -> Hashable:
    """Cache key of a frame: its :class:`FrameRef` (video and index), or a hash of the pixels
    (about 1 ms at 854x480) when the caller gives none. A bare index is refused: the same index of
    another video of the same size would get this one's cached work."""
    if frame_id is not None:
        if not isinstance(frame_id, FrameRef):
            raise TypeError(f"frame_id must be a FrameRef(video, index) or None, got {type(frame_id).__name__} "
                            f"{frame_id!r}: an id without the video would mix up videos of one size")
        return ("id", frame_id.video, frame_id.index, frame.shape)
    digest = hashlib.blake2b(np.ascontiguousarray(frame).data, digest_size=16).digest()
    return ("hash", digest, frame.shape)


class FrameCache(Generic[T]):
    """Least-recently-used cache of per-frame values (a few frames: the values can be large)."""

    def __init__(self, size: int = 4) -> None:
        if size < 1:
            raise ValueError(f"cache size must be at least 1, got {size}")
        self.size = size
        self._items: OrderedDict[Hashable, T] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0  # how many values were computed: lets tests count encodes

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        # Web threads and a job may read one task's frames at once; the value is computed
        # outside the lock (two threads may both compute it, which is harmless).
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self.misses += 1
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def prior_inside(prior: np.ndarray, box: Box) -> np.ndarray:
    """The part of a predicted mask inside a correction's box. The box says where the object is:
    a prediction elsewhere is the mistake being corrected, and as the refiner's prior it would
    pull the refined mask back to it."""
    inside = np.zeros(prior.shape, bool)
    inside[max(0, int(box.y0)):int(np.ceil(box.y1)), max(0, int(box.x0)):int(np.ceil(box.x1))] = True
    return np.asarray(prior, bool) & inside


def box_tightness(mask: np.ndarray, box: Box) -> float:
    """How well ``mask`` fits a box drawn around one object: the share of the box's rows and of its
    columns the mask crosses (averaged), 0 when it fills under 5 % or over 97 % of the box.

    A box drawn tight around an object is crossed by the object on every row and column (the
    "tight box" prior); a cut that leaves whole bands of the box empty has lost part of the object
    or kept a piece of the background instead, and one that fills the box has separated nothing."""
    x0, y0 = max(0, int(box.x0)), max(0, int(box.y0))
    x1, y1 = min(mask.shape[1], int(np.ceil(box.x1))), min(mask.shape[0], int(np.ceil(box.y1)))
    inside = np.asarray(mask, bool)[y0:y1, x0:x1]
    if inside.size == 0:
        return 0.0
    fill = float(inside.mean())
    if fill < 0.05 or fill > 0.97:
        return 0.0
    return float(inside.any(axis=1).mean() + inside.any(axis=0).mean()) / 2


def keep_central(mask: np.ndarray, box: Box, min_share: float = 0.1) -> np.ndarray:
    """The components of ``mask`` that reach the middle half of ``box`` and are at least
    ``min_share`` of the largest (else the largest alone), with their holes filled: what a box
    around one object asks for, without background specks along its sides."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    bw, bh = box.x1 - box.x0, box.y1 - box.y0
    cx0, cy0 = max(0, int(box.x0 + bw / 4)), max(0, int(box.y0 + bh / 4))
    cx1, cy1 = int(np.ceil(box.x1 - bw / 4)), int(np.ceil(box.y1 - bh / 4))
    keep = np.zeros(n + 1, bool)
    keep[np.unique(labels[cy0:max(cy1, cy0 + 1), cx0:max(cx1, cx0 + 1)])] = True
    keep &= sizes >= min_share * sizes.max()
    keep[0] = False
    if not keep.any():
        keep[int(np.argmax(sizes))] = True
    return ndimage.binary_fill_holes(keep[labels])
