"""The backend end to end: gunicorn, driven by a real Label Studio 1.23.2 and its web UI.

Two projects with the shipped configs (``backend/configs``): a 100-frame 854x480 WebM video and a
30-item image sequence. Each task is imported WITH its initial region (a VideoRectangle keyframe
on frame 1, or a brush mask on item 0), the backend is registered with basic auth and "Retrieve
predictions" runs. In both clips the object vanishes for a few frames (a full occlusion): its
area collapses, which the Lazy controller's loss detector (``DETECT_LOSS``, on by default) must
flag for review. Then: an interactive click through LS's interactive-annotating endpoint, an
annotation update that reaches the backend as a webhook, the web UI, and bad requests.

Timings (time to first prediction, interactive latency) are printed (``pytest -s``) and written
to ``<e2e tmp dir>/timings.json``.
"""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from ls_harness import (Backend, LabelStudio, add_local_storage, backend_log_since, create_project,
                        import_tasks, local_file_url, open_task, register_backend, retrieve_predictions,
                        wait_for_log, wait_revision)
from synthetic import make_video, texture, write_webm

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
VIDEO_XML = (REPO / "backend" / "configs" / "video.xml").read_text()
IMAGES_XML = (REPO / "backend" / "configs" / "image_sequence.xml").read_text()
FPS = 25  # the shipped video config's frameRate
REVIEW = "Needs review"
TIMINGS: dict[str, float] = {}


# --- synthetic clips -------------------------------------------------------------------------


@dataclass
class Clip:
    frames: list[np.ndarray]  # BGR, uint8
    masks: list[np.ndarray]  # bool: the tracked object
    hidden: range  # 0-based frames where the object is gone
    decoy: np.ndarray | None = None  # bool: a still look-away object, when there is one

    @property
    def size(self) -> tuple[int, int]:  # (width, height)
        h, w = self.frames[0].shape[:2]
        return w, h


def vanishing_clip(n: int, width: int, height: int, radius: int, speed: float, hidden: range,
                   decoy: bool = False, seed: int = 0) -> Clip:
    """A textured disc crossing a textured background; it vanishes on ``hidden`` frames.

    ``decoy`` adds a still blue disc in the bottom-right corner, far from the path: a second,
    unmistakable thing an annotator's correction can point at.
    """
    bg = texture(height, width, (70, 110, 60), seed)
    skin = texture(height, width, (50, 60, 200), seed + 10, scale=4)
    decoy_skin = texture(height, width, (200, 70, 50), seed + 11, scale=4)
    still = np.zeros((height, width), np.uint8)
    if decoy:
        cv2.circle(still, (int(width * 0.85), int(height * 0.8)), int(radius * 0.7), 1, -1)
    frames, masks = [], []
    for t in range(n):
        img = bg.copy()
        img[still > 0] = decoy_skin[still > 0]
        m = np.zeros((height, width), np.uint8)
        if t not in hidden:
            cv2.circle(m, (int(width * 0.2 + speed * t), height // 2), radius, 1, -1)
            img[m > 0] = skin[m > 0]
        frames.append(img)
        masks.append(m > 0)
    return Clip(frames, masks, hidden, still > 0 if decoy else None)


# --- geometry helpers (Label Studio: percent, 1-based frames) --------------------------------


def pct_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
    if w == 0 or h == 0:
        return None
    H, W = mask.shape
    return 100 * x / W, 100 * y / H, 100 * w / W, 100 * h / H


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def track_boxes(sequence: list[dict], n: int) -> list[tuple[float, float, float, float] | None]:
    """Per-frame boxes (0-based list) as Label Studio draws a VideoRectangle: linear between
    keyframes, none after an ``enabled: false`` keyframe until the next one, the last box held."""
    kfs = sorted(sequence, key=lambda k: k["frame"])
    out: list[tuple[float, float, float, float] | None] = []
    for f in range(1, n + 1):
        before = [k for k in kfs if k["frame"] <= f]
        if not before:
            out.append(None)
            continue
        a = before[-1]
        coords = ("x", "y", "width", "height")
        if a["frame"] == f:
            out.append(tuple(float(a[c]) for c in coords))
        elif not a.get("enabled", True):
            out.append(None)
        else:
            after = [k for k in kfs if k["frame"] > f]
            if not after:
                out.append(tuple(float(a[c]) for c in coords))
            else:
                b, r = after[0], (f - a["frame"]) / (after[0]["frame"] - a["frame"])
                out.append(tuple(float(a[c]) + (float(b[c]) - float(a[c])) * r for c in coords))
    return out


def brush_mask(region: dict) -> np.ndarray:
    w, h = region["original_width"], region["original_height"]
    rgba = np.frombuffer(bytes(decode_rle(region["value"]["rle"])), np.uint8).reshape(h, w, 4)
    return rgba[..., 3] > 127


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def near(frames: set[int], hidden: range, slack: int = 2) -> bool:
    """A 1-based flagged frame at the vanishing or the return of the object."""
    window = range(hidden.start + 1, hidden.stop + 1 + slack)
    return any(f in window for f in frames)


# --- Label Studio helpers --------------------------------------------------------------------


def predictions(ls: LabelStudio, task_id: int) -> list[dict]:
    r = ls.api("GET", "/api/predictions/", params={"task": task_id})
    assert r.status_code == 200, r.text[:300]
    return sorted(r.json(), key=lambda p: p["id"])


def wait_predictions(ls: LabelStudio, task_id: int, ok: Callable[[list[dict]], bool], backend: Backend,
                     timeout: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        preds = predictions(ls, task_id)
        if ok(preds):
            return preds
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id}: no matching prediction within {timeout:.0f} s; has "
                                 f"{[(p['model_version'], len(p['result'])) for p in preds]}\n--- backend log ---\n"
                                 f"{backend_log_since(backend, 0)[-3000:]}")
        time.sleep(0.25)


def has_result(preds: list[dict]) -> bool:
    # A long video is answered "-pending" with no result and posted later; either way, wait for it.
    return any(p["result"] and not p["model_version"].endswith("-pending") for p in preds)


@dataclass
class Case:
    project_id: int
    task_id: int
    ml_id: int
    model_version: str
    annotation_id: int
    clip: Clip
    prediction: dict  # the first prediction stored in LS
    folder: Path
    urls: list[str]


def retrieve_timed(ls: LabelStudio, backend: Backend, project_id: int, task_id: int, key: str) -> dict:
    """Run the "Retrieve predictions" action; time it until a prediction with a result is stored in LS."""
    t0 = time.perf_counter()
    answer = retrieve_predictions(ls, project_id, [task_id])
    assert answer.get("processed_items") == 1, answer
    preds = wait_predictions(ls, task_id, has_result, backend)
    TIMINGS[key] = round(time.perf_counter() - t0, 2)
    print(f"\n[e2e timing] {key}: {TIMINGS[key]:.2f} s")
    return next(p for p in preds if has_result([p]))


def connect(ls: LabelStudio, project_id: int, backend: Backend) -> tuple[int, str]:
    ml = register_backend(ls, project_id, backend)  # basic auth, interactive
    ml = ls.client.ml.get(ml.id)
    assert ml.state == "CO", (ml.state, ml.error_message)
    assert ml.auth_method == "BASIC_AUTH"
    return ml.id, ml.model_version


def select_prediction(page: Any, model_version: str) -> str | None:
    """Show the prediction of ``model_version`` in the editor; the selected item's type (None: none)."""
    return page.evaluate("""mv => { const s = window.Htx.annotationStore;
        const p = s.predictions.find(p => p.createdBy === mv); if (!p) return null;
        s.selectPrediction(p.id); return s.selected.type; }""", model_version)


# --- fixtures --------------------------------------------------------------------------------

N_VIDEO, VIDEO_HIDDEN = 100, range(40, 44)
N_ITEMS, ITEMS_HIDDEN = 30, range(12, 15)


@pytest.fixture(scope="module", autouse=True)
def timings_report(e2e_dir: Path):
    yield
    if TIMINGS:
        path = e2e_dir / "timings.json"
        path.write_text(json.dumps(TIMINGS, indent=2))
        print(f"\n[e2e timing] {json.dumps(TIMINGS)} -> {path}")


@pytest.fixture(scope="module")
def video_case(label_studio: LabelStudio, backend_server: Backend) -> Case:
    ls = label_studio
    clip = vanishing_clip(N_VIDEO, 854, 480, radius=60, speed=3.0, hidden=VIDEO_HIDDEN, decoy=True, seed=2)
    project = create_project(ls, VIDEO_XML, title="e2e-video")
    folder = add_local_storage(ls, project.id, "e2e-video")
    path = folder / "clip.webm"
    write_webm(str(path), clip.frames, FPS)
    x, y, w, h = pct_box(clip.masks[0])
    region = {"id": "start", "from_name": "box", "to_name": "video", "type": "videorectangle", "origin": "manual",
              "value": {"framesCount": N_VIDEO, "duration": N_VIDEO / FPS, "labels": ["Object"],
                        "sequence": [{"frame": 1, "x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                      "enabled": True, "time": 0}]}}
    url = local_file_url(ls, path)
    task_id = import_tasks(ls, project.id, [{"data": {"video": url}, "annotations": [{"result": [region]}]}])[0]
    annotations = ls.api("GET", f"/api/tasks/{task_id}/annotations/").json()
    assert len(annotations) == 1 and annotations[0]["result"][0]["value"]["sequence"][0]["frame"] == 1, annotations
    ml_id, version = connect(ls, project.id, backend_server)
    pred = retrieve_timed(ls, backend_server, project.id, task_id, "video_100f_854x480_first_prediction_s")
    return Case(project.id, task_id, ml_id, version, annotations[0]["id"], clip, pred, folder, [url])


@pytest.fixture(scope="module")
def images_case(label_studio: LabelStudio, backend_server: Backend) -> Case:
    ls = label_studio
    clip = vanishing_clip(N_ITEMS, 854, 480, radius=60, speed=6.0, hidden=ITEMS_HIDDEN, seed=4)
    project = create_project(ls, IMAGES_XML, title="e2e-images")
    folder = add_local_storage(ls, project.id, "e2e-images")
    urls = []
    for i, frame in enumerate(clip.frames):
        path = folder / f"frame{i:03d}.png"
        cv2.imwrite(str(path), frame)
        urls.append(local_file_url(ls, path))
    w, h = clip.size
    region = {"id": "start", "from_name": "mask", "to_name": "frames", "type": "brushlabels", "origin": "manual",
              "item_index": 0, "original_width": w, "original_height": h, "image_rotation": 0,
              "value": {"format": "rle", "rle": mask2rle(clip.masks[0].astype(np.uint8) * 255),
                        "brushlabels": ["Object"]}}
    task_id = import_tasks(ls, project.id, [{"data": {"frames": urls}, "annotations": [{"result": [region]}]}])[0]
    annotations = ls.api("GET", f"/api/tasks/{task_id}/annotations/").json()
    assert len(annotations) == 1 and annotations[0]["result"][0]["item_index"] == 0, annotations
    ml_id, version = connect(ls, project.id, backend_server)
    pred = retrieve_timed(ls, backend_server, project.id, task_id, "images_30x854x480_first_prediction_s")
    return Case(project.id, task_id, ml_id, version, annotations[0]["id"], clip, pred, folder, urls)


# --- video -----------------------------------------------------------------------------------


def test_video_with_a_lookalike_distractor_crossing_gets_needs_review_spans(
        video_case: Case, label_studio: LabelStudio, backend_server: Backend) -> None:
    """The Lazy user trigger itself (not the loss detector): a same-looking disc crosses the object."""
    ls = label_studio
    crossing = make_video(n_frames=30, size=(240, 428), radius=40, distractor=True)
    path = video_case.folder / "crossing.webm"
    write_webm(str(path), [cv2.cvtColor(f, cv2.COLOR_RGB2BGR) for f in crossing.frames], FPS)
    x, y, w, h = pct_box(crossing.masks[0] == 1)
    region = {"id": "start", "from_name": "box", "to_name": "video", "type": "videorectangle", "origin": "manual",
              "value": {"labels": ["Object"], "sequence": [{"frame": 1, "x": x, "y": y, "width": w, "height": h,
                                                             "rotation": 0, "enabled": True, "time": 0}]}}
    task_id = import_tasks(ls, video_case.project_id,
                           [{"data": {"video": local_file_url(ls, path)}, "annotations": [{"result": [region]}]}])[0]
    answer = retrieve_predictions(ls, video_case.project_id, [task_id])
    assert answer.get("processed_items") == 1, answer
    pred = next(p for p in wait_predictions(ls, task_id, has_result, backend_server) if has_result([p]))
    spans = [r for r in pred["result"] if r["type"] == "timelinelabels"
             and r["value"]["timelinelabels"] == ["Needs review"]]
    assert spans and all(x["value"]["ranges"] for x in spans), pred["result"]
    assert all(1 <= rg["start"] <= rg["end"] <= 30 for x in spans for rg in x["value"]["ranges"])


def test_video_prediction_tracks_every_frame_and_flags_the_vanishing(video_case: Case) -> None:
    pred, clip = video_case.prediction, video_case.clip
    assert pred["model_version"] == video_case.model_version and video_case.model_version.startswith("lazyxmem-")
    assert pred["score"] is not None and 0.0 <= pred["score"] <= 1.0
    tracks = [r for r in pred["result"] if r["type"] == "videorectangle"]
    assert len(tracks) == 1, pred["result"]
    track = tracks[0]
    assert (track["from_name"], track["to_name"]) == ("box", "video")
    assert track["value"]["labels"] == ["Object"]  # the annotator's label is kept
    assert track["value"]["framesCount"] == N_VIDEO
    seq = track["value"]["sequence"]
    assert seq[0]["frame"] == 1 and all(k["rotation"] == 0 for k in seq)
    boxes = track_boxes(seq, N_VIDEO)
    visible = [t for t in range(N_VIDEO) if clip.masks[t].any()]
    good = [t for t in visible if boxes[t] is not None and box_iou(boxes[t], pct_box(clip.masks[t])) > 0.5]
    assert len(good) >= 0.9 * len(visible), f"{len(good)}/{len(visible)} frames tracked: {seq}"
    assert boxes[-1] is not None and box_iou(boxes[-1], pct_box(clip.masks[-1])) > 0.5  # to the last frame
    spans = [r for r in pred["result"] if r["type"] == "timelinelabels"]
    review = [r for r in spans if r["value"]["timelinelabels"] == [REVIEW]]
    assert review and all(r["from_name"] == "review" for r in review), spans
    flagged = {f for r in review for rg in r["value"]["ranges"] for f in range(rg["start"], rg["end"] + 1)}
    assert near(flagged, clip.hidden), (sorted(flagged), clip.hidden)


def test_video_prediction_renders_in_web_ui(label_studio: LabelStudio, video_case: Case, ls_page: Any,
                                            tmp_path: Path) -> None:
    page = ls_page
    open_task(page, label_studio, video_case.project_id, video_case.task_id)
    assert select_prediction(page, video_case.model_version) == "prediction"
    regions = page.evaluate("""() => window.Htx.annotationStore.selected.regions.map(r => ({type: r.type,
        labels: (r.labeling && r.labeling.selectedLabels || []).map(l => l.value), ranges: r.ranges || null,
        keyframes: r.sequence ? r.sequence.length : 0}))""")
    by_type = {r["type"]: r for r in regions}
    assert set(by_type) == {"videorectangleregion", "timelineregion"}, regions
    assert by_type["videorectangleregion"]["labels"] == ["Object"]
    assert by_type["videorectangleregion"]["keyframes"] >= 2
    # One region per review span, in the prediction's order (most uncertain first).
    expected = [rg for r in video_case.prediction["result"] if r["type"] == "timelinelabels"
                and r["value"]["timelinelabels"] == [REVIEW] for rg in r["value"]["ranges"]]
    shown = [rg for r in regions if r["type"] == "timelineregion" and r["labels"] == [REVIEW] for rg in r["ranges"]]
    assert [(r["start"], r["end"]) for r in shown] == [(r["start"], r["end"]) for r in expected], (shown, expected)
    # The player decodes the WebM, and the timeline draws a "Needs review" row per review span.
    page.wait_for_function("() => { const v = document.querySelector('video');"
                           " return v && v.readyState >= 2 && v.duration > 0; }", timeout=20_000)
    rows_js = """() => [...document.querySelectorAll('.lsf-keypoints')].map(k => ({
        name: (k.querySelector('.lsf-keypoints__name') || {}).innerText,
        spans: k.querySelectorAll('.lsf-keypoints__lifespan').length}))"""
    page.wait_for_function(f"() => ({rows_js})().some(r => r.name === {json.dumps(REVIEW)})", timeout=10_000)
    rows = page.evaluate(rows_js)
    review_rows = [r for r in rows if r["name"] == REVIEW]
    assert len(review_rows) == len(expected) and all(r["spans"] == 1 for r in review_rows), rows
    assert any(r["name"] == "Object" and r["spans"] >= 1 for r in rows), rows
    # Seek to the first flagged frame (what the annotator does next) for the screenshot.
    first = expected[0]["start"]
    page.evaluate("f => window.Htx.annotationStore.selected.names.get('video').setFrame(f)", first)
    page.wait_for_function("f => (document.querySelector('.lsf-frames-control') || {}).innerText"
                           "?.replace(/\\s+/g, ' ').startsWith(f + ' of')", arg=first, timeout=10_000)
    shot = tmp_path / f"video-task-frame-{first}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_video_annotation_update_reaches_the_backend_and_revises_later_frames(
        label_studio: LabelStudio, backend_server: Backend, video_case: Case) -> None:
    """The annotator corrects frame 60 (boxes the decoy); LS fires ANNOTATION_UPDATED to /webhook; the
    backend re-propagates from there and posts revision 1. The annotation stays as saved."""
    ls, clip, fix = label_studio, video_case.clip, 60  # 1-based
    ann = ls.api("GET", f"/api/annotations/{video_case.annotation_id}/").json()
    region = copy.deepcopy(ann["result"][0])
    x, y, w, h = pct_box(clip.decoy)
    region["value"]["sequence"].append({"frame": fix, "x": x, "y": y, "width": w, "height": h, "rotation": 0,
                                        "enabled": True, "time": (fix - 1) / FPS})
    offset = backend_server.log.stat().st_size
    r = ls.api("PATCH", f"/api/annotations/{video_case.annotation_id}/", json={"result": [region]})
    assert r.status_code == 200, r.text[:500]
    saved = r.json()
    wait_for_log(backend_server, offset, '"POST /webhook HTTP/1.1" 202')  # accepted; read back from Label Studio, then:
    log = wait_for_log(backend_server, offset, "correction on frame(s)", timeout=30)
    assert f"correction on frame(s) [{fix}]" in log, log[-2000:]
    first = video_case.prediction
    revised = wait_revision(ls, backend_server, video_case.task_id, 1, timeout=90)
    assert revised["model_version"] == first["model_version"], "every revision carries the backend's version"
    assert 0.0 <= revised["score"] <= 1.0
    old = track_boxes(next(r for r in first["result"] if r["type"] == "videorectangle")["value"]["sequence"], N_VIDEO)
    new_track = next(r for r in revised["result"] if r["type"] == "videorectangle")
    assert new_track["value"]["labels"] == ["Object"]
    new = track_boxes(new_track["value"]["sequence"], N_VIDEO)

    def diff(a, b) -> float:
        if a is None or b is None:
            return 0.0 if a is b else 100.0
        return max(abs(p - q) for p, q in zip(a, b))

    # Later frames follow the correction. Earlier frames may take the correction's backward
    # propagation (BACKWARD_REVISION), but the annotated first frame keeps its box (up to the
    # keyframe reduction's 0.5 % tolerance on either side).
    assert box_iou(new[fix - 1], (x, y, w, h)) > 0.5, new[fix - 1]
    assert sum(diff(a, b) > 5 for a, b in zip(old[fix:], new[fix:])) >= 0.8 * (N_VIDEO - fix)
    assert diff(old[0], new[0]) <= 1.0 + 1e-6
    # Nothing the backend did touched the annotator's annotation.
    anns = ls.api("GET", f"/api/tasks/{video_case.task_id}/annotations/").json()
    assert [a["id"] for a in anns] == [video_case.annotation_id]
    assert anns[0]["result"] == saved["result"] and anns[0]["updated_at"] == saved["updated_at"]
    assert anns[0]["result"][0]["value"]["sequence"][-1]["frame"] == fix


# --- image sequence --------------------------------------------------------------------------


def test_image_sequence_prediction_masks_every_item_and_marks_review(images_case: Case) -> None:
    pred, clip = images_case.prediction, images_case.clip
    assert pred["model_version"] == images_case.model_version
    assert pred["score"] is not None and 0.0 <= pred["score"] <= 1.0
    brushes = [r for r in pred["result"] if r["type"] == "brushlabels"]
    assert all(r["from_name"] == "mask" and r["to_name"] == "frames" for r in brushes)
    assert all(r["value"]["brushlabels"] == ["Object"] for r in brushes)
    by_item = {r["item_index"]: r for r in brushes}
    assert len(by_item) == len(brushes)  # one mask per item: one object
    visible = [t for t in range(N_ITEMS) if clip.masks[t].any()]
    assert set(visible) <= set(by_item), sorted(set(visible) - set(by_item))
    ious = {t: mask_iou(brush_mask(by_item[t]), clip.masks[t]) for t in visible}
    assert sum(v > 0.5 for v in ious.values()) >= 0.9 * len(visible), ious
    assert ious[N_ITEMS - 1] > 0.5, ious
    marks = [r for r in pred["result"] if r["type"] == "choices"]
    assert marks and all(r["from_name"] == "review" and "item_index" in r for r in marks), marks
    flagged = {r["item_index"] + 1 for r in marks if REVIEW in r["value"]["choices"]}
    assert near(flagged, clip.hidden), (sorted(flagged), clip.hidden)


def test_image_sequence_review_mark_renders_on_its_item(label_studio: LabelStudio, images_case: Case,
                                                        ls_page: Any, tmp_path: Path) -> None:
    page = ls_page
    open_task(page, label_studio, images_case.project_id, images_case.task_id)
    assert select_prediction(page, images_case.model_version) == "prediction"
    regions = page.evaluate("""() => window.Htx.annotationStore.selected.regions
        .filter(r => r.type === 'brushregion').map(r => r.item_index)""")
    expected = sorted(r["item_index"] for r in images_case.prediction["result"] if r["type"] == "brushlabels")
    assert sorted(regions) == expected
    item = min(r["item_index"] for r in images_case.prediction["result"]
               if r["type"] == "choices" and REVIEW in r["value"]["choices"])
    checked = """() => Object.fromEntries([...document.querySelectorAll('.lsf-choices .lsf-choice')]
        .map(c => [c.innerText.trim(), !!(c.querySelector('input') || {}).checked]))"""
    assert page.evaluate(checked).get(REVIEW) is False  # item 0 is not flagged
    page.evaluate("i => window.Htx.annotationStore.selected.names.get('frames').setCurrentImage(i)", item)
    page.wait_for_function("n => (document.querySelector('.lsf-pagination') || {}).innerText"
                           "?.replace(/\\s+/g, ' ').startsWith(n + ' of')", arg=item + 1)
    page.wait_for_function(f"() => ({checked})()[{json.dumps(REVIEW)}] === true")
    page.wait_for_selector("text=Downloading image", state="detached")  # the item's image is drawn
    shot = tmp_path / f"images-item-{item + 1}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_interactive_keypoint_through_label_studio_returns_a_refined_mask(
        label_studio: LabelStudio, backend_server: Backend, images_case: Case) -> None:
    ls, clip, item = label_studio, images_case.clip, 20
    w, h = clip.size
    ys, xs = np.nonzero(clip.masks[item])
    click = {"from_name": "clicks", "to_name": "frames", "type": "keypointlabels", "item_index": item,
             "is_positive": True, "original_width": w, "original_height": h,
             "value": {"x": 100 * xs.mean() / w, "y": 100 * ys.mean() / h, "width": 0.3, "keypointlabels": ["Object"]}}
    t0 = time.perf_counter()
    r = ls.api("POST", f"/api/ml/{images_case.ml_id}/interactive-annotating",
               json={"task": images_case.task_id, "context": {"result": [click]}})
    TIMINGS["interactive_click_854x480_s"] = round(time.perf_counter() - t0, 3)
    print(f"\n[e2e timing] interactive_click_854x480_s: {TIMINGS['interactive_click_854x480_s']:.3f} s")
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert "errors" not in body, body
    result = body["data"]["result"]
    assert result and all(x["type"] == "brushlabels" and x["item_index"] == item for x in result), result
    assert result[0]["value"]["brushlabels"] == ["Object"]
    assert mask_iou(brush_mask(result[0]), clip.masks[item]) > 0.5
    # The click also becomes a correction: the backend re-propagates and posts a revision.
    wait_revision(ls, backend_server, images_case.task_id, 1, timeout=60)
    # An empty context is a no-op, not an error.
    r = ls.api("POST", f"/api/ml/{images_case.ml_id}/interactive-annotating",
               json={"task": images_case.task_id, "context": {"result": []}})
    assert r.status_code == 200 and r.json().get("data", {}).get("result") == [], r.text[:300]


# --- bad requests straight to gunicorn -------------------------------------------------------

BAD_CONFIG = '<View><Video name="v" value="$video"/></View>'


def _bad_request(case: str, video: Case, backend: Backend) -> requests.Response:
    url, auth = backend.url, backend.auth
    task = {"id": 990001, "data": {"video": video.urls[0]}, "annotations": [{"id": 1, "result": [
        {"id": "r", "from_name": "box", "to_name": "video", "type": "videorectangle",
         "value": {"labels": ["Object"], "sequence": [{"frame": 1, "x": 10, "y": 10, "width": 20, "height": 20,
                                                       "rotation": 0, "enabled": True}]}}]}]}

    def predict(tasks: Any, config: str = VIDEO_XML, **kw: Any) -> requests.Response:
        return requests.post(f"{url}/predict", auth=kw.pop("auth", auth), timeout=60,
                             json={"tasks": tasks, "label_config": config, "project": f"{video.project_id}.1",
                                   "params": {"context": None}})

    def with_video(video_url: str) -> dict:
        return {**task, "data": {"video": video_url}}

    if case == "malformed_json":
        return requests.post(f"{url}/predict", auth=auth, data="{tasks: [", timeout=10,
                             headers={"Content-Type": "application/json"})
    if case == "tasks_not_a_list":
        return predict({"id": 1})
    if case == "task_without_data":
        return predict([{"id": 990002, "data": {"text": "hello"}}])
    if case == "frames_not_a_list":
        return predict([{"id": 990003, "data": {"frames": "frame.png"}}], IMAGES_XML)
    if case == "config_without_tags":
        return predict([task], BAD_CONFIG)
    if case == "setup_with_bad_config":
        return requests.post(f"{url}/setup", auth=auth, timeout=10,
                             json={"project": "1.1", "schema": '<View><Text name="t" value="$t"/></View>'})
    if case == "region_outside_frame":
        bad = copy.deepcopy(task)
        bad["annotations"][0]["result"][0]["value"]["sequence"][0].update(x=90, width=30)
        return predict([bad])
    if case == "undecodable_media":
        broken = video.folder / "broken.mp4"
        broken.write_bytes(b"\x00not a video" * 100)
        return predict([with_video(video.urls[0].replace("clip.webm", "broken.mp4"))])
    if case == "host_not_allowed":
        return predict([with_video("http://10.1.2.3/clip.mp4")])
    if case == "wrong_basic_auth":
        return predict([task], auth=(backend.user, "wrong-password"))
    if case == "no_basic_auth":
        return requests.post(f"{url}/predict", json={"tasks": [task]}, timeout=10)
    if case == "webhook_without_task":
        return requests.post(f"{url}/webhook", timeout=10,
                             json={"action": "ANNOTATION_UPDATED", "annotation": {"id": 1, "result": []}})
    raise AssertionError(case)


@pytest.mark.parametrize("case, status, message", [
    ("malformed_json", 400, "must be a JSON object"),
    ("tasks_not_a_list", 400, "non-empty list of task objects"),
    ("task_without_data", 422, "no data field 'video'"),
    ("frames_not_a_list", 422, "non-empty list of image URLs"),
    ("config_without_tags", 400, "has no <VideoRectangle"),
    ("setup_with_bad_config", 400, "neither a <Video> tag nor an <Image"),
    ("region_outside_frame", 422, "lies outside the frame"),
    ("undecodable_media", 422, "cannot decode video"),
    ("host_not_allowed", 422, "is not allowed for media downloads"),
    ("wrong_basic_auth", 401, "basic auth"),
    ("no_basic_auth", 401, "basic auth"),
    ("webhook_without_task", 400, "project must be an object with an 'id'"),
])
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(backend_server: Backend, video_case: Case,
                                                                case: str, status: int, message: str) -> None:
    r = _bad_request(case, video_case, backend_server)
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["Content-Type"].startswith("application/json")
    assert message in r.json()["error"], r.json()
    health = requests.get(f"{backend_server.url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "UP"
    assert backend_server.proc.poll() is None
