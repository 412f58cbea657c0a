"""Pixel-wise uncertainty of a propagator's softmax, as Lazy-XMem measures it.

Probabilities ``P`` are (N+1, H, W), background first, at frame resolution. The per-object
figures are computed on the object's bounding box grown by the dilation radius (the dilation
never leaves it), so their cost follows the object's size, not the frame's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy per pixel divided by ln(N+1), so it lies in [0, 1] whatever N is."""
    n_channels = probs.shape[0]
    if n_channels < 2:
        return np.zeros(probs.shape[1:], np.float32)
    h = np.zeros(probs.shape[1:], np.float32)
    for k in range(n_channels):
        # OpenCV's log and multiply are vectorised: several times faster than numpy's here.
        pk = np.ascontiguousarray(probs[k], dtype=np.float32)
        h += cv2.multiply(cv2.log(np.maximum(pk, np.float32(1e-12))), pk)
    h *= np.float32(-1.0 / math.log(n_channels))
    return np.clip(h, 0.0, 1.0, out=h)


def argmax_channels(probs: np.ndarray) -> np.ndarray:
    """Index of the most probable channel per pixel (first on ties, like np.argmax), by running
    comparisons: a few times faster than np.argmax over the channel axis for small N."""
    best = probs[0]
    index = np.zeros(probs.shape[1:], np.uint8 if probs.shape[0] <= 256 else np.uint16)
    for k in range(1, probs.shape[0]):
        better = probs[k] > best
        index[better] = k
        best = np.maximum(best, probs[k]) if k + 1 < probs.shape[0] else best
    return index


def dilation_size(area: int) -> int:
    """The research code's "5 percent" rule: max(2, int(sqrt(0.05 * area))) rounded up to even."""
    size = max(2, int(math.sqrt(0.05 * area)))
    return size + (size % 2)


def dilation_radius(area: int) -> float:
    """Radius of the disc R_c is grown by: a disc of diameter ``dilation_size`` centred on each
    mask pixel, i.e. everything within (size - 1) / 2 of the mask. For the smallest objects
    (size 2) that adds nothing: no dilation."""
    return (dilation_size(area) - 1) / 2.0


def uncertainty_region(mask: np.ndarray) -> np.ndarray:
    """R_c: the object's mask dilated by the size-adaptive disc (the mask itself included).

    Computed as a threshold on the distance to the mask (OpenCV's 5x5-mask Euclidean distance,
    within 2 % of exact), which costs the same whatever the disc's size; a large structuring
    element in ``cv2.dilate`` costs its area per pixel.
    """
    m_u8 = (mask != 0).astype(np.uint8)
    area = int(cv2.countNonZero(m_u8))
    radius = dilation_radius(area)
    if radius < 1 or area == 0:
        return m_u8.astype(bool)
    dist = cv2.distanceTransform(1 - m_u8, cv2.DIST_L2, cv2.DIST_MASK_5)
    return dist <= radius


@dataclass(frozen=True)
class ObjectUncertainty:
    """Uncertainty figures of one object on one frame."""

    area: int
    S: float  # masked entropy: sum of H_n over R_c / |M_c|
    click: tuple[int, int] | None  # pseudo-click (x, y): argmax EDT(M_c) * (1 - H_n)


def object_uncertainty(probs: np.ndarray, mask: np.ndarray, with_click: bool = False) -> ObjectUncertainty:
    """Masked entropy S_c of one object (0 for an empty mask), and optionally its pseudo-click."""
    m_u8 = mask.view(np.uint8) if mask.dtype == bool else (mask != 0).astype(np.uint8)
    x, y, w, h = cv2.boundingRect(m_u8)
    if w == 0 or h == 0:
        return ObjectUncertainty(0, 0.0, None)
    crop_mask = m_u8[y:y + h, x:x + w]
    area = int(cv2.countNonZero(crop_mask))
    pad = int(math.ceil(dilation_radius(area))) + 1
    y0, y1 = max(0, y - pad), min(mask.shape[0], y + h + pad)
    x0, x1 = max(0, x - pad), min(mask.shape[1], x + w + pad)
    entropy = normalised_entropy(probs[:, y0:y1, x0:x1])
    region = uncertainty_region(m_u8[y0:y1, x0:x1]).view(np.uint8)
    S = cv2.mean(entropy, mask=region)[0] * cv2.countNonZero(region) / area
    click = None
    if with_click:
        cx, cy = _weighted_interior(crop_mask, entropy[y - y0:y - y0 + h, x - x0:x - x0 + w])
        click = (x + cx, y + cy)
    return ObjectUncertainty(area, S, click)


def _weighted_interior(crop_mask: np.ndarray, entropy: np.ndarray) -> tuple[int, int]:
    # Pad by one so that the image border counts as the object's boundary.
    edt = cv2.distanceTransform(np.pad(crop_mask, 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    weight = edt * (1.0 - entropy)
    iy, ix = np.unravel_index(int(np.argmax(weight)), weight.shape)
    if weight[iy, ix] <= 0:  # everything maximally uncertain: the plain interior point
        iy, ix = np.unravel_index(int(np.argmax(edt)), edt.shape)
    return int(ix), int(iy)


def masked_entropy(entropy: np.ndarray, mask: np.ndarray) -> float:
    """S_c from a full normalised-entropy map (reference form of :func:`object_uncertainty`)."""
    area = int(np.count_nonzero(mask))
    if area == 0:
        return 0.0
    return float(entropy[uncertainty_region(mask)].sum(dtype=np.float64) / area)


def pseudo_click(mask: np.ndarray, entropy: np.ndarray) -> tuple[int, int] | None:
    """The automatic positive click argmax EDT(M_c) * (1 - H_n) as (x, y); None for an empty mask.

    The distance transform keeps the click away from the boundary; the confidence weight keeps it
    where the propagator is sure the object is.
    """
    m_u8 = (mask != 0).astype(np.uint8)
    x, y, w, h = cv2.boundingRect(m_u8)
    if w == 0 or h == 0:
        return None
    cx, cy = _weighted_interior(m_u8[y:y + h, x:x + w], entropy[y:y + h, x:x + w])
    return x + cx, y + cy


def interior_point(mask: np.ndarray) -> tuple[int, int] | None:
    """The point deepest inside a mask (argmax of its distance transform), as (x, y)."""
    return pseudo_click(mask, np.zeros(mask.shape, np.float32))
