"""Label Studio's frame numbers <-> the decoded video's frame indexes.

Label Studio 1.23.2 counts a video's frames at the config's ``<Video frameRate>`` (a number or a
``$key`` of the task's data; 24 when absent or not a number), whatever the file's own rate is
(its editor source, ``VideoCanvas.tsx`` and ``Video.js``, with the feature flag
``fflag_fix_front_optic_1608_improve_video_frame_seek_precision_short`` on, as shipped):

* the video has ``round(duration * rate)`` frames (``framesCount``);
* going to frame N (1-based: a keyframe, the frame buttons, a click in the timeline) sets the
  player's time to ``(N - 1) / rate`` rounded to 2 ms, plus 2 ms, and the browser shows the
  decoded frame on screen at that time: frame ``floor(time * video_rate)``.

When the two rates differ, Label Studio frame N is therefore not decoded frame N - 1: a 24 fps
video under ``frameRate="25"`` shows 63 frames for 60, and a box keyed to decoded frame i drawn on
Label Studio frame i + 1 lags the object by up to three frames. :class:`FrameMap` is the one
mapping every conversion uses, both ways.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

SEEK_STEP = 0.002  # Label Studio's BROWSER_TIME_PRECISION: seeks land on 2 ms steps, 2 ms late
LS_DEFAULT_RATE = 24.0  # what Label Studio uses when frameRate is absent or not a number
T = TypeVar("T")


def _js_round(x: float) -> int:
    """JavaScript's Math.round (halves go up; Python's round goes to even)."""
    return math.floor(x + 0.5)


def ls_seek_time(frame: int, cfg_fps: float) -> float:
    """Where Label Studio's player is when it shows its frame ``frame`` (1-based), in seconds."""
    return _js_round((frame - 1) / cfg_fps / SEEK_STEP) * SEEK_STEP + SEEK_STEP


def ls_to_video(frame: int, cfg_fps: float, video_fps: float, n: int) -> int:
    """The 0-based decoded frame that Label Studio shows as its frame ``frame`` (1-based), for a
    config rate ``cfg_fps`` and a video of ``n`` frames at ``video_fps``."""
    if cfg_fps == video_fps:  # one Label Studio frame per decoded frame (the 2 ms nudge is < a frame below 333 fps)
        return min(max(frame - 1, 0), n - 1)
    index = math.floor(ls_seek_time(frame, cfg_fps) * video_fps + 1e-9)
    return min(max(index, 0), n - 1)


def ls_frame_count(cfg_fps: float, video_fps: float, n: int) -> int:
    """How many frames Label Studio shows for ``n`` decoded frames (its ``framesCount``)."""
    return max(1, _js_round(n / video_fps * cfg_fps))


def video_to_ls(index: int, cfg_fps: float, video_fps: float, n: int) -> int:
    """The first Label Studio frame (1-based) that shows decoded frame ``index``, or when none
    does (Label Studio's rate below the video's skips some) the first that shows a later one."""
    count = ls_frame_count(cfg_fps, video_fps, n)
    # ls_to_video is non-decreasing in the frame: start from the estimate and step to the edge.
    guess = min(max(1, math.floor(index * cfg_fps / video_fps) + 1), count)
    while guess > 1 and ls_to_video(guess - 1, cfg_fps, video_fps, n) >= index:
        guess -= 1
    while guess < count and ls_to_video(guess, cfg_fps, video_fps, n) < index:
        guess += 1
    return guess


@dataclass(frozen=True)
class FrameMap:
    """One task's frames as Label Studio counts them (``ls_fps``) and as decoded (``n`` at
    ``video_fps``)."""

    ls_fps: float
    video_fps: float
    n: int

    def __post_init__(self) -> None:
        for name in ("ls_fps", "video_fps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"FrameMap {name} must be a positive number of frames per second, got {v!r}")
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"FrameMap n must be the decoded frame count (>= 1), got {self.n!r}")

    @classmethod
    def identity(cls, fps: float, n: int) -> FrameMap:
        """Label Studio counting at the video's own rate: frame N is decoded frame N - 1."""
        return cls(fps, fps, n)

    @property
    def ls_count(self) -> int:
        return ls_frame_count(self.ls_fps, self.video_fps, self.n)

    @property
    def duration(self) -> float:
        return self.n / self.video_fps

    @property
    def matched(self) -> bool:
        """True when every Label Studio frame is the decoded frame of the same number."""
        return self.ls_count == self.n and all(self.to_video(k) == k - 1 for k in range(1, self.n + 1))

    def to_video(self, frame: int) -> int:
        return ls_to_video(frame, self.ls_fps, self.video_fps, self.n)

    def to_ls(self, index: int) -> int:
        return video_to_ls(index, self.ls_fps, self.video_fps, self.n)

    def time(self, frame: int) -> float:
        """The time (seconds) at which Label Studio frame ``frame`` starts: ``(frame - 1) / rate``."""
        return (frame - 1) / self.ls_fps

    def resample(self, per_decoded: Sequence[T]) -> list[T]:
        """A per-decoded-frame sequence read at each Label Studio frame (index k = frame k + 1)."""
        return [per_decoded[self.to_video(k)] for k in range(1, self.ls_count + 1)]

    def ls_frames_of(self, indexes: Sequence[int]) -> list[int]:
        """The 0-based Label Studio frame positions (frame - 1) that show any of ``indexes``."""
        wanted = set(indexes)
        return [k - 1 for k in range(1, self.ls_count + 1) if self.to_video(k) in wanted]


def ls_frame_rate(attr: str | None, data: dict[str, Any] | None) -> tuple[float, str | None]:
    """The rate Label Studio 1.23.2 counts frames at for a ``<Video frameRate>`` attribute and a
    task's data, the way its editor normalises it (a ``$key`` read from the data; anything not
    a positive number -> 24; below 1 -> its inverse), and why it fell back, if it did."""
    raw: Any = attr
    why = None
    if attr and attr.startswith("$"):
        key = attr[1:]
        raw = (data or {}).get(key)
        if raw is None:
            why = f"the task has no data.{key} for frameRate=\"{attr}\""
    try:
        rate = float(raw) if raw not in (None, "") and not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        rate = math.nan
    if not math.isfinite(rate) or rate <= 0:
        return LS_DEFAULT_RATE, why or (f"frameRate {attr!r} is not a positive number" if attr else None)
    return (1.0 / rate if rate < 1 else rate), None


def task_frame_map(attr: str | None, data: dict[str, Any] | None, video_fps: float | None, n: int | None,
                   task_id: Any = None) -> FrameMap | None:
    """The task's :class:`FrameMap`; logs once per call (per task) when Label Studio's count differs
    from the decoded one, saying what makes them one. None, logged, when the video's frame count or
    rate is unknown (a container that does not declare them): frames are then taken one for one."""
    ls_fps, why = ls_frame_rate(attr, data)
    if not n or not video_fps or not math.isfinite(video_fps) or video_fps <= 0:
        log.warning("task %s: the video's frame count or rate is unknown (%s frames at %s fps): Label Studio's "
                    "frame N is taken as video frame N, which holds only if frameRate (%g) is the video's rate",
                    task_id, n, video_fps, ls_fps)
        return None
    fmap = FrameMap(ls_fps, video_fps, n)
    if why:
        log.warning("task %s: %s: Label Studio counts this video at %g fps", task_id, why, ls_fps)
    if not fmap.matched:
        log.warning("task %s: Label Studio counts %d frames at %g fps, the video has %d at %.3f fps: frames "
                    "are mapped both ways; set the task's frame rate (data.fps with frameRate=\"$fps\") to %.3f "
                    "so that each Label Studio frame is one video frame", task_id, fmap.ls_count, ls_fps, n,
                    video_fps, video_fps)
    return fmap
