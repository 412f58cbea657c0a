"""GrabCutRefiner on synthetic images: a textured disc on a differently textured background."""
from __future__ import annotations


import cv2
import numpy as np
import pytest

from lazyxmem_core.embedded.refiner import GrabCutRefiner
from lazyxmem_core.protocols import Refiner
from lazyxmem_core.types import Box, Click, FrameRef

H, W = 180, 240
CX, CY, R = 110, 90, 45


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    gt = np.zeros((H, W), np.uint8)
    cv2.circle(gt, (CX, CY), R, 1, -1)
    gt = gt.astype(bool)
    noise = rng.normal(0, 18, (H, W, 3))
    bg = np.array([60, 140, 70]) + noise  # green grass-like texture
    fg = np.array([200, 90, 60]) + cv2.GaussianBlur(noise, (0, 0), 1.0) * 1.5  # reddish
    img = np.where(gt[..., None], fg, bg)
    return np.clip(img, 0, 255).astype(np.uint8), gt


@pytest.fixture()
def ref() -> GrabCutRefiner:
    return GrabCutRefiner()


def test_protocol(ref: GrabCutRefiner) -> None:
    assert isinstance(ref, Refiner)


def test_click_inside_finds_object(ref, scene) -> None:
    img, gt = scene
    m = ref.refine(img, [Click(CX + 5, CY - 8)])
    assert m.shape == (H, W) and m.dtype == bool
    assert iou(m, gt) > 0.8


def test_positive_click_repairs_missing_part(ref, scene) -> None:
    img, gt = scene
    prior = gt.copy()
    prior[:, CX + 10:] = False  # the right part of the disc is missing
    m = ref.refine(img, [Click(CX + 30, CY)], prior=prior)
    assert iou(m, gt) > iou(prior, gt) + 0.1
    assert iou(m, gt) > 0.85


def test_negative_click_removes_false_blob(ref, scene) -> None:
    img, gt = scene
    prior = gt.copy().astype(np.uint8)
    cv2.circle(prior, (30, 30), 15, 1, -1)  # a false positive on the background
    prior = prior.astype(bool)
    m = ref.refine(img, [Click(30, 30, positive=False)], prior=prior)
    assert not m[15:46, 15:46].any()
    assert iou(m, gt) > 0.9


def test_negative_click_inside_prior_trims(ref, scene) -> None:
    img, gt = scene
    prior = gt.copy().astype(np.uint8)
    cv2.rectangle(prior, (CX + R - 5, CY - 12), (CX + R + 30, CY + 12), 1, -1)  # attached leak
    prior = prior.astype(bool)
    m = ref.refine(img, [Click(CX + R + 18, CY, positive=False)], prior=prior)
    assert not m[CY - 8:CY + 9, CX + R + 8:CX + R + 28].any()
    assert iou(m, gt) > iou(prior, gt)


def test_box_only(ref, scene) -> None:
    img, gt = scene
    m = ref.refine(img, box=Box(CX - R - 8, CY - R - 8, CX + R + 8, CY + R + 8))
    assert iou(m, gt) > 0.8


def test_no_prompt_returns_prior_and_frame_cache(ref, scene) -> None:
    img, gt = scene
    assert np.array_equal(ref.refine(img, prior=gt), gt)
    ref.refine(img, [Click(CX, CY)], frame_id=FrameRef("v", 7))
    ref.refine(img, [Click(CX + 3, CY)], frame_id=FrameRef("v", 7))
    ref.refine(img.copy(), [Click(CX, CY + 3)])  # content key: one more conversion
    ref.refine(img.copy(), [Click(CX, CY + 4)])
    assert ref._cache.misses == 2


def test_bad_inputs(ref, scene) -> None:
    img, gt = scene
    with pytest.raises(ValueError, match="outside"):
        ref.refine(img, [Click(W, 10)])
    with pytest.raises(ValueError, match="outside"):
        ref.refine(img, [Click(-1, 10)])
    with pytest.raises(ValueError, match="prior mask has shape"):
        ref.refine(img, [Click(10, 10)], prior=np.zeros((H + 1, W), bool))
    with pytest.raises(ValueError, match="does not overlap"):
        ref.refine(img, box=Box(W + 5, 0, W + 50, 20))
    with pytest.raises(ValueError, match="positive click, a box"):
        ref.refine(img, [Click(10, 10, positive=False)])
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        ref.refine(img[..., 0], [Click(10, 10)])


# ---------------------------------------------------------------- reference-guided path
def _scene_at(cx: int, cy: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The disc scene with the object at (cx, cy): red disc with a yellow patch, green ground."""
    rng = np.random.default_rng(seed)
    gt = np.zeros((H, W), np.uint8)
    cv2.circle(gt, (cx, cy), R, 1, -1)
    patch = np.zeros((H, W), np.uint8)
    cv2.circle(patch, (cx, cy), R // 3, 1, -1)
    noise = rng.normal(0, 15, (H, W, 3))
    img = np.array([60, 140, 70]) + noise
    img = np.where(gt[..., None] > 0, np.array([200, 60, 60]) + noise, img)
    img = np.where(patch[..., None] > 0, np.array([230, 220, 60]) + noise, img)
    return np.clip(img, 0, 255).astype(np.uint8), gt.astype(bool)


def _shift(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    return np.roll(np.roll(mask, dy, axis=0), dx, axis=1)


def test_reference_repairs_drifted_prior(ref) -> None:
    ref_img, ref_gt = _scene_at(100, 90, 1)
    img, gt = _scene_at(125, 95, 2)  # the object moved; the prior stayed behind
    prior = _shift(gt, -22, -4)
    click = Click(125.0, 95.0)  # the TP robot's click: the GT interior point
    m = ref.refine(img, [click], prior=prior, reference=(ref_img, ref_gt))
    assert iou(m, gt) > iou(prior, gt) + 0.15
    assert iou(m, gt) > 0.85


def test_reference_keeps_a_good_prior(ref) -> None:
    """The click lies on a distinctly coloured inner part: the result must not collapse onto it."""
    ref_img, ref_gt = _scene_at(100, 90, 1)
    img, gt = _scene_at(120, 90, 3)
    m = ref.refine(img, [Click(120.0, 90.0)], prior=gt.copy(), reference=(ref_img, ref_gt))
    assert iou(m, gt) > 0.9


def test_reference_is_deterministic(scene) -> None:
    ref_img, ref_gt = _scene_at(100, 90, 1)
    img, gt = _scene_at(125, 95, 2)
    prior = _shift(gt, -22, -4)
    a = GrabCutRefiner().refine(img, [Click(125.0, 95.0)], prior=prior, reference=(ref_img, ref_gt))
    b = GrabCutRefiner().refine(img, [Click(125.0, 95.0)], prior=prior, reference=(ref_img, ref_gt))
    assert np.array_equal(a, b)


def test_reference_edge_cases(ref, scene) -> None:
    img, gt = scene
    empty_ref = (img, np.zeros((H, W), bool))  # says nothing: the plain click path
    m = ref.refine(img, [Click(CX, CY)], prior=gt, reference=empty_ref)
    assert iou(m, gt) > 0.8
    with pytest.raises(ValueError):
        ref.refine(img, [Click(CX, CY)], prior=gt, reference=(img, np.zeros((H + 1, W), bool)))
    with pytest.raises(ValueError):
        ref.refine(img, [Click(CX, CY)], prior=gt, reference=img)  # type: ignore[arg-type]
