"""Task media: downloaded (Label Studio URLs with the API key, other hosts only when allowed), then opened."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlparse

import cv2
import requests

from lazyxmem_core.errors import LazyXMemError
from lazyxmem_core.media import FrameSequence, ImageFiles, SparseFrames, VideoFrames, read_video_frames, video_header

from .convert import TaskError
from .labelconfig import LabelConfig

log = logging.getLogger(__name__)


class FetchError(LazyXMemError):
    """Media that cannot or may not be fetched; the message says why and what to do."""


class MediaFetcher:
    """Fetches URLs into a cache folder keyed by URL (a task's media is read once per cache life)."""

    def __init__(self, ls_url: str | None, api_key: str | None, cache_dir: str | os.PathLike,
                 allowed_hosts: set[str] | None = None, max_bytes: int = 2 << 30, timeout: float = 60.0) -> None:
        self.ls_url = (ls_url or "").rstrip("/")
        self.api_key = api_key
        self.cache = Path(cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        ls_host = urlparse(self.ls_url).netloc if self.ls_url else ""
        self.allowed = {h.strip().lower() for h in (allowed_hosts or set()) if h.strip()} | ({ls_host.lower()} if ls_host else set())
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def resolve(self, url: str) -> str:
        if not isinstance(url, str) or not url:
            raise FetchError(f"media URL {url!r} is not a string")
        if url.startswith("/"):
            if not self.ls_url:
                raise FetchError(f"media {url} is served by Label Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
            return self.ls_url + url
        scheme = urlparse(url).scheme
        if scheme not in ("http", "https"):
            raise FetchError(f"media URL {url} has scheme {scheme!r}: only http(s) and Label Studio paths are supported "
                             "(connect cloud storage in Label Studio so that it presigns the URLs)")
        return url

    def _headers(self, url: str) -> dict[str, str]:
        if self.api_key and self.ls_url and url.startswith(self.ls_url):
            return {"Authorization": f"Token {self.api_key}"}
        return {}

    def _check_host(self, url: str) -> None:
        host = urlparse(url).netloc.lower()
        if host not in self.allowed:
            raise FetchError(f"host {host} is not allowed for media downloads: add it to ALLOWED_MEDIA_HOSTS "
                             f"(allowed: {', '.join(sorted(self.allowed)) or 'none'})")

    def fetch(self, url: str, suffix: str = "") -> Path:
        """Local path of the media at ``url`` (downloaded once)."""
        full = self.resolve(url)
        key = hashlib.sha256(full.encode()).hexdigest()[:32]
        if not suffix:
            suffix = Path(urlparse(full).path).suffix[:8]
            if not suffix and "d=" in full:  # local-files: /data/local-files/?d=dir/video.webm
                suffix = Path(full.split("d=", 1)[1].split("&")[0]).suffix[:8]
        path = self.cache / f"{key}{suffix}"
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if path.exists():
                return path
            self._download(full, path)
        return path

    def _download(self, url: str, path: Path) -> None:
        for _ in range(5):  # redirects are followed by hand so that each hop is checked
            self._check_host(url)
            try:
                r = requests.get(url, headers=self._headers(url), stream=True, timeout=self.timeout, allow_redirects=False)
            except requests.RequestException as exc:
                raise FetchError(f"cannot download {url}: {exc}") from None
            if r.is_redirect or r.status_code in (301, 302, 303, 307, 308):
                url = urljoin(url, r.headers.get("Location", ""))
                r.close()
                continue
            if r.status_code != 200:
                raise FetchError(f"cannot download {url}: HTTP {r.status_code}"
                                 + (" (check LABEL_STUDIO_API_KEY)" if r.status_code in (401, 403) else ""))
            size = int(r.headers.get("Content-Length") or 0)
            if size > self.max_bytes:
                raise FetchError(f"{url} is {size} bytes, over the limit of {self.max_bytes} (MAX_MEDIA_MB)")
            tmp = path.with_suffix(path.suffix + ".part")
            got = 0
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    got += len(chunk)
                    if got > self.max_bytes:
                        f.close()
                        tmp.unlink(missing_ok=True)
                        raise FetchError(f"{url} is over the limit of {self.max_bytes} bytes (MAX_MEDIA_MB)")
                    f.write(chunk)
            tmp.replace(path)
            return
        raise FetchError(f"too many redirects for {url}")


class TaskMedia:
    """A task's frames: fetched with :class:`MediaFetcher`, then opened whole for a session, or
    only a few of them read for an answer about one frame."""

    def __init__(self, fetcher: MediaFetcher, max_frames: int, frame_store_mb: float) -> None:
        self.fetcher, self.max_frames, self.frame_store_mb = fetcher, max_frames, frame_store_mb

    def value(self, task: dict, cfg: LabelConfig) -> Any:
        data = task.get("data") or {}
        if cfg.value_key not in data:
            raise TaskError(f"task {task.get('id')} has no data field {cfg.value_key!r} (the config's value)")
        value = data[cfg.value_key]
        if cfg.mode == "video" and not isinstance(value, str):
            raise TaskError(f"task {task.get('id')}: data.{cfg.value_key} must be a video URL")
        if cfg.mode == "images":
            if not isinstance(value, list) or not value or not all(isinstance(u, str) for u in value):
                raise TaskError(f"task {task.get('id')}: data.{cfg.value_key} must be a non-empty list of image URLs")
            if len(value) > self.max_frames:
                raise TaskError(f"task {task.get('id')} has {len(value)} frames, over MAX_FRAMES={self.max_frames}")
        return value

    def open(self, task: dict, cfg: LabelConfig) -> tuple[FrameSequence, float]:
        """Every frame of the task, and its frame rate."""
        value = self.value(task, cfg)
        if cfg.mode == "video":
            frames = VideoFrames(self.fetcher.fetch(value), max_frames=self.max_frames, raw_limit_mb=self.frame_store_mb)
            return frames, cfg.frame_rate or frames.fps
        # Checked whole now (a bad image is an error before any work), then decoded again when
        # read: a long sequence's decoded images are never all in memory.
        files, shapes = [], set()
        for url in value:
            path = self.fetcher.fetch(url)
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise TaskError(f"task {task.get('id')}: image {url} cannot be decoded")
            files.append(path)
            shapes.add(bgr.shape)
        if len(shapes) > 1:
            raise TaskError(f"task {task.get('id')}: the images of a sequence must all have one size")
        return ImageFiles(files), 1.0

    def some(self, task: dict, cfg: LabelConfig, indices: list[int]) -> tuple[SparseFrames, float]:
        """Only frames ``indices`` of the task (the others are not decoded), and its frame rate."""
        value = self.value(task, cfg)
        if cfg.mode == "video":
            path = self.fetcher.fetch(value)
            n, fps = video_header(path)
            frames = read_video_frames(path, indices)
            return SparseFrames(max(n or 0, max(indices) + 1), frames), cfg.frame_rate or fps
        out = {}
        for t in indices:
            if not 0 <= t < len(value):
                raise TaskError(f"task {task.get('id')}: item {t} is outside the sequence (0..{len(value) - 1})")
            bgr = cv2.imread(str(self.fetcher.fetch(value[t])), cv2.IMREAD_COLOR)
            if bgr is None:
                raise TaskError(f"task {task.get('id')}: image {value[t]} cannot be decoded")
            out[t] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return SparseFrames(len(value), out), 1.0

    def declared_frames(self, task: dict, cfg: LabelConfig) -> int | None:
        """A video task's frame count as its container declares it (the file is fetched, not
        decoded); None for image sequences or containers that do not say."""
        if cfg.mode != "video":
            return None
        # A file that cannot be opened is an error now, in the request, not in a job nobody watches.
        return video_header(self.fetcher.fetch(self.value(task, cfg)))[0]
