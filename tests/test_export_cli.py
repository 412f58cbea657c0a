"""Masks where the user works: ``lazyxmem ls export`` writes a project's masks from the stored
views (against the fake Label Studio), and a restarted backend (a new app on the same CACHE_DIR,
no Redis) still serves ``/tasks/<id>/masks`` and continues the correction rounds (revisions)."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from backend.app import create_app
from backend.cli import main
from fake_ls import TOKEN, holds
from test_backend import (AUTH, IMAGES_CFG, VIDEO_CFG, H, N, W, client, connect, fake_ls, images_task,  # noqa: F401
                          notify, posted_revision, predict, video_task, wait_jobs)

PROJECT = 5


@pytest.fixture
def cli_env(client, fake_ls, monkeypatch):
    """The command's environment: the server's Label Studio, key and CACHE_DIR, no Redis."""
    url, _ = fake_ls
    monkeypatch.setenv("LABEL_STUDIO_URL", url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    monkeypatch.setenv("CACHE_DIR", client.model.settings.cache_dir)
    monkeypatch.setenv("LAZYXMEM_ENGINE", "embedded")
    monkeypatch.setenv("LAZYXMEM_REFINER", "embedded")
    for name in ("REDIS_URL", "XMEM_CHECKPOINT", "SAM2_CHECKPOINT", "SAM_CHECKPOINT", "SAM_HQ_CHECKPOINT"):
        monkeypatch.delenv(name, raising=False)


def served_pngs(client, task_id: int) -> dict[str, np.ndarray]:
    r = client.get(f"/tasks/{task_id}/masks?format=png", headers=AUTH)
    assert r.status_code == 200, r.json
    z = zipfile.ZipFile(io.BytesIO(r.data))
    return {name: np.array(Image.open(io.BytesIO(z.read(name)))) for name in z.namelist()}


def click_on(video, item: int) -> dict:
    ys, xs = np.nonzero(video.clean.masks[item] == 1)
    return {"from_name": "clicks", "to_name": "frames", "type": "keypointlabels", "item_index": item,
            "is_positive": True, "original_width": W, "original_height": H,
            "value": {"x": 100 * xs.mean() / W, "y": 100 * ys.mean() / H, "width": 0.5, "keypointlabels": ["Object"]}}


def test_export_writes_each_tasks_masks_and_reports_the_tasks_without(client, fake_ls, cli_env, tmp_path, capsys):
    _, video = fake_ls
    predicted = [video_task(video, task_id=1), video_task(video, task_id=4)]
    for task in predicted:
        assert predict(client, [task], VIDEO_CFG).status_code == 200
        holds(task, PROJECT, label_config=VIDEO_CFG)
    holds(video_task(video, task_id=6), PROJECT)  # has regions, never predicted
    holds({"id": 7, "data": {"video": "/data/upload/1/v.avi"}, "annotations": []}, PROJECT)  # nothing drawn
    holds(video_task(video, task_id=8), PROJECT + 1)  # another project's task
    out = tmp_path / "export"

    assert main(["ls", "export", "--project", str(PROJECT), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"project {PROJECT}: 2 task(s) exported to {out}, 2 without masks" in captured.out
    assert "task 6: no masks yet: run a prediction first" in captured.err
    assert "task 7: no masks yet: run a prediction first" in captured.err
    assert "export" in captured.err and "4/4" in captured.err  # the progress bar, one step per task
    assert sorted(p.name for p in out.iterdir()) == ["task-1", "task-4"]
    for task_id in (1, 4):
        served = served_pngs(client, task_id)
        folder = out / f"task-{task_id}"
        assert sorted(p.name for p in folder.glob("*.png")) == sorted(served) and len(served) == N
        assert "00001.png" in served
        for name, mask in served.items():
            img = Image.open(folder / name)
            assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]  # DAVIS colours: object 1 dark red
            assert (np.array(img) == mask).all(), (task_id, name)
        assert any(m.any() for m in served.values())
        coco = json.loads((folder / "masks.json").read_text())
        assert coco == client.get(f"/tasks/{task_id}/masks?format=coco", headers=AUTH).json
        assert coco["categories"] == [{"id": 1, "name": "Object"}] and len(coco["images"]) == N

    # --recompute propagates task 6 from its annotation here; task 7 has nothing to start from.
    assert main(["ls", "export", "--project", str(PROJECT), "--out", str(out), "--format", "coco", "--recompute"]) == 1
    captured = capsys.readouterr()
    assert "3 task(s) exported" in captured.out and "task 7: cannot recompute: task 7 has no region" in captured.err
    assert (out / "task-6" / "masks.json").exists() and not list((out / "task-6").glob("*.png"))
    # Stored like a job's masks: the server (which never saw task 6) serves them too.
    assert client.model.tasks.held(6) is None
    assert client.get("/tasks/6/masks?format=coco", headers=AUTH).json == json.loads(
        (out / "task-6" / "masks.json").read_text())


def test_export_refuses_an_out_path_that_is_a_file(cli_env, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["ls", "export", "--project", str(PROJECT), "--out", str(target)]) == 2
    assert "is a file: give a folder" in capsys.readouterr().err


def test_a_restarted_backend_serves_the_masks_and_continues_the_correction_round(client, fake_ls):
    _, video = fake_ls
    task = images_task(video)
    assert predict(client, [task], IMAGES_CFG).status_code == 200
    assert predict(client, [task], IMAGES_CFG, context={"result": [click_on(video, 6)]}).status_code == 200
    assert all(j["status"] == "finished" for j in wait_jobs(client))
    assert posted_revision(client, task) == 1
    before_png = served_pngs(client, 2)
    before_coco = client.get("/tasks/2/masks", headers=AUTH).json

    restarted = create_app(client.model.settings).test_client()  # same CACHE_DIR, nothing held
    restarted.model = restarted.application.config["model"]
    assert restarted.model.tasks.held(2) is None
    assert restarted.get("/tasks/2/masks", headers=AUTH).json == before_coco
    after_png = served_pngs(restarted, 2)
    assert after_png.keys() == before_png.keys() and all((after_png[k] == before_png[k]).all() for k in before_png)
    assert restarted.model.tasks.held(2) is None, "answered from the store, nothing rebuilt"
    missing = restarted.get("/tasks/999/masks", headers=AUTH)
    assert missing.status_code == 404 and "run a prediction first" in missing.json["error"]

    # The reopened task gets the corrected prediction, then the next correction is round 2.
    r = predict(restarted, [task], IMAGES_CFG)
    assert r.status_code == 200 and r.json["results"][0]["revision"] == 1, r.json
    assert predict(restarted, [task], IMAGES_CFG, context={"result": [click_on(video, 10)]}).status_code == 200
    assert all(j["status"] == "finished" for j in wait_jobs(restarted))
    assert posted_revision(restarted, task) == 2
    # Round 2 keeps round 1's correction (item 6), made before the restart.
    assert (served_pngs(restarted, 2)["00007.png"] == before_png["00007.png"]).all()

    # Again after a restart, through an annotation webhook (rebuilt in a job): round 3.
    again = create_app(client.model.settings).test_client()
    again.model = again.application.config["model"]
    fixed = np.zeros((H, W), bool)
    fixed[5:25, 5:30] = True
    edited = {"id": "lazyxmem-1-8", "from_name": "mask", "to_name": "frames", "type": "brushlabels", "item_index": 8,
              "original_width": W, "original_height": H,
              "value": {"format": "rle", "rle": mask2rle(fixed.astype(np.uint8) * 255), "brushlabels": ["Object"]}}
    connect(again, 3, IMAGES_CFG)
    holds({**task, "annotations": task["annotations"] + [{"id": 21, "result": [edited]}]}, 3)
    assert notify(again, "ANNOTATION_UPDATED", task=2, annotation=21).status_code == 202
    wait_jobs(again)
    wait_jobs(again)
    assert posted_revision(again, task) == 3
    assert (np.array(Image.open(io.BytesIO(zipfile.ZipFile(io.BytesIO(
        again.get("/tasks/2/masks?format=png", headers=AUTH).data)).read("00009.png")))) == 1).tolist() == fixed.tolist()
