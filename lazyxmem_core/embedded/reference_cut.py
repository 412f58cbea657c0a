"""Click + prior + reference -> mask: GrabCut whose colour models also learn from the reference.

Used by :class:`GrabCutRefiner` when the caller passes ``reference`` = (frame, mask) of the same
object on an earlier, human-annotated frame, and only positive clicks. The reference tells
what the object and its surroundings look like and how big the object is; the click where it
is; the prior (the propagated mask, possibly drifted, leaking or partial) roughly its shape.

1. Reference model (cached): Lab joint histograms of the object and of its surroundings
   (a ring about one object size wide) give a log-likelihood ratio per colour bin; the
   object's area and bounding box give the expected scale.
2. A region of interest centred on the click, sized from the reference's box (and from the
   prior's part around the click when that has a plausible size).
3. GrabCut on a composite image: the ROI of the current frame side by side with the
   reference's crop, whose pixels are fixed foreground/background. GrabCut's colour mixtures
   are fitted on both halves, so the reference's appearance anchors them even when the prior
   is wrong. The current half starts from the prior minus the pixels that look like the
   reference's background, plus the pixels near the click that look like its object.
4. The component holding the click (and large parts mostly inside the prior) is kept; the
   prior is kept outside the ROI only where it continues the result.
5. The caller keeps the cut only when it is not far smaller than both the prior and the
   reference, and scores higher under the reference's colour model (``colour_score``: sum of
   log-likelihood ratios over the mask) than the mask it would give otherwise. On DAVIS frames
   GrabCut alone often stops at an inner colour edge.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from ..types import Click
from .colour import histogram

_LOG_EPS = 1e-4


@dataclass(frozen=True)
class ReferenceModel:
    """What a reference annotation says about the object."""

    llr: np.ndarray  # (NBINS,) log p(bin | object) - log p(bin | surroundings)
    area: float  # object pixels
    box_wh: tuple[float, float]  # object's bounding-box width, height
    crop_lab: np.ndarray  # Lab crop of the reference frame around the object
    crop_mask: np.ndarray  # bool object mask on that crop


def lab_bins(lab: np.ndarray) -> np.ndarray:
    """Joint Lab bin index (as colour.colour_bins) from an 8-bit Lab image."""
    lq = (lab[..., 0] >> 5).astype(np.int32)
    aq = (lab[..., 1] >> 4).astype(np.int32)
    bq = (lab[..., 2] >> 4).astype(np.int32)
    return (lq * 16 + aq) * 16 + bq


def reference_key(frame: np.ndarray, mask: np.ndarray) -> bytes:
    hsh = hashlib.blake2b(np.ascontiguousarray(frame).data, digest_size=16)
    hsh.update(np.packbits(mask).tobytes())
    return hsh.digest()


def build_reference(frame: np.ndarray, mask: np.ndarray) -> ReferenceModel | None:
    """The reference's colour model and scale; None when its mask is empty."""
    mask = np.asarray(mask).astype(bool)
    if mask.shape != frame.shape[:2]:
        raise ValueError(f"reference mask has shape {mask.shape} but its frame is {frame.shape[:2]}: "
                         "pass (frame, mask) at the same resolution")
    if not mask.any():
        return None
    lab = cv2.cvtColor(frame, cv2.COLOR_RGB2Lab)
    bins = lab_bins(lab)
    ys, xs = np.nonzero(mask)
    area = float(ys.size)
    bw, bh = float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)
    # Surroundings: a ring about one object size wide (what the object must be told apart from
    # near it; far background is irrelevant to a cut around the click).
    k = 2 * int(max(5, 0.5 * math.sqrt(area))) + 1
    ring = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))).astype(bool) & ~mask
    if not ring.any():
        ring = ~mask
    fg, bg = histogram(bins, mask), histogram(bins, ring)
    if fg is None or bg is None:
        return None
    llr = np.clip(np.log(fg + _LOG_EPS) - np.log(bg + _LOG_EPS), -6.0, 6.0).astype(np.float32)
    H, W = mask.shape
    mx, my = 0.5 * bw, 0.5 * bh
    x0, y0 = max(0, int(xs.min() - mx)), max(0, int(ys.min() - my))
    x1, y1 = min(W, int(xs.max() + 1 + mx)), min(H, int(ys.max() + 1 + my))
    return ReferenceModel(llr, area, (bw, bh), lab[y0:y1, x0:x1].copy(), mask[y0:y1, x0:x1].copy())


def reference_cut(
    lab: np.ndarray,
    bins: np.ndarray,
    pos: Sequence[Click],
    prior: np.ndarray | None,
    ref: ReferenceModel,
    max_pixels: int = 20_000,
    iterations: int = 4,
) -> np.ndarray:
    """Bool (H, W) mask of the object the positive clicks point at (see the module docstring)."""
    H, W = bins.shape
    llr_full = ref.llr[bins]
    bw, bh = ref.box_wh

    # ROI: the reference's box scaled up, centred on the clicks (the TP click is the object's
    # interior point, not its box centre, so allow about one box size on every side).
    hx, hy = 1.2 * bw, 1.2 * bh
    x0, x1 = min(c.x for c in pos) - hx, max(c.x for c in pos) + hx
    y0, y1 = min(c.y for c in pos) - hy, max(c.y for c in pos) + hy
    prior_part = None
    if prior is not None and prior.any():
        prior_part = _component_at(prior, pos)
        if prior_part is not None and prior_part.sum() < 3.0 * ref.area:
            ys, xs = np.nonzero(prior_part)
            x0, x1 = min(x0, xs.min() - 0.1 * bw), max(x1, xs.max() + 0.1 * bw)
            y0, y1 = min(y0, ys.min() - 0.1 * bh), max(y1, ys.max() + 0.1 * bh)
    rx0, ry0 = max(0, int(x0)), max(0, int(y0))
    rx1, ry1 = min(W, int(math.ceil(x1))), min(H, int(math.ceil(y1)))
    rw, rh = rx1 - rx0, ry1 - ry0

    f = min(1.0, math.sqrt(max_pixels / float(rw * rh)))
    cw, ch = max(8, int(round(rw * f))), max(8, int(round(rh * f)))
    img = cv2.resize(lab[ry0:ry1, rx0:rx1], (cw, ch), interpolation=cv2.INTER_AREA)
    llr = cv2.resize(llr_full[ry0:ry1, rx0:rx1], (cw, ch), interpolation=cv2.INTER_AREA)
    llr = cv2.GaussianBlur(llr, (0, 0), 1.0)
    pri = (cv2.resize(prior[ry0:ry1, rx0:rx1].astype(np.uint8), (cw, ch), interpolation=cv2.INTER_NEAREST).astype(bool)
           if prior is not None else np.zeros((ch, cw), bool))
    sx, sy = cw / rw, ch / rh
    clicks = [((c.x - rx0) * sx, (c.y - ry0) * sy) for c in pos]

    # Expected extent around the click, in crop pixels.
    reach = np.zeros((ch, cw), np.uint8)
    for px, py in clicks:
        cv2.ellipse(reach, (int(px), int(py)), (max(2, int(0.75 * bw * sx)), max(2, int(0.75 * bh * sy))), 0, 0, 360, 1, -1)
    reach_b = reach.astype(bool)

    gc = np.full((ch, cw), cv2.GC_PR_BGD, np.uint8)
    gc[(pri & (llr > -1.5)) | (reach_b & (llr > 1.0))] = cv2.GC_PR_FGD
    r_click = max(2, int(round(0.08 * math.sqrt(ref.area) * f)))
    for px, py in clicks:
        cv2.circle(gc, (int(round(px)), int(round(py))), r_click, cv2.GC_FGD, -1)
    # ROI borders inside the frame are background (the ROI is generous); frame borders are not.
    b = max(1, int(round(0.02 * max(cw, ch))))
    if rx0 > 0:
        gc[:, :b][gc[:, :b] != cv2.GC_FGD] = cv2.GC_BGD
    if rx1 < W:
        gc[:, -b:][gc[:, -b:] != cv2.GC_FGD] = cv2.GC_BGD
    if ry0 > 0:
        gc[:b][gc[:b] != cv2.GC_FGD] = cv2.GC_BGD
    if ry1 < H:
        gc[-b:][gc[-b:] != cv2.GC_FGD] = cv2.GC_BGD

    # The reference half: same height, fixed labels.
    rh_, rw_ = ref.crop_lab.shape[:2]
    tw = max(4, int(round(rw_ * ch / rh_)))
    tw = min(tw, 2 * cw)  # bounded cost
    ref_img = cv2.resize(ref.crop_lab, (tw, ch), interpolation=cv2.INTER_AREA)
    ref_m = cv2.resize(ref.crop_mask.astype(np.uint8), (tw, ch), interpolation=cv2.INTER_NEAREST).astype(bool)
    comp_img = np.ascontiguousarray(np.concatenate([img, ref_img], axis=1))
    comp_gc = np.concatenate([gc, np.where(ref_m, cv2.GC_FGD, cv2.GC_BGD).astype(np.uint8)], axis=1)
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)  # GrabCut seeds its k-means from the global RNG: be deterministic
    cv2.grabCut(comp_img, comp_gc, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    res = (comp_gc[:, :cw] == cv2.GC_FGD) | (comp_gc[:, :cw] == cv2.GC_PR_FGD)

    res = _keep_parts(res, pri, clicks)
    res = ndimage.binary_fill_holes(res) if res.any() else res
    full = cv2.resize(res.astype(np.float32), (rw, rh), interpolation=cv2.INTER_LINEAR) > 0.5
    out = np.zeros((H, W), bool)
    out[ry0:ry1, rx0:rx1] = full
    if prior is not None:
        # Outside the ROI keep only the prior that continues the result across the ROI border.
        outside = prior.copy()
        outside[ry0:ry1, rx0:rx1] = False
        if outside.any():
            comb = out | outside
            lab_c, _ = ndimage.label(comb, structure=np.ones((3, 3)))
            keep = np.unique(lab_c[out])
            out = comb & np.isin(lab_c, keep[keep > 0])
    for c in pos:
        out[int(c.y), int(c.x)] = True
    return out


def colour_score(mask: np.ndarray, ref: ReferenceModel, bins: np.ndarray) -> float:
    """Sum over the mask of the reference's log-likelihood ratio (object vs surroundings): how
    well a candidate mask explains the frame in the reference's colours. Larger is better: it
    rewards object-like pixels and penalises background-like ones, so it rejects masks that
    leaked; a cut that collapsed onto a strongly object-like part (a car's window) can still
    score high, which is why the caller also checks the cut's size."""
    return float(ref.llr[bins[mask]].sum())


def _component_at(mask: np.ndarray, pos: Sequence[Click]) -> np.ndarray | None:
    """The mask's connected component under (or nearest to) the clicks."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return None
    ks = {int(lab[int(c.y), int(c.x)]) for c in pos} - {0}
    if not ks:
        # No click on the mask: the nearest component (distance transform's nearest index).
        _, (iy, ix) = ndimage.distance_transform_edt(lab == 0, return_indices=True)
        ks = {int(lab[iy[int(c.y), int(c.x)], ix[int(c.y), int(c.x)]]) for c in pos}
    return np.isin(lab, list(ks))


def _keep_parts(res: np.ndarray, pri: np.ndarray, clicks: list[tuple[float, float]]) -> np.ndarray:
    """Components holding a click, plus large ones lying mostly inside the prior."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(res.astype(np.uint8), connectivity=8)
    if n <= 1:
        return res
    h, w = res.shape
    keep = np.zeros(n, bool)
    for px, py in clicks:
        keep[labels[min(h - 1, int(py)), min(w - 1, int(px))]] = True
    area = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
    main = area[keep].max() if keep[1:].any() else area[1:].max()
    overlap = np.bincount(labels[pri].ravel(), minlength=n).astype(np.float64)
    keep |= (overlap >= 0.6 * area) & (area >= 0.1 * main)
    keep[0] = False
    return keep[labels]
