"""Typed values that cross module boundaries: prompts, corrections and per-frame records."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from enum import Enum

import numpy as np


@dataclass(frozen=True)
class Click:
    """A click in pixel coordinates of the frame (x = column, y = row)."""

    x: float
    y: float
    positive: bool = True


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixel coordinates, (x0, y0) top-left, (x1, y1) bottom-right."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"box {self} is empty: x1 must exceed x0 and y1 must exceed y0")


@dataclass(frozen=True)
class FrameRef:
    """Which frame of which video: the key of every per-frame cache (a refiner's image embedding).

    ``video`` names the video itself, not the caller's position in it (the backend derives it
    from the task's id and media): two videos of one size never share an index's cached work.
    """

    video: str
    index: int

    def __post_init__(self) -> None:
        if not isinstance(self.video, str) or not self.video:
            raise ValueError(f"FrameRef needs a non-empty video key, got {self.video!r}")


@dataclass(frozen=True)
class Correction:
    """What a (real or simulated) user gives for one object on one frame.

    Any mix of clicks and a box goes to the refiner; a mask (bool H x W) is taken as it is.
    """

    clicks: tuple[Click, ...] = ()
    box: Box | None = None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.clicks and self.box is None and self.mask is None:
            raise ValueError("a correction needs at least one click, a box or a mask")


class Decision(str, Enum):
    NONE = "none"
    PSEUDO = "pseudo"
    USER = "user"


@dataclass
class ObjectRecord:
    """What the Lazy controller saw and did for one object on one frame."""

    label: int
    area: int
    S: float
    dS: float | None
    decision: Decision = Decision.NONE
    clicks: list[Click] = field(default_factory=list)
    box: Box | None = None
    answered: bool = False  # a user request that was answered (on-the-fly or by correct())
    revised: bool = False  # the mask was replaced by a later correction's backward propagation
    # The object's mask as propagated forward, kept when a correction or a backward revision
    # replaced it on this frame: the prior any later correction of this frame is refined against
    # (a re-propagation computes that same forward mask again).
    forward: PackedMask | None = None


@dataclass(frozen=True)
class PackedMask:
    """An index mask kept zlib-compressed. A session keeps every frame's output: raw, a long
    video's would not fit in memory (854x480: 400 KB a frame, about 5 KB packed; 1 ms to pack)."""

    shape: tuple[int, ...]
    dtype: str
    data: bytes

    @classmethod
    def pack(cls, mask: np.ndarray) -> PackedMask:
        mask = np.ascontiguousarray(mask)
        return cls(tuple(mask.shape), mask.dtype.str, zlib.compress(mask.tobytes(), 1))

    def unpack(self) -> np.ndarray:
        return np.frombuffer(zlib.decompress(self.data), dtype=np.dtype(self.dtype)).reshape(self.shape).copy()


@dataclass
class FrameRecord:
    """One processed frame: the output index mask and the per-object decisions."""

    index: int
    packed: PackedMask  # the output index mask, compressed: read and set it through ``mask``
    objects: dict[int, ObjectRecord]
    written: bool  # whether the frame entered the propagator's memory
    given: bool = False  # a mask for some objects was given on this frame (annotation)
    seconds: float = 0.0  # propagation time of this frame (without the Lazy layer)
    lazy_seconds: float = 0.0  # time spent in the Lazy layer (uncertainty, decisions, refiner excluded)

    @property
    def mask(self) -> np.ndarray:
        """Output index mask (H, W), uint8 or uint16, corrections applied; a new array each call."""
        return self.packed.unpack()

    @mask.setter
    def mask(self, value: np.ndarray) -> None:
        self.packed = PackedMask.pack(value)

    @property
    def review(self) -> bool:
        """True when a user correction was requested here and nobody answered it yet."""
        return any(o.decision is Decision.USER and not o.answered for o in self.objects.values())

    @property
    def decision(self) -> Decision:
        ds = {o.decision for o in self.objects.values()}
        if Decision.USER in ds:
            return Decision.USER
        if Decision.PSEUDO in ds:
            return Decision.PSEUDO
        return Decision.NONE
