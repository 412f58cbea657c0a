"""SAM 2.1 as the engine (``LAZYXMEM_ENGINE=sam2``) behind a real Label Studio 1.23.2, on the CPU.

The backend runs under gunicorn on an official-layout SAM 2.1 tiny checkpoint with random weights
(its masks mean nothing; every code path is the real one): SAM 2 propagates and, with no SAM or
SAM-HQ checkpoint, refiner ``auto`` is the SAM 2.1 image predictor on the same weights. One
image-sequence task, started from a mask painted on item 0, goes through what a reviewer does:
"Retrieve predictions" gives a mask on every item; a smart-keypoint click on a later item is
answered with SAM 2's own mask on that item (recomputed here from the same checkpoint, and checked
to differ from what GrabCut gives, so no other refiner can pass); the click re-propagates (revision 1);
the submitted annotation, which keeps the answer and paints one more item, reaches the backend as
a webhook and re-propagates again (revision 2).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
import requests

from ls_harness import (Backend, LabelStudio, backend_log_since, interactive_click, retrieve_predictions, serving_backend,
                        wait_for_log, wait_revision)
from test_backend_e2e import brush_mask, connect, has_result, mask_iou, wait_predictions
from test_many_tasks_e2e import H, W, brush, brush_start, clips, import_scenes, keypoint

pytestmark = pytest.mark.e2e
torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

# 0-based items: the sequence, the item clicked on, the item painted in the submitted annotation.
N_ITEMS, CLICKED, PAINTED = 8, 5, 7


@pytest.fixture(scope="module")
def sam2_checkpoint(e2e_dir: Path) -> Path:
    from lazyxmem_core.sam2.model import build_model

    path = e2e_dir / "sam2.1_hiera_tiny_random.pt"  # 156 MB, like the official tiny file
    torch.save({"model": build_model("tiny", 1024, seed=0).state_dict()}, path)  # the official layout
    return path


@pytest.fixture(scope="module")
def sam2_backend(label_studio: LabelStudio, e2e_dir: Path, sam2_checkpoint: Path) -> Iterator[Backend]:
    # Kept cheap on the CPU: SAM 2 propagates at 256 (SAM2_IMAGE_SIZE) instead of 1024, about 1 s
    # a frame. The refiner cannot go lower: it is a 1024 twin of the model sharing its weights and
    # encodes a frame at 1024 (4-10 s on two cores), so the test makes one click and starts from
    # and corrects with painted masks, which take no refiner; TAU_P=100 keeps the Lazy
    # controller's pseudo-corrections (a refiner call per triggered frame) off. The refiner is
    # pinned to auto and the SAM / SAM-HQ checkpoints to unset ("" is unset), whatever this
    # shell has, so auto has to resolve to SAM 2's own image predictor.
    with serving_backend(label_studio, e2e_dir, extra_env={
            "LAZYXMEM_ENGINE": "sam2", "SAM2_CHECKPOINT": str(sam2_checkpoint), "SAM2_TYPE": "tiny",
            "SAM2_IMAGE_SIZE": "256", "LAZYXMEM_REFINER": "auto", "SAM_CHECKPOINT": "", "SAM_HQ_CHECKPOINT": "",
            "TAU_P": "100", "OMP_NUM_THREADS": "2"}) as backend:
        yield backend


def brushes(prediction: dict) -> dict:
    """A prediction's masks by item (one object: one brush per item)."""
    regions = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    out = {r["item_index"]: brush_mask(r) for r in regions}
    assert len(out) == len(regions), "two masks on one item"
    return out


def test_sam2_engine_preannotates_answers_clicks_and_repropagates(label_studio: LabelStudio, sam2_backend: Backend,
                                                                  sam2_checkpoint: Path) -> None:
    from lazyxmem_core.engines import EngineSettings, build_refiner
    from lazyxmem_core.sam2 import SAM2Refiner
    from lazyxmem_core.types import Click

    ls, backend, t0 = label_studio, sam2_backend, time.perf_counter()
    health = requests.get(backend.url + "/health", timeout=5).json()
    assert (health["engine"], health["refiner"]) == ("sam2", "sam2"), health
    scene = clips()[0]
    project_id, _, (task_id,) = import_scenes(ls, "e2e-sam2", [scene], brush_start, n_items=N_ITEMS)
    ml_id, version = connect(ls, project_id, backend)
    assert version.endswith("-sam2"), version

    # 1. Pre-annotation: a mask on every item, the painted one on item 0 as it was painted.
    assert retrieve_predictions(ls, project_id, [task_id]).get("processed_items") == 1
    first = next(p for p in wait_predictions(ls, task_id, has_result, backend) if has_result([p]))
    print(f"\n[e2e timing] sam2_tiny_256_{N_ITEMS}x{W}x{H}_first_prediction_s: {time.perf_counter() - t0:.1f}")
    assert first["model_version"] == version
    masks = brushes(first)
    assert sorted(masks) == list(range(N_ITEMS)), sorted(masks)
    assert (masks[0] == scene.masks[0]).all()
    log = backend_log_since(backend, 0)
    assert "engine sam2, refiner sam2" in log and "no-weights" not in log, log[-3000:]  # the start-up line
    assert f"engine: SAM 2.1 tiny ({sam2_checkpoint}) at 256 on cpu" in log, log[-3000:]
    assert "refiner: SAM 2.1 image predictor on the propagator's weights" in log, log[-3000:]

    # 2. A click on a later item, through Label Studio's interactive endpoint.
    click = keypoint(CLICKED, scene.masks[CLICKED])
    result, _ = interactive_click(ls, ml_id, task_id, click, "sam2_tiny_1024_cpu_click_s", timeout=180)
    assert [(x["type"], x["item_index"]) for x in result] == [("brushlabels", CLICKED)], result
    answer = brush_mask(result[0])
    # The same pixel the backend clicks (backend/convert.py: percent of the width and height).
    v = click["value"]
    at = [Click(min(v["x"] * W / 100, W - 1), min(v["y"] * H / 100, H - 1))]
    frame = cv2.cvtColor(scene.frames[CLICKED], cv2.COLOR_BGR2RGB)
    torch.set_num_threads(2)
    # What SAM2ImagePredictor gives on that frame: built as the backend builds it (a 256 model of
    # the checkpoint, its 1024 twin for the predictor).
    sam2 = SAM2Refiner.from_checkpoint(sam2_checkpoint, "tiny", image_size=256).refine(frame, at)
    grabcut = build_refiner(EngineSettings(engine="embedded", refiner="embedded")).refine(frame, at)
    assert mask_iou(sam2, grabcut) < 0.9, "SAM 2 and GrabCut agree: the check below would not tell them apart"
    # Exactly: one deterministic computation (same weights, frame, click and thread count) on one machine.
    assert (answer == sam2).all(), f"the answer is not SAM 2's mask: {(answer != sam2).sum()} pixels differ, " \
                                   f"IoU {mask_iou(answer, sam2):.3f}"

    # 3a. The click is a correction: the backend re-propagates and posts revision 1 with the answer on its item.
    r1 = brushes(wait_revision(ls, backend, task_id, 1))
    assert (r1[CLICKED] == answer).all() and (r1[0] == scene.masks[0]).all()

    # 3b. The annotator submits: the answer kept, one more item painted. Only the painted item
    # differs from the prediction, so only it is a correction, and revision 2 carries both.
    annotation = ls.api("GET", f"/api/tasks/{task_id}/annotations/").json()[0]
    start = annotation["result"][0]
    painted = {**start, **brush(scene.masks[PAINTED]), "id": "painted", "item_index": PAINTED}
    offset = backend.log.stat().st_size
    r = ls.api("PATCH", f"/api/annotations/{annotation['id']}/", json={"result": [start, result[0], painted]})
    assert r.status_code == 200, r.text[:500]
    wait_for_log(backend, offset, '"POST /webhook HTTP/1.1" 202')  # accepted; read back from Label Studio, then:
    log = wait_for_log(backend, offset, "correction on frame(s)", timeout=30)
    assert f"correction on frame(s) [{PAINTED + 1}]" in log, log[-2000:]
    r2 = brushes(wait_revision(ls, backend, task_id, 2))
    assert (r2[PAINTED] == scene.masks[PAINTED]).all() and (r2[CLICKED] == answer).all()
    assert (r2[0] == scene.masks[0]).all() and sorted(r2) == list(range(N_ITEMS)), sorted(r2)
    print(f"[e2e timing] sam2_e2e_total_s: {time.perf_counter() - t0:.1f}")
