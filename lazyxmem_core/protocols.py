"""The two plug-in protocols of the core: a mask propagator and a mask refiner.

Any engine (XMem, the embedded classical engine, a test double) that satisfies these can be
driven by the Lazy session. Arrays are numpy: frames are RGB uint8 (H, W, 3); index masks are
integer (H, W) with 0 = background and object label values elsewhere.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .types import Box, Click, FrameRef


@runtime_checkable
class Propagator(Protocol):
    """Carries object masks through a video, one frame at a time, in order.

    Per frame the caller calls :meth:`step` then :meth:`commit` exactly once each.

    Channel order of every probability map: background first, then the objects in ascending
    label value (``labels``). Objects given for the first time on a later frame add channels.
    """

    @property
    def labels(self) -> list[int]:
        """Object label values known so far, ascending; channel k + 1 is ``labels[k]``."""

    def reset(self) -> None:
        """Forget everything (a new video)."""

    def step(self, frame: np.ndarray, given: np.ndarray | None = None) -> np.ndarray:
        """Propagate to the next frame.

        frame: RGB uint8 (H, W, 3). given: optional index mask (H, W); its non-zero labels are
        taken as ground truth on this frame (new labels become new objects; pixels of other
        objects keep their prediction). Returns float32 softmax probabilities (N+1, H, W) at the
        frame's resolution. Nothing is written to memory yet: see :meth:`commit`.
        """

    def commit(self, mask: np.ndarray | None = None, write: bool | None = None) -> bool:
        """Close the current frame.

        mask: the frame's final index mask (after corrections); None keeps the prediction.
        Propagators may use it for their short-term state whatever ``write`` says.
        write: None follows the propagator's own schedule (every ``mem_every`` accepted frames,
        always on a frame with a given mask); False vetoes the memory write (UDU); True forces a
        memory write of ``mask`` now (IDU) without recomputing the frame's features and restarts
        the schedule. Returns whether the frame entered memory.
        """

    def snapshot(self) -> Any:
        """An opaque copy of the whole state, valid at any point (typically between step and commit)."""

    def restore(self, state: Any) -> None:
        """Return to a state taken by :meth:`snapshot`.

        A state may be restored several times, and going on after a restore must not change it
        (copy, or keep immutable data): deferred corrections resume from the same state repeatedly.
        """


@runtime_checkable
class Refiner(Protocol):
    """Turns prompts on one frame into a binary mask (SAM, GrabCut, ...)."""

    def refine(
        self,
        frame: np.ndarray,
        clicks: Sequence[Click] = (),
        box: Box | None = None,
        prior: np.ndarray | None = None,
        frame_id: FrameRef | None = None,
        reference: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Return a bool (H, W) mask for one object.

        clicks: positive / negative points in pixels; box: optional box prompt; prior: optional
        bool (H, W) mask (the propagated mask), context the refiner may use. frame_id (video and index) keys
        the per-frame feature cache so several calls on one frame cost one image encode; None
        means the refiner derives a key from the frame's content. Refiners are shared by tasks
        and threads: ``refine`` must be safe to call from several threads at once. reference: optional (frame, bool mask)
        of the same object on an earlier frame that a human gave or confirmed (its appearance and
        size); refiners may ignore it (SAM does).
        """
