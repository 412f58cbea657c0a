"""Masks where the user works, against a real Label Studio 1.23.2 and the backend under gunicorn
(no Redis): tasks pre-annotated on import are exported by `lazyxmem ls export` from the server's
CACHE_DIR, the files equal what `/tasks/<id>/masks` serves, and after the backend restarts the
endpoint still serves them."""
from __future__ import annotations

import io
import json
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from ls_harness import (LabelStudio, add_local_storage, create_project, import_tasks, register_backend,
                        serving_backend)
from test_preannotate_e2e import N, VIDEO_XML, clip_task, wait_for_track

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def served(backend, task_id: int) -> tuple[dict[str, np.ndarray], dict]:
    r = requests.get(f"{backend.url}/tasks/{task_id}/masks", params={"format": "png"}, auth=backend.auth, timeout=30)
    assert r.status_code == 200, r.text[:300]
    z = zipfile.ZipFile(io.BytesIO(r.content))
    pngs = {name: np.array(Image.open(io.BytesIO(z.read(name)))) for name in z.namelist()}
    coco = requests.get(f"{backend.url}/tasks/{task_id}/masks", auth=backend.auth, timeout=30)
    assert coco.status_code == 200, coco.text[:300]
    return pngs, coco.json()


def test_export_reads_the_servers_masks_and_a_restarted_server_still_serves_them(
        label_studio: LabelStudio, tmp_path: Path) -> None:
    ls = label_studio
    cache = tmp_path / "cache"
    env = {"CACHE_DIR": str(cache), "REDIS_URL": ""}
    project = create_project(ls, VIDEO_XML, title="e2e-export")
    folder = add_local_storage(ls, project.id, "e2e-export")
    with serving_backend(ls, tmp_path, env) as backend:
        register_backend(ls, project.id, backend)
        ids = import_tasks(ls, project.id, [clip_task(ls, folder, "f.webm", 6), clip_task(ls, folder, "g.webm", 7),
                                            clip_task(ls, folder, "h.webm", 8, False)])
        for task_id in ids[:2]:  # pre-annotated on import (TASKS_CREATED); the job stores, then posts
            wait_for_track(ls, task_id, 120)
        before = {task_id: served(backend, task_id) for task_id in ids[:2]}

        out = tmp_path / "export"
        r = subprocess.run([str(REPO / ".venv" / "bin" / "lazyxmem"), "ls", "export", "--project", str(project.id),
                            "--out", str(out)],
                           env={**os.environ, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token,
                                "LAZYXMEM_ENGINE": "embedded", **env},
                           capture_output=True, text=True, timeout=300, cwd=REPO)
        assert r.returncode == 1, r.stdout + r.stderr  # the task without regions has no masks
        assert f"2 task(s) exported to {out}, 1 without masks" in r.stdout, r.stdout
        assert f"task {ids[2]}: no masks yet: run a prediction first" in r.stderr, r.stderr
        assert "3/3" in r.stderr  # the progress bar
        for task_id in ids[:2]:
            pngs, coco = before[task_id]
            files = sorted(p.name for p in (out / f"task-{task_id}").glob("*.png"))
            assert files == sorted(pngs) and len(files) == N and files[0] == "00001.png"
            assert all((np.array(Image.open(out / f"task-{task_id}" / name)) == m).all() for name, m in pngs.items())
            assert sum(int((m == 1).any()) for m in pngs.values()) == N, "the object is on every frame"
            assert json.loads((out / f"task-{task_id}" / "masks.json").read_text()) == coco
        assert not (out / f"task-{ids[2]}").exists()

    with serving_backend(ls, tmp_path, env) as restarted:  # a new process on the same CACHE_DIR
        for task_id in ids[:2]:
            pngs, coco = served(restarted, task_id)
            assert coco == before[task_id][1]
            assert all((pngs[name] == m).all() for name, m in before[task_id][0].items())
        r = requests.get(f"{restarted.url}/tasks/{ids[2]}/masks", auth=restarted.auth, timeout=30)
        assert r.status_code == 404 and "run a prediction first" in r.json()["error"]
