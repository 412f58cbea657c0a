"""Task media whose frames are refused from their headers when over ``MAX_PIXELS``, before any of
them is decoded: OpenCV decodes a 16000x16000 PNG (762 KB on disk) into 768 MB, and what follows
(the frame store, the refiner) multiplies it."""
from __future__ import annotations

from typing import Any

from .checks import check_frames
from .fetch import TaskMedia
from .labelconfig import LabelConfig


class BoundedMedia(TaskMedia):
    """:class:`TaskMedia` that checks each frame's size (the image header, the video container's
    codec parameters) before its parent decodes it. Files are fetched here once, then found in
    the media cache by the parent."""

    def __init__(self, *args: Any, max_pixels: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_pixels = max_pixels

    def check(self, task: dict, cfg: LabelConfig, indices: list[int] | None = None) -> None:
        """Every frame the task would decode (or only ``indices`` of an image sequence)."""
        value = self.value(task, cfg)
        if cfg.mode == "video":
            check_frames([(value, self.fetcher.fetch(value))], True, self.max_pixels)
            return
        urls = value if indices is None else [value[t] for t in indices if 0 <= t < len(value)]
        check_frames(((u, self.fetcher.fetch(u)) for u in urls), False, self.max_pixels)

    def open(self, task: dict, cfg: LabelConfig, *args: Any, **kwargs: Any) -> Any:
        self.check(task, cfg)
        return super().open(task, cfg, *args, **kwargs)

    def some(self, task: dict, cfg: LabelConfig, indices: list[int], *args: Any, **kwargs: Any) -> Any:
        self.check(task, cfg, indices)
        return super().some(task, cfg, indices, *args, **kwargs)

    def declared_frames(self, task: dict, cfg: LabelConfig, *args: Any, **kwargs: Any) -> Any:
        # A /predict reads the video's header here before it queues it: a video too large is
        # refused in the request, not in a job nobody watches.
        if cfg.mode == "video":
            self.check(task, cfg)
        return super().declared_frames(task, cfg, *args, **kwargs)
