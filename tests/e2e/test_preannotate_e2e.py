"""Pre-annotation against a real Label Studio 1.23.2: on import (the TASKS_CREATED webhook) and
from the command line (`lazyxmem ls preannotate --project N`)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ls_harness import (Backend, LabelStudio, add_local_storage, backend_log_since, create_project, import_tasks,
                        local_file_url, register_backend, wait_for_log)
from synthetic import make_video, write_webm

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
VIDEO_XML = (REPO / "backend" / "configs" / "video.xml").read_text()
N = 24


def clip_task(ls: LabelStudio, folder: Path, name: str, seed: int, with_region: bool = True) -> dict:
    video = make_video(n_frames=N, size=(120, 160), radius=20, seed=seed)
    path = folder / name
    write_webm(str(path), [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in video.frames], 25)
    task: dict = {"data": {"video": local_file_url(ls, path)}}
    if with_region:
        ys, xs = np.nonzero(video.masks[0] == 1)
        kf = {"frame": 1, "x": 100 * xs.min() / 160, "y": 100 * ys.min() / 120, "width": 100 * (xs.max() + 1 - xs.min()) / 160,
              "height": 100 * (ys.max() + 1 - ys.min()) / 120, "rotation": 0, "enabled": True, "time": 0}
        task["annotations"] = [{"result": [{"id": "start", "from_name": "box", "to_name": "video", "type": "videorectangle",
                                            "origin": "manual", "value": {"labels": ["Object"], "sequence": [kf]}}]}]
    return task


def predictions(ls: LabelStudio, task_id: int) -> list[dict]:
    r = ls.api("GET", "/api/predictions/", params={"task": task_id})
    assert r.status_code == 200, r.text[:300]
    return r.json()


def wait_for_track(ls: LabelStudio, task_id: int, timeout: float, log: str = "") -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in predictions(ls, task_id):
            tracks = [r for r in p["result"] if r["type"] == "videorectangle"]
            if tracks:
                return tracks[0]
        time.sleep(0.25)
    raise AssertionError(f"task {task_id}: no prediction with a track within {timeout:.0f} s\n{log}")


def wait_log(backend: Backend, offset: int, prefix: str, endings: tuple[str, ...], timeout: float = 60) -> str:
    """The backend log once the TASKS_CREATED handler is done and its job for a task has decided
    (posted, or found LS's own prediction)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = backend_log_since(backend, offset)
        if any(prefix in line and "job lx-" in line and any(e in line for e in endings)
                                            for line in log.splitlines()):
            return log
        time.sleep(0.25)
    raise AssertionError(f"no job outcome in the backend log within {timeout} s\n{backend_log_since(backend, offset)[-3000:]}")


def test_tasks_imported_with_regions_into_a_connected_project_are_preannotated(
        label_studio: LabelStudio, backend_server: Backend) -> None:
    ls = label_studio
    project = create_project(ls, VIDEO_XML, title="e2e-import")
    folder = add_local_storage(ls, project.id, "e2e-import")
    register_backend(ls, project.id, backend_server)
    offset = backend_server.log.stat().st_size
    ids = import_tasks(ls, project.id, [clip_task(ls, folder, "a.webm", 1), clip_task(ls, folder, "b.webm", 2, False)])
    # Nobody asks for predictions: the import's webhook is enough. (LS 1.23.2 also calls /predict
    # on import when a backend is connected; the job then finds that prediction and adds none.)
    track = wait_for_track(ls, ids[0], 90, backend_log_since(backend_server, offset)[-3000:])
    frames = [k["frame"] for k in track["value"]["sequence"]]
    assert frames[0] == 1 and max(frames) >= N - 1, frames
    log = wait_log(backend_server, offset, f"task {ids[0]}: ", ("posted prediction", "posts nothing", "not posted again"))
    assert f"task {ids[0]}: imported; pre-annotation queued" in log
    assert f"task {ids[1]}: imported; no region to pre-annotate from" in wait_for_log(backend_server, offset,
                                                                                     f"task {ids[1]}: imported")
    with_result = [p for p in predictions(ls, ids[0]) if p["result"]]
    assert len(with_result) == 1, "one prediction per task and model version"
    assert not any(p["result"] for p in predictions(ls, ids[1])), "a task without regions gets no regions"


def test_cli_preannotates_a_project(label_studio: LabelStudio, tmp_path: Path) -> None:
    ls = label_studio
    project = create_project(ls, VIDEO_XML, title="e2e-cli")
    folder = add_local_storage(ls, project.id, "e2e-cli")
    ids = import_tasks(ls, project.id, [clip_task(ls, folder, "c.webm", 3), clip_task(ls, folder, "d.webm", 4),
                                        clip_task(ls, folder, "e.webm", 5, False)])
    env = {**os.environ, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token, "LAZYXMEM_ENGINE": "embedded",
           "CACHE_DIR": str(tmp_path / "cache"), "REDIS_URL": ""}
    r = subprocess.run([str(REPO / ".venv" / "bin" / "lazyxmem"), "ls", "preannotate", "--project", str(project.id)],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 task(s) queued, 1 without regions skipped" in r.stdout, r.stdout
    assert "pre-annotate" in r.stderr  # the progress bar
    for task_id in ids[:2]:
        preds = predictions(ls, task_id)
        assert len(preds) == 1 and preds[0]["model_version"].startswith("lazyxmem-"), preds
    assert predictions(ls, ids[2]) == []
    # Bad input: a project that does not exist is a clear error, not a traceback.
    r = subprocess.run([str(REPO / ".venv" / "bin" / "lazyxmem"), "ls", "preannotate", "--project", "9999"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "9999" in r.stderr, r.stderr
