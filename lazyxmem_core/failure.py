"""Object-level failure signal: what the masked entropy S cannot see.

S is an average over the current mask's own pixels, so an object that is slowly lost (the mask
shrinks onto a confident part of it, or slides onto background of the same colour) looks *more*
certain as it goes. The figures here compare the current mask with the object's last human-made
mask (its anchor: the given mask or the latest user correction), from what every propagator
gives: the frame, the mask and the object's probability channel.

* ``shrink`` / ``growth``: |log| of the area against the anchor's;
* ``left_behind``: how much of the ring around the mask the anchor's colour model calls object,
  beyond what it called object around the anchor itself (a mask that shrank onto part of the
  object has the rest of it right outside);
* ``foreign``: the share of the mask whose colour the anchor's background explains better than
  its object, beyond that share on the anchor itself (a mask that slid onto other things);
* ``coverage``: 1 - histogram intersection of the mask's colours with the anchor's (a mask that
  kept only some of the object's colours);
* ``fragments``: the share of the mask outside its largest connected piece;
* ``spill``: object probability outside the mask, per mask pixel (the propagator's doubt about
  where the object is, which S's small dilation ring does not reach).

:func:`failure_score` weighs them into one number, 0 for an object that looks like its anchor,
added to S by the Lazy controller when ``LazyConfig.score == "combined"``. The weights were fitted
by cross-validation on the development data (``bench/failure_fit.py``), not per sequence.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np

# Coarse Lab quantisation (4 lightness x 8 x 8 chroma): histograms of a few thousand pixels stay
# well filled; lightness is coarse because shading changes it along a video.
_L, _A, _B = 4, 8, 8
NBINS = _L * _A * _B
# Colour statistics are taken on frames shrunk to this long side: enough for histograms, cheap.
WORK_SIDE = 320
FEATURES: tuple[str, ...] = ("shrink", "growth", "left_behind", "foreign", "coverage", "fragments", "spill")
# Weights of failure_score: fitted (bench/failure_fit.py: coordinate ascent of the pooled
# Spearman of S + F with 1 - IoU) on the 10 development sequences and the 10 composites, without
# interaction, embedded engine (floor_logit -4). Fitted on one fold and scored on the other, S + F
# reached 0.89 on the DAVIS sequences (S alone 0.64) and 0.86 on the composites (S alone 0.06);
# with the current propagator (floor_logit -2.5) 0.75 (S 0.65) and 0.80 (S 0.08). Every feature
# is >= 0, so is the score; its scale is S's times about 5, so F dominates where they disagree.
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "shrink": 0.5, "growth": 1.0, "left_behind": 1.0, "foreign": 4.0, "coverage": 8.0, "fragments": 0.0, "spill": 0.25,
}


def colour_index(rgb: np.ndarray) -> np.ndarray:
    """Joint Lab bin (H, W) int32 of an RGB uint8 image, in [0, NBINS)."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    return (((lab[..., 0] >> 6).astype(np.int32) * _A + (lab[..., 1] >> 5)) * _B + (lab[..., 2] >> 5)).astype(np.int32)


def _hist(bins: np.ndarray, sel: np.ndarray) -> np.ndarray | None:
    values = bins[sel]
    if values.size == 0:
        return None
    h = np.bincount(values, minlength=NBINS).astype(np.float64)
    return h / h.sum()


def _ring(mask_u8: np.ndarray, area: int) -> np.ndarray:
    """The band around a mask, as wide as a third of the object's size (at least 3 px)."""
    width = max(3.0, 0.33 * math.sqrt(max(area, 1)))
    dist = cv2.distanceTransform(1 - mask_u8, cv2.DIST_L2, cv2.DIST_MASK_3)
    return (dist > 0) & (dist <= width)


@dataclass(frozen=True)
class Frame:
    """A frame prepared once for every object on it: colour bins at the working size."""

    bins: np.ndarray
    scale: float  # working size / frame size

    @classmethod
    def prepare(cls, rgb: np.ndarray) -> Frame:
        h, w = rgb.shape[:2]
        scale = min(1.0, WORK_SIDE / max(h, w))
        small = rgb if scale == 1.0 else cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                     interpolation=cv2.INTER_AREA)
        return cls(colour_index(small), scale)

    def shrink(self, mask: np.ndarray) -> np.ndarray:
        """A full-size mask at the working size, as uint8 0/1."""
        h, w = self.bins.shape
        m = mask.view(np.uint8) if mask.dtype == bool else (mask != 0).astype(np.uint8)
        if m.shape == (h, w):
            return m
        return (cv2.resize(m * np.uint8(255), (w, h), interpolation=cv2.INTER_AREA) >= 128).astype(np.uint8)


@dataclass(frozen=True)
class Anchor:
    """What the object looked like where a human last drew it."""

    area: int  # pixels at frame resolution
    obj: np.ndarray  # colour histogram of the object
    bg: np.ndarray  # colour histogram of the ring around it
    ring_object: float  # share of that ring the object's colours explain better than the ring's
    foreign: float  # share of the object the ring's colours explain better (its own baseline)

    @classmethod
    def from_mask(cls, frame: Frame, mask: np.ndarray) -> Anchor | None:
        """None when the mask is empty (nothing to compare with)."""
        area = int(np.count_nonzero(mask))
        m = frame.shrink(mask)
        obj = _hist(frame.bins, m > 0)
        if area == 0 or obj is None:
            return None
        ring = _ring(m, int(m.sum()))
        bg = _hist(frame.bins, ring)
        if bg is None:  # the object fills the frame
            bg = np.full(NBINS, 1.0 / NBINS)
        anchor = cls(area, obj, bg, 0.0, 0.0)
        values = frame.bins[m > 0]
        return cls(area, obj, bg, anchor._object_share(frame.bins[ring]), float(np.mean(bg[values] > obj[values])))

    def _object_share(self, values: np.ndarray) -> float:
        if values.size == 0:
            return 0.0
        # A colour counts as the object's where the anchor saw it more on the object than around.
        return float(np.mean(self.obj[values] > self.bg[values]))


def features(frame: Frame, anchor: Anchor, mask: np.ndarray, prob: np.ndarray | None = None) -> dict[str, float]:
    """The failure figures of one object on one frame (all >= 0; see the module docstring).

    mask: bool (H, W) at frame resolution; prob: the object's probability channel (H, W), or None.
    """
    area = int(np.count_nonzero(mask))
    if area == 0:
        # The object is gone: the strongest evidence of loss the area can give.
        return {"shrink": math.log(max(anchor.area, 2)), "growth": 0.0, "left_behind": 1.0, "foreign": 1.0,
                "coverage": 1.0, "fragments": 0.0, "spill": 0.0}
    ratio = area / anchor.area
    m = frame.shrink(mask)
    sel = m > 0
    if not sel.any():  # smaller than a working-size pixel
        return {"shrink": max(0.0, -math.log(ratio)), "growth": 0.0, "left_behind": 0.0, "foreign": 0.0,
                "coverage": 1.0, "fragments": 0.0, "spill": 0.0}
    values = frame.bins[sel]
    h = np.bincount(values, minlength=NBINS).astype(np.float64)
    h /= h.sum()
    ring = _ring(m, int(sel.sum()))
    out = {
        "shrink": max(0.0, -math.log(ratio)),
        "growth": max(0.0, math.log(ratio)),
        "left_behind": max(0.0, anchor._object_share(frame.bins[ring]) - anchor.ring_object),
        "foreign": max(0.0, float(np.mean(anchor.bg[values] > anchor.obj[values])) - anchor.foreign),
        "coverage": float(1.0 - np.minimum(h, anchor.obj).sum()),
        "fragments": _fragments(m),
        "spill": 0.0,
    }
    if prob is not None:
        total = float(cv2.sumElems(prob)[0])
        inside = float(cv2.sumElems(prob * mask.astype(np.float32))[0]) if prob.shape == mask.shape else total
        out["spill"] = max(0.0, total - inside) / area
    return out


def _fragments(m: np.ndarray) -> float:
    n, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 2:
        return 0.0
    areas = stats[1:, cv2.CC_STAT_AREA]
    return float(1.0 - areas.max() / areas.sum())


def failure_score(figures: Mapping[str, float], weights: Mapping[str, float] | None = None) -> float:
    """The weighted sum of the failure figures (0: the object looks like its anchor)."""
    w = DEFAULT_WEIGHTS if weights is None else weights
    unknown = set(w) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown failure feature(s) {sorted(unknown)}: choose from {', '.join(FEATURES)}")
    return float(sum(w[k] * figures.get(k, 0.0) for k in w))
