"""Embedded (classical) propagator on synthetic videos: tracking, memory, state and input checks."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from lazyxmem_core.embedded import EmbeddedPropagator
from lazyxmem_core.protocols import Propagator


def _texture(rng: np.random.Generator, h: int, w: int, base: tuple[int, int, int], amp: float) -> np.ndarray:
    noise = rng.normal(0.0, 1.0, (h, w, 3)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), 2.0)
    noise /= noise.std() + 1e-6
    return np.clip(np.array(base, np.float32) + amp * noise, 0, 255)


def make_video(
    n: int = 12,
    size: tuple[int, int] = (96, 128),
    objects: tuple[dict, ...] = ({"centre": (48, 40), "velocity": (0.5, 3.0), "radius": 16, "colour": (200, 60, 50)},),
    pan: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Textured discs (label i+1) moving over a textured, panning background: frames and GT masks."""
    rng = np.random.default_rng(seed)
    h, w = size
    margin = int(4 + n * max(abs(pan[0]), abs(pan[1])))
    bg = _texture(rng, h + 2 * margin, w + 2 * margin, (90, 140, 90), 30.0)
    textures = [_texture(rng, h, w, o["colour"], 25.0) for o in objects]
    frames, masks = [], []
    yy, xx = np.mgrid[0:h, 0:w]
    for t in range(n):
        oy, ox = int(round(margin + pan[0] * t)), int(round(margin + pan[1] * t))
        img = bg[oy : oy + h, ox : ox + w].copy()
        mask = np.zeros((h, w), np.uint8)
        for i, o in enumerate(objects):
            cy = o["centre"][0] + o["velocity"][0] * t
            cx = o["centre"][1] + o["velocity"][1] * t
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= o["radius"] ** 2
            img[inside] = textures[i][inside]
            mask[inside] = i + 1
        frames.append(img.astype(np.uint8))
        masks.append(mask)
    return frames, masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def run(prop: EmbeddedPropagator, frames, given: dict[int, np.ndarray]) -> list[np.ndarray]:
    out = []
    for t, f in enumerate(frames):
        out.append(prop.step(f, given.get(t)))
        prop.commit()
    return out


def test_is_a_propagator() -> None:
    assert isinstance(EmbeddedPropagator(), Propagator)


def test_tracks_a_moving_textured_object() -> None:
    frames, masks = make_video()
    probs = run(EmbeddedPropagator(), frames, {0: masks[0]})
    ious = [iou(p.argmax(0) == 1, m == 1) for p, m in zip(probs[1:], masks[1:])]
    assert min(ious) > 0.75 and np.mean(ious) > 0.85, ious


def test_probabilities_shape_dtype_and_sum() -> None:
    frames, masks = make_video(n=4)
    for p in run(EmbeddedPropagator(), frames, {0: masks[0]}):
        assert p.shape == (2, 96, 128) and p.dtype == np.float32
        assert np.all(p >= 0) and np.all(p <= 1)
        np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-4)


def test_uncertainty_is_soft_at_the_boundary_and_hard_inside() -> None:
    frames, masks = make_video(n=5)
    p = run(EmbeddedPropagator(), frames, {0: masks[0]})[-1][1]
    inner = cv2.erode(masks[-1], np.ones((9, 9), np.uint8)) > 0
    far = cv2.dilate(masks[-1], np.ones((15, 15), np.uint8)) == 0
    edge = cv2.morphologyEx(masks[-1], cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    assert p[inner].mean() > 0.95 and p[far].mean() < 0.05
    assert np.abs(p[edge] - 0.5).mean() < 0.35  # boundary pixels are not hard 0/1


def test_two_objects_with_sparse_labels() -> None:
    objs = (
        {"centre": (30, 30), "velocity": (1.0, 2.5), "radius": 12, "colour": (210, 50, 50)},
        {"centre": (66, 100), "velocity": (-0.5, -2.5), "radius": 14, "colour": (40, 60, 210)},
    )
    frames, masks = make_video(objects=objs)
    given = np.where(masks[0] == 1, 3, np.where(masks[0] == 2, 7, 0)).astype(np.uint8)
    prop = EmbeddedPropagator()
    probs = run(prop, frames, {0: given})
    assert prop.labels == [3, 7]
    for p, m in zip(probs[1:], masks[1:]):
        pred = p.argmax(0)
        assert iou(pred == 1, m == 1) > 0.7 and iou(pred == 2, m == 2) > 0.7


def test_object_added_on_a_later_frame() -> None:
    objs = (
        {"centre": (30, 30), "velocity": (0.5, 2.0), "radius": 12, "colour": (210, 50, 50)},
        {"centre": (66, 100), "velocity": (0.0, -2.0), "radius": 13, "colour": (40, 60, 210)},
    )
    frames, masks = make_video(objects=objs)
    prop = EmbeddedPropagator()
    first = (masks[0] == 2).astype(np.uint8) * 5  # label 5 first, label 2 (lower) added later
    later = (masks[4] == 1).astype(np.uint8) * 2
    probs = run(prop, frames, {0: first, 4: later})
    assert prop.labels == [2, 5]
    assert probs[3].shape[0] == 2 and probs[4].shape[0] == 3
    # On the given frame the new object is exactly the given mask; the old one keeps tracking.
    assert np.array_equal(probs[4][1] > 0.5, masks[4] == 1)
    for p, m in zip(probs[5:], masks[5:]):
        pred = p.argmax(0)
        assert iou(pred == 1, m == 1) > 0.7 and iou(pred == 2, m == 2) > 0.7


def test_snapshot_restore_replays_exactly() -> None:
    frames, masks = make_video(n=10)
    prop = EmbeddedPropagator()
    for t in range(5):
        prop.step(frames[t], masks[0] if t == 0 else None)
        if t < 4:
            prop.commit()
    state = prop.snapshot()  # between step and commit
    first = []
    prop.commit()
    for f in frames[5:]:
        first.append(prop.step(f))
        prop.commit(write=len(first) % 2 == 0)
    prop.restore(state)
    prop.commit()
    for i, f in enumerate(frames[5:]):
        np.testing.assert_array_equal(prop.step(f), first[i])
        prop.commit(write=(i + 1) % 2 == 0)


def test_deterministic() -> None:
    frames, masks = make_video(n=6)
    a = run(EmbeddedPropagator(), frames, {0: masks[0]})
    b = run(EmbeddedPropagator(), frames, {0: masks[0]})
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_idu_repairs_a_drifted_track() -> None:
    frames, masks = make_video(n=14)
    prop = EmbeddedPropagator()
    run(prop, frames[:5], {0: masks[0]})
    prop.step(frames[5])
    state = prop.snapshot()
    drifted = cv2.erode(masks[5], np.ones((21, 21), np.uint8))  # drifted: a sliver of the object
    prop.commit(drifted)
    bad = [iou(p.argmax(0) == 1, m == 1) for p, m in zip(run(prop, frames[6:], {}), masks[6:])]
    prop.restore(state)
    assert prop.commit(masks[5], write=True) is True  # IDU: the corrected mask
    good = [iou(p.argmax(0) == 1, m == 1) for p, m in zip(run(prop, frames[6:], {}), masks[6:])]
    assert np.mean(good) > np.mean(bad) + 0.3 and np.mean(good) > 0.8


def test_committing_its_own_prediction_changes_nothing_and_a_correction_only_where_it_differs() -> None:
    # Working resolution below the frame's: the committed full-size mask must be brought down
    # without moving the boundary pixels the propagator predicted itself.
    frames, masks = make_video(n=8)
    a, b = EmbeddedPropagator(work_size=64), EmbeddedPropagator(work_size=64)
    for t in range(4):
        pa = a.step(frames[t], masks[0] if t == 0 else None)
        b.step(frames[t], masks[0] if t == 0 else None)
        a.commit()
        b.commit(mask=pa.argmax(0).astype(np.uint8))  # the same prediction, at full size
    np.testing.assert_array_equal(a.snapshot()["prev"]["mask"], b.snapshot()["prev"]["mask"])
    np.testing.assert_array_equal(a.step(frames[4]), b.step(frames[4]))

    probs = b.snapshot()["pending"]["probs"]  # frame 4 at the working size (48 x 64)
    own = probs.argmax(0)
    pred = EmbeddedPropagator._upsample(probs, *frames[4].shape[:2]).argmax(0).astype(np.uint8)
    pred[:20, :20] = 1  # a correction in the top-left corner only
    b.commit(mask=pred)
    small = b.snapshot()["prev"]["mask"]
    assert (small[:9, :9] == 1).all()  # 20 px of 96 -> 10 of 48
    np.testing.assert_array_equal(small[12:, 12:], own[12:, 12:])


def test_memory_schedule_and_veto() -> None:
    frames, masks = make_video(n=14)
    prop = EmbeddedPropagator(mem_every=3)
    prop.step(frames[0], masks[0])
    assert prop.commit() is True  # a given frame is always written
    written = []
    for t in range(1, 7):
        prop.step(frames[t])
        written.append(prop.commit())
    assert written == [False, False, True, False, False, True]
    prop.step(frames[7])
    assert prop.commit(write=False) is False  # UDU veto: not counted as accepted
    prop.step(frames[8])
    assert prop.commit() is False
    prop.step(frames[9])
    assert prop.commit() is False
    prop.step(frames[10])
    assert prop.commit() is True
    prop.step(frames[11])
    assert prop.commit(write=True) is True  # IDU restarts the schedule
    prop.step(frames[12])
    assert prop.commit() is False


@pytest.mark.parametrize("size", [(37, 53), (131, 61), (501, 333)])
def test_odd_and_portrait_frame_sizes(size: tuple[int, int]) -> None:
    h, w = size
    r = max(5, min(h, w) // 6)
    obj = ({"centre": (h / 2, w / 3), "velocity": (0.3, 1.0), "radius": r, "colour": (220, 200, 40)},)
    frames, masks = make_video(n=5, size=size, objects=obj, pan=(0.5, 0.0))
    probs = run(EmbeddedPropagator(), frames, {0: masks[0]})
    for p, m in zip(probs, masks):
        assert p.shape == (2, h, w) and p.dtype == np.float32
        np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-4)
    assert iou(probs[-1].argmax(0) == 1, masks[-1] == 1) > 0.6


def test_object_leaving_and_returning_stays_sane() -> None:
    obj = ({"centre": (48, 100), "velocity": (0.0, 6.0), "radius": 10, "colour": (220, 40, 200)},)
    frames, masks = make_video(n=8, objects=obj)
    # It leaves on the right, the video holds still, then it comes back the way it left.
    probs = run(EmbeddedPropagator(), frames + [frames[-1]] * 3 + frames[::-1], {0: masks[0]})
    for p in probs:
        assert np.isfinite(p).all()
        np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-4)
    assert (probs[9].argmax(0) == 1).sum() < 20  # gone: no hallucinated object
    assert iou(probs[-1].argmax(0) == 1, masks[0] == 1) > 0.3


def test_bad_input_is_rejected() -> None:
    frames, masks = make_video(n=3)
    prop = EmbeddedPropagator()
    with pytest.raises(ValueError, match="first frame"):
        prop.step(frames[0])
    with pytest.raises(ValueError, match="first frame"):
        prop.step(frames[0], np.zeros_like(masks[0]))
    with pytest.raises(ValueError, match="uint8"):
        prop.step(frames[0].astype(np.float32), masks[0])
    with pytest.raises(ValueError, match="shape"):
        prop.step(frames[0], masks[0][:-1])
    prop.step(frames[0], masks[0])
    with pytest.raises(RuntimeError):
        prop.step(frames[1])
    with pytest.raises(ValueError, match="labels"):
        prop.commit(masks[0] * 9)
    prop.commit()
    with pytest.raises(ValueError, match="differs"):
        prop.step(frames[1][:-2])
    with pytest.raises(ValueError, match="anchor_weight"):
        EmbeddedPropagator(anchor_weight=1.5)


def test_anchor_weight_reaches_the_colour_models() -> None:
    frames, masks = make_video(n=8)
    prop = EmbeddedPropagator(anchor_weight=0.9, mem_every=2)
    for i, f in enumerate(frames):
        prop.step(f, masks[0] if i == 0 else None)
        prop.commit()
    models = prop.snapshot()["models"]
    assert {m.anchor_weight for m in models.values()} == {0.9}
    assert all(m.anchors and m.recent for m in models.values())  # both kinds of memory were written
