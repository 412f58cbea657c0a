"""Task media: downloaded (Label Studio URLs with the API key, other hosts only when allowed), then opened."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import cv2
import requests
import urllib3
from requests.adapters import HTTPAdapter

from lazyxmem_core.errors import LazyXMemError
from lazyxmem_core.media import FrameSequence, ImageFiles, SparseFrames, VideoFrames, read_video_frames, video_header

from .convert import TaskError
from .labelconfig import LabelConfig

log = logging.getLogger(__name__)

# The paths on which Label Studio 1.23.2 serves task media (relative to its base URL): uploaded
# files (data/upload/<path>, storage-data/uploaded/?filepath=), local files (data/local-files/?d=)
# and cloud storage resolved by task or project (tasks|projects/<id>/resolve/, the older
# .../presign/). Anything else on Label Studio (its API above all) is never task media.
_LS_MEDIA_PATH = re.compile(r"/(?:data/upload/.+|data/local-files/?|storage-data/uploaded/?"
                            r"|(?:tasks|projects)/\d+/(?:resolve|presign)/?)")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# The names this fetcher gives files (a URL's hash, its suffix; a download's own partial file, or
# the older key.suffix.part): only these are counted, made private or removed, so that a CACHE_DIR
# pointed at a folder holding anything else never loses it.
_CACHED = re.compile(r"[0-9a-f]{32}(?:\.[^./]{1,7})?")
_PARTIAL = re.compile(r"[0-9a-f]{32}(?:\.[^./]{1,7})?(?:\.\d+-[0-9a-f]{8})?\.part")


class FetchError(LazyXMemError):
    """Media that cannot or may not be fetched; the message says why and what to do."""


def _origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the scheme's default port filled in; None when unparsable."""
    try:
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number, a bad IPv6 literal
        return None
    if not host or port is None:
        return None
    return scheme, host, port


# -- a deadline for a whole download ----------------------------------------------------------------
# requests' timeout bounds each socket read, so a host that sends a byte a second never times out.
# Every socket a download opens is registered with its deadline, and a timer shuts the sockets
# down when it passes: whatever read is blocked then (headers or body) returns at once.
_current = threading.local()


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def left(self) -> float:
        return self.at - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shutdown(sock)

    def __enter__(self) -> _Deadline:
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        _current.deadline = None


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


def _watch_new_socket(sock: Any) -> Any:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None and isinstance(sock, socket.socket):
        deadline.watch(sock)
    return sock


class _WatchedHTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _watch_new_socket(super()._new_conn())


class _WatchedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self) -> socket.socket:  # the raw socket: shutting it down ends TLS too
        return _watch_new_socket(super()._new_conn())


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = _WATCHED_POOLS  # HTTP(S) proxies; SOCKS keeps its own
        return manager


class MediaFetcher:
    """Fetches URLs into a private cache folder keyed by URL (a task's media is read once per
    cache life), bounded in size: the least recently used files go first."""

    def __init__(self, ls_url: str | None, api_key: str | None, cache_dir: str | os.PathLike,
                 allowed_hosts: set[str] | None = None, max_bytes: int = 2 << 30, timeout: float = 60.0,
                 deadline_s: float = 300.0, cache_bytes: int = 20 << 30) -> None:
        self.ls_url = (ls_url or "").rstrip("/")
        self.api_key = api_key
        self.ls_origin = _origin(self.ls_url) if self.ls_url else None
        self.ls_base = urlsplit(self.ls_url).path.rstrip("/") if self.ls_url else ""
        ls_host = urlsplit(self.ls_url).netloc if self.ls_url else ""
        self.allowed = {h.strip().lower() for h in (allowed_hosts or set()) if h.strip()} | ({ls_host.lower()} if ls_host else set())
        self.max_bytes = max_bytes
        self.timeout = timeout  # per connect / read; ``deadline_s`` bounds the whole download
        self.deadline_s = deadline_s
        self.cache_bytes = cache_bytes
        self.cache = Path(cache_dir)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache_used = 0  # bytes at the last scan plus what this process added since
        self._scanned_at = 0.0
        self._private_dir()
        with self._cache_lock:
            self._scan(evict=False)

    # -- the cache folder ---------------------------------------------------------------------------
    def _private_dir(self) -> None:
        """The cache folder, created 0700 (media may be private to Label Studio); refused when
        someone else owns it (a name in a shared temporary folder can be taken first)."""
        self.cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.cache.stat()
        if not stat.S_ISDIR(st.st_mode):
            raise FetchError(f"CACHE_DIR {self.cache} is not a folder")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise FetchError(f"CACHE_DIR {self.cache} belongs to another user (uid {st.st_uid}): "
                             "set CACHE_DIR to a folder of this user's")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(self.cache, 0o700)

    def _scan(self, evict: bool, keep: Path | None = None) -> None:
        """Re-read the cache folder (other processes share it): remove partial downloads no live
        download can own, make older files private, and with ``evict`` delete the least recently
        used files (never ``keep``) until the cache is under 90 % of its bound. Holds _cache_lock."""
        now = time.time()
        files: list[tuple[float, int, str]] = []
        total = 0
        with os.scandir(self.cache) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:  # removed meanwhile by another process
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if _PARTIAL.fullmatch(entry.name):
                    # A live download writes its .part within its deadline, so an older one was
                    # left by a process that died (or by a version that did not clean up).
                    if now - st.st_mtime > self.deadline_s + 60:
                        self._unlink(entry.path, "stale partial download")
                    else:
                        total += st.st_size
                    continue
                if not _CACHED.fullmatch(entry.name):
                    continue
                if stat.S_IMODE(st.st_mode) & 0o077:
                    try:
                        os.chmod(entry.path, 0o600)
                    except OSError:
                        pass
                total += st.st_size
                files.append((st.st_mtime, st.st_size, entry.name))
        if evict and total > self.cache_bytes:
            target = int(self.cache_bytes * 0.9)  # some room, so that the next download does not scan again
            for _, size, name in sorted(files):  # oldest use first (a hit touches the file)
                if total <= target:
                    break
                if keep is not None and name == keep.name:
                    continue
                if self._unlink(os.path.join(self.cache, name), "least recently used"):
                    total -= size
        self._cache_used = total
        self._scanned_at = time.monotonic()

    @staticmethod
    def _unlink(path: str, why: str) -> bool:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return True  # another process took it
        except OSError as exc:
            log.warning("media cache: cannot remove %s (%s): %s", path, why, exc)
            return False
        log.debug("media cache: removed %s (%s)", path, why)
        return True

    def _account(self, path: Path, size: int) -> None:
        """After a download: scan (other processes add files too) at most every 30 s, or at once
        when the cache may be over its bound, and evict then."""
        with self._cache_lock:
            self._cache_used += size
            if self._cache_used > self.cache_bytes or time.monotonic() - self._scanned_at > 30:
                self._scan(evict=True, keep=path)

    # -- URLs ---------------------------------------------------------------------------------------
    def resolve(self, url: str) -> str:
        if not isinstance(url, str) or not url:
            raise FetchError(f"media URL {url!r} is not a string")
        if url.startswith("/"):
            if not self.ls_url:
                raise FetchError(f"media {url} is served by Label Studio: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
            return self.ls_url + url
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise FetchError(f"media URL {url} has scheme {scheme!r}: only http(s) and Label Studio paths are supported "
                             "(connect cloud storage in Label Studio so that it presigns the URLs)")
        return url

    def is_label_studio(self, url: str) -> bool:
        """Whether ``url`` is on Label Studio's origin: scheme, host and port all equal (a prefix
        of the URL is not enough: http://labelstudio is a prefix of http://labelstudio-media)."""
        return self.ls_origin is not None and _origin(url) == self.ls_origin

    def _check_media_path(self, url: str) -> None:
        """A URL on Label Studio's origin must be one of its media paths: the backend's token
        opens the whole API, and task data may name any URL."""
        path = unquote(urlsplit(url).path)
        # Dot segments would be resolved by a proxy in front of Label Studio (and %2e by requests
        # itself) into another path than the one checked here.
        segments = path.split("/")
        rel = path[len(self.ls_base):] if path.startswith(self.ls_base + "/") else None
        if "." in segments or ".." in segments or "\\" in path or rel is None or not _LS_MEDIA_PATH.fullmatch(rel):
            raise FetchError(f"{url} is not Label Studio task media (uploads /data/upload/, local files "
                             "/data/local-files/?d=, storage /tasks/<id>/resolve/ or /projects/<id>/resolve/): "
                             "it is not downloaded with the backend's token")

    def _headers(self, url: str, via_other_origin: bool) -> dict[str, str]:
        """The token for this hop's own URL: only Label Studio's media, never once the chain of
        redirects has passed through another origin (that host chose where it leads)."""
        if self.api_key and not via_other_origin and self.is_label_studio(url):
            return {"Authorization": f"Token {self.api_key}"}
        return {}

    def _check_host(self, url: str) -> None:
        host = urlsplit(url).netloc.lower()
        if host not in self.allowed:
            raise FetchError(f"host {host} is not allowed for media downloads: add it to ALLOWED_MEDIA_HOSTS "
                             f"(allowed: {', '.join(sorted(self.allowed)) or 'none'})")

    # -- downloads ----------------------------------------------------------------------------------
    def fetch(self, url: str, suffix: str = "") -> Path:
        """Local path of the media at ``url`` (downloaded once)."""
        full = self.resolve(url)
        key = hashlib.sha256(full.encode()).hexdigest()[:32]
        if not suffix:
            suffix = Path(urlsplit(full).path).suffix[:8]
            if not suffix and "d=" in full:  # local-files: /data/local-files/?d=dir/video.webm
                suffix = Path(full.split("d=", 1)[1].split("&")[0]).suffix[:8]
        path = self.cache / f"{key}{suffix}"
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            try:
                os.utime(path)  # a hit: the file is now the most recently used
                return path
            except FileNotFoundError:
                pass
            except OSError:  # not ours to touch (left by another user): still a hit
                if path.exists():
                    return path
            size = self._download(full, path)
            self._account(path, size)
        return path

    def _download(self, url: str, path: Path) -> int:
        """Download ``url`` into ``path`` within the deadline; returns its size. Nothing is left
        behind on failure."""
        # A name of its own per download: the web process and the workers share the cache.
        tmp = self.cache / f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part"
        try:
            with _Deadline(self.deadline_s) as deadline, requests.Session() as session:
                session.mount("http://", _WatchedAdapter())
                session.mount("https://", _WatchedAdapter())
                try:
                    got = self._follow(session, url, tmp, deadline)
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                    if deadline.expired:
                        raise self._too_slow(url) from None
                    raise FetchError(f"cannot download {url}: {exc}") from None
                if deadline.expired:  # the sockets were shut down: what was read may be cut short
                    raise self._too_slow(url)
            os.replace(tmp, path)
            return got
        finally:
            tmp.unlink(missing_ok=True)

    def _too_slow(self, url: str) -> FetchError:
        return FetchError(f"cannot download {url}: not done within MEDIA_TIMEOUT_S={self.deadline_s:g} s "
                          "(a slow or stalled host; raise MEDIA_TIMEOUT_S for large media on slow links)")

    def _follow(self, session: requests.Session, url: str, tmp: Path, deadline: _Deadline) -> int:
        via_other_origin = False
        for _ in range(5):  # redirects are followed by hand so that each hop is checked
            self._check_host(url)
            if self.is_label_studio(url):
                self._check_media_path(url)
            else:
                via_other_origin = True
            left = deadline.left()
            if left <= 0:
                raise self._too_slow(url)
            per_op = min(self.timeout, left)
            headers = self._headers(url, via_other_origin)
            with session.get(url, headers=headers, stream=True, timeout=(per_op, per_op), allow_redirects=False) as r:
                if r.is_redirect or r.status_code in (301, 302, 303, 307, 308):
                    url = urljoin(url, r.headers.get("Location", ""))
                    continue
                if r.status_code != 200:
                    hint = ""
                    if r.status_code in (401, 403):
                        hint = (" (Label Studio media reached through a redirect from another host is fetched without "
                                "the token)" if via_other_origin and self.is_label_studio(url)
                                else " (check LABEL_STUDIO_API_KEY)")
                    raise FetchError(f"cannot download {url}: HTTP {r.status_code}{hint}")
                size = int(r.headers.get("Content-Length") or 0)
                if size > self.max_bytes:
                    raise FetchError(f"{url} is {size} bytes, over the limit of {self.max_bytes} (MAX_MEDIA_MB)")
                got = 0
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
                with open(fd, "wb") as f:
                    for chunk in r.iter_content(1 << 20):
                        got += len(chunk)
                        if got > self.max_bytes:
                            raise FetchError(f"{url} is over the limit of {self.max_bytes} bytes (MAX_MEDIA_MB)")
                        if deadline.expired:
                            raise self._too_slow(url)
                        f.write(chunk)
                return got
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
        """Every frame of the task, and the video's own frame rate (1 for image sequences)."""
        value = self.value(task, cfg)
        if cfg.mode == "video":
            frames = VideoFrames(self.fetcher.fetch(value), max_frames=self.max_frames, raw_limit_mb=self.frame_store_mb)
            return frames, frames.fps  # the file's own rate: Label Studio's numbering is backend.frames' business
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
            return SparseFrames(max(n or 0, max(indices) + 1), frames), fps
        out = {}
        for t in indices:
            if not 0 <= t < len(value):
                raise TaskError(f"task {task.get('id')}: item {t} is outside the sequence (0..{len(value) - 1})")
            bgr = cv2.imread(str(self.fetcher.fetch(value[t])), cv2.IMREAD_COLOR)
            if bgr is None:
                raise TaskError(f"task {task.get('id')}: image {value[t]} cannot be decoded")
            out[t] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return SparseFrames(len(value), out), 1.0

    def declared_rate(self, task: dict, cfg: LabelConfig) -> tuple[int | None, float]:
        """A video task's (frame count, fps) as its container declares them (fetched, not decoded)."""
        return video_header(self.fetcher.fetch(self.value(task, cfg)))

    def declared_frames(self, task: dict, cfg: LabelConfig) -> int | None:
        """A video task's frame count as its container declares it (the file is fetched, not
        decoded); None for image sequences or containers that do not say."""
        if cfg.mode != "video":
            return None
        # A file that cannot be opened is an error now, in the request, not in a job nobody watches.
        return video_header(self.fetcher.fetch(self.value(task, cfg)))[0]
