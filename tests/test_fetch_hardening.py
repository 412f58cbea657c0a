"""Media downloads against hostile hosts, on loopback only: the Label Studio token reaches Label
Studio's own media paths and nothing else (canary servers count every request that carries an
Authorization header), a host that trickles bytes is cut at the download's deadline, and the
cache stays private and bounded."""
from __future__ import annotations

import os
import random
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from backend.fetch import FetchError, MediaFetcher

TOKEN = "k" * 40
BODY = b"media bytes " * 100


class Recorder(BaseHTTPRequestHandler):
    """Serves BODY on every path but /redirect (to ?to=...), /slow (a byte a second) and
    /slowheaders (the status line a byte a second); records (path, Authorization) per request."""

    server: RecordingServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append((self.path, self.headers.get("Authorization")))
        if "/redirect?to=" in self.path:
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
            return
        try:
            if self.path.startswith("/slowheaders"):
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx":
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(1)
                return
            if self.path.startswith("/slow"):
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(1)
                return
        except OSError:  # the client hung up: what the deadline is for
            return
        body = self.server.bodies.get(self.path.split("?")[0], BODY)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class RecordingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Recorder)
        self.hits: list[tuple[str, str | None]] = []
        self.bodies: dict[str, bytes] = {}
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def with_token(self) -> list[str]:
        return [p for p, auth in self.hits if auth]


def serve(port: int = 0) -> RecordingServer:
    return RecordingServer(port)


def stop(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture
def ls() -> Iterator[RecordingServer]:
    server = serve()
    yield server
    stop(server)


@pytest.fixture
def canary() -> Iterator[RecordingServer]:
    server = serve()
    yield server
    stop(server)


def fetcher(ls_url: str, tmp_path: Path, allowed: set[str] = frozenset(), **kw) -> MediaFetcher:
    return MediaFetcher(ls_url, TOKEN, tmp_path / "cache", set(allowed), **kw)


def parts(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def test_the_token_goes_to_label_studio_media_paths_only(ls, canary, tmp_path):
    f = fetcher(ls.url, tmp_path, {canary.url.split("//")[1]})
    for path in ("/data/upload/1/v.mp4", "/data/local-files/?d=media/v.webm",
                 "/storage-data/uploaded/?filepath=upload/1/v.mp4",
                 "/tasks/7/resolve/?fileuri=czM6Ly9iL3YubXA0", "/projects/3/resolve/?fileuri=czM6Ly9iL3YubXA0"):
        assert f.fetch(path).read_bytes() == BODY
    f.fetch(ls.url + "/data/upload/1/absolute.mp4")
    assert len(ls.with_token) == 6 and len(ls.hits) == 6  # every media path, relative or absolute, had the token
    f.fetch(canary.url + "/data/upload/1/v.mp4")  # the same path on an allowed media host: no token
    assert canary.hits and canary.with_token == []


@pytest.mark.parametrize("path", ["/api/projects/1/export", "/api/tasks/1", "/user/account/",
                                  "/data/upload/../../api/projects/1/export",
                                  "/data/upload/%2e%2e/%2E%2E/api/projects/1/export",
                                  "/data/upload/1%2f..%2f..%2f..%2fapi/projects/1/export", "//127.0.0.1:1/data/upload/x"])
def test_other_label_studio_paths_are_refused_as_media(ls, tmp_path, path):
    f = fetcher(ls.url, tmp_path)
    with pytest.raises(FetchError, match="is not Label Studio task media"):
        f.fetch(path)
    assert ls.hits == []  # refused before any request, with or without the token
    f.fetch("/data/upload/1/ok.mp4")
    assert ls.with_token == ["/data/upload/1/ok.mp4"]  # the check can pass: the same fetcher reaches media


def test_another_port_of_the_same_host_never_gets_the_token(ls, canary, tmp_path):
    f = fetcher(ls.url, tmp_path, {canary.url.split("//")[1]})
    f.fetch(canary.url + "/data/upload/1/v.mp4")
    assert canary.hits and canary.with_token == []
    f.fetch(ls.url + "/data/upload/1/v.mp4")
    assert ls.with_token  # the same request on Label Studio's own port carries it


def prefix_alike_pair() -> tuple[RecordingServer, RecordingServer]:
    """Servers on ports P and P*10+1 (e.g. :2001 and :20011): the second's URL starts with the first's."""
    for port in random.sample(range(1025, 6553), 50):
        try:
            first = serve(port)
        except OSError:
            continue
        try:
            return first, serve(port * 10 + 1)
        except OSError:
            stop(first)
    pytest.skip("no free pair of ports")


def test_a_prefix_alike_origin_never_gets_the_token(tmp_path):
    # The old check, url.startswith(LABEL_STUDIO_URL), took the second server for Label Studio.
    ls, alike = prefix_alike_pair()
    try:
        assert alike.url.startswith(ls.url)
        f = fetcher(ls.url, tmp_path, {alike.url.split("//")[1]})
        f.fetch(alike.url + "/data/upload/1/v.mp4")
        assert alike.hits and alike.with_token == []
        f.fetch(ls.url + "/data/upload/1/v.mp4")
        assert ls.with_token == ["/data/upload/1/v.mp4"]
        assert f.is_label_studio(ls.url.replace("http://127.0.0.1", "HTTP://127.0.0.1") + "/x")
        assert not f.is_label_studio(alike.url + "/x") and not f.is_label_studio("https" + ls.url[4:] + "/x")
    finally:
        stop(ls)
        stop(alike)


def test_default_ports_are_the_same_origin(tmp_path):
    f = MediaFetcher("http://labelstudio", TOKEN, tmp_path / "c")
    assert f.is_label_studio("http://labelstudio:80/data/upload/1/v.mp4")
    assert f.is_label_studio("http://LabelStudio/data/upload/1/v.mp4")
    assert not f.is_label_studio("http://labelstudio-media/data/upload/1/v.mp4")
    assert not f.is_label_studio("https://labelstudio/data/upload/1/v.mp4")
    assert not f.is_label_studio("http://labelstudio:8080/data/upload/1/v.mp4")
    g = MediaFetcher("https://ls.example:443/sub/", TOKEN, tmp_path / "d")
    assert g.is_label_studio("https://ls.example/sub/data/upload/1/v.mp4")
    g._check_media_path("https://ls.example/sub/data/upload/1/v.mp4")
    with pytest.raises(FetchError):  # outside Label Studio's base path
        g._check_media_path("https://ls.example/data/upload/1/v.mp4")


def test_a_redirect_from_label_studio_to_another_host_drops_the_token(ls, canary, tmp_path):
    f = fetcher(ls.url, tmp_path, {canary.url.split("//")[1]})
    f.fetch(f"/data/upload/redirect?to={canary.url}/elsewhere.mp4")
    assert ls.with_token  # the first hop was Label Studio media: it carried the token
    assert canary.hits == [("/elsewhere.mp4", None)]


def test_a_redirect_from_another_host_to_label_studio_gets_no_token(ls, canary, tmp_path):
    f = fetcher(ls.url, tmp_path, {canary.url.split("//")[1]})
    f.fetch(f"{canary.url}/redirect?to={ls.url}/data/upload/1/v.mp4")
    assert [p for p, _ in ls.hits] == ["/data/upload/1/v.mp4"] and ls.with_token == []
    with pytest.raises(FetchError, match="not Label Studio task media"):  # nor may it lead to the API
        f.fetch(f"{canary.url}/redirect?to={ls.url}/api/projects/1/export")
    assert len(ls.hits) == 1


def test_a_host_that_sends_a_byte_a_second_is_cut_at_the_deadline(ls, canary, tmp_path):
    f = fetcher(ls.url, tmp_path, {canary.url.split("//")[1]}, deadline_s=2.0, timeout=60.0)
    for path in ("/slow.mp4", "/slowheaders.mp4"):  # a trickling body, then trickling headers
        start = time.monotonic()
        with pytest.raises(FetchError, match="not done within MEDIA_TIMEOUT_S=2 s"):
            f.fetch(canary.url + path)
        took = time.monotonic() - start
        assert 1.9 < took < 4.0, took  # each read returned within the 60 s read timeout: only the deadline cut it
        assert parts(f.cache) == [] and list(f.cache.iterdir()) == []
    # Against a fast host the same deadline is no obstacle.
    assert f.fetch(canary.url + "/fast.mp4").read_bytes() == BODY


def test_a_failed_download_leaves_no_part_file(canary, tmp_path):
    canary.bodies["/big.mp4"] = b"x" * 5000
    f = fetcher("", tmp_path, {canary.url.split("//")[1]}, max_bytes=4000)
    with pytest.raises(FetchError, match="MAX_MEDIA_MB"):
        f.fetch(canary.url + "/big.mp4")
    assert list(f.cache.iterdir()) == []


def test_the_cache_is_private(ls, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o755)
    old = folder / ("0" * 32 + ".mp4")
    old.write_bytes(b"cached by an older version")
    old.chmod(0o644)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # as an older version left it
    f = fetcher(ls.url, tmp_path)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    path = f.fetch("/data/upload/1/v.mp4")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    fresh = MediaFetcher(ls.url, TOKEN, tmp_path / "new" / "cache")
    assert stat.S_IMODE(fresh.cache.stat().st_mode) == 0o700


def test_the_cache_is_bounded_least_recently_used_first(ls, tmp_path):
    for i in range(6):
        ls.bodies[f"/data/upload/1/{i}.mp4"] = bytes([i]) * 300_000
    f = fetcher(ls.url, tmp_path, cache_bytes=1_000_000)
    foreign = f.cache / "notes.txt"  # not a name the fetcher gives: never counted nor removed
    foreign.write_bytes(b"n" * 2_000_000)
    os.utime(foreign, (0, 0))
    paths = {}
    for i in range(3):
        paths[i] = f.fetch(f"/data/upload/1/{i}.mp4")
        time.sleep(0.02)  # distinct modification times
    f.fetch("/data/upload/1/0.mp4")  # a hit: 0 is now the most recently used, 1 the least
    time.sleep(0.02)
    assert len(ls.hits) == 3
    sizes = []
    for i in range(3, 6):
        paths[i] = f.fetch(f"/data/upload/1/{i}.mp4")
        sizes.append(sum(p.stat().st_size for p in f.cache.iterdir() if p != foreign))
        assert paths[i].exists()  # never the file just fetched
        if i == 3:  # least recently used first: 1 goes, 0 (fetched before it, used after) stays
            assert not paths[1].exists() and paths[0].exists() and paths[2].exists()
        time.sleep(0.02)
    assert max(sizes) <= 1_000_000, sizes
    assert foreign.exists()
    f.fetch("/data/upload/1/1.mp4")  # evicted: downloaded again
    assert [p for p, _ in ls.hits].count("/data/upload/1/1.mp4") == 2


def test_a_file_over_the_bound_is_kept_the_rest_evicted(ls, tmp_path):
    ls.bodies["/data/upload/1/small.mp4"] = b"s" * 1000
    ls.bodies["/data/upload/1/huge.mp4"] = b"h" * 50_000
    f = fetcher(ls.url, tmp_path, cache_bytes=10_000)
    small = f.fetch("/data/upload/1/small.mp4")
    huge = f.fetch("/data/upload/1/huge.mp4")
    assert huge.exists() and not small.exists()


def test_stale_part_files_are_removed_at_start(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    stale, live = folder / ("a" * 32 + ".mp4.123-0000dead.part"), folder / ("b" * 32 + ".mp4.456-0000beef.part")
    older_version = folder / ("c" * 32 + ".mp4.part")  # the name an older version used
    stale.write_bytes(b"left by a killed process")
    live.write_bytes(b"being written by another process sharing the cache")
    hour_ago = time.time() - 3600
    older_version.write_bytes(b"left by an older version")
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(older_version, (hour_ago, hour_ago))
    MediaFetcher(None, None, folder, deadline_s=300)
    assert not stale.exists() and not older_version.exists()  # older than any download may last
    assert live.exists()  # recent: it may belong to a live download in another process


def test_a_cache_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    folder.mkdir()
    MediaFetcher(None, None, folder)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(folder).st_uid + 1)
    with pytest.raises(FetchError, match="belongs to another user"):
        MediaFetcher(None, None, folder)


def test_a_socket_closed_by_the_deadline_is_not_taken_for_the_end_of_the_body(canary, tmp_path):
    # No Content-Length: the connection's end marks the body's end, and so does a shutdown.
    class NoLength(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(20):
                    self.wfile.write(b"y")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoLength)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    host = f"127.0.0.1:{server.server_address[1]}"
    try:
        f = fetcher("", tmp_path, {host}, deadline_s=1.5)
        with pytest.raises(FetchError, match="not done within"):
            f.fetch(f"http://{host}/nolength.mp4")
        assert list(f.cache.iterdir()) == []  # nothing truncated was cached
    finally:
        stop(server)
