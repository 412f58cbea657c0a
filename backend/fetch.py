"""Download task media: Label Studio URLs with the API key, other hosts only when allowed."""
from __future__ import annotations

from lazyxmem_core.errors import LazyXMemError

import hashlib
import logging
import os
import threading
from pathlib import Path
from urllib.parse import urljoin, urlparse

import requests

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
