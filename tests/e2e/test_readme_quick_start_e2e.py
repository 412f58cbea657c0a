"""The README's Quick start, followed as written: its own commands start Label Studio 1.23.2 and
the backend (only the port, the data directory and the token a person copies from the UI are
filled in), then its steps 3-5 (project from the shipped config, Connect Model with interactive
pre-annotations, an uploaded 24 fps H.264 video, a box submitted) reach a first prediction with
no other action. What a person does in the browser is done here through Label Studio's API (the
browser journey is tests/e2e/test_first_user_journey_e2e.py)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk import LabelStudio as SDK

from ls_harness import REPO, LS_VENV, _template, free_port, log_tail, start_process, stop_process, wait_http
from synthetic import make_video, write_h264

pytestmark = pytest.mark.e2e


def quick_start_commands() -> list[str]:
    """The shell commands of the README's Quick start section, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]
    return commands


def command_with(commands: list[str], needle: str) -> tuple[dict[str, str], list[str]]:
    """(environment assignments, argv) of the one README command containing ``needle``."""
    found = [c for c in commands if needle in c]
    assert len(found) == 1, f"the README's Quick start should have one command with {needle!r}: {found}"
    words = shlex.split(found[0].replace("<legacy token>", "<legacy-token>"))  # a placeholder a person fills in
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


def test_the_readme_quick_start_reaches_a_first_prediction(tmp_path: Path) -> None:
    commands = quick_start_commands()
    assert any(c.startswith("make run") for c in commands) and any(c.startswith("make test") for c in commands)
    assert any("pip install label-studio==1.23.2" in c for c in commands)  # the venv the harness made the same way

    # Step 1: Label Studio, as the README starts it (its venv: .venv-ls, made by `make test`).
    ls_env, ls_argv = command_with(commands, "label-studio start")
    assert ls_argv[0] == ".venv-ls/bin/label-studio", ls_argv
    ls_port = free_port()
    argv = [str(LS_VENV / "bin" / "label-studio")] + [str(ls_port) if a == "8080" else a for a in ls_argv[1:]]
    data = tmp_path / "ls-data"
    template, creds = _template(tmp_path / "template.log")  # a person's sign-up: a migrated database with a user
    shutil.copytree(template, data)
    env = {**os.environ, **ls_env, "LABEL_STUDIO_BASE_DATA_DIR": str(data), "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
           "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false"}
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "DJANGO_SETTINGS_MODULE"):
        env.pop(key, None)
    ls_url = f"http://127.0.0.1:{ls_port}"
    ls_log = tmp_path / "label-studio.log"
    ls_proc = start_process(argv + ["--no-browser", "--data-dir", str(data), "--host", ls_url], env, ls_log, tmp_path)
    backend_proc = None
    try:
        wait_http(ls_url + "/health", ls_proc, ls_log, 300, "Label Studio (README command)")
        token = creds["token"]  # step 2: the legacy token, copied from Account & Settings
        wait_http(ls_url + "/api/current-user/whoami", ls_proc, ls_log, 60, "Label Studio API",
                  headers={"Authorization": f"Token {token}"})

        # Step 2: the backend, with the README's own `make run` line.
        be_env, be_argv = command_with(commands, "LABEL_STUDIO_API_KEY=<legacy token> make run")
        assert be_argv == ["make", "run"], be_argv
        be_port = free_port()
        values = {"LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": token}
        assert set(be_env) == set(values), be_env
        assert be_env == {"LABEL_STUDIO_URL": "http://127.0.0.1:8080", "LABEL_STUDIO_API_KEY": "<legacy-token>"}, be_env
        backend_log = tmp_path / "backend.log"
        backend_env = {**os.environ, **values, "PORT": str(be_port), "CACHE_DIR": str(tmp_path / "cache"),
                       "OMP_NUM_THREADS": "1"}
        for key in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "HOST", "ALLOW_OPEN"):
            backend_env.pop(key, None)
        backend_proc = start_process(be_argv, backend_env, backend_log, REPO)
        backend_url = f"http://127.0.0.1:{be_port}"
        wait_http(backend_url + "/health", backend_proc, backend_log, 180, "the backend (make run)")

        # Steps 3-4: the project from the shipped config; Connect Model, interactive on.
        sdk = SDK(base_url=ls_url, api_key=token)
        project = sdk.projects.create(title="readme-quick-start", label_config=(REPO / "backend/configs/video.xml").read_text())
        sdk.ml.create(project=project.id, url=backend_url, title="lazyxmem", is_interactive=True, auth_method="NONE")

        # Step 5: an uploaded video (the legacy token downloads it), a box drawn and submitted.
        scene = make_video(n_frames=40, size=(240, 320), radius=30, seed=21)
        clip = write_h264(str(tmp_path / "clip.mp4"), scene.frames, 25.0)
        with open(clip, "rb") as fh:
            r = requests.post(f"{ls_url}/api/projects/{project.id}/import", headers={"Authorization": f"Token {token}"},
                              files={"clip.mp4": ("clip.mp4", fh, "video/mp4")}, timeout=60)
        assert r.status_code == 201, r.text[:300]
        task = next(iter(sdk.tasks.list(project=project.id)))
        assert str(task.data["video"]).startswith("/data/upload/"), task.data
        ys, xs = (scene.masks[0] == 1).nonzero()
        box = {"x": 100 * xs.min() / 320, "y": 100 * ys.min() / 240, "width": 100 * (np.ptp(xs) + 1) / 320,
               "height": 100 * (np.ptp(ys) + 1) / 240}
        t0 = time.monotonic()
        sdk.annotations.create(id=task.id, result=[{
            "id": "start", "from_name": "box", "to_name": "video", "type": "videorectangle",
            "value": {"sequence": [{"frame": 1, **box, "rotation": 0, "enabled": True, "time": 0.0}],
                      "labels": ["Object"], "framesCount": 40, "duration": 1.6}}])
        track = None
        while time.monotonic() - t0 < 120 and track is None:
            for p in sdk.predictions.list(task=task.id):
                track = next((r for r in p.result or [] if r["type"] == "videorectangle"), None) or track
            time.sleep(0.5)
        print(f"\n[e2e timing] readme_first_prediction_after_submit_s: {time.monotonic() - t0:.1f}")
        assert track is not None, log_tail(backend_log)
        frames = [k["frame"] for k in track["value"]["sequence"]]
        assert frames[0] == 1 and max(frames) >= 35, frames
    finally:
        if backend_proc is not None:
            stop_process(backend_proc)
        stop_process(ls_proc)
