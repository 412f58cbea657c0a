"""Run a real Label Studio 1.23.2 and the project's backend on loopback, and drive them.

Label Studio lives in its own venv (``.venv-ls``, made by ``make test``): its Django pins clash
with ours. The backend runs under gunicorn exactly as ``make run`` starts it. Both are child
processes in their own process groups, so teardown ends them and nothing else.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import requests

REPO = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("LS_VENV", REPO / ".venv-ls"))
LS_BIN = LS_VENV / "bin" / "label-studio"
GUNICORN = Path(sys.executable).parent / "gunicorn"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Flags that keep Debian's chromium quiet and offline in a root container.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
# Bump when the template's contents change (user, settings baked into the database).
LS_TEMPLATE_KEY = "1.23.2-v1"
LS_START_TIMEOUT = float(os.environ.get("LS_START_TIMEOUT", "300"))

VIDEO_CONFIG = """<View>
  <Video name="video" value="$video" frameRate="25"/>
  <VideoRectangle name="box" toName="video"/>
  <Labels name="label" toName="video"><Label value="Object"/></Labels>
  <TimelineLabels name="review" toName="video">
    <Label value="Needs review"/><Label value="Auto-corrected"/>
  </TimelineLabels>
</View>"""


def free_port() -> int:
    # Racy in theory (the port is released before the server binds it) but fine on loopback.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as exc:
        return f"<no log at {path}: {exc}>"


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str,
              ok: Any = None, **kw: Any) -> None:
    """Poll ``url`` until it answers 200 (and ``ok(response)`` holds), or fail with the log tail."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering {url}.\n"
                               f"--- {log} (tail) ---\n{log_tail(log)}")
        try:
            r = requests.get(url, timeout=2, **kw)
            if r.status_code == 200 and (ok is None or ok(r)):
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}"
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s (last: {last}).\n"
                       f"--- {log} (tail) ---\n{log_tail(log)}")


def start_process(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    fh = open(log, "ab")
    try:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        fh.close()  # the child holds its own copy


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's own process group (gunicorn workers, Django's children), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


@dataclass
class LabelStudio:
    url: str
    token: str
    email: str
    password: str
    media_root: Path
    data_dir: Path
    log: Path
    proc: subprocess.Popen = field(repr=False)
    client: Any = field(repr=False, default=None)  # label_studio_sdk.LabelStudio

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        """A raw REST call with the legacy token, for what the SDK does not cover."""
        headers = {"Authorization": f"Token {self.token}", **kw.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=kw.pop("timeout", 30), **kw)


@dataclass
class Backend:
    url: str           # plain URL, e.g. http://127.0.0.1:PORT
    user: str
    password: str
    auth_url: str      # http://user:pass@127.0.0.1:PORT
    log: Path
    proc: subprocess.Popen = field(repr=False)

    @property
    def auth(self) -> tuple[str, str]:
        return (self.user, self.password)


def _launch_label_studio(data_dir: Path, media_root: Path, log: Path,
                         creds: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Start ``label-studio`` on a free port and wait until the token user can call the API."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "LABEL_STUDIO_USERNAME": creds["email"],
        "LABEL_STUDIO_PASSWORD": creds["password"],
        # Applied only when LS creates the user (fresh database), ignored on a copied template.
        "LABEL_STUDIO_USER_TOKEN": creds["token"],
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        # Without both, LS refuses a backend on 127.0.0.1 or cannot create its webhook.
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(media_root),
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        # Offline and private: no Sentry reports (LS ships a default DSN), analytics, PyPI check.
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
        "PATH": f"{LS_VENV / 'bin'}:{os.environ.get('PATH', '')}",
    }
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "DJANGO_SETTINGS_MODULE"):
        env.pop(key, None)
    cmd = [str(LS_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1", "--host", url,
           "--port", str(port), "--data-dir", str(data_dir)]
    proc = start_process(cmd, env, log, cwd=data_dir.parent)
    try:
        wait_http(url + "/health", proc, log, LS_START_TIMEOUT, "Label Studio")
        # /health answers before the token user is usable on a fresh database: wait for both.
        wait_http(url + "/api/current-user/whoami", proc, log, 60, "Label Studio API",
                  headers={"Authorization": f"Token {creds['token']}"})
    except Exception:
        stop_process(proc)
        raise
    return proc, url


def _template(log: Path) -> tuple[Path, dict[str, str]]:
    """A migrated data dir with the test user, built once and kept in .venv-ls.

    A fresh data dir costs 60-80 s of migrations on a 2-core machine; a copy of this one starts
    in under 10 s. It goes away with .venv-ls (``make clean``); ``LS_E2E_TEMPLATE=0`` skips it.
    """
    template = LS_VENV / f"e2e-template-{LS_TEMPLATE_KEY}"
    meta = template / "credentials.json"
    if meta.exists():
        return template / "ls-data", json.loads(meta.read_text())
    creds = {"email": "e2e@example.com", "password": "e2e-Passw0rd!", "token": secrets.token_hex(20)}
    work = LS_VENV / f"e2e-template.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "ls-data").mkdir(parents=True)
    (work / "media").mkdir()
    proc, _ = _launch_label_studio(work / "ls-data", work / "media", log, creds)
    stop_process(proc)  # stopped before any test touches it: the copy is pristine
    (work / "credentials.json").write_text(json.dumps(creds))
    try:
        work.rename(template)  # atomic; a concurrent builder may have won the race
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
    return template / "ls-data", json.loads(meta.read_text())


def start_label_studio(base: Path) -> LabelStudio:
    if not LS_BIN.exists():
        raise RuntimeError(f"{LS_BIN} is missing: run `make test` (or `make install-e2e`), which "
                           "installs label-studio==1.23.2 into .venv-ls")
    from label_studio_sdk import LabelStudio as SDK

    data_dir, media_root = base / "ls-data", base / "media"
    media_root.mkdir(parents=True, exist_ok=True)
    log = base / "label-studio.log"
    if os.environ.get("LS_E2E_TEMPLATE", "1") != "0":
        template, creds = _template(base / "label-studio-template.log")
        shutil.copytree(template, data_dir)
    else:
        data_dir.mkdir(parents=True)
        creds = {"email": "e2e@example.com", "password": "e2e-Passw0rd!",
                 "token": secrets.token_hex(20)}  # a legacy token: 40 characters
    proc, url = _launch_label_studio(data_dir, media_root, log, creds)
    ls = LabelStudio(url, creds["token"], creds["email"], creds["password"], media_root, data_dir, log, proc)
    ls.client = SDK(base_url=url, api_key=ls.token)
    return ls


def start_backend(ls: LabelStudio, base: Path, extra_env: dict[str, str] | None = None) -> Backend:
    port = free_port()
    user, password = "ls-e2e", "e2e-" + secrets.token_hex(6)
    log = base / f"backend-{port}.log"
    env = {
        **os.environ,
        "BASIC_AUTH_USER": user,
        "BASIC_AUTH_PASS": password,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.token,
        "LAZYXMEM_ENGINE": "embedded",
        "LOG_LEVEL": "DEBUG",
        "MODEL_DIR": str(base / "model-dir"),
        "CACHE_DIR": str(base / f"media-cache-{port}"),
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }
    cmd = [str(GUNICORN), "backend.wsgi:app", "--bind", f"127.0.0.1:{port}", "--workers", "1",
           "--threads", "4", "--timeout", "0", "--access-logfile", "-"]
    proc = start_process(cmd, env, log, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, log, 120, "ML backend (gunicorn)",
                  ok=lambda r: r.json().get("status") == "UP")
    except Exception:
        stop_process(proc)
        raise
    return Backend(url, user, password, f"http://{user}:{password}@127.0.0.1:{port}", log, proc)


@contextmanager
def serving_backend(ls: LabelStudio, base: Path, extra_env: dict[str, str] | None = None) -> Iterator[Backend]:
    """:func:`start_backend` for a fixture's ``with`` block: the backend (its whole process
    group) is stopped when the block ends, however it ends. ``extra_env`` picks the engines."""
    backend = start_backend(ls, base, extra_env)
    try:
        yield backend
    finally:
        stop_process(backend.proc)


# --- Label Studio set-up helpers (SDK 2.x) ---------------------------------------------------


def create_project(ls: LabelStudio, label_config: str = VIDEO_CONFIG, title: str = "e2e-project") -> Any:
    if not 3 <= len(title) <= 50:
        raise ValueError(f"project title {title!r}: Label Studio wants 3 to 50 characters")
    return ls.client.projects.create(title=title, label_config=label_config)


def add_local_storage(ls: LabelStudio, project_id: int, subdir: str) -> Path:
    """A Local Storage on ``media_root/subdir``: LS serves /data/local-files/ only under one."""
    folder = ls.media_root / subdir
    folder.mkdir(parents=True, exist_ok=True)
    ls.client.import_storage.local.create(project=project_id, path=str(folder), title=subdir,
                                          use_blob_urls=False)
    return folder


def local_file_url(ls: LabelStudio, path: Path) -> str:
    """The task URL Label Studio resolves for a file under its document root."""
    rel = Path(path).resolve().relative_to(ls.media_root.resolve())
    return f"/data/local-files/?d={rel.as_posix()}"


def import_tasks(ls: LabelStudio, project_id: int, data: list[dict[str, Any]]) -> list[int]:
    """Import task ``data`` dicts; returns their ids in order."""
    r = ls.client.projects.import_tasks(project_id, request=data, return_task_ids=True)
    ids = list(getattr(r, "task_ids", None) or [])
    if len(ids) != len(data):  # older answers lack task_ids: read the project's tasks back
        ids = sorted(t.id for t in ls.client.tasks.list(project=project_id))[-len(data):]
    return ids


def import_video_task(ls: LabelStudio, project_id: int, video: Path, field_name: str = "video") -> int:
    """Import one video task whose file already lies under a Local Storage of the project."""
    return import_tasks(ls, project_id, [{field_name: local_file_url(ls, video)}])[0]


def register_backend(ls: LabelStudio, project_id: int, backend: Backend, *,
                     password: str | None = None, interactive: bool = True,
                     credentials_in_url: bool = False, title: str = "lazyxmem") -> Any:
    """Connect the backend to a project; LS calls /health then /setup and raises ApiError (400) on failure.

    Default: LS's own Basic Auth fields (``auth_method="BASIC_AUTH"``). LS uses them for
    /health, /setup, /predict, /train, but NOT for the ``<url>/webhook`` it creates, which goes
    out without credentials. ``credentials_in_url=True`` registers ``http://user:pass@host:port``
    instead: requests then sends basic auth on every call, webhooks included (the password is
    visible in the backend's URL in LS's settings page).
    """
    pw = backend.password if password is None else password
    if credentials_in_url:
        url = backend.auth_url if password is None else backend.auth_url.replace(backend.password, pw)
        return ls.client.ml.create(project=project_id, url=url, title=title, is_interactive=interactive,
                                   auth_method="NONE")
    return ls.client.ml.create(project=project_id, url=backend.url, title=title, is_interactive=interactive,
                               auth_method="BASIC_AUTH", basic_auth_user=backend.user, basic_auth_pass=pw)


def authorize_webhook(ls: LabelStudio, project_id: int, backend: Backend, extra: dict[str, str] | None = None) -> dict:
    """Give the project's ``<backend>/webhook`` a basic-auth header (LS sends the webhook's
    ``headers`` as they are); needed in BASIC_AUTH mode, where LS sends webhooks unauthenticated.
    ``extra``: more headers (the webhook secret)."""
    import base64

    hooks = ls.api("GET", "/api/webhooks/", params={"project": project_id}).json()
    port = urlsplit(backend.url).port
    hook = next((h for h in hooks if urlsplit(h["url"]).port == port
                 and urlsplit(h["url"]).path.rstrip("/") == "/webhook"), None)
    if hook is None:
        raise RuntimeError(f"no webhook to {backend.url}/webhook in project {project_id}: {hooks}")
    token = base64.b64encode(f"{backend.user}:{backend.password}".encode()).decode()
    headers = {"Authorization": f"Basic {token}", **(extra or {})}
    r = ls.api("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": headers})
    if r.status_code != 200:
        raise RuntimeError(f"cannot set the webhook's headers: HTTP {r.status_code}: {r.text[:300]}")
    return r.json()


def retrieve_predictions(ls: LabelStudio, project_id: int, task_ids: list[int] | None = None) -> dict:
    """The Data Manager action "Retrieve predictions" (a batch /predict, context null).

    Raw REST rather than ``client.actions.create``, which drops LS's answer
    (``{"processed_items": n, "detail": ...}``). LS runs it synchronously without Redis.
    """
    selected = {"all": False, "included": list(task_ids)} if task_ids else {"all": True}
    r = ls.api("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project_id},
               json={"selectedItems": selected}, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"retrieve_tasks_predictions failed: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()


def interactive_click(ls: LabelStudio, ml_id: int, task_id: int, click: dict, timing: str | None = None,
                      timeout: float = 120) -> tuple[list[dict], float]:
    """A smart-tool region sent as Label Studio's editor sends it (``interactive-annotating``):
    the answer's result list (checked to be an answer, not an error) and the seconds it took."""
    s = time.perf_counter()
    r = ls.api("POST", f"/api/ml/{ml_id}/interactive-annotating", timeout=timeout,
               json={"task": task_id, "context": {"result": [click]}})
    seconds = time.perf_counter() - s
    if timing:
        print(f"\n[e2e timing] {timing}: {seconds:.1f}")
    assert r.status_code == 200 and "errors" not in r.json(), r.text[:300]
    return r.json()["data"]["result"], seconds


@dataclass
class VideoProject:
    project_id: int
    task_ids: list[int]
    videos: list[Path]
    ml_backend: Any = None       # the SDK's MlBackend, when a backend was registered
    retrieved: dict | None = None  # the "Retrieve predictions" answer, when asked for


def setup_video_project(ls: LabelStudio, name: str, videos: list[tuple[str, list[Any]]], *,
                        label_config: str = VIDEO_CONFIG, backend: Backend | None = None,
                        interactive: bool = True, credentials_in_url: bool = False,
                        retrieve: bool = False, fps: float = 25.0) -> VideoProject:
    """Project + Local Storage + one task per video (WebM, or H.264 for a ``.mp4`` name).

    ``videos``: ``(file name, BGR frames)`` pairs, written under ``media_root/name``. Optionally
    registers ``backend`` (basic auth, interactive) and runs "Retrieve predictions".
    """
    from synthetic import write_h264, write_webm

    project = create_project(ls, label_config, title=name)
    folder = add_local_storage(ls, project.id, name)
    paths = []
    for file_name, frames in videos:
        path = folder / file_name
        (write_h264 if path.suffix == ".mp4" else write_webm)(str(path), frames, fps)
        paths.append(path)
    task_ids = import_tasks(ls, project.id, [{"video": local_file_url(ls, p)} for p in paths])
    out = VideoProject(project.id, task_ids, paths)
    if backend is not None:
        out.ml_backend = register_backend(ls, project.id, backend, interactive=interactive,
                                          credentials_in_url=credentials_in_url)
        if retrieve:
            out.retrieved = retrieve_predictions(ls, project.id, task_ids)
    return out


def backend_log_since(backend: Backend, offset: int) -> str:
    """The backend's log (gunicorn access log included) from byte ``offset`` on."""
    with open(backend.log, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace")


def wait_for_log(backend: Backend, offset: int, needle: str, timeout: float = 15.0) -> str:
    """Wait until ``needle`` shows in the backend log after ``offset``; return that part of the log."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = backend_log_since(backend, offset)
        if needle in text:
            return text
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} not in the backend log within {timeout} s; it has:\n{text[-3000:]}")


def wait_revision(ls: LabelStudio, backend: Backend, task_id: int, revision: int, timeout: float = 120.0) -> dict:
    """Label Studio's prediction of ours once the backend has posted ``revision`` for the task.

    Every revision carries the backend's one model version (the Data Manager scores only those),
    so the revision is read from the backend's log line of that post; the prediction is the newest
    of ours in Label Studio (the older ones are retired once it is in)."""
    deadline = time.monotonic() + timeout
    needle = re.compile(rf"task {task_id}: posted prediction (\S+) revision {revision}\b")
    while not needle.search(backend_log_since(backend, 0)):
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id}: revision {revision} not posted within {timeout:.0f} s; log:\n"
                                 f"{backend_log_since(backend, 0)[-3000:]}")
        time.sleep(0.25)
    version = needle.search(backend_log_since(backend, 0)).group(1)
    r = ls.api("GET", "/api/predictions/", params={"task": task_id})
    assert r.status_code == 200, r.text[:300]
    ours = sorted((p for p in r.json() if p["model_version"] == version), key=lambda p: p["id"])
    assert ours, f"task {task_id}: Label Studio holds no {version} prediction"
    return ours[-1]


# --- Browser ---------------------------------------------------------------------------------


@contextmanager
def browser_page(ls: LabelStudio, viewport: tuple[int, int] = (1400, 900),
                 timeout_ms: int = 30_000) -> Iterator[Any]:
    """A Playwright page in Debian's chromium, logged in to ``ls``. Never `playwright install`."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            page.goto(ls.url + "/user/login/")
            page.fill('input[name="email"]', ls.email)
            page.fill('input[name="password"]', ls.password)
            page.click('button[type="submit"]')
            page.wait_for_url(lambda u: "/user/login" not in u)
            yield page
        finally:
            browser.close()


def open_task(page: Any, ls: LabelStudio, project_id: int, task_id: int) -> None:
    """Open a task in the labeling editor and wait until it is drawn."""
    page.goto(f"{ls.url}/projects/{project_id}/data?task={task_id}")
    page.wait_for_selector(".lsf-main-view")


# --- Mouse journeys in the editor (issue 16): what a first-time user does, with the mouse --------

def wait_video_editor(page: Any, label: str = "Object", timeout_ms: int = 30_000) -> None:
    """Wait until the video editor has decoded its video and drawn the label buttons.

    The editor mounts its canvas twice while the metadata arrives; a drag aimed before that
    lands on a canvas that is gone, so the canvas's place must hold still for a moment too.
    """
    page.wait_for_selector(".lsf-main-view .lsf-video-canvas canvas", timeout=timeout_ms)
    page.wait_for_function("() => [...document.querySelectorAll('video')].some("
                           "e => e.readyState >= 2 && e.duration > 0)", timeout=timeout_ms)
    page.wait_for_selector(f".lsf-label:has-text('{label}')", timeout=timeout_ms)
    # The frame counter reads "of 0" until the metadata has reached the editor's store; the
    # canvas is re-mounted then, so drawing waits for a real count.
    page.wait_for_function("() => /of\\s*[1-9]/.test((document.querySelector('.lsf-frames-control') || {})"
                           ".innerText || '')", timeout=timeout_ms)
    wait_still(page, ".lsf-main-view .lsf-video-canvas")


def wait_still(page: Any, selector: str, timeout: float = 15.0) -> list[float]:
    """Wait until ``selector``'s on-screen rectangle is the same in two reads 0.4 s apart."""
    js = ("s => { const e = document.querySelector(s); if (!e) return null;"
          " const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }")
    deadline, prev = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        cur = page.evaluate(js, selector)
        if cur is not None and cur == prev and cur[2] > 0:
            return cur
        prev = cur
        time.sleep(0.4)
    raise AssertionError(f"{selector} did not settle on the page within {timeout} s (last: {prev})")


def shown_media(page: Any, selector: str, size: tuple[int, int], fills: bool = False,
                timeout: float = 15.0) -> tuple[Any, tuple[float, float, float]]:
    """What the editor shows inside ``selector`` (a canvas holding the video or image) as a BGR
    screenshot of the media alone, and where it is on the page: (left, top, scale) with
    scale = shown pixels per media pixel.

    Found from the pixels (everything unlike the empty canvas's corner), not from the editor's
    internals, which differ between its video and image views; ``size`` = media (width, height).
    ``fills``: the element is the media's own size (the image view's Konva stage). Waits up to
    ``timeout`` s for the media to be drawn whole (a spinner or a blank canvas comes first).
    """
    import cv2
    import numpy as np

    deadline, seen = time.monotonic() + timeout, "nothing"
    while True:
        box = page.query_selector(selector).bounding_box()
        img = cv2.imdecode(np.frombuffer(page.screenshot(clip=box), np.uint8), cv2.IMREAD_COLOR)
        if fills:
            x, y, h, w = 0, 0, *img.shape[:2]
        else:
            diff = np.abs(img.astype(int) - img[2, 2].astype(int)).sum(axis=2) > 40
            x, y, w, h = cv2.boundingRect(diff.astype(np.uint8))
        scale = w / size[0]
        # the media's aspect must come out, else it is not drawn yet (or drawn cut)
        if w >= 10 and abs(h / size[1] - scale) <= 0.05 * scale:
            return img[y:y + h, x:x + w], (box["x"] + x, box["y"] + y, scale)
        seen = f"a {w}x{h} area"
        if time.monotonic() > deadline:
            raise AssertionError(f"{selector} shows {seen} for a {size[0]}x{size[1]} media after {timeout} s")
        time.sleep(0.3)


def mouse_drag(page: Any, start: tuple[float, float], end: tuple[float, float], steps: int = 12) -> None:
    """Press at ``start``, move in small steps (the editor reads each move), release at ``end``."""
    page.mouse.move(*start)
    page.mouse.down()
    for i in range(1, steps + 1):
        page.mouse.move(start[0] + (end[0] - start[0]) * i / steps, start[1] + (end[1] - start[1]) * i / steps)
    page.mouse.up()


def to_page(where: tuple[float, float, float], x: float, y: float) -> tuple[float, float]:
    """Media pixel (x, y) -> page coordinates, for ``where`` from :func:`shown_media`."""
    return where[0] + x * where[2], where[1] + y * where[2]


def seek_frame(page: Any, frame: int) -> float:
    """Go to Label Studio frame ``frame`` (1-based) the way a user types it into the frame
    counter under the video; returns the player's time there (seconds)."""
    page.click(".lsf-frames-control")
    page.fill(".lsf-frames-control input", str(frame))
    page.keyboard.press("Enter")
    page.wait_for_function("n => ((document.querySelector('.lsf-frames-control') || {}).innerText || '')"
                           ".trim().split(/\\s+/)[0] === String(n)", arg=frame, timeout=10_000)
    # The canvas redraws once the browser has decoded the frame at the new time.
    page.wait_for_function("() => [...document.querySelectorAll('video')].some(v => v.readyState >= 2 && !v.seeking)")
    time.sleep(0.5)
    return page.evaluate("() => Math.max(...[...document.querySelectorAll('video')].map(v => v.currentTime))")


def editor_results(page: Any) -> list[dict]:
    """The regions of the annotation open in the editor, as Label Studio will save them."""
    return page.evaluate("() => window.Htx.annotationStore.selected.serializeAnnotation()")


def save_annotation(page: Any, button: str, timeout_ms: int = 30_000) -> dict:
    """Click the editor's ``button`` (Submit, Update) and wait until Label Studio has saved the
    annotation (its POST or PATCH answered); returns the saved annotation as Label Studio answered."""
    def saving(r: Any) -> bool:
        return "/annotations" in r.url and r.request.method in ("POST", "PATCH")

    with page.expect_response(saving, timeout=timeout_ms) as answer:
        page.click(f"button:has-text('{button}')")
    r = answer.value
    if not r.ok:
        raise AssertionError(f"{button}: Label Studio answered {r.status} to {r.request.method} {r.url}: "
                             f"{r.text()[:300]}")
    return r.json()


def wait_backend_idle(backend: Backend, timeout: float = 180.0) -> dict:
    """Wait until the backend has no queued or running job and no webhook notice pending, in two
    reads of ``/health`` 0.5 s apart (a job may post and another start between two reads)."""
    deadline, calm, last = time.monotonic() + timeout, 0, {}
    while time.monotonic() < deadline:
        last = requests.get(backend.url + "/health", auth=backend.auth, timeout=5).json()
        jobs = last.get("jobs") or {}
        busy = (jobs.get("queued") or 0) + (jobs.get("running") or 0) + (last.get("notices_pending") or 0)
        calm = calm + 1 if busy == 0 else 0
        if calm >= 2:
            return last
        time.sleep(0.5)
    raise AssertionError(f"the backend is still busy after {timeout:.0f} s: {last}")
