"""Hand-computed cases for lazyxmem_core.metrics (DAVIS J & F, R@tau, workload, folder scoring)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lazyxmem_core import metrics as M


def square(shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Bool mask with rows[0]..rows[1]-1 x cols[0]..cols[1]-1 set."""
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


# --------------------------------------------------------------------------- J

def test_jaccard_overlapping_squares() -> None:
    gt = square((4, 4), (0, 2), (1, 3))
    pred = square((4, 4), (0, 2), (0, 2))
    # intersection = rows 0-1 x col 1 = 2 px; union = 4 + 4 - 2 = 6
    assert M.jaccard(pred, gt) == pytest.approx(2 / 6)


def test_jaccard_empty_cases_and_stack() -> None:
    empty, sq = np.zeros((3, 3), bool), square((3, 3), (0, 2), (0, 2))
    assert M.jaccard(empty, empty) == 1.0  # empty union
    assert M.jaccard(empty, sq) == 0.0
    assert M.jaccard(sq, empty) == 0.0
    stack = M.jaccard(np.stack([empty, sq]), np.stack([empty, sq]))
    assert isinstance(stack, np.ndarray)
    np.testing.assert_array_equal(stack, [1.0, 1.0])


def test_jaccard_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        M.jaccard(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


# --------------------------------------------------------------------------- boundaries

def test_boundary_map_small_square() -> None:
    m = square((5, 5), (1, 3), (1, 3))
    # A pixel is boundary if it differs from its right, lower or lower-right neighbour: for the
    # 2x2 block at rows/cols 1-2 that is the 3x3 box rows/cols 0-2 minus its centre (1, 1).
    expected = square((5, 5), (0, 3), (0, 3))
    expected[1, 1] = False
    np.testing.assert_array_equal(M.boundary_map(m), expected)


def test_boundary_map_border_rules() -> None:
    # Full mask: the last row/column only compare inside the image, so nothing is boundary.
    assert not M.boundary_map(np.ones((3, 3), bool)).any()
    # Only the bottom-right pixel set: it is never boundary itself; (1,1) sees it diagonally,
    # (1,2) (last column) sees it below, (2,1) (last row) sees it on the right.
    m = np.zeros((3, 3), bool)
    m[2, 2] = True
    expected = np.zeros((3, 3), bool)
    expected[1, 1] = expected[1, 2] = expected[2, 1] = True
    np.testing.assert_array_equal(M.boundary_map(m), expected)


def test_boundary_tolerance() -> None:
    assert M.boundary_tolerance((480, 854)) == 8  # 0.008 * 979.6 = 7.84
    assert M.boundary_tolerance((853, 480)) == 8  # 0.008 * 978.8 = 7.83
    assert M.boundary_tolerance((20, 20)) == 1  # 0.008 * 28.3 = 0.23
    assert M.boundary_tolerance((100, 100)) == 2  # 0.008 * 141.4 = 1.13
    assert M.boundary_tolerance((100, 100), 3) == 3  # >= 1: pixels
    with pytest.raises(ValueError):
        M.boundary_tolerance((10, 10), 2.5)


def test_f_shifted_squares() -> None:
    # 5x5 squares on a 20x20 frame (tolerance 1 px), the prediction 3 columns to the right.
    gt = square((20, 20), (5, 10), (5, 10))
    pred = square((20, 20), (5, 10), (8, 13))
    # Boundaries: 6x6 rings (20 px each), GT at cols 4..9, prediction at cols 7..12, rows 4..9.
    # r = 1 (4-neighbourhood): predicted top row x=7..10 match (4), bottom row 4, left column
    # x=7 only at y=5 and y=8 (next to GT top/bottom rows) 2, right column x=12 none:
    # P = 10/20; by mirror symmetry R = 10/20; F = 0.5.
    assert M.boundary_precision_recall(pred, gt) == (0.5, 0.5)
    assert M.f_measure(pred, gt) == pytest.approx(0.5)
    # r = 2 (offsets with x^2+y^2 <= 4): top row x=7..11 (5), bottom 5, left column all 4
    # (GT right column is 2 away), right column none: P = R = 14/20.
    assert M.f_measure(pred, gt, bound_th=2) == pytest.approx(0.7)
    # J: intersection rows 5-9 x cols 8-9 = 10, union 40.
    assert M.jaccard(pred, gt) == pytest.approx(0.25)


def test_f_identical_and_empty_cases() -> None:
    sq = square((20, 20), (5, 10), (5, 10))
    empty, full = np.zeros((20, 20), bool), np.ones((20, 20), bool)
    assert M.f_measure(sq, sq) == 1.0
    assert M.boundary_precision_recall(empty, sq) == (1.0, 0.0)  # only prediction empty
    assert M.boundary_precision_recall(sq, empty) == (0.0, 1.0)  # only GT empty
    assert M.f_measure(empty, sq) == 0.0
    assert M.f_measure(sq, empty) == 0.0
    assert M.f_measure(empty, empty) == 1.0
    assert M.f_measure(full, full) == 1.0  # full masks have no boundary either
    # Disjoint far apart: P = R = 0 -> F = 0.
    far = square((20, 20), (15, 18), (15, 18))
    assert M.f_measure(far, square((20, 20), (0, 3), (0, 3))) == 0.0


# --------------------------------------------------------------------------- statistics

def test_decay_binning() -> None:
    x = np.arange(10) / 10
    # ids = round(linspace(1, 10, 5) + 1e-10) - 1 = [0, 2, 5, 7, 9]: first bin x[0:3], last x[7:10]
    assert M.decay(x) == pytest.approx(0.1 - 0.8)
    # n = 7: linspace = [1, 2.5, 4, 5.5, 7]; the 1e-10 rounds 2.5 up, so ids = [0, 2, 3, 5, 6]:
    # first bin x[0:3] = [1, 1, 0] (2/3), last bin x[5:7] = [0, 0].
    assert M.decay([1, 1, 0, 0, 0, 0, 0]) == pytest.approx(2 / 3)
    # NaNs are skipped inside a bin.
    assert M.decay([1, np.nan, 0, 0, 0, 0, 0]) == pytest.approx(0.5)
    assert M.decay([0.7]) == 0.0
    assert math.isnan(M.decay([]))


def test_recall_and_robustness() -> None:
    assert M.recall([0.5, 0.6, np.nan]) == pytest.approx(1 / 3)  # strictly above 0.5; NaN misses
    assert M.robustness([np.nan, 0.3, 0.6], 0.25) == pytest.approx(2 / 3)  # NaN counted as 0
    assert M.robustness([0.25, 0.1], 0.25) == 0.5  # >= tau


def test_score_object_drops_first_and_last() -> None:
    gt = [np.ones((2, 2), bool)] * 5
    # Prediction has 0, 4, 2, 1, 0 pixels of the 4: J = 0, 1, 0.5, 0.25, 0.
    counts = [0, 4, 2, 1, 0]
    pred = [np.arange(4).reshape(2, 2) < k for k in counts]
    s = M.score_object(pred, gt)
    np.testing.assert_allclose(s.J, [1.0, 0.5, 0.25])
    assert s.frames == (1, 2, 3)
    assert s.J_mean == pytest.approx(7 / 12)
    assert s.J_recall == pytest.approx(1 / 3)
    # n = 3: ids = [0, 1, 1, 2, 2]: first bin [1, 0.5], last bin [0.25]
    assert s.J_decay == pytest.approx(0.75 - 0.25)
    assert s.R == pytest.approx({0.1: 1.0, 0.25: 1.0, 0.5: 2 / 3})
    with pytest.raises(ValueError, match="at least 3"):
        M.score_object(pred[:2], gt[:2])
    full = M.score_object(pred, gt, drop_ends=False)
    np.testing.assert_allclose(full.J, [0, 1, 0.5, 0.25, 0])


def test_summarize_averages_objects() -> None:
    a = M.ObjectScores(np.array([1.0, 0.5, 0.25]), np.array([1.0, 1.0, 0.0]))
    b = M.ObjectScores(np.array([0.0, 0.0, 1.0]), np.array([0.5, 0.5, 0.5]))
    s = M.summarize([a, b])
    assert tuple(s) == M.SUMMARY_KEYS
    assert s["J"] == pytest.approx((7 / 12 + 1 / 3) / 2)  # 11/24
    assert s["F"] == pytest.approx((2 / 3 + 0.5) / 2)  # 7/12
    assert s["J&F"] == pytest.approx(25 / 48)
    assert s["R@0.1"] == pytest.approx((1 + 1 / 3) / 2)
    assert s["R@0.25"] == pytest.approx((1 + 1 / 3) / 2)
    assert s["R@0.5"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert s["J-Recall"] == pytest.approx(1 / 3)  # a: 1 of 3, b: 1 of 3
    assert s["F-Recall"] == pytest.approx(1 / 3)  # a: 2/3, b: 0 (0.5 is not > 0.5)
    assert s["J-Decay"] == pytest.approx((0.5 + -1.0) / 2)  # a: 0.75-0.25, b: 0-1
    assert s["F-Decay"] == pytest.approx((1.0 + 0.0) / 2)
    assert all(math.isnan(v) for v in M.summarize([]).values())


def test_score_sequence_void_and_labels() -> None:
    gt = np.zeros((4, 4), np.uint8)
    gt[:2, :2] = 1
    gt[2:, 2:] = M.VOID_LABEL
    pred_exact = np.zeros((4, 4), np.uint8)
    pred_exact[:2, :2] = 1
    pred_on_void = pred_exact.copy()
    pred_on_void[2:, 2:] = 1  # void is background, so this is 4 false-positive pixels
    frames = [gt] * 4
    res = M.score_sequence([pred_exact, pred_exact, pred_on_void, pred_exact], frames)
    assert list(res) == [1]  # 255 is not an object
    np.testing.assert_allclose(res[1].J, [1.0, 0.5])  # frames 1 and 2 scored; 4 / 8 on frame 2
    assert res[1].frames == (1, 2)
    # An explicitly requested label that never appears: empty vs empty -> J = F = 1.
    res = M.score_sequence([pred_exact] * 3, [gt] * 3, labels=[1, 7])
    np.testing.assert_array_equal(res[7].J, [1.0])
    np.testing.assert_array_equal(res[7].F, [1.0])
    with pytest.raises(ValueError, match="void"):
        M.score_sequence([pred_exact] * 3, [gt] * 3, labels=[255])
    with pytest.raises(ValueError, match="frame 1"):
        M.score_sequence([pred_exact, pred_exact[:3], pred_exact], [gt] * 3)
    with pytest.raises(ValueError, match="one per frame"):
        M.score_sequence([pred_exact] * 2, [gt] * 3)


# --------------------------------------------------------------------------- workload

def test_workload_hand_computed() -> None:
    interactions = {"a": [4], "b": [1, 3, 3], "d": [2, 10, 5]}
    n_frames = {"a": 10, "b": 5, "c": 4, "d": 20}
    w = M.workload(interactions, n_frames)
    assert w["N_oI"] == 7  # 1 + 3 + 0 + 3 (the repeat on frame 3 counts)
    # ACI_o = (1/T) sum over gaps of (T + 1 - gap):
    #   a: points 0,4,9 gaps 4,5 -> (7 + 6)/10 = 1.3
    #   b: points 0,1,3,4 gaps 1,2,1 -> (5 + 4 + 5)/5 = 2.8
    #   c: points 0,3 gap 3 -> 2/4 = 0.5
    #   d: points 0,2,5,10,19 gaps 2,3,5,9 -> (19 + 18 + 16 + 12)/20 = 3.25
    assert w["N_dI"] == pytest.approx((1.3 + 2.8 + 0.5 + 3.25) / 4)
    # Consecutive distinct interaction frames: b 1->3 (2); d 2->5->10 (3, 5).
    assert w["dI"] == pytest.approx(10 / 3)
    assert w["interaction_rate"] == pytest.approx(100 * 7 / 39)


def test_workload_aci_matches_definition_literally() -> None:
    # ACI_o = (1/|F_o|) sum_{i=1..|F_o|} sum_{j<=i} n_j, for a = (T=10, [4]):
    # n_4 = n_5 = 1; inner sums are 0,0,0,1,2,2,2,2,2,2 -> 13 / 10.
    assert M.workload({"a": [4]}, {"a": 10})["N_dI"] == pytest.approx(1.3)


def test_workload_edge_cases() -> None:
    w = M.workload({}, {"x": 8})
    assert w["N_oI"] == 0 and w["interaction_rate"] == 0.0
    assert w["N_dI"] == pytest.approx(2 / 8)  # one gap of 7: (8 + 1 - 7)/8
    assert math.isnan(w["dI"])
    with pytest.raises(ValueError, match="outside"):
        M.workload({"x": [8]}, {"x": 8})
    with pytest.raises(ValueError, match="no frame count"):
        M.workload({"y": [1]}, {"x": 8})
    with pytest.raises(ValueError):
        M.workload({}, {})


# --------------------------------------------------------------------------- files

def save_palette(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8), "P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    im.save(path)


def save_gray(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), "L").save(path)


def test_read_index_mask_modes(tmp_path: Path) -> None:
    idx = np.array([[0, 1], [2, 255]], np.uint8)
    save_palette(tmp_path / "p.png", idx)
    np.testing.assert_array_equal(M.read_index_mask(tmp_path / "p.png"), idx)
    save_gray(tmp_path / "g.png", np.array([[0, 255], [255, 0]]))  # DAVIS 2016 single object
    np.testing.assert_array_equal(M.read_index_mask(tmp_path / "g.png"), [[0, 1], [1, 0]])
    save_gray(tmp_path / "gi.png", idx)  # grayscale indices: kept as they are
    np.testing.assert_array_equal(M.read_index_mask(tmp_path / "gi.png"), idx)
    Image.fromarray(np.array([[True, False]])).save(tmp_path / "b.png")  # mode '1'
    np.testing.assert_array_equal(M.read_index_mask(tmp_path / "b.png"), [[1, 0]])
    Image.fromarray(np.full((2, 2, 3), 7, np.uint8), "RGB").save(tmp_path / "c.png")
    with pytest.raises(ValueError, match="not a DAVIS palette colour"):
        M.read_index_mask(tmp_path / "c.png")


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    sq = square((20, 20), (5, 10), (5, 10))
    shifted = square((20, 20), (5, 10), (8, 13))
    # Sequence "a": DAVIS 2016 style (masks/ folder, grayscale 0/255), 5 frames.
    for t in range(5):
        save_gray(gt / "a" / "masks" / f"{t:05d}.png", sq * 255)
    # Prediction: flat palette; frame 0 absent (not scored), frame 4 wrong (not scored),
    # frame 2 shifted by 3 columns (J = 0.25, F = 0.5 as in test_f_shifted_squares).
    for t, m in {1: sq, 2: shifted, 3: sq, 4: ~sq}.items():
        save_palette(pred / "a" / f"{t:05d}.png", m)
    # Sequence "b": sparse palette GT on frames 0, 10, 20, 30; object 2 appears on frame 20.
    obj1, obj2 = square((20, 20), (0, 4), (0, 4)), square((20, 20), (12, 18), (12, 18))
    for t in (0, 10, 20, 30):
        g = obj1.astype(np.uint8)
        if t >= 20:
            g[obj2] = 2
        save_palette(gt / "b" / f"{t:05d}.png", g)
    # Prediction on every frame (only 10 and 20 are scored), never object 2.
    for t in range(31):
        save_palette(pred / "b" / "masks" / f"{t:05d}.png", obj1.astype(np.uint8))
    save_palette(pred / "extra" / "00000.png", obj1.astype(np.uint8))  # not in GT: ignored
    return pred, gt


def test_score_dirs(dirs: tuple[Path, Path]) -> None:
    pred, gt = dirs
    res = M.score_dirs(pred, gt)
    assert set(res["sequences"]) == {"a", "b"}
    a, b = res["sequences"]["a"], res["sequences"]["b"]
    # a: J = (1 + 0.25 + 1)/3, F = (1 + 0.5 + 1)/3
    assert a["J"] == pytest.approx(0.75)
    assert a["F"] == pytest.approx(5 / 6)
    # b: object 1 perfect; object 2 empty-vs-empty on frame 10 (J = F = 1), missed on 20 (0)
    assert b["J"] == pytest.approx(0.75)
    assert b["F"] == pytest.approx(0.75)
    assert b["R@0.5"] == pytest.approx(0.75)
    # Top level averages the 3 objects, not the 2 sequences: F = (5/6 + 1 + 0.5)/3 = 7/9.
    assert res["J"] == pytest.approx(0.75)
    assert res["F"] == pytest.approx(7 / 9)
    assert res["J&F"] == pytest.approx((0.75 + 7 / 9) / 2)


def test_score_dirs_errors(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    pred, gt = dirs
    (pred / "b" / "masks" / "00020.png").unlink()
    with pytest.raises(ValueError, match=r"'b'.*00020\.png"):
        M.score_dirs(pred, gt)
    save_palette(pred / "b" / "masks" / "00020.png", np.zeros((10, 20), np.uint8))
    with pytest.raises(ValueError, match="00020.png.*20x10"):
        M.score_dirs(pred, gt)
    save_gray(gt / "zz" / "00000.png", np.zeros((20, 20)))
    save_gray(gt / "zz" / "00001.png", np.zeros((20, 20)))
    save_gray(gt / "zz" / "00002.png", np.zeros((20, 20)))
    save_palette(pred / "b" / "masks" / "00020.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(ValueError, match="'zz'.*missing"):
        M.score_dirs(pred, gt)
    with pytest.raises(ValueError, match="no GT sequences"):
        M.score_dirs(pred, tmp_path / "pred" / "extra")
    with pytest.raises(ValueError, match="does not exist"):
        M.score_dirs(tmp_path / "nope", gt)
