import math

import numpy as np
import pytest

from lazyxmem_core.uncertainty import (
    dilation_radius, dilation_size, interior_point, masked_entropy, normalised_entropy,
    argmax_channels, object_uncertainty, pseudo_click, uncertainty_region,
)


def test_normalised_entropy_bounds():
    uniform = np.full((3, 4, 4), 1 / 3, np.float32)
    assert np.allclose(normalised_entropy(uniform), 1.0, atol=1e-6)
    onehot = np.zeros((3, 4, 4), np.float32)
    onehot[1] = 1
    assert np.allclose(normalised_entropy(onehot), 0.0)
    p = np.stack([np.full((2, 2), 0.25), np.full((2, 2), 0.75)]).astype(np.float32)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert np.allclose(normalised_entropy(p), expected, atol=1e-6)


def test_dilation_rule():
    assert dilation_size(0) == 2 and dilation_size(79) == 2
    assert dilation_size(180) == 4  # int(sqrt(9)) = 3 -> even 4
    assert dilation_size(20000) == 32  # sqrt(1000) = 31.6 -> 31 -> 32
    assert dilation_radius(50) == 0.5  # smallest objects: no dilation
    tiny = np.zeros((20, 20), bool)
    tiny[8:12, 8:12] = True
    assert (uncertainty_region(tiny) == tiny).all()
    square = np.zeros((40, 40), bool)
    square[10:30, 10:30] = True  # 400 px -> size 4 -> radius 1.5: the 8-neighbourhood
    region = uncertainty_region(square)
    assert region[9, 9] and region[9, 20] and not region[8, 20] and region.sum() == 22 * 22
    big = np.zeros((200, 200), bool)
    big[60:140, 60:140] = True  # 6400 px -> size 18 -> radius 8.5: rounded corners
    r = uncertainty_region(big)
    assert r[60, 52] and not r[60, 51] and not r[52, 52] and r[54, 54]


def test_masked_entropy_counts_the_dilated_ring_but_divides_by_the_mask():
    mask = np.zeros((100, 100), bool)
    mask[30:70, 30:70] = True  # 1600 px -> kernel 8
    entropy = np.full((100, 100), 0.5, np.float32)
    region = uncertainty_region(mask)
    assert region.sum() > mask.sum() and region[mask].all()
    S = masked_entropy(entropy, mask)
    assert S == pytest.approx(0.5 * region.sum() / 1600)
    assert S > 0.5  # can exceed the per-pixel mean: divided by the undilated area
    assert masked_entropy(entropy, np.zeros_like(mask)) == 0.0


def test_object_uncertainty_matches_the_full_frame_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (3, 60, 80)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    labels = probs.argmax(0)
    H = normalised_entropy(probs)
    for c in (1, 2):
        u = object_uncertainty(probs, labels == c, with_click=True)
        assert u.S == pytest.approx(masked_entropy(H, labels == c), rel=1e-5)
        assert u.click == pseudo_click(labels == c, H)
        assert u.area == int((labels == c).sum())


def test_pseudo_click_is_deep_inside_and_prefers_confident_pixels():
    mask = np.zeros((50, 80), bool)
    mask[10:40, 10:70] = True
    assert interior_point(mask) in {(x, y) for x in range(24, 56) for y in (24, 25)}
    entropy = np.zeros((50, 80), np.float32)
    entropy[:, :45] = 0.9  # left half uncertain
    x, y = pseudo_click(mask, entropy)
    assert x >= 45 and mask[y, x]
    assert pseudo_click(np.zeros((5, 5), bool), np.zeros((5, 5), np.float32)) is None
    edge = np.zeros((20, 20), bool)
    edge[:, :6] = True  # touching the image border: the border counts as boundary
    assert interior_point(edge)[0] in (2, 3)


def test_argmax_channels_matches_numpy_including_ties():
    rng = np.random.default_rng(1)
    for n in (2, 3, 6):
        p = rng.random((n, 30, 40)).astype(np.float32)
        p[:, :5] = 0.5  # ties: the first channel wins, as in np.argmax
        assert (argmax_channels(p) == np.argmax(p, axis=0)).all()
