"""The SAM refiner behind a real Label Studio 1.23.2: its image-embedding cache answers for the
task that asked, never another task of the same size.

The backend loads an official-layout SAM vit_b checkpoint with random weights (its masks mean
nothing, its code path is the real one) and refines a reviewer's clicks with it. Two tasks of one
frame size (of three in the project, all predicted in one "Retrieve predictions") are clicked on
the same frame index in turn, twice each; each answer must be what SAM gives on that task's own
frame (recomputed here from the same checkpoint), not on the other's. A vit_b encode takes about
25-35 s on two CPU cores, so the clicks share one frame index per task (the second round hits the
cache, which is what is tested), and the Lazy controller's pseudo-corrections are off (``TAU_P``)
so that propagation never calls SAM.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from ls_harness import Backend, LabelStudio, interactive_click, retrieve_predictions, start_backend, stop_process
from test_backend_e2e import brush_mask, connect, mask_iou, wait_predictions
from test_many_tasks_e2e import H, W, clips, import_scenes

pytestmark = pytest.mark.e2e
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def sam_checkpoint(e2e_dir: Path) -> Path:
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    path = e2e_dir / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sam_backend(label_studio: LabelStudio, e2e_dir: Path, sam_checkpoint: Path) -> Iterator[Backend]:
    backend = start_backend(label_studio, e2e_dir, extra_env={
        "LAZYXMEM_REFINER": "sam", "SAM_CHECKPOINT": str(sam_checkpoint), "SAM_TYPE": "vit_b",
        "TAU_P": "100", "OMP_NUM_THREADS": "2"})
    try:
        yield backend
    finally:
        stop_process(backend.proc)


def test_sam_answers_each_task_from_its_own_frame(label_studio: LabelStudio, sam_backend: Backend,
                                                  sam_checkpoint: Path) -> None:
    from label_studio_sdk.converter.brush import mask2rle

    from lazyxmem_core.sam import SamRefiner
    from lazyxmem_core.types import Click

    ls = label_studio
    scenes = clips()
    brush = lambda k, clip: {"from_name": "mask", "type": "brushlabels",  # noqa: E731
                             "value": {"format": "rle", "brushlabels": ["Object"],
                                       "rle": mask2rle(clip.masks[0].astype(np.uint8) * 255)}}
    project_id, _, ids = import_scenes(ls, "e2e-sam-cache", scenes, brush, n_items=8)
    ml_id, _ = connect(ls, project_id, sam_backend)
    assert retrieve_predictions(ls, project_id, ids).get("processed_items") == 3
    for task_id in ids:
        wait_predictions(ls, task_id, lambda ps: any(p["result"] for p in ps), sam_backend)

    t = 5  # the same frame index in both tasks: a cache keyed by index and size would mix them
    ys, xs = np.nonzero(scenes[0].masks[t])
    x, y = float(xs.mean()), float(ys.mean())
    click = {"from_name": "clicks", "to_name": "frames", "type": "keypointlabels", "item_index": t,
             "is_positive": True, "original_width": W, "original_height": H,
             "value": {"x": 100 * x / W, "y": 100 * y / H, "width": 0.5, "keypointlabels": ["Object"]}}
    answers = []
    for k in (0, 1, 0, 1):
        task_id = ids[k]
        result, _ = interactive_click(ls, ml_id, task_id, click, "sam_vit_b_cpu_click_s")
        assert [x["item_index"] for x in result] == [t], result
        answers.append(brush_mask(result[0]))

    torch.set_num_threads(2)
    here = SamRefiner(sam_checkpoint, "vit_b")
    own = [here.refine(cv2.cvtColor(c.frames[t], cv2.COLOR_BGR2RGB), [Click(min(x, W - 1), min(y, H - 1))])
           for c in scenes[:2]]
    assert mask_iou(own[0], own[1]) < 0.98, "SAM gives nearly one mask on both frames: the check would be blind"
    for i, answer in enumerate(answers):
        k = i % 2
        mine, other = mask_iou(answer, own[k]), mask_iou(answer, own[1 - k])
        assert mine > 0.99 and mine > other, f"click {i + 1}, task {ids[k]}: IoU {mine:.3f} with its own frame, " \
                                             f"{other:.3f} the other's"
