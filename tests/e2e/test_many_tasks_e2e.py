"""Several tasks of one frame size in one real Label Studio 1.23.2 project, one backend process.

"Retrieve predictions" runs on all of them at once, then a reviewer clicks on two of them in
turn through Label Studio's interactive endpoint. Every prediction and every answer must come
from its own task's frames: each is checked against its own task's objects, and must match them
better than any other task's.
"""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from ls_harness import Backend, LabelStudio, add_local_storage, create_project, import_tasks, local_file_url, \
    interactive_click, retrieve_predictions, wait_revision
from test_backend_e2e import IMAGES_XML, brush_mask, connect, mask_iou, vanishing_clip, wait_predictions

pytestmark = pytest.mark.e2e
N, W, H = 16, 428, 240


def clips() -> list:
    """Three clips of one size: a disc crossing to the right, its mirror, and a copy shifted down."""
    out = []
    for k in range(3):
        c = vanishing_clip(N, W, H, radius=28, speed=9.0, hidden=range(0), seed=20 + k)
        flip = (lambda a: a[:, ::-1]) if k == 1 else (lambda a: np.roll(a, H // 4, axis=0)) if k == 2 else (lambda a: a)
        c.frames = [np.ascontiguousarray(flip(f)) for f in c.frames]
        c.masks = [np.ascontiguousarray(flip(m)) for m in c.masks]
        out.append(c)
    return out


def import_scenes(ls: LabelStudio, title: str, scenes: list, start_region, n_items: int = N) -> tuple[int, list[dict], list[int]]:
    """A project with the image-sequence config and one task per scene (its first ``n_items``
    frames, under the project's local storage), each started by ``start_region(k, clip)`` on
    item 0; returns the project id, the imported task data and the task ids."""
    project = create_project(ls, IMAGES_XML, title=title)
    folder = add_local_storage(ls, project.id, title)
    data = []
    for k, clip in enumerate(scenes):
        urls = []
        for i, frame in enumerate(clip.frames[:n_items]):
            path = folder / f"s{k}_{i:03d}.png"
            cv2.imwrite(str(path), frame)
            urls.append(local_file_url(ls, path))
        region = {"id": f"start{k}", "to_name": "frames", "origin": "manual", "item_index": 0,
                  "original_width": W, "original_height": H, "image_rotation": 0, **start_region(k, clip)}
        data.append({"data": {"frames": urls}, "annotations": [{"result": [region]}]})
    return project.id, data, import_tasks(ls, project.id, data)


def box_start(k: int, clip) -> dict:
    x, y, w, h = cv2.boundingRect(clip.masks[0].astype(np.uint8))
    return {"from_name": "region", "type": "rectanglelabels",
            "value": {"x": 100 * (x - 2) / W, "y": 100 * (y - 2) / H, "width": 100 * (w + 4) / W,
                      "height": 100 * (h + 4) / H, "rotation": 0, "rectanglelabels": ["Object"]}}


def brush(mask: np.ndarray) -> dict:
    """A painted object: ``mask`` exactly, as Label Studio stores a brush region (RLE)."""
    rle = mask2rle(mask.astype(np.uint8) * 255)
    return {"from_name": "mask", "type": "brushlabels",
            "value": {"format": "rle", "rle": rle, "brushlabels": ["Object"]}}


def brush_start(k: int, clip) -> dict:
    """``import_scenes``' start region: the scene's object painted on item 0."""
    return brush(clip.masks[0])


def keypoint(t: int, mask: np.ndarray) -> dict:
    """A positive smart-keypoint click at the centre of ``mask`` on item ``t``, as the editor sends it."""
    ys, xs = np.nonzero(mask)
    return {"from_name": "clicks", "to_name": "frames", "type": "keypointlabels", "item_index": t,
            "is_positive": True, "original_width": W, "original_height": H,
            "value": {"x": 100 * xs.mean() / W, "y": 100 * ys.mean() / H, "width": 0.5, "keypointlabels": ["Object"]}}


def own_best(mask: np.ndarray, masks: list[np.ndarray], k: int, what: str) -> float:
    ious = [mask_iou(mask, m) for m in masks]
    assert ious[k] > 0.5 and ious[k] == max(ious) and sorted(ious)[-2] < ious[k], f"{what}: IoUs {ious}"
    return ious[k]


def test_tasks_of_one_size_in_one_project_each_get_their_own_masks(label_studio: LabelStudio,
                                                                     backend_server: Backend) -> None:
    ls = label_studio
    scenes = clips()
    project_id, data, ids = import_scenes(ls, "e2e-many-tasks", scenes, box_start)
    ml_id, _ = connect(ls, project_id, backend_server)

    t0 = time.perf_counter()
    answer = retrieve_predictions(ls, project_id, ids)  # one action on all three: one batch to the backend
    assert answer.get("processed_items") == 3, answer
    preds = {}
    for k, task_id in enumerate(ids):
        got = wait_predictions(ls, task_id, lambda ps: any(p["result"] for p in ps), backend_server)
        assert all(p["result"] for p in got), "an empty prediction was stored"
        preds[k] = next(p for p in got if p["result"])
    print(f"\n[e2e timing] three_tasks_{N}x{W}x{H}_all_predictions_s: {time.perf_counter() - t0:.2f} s")
    from backend.convert import pct_box
    from lazyxmem_core.engines import EngineSettings, build_refiner

    refiner = build_refiner(EngineSettings(engine="embedded"))  # the backend's, in this process
    for k, pred in preds.items():
        items = {r["item_index"]: brush_mask(r) for r in pred["result"] if r["type"] == "brushlabels"}
        # Item 0 is the box refined on this task's own first frame, exactly.
        box = pct_box(data[k]["annotations"][0]["result"][0]["value"], W, H, "start")
        alone = refiner.refine(cv2.cvtColor(scenes[k].frames[0], cv2.COLOR_BGR2RGB), box=box)
        assert (items[0] == alone).all(), f"task {ids[k]}: item 0 is not its own box's mask"
        for t in (0, 3, 6):  # the first items: the track itself is not what is tested here
            own_best(items[t], [c.masks[t] for c in scenes], k, f"task {ids[k]} item {t}")

    # The reviewer alternates between the first two tasks.
    latencies = []
    for k, t in [(0, 5), (1, 5), (0, 11), (1, 9)]:
        click = keypoint(t, scenes[k].masks[t])
        result, seconds = interactive_click(ls, ml_id, ids[k], click)
        latencies.append(seconds)
        assert [x["item_index"] for x in result] == [t], result
        own_best(brush_mask(result[0]), [c.masks[t] for c in scenes], k, f"answer on task {ids[k]} item {t}")
    print(f"[e2e timing] interactive_click_{W}x{H}_s: median {np.median(latencies):.3f}, max {max(latencies):.3f}")
    for k in (0, 1):  # both clicks of each task end up in its posted prediction
        wait_revision(ls, backend_server, ids[k], 2, timeout=90)
