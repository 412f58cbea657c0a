"""GrabCut as a weight-free mask refiner: clicks / box / prior -> mask (OpenCV ``cv2.grabCut``).

The prompts seed GrabCut's trimap on a crop around the object:

* definite foreground: a small disc around each positive click;
* definite background: a small disc around each negative click, and everything outside the
  *uncertain zone* (the box if one is given, else the prior grown by a band plus a region
  around each positive click -- a quarter of the frame when there is nothing else);
* probable foreground: the prior (or the box's inside when the prior does not fill it);
* probable background: the rest of the uncertain zone, and a ring around negative clicks.

GrabCut runs in Lab colour on the crop, shrunk to at most ``max_pixels`` pixels. Afterwards the
regions a negative click points at (the connected part of similar colour) are removed, only the
components backed by a positive click or by the prior are kept, and small holes are filled.

A box alone (an object's first mask) is GrabCut initialised from the rectangle, kept to the
components reaching the box's middle, holes filled; because GrabCut from a rectangle now and then
collapses (to nothing, or to a patch of background) in one colour space and not in another, a
few colour spaces are tried in turn and the cut that best fits the box wins (the tight-box prior,
``refine_common.box_tightness``). It is never an ellipse drawn in the box.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage

from ..refine_common import FrameCache, box_tightness, check_prompts, frame_key, keep_central
from ..types import Box, Click, FrameRef
from .reference_cut import ReferenceModel, build_reference, colour_score, lab_bins, reference_cut, reference_key


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.count_nonzero(a | b)
    return 1.0 if u == 0 else np.count_nonzero(a & b) / u


def _disc(mask: np.ndarray, x: float, y: float, r: float, value: int | bool) -> None:
    cv2.circle(mask, (int(round(x)), int(round(y))), max(1, int(round(r))), int(value), -1)


class GrabCutRefiner:
    """Refiner protocol with OpenCV GrabCut; no learned weights, about 50-150 ms a call (a box
    alone: 100-500 ms, see ``box_tries``)."""

    # (colour space, GrabCut rounds, crop margin as a share of the box's longer side), tried in
    # this order for a box alone until a cut fits the box (``tight_enough``). One round: more let
    # the foreground model drift to the background on a cluttered scene (DAVIS drift-chicane,
    # cows: the cut shrinks to a speck); the wider margin gives the last try more background.
    box_tries: tuple[tuple[str, int, float], ...] = (("rgb", 1, 0.1), ("hsv", 1, 0.1), ("lab", 1, 0.3))
    tight_enough = 0.9
    box_polish = 2  # more GrabCut rounds from the chosen cut (the colour models now fit the object)
    box_pixels = 40_000  # a box's crop is shrunk to this many pixels (a click's: max_pixels)

    def __init__(
        self,
        iterations: int = 3,
        max_pixels: int = 20_000,
        colour_tolerance: float = 12.0,
        trust_iou: float = 0.75,
        cache_size: int = 4,
    ) -> None:
        """iterations: GrabCut EM rounds; max_pixels: crops larger than this are shrunk first
        (GrabCut's cost follows the pixel count); colour_tolerance: Lab distance (8-bit units)
        of the similar-colour region a negative click removes; trust_iou: GrabCut's whole mask
        replaces the prior only when their IoU reaches this, else only the clicked parts change."""
        if iterations < 1 or max_pixels < 1000:
            raise ValueError("iterations must be >= 1 and max_pixels >= 1000")
        self.iterations = iterations
        self.max_pixels = max_pixels
        self.colour_tolerance = colour_tolerance
        self.trust_iou = trust_iou
        self.reach = 3.0  # a click edits up to this many times its depth in the error region
        self.collapse = 0.4  # a reference cut below this share of the prior's and reference's area is rejected
        self._cache: FrameCache[np.ndarray] = FrameCache(cache_size)
        self._bins: FrameCache[np.ndarray] = FrameCache(cache_size)
        self._refs: FrameCache[ReferenceModel | None] = FrameCache(cache_size)

    def _lab(self, frame: np.ndarray, frame_id: FrameRef | None) -> np.ndarray:
        return self._cache.get(frame_key(frame, frame_id),
                               lambda: cv2.cvtColor(frame, cv2.COLOR_RGB2Lab))

    def refine(
        self,
        frame: np.ndarray,
        clicks: Sequence[Click] = (),
        box: Box | None = None,
        prior: np.ndarray | None = None,
        frame_id: FrameRef | None = None,
        reference: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Bool (H, W) mask of the object the prompts point at; see the module docstring."""
        clicks, box, prior = check_prompts(frame, clicks, box, prior)
        h, w = frame.shape[:2]
        pos = [c for c in clicks if c.positive]
        neg = [c for c in clicks if not c.positive]
        has_prior = prior is not None and bool(prior.any())
        if not pos and box is None and not (has_prior and neg):
            if prior is not None:
                return prior.copy()  # nothing that asks for a change
            raise ValueError("refine needs a positive click, a box, or a prior mask with "
                             "negative clicks")
        if box is not None and not clicks and not has_prior:
            return self._box_cut(frame, box)
        if reference is not None and pos and box is None and not neg:
            return self._refine_with_reference(frame, frame_id, pos, prior if has_prior else None,
                                               reference)
        lab = self._lab(frame, frame_id)
        empty = np.zeros((h, w), bool)
        prior_m = prior if has_prior else empty

        # Scales: the click disc follows the frame, the band around the prior follows the object.
        r_click = max(2.0, 0.005 * math.hypot(h, w))
        if has_prior:
            s_obj = math.sqrt(float(prior_m.sum()))
        elif box is not None:
            s_obj = math.sqrt((box.x1 - box.x0) * (box.y1 - box.y0))
        else:
            s_obj = 0.0
        band = max(8.0, 0.15 * s_obj)

        # Bounding rectangle of the uncertain zone, then the crop with a margin of background.
        if box is not None:
            zx0, zy0, zx1, zy1 = box.x0, box.y0, box.x1, box.y1
        else:
            rects = []
            if has_prior:
                ys, xs = np.nonzero(prior_m)
                rects.append((xs.min() - band, ys.min() - band, xs.max() + 1 + band, ys.max() + 1 + band))
            for c in pos:
                if has_prior:
                    rx = ry = max(band, 0.5 * s_obj)
                else:  # grow from the click: a quarter of the frame around it
                    rx, ry = w / 4.0, h / 4.0
                rects.append((c.x - rx, c.y - ry, c.x + rx, c.y + ry))
            zx0, zy0 = min(r[0] for r in rects), min(r[1] for r in rects)
            zx1, zy1 = max(r[2] for r in rects), max(r[3] for r in rects)
        margin = max(10.0, 0.1 * max(zx1 - zx0, zy1 - zy0))
        cx0, cy0 = max(0, int(zx0 - margin)), max(0, int(zy0 - margin))
        cx1, cy1 = min(w, int(math.ceil(zx1 + margin))), min(h, int(math.ceil(zy1 + margin)))

        # Work at a reduced scale when the crop is large.
        f = min(1.0, math.sqrt(self.max_pixels / float((cx1 - cx0) * (cy1 - cy0))))
        cw, ch = max(8, int(round((cx1 - cx0) * f))), max(8, int(round((cy1 - cy0) * f)))
        fx, fy = cw / (cx1 - cx0), ch / (cy1 - cy0)

        def to_crop(x: float, y: float) -> tuple[float, float]:
            return (x - cx0) * fx, (y - cy0) * fy

        img = cv2.resize(lab[cy0:cy1, cx0:cx1], (cw, ch), interpolation=cv2.INTER_AREA)
        pri = cv2.resize(prior_m[cy0:cy1, cx0:cx1].astype(np.uint8), (cw, ch),
                         interpolation=cv2.INTER_NEAREST).astype(bool)
        rc, bd = r_click * f, band * f

        # Uncertain zone in crop coordinates.
        zone = np.zeros((ch, cw), np.uint8)
        if box is not None:
            bx0, by0 = to_crop(box.x0, box.y0)
            bx1, by1 = to_crop(box.x1, box.y1)
            cv2.rectangle(zone, (int(bx0), int(by0)), (int(math.ceil(bx1)) - 1, int(math.ceil(by1)) - 1), 1, -1)
        else:
            if has_prior:
                k = 2 * int(round(bd)) + 1
                zone = cv2.dilate(pri.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
            for c in pos:
                px, py = to_crop(c.x, c.y)
                if has_prior:
                    _disc(zone, px, py, max(band, 0.5 * s_obj) * f, 1)
                else:
                    cv2.ellipse(zone, (int(px), int(py)), (int(w / 4 * fx), int(h / 4 * fy)), 0, 0, 360, 1, -1)
        zone_b = zone.astype(bool)

        gc = np.full((ch, cw), cv2.GC_BGD, np.uint8)
        gc[zone_b] = cv2.GC_PR_BGD
        if box is not None and not (pri & zone_b).sum() > 0.2 * zone_b.sum():
            gc[zone_b] = cv2.GC_PR_FGD  # classic box init: the prior does not describe the box
        else:
            gc[pri & zone_b] = cv2.GC_PR_FGD
        if not has_prior and box is None:
            # Seed the foreground colour model beyond the click's own pixels: the region of
            # similar colour around each click (GrabCut then grows or trims it).
            for c in pos:
                px, py = to_crop(c.x, c.y)
                seed_region = self._similar_region(img, (px, py), ~zone_b, 1.5 * self.colour_tolerance)
                gc[seed_region] = cv2.GC_PR_FGD
                _disc(gc, px, py, 3 * rc, cv2.GC_PR_FGD)
        for c in neg:
            px, py = to_crop(c.x, c.y)
            _disc(gc, px, py, 3 * rc, cv2.GC_PR_BGD)
        for c in neg:
            _disc(gc, *to_crop(c.x, c.y), rc, cv2.GC_BGD)
        for c in pos:  # positive wins where a positive and a negative disc overlap
            _disc(gc, *to_crop(c.x, c.y), rc, cv2.GC_FGD)

        fg_seed = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        bg_seed = (gc == cv2.GC_BGD) | (gc == cv2.GC_PR_BGD)
        if fg_seed.any() and bg_seed.any():
            bgd_model, fgd_model = np.zeros((1, 65)), np.zeros((1, 65))
            cv2.setRNGSeed(0)  # GrabCut seeds its k-means from the global RNG: be deterministic
            cv2.grabCut(img, gc, None, bgd_model, fgd_model, self.iterations, cv2.GC_INIT_WITH_MASK)
        res = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)

        res = self._remove_negative_regions(res, img, pos, neg, to_crop, rc)
        ref = pri if has_prior else (zone_b if box is not None else None)
        res = self._select_components(res, ref, pos, neg, to_crop, rc)
        res = self._fill_small_holes(res, neg, to_crop, rc)
        if has_prior:
            # GrabCut alone is unreliable where object and background share colours: take its
            # mask only when it stays close to the prior; otherwise edit the prior only where
            # the clicks point, with GrabCut's answer there.
            trusted = _iou(res, pri) >= self.trust_iou
            base = res if trusted else pri
            edited = self._local_edits(base, res, pos, neg, to_crop, rc, max(bd, 0.5 * s_obj * f))
        else:
            trusted, edited = True, res

        def up(m: np.ndarray) -> np.ndarray:
            return cv2.resize(m.astype(np.float32), (cx1 - cx0, cy1 - cy0),
                              interpolation=cv2.INTER_LINEAR) > 0.5

        out = np.zeros((h, w), bool)
        if trusted:
            out[cy0:cy1, cx0:cx1] = up(edited)
        else:  # keep the prior at full resolution; only the edits come from the small crop
            out[cy0:cy1, cx0:cx1] = (prior_m[cy0:cy1, cx0:cx1] | up(edited & ~pri)) & ~up(pri & ~edited)
        # Rescaling cannot be allowed to undo a click.
        for c in neg:
            out[int(c.y), int(c.x)] = False
        return self._fallback(out, prior_m, has_prior, box, pos, neg, r_click, frame)

    def _box_cut(self, frame: np.ndarray, box: Box) -> np.ndarray:
        """The object a box alone asks for: see the module docstring."""
        best, best_score, how = None, -1.0, self.box_tries[0]
        for space, rounds, margin in self.box_tries:
            cut = keep_central(self._rect_grabcut(frame, box, space, rounds, margin), box)
            score = box_tightness(cut, box)
            if score > best_score + 0.01:  # ties go to the earlier (the plainer) try
                best, best_score, how = cut, score, (space, rounds, margin)
            if score >= self.tight_enough:
                break
        if best is not None and best_score > 0 and self.box_polish:
            # One round from a rectangle leaves thin parts and concave corners to chance; rounds
            # started from the chosen cut settle them (a star's points: J 0.77-0.85 -> 0.9-1.0 on
            # the tests' cluttered scenes), kept unless they lose the box's fit.
            polished = keep_central(self._rect_grabcut(frame, box, how[0], self.box_polish, how[2], init=best), box)
            if box_tightness(polished, box) >= best_score - 0.02:
                best = polished
        if best is None or not best.any():  # nothing separable: the box says where, no more
            best = np.zeros(frame.shape[:2], bool)
            best[int(box.y0):int(math.ceil(box.y1)), int(box.x0):int(math.ceil(box.x1))] = True
        return best

    def _rect_grabcut(self, frame: np.ndarray, box: Box, space: str, rounds: int, margin: float,
                      init: np.ndarray | None = None) -> np.ndarray:
        """cv2.grabCut on a crop around the box in one colour space: from the rectangle
        (GC_INIT_WITH_RECT), or with ``init`` the probable foreground inside it."""
        h, w = frame.shape[:2]
        bw, bh = box.x1 - box.x0, box.y1 - box.y0
        m = max(16.0, margin * max(bw, bh))
        cx0, cy0 = max(0, int(box.x0 - m)), max(0, int(box.y0 - m))
        cx1, cy1 = min(w, int(math.ceil(box.x1 + m))), min(h, int(math.ceil(box.y1 + m)))
        crop = frame[cy0:cy1, cx0:cx1]
        if space != "rgb":
            crop = cv2.cvtColor(crop, {"hsv": cv2.COLOR_RGB2HSV_FULL, "lab": cv2.COLOR_RGB2Lab}[space])
        f = min(1.0, math.sqrt(self.box_pixels / float(crop.shape[0] * crop.shape[1])))
        small = cv2.resize(crop, None, fx=f, fy=f, interpolation=cv2.INTER_AREA) if f < 1 else crop
        sy, sx = small.shape[0] / crop.shape[0], small.shape[1] / crop.shape[1]
        rx, ry = int((box.x0 - cx0) * sx), int((box.y0 - cy0) * sy)
        rect = (rx, ry, max(1, min(small.shape[1] - rx, int(round(bw * sx)))),
                max(1, min(small.shape[0] - ry, int(round(bh * sy)))))
        gc = np.zeros(small.shape[:2], np.uint8)
        mode = cv2.GC_INIT_WITH_RECT
        if init is not None:
            seed = cv2.resize(init[cy0:cy1, cx0:cx1].astype(np.uint8), (small.shape[1], small.shape[0]),
                              interpolation=cv2.INTER_NEAREST).astype(bool)
            inside = np.zeros(gc.shape, bool)
            inside[rect[1]:rect[1] + rect[3], rect[0]:rect[0] + rect[2]] = True
            gc[inside] = cv2.GC_PR_BGD
            gc[inside & seed] = cv2.GC_PR_FGD
            mode = cv2.GC_INIT_WITH_MASK
        bgd_model, fgd_model = np.zeros((1, 65)), np.zeros((1, 65))
        cv2.setRNGSeed(0)  # GrabCut seeds its k-means from the global RNG: be deterministic
        try:
            cv2.grabCut(small, gc, rect, bgd_model, fgd_model, rounds, mode)
        except cv2.error:  # a box covering the whole crop leaves no background to model
            return np.zeros((h, w), bool)
        fg = ((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)).astype(np.float32)
        out = np.zeros((h, w), bool)
        out[cy0:cy1, cx0:cx1] = cv2.resize(fg, (cx1 - cx0, cy1 - cy0), interpolation=cv2.INTER_LINEAR) > 0.5
        return out

    def _refine_with_reference(self, frame, frame_id, pos, prior, reference) -> np.ndarray:
        """Positive clicks with a reference annotation: see ``reference_cut``."""
        if not (isinstance(reference, tuple) and len(reference) == 2):
            raise ValueError("reference must be a (frame, mask) tuple of an earlier annotated frame")
        ref_frame, ref_mask = reference
        if not isinstance(ref_frame, np.ndarray) or ref_frame.ndim != 3 or ref_frame.dtype != np.uint8:
            raise ValueError("reference frame must be an RGB uint8 (H, W, 3) array")
        ref_mask = np.asarray(ref_mask).astype(bool)
        model = self._refs.get(reference_key(ref_frame, ref_mask), lambda: build_reference(ref_frame, ref_mask))
        if model is None:  # an empty reference says nothing: the plain click path
            return self.refine(frame, pos, prior=prior, frame_id=frame_id)
        lab = self._lab(frame, frame_id)
        bins = self._bins.get(frame_key(frame, frame_id), lambda: lab_bins(lab))
        cut = reference_cut(lab, bins, pos, prior, model, self.max_pixels, self.iterations + 1)
        # What the click asks for without the reference: nothing when it lies on the prior
        # already (GrabCut re-segmenting a good mask loses more than it wins), else the prior
        # grown to the clicked part. The reference's colours decide between that and the cut.
        if prior is not None and all(prior[int(c.y), int(c.x)] for c in pos):
            base = prior.copy()
        else:
            base = self.refine(frame, pos, prior=prior, frame_id=frame_id)
        # A cut far smaller than both the prior and the reference is GrabCut stopping at an inner
        # colour edge (a car's windows), not the object shrinking: on DAVIS the colour score still
        # preferred 3 such cuts of 19 it took over a clicked prior, each losing 0.3 IoU or more.
        sizes = [model.area] + ([float(prior.sum())] if prior is not None else [])
        if cut.sum() < self.collapse * min(sizes):
            return base
        return cut if colour_score(cut, model, bins) > colour_score(base, model, bins) else base

    def _local_edits(self, base, seg, pos, neg, to_crop, rc, radius) -> np.ndarray:
        """Add (remove) the part of ``seg`` (of ``base``) a positive (negative) click lies on
        that ``base`` lacks (``seg`` lacks), within ``radius`` of the click."""
        out = base.copy()
        h, w = out.shape
        for clicks_, add in ((pos, True), (neg, False)):
            for c in clicks_:
                px, py = to_crop(c.x, c.y)
                ix, iy = min(w - 1, int(px)), min(h - 1, int(py))
                if out[iy, ix] == add:
                    continue
                diff = (seg & ~out) if add else (out & ~seg)
                lab, _ = ndimage.label(diff)
                part = lab == lab[iy, ix] if lab[iy, ix] else np.zeros_like(out)
                # The click lies at about the middle of the error region: how far it is from
                # ``base``'s boundary bounds how far the edit may reach.
                depth = cv2.distanceTransform((out != add).astype(np.uint8), cv2.DIST_L2, 3)[iy, ix]
                near = np.zeros((h, w), np.uint8)
                _disc(near, px, py, min(radius, self.reach * max(depth, rc)), 1)
                part &= near.astype(bool)
                if not add:
                    # A negative click on a detached piece that no positive click holds and
                    # that is not the main piece removes the whole piece.
                    comp, n = ndimage.label(out, structure=np.ones((3, 3)))
                    k = comp[iy, ix]
                    sizes = np.bincount(comp.ravel(), minlength=n + 1)
                    held = any(comp[min(h - 1, int(q[1])), min(w - 1, int(q[0]))] == k
                               for q in (to_crop(p.x, p.y) for p in pos))
                    if n > 1 and not held and sizes[k] < sizes[1:].max():
                        part |= comp == k
                disc = np.zeros((h, w), np.uint8)
                _disc(disc, px, py, rc, 1)
                part |= disc.astype(bool)
                out = (out | part) if add else (out & ~part)
        return out

    @staticmethod
    def _similar_region(img: np.ndarray, xy: tuple[float, float], blocked: np.ndarray,
                        tol: float) -> np.ndarray:
        """Connected pixels within ``tol`` (per Lab channel) of the colour at ``xy``, avoiding
        ``blocked``; computed on a blurred image since textures would stop the fill at once."""
        h, w = blocked.shape
        smooth = cv2.GaussianBlur(img, (0, 0), 1.5)
        seed = (min(w - 1, max(0, int(xy[0]))), min(h - 1, max(0, int(xy[1]))))
        ff = np.pad(blocked.astype(np.uint8), 1, constant_values=1)
        ff[seed[1] + 1, seed[0] + 1] = 0
        flags = 4 | cv2.FLOODFILL_FIXED_RANGE | cv2.FLOODFILL_MASK_ONLY | (2 << 8)
        cv2.floodFill(smooth, ff, seed, 0, (tol,) * 3, (tol,) * 3, flags)
        return ff[1:-1, 1:-1] == 2

    def _remove_negative_regions(self, res, img, pos, neg, to_crop, rc) -> np.ndarray:
        """Drop the connected region of similar colour that each negative click lies on."""
        if not neg or not res.any():
            return res
        h, w = res.shape
        for c in neg:
            px, py = to_crop(c.x, c.y)
            allowed = res.astype(np.uint8)
            _disc(allowed, px, py, rc + 1, 1)  # the click's own disc is BGD already
            region = self._similar_region(img, (px, py), allowed == 0, self.colour_tolerance)
            if any(region[min(h - 1, int(py_)), min(w - 1, int(px_))]
                   for px_, py_ in (to_crop(p.x, p.y) for p in pos)):
                continue  # the similar-colour region holds a positive click: leave it to GrabCut
            res = res & ~region
        return res

    @staticmethod
    def _select_components(res, ref, pos, neg, to_crop, rc) -> np.ndarray:
        """Keep components holding a positive click, or mostly inside the prior (box) and not
        touched by a negative click; without positive clicks always keep the one that
        overlaps the prior (box) most."""
        n, labels, stats, _ = cv2.connectedComponentsWithStats(res.astype(np.uint8), connectivity=8)
        if n <= 2 and not neg:
            return res
        h, w = res.shape
        area = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
        keep = np.zeros(n, bool)
        for c in pos:
            px, py = to_crop(c.x, c.y)
            keep[labels[min(h - 1, int(py)), min(w - 1, int(px))]] = True
        touched = np.zeros(n, bool)
        if neg:
            near = np.zeros((h, w), np.uint8)
            for c in neg:
                _disc(near, *to_crop(c.x, c.y), rc + 2, 1)
            touched[np.unique(labels[near.astype(bool)])] = True
        overlap = (np.bincount(labels[ref].ravel(), minlength=n).astype(np.float64)
                   if ref is not None else np.zeros(n))
        big = area >= 0.05 * area[1:].max() if n > 1 else np.zeros(n, bool)
        keep |= (overlap >= 0.5 * area) & big & ~touched
        keep[0] = False
        if not pos and n > 1:
            keep[1 + int(np.argmax(overlap[1:] if ref is not None else area[1:]))] = True
        return keep[labels]

    @staticmethod
    def _fill_small_holes(res, neg, to_crop, rc) -> np.ndarray:
        """Fill holes below 2 % of the object's area, except those a negative click made."""
        holes = ndimage.binary_fill_holes(res) & ~res
        if not holes.any():
            return res
        lab, n = ndimage.label(holes)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        fill = sizes <= max(16, 0.02 * res.sum())
        fill[0] = False
        h, w = res.shape
        for c in neg:
            px, py = to_crop(c.x, c.y)
            fill[lab[min(h - 1, int(py)), min(w - 1, int(px))]] = False
        return res | fill[lab]

    def _fallback(self, out, prior_m, has_prior, box, pos, neg, r_click, frame) -> np.ndarray:
        """Replace a degenerate result (nothing beyond the click discs, or empty)."""
        disc_area = math.pi * r_click ** 2
        area = int(out.sum())
        if area > 2 * disc_area * max(1, len(pos)) or (has_prior and prior_m.sum() <= 2 * area):
            return out
        h, w = out.shape
        fb = np.zeros((h, w), np.uint8)
        if has_prior:
            fb |= prior_m.astype(np.uint8)
        elif box is not None:  # what the box alone gives (an ellipse in the box was no object's shape)
            fb |= self._box_cut(frame, box).astype(np.uint8)
        for c in neg:
            _disc(fb, c.x, c.y, 4 * r_click, 0)
        for c in pos:
            _disc(fb, c.x, c.y, 4 * r_click, 1)
        return fb.astype(bool) | out
