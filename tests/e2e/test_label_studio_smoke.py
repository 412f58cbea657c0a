"""Smoke tests against a real Label Studio 1.23.2: project, video task, backend connection, web UI."""
from __future__ import annotations

import pytest
from label_studio_sdk.core.api_error import ApiError

from ls_harness import (VIDEO_CONFIG, authorize_webhook, backend_log_since, open_task, register_backend,
                        retrieve_predictions, serving_backend, setup_video_project, wait_for_log)
from synthetic import make_video

pytestmark = pytest.mark.e2e

N_FRAMES = 50  # 2 s at 25 fps


@pytest.fixture(scope="module")
def frames():
    return make_video(n_frames=N_FRAMES, size=(240, 320), seed=3).frames


def test_label_studio_is_up(label_studio):
    r = label_studio.api("GET", "/api/version")
    assert r.status_code == 200, r.text
    assert r.json().get("release") == "1.23.2"
    me = label_studio.client.users.whoami()
    assert me.email == label_studio.email


def test_video_task_via_local_storage(label_studio, frames):
    proj = setup_video_project(label_studio, "smoke-import", [("clip.webm", frames)])
    project = label_studio.client.projects.get(proj.project_id)
    assert "VideoRectangle" in project.label_config and "TimelineLabels" in project.label_config
    task = label_studio.client.tasks.get(proj.task_ids[0])
    url = task.data["video"]
    assert url == "/data/local-files/?d=smoke-import/clip.webm"
    # LS serves the file to token holders, with Range support (the browser's player needs it).
    r = label_studio.api("GET", url, headers={"Range": "bytes=0-99"})
    assert r.status_code == 206, (r.status_code, r.text[:200])
    assert r.content[:4] == b"\x1a\x45\xdf\xa3"  # EBML magic: a WebM/Matroska file
    assert label_studio.api("GET", url.replace("clip", "missing")).status_code == 404


def test_backend_connects_with_basic_auth(label_studio, backend_server, frames):
    offset = backend_server.log.stat().st_size
    proj = setup_video_project(label_studio, "smoke-backend", [("clip.webm", frames)],
                               backend=backend_server)
    ml = label_studio.client.ml.get(proj.ml_backend.id)
    assert ml.state == "CO", (ml.state, ml.error_message)  # CO = Connected
    assert ml.auth_method == "BASIC_AUTH" and ml.basic_auth_pass_is_set
    assert ml.is_interactive
    assert ml.model_version and ml.model_version.startswith("lazyxmem-")
    log = wait_for_log(backend_server, offset, '"POST /setup')
    # gunicorn's access log shows the basic-auth user and the status: LS authenticated.
    assert f'{backend_server.user} ' in log and '"POST /setup HTTP/1.1" 200' in log, log[-2000:]
    # LS created its webhook <url>/webhook for all events.
    hooks = label_studio.api("GET", "/api/webhooks/", params={"project": proj.project_id}).json()
    assert any(h["url"] == backend_server.url + "/webhook" for h in hooks), hooks


def test_wrong_password_is_refused(label_studio, backend_server):
    project = label_studio.client.projects.create(title="smoke-wrong-pass", label_config=VIDEO_CONFIG)
    offset = backend_server.log.stat().st_size
    with pytest.raises(ApiError) as err:
        register_backend(label_studio, project.id, backend_server, password="not-the-password")
    assert err.value.status_code == 400
    # /health is open, so LS gets as far as /setup, which answers 401.
    assert "doesn't look like a valid ML backend" in str(err.value.body), err.value.body
    assert '"POST /setup HTTP/1.1" 401' in backend_log_since(backend_server, offset)
    assert not list(label_studio.client.ml.list(project=project.id))


def test_credentials_in_url_also_authenticate_webhooks(label_studio, backend_server, frames):
    offset = backend_server.log.stat().st_size
    proj = setup_video_project(label_studio, "smoke-url-auth", [("a.webm", frames)],
                               backend=backend_server, credentials_in_url=True)
    assert label_studio.client.ml.get(proj.ml_backend.id).state == "CO"
    # Importing a task emits TASKS_CREATED to <url>/webhook; with the credentials in the URL it
    # arrives authenticated (anything but 401; the backend may not implement /webhook yet).
    label_studio.client.projects.import_tasks(proj.project_id, request=[{"video": "/data/local-files/?d=smoke-url-auth/a.webm"}])
    log = wait_for_log(backend_server, offset, '"POST /webhook')
    lines = [ln for ln in log.splitlines() if '"POST /webhook' in ln]
    assert lines and all('" 401 ' not in ln for ln in lines), lines


def test_webhook_with_auth_header(label_studio, backend_server, frames):
    # BASIC_AUTH mode: LS sends webhooks without credentials unless the webhook has headers.
    proj = setup_video_project(label_studio, "smoke-hook-header", [("a.webm", frames)],
                               backend=backend_server)
    hook = authorize_webhook(label_studio, proj.project_id, backend_server)
    assert hook["headers"]["Authorization"].startswith("Basic ")
    offset = backend_server.log.stat().st_size
    label_studio.client.projects.import_tasks(
        proj.project_id, request=[{"video": "/data/local-files/?d=smoke-hook-header/a.webm"}])
    log = wait_for_log(backend_server, offset, '"POST /webhook')
    lines = [ln for ln in log.splitlines() if '"POST /webhook' in ln]
    assert lines and all('" 401 ' not in ln for ln in lines), lines


def test_webhook_secret_lets_label_studio_in_and_keeps_forgers_out(label_studio, frames, e2e_dir):
    """WEBHOOK_SECRET: Label Studio's own webhook, given the secret as a header, still reaches the
    backend; the same webhook without it, and a forged one posted straight to the port, get 403."""
    import requests

    secret = "e2e-" + "x" * 24
    (e2e_dir / "secret").mkdir(exist_ok=True)
    with serving_backend(label_studio, e2e_dir / "secret", {"WEBHOOK_SECRET": secret}) as backend:
        proj = setup_video_project(label_studio, "smoke-hook-secret", [("a.webm", frames)], backend=backend)

        def import_one() -> list[str]:
            """Import a task (LS sends TASKS_CREATED); the backend's access-log lines for it."""
            offset = backend.log.stat().st_size
            label_studio.client.projects.import_tasks(
                proj.project_id, request=[{"video": "/data/local-files/?d=smoke-hook-secret/a.webm"}])
            log = wait_for_log(backend, offset, '"POST /webhook')
            return [ln for ln in log.splitlines() if '"POST /webhook' in ln]

        authorize_webhook(label_studio, proj.project_id, backend, {"X-Webhook-Secret": secret})
        lines = import_one()
        assert lines and all('" 202 ' in ln for ln in lines), lines  # accepted: read back from Label Studio
        forged = requests.post(f"{backend.url}/webhook", timeout=10,
                               json={"action": "ANNOTATION_UPDATED", "project": {"id": proj.project_id}})
        assert forged.status_code == 403 and "X-Webhook-Secret" in forged.json()["error"]
        authorize_webhook(label_studio, proj.project_id, backend)  # the secret header taken away
        lines = import_one()
        assert lines and all('" 403 ' in ln for ln in lines), lines


def test_retrieve_predictions_calls_backend(label_studio, backend_server, frames):
    proj = setup_video_project(label_studio, "smoke-retrieve", [("clip.webm", frames)],
                               backend=backend_server)
    offset = backend_server.log.stat().st_size
    answer = retrieve_predictions(label_studio, proj.project_id, proj.task_ids)
    assert answer.get("processed_items") == 1, answer
    # LS posted the batch to /predict with basic auth (what comes back is the backend's business).
    log = wait_for_log(backend_server, offset, '"POST /predict')
    assert all('" 401 ' not in ln for ln in log.splitlines() if '"POST /predict' in ln), log[-2000:]


@pytest.mark.parametrize("file_name", ["clip.webm", "clip.mp4"])
def test_task_opens_in_web_ui(label_studio, ls_page, frames, file_name, tmp_path):
    proj = setup_video_project(label_studio, f"smoke-ui-{file_name.split('.')[1]}", [(file_name, frames)])
    page = ls_page
    open_task(page, label_studio, proj.project_id, proj.task_ids[0])
    # The editor draws frames on a canvas; its <video> element is kept outside .lsf-main-view.
    page.wait_for_selector(".lsf-main-view .lsf-video-canvas canvas")
    # The editor may re-mount its <video>: read everything from the element that has decoded.
    decoded = page.wait_for_function(
        "() => { const v = [...document.querySelectorAll('video')].find("
        "e => e.readyState >= 2 && e.duration > 0 && e.videoWidth > 0);"
        " return v ? [v.duration, v.videoWidth, v.videoHeight] : null; }", timeout=20_000).json_value()
    # The file decodes in the browser: right duration, size and frame count.
    assert abs(decoded[0] - N_FRAMES / 25) < 0.2
    assert decoded[1:] == [320, 240]
    # The frame counter settles after the metadata arrives (it can read "of 0" for a moment).
    try:
        page.wait_for_function("n => (document.querySelector('.lsf-frames-control') || {}).innerText"
                               "?.replace(/\\s+/g, ' ').endsWith('of ' + n)", arg=N_FRAMES, timeout=10_000)
    except Exception:
        pytest.fail(f"frame counter reads {page.inner_text('.lsf-frames-control')!r}, not 'of {N_FRAMES}'")
    shot = tmp_path / f"task-{file_name}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
