"""Simulated users for evaluation (metrics.md): the paper's TP robot, the error-region robot, and
a box robot (the object's bounding box: what a Label Studio video reviewer corrects)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import cv2
import numpy as np

from .lazy import UserRequest
from .types import Box, Click, Correction
from .uncertainty import interior_point


def tp_click(gt: np.ndarray, pred: np.ndarray) -> Click | None:
    """One positive click at the interior point of the GT object; if the object is absent, one
    negative click at the interior point of the prediction (None when both are empty)."""
    point = interior_point(gt)
    if point is not None:
        return Click(float(point[0]), float(point[1]), True)
    point = interior_point(pred)
    if point is not None:
        return Click(float(point[0]), float(point[1]), False)
    return None


def error_click(gt: np.ndarray, pred: np.ndarray) -> Click | None:
    """One click at the interior point of the largest error region: positive on a false negative,
    negative on a false positive (None when the prediction is exact)."""
    best: tuple[int, np.ndarray, bool] | None = None
    for region, positive in ((gt & ~pred, True), (pred & ~gt, False)):
        if not region.any():
            continue
        n, comp, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
        k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        area = int(stats[k, cv2.CC_STAT_AREA])
        if best is None or area > best[0]:
            best = (area, comp == k, positive)
    if best is None:
        return None
    point = interior_point(best[1])
    assert point is not None
    return Click(float(point[0]), float(point[1]), best[2])


def gt_box(gt: np.ndarray) -> Box | None:
    """The GT object's bounding box (what a Label Studio video reviewer drags the box to), None
    when the object is absent."""
    ys, xs = np.nonzero(gt)
    if ys.size == 0:
        return None
    return Box(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


Robot = Literal["tp", "error", "box"]
CorrectionMode = Literal["refiner", "oracle"]


def simulated_user(gt: Mapping[int, np.ndarray], robot: Robot = "tp", correction: CorrectionMode = "refiner",
                   ) -> Callable[[UserRequest], Correction | None]:
    """A user callback answering requests from ground-truth index masks {frame: (H, W)}.

    Frames without ground truth get no answer (the request stays open).
    """
    pick = tp_click if robot == "tp" else error_click

    def answer(req: UserRequest) -> Correction | None:
        gt_frame = gt.get(req.frame_index)
        if gt_frame is None:
            return None
        gt_mask = gt_frame == req.label
        if correction == "oracle":
            return Correction(mask=gt_mask)
        if robot == "box":
            box = gt_box(gt_mask)
            return None if box is None else Correction(box=box)
        click = pick(gt_mask, req.mask)
        return None if click is None else Correction(clicks=(click,))

    return answer
