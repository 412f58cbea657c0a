"""The ML backend through its HTTP API (Flask test client), with a local stand-in for Label Studio
that serves task media (token required) and records the predictions posted back."""
from __future__ import annotations

import base64
import io
import threading
import time
import zipfile
from http.server import ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import mask2rle

from backend.app import create_app
from backend.convert import decode_brush, frame_ranges, keyframes
from backend.settings import BackendSettings
from lazyxmem_core.engines import EngineSettings
from fake_ls import TOKEN, FakeLabelStudio, forget_all, holds
from synthetic import make_video

VIDEO_CFG = Path("backend/configs/video.xml").read_text()
IMAGES_CFG = Path("backend/configs/image_sequence.xml").read_text()
AUTH = {"Authorization": "Basic " + base64.b64encode(b"ann:pw").decode()}
H, W, N = 72, 96, 14


@pytest.fixture(scope="module")
def fake_ls():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLabelStudio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    video = make_video(n_frames=N, size=(H, W), radius=12, distractor=True, appearance_change_at=9, seed=5)
    buf = Path(__import__("tempfile").mkdtemp()) / "v.avi"
    w = cv2.VideoWriter(str(buf), cv2.VideoWriter_fourcc(*"MJPG"), 25, (W, H))  # the configs' frameRate: frames one for one
    for f in video.frames:
        w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    w.release()
    FakeLabelStudio.files["/data/upload/1/v.avi"] = buf.read_bytes()
    FakeLabelStudio.files["/data/upload/1/broken.mp4"] = b"\x00garbage" * 50
    # A look-alike distractor crosses the object: the Lazy trigger must fire.
    crossing = make_video(n_frames=30, size=(240, 428), radius=40, distractor=True)
    path = buf.with_name("cross.avi")
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (428, 240))
    for f in crossing.frames:
        w.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    w.release()
    FakeLabelStudio.files["/data/upload/1/cross.avi"] = path.read_bytes()
    video.crossing = crossing
    # The image sequence is the same scene without the distractor: its masks are checked for quality.
    clean = make_video(n_frames=N, size=(H, W), radius=12, seed=5)
    for i, f in enumerate(clean.frames):
        ok, png = cv2.imencode(".png", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        FakeLabelStudio.files[f"/data/upload/1/f{i}.png"] = png.tobytes()
    video.clean = clean
    yield f"http://127.0.0.1:{server.server_address[1]}", video
    server.shutdown()


@pytest.fixture
def client(fake_ls, tmp_path, monkeypatch):
    url, _ = fake_ls
    settings = BackendSettings(ls_url=url, api_key=TOKEN, cache_dir=str(tmp_path / "cache"),
                               basic_auth_user="ann", basic_auth_pass="pw",
                               engine=EngineSettings(engine="embedded", refiner="embedded"),
                               lazy=None)
    FakeLabelStudio.posted.clear()
    forget_all()
    app = create_app(settings)
    c = app.test_client()
    c.model = app.config["model"]
    return c


def video_task(video, task_id=1, url="/data/upload/1/v.avi", box=None):
    ys, xs = np.nonzero(video.masks[0] == 1)
    x, y = 100 * xs.min() / W, 100 * ys.min() / H
    bw, bh = 100 * (xs.max() + 1 - xs.min()) / W, 100 * (ys.max() + 1 - ys.min()) / H
    kf = box or {"frame": 1, "x": x, "y": y, "width": bw, "height": bh, "rotation": 0, "enabled": True}
    region = {"id": "r1", "from_name": "box", "to_name": "video", "type": "videorectangle",
              "value": {"sequence": [kf], "labels": ["Object"]}}
    return {"id": task_id, "data": {"video": url}, "annotations": [{"id": 10 * task_id, "result": [region]}]}


def images_task(video, task_id=2):
    video = video.clean
    region = {"id": "m1", "from_name": "mask", "to_name": "frames", "type": "brushlabels", "item_index": 0,
              "original_width": W, "original_height": H,
              "value": {"format": "rle", "rle": mask2rle((video.masks[0] == 1).astype(np.uint8) * 255),
                        "brushlabels": ["Object"]}}
    return {"id": task_id, "data": {"frames": [f"/data/upload/1/f{i}.png" for i in range(N)]},
            "annotations": [{"id": 20, "result": [region]}]}


def predict(client, tasks, config, context=None):
    return client.post("/predict", headers=AUTH, json={"tasks": tasks, "label_config": config, "project": "3.1",
                                                       "params": {"context": context}})


def connect(client, project=3, config=None):
    """What Label Studio does when the backend is added to a project: /setup (and the project exists there)."""
    if config is not None:
        FakeLabelStudio.records["projects"][project] = {"id": project, "title": "p", "label_config": config}
    r = client.post("/setup", headers=AUTH, json={"project": f"{project}.1700000000", "schema": config or ""})
    assert r.status_code == 200, r.json


def notify(client, action, project=3, **ids):
    """A webhook as Label Studio sends it, of which the backend reads the ids."""
    body = {"action": action, "project": {"id": project}}
    if "tasks" in ids:
        body["tasks"] = [{"id": t} for t in ids["tasks"]]
    for key in ("task", "annotation"):
        if key in ids:
            body[key] = {"id": ids[key]}
    return client.post("/webhook", json=body)


def wait_jobs(client, timeout=60):
    client.model.notifier.wait_idle(timeout)
    end = time.time() + timeout
    while time.time() < end:
        if all(j["status"] in ("finished", "failed") for j in client.model.jobs.jobs.values()):
            return list(client.model.jobs.jobs.values())
        time.sleep(0.05)
    raise AssertionError("jobs did not finish")


def test_video_prediction_tracks_every_frame_with_review_spans_and_score(client, fake_ls):
    _, video = fake_ls
    r = predict(client, [video_task(video)], VIDEO_CFG)
    assert r.status_code == 200, r.json
    pred = r.json["results"][0]
    tracks = [x for x in pred["result"] if x["type"] == "videorectangle"]
    assert len(tracks) == 1 and tracks[0]["value"]["labels"] == ["Object"]
    seq = tracks[0]["value"]["sequence"]
    assert seq[0]["frame"] == 1 and all(k["rotation"] == 0 for k in seq)
    assert seq[-1]["frame"] == N or seq[-1]["enabled"] is False
    assert 0.0 <= pred["score"] <= 1.0 and pred["model_version"].startswith("lazyxmem-")
    state = client.model.tasks.held(1)
    boxes = [mk for mk in state.masks()]
    assert all((m == 1).any() for m in boxes)
    spans = [x for x in pred["result"] if x["type"] == "timelinelabels"]
    review = state.session.review_frames
    if review:
        assert any(x["value"]["timelinelabels"] == ["Needs review"] for x in spans)
    assert pred["review_frames"] == [t + 1 for t in review]


def test_image_sequence_prediction_gives_brush_masks_per_item(client, fake_ls):
    _, video = fake_ls
    r = predict(client, [images_task(video)], IMAGES_CFG)
    assert r.status_code == 200, r.json
    result = r.json["results"][0]["result"]
    brushes = {x["item_index"]: x for x in result if x["type"] == "brushlabels"}
    assert sorted(brushes) == list(range(N))
    last = decode_brush(brushes[N - 1]["value"], W, H, "test")
    gt = video.clean.masks[N - 1] == 1
    assert (last & gt).sum() / (last | gt).sum() > 0.5
    for x in result:
        if x["type"] == "choices":
            assert "item_index" in x and x["value"]["choices"]


def test_interactive_click_answers_now_and_posts_a_revised_prediction(client, fake_ls):
    _, video = fake_ls
    task = images_task(video)
    assert predict(client, [task], IMAGES_CFG).status_code == 200
    before = [m.copy() for m in client.model.tasks.held(2).masks()]
    ys, xs = np.nonzero(video.clean.masks[6] == 1)
    click = {"from_name": "clicks", "to_name": "frames", "type": "keypointlabels", "item_index": 6,
             "is_positive": True, "original_width": W, "original_height": H,
             "value": {"x": 100 * xs.mean() / W, "y": 100 * ys.mean() / H, "width": 0.5, "keypointlabels": ["Object"]}}
    t0 = time.perf_counter()
    r = predict(client, [task], IMAGES_CFG, context={"result": [click]})
    latency = time.perf_counter() - t0
    assert r.status_code == 200, r.json
    regions = r.json["results"][0]["result"]
    assert regions and all(x["item_index"] == 6 and x["type"] == "brushlabels" for x in regions)
    assert latency < 5.0
    jobs = wait_jobs(client)
    assert all(j["status"] == "finished" for j in jobs), jobs
    posted = [p["json"] for p in FakeLabelStudio.posted if p["path"].startswith("/api/predictions")]
    assert posted and posted[-1]["task"] == 2 and posted_revision(client, task) == 1
    held = client.model.tasks.held(2)
    assert held.session.records[6].objects[1].answered
    # Earlier frames change only where the correction's backward pass revised them.
    assert (held.masks()[0] == before[0]).all()
    assert all((a == b).all() or held.session.records[t].objects[1].revised
               for t, (a, b) in enumerate(zip(before[:6], held.masks()[:6])))


def test_annotation_update_reprapagates_from_the_changed_frame_and_never_touches_the_annotation(client, fake_ls):
    _, video = fake_ls
    task = images_task(video)
    assert predict(client, [task], IMAGES_CFG).status_code == 200
    before = [m.copy() for m in client.model.tasks.held(2).masks()]
    fixed = np.zeros((H, W), bool)
    fixed[5:25, 5:30] = True  # the annotator repaints the object on item 8
    edited = {"id": "lazyxmem-1-8", "from_name": "mask", "to_name": "frames", "type": "brushlabels", "item_index": 8,
              "original_width": W, "original_height": H,
              "value": {"format": "rle", "rle": mask2rle(fixed.astype(np.uint8) * 255), "brushlabels": ["Object"]}}
    connect(client, 3, IMAGES_CFG)
    holds({**task, "annotations": task["annotations"] + [{"id": 21, "result": [edited]}]}, 3)
    r = notify(client, "ANNOTATION_UPDATED", task=2, annotation=21)
    assert r.status_code == 202 and r.json == {"status": "accepted", "notices": 1}, r.json
    wait_jobs(client)
    assert {t for t, _ in client.model.tasks.held(2).corrections} == {8}
    after = client.model.tasks.held(2).masks()
    assert (after[8].astype(bool) == fixed).all()
    assert any((a != b).any() for a, b in zip(before[9:], after[9:]))  # later frames changed
    records = client.model.tasks.held(2).session.records
    assert (after[0] == before[0]).all()
    assert all((a == b).all() or records[t].objects[1].revised for t, (a, b) in enumerate(zip(before[:8], after[:8])))
    posts = [p for p in FakeLabelStudio.posted if p["path"].startswith("/api/predictions")]
    assert posts and not any(p["path"].startswith("/api/annotations") for p in FakeLabelStudio.posted)


def test_long_video_goes_to_the_background_and_its_prediction_is_posted(client, fake_ls, monkeypatch):
    import threading

    import backend.fetch

    _, video = fake_ls
    client.model.settings = BackendSettings(**{**client.model.settings.__dict__, "sync_budget_s": 0.0})
    decoded_in = []
    real = backend.fetch.VideoFrames

    def recording(*args, **kwargs):
        decoded_in.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(backend.fetch, "VideoFrames", recording)
    r = predict(client, [video_task(video, task_id=5)], VIDEO_CFG)
    assert r.status_code == 200
    # Queued on the container's declared frame count: the request itself decoded nothing.
    assert threading.current_thread() not in decoded_in
    # [] is the reply Label Studio stores nothing for: the job posts the prediction when done.
    assert r.json["results"] == [[]]
    job_id = r.json["jobs"]["5"]
    job = client.get(f"/jobs/{job_id}", headers=AUTH)
    assert job.status_code == 200 and job.json["total"] == N and job.json["lane"] == "batch"
    wait_jobs(client)
    assert client.get(f"/jobs/{job_id}", headers=AUTH).json["done"] == N
    posted = [p["json"] for p in FakeLabelStudio.posted if p["path"].startswith("/api/predictions")]
    assert posted[-1]["task"] == 5 and any(x["type"] == "videorectangle" for x in posted[-1]["result"])
    assert decoded_in and threading.current_thread() not in decoded_in  # the job decoded it


def test_masks_download_png_and_coco(client, fake_ls):
    _, video = fake_ls
    assert predict(client, [video_task(video)], VIDEO_CFG).status_code == 200
    r = client.get("/tasks/1/masks?format=png", headers=AUTH)
    assert r.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(r.data)).namelist()
    assert len(names) == N and names[0] == "00001.png"
    coco = client.get("/tasks/1/masks?format=coco", headers=AUTH).json
    assert len(coco["images"]) == N and coco["categories"] == [{"id": 1, "name": "Object"}]
    assert client.get("/tasks/999/masks", headers=AUTH).status_code == 404


def test_sessions_are_bounded_and_rebuilt_after_eviction(client, fake_ls):
    _, video = fake_ls
    client.model.settings = BackendSettings(**{**client.model.settings.__dict__, "max_sessions": 1})
    assert predict(client, [video_task(video, task_id=7)], VIDEO_CFG).status_code == 200
    assert predict(client, [video_task(video, task_id=8)], VIDEO_CFG).status_code == 200
    assert client.model.tasks.held(7) is None and client.model.tasks.held(8) is not None
    kf = {"frame": 6, "x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0, "enabled": True}
    region = {"id": "lazyxmem-1", "from_name": "box", "to_name": "video", "type": "videorectangle",
              "value": {"sequence": [kf], "labels": ["Object"]}}
    connect(client, 3, VIDEO_CFG)
    task = video_task(video, task_id=7)
    holds({**task, "annotations": task["annotations"] + [{"id": 99, "result": [region]}]}, 3)
    r = notify(client, "ANNOTATION_UPDATED", task=7, annotation=99)
    assert r.status_code == 202  # the video is not propagated in the call
    wait_jobs(client)
    wait_jobs(client)  # the rebuild job schedules the re-propagation job
    state = client.model.tasks.held(7)
    assert state.revision == 1 and state.session.records[5].objects[1].answered


@pytest.mark.parametrize("case, status, message", [
    ("malformed", 400, "JSON object"),
    ("no_tasks", 400, "non-empty list"),
    ("bad_config", 400, "VideoRectangle"),
    ("outside", 422, "outside the frame"),
    ("undecodable", 422, "cannot decode video"),
    ("host", 422, "not allowed"),
    ("redirect", 422, "not allowed"),
    ("auth", 401, "basic auth"),
    ("no_data", 422, "no data field"),
])
def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(client, fake_ls, case, status, message):
    _, video = fake_ls
    task, cfg, headers = video_task(video), VIDEO_CFG, AUTH
    if case == "malformed":
        r = client.post("/predict", headers={**AUTH, "Content-Type": "application/json"}, data="{tasks: [")
    else:
        body = None
        if case == "no_tasks":
            body = {"tasks": [], "label_config": cfg}
        elif case == "bad_config":
            cfg = '<View><Video name="v" value="$video"/></View>'
        elif case == "outside":
            task = video_task(video, box={"frame": 1, "x": 90, "y": 10, "width": 30, "height": 20, "enabled": True})
        elif case == "undecodable":
            task = video_task(video, url="/data/upload/1/broken.mp4")
        elif case == "host":
            task = video_task(video, url="http://10.1.2.3/v.avi")
        elif case == "redirect":
            task = video_task(video, url="/data/upload/redirect")
        elif case == "auth":
            headers = {"Authorization": "Basic " + base64.b64encode(b"ann:wrong").decode()}
        elif case == "no_data":
            task = {"id": 1, "data": {"other": 1}, "annotations": []}
        body = body or {"tasks": [task], "label_config": cfg, "params": {"context": None}}
        r = client.post("/predict", headers=headers, json=body)
    assert r.status_code == status
    assert message in r.json["error"]
    assert client.get("/health").status_code == 200


def test_keyframe_reduction_and_ranges():
    boxes = [(10 + t, 20.0, 5.0, 5.0) for t in range(10)] + [None, None] + [(50.0, 50.0, 5.0, 5.0)] * 3
    kfs = keyframes(boxes, tolerance=0.5)
    assert [k["frame"] for k in kfs] == [1, 10, 13, 15]  # linear motion needs only its ends
    assert kfs[1]["enabled"] is False and kfs[0]["enabled"] and kfs[-1]["enabled"]
    bent = [(float(t if t < 5 else 10 - t), 0.0, 1.0, 1.0) for t in range(11)]
    assert [k["frame"] for k in keyframes(bent, 0.5)] == [1, 6, 11]
    assert frame_ranges([3, 4, 5, 9]) == [{"start": 4, "end": 6}, {"start": 10, "end": 10}]


def test_a_bad_task_in_a_batch_does_not_cost_the_others_their_predictions(client, fake_ls):
    _, video = fake_ls
    good, bad = video_task(video, task_id=11), video_task(video, task_id=12, url="/data/upload/1/broken.mp4")
    r = predict(client, [bad, good], VIDEO_CFG)
    assert r.status_code == 200
    first, second = r.json["results"]
    assert first["result"] == [] and "cannot decode video" in first["error"]
    assert any(x["type"] == "videorectangle" for x in second["result"])


def test_a_distractor_crossing_puts_needs_review_spans_on_the_timeline(client, fake_ls):
    _, video = fake_ls
    crossing = video.crossing
    ys, xs = np.nonzero(crossing.masks[0] == 1)
    h, w = crossing.shape
    kf = {"frame": 1, "x": 100 * xs.min() / w, "y": 100 * ys.min() / h, "width": 100 * (xs.max() + 1 - xs.min()) / w,
          "height": 100 * (ys.max() + 1 - ys.min()) / h, "rotation": 0, "enabled": True}
    task = video_task(video, task_id=21, url="/data/upload/1/cross.avi", box=kf)
    r = predict(client, [task], VIDEO_CFG)
    assert r.status_code == 200, r.json
    pred = r.json["results"][0]
    review = client.model.tasks.held(21).session.review_frames
    assert review and pred["review_frames"] == [t + 1 for t in review]
    spans = [x for x in pred["result"] if x["type"] == "timelinelabels" and x["value"]["timelinelabels"] == ["Needs review"]]
    assert spans and {t + 1 for t in review} <= {f for x in spans for rg in x["value"]["ranges"]
                                                 for f in range(rg["start"], rg["end"] + 1)}
    # Each span is readable on the timeline and says in the Regions panel what it covers.
    notes = {x["id"]: x["value"]["text"][0] for x in pred["result"] if x["type"] == "textarea"}
    for x in spans:
        (rg,) = x["value"]["ranges"]
        assert rg["end"] - rg["start"] + 1 >= 5, rg
        assert notes[x["id"]].startswith(f"Object 1: frames {rg['start']}-{rg['end']}, check "), notes[x["id"]]


def test_tasks_created_queues_the_tasks_with_regions_and_posts_their_predictions(client, fake_ls):
    _, video = fake_ls
    connect(client, 3, VIDEO_CFG)
    holds(video_task(video, task_id=31), 3)
    holds({"id": 32, "data": {"video": "/data/upload/1/v.avi"}, "annotations": []}, 3)  # no regions
    r = notify(client, "TASKS_CREATED", tasks=[31, 32])  # LS sends webhooks without credentials
    assert r.status_code == 202 and r.json == {"status": "accepted", "notices": 2}, r.json
    jobs = wait_jobs(client)
    assert [(j["task"], j["status"]) for j in jobs] == [(31, "finished")] and jobs[0]["done"] == N
    assert client.model.tasks.held(31) is not None and len(client.model.tasks.held(31).session.records) == N
    assert "/api/tasks/32/" in FakeLabelStudio.reads  # looked at, nothing to do
    # The same import announced twice is the same job: nothing runs or posts again.
    posts = len(FakeLabelStudio.posted)
    assert notify(client, "TASKS_CREATED", tasks=[31, 32]).status_code == 202
    assert len(wait_jobs(client)) == 1 and len(FakeLabelStudio.posted) == posts


def test_webhooks_for_a_project_that_never_connected_are_ignored(client, fake_ls):
    _, video = fake_ls
    holds(video_task(video, task_id=31), 77, VIDEO_CFG)
    r = notify(client, "TASKS_CREATED", project=77, tasks=[31])
    assert r.status_code == 200 and r.json["status"] == "ignored" and "77" in r.json["reason"], r.json
    assert not FakeLabelStudio.reads and not client.model.jobs.jobs


def test_tasks_created_for_a_task_label_studio_cannot_show_yet_is_looked_up_again(client, fake_ls, caplog):
    _, video = fake_ls
    client.model.notifier.retry_delays = (0.2, 0.2)
    connect(client, 3, VIDEO_CFG)
    r = notify(client, "TASKS_CREATED", tasks=[33])
    assert r.status_code == 202
    end = time.time() + 10
    while "/api/tasks/33/" not in FakeLabelStudio.reads and time.time() < end:  # the first look-up: a 404
        time.sleep(0.01)
    holds(video_task(video, task_id=33), 3)  # the upload's transaction commits after its webhook
    jobs = wait_jobs(client)
    assert [(j["task"], j["status"]) for j in jobs] == [(33, "finished")], jobs
    assert FakeLabelStudio.reads.count("/api/tasks/33/") >= 2
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]


def test_tasks_created_can_be_switched_off(client, fake_ls):
    _, video = fake_ls
    client.model.settings = BackendSettings(**{**client.model.settings.__dict__, "preannotate_on_import": False})
    connect(client, 3, VIDEO_CFG)
    holds(video_task(video), 3)
    r = notify(client, "TASKS_CREATED", tasks=[1])
    assert r.status_code == 200 and r.json["status"] == "ignored" and not client.model.jobs.jobs


class _OomOnCuda:
    """Stands in for a propagator on a GPU that is out of memory; CPU runs are real."""

    def __init__(self, model, real_build):
        self.model, self.real_build = model, real_build

    def __call__(self, settings, **kwargs):
        prop = self.real_build(settings, **kwargs)
        if settings.device == "cuda":
            def step(*a, **k):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            prop.step = step
        return prop


def test_cuda_out_of_memory_gives_a_clear_error_and_the_server_keeps_serving(client, fake_ls, monkeypatch, caplog):
    import backend.service as model_module

    _, video = fake_ls
    model = client.model
    model.settings = BackendSettings(**{**model.settings.__dict__,
                                        "engine": EngineSettings(engine="embedded", refiner="embedded", device="cuda")})
    monkeypatch.setattr(model_module, "build_propagator", _OomOnCuda(model, model_module.build_propagator))
    r = predict(client, [video_task(video, task_id=41)], VIDEO_CFG)
    assert r.status_code == 422 and "ran out of memory" in r.json["error"] and "CPU_FALLBACK" in r.json["error"]
    assert "task 41" in r.json["error"] and model.tasks.held(41) is None  # no half-propagated session is kept
    assert any("task 41" in rec.getMessage() and "out of memory" in rec.getMessage() for rec in caplog.records)
    assert client.get("/health").status_code == 200

    model.settings = BackendSettings(**{**model.settings.__dict__, "cpu_fallback": True})
    r = predict(client, [video_task(video, task_id=42)], VIDEO_CFG)
    assert r.status_code == 200 and any(x["type"] == "videorectangle" for x in r.json["results"][0]["result"])
    assert model.settings.engine.device == "cpu"  # later tasks stay on the CPU


def test_a_background_job_out_of_memory_fails_with_the_reason(client, fake_ls, monkeypatch):
    import backend.service as model_module

    _, video = fake_ls
    model = client.model
    model.settings = BackendSettings(**{**model.settings.__dict__, "sync_budget_s": 0.0,
                                        "engine": EngineSettings(engine="embedded", refiner="embedded", device="cuda")})
    monkeypatch.setattr(model_module, "build_propagator", _OomOnCuda(model, model_module.build_propagator))
    job_id = predict(client, [video_task(video, task_id=43)], VIDEO_CFG).json["jobs"]["43"]
    wait_jobs(client)
    job = client.get(f"/jobs/{job_id}", headers=AUTH).json
    assert job["status"] == "failed" and "ran out of memory" in job["error"]


def test_a_correction_job_on_a_rebuilt_session_carries_every_earlier_correction(client, fake_ls):
    from lazyxmem_core.types import Correction

    _, video = fake_ls
    assert predict(client, [images_task(video)], IMAGES_CFG).status_code == 200
    model = client.model
    state = model.tasks.held(2)
    first, second = np.zeros((H, W), bool), np.zeros((H, W), bool)
    first[10:30, 10:40] = True
    second[30:60, 50:90] = True
    model.schedule_correction(state, {(4, 1): Correction(mask=first)})
    wait_jobs(client)
    assert model.tasks.held(2) is state and (state.masks()[4] == 1).tolist() == first.tolist()
    model.tasks.drop(2)  # evicted here, or the next job lands on another worker
    model.schedule_correction(state, {(9, 1): Correction(mask=second)})
    jobs = wait_jobs(client)
    assert all(j["status"] == "finished" for j in jobs), jobs
    rebuilt = model.tasks.held(2)
    assert rebuilt is not state and rebuilt.revision == 2  # both corrections in one pass, named round 2
    assert (rebuilt.masks()[4] == 1).tolist() == first.tolist() and (rebuilt.masks()[9] == 1).tolist() == second.tolist()
    posted = [p["json"] for p in FakeLabelStudio.posted if p["path"].startswith("/api/predictions")]
    assert len(posted) >= 2 and posted[-2]["result"] != posted[-1]["result"], "round 1 and round 2 both posted"
    assert posted_revision(client, images_task(video)) == 2


@pytest.fixture(scope="module")
def xmem_checkpoint(tmp_path_factory):
    from lazyxmem_core.xmem.random_weights import shared_random_state_dict

    path = tmp_path_factory.mktemp("xmem") / "XMem-s012.pth"
    torch.save(shared_random_state_dict(seed=0), path)
    return str(path)


def test_xmem_engine_loads_its_weights_once_per_process(xmem_checkpoint):
    from lazyxmem_core.engines import build_propagator

    settings = EngineSettings(engine="xmem", xmem_checkpoint=xmem_checkpoint)
    a, b = build_propagator(settings, {"size": -1}), build_propagator(settings, {"size": -1})
    assert a is not b and a.net is b.net  # two sessions, one network
    frame = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[10:30, 10:40] = 1
    a.step(frame, mask)
    a.commit()
    assert a.memory_elements > 0 and b.memory_elements == 0  # each keeps its own memory


def test_backend_serves_an_image_sequence_with_the_xmem_engine(fake_ls, tmp_path, xmem_checkpoint):
    _, video = fake_ls
    settings = BackendSettings(ls_url=fake_ls[0], api_key=TOKEN, cache_dir=str(tmp_path / "cache"),
                               engine=EngineSettings(engine="xmem", refiner="embedded", xmem_checkpoint=xmem_checkpoint))
    client = create_app(settings).test_client()
    task = images_task(video)
    task["data"]["frames"] = task["data"]["frames"][:3]  # XMem works at 480p here: keep it short on a CPU
    r = client.post("/predict", json={"tasks": [task], "label_config": IMAGES_CFG, "params": {"context": None}})
    assert r.status_code == 200, r.json
    pred = r.json["results"][0]
    assert pred["model_version"].endswith("-xmem")
    items = sorted(x["item_index"] for x in pred["result"] if x["type"] == "brushlabels")
    assert items[0] == 0 and set(items) <= {0, 1, 2}
    first = decode_brush(next(x for x in pred["result"] if x["type"] == "brushlabels" and x["item_index"] == 0)["value"],
                         W, H, "test")
    assert (first == (video.clean.masks[0] == 1)).all()  # the given mask is returned exactly
    state = client.application.config["model"].tasks.held(2)
    assert state.session.propagator.video_length == 3


@pytest.mark.parametrize("start", [0, 2])
def test_predicting_again_after_a_correction_keeps_it(client, fake_ls, start):
    """Label Studio asks /predict again when a task is reopened: the answer is the corrected
    prediction, and the session keeps its corrections (it is not rebuilt from the task), also
    when the object is first drawn after the first item."""
    _, video = fake_ls
    task = images_task(video)
    region = task["annotations"][0]["result"][0]
    region["item_index"] = start
    region["value"]["rle"] = mask2rle((video.clean.masks[start] == 1).astype(np.uint8) * 255)
    assert predict(client, [task], IMAGES_CFG).status_code == 200
    ys, xs = np.nonzero(video.clean.masks[6] == 1)
    click = {"from_name": "clicks", "to_name": "frames", "type": "keypointlabels", "item_index": 6,
             "is_positive": True, "original_width": W, "original_height": H,
             "value": {"x": 100 * xs.mean() / W, "y": 100 * ys.mean() / H, "width": 0.5, "keypointlabels": ["Object"]}}
    assert predict(client, [task], IMAGES_CFG, context={"result": [click]}).status_code == 200
    wait_jobs(client)
    corrected = [m.copy() for m in client.model.tasks.held(2).masks()]
    r = predict(client, [task], IMAGES_CFG)
    assert r.status_code == 200, r.json
    pred = r.json["results"][0]
    assert pred["revision"] == 1 and pred["model_version"] == client.model.model_version, pred["model_version"]
    held = client.model.tasks.held(2)
    assert held.session.records[6].objects[1].answered, "the correction is still in the session"
    assert all((a == b).all() for a, b in zip(corrected, held.masks()))
    brushes = {x["item_index"]: x for x in pred["result"] if x["type"] == "brushlabels"}
    assert (decode_brush(brushes[6]["value"], W, H, "test") == (corrected[6] == 1)).all()


def test_view_masks_unpack_one_frame_at_a_time():
    from lazyxmem_core.session_view import SessionView
    from lazyxmem_core.types import PackedMask

    m = np.zeros((6, 8), np.uint8)
    m[1:3, 2:5] = 2
    view = SessionView(None, 3, (6, 8), (2,), (None, PackedMask.pack(m), None), {}, {}, (), (), 0.0)
    masks = view.frame_masks()
    assert len(masks) == 3 and (masks[1] == m).all() and (masks[-2] == m).all()
    assert not masks[0].any() and masks[2].shape == (6, 8)  # not reached yet: empty
    assert masks.packed(0) is masks.packed(2)  # packed once for all frames not reached
    assert [x.sum() for x in masks] == [0, m.sum(), 0] and len(masks[1:]) == 2
    with pytest.raises(IndexError, match="outside the video"):
        masks[3]
    again = SessionView.from_bytes(view.to_bytes())
    assert again.masks[0] is None and (again.frame_masks()[1] == m).all() and again.labels == (2,)


def test_a_task_opened_before_anything_is_drawn_gets_no_prediction_to_store(client, fake_ls):
    """Opening a task with no region makes Label Studio ask /predict and store what comes back:
    the answer is [] (a list: no prediction), so nothing empty sits in front of the real one."""
    task = {"id": 51, "data": {"video": "/data/upload/1/v.avi"}, "annotations": [], "drafts": []}
    before = len(FakeLabelStudio.posted)
    r = predict(client, [task], VIDEO_CFG)
    assert r.status_code == 200 and r.json["results"] == [[]] and "jobs" not in r.json, r.json
    assert len(FakeLabelStudio.posted) == before and not client.model.jobs.jobs


# -- annotations: what the annotator did, judged against what they started from ------------------
def posted_for(task_id):
    return [p["json"] for p in FakeLabelStudio.posted if p["path"].startswith("/api/predictions")
            and p["json"].get("task") == task_id]


def posted_revision(client, task) -> int:
    """The revision of the last prediction posted for ``task``. Every revision carries the backend's
    one model version (Label Studio's Data Manager scores only those), so the revision is read from
    the backend's own record of what it posted, checked to be that very post."""
    stored = client.model.views.prediction(task, client.model.model_version)
    posts = posted_for(task["id"])
    assert stored is not None and posts and posts[-1]["result"] == stored["result"], "the last post is not the stored one"
    assert all(p["model_version"] == client.model.model_version for p in posts), [p["model_version"] for p in posts]
    return stored["revision"]


def box_track(pred, n=N):
    """Per-frame (x, y, w, h) of the first track, interpolated between keyframes as Label Studio does."""
    seq = next(r for r in pred["result"] if r["type"] == "videorectangle")["value"]["sequence"]
    out = [None] * n
    for a, b in zip(seq, seq[1:] + [None]):
        for f in range(a["frame"], (b["frame"] if b else n + 1)):
            if b is None or not a.get("enabled", True):
                out[f - 1] = (a["x"], a["y"], a["width"], a["height"]) if f == a["frame"] or b is None and a.get("enabled", True) else None
            else:
                s = (f - a["frame"]) / (b["frame"] - a["frame"])
                out[f - 1] = tuple(a[k] + s * (b[k] - a[k]) for k in ("x", "y", "width", "height"))
    return out


def test_the_first_annotation_starts_the_task_and_its_prediction_is_posted(client, fake_ls):
    _, video = fake_ls
    connect(client, 3, VIDEO_CFG)
    task = video_task(video, task_id=41)
    drawn = task["annotations"][0]["result"][0]["value"]["sequence"][0]
    holds({**task, "annotations": []}, 3)  # opened before any box: nothing to predict
    r = predict(client, [{**task, "annotations": []}], VIDEO_CFG)
    assert r.json["results"] == [[]]
    holds(task, 3)  # the annotator draws a box and submits
    assert notify(client, "ANNOTATION_CREATED", task=41, annotation=410).status_code == 202
    wait_jobs(client)
    posts = posted_for(41)
    assert len(posts) == 1 and posted_revision(client, task) == 0, [p["model_version"] for p in posts]
    first = box_track(posts[0])[0]
    assert max(abs(a - b) for a, b in zip(first, (drawn["x"], drawn["y"], drawn["width"], drawn["height"]))) < 1e-3


def test_an_edited_copy_of_an_older_prediction_brings_only_its_edits(client, fake_ls):
    """The annotator copies the first prediction, a correction round makes a newer one, then the
    copy is edited on one frame and submitted: the copy's other frames are the old prediction's,
    not the annotator's, and must not be pinned as corrections."""
    _, video = fake_ls
    connect(client, 3, VIDEO_CFG)
    task = video_task(video, task_id=42)
    holds(task, 3)
    assert predict(client, [task], VIDEO_CFG).status_code == 200
    old = client.post("/predict", headers=AUTH, json={"tasks": [task], "label_config": VIDEO_CFG}).json["results"][0]
    FakeLabelStudio.records["predictions"][501] = {"id": 501, "task": 42, "result": old["result"],
                                                   "model_version": old["model_version"]}
    copy = [json_copy(r) for r in old["result"] if r["type"] == "videorectangle"]
    seq = copy[0]["value"]["sequence"]
    k = next(k for k in seq if k["frame"] > 3 and k.get("enabled", True))
    k["x"] += 5.0  # the one edit
    holds({**task, "annotations": task["annotations"] + [{"id": 4201, "parent_prediction": 501, "result": copy}]}, 3)
    assert notify(client, "ANNOTATION_UPDATED", task=42, annotation=4201).status_code == 202
    wait_jobs(client)
    corrected = {t + 1 for t, _ in client.model.tasks.held(42).corrections}
    assert corrected == {k["frame"]}, (corrected, k["frame"])


def test_a_moved_starting_box_starts_the_task_again(client, fake_ls):
    _, video = fake_ls
    connect(client, 3, VIDEO_CFG)
    task = video_task(video, task_id=43)
    holds(task, 3)
    assert notify(client, "ANNOTATION_CREATED", task=43, annotation=430).status_code == 202
    wait_jobs(client)
    before = client.model.tasks.held(43)
    moved = json_copy(task["annotations"][0])
    kf = moved["result"][0]["value"]["sequence"][0]
    kf["x"], kf["y"] = kf["x"] + 20.0, kf["y"] + 10.0  # the box was misplaced: moved onto the other side
    holds({**task, "annotations": [moved]}, 3)
    assert notify(client, "ANNOTATION_UPDATED", task=43, annotation=430).status_code == 202
    wait_jobs(client)
    after = client.model.tasks.held(43)
    assert after is not before and not after.corrections
    posts = posted_for(43)
    assert len(posts) == 2 and posts[-1]["result"] != posts[0]["result"]
    first = box_track(posts[-1])[0]
    assert max(abs(a - b) for a, b in zip(first, (kf["x"], kf["y"], kf["width"], kf["height"]))) < 1e-3


def test_a_later_keyframe_on_the_annotators_own_annotation_is_the_only_correction(client, fake_ls):
    _, video = fake_ls
    connect(client, 3, VIDEO_CFG)
    task = video_task(video, task_id=44)
    holds(task, 3)
    assert notify(client, "ANNOTATION_CREATED", task=44, annotation=440).status_code == 202
    wait_jobs(client)
    updated = json_copy(task["annotations"][0])
    updated["result"][0]["value"]["sequence"].append(
        {"frame": 9, "x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0, "enabled": True})
    holds({**task, "annotations": [updated]}, 3)
    assert notify(client, "ANNOTATION_UPDATED", task=44, annotation=440).status_code == 202
    wait_jobs(client)
    state = client.model.tasks.held(44)
    assert {t + 1 for t, _ in state.corrections} == {9}
    final = box_track(posted_for(44)[-1])
    assert posted_revision(client, {**task, "annotations": [updated]}) == 1
    assert max(abs(a - b) for a, b in zip(final[8], (10.0, 20.0, 30.0, 40.0))) < 1e-3, final[8]


def json_copy(obj):
    import json

    return json.loads(json.dumps(obj))


def test_one_prediction_reaches_label_studio_when_it_asks_twice(client, fake_ls, caplog):
    """Label Studio asks /predict twice for one task on Submit: the twin request neither queues a
    job nor answers, and a job that makes the prediction a /predict answered posts no copy."""
    import logging

    caplog.set_level(logging.INFO, logger="backend.service")
    _, video = fake_ls
    task = video_task(video, task_id=45)
    client.model._sync_task = 45  # the first request is propagating it
    r = predict(client, [task], VIDEO_CFG)
    assert r.json["results"] == [[]] and "jobs" not in r.json and not client.model.jobs.jobs
    client.model._sync_task = None
    r = predict(client, [task], VIDEO_CFG)
    assert r.json["results"][0]["result"]
    client.model.submit("propagate", task, VIDEO_CFG, N)  # what the twin used to queue
    wait_jobs(client)
    assert posted_for(45) == [] and "not posted again" in caplog.text


def test_one_prediction_of_ours_stays_current_but_the_one_an_annotation_came_from_is_kept(client, fake_ls):
    _, video = fake_ls
    connect(client, 3, VIDEO_CFG)
    task = video_task(video, task_id=46)
    holds(task, 3)
    assert notify(client, "ANNOTATION_CREATED", task=46, annotation=460).status_code == 202
    wait_jobs(client)

    def ours():
        listed = FakeLabelStudio  # ids as the fake lists them: posts not deleted
        return [i + 1 for i, p in enumerate(listed.posted) if p["path"].startswith("/api/predictions")
                and p["json"].get("task") == 46 and i + 1 not in listed.deleted]

    first = ours()
    assert len(first) == 1
    updated = json_copy(task["annotations"][0])
    updated["result"][0]["value"]["sequence"].append(
        {"frame": 9, "x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0, "enabled": True})
    holds({**task, "annotations": [updated]}, 3)
    assert notify(client, "ANNOTATION_UPDATED", task=46, annotation=460).status_code == 202
    wait_jobs(client)
    second = ours()
    assert len(second) == 1 and second != first and first[0] in FakeLabelStudio.deleted  # replaced
    # The annotator copies the current prediction into an annotation: that one stays when a newer comes.
    made_from = {"id": 461, "parent_prediction": second[0], "result": json_copy(updated["result"])}
    made_from["result"][0]["value"]["sequence"].append(
        {"frame": 12, "x": 40.0, "y": 20.0, "width": 30.0, "height": 40.0, "rotation": 0, "enabled": True})
    FakeLabelStudio.records["predictions"][second[0]] = {"id": second[0], "task": 46, "model_version": "lazyxmem-x",
                                                         "result": []}
    holds({**task, "annotations": [updated, made_from]}, 3)
    assert notify(client, "ANNOTATION_UPDATED", task=46, annotation=461).status_code == 202
    wait_jobs(client)
    third = ours()
    assert second[0] in third and len(third) == 2, third


def test_the_project_scores_and_shows_predictions_under_the_backends_version(client, fake_ls):
    """Label Studio 1.23.2 names a project's predictions after the backend's title when it connects
    (its Data Manager then scores, and its labeling stream shows, no prediction of ours): the
    backend points the project at its own version, and leaves a version the user chose alone."""
    from fake_ls import FakeLabelStudio as LS

    ours = client.model.model_version
    LS.records["projects"][5] = {"id": 5, "title": "p5", "label_config": VIDEO_CFG, "model_version": "My model"}
    LS.records["ml"][1] = {"id": 1, "project": 5, "title": "My model", "url": "http://127.0.0.1:9", "model_version": ours}
    LS.records["projects"][6] = {"id": 6, "title": "p6", "label_config": VIDEO_CFG, "model_version": "yolo-v8"}
    LS.records["ml"][2] = {"id": 2, "project": 6, "title": "lazyxmem", "url": "http://127.0.0.1:9", "model_version": ours}
    connect(client, 5)
    connect(client, 6)
    deadline = time.monotonic() + 10
    while LS.records["projects"][5]["model_version"] != ours and time.monotonic() < deadline:
        time.sleep(0.05)
    assert LS.records["projects"][5]["model_version"] == ours
    time.sleep(1.5)  # the other project's check has run by now too
    assert LS.records["projects"][6]["model_version"] == "yolo-v8", "another model's version, chosen by the user"
