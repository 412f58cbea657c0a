"""Colour models of the embedded propagator: quantised Lab histograms, global and local.

Colours are quantised to ``NBINS`` joint Lab bins (8 lightness x 16 x 16 chroma levels: chroma
carries most of the object/background contrast, lightness shifts with shading). Two models:

* a *global* histogram per channel (background and each object), kept in a bounded memory
  (anchor frames: given or user-corrected masks; recent frames: scheduled memory writes);
* a *local* model: per-cell histograms of the previous frame on a coarse grid, each cell pooled
  over its 3x3 neighbourhood, looked up at the flow-warped position of every pixel. It separates
  object and background where their colours only differ locally (Video SnapCut's idea, vectorised).
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

L_BINS, A_BINS, B_BINS = 8, 16, 16
NBINS = L_BINS * A_BINS * B_BINS


def colour_bins(rgb: np.ndarray) -> np.ndarray:
    """Joint Lab bin index (H, W) int32 of an RGB uint8 image."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    lq = (lab[..., 0] >> 5).astype(np.int32)
    aq = (lab[..., 1] >> 4).astype(np.int32)
    bq = (lab[..., 2] >> 4).astype(np.int32)
    return (lq * A_BINS + aq) * B_BINS + bq


def histogram(bins: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Normalised, slightly blurred histogram of the bins under ``mask``; None when empty."""
    sel = bins[mask]
    if sel.size == 0:
        return None
    h = np.bincount(sel, minlength=NBINS).astype(np.float64)
    # Blur across neighbouring bins so unseen but similar colours keep some likelihood.
    h = ndimage.gaussian_filter(h.reshape(L_BINS, A_BINS, B_BINS), sigma=0.7, mode="nearest").ravel()
    return h / h.sum()


class GlobalModel:
    """Bounded colour memory of one channel: anchors (given/IDU masks) and recent writes."""

    def __init__(self, n_anchor: int = 3, n_recent: int = 4, anchor_weight: float = 0.6) -> None:
        self.anchors: list[np.ndarray] = []
        self.recent: list[np.ndarray] = []
        self.n_anchor, self.n_recent, self.anchor_weight = n_anchor, n_recent, anchor_weight
        self._cache: np.ndarray | None = None

    def add(self, hist: np.ndarray, anchor: bool) -> None:
        # Lists are replaced, never mutated in place, so shallow state copies stay exact.
        if anchor:
            self.anchors = (self.anchors + [hist])[-self.n_anchor :]
        else:
            self.recent = (self.recent + [hist])[-self.n_recent :]
        self._cache = None

    def empty(self) -> bool:
        return not self.anchors and not self.recent

    def pdf(self) -> np.ndarray:
        """The mixed, normalised histogram (uniform when nothing was stored)."""
        if self._cache is None:
            if self.empty():
                self._cache = np.full(NBINS, 1.0 / NBINS)
            else:
                parts = []
                if self.anchors:
                    parts.append((self.anchor_weight if self.recent else 1.0, np.mean(self.anchors, 0)))
                if self.recent:
                    parts.append((1.0 - self.anchor_weight if self.anchors else 1.0, np.mean(self.recent, 0)))
                h = sum(w * p for w, p in parts)
                self._cache = (h + 1e-5) / (h + 1e-5).sum()
        return self._cache

    def copy(self) -> "GlobalModel":
        g = GlobalModel(self.n_anchor, self.n_recent, self.anchor_weight)
        g.anchors, g.recent, g._cache = list(self.anchors), list(self.recent), self._cache
        return g


def local_counts(bins: np.ndarray, chan: np.ndarray, n_chan: int, cell: int) -> np.ndarray:
    """Per-cell colour counts (gy, gx, n_chan, NBINS) float32, each pooled over 3x3 cells."""
    h, w = bins.shape
    gy, gx = -(-h // cell), -(-w // cell)
    ys, xs = np.indices((h, w), dtype=np.int32)
    cid = (ys // cell) * gx + xs // cell
    idx = (cid * n_chan + chan.astype(np.int32)) * NBINS + bins
    c = np.bincount(idx.ravel(), minlength=gy * gx * n_chan * NBINS).astype(np.float32)
    c = c.reshape(gy, gx, n_chan * NBINS)
    # 3x3 pooling: a pixel's local model spans about three cells around it.
    p = np.pad(c, ((1, 1), (1, 1), (0, 0)))
    pooled = sum(p[dy : dy + gy, dx : dx + gx] for dy in range(3) for dx in range(3))
    return pooled.reshape(gy, gx, n_chan, NBINS)


def local_likelihood(
    counts: np.ndarray,
    glob: list[np.ndarray],
    bins: np.ndarray,
    pos_y: np.ndarray,
    pos_x: np.ndarray,
    cell: int,
    prior_count: float,
) -> np.ndarray:
    """Colour likelihood (n_chan, H, W) of each pixel under each channel's local model.

    pos_y/pos_x: where each pixel came from in the frame the counts were taken on (flow).
    The local histogram is shrunk towards the global one with ``prior_count`` pseudo-counts,
    so cells that saw little of a channel fall back to its global colours.
    """
    gy, gx, n_chan, _ = counts.shape
    cy = np.clip((pos_y / cell).astype(np.int32), 0, gy - 1)
    cx = np.clip((pos_x / cell).astype(np.int32), 0, gx - 1)
    flat = counts.reshape(-1)
    tot = counts.sum(axis=3)  # (gy, gx, n_chan)
    base = (cy * gx + cx) * n_chan
    out = np.empty((n_chan,) + bins.shape, np.float32)
    for k in range(n_chan):
        n = flat[(base + k) * NBINS + bins]
        out[k] = (n + prior_count * glob[k][bins]) / (tot[cy, cx, k] + prior_count)
    return out
