"""One server, many tasks of one frame size, requests at once: every answer is its own task's.

Tasks here share the frame size and the place of their first box but not their content, the way
a project's videos do. A server that answers for several of them must give each the answer it
gives when it serves that task alone (nothing cached for one task reaches another), answers must
stay right under concurrent calls while a correction job runs, and the harness and the backend
must turn one correction into one mask.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from backend.app import create_app
from backend.convert import decode_brush
from backend.settings import BackendSettings
from fake_ls import TOKEN, FakeLabelStudio, holds
from lazyxmem_core.engines import EngineSettings
from synthetic import make_video

IMAGES_CFG = Path("backend/configs/image_sequence.xml").read_text()
H, W, N = 64, 96, 10
VARIANTS = 4


def variant(k: int):
    """Four videos of one size with different content: mirrored and shifted copies of a scene."""
    v = make_video(n_frames=N, size=(H, W), radius=11, seed=30 + k)
    def tf(a: np.ndarray) -> np.ndarray:
        if k % 2:
            a = a[:, ::-1]
        return np.ascontiguousarray(np.roll(a, (k // 2) * (H // 4) - H // 8, axis=0))
    v.frames, v.masks = [tf(f) for f in v.frames], [tf(m) for m in v.masks]
    return v


SCENES = [variant(k) for k in range(VARIANTS)]


@pytest.fixture(scope="module")
def scenes():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLabelStudio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    videos = SCENES
    for k, v in enumerate(videos):
        for i, f in enumerate(v.frames):
            ok, png = cv2.imencode(".png", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
            FakeLabelStudio.files[f"/data/upload/7/s{k}_{i}.png"] = png.tobytes()
    yield f"http://127.0.0.1:{server.server_address[1]}", videos
    server.shutdown()


def task(k: int, task_id: int) -> dict:
    """Scene k, its object boxed on item 0 (a cache keyed by frame index and size alone would
    hand every task scene 0's work for item 0)."""
    ys, xs = np.nonzero(SCENES[k].masks[0] == 1)
    box = {"x": 100 * (xs.min() - 1) / W, "y": 100 * (ys.min() - 1) / H,
           "width": 100 * (np.ptp(xs) + 3) / W, "height": 100 * (np.ptp(ys) + 3) / H}
    region = {"id": f"b{k}", "from_name": "region", "to_name": "frames", "type": "rectanglelabels", "item_index": 0,
              "original_width": W, "original_height": H, "value": {**box, "rectanglelabels": ["Object"]}}
    return {"id": task_id, "data": {"frames": [f"/data/upload/7/s{k}_{i}.png" for i in range(N)]},
            "annotations": [{"id": 700 + task_id, "result": [region]}]}


def click(video, t: int) -> dict:
    ys, xs = np.nonzero(video.masks[t] == 1)
    return {"from_name": "clicks", "to_name": "frames", "type": "keypointlabels", "item_index": t,
            "is_positive": True, "original_width": W, "original_height": H,
            "value": {"x": 100 * xs.mean() / W, "y": 100 * ys.mean() / H, "width": 0.5, "keypointlabels": ["Object"]}}


def server(url: str, tmp_path: Path, refiner: str):
    settings = BackendSettings(ls_url=url, api_key=TOKEN, cache_dir=str(tmp_path / "cache"),
                               engine=EngineSettings(engine="embedded", refiner="embedded"))
    app = create_app(settings)
    service = app.config["model"]
    if refiner == "sam":
        from tiny_sam import tiny_sam

        from lazyxmem_core.sam import SamRefiner

        service._refiner = SamRefiner.from_model(tiny_sam(), device="cpu")
    return app.test_client(), service


def predict(client, tasks: list[dict], context=None) -> list:
    r = client.post("/predict", json={"tasks": tasks, "label_config": IMAGES_CFG, "params": {"context": context}})
    assert r.status_code == 200, r.json
    return r.json["results"]


def wait_jobs(service, timeout: float = 120) -> list[dict]:
    service.notifier.wait_idle(timeout)
    end = time.time() + timeout
    while time.time() < end:
        jobs = list(service.jobs.jobs.values())
        if all(j["status"] in ("finished", "failed") for j in jobs):
            assert all(j["status"] == "finished" for j in jobs), jobs
            return jobs
        time.sleep(0.05)
    raise AssertionError("jobs did not finish")


def brushes(entry: dict) -> dict[int, np.ndarray]:
    return {x["item_index"]: decode_brush(x["value"], W, H, "test") for x in entry["result"] if x["type"] == "brushlabels"}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = (a | b).sum()
    return float((a & b).sum() / u) if u else 1.0


# Clicks alternate between the first two tasks, on frames where their tracks need it.
CLICKS = [(0, 6), (1, 6), (0, 8), (1, 3)]


def journey(client, service, videos, ids: list[int]) -> tuple[list, list]:
    """Predictions for ``ids`` (one batch: "Retrieve predictions"), then the clicks of CLICKS on
    those tasks; returns the predictions and the interactive answers."""
    preds = predict(client, [task(k, tid) for k, tid in enumerate(ids)])
    answers = []
    for k, t in CLICKS:
        if k >= len(ids):
            continue
        answers.append(predict(client, [task(k, ids[k])], {"result": [click(videos[k], t)]})[0])
        wait_jobs(service)
    return preds, answers


@pytest.mark.parametrize("refiner", ["embedded", "sam"])
def test_tasks_of_one_size_get_the_answers_they_get_alone(scenes, tmp_path, refiner):
    url, videos = scenes
    ids = [1, 2, 3]
    client, service = server(url, tmp_path / "shared", refiner)
    shared_preds, shared_answers = journey(client, service, videos, ids)
    for k, tid in enumerate(ids):
        alone_client, alone_service = server(url, tmp_path / f"alone{k}", refiner)
        preds = predict(alone_client, [task(k, tid)])
        assert preds[0]["result"] == shared_preds[k]["result"], f"task {tid}'s prediction depends on the other tasks"
        i = 0
        for kk, t in CLICKS:
            if kk == k:
                answer = predict(alone_client, [task(k, tid)], {"result": [click(videos[k], t)]})[0]
                shared = [a for (c, _), a in zip([c for c in CLICKS if c[0] < len(ids)], shared_answers) if c == k]
                assert answer["result"] == shared[i]["result"], f"task {tid}'s answer on frame {t + 1} differs"
                i += 1
                wait_jobs(alone_service)
    if refiner == "embedded":
        # And the answers are right, not merely equal: each task's first mask is its own object.
        for k, pred in enumerate(shared_preds):
            first = brushes(pred)[0]
            own = iou(first, videos[k].masks[0] == 1)
            assert own > 0.6, f"task {ids[k]}: first mask IoU {own:.2f} with its own object"
            assert all(own > iou(first, videos[j].masks[0] == 1) for j in range(len(ids)) if j != k)


def test_frame_ids_without_the_video_are_refused():
    from lazyxmem_core.embedded import GrabCutRefiner
    from lazyxmem_core.types import Click, FrameRef

    frame = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(TypeError, match="FrameRef"):
        GrabCutRefiner().refine(frame, [Click(5, 5)], frame_id=3)
    a, b = FrameRef("task-1-abc", 3), FrameRef("task-2-def", 3)
    from lazyxmem_core.refine_common import frame_key

    assert frame_key(frame, a) != frame_key(frame, b)


def test_sixteen_concurrent_clicks_over_four_tasks_with_a_correction_running(scenes, tmp_path):
    url, videos = scenes
    client, service = server(url, tmp_path, "embedded")
    ids = [11, 12, 13, 14]
    preds = predict(client, [task(k, tid) for k, tid in enumerate(ids)])
    assert all(p["result"] for p in preds)
    # A correction job is under way on the first task when the clicks arrive.
    fixed = videos[0].masks[4] == 1
    from label_studio_sdk.converter.brush import mask2rle

    edited = {"id": "lazyxmem-1-4", "from_name": "mask", "to_name": "frames", "type": "brushlabels", "item_index": 4,
              "original_width": W, "original_height": H,
              "value": {"format": "rle", "rle": mask2rle(fixed.astype(np.uint8) * 255), "brushlabels": ["Object"]}}
    assert client.post("/setup", json={"project": "7.1", "schema": IMAGES_CFG}).status_code == 200
    first = task(0, ids[0])
    holds({**first, "annotations": first["annotations"] + [{"id": 9001, "result": [edited]}]}, 7, IMAGES_CFG)
    r = client.post("/webhook", json={"action": "ANNOTATION_UPDATED", "project": {"id": 7}, "task": {"id": ids[0]},
                                      "annotation": {"id": 9001}})
    assert r.status_code == 202 and r.json["status"] == "accepted", r.json
    service.notifier.wait_idle()  # read back from Label Studio: the correction job is queued
    calls = [(k, (1, 3, 6, 8)[i // VARIANTS]) for i, k in enumerate(list(range(VARIANTS)) * 4)]  # 4 frames x 4 tasks

    def call(kt):
        k, t = kt
        out = predict(client, [task(k, ids[k])], {"result": [click(videos[k], t)]})[0]
        return k, t, out

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, calls))
    for k, t, out in results:
        got = brushes(out)
        assert list(got) == [t], f"task {ids[k]}: the answer is for item {t}"
        own = iou(got[t], videos[k].masks[t] == 1)
        others = [iou(got[t], videos[j].masks[t] == 1) for j in range(VARIANTS) if j != k]
        assert own > 0.5 and own > max(others), f"task {ids[k]} frame {t + 1}: IoU {own:.2f}, others {others}"
    wait_jobs(service)
    posted = [p["json"] for p in FakeLabelStudio.posted if p["path"].startswith("/api/predictions")]
    for k, tid in enumerate(ids):
        state = service.tasks.held(tid)
        assert set(state.corrections) <= set(state.applied), f"task {tid}: a correction was never applied"
        for (t, v) in state.corrections:
            assert state.session.records[t].objects[v].answered
        final = [p for p in posted if p["task"] == tid][-1]
        stored = service.views.prediction(task(k, tid), service.model_version)  # Label Studio keeps no revision
        assert final["model_version"] == service.model_version and final["result"] == stored["result"]
        assert stored["revision"] == state.rounds, (stored["revision"], state.rounds)
        assert {(t, 1) for _, t in [c for c in calls if c[0] == k]} <= set(state.corrections)
        for t, mask in brushes(final).items():
            assert (mask == (state.masks()[t] == 1)).all()
    assert (service.tasks.held(ids[0]).masks()[4].astype(bool) == fixed).all()


def test_the_harness_and_the_backend_give_one_mask_for_one_correction(scenes, tmp_path):
    """The evaluation harness (an on-the-fly session answering a request) and the backend (an
    interactive click, then the re-propagation) turn the same click into the same mask."""
    from lazyxmem_core.engines import build_propagator
    from lazyxmem_core.lazy import LazySession
    from lazyxmem_core.types import Click, Correction

    url, videos = scenes
    client, service = server(url, tmp_path, "embedded")
    k, t, tid = 2, 6, 21
    predict(client, [task(k, tid)])
    state = service.tasks.held(tid)
    answer = brushes(predict(client, [task(k, tid)], {"result": [click(videos[k], t)]})[0])[t]
    wait_jobs(service)
    assert (state.masks()[t] == 1).tolist() == answer.tolist(), "the re-propagation keeps the answer"

    ys, xs = np.nonzero(videos[k].masks[t] == 1)
    the_click = Click(min(xs.mean(), W - 1), min(ys.mean(), H - 1), True)  # what convert makes of the keypoint
    sent = state.corrections[(t, 1)].clicks
    assert len(sent) == 1 and abs(sent[0].x - the_click.x) < 0.01 and abs(sent[0].y - the_click.y) < 0.01
    given = {0: state.session._replay.given[0]}
    harness = LazySession(build_propagator(service.settings.engine), videos[k].frames, given,
                          refiner=service.refiner(), config=service.settings.lazy_config,
                          user=lambda req: Correction(clicks=sent) if req.frame_index == t else None,
                          forced_user={t: [1]})
    harness.run()
    assert ((harness.records[t].mask == 1) == answer).all()


def test_a_click_on_a_long_video_not_held_is_answered_from_its_frame(tmp_path):
    """A task this server does not hold (a restart, an eviction) with a long video: the answer
    comes from the frames it needs, the propagation is queued."""
    from synthetic import write_h264

    n = 1500
    v = make_video(n_frames=n, size=(72, 96), radius=12, seed=3)
    path = write_h264(str(tmp_path / "long.mp4"), [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in v.frames])
    FakeLabelStudio.files["/data/upload/8/long.mp4"] = Path(path).read_bytes()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeLabelStudio)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        settings = BackendSettings(ls_url=url, api_key=TOKEN, cache_dir=str(tmp_path / "cache"),
                                   engine=EngineSettings(engine="embedded", refiner="embedded"))
        app = create_app(settings)
        client, service = app.test_client(), app.config["model"]
        cfg = Path("backend/configs/video.xml").read_text()
        ys, xs = np.nonzero(v.masks[0] == 1)
        box = lambda t, x, y, w, h: {"frame": t, "x": x, "y": y, "width": w, "height": h, "rotation": 0, "enabled": True}
        first = box(1, 100 * xs.min() / 96, 100 * ys.min() / 72, 100 * (np.ptp(xs) + 1) / 96, 100 * (np.ptp(ys) + 1) / 72)
        the_task = {"id": 31, "data": {"video": "/data/upload/8/long.mp4"},
                    "annotations": [{"id": 3101, "result": [{"id": "r1", "from_name": "box", "to_name": "video",
                                                             "type": "videorectangle",
                                                             "value": {"sequence": [first], "labels": ["Object"]}}]}]}
        ys, xs = np.nonzero(v.masks[1200] == 1)
        moved = box(1201, 100 * xs.min() / 96, 100 * ys.min() / 72, 100 * (np.ptp(xs) + 1) / 96, 100 * (np.ptp(ys) + 1) / 72)
        region = {"id": "lazyxmem-1", "from_name": "box", "to_name": "video", "type": "videorectangle",
                  "value": {"sequence": [moved], "labels": ["Object"]}}
        t0 = time.perf_counter()
        r = client.post("/predict", json={"tasks": [the_task], "label_config": cfg,
                                          "params": {"context": {"result": [region]}}})
        latency = time.perf_counter() - t0
        print(f"\n[timing] click on frame 1201 of a {n}-frame video not held: {latency:.2f} s")
        assert r.status_code == 200, r.json
        kf = r.json["results"][0]["result"][0]["value"]["sequence"]
        assert [k["frame"] for k in kf] == [1201]
        assert max(abs(kf[0][c] - moved[c]) for c in ("x", "y", "width", "height")) < 5.0
        assert latency < 5.0, f"{latency:.1f} s for an answer about one frame"
        assert service.tasks.held(31) is None, "the request did not build the whole video"
        jobs = list(service.jobs.jobs.values())
        assert [(j["kind"], j["lane"]) for j in jobs] == [("correct", "interactive")]
        # The queued job propagates the video, applies the box and posts; frame 1201 keeps it.
        wait_jobs(service, timeout=600)
        from backend.convert import mask_box

        posted = [p["json"] for p in FakeLabelStudio.posted if p["json"].get("task") == 31]
        assert posted and posted[-1]["result"] == service.views.prediction(the_task, service.model_version)["result"]
        assert service.views.prediction(the_task, service.model_version)["revision"] == 1
        state = service.tasks.held(31)
        assert state.session.records[1200].objects[1].answered
        held_box = mask_box(state.masks()[1200] == 1)  # the mask the box gives, near the box
        assert max(abs(a - moved[c]) for a, c in zip(held_box, ("x", "y", "width", "height"))) < 5.0
        # The answer and the posted track show the box as the user drew it on that frame.
        assert max(abs(kf[0][c] - moved[c]) for c in ("x", "y", "width", "height")) < 1e-6
        track = next(r for r in posted[-1]["result"] if r["type"] == "videorectangle")["value"]["sequence"]
        at = next(k for k in track if k["frame"] == 1201)
        assert max(abs(at[c] - moved[c]) for c in ("x", "y", "width", "height")) < 1e-3  # keyframes keep 4 decimals
    finally:
        srv.shutdown()


def test_a_click_near_the_start_of_a_task_not_held_gets_the_answer_a_held_one_gets(scenes, tmp_path):
    """Not held (a restart): the frames up to the click are propagated in the request (a short
    window), so the answer is the one the server gives once it holds the whole task."""
    url, videos = scenes
    k, t, tid = 3, 4, 41
    held_client, held_service = server(url, tmp_path / "held", "embedded")
    predict(held_client, [task(k, tid)])
    held = predict(held_client, [task(k, tid)], {"result": [click(videos[k], t)]})[0]
    cold_client, cold_service = server(url, tmp_path / "cold", "embedded")
    cold = predict(cold_client, [task(k, tid)], {"result": [click(videos[k], t)]})[0]
    assert cold["result"] == held["result"]
    assert cold_service.tasks.held(tid) is None  # answered from frames 0..4 alone; the rest is queued
    wait_jobs(cold_service)
    wait_jobs(held_service)
    assert (cold_service.tasks.held(tid).masks()[t] == held_service.tasks.held(tid).masks()[t]).all()
