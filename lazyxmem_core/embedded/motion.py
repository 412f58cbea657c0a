"""Dense motion and edge-aware smoothing for the embedded propagator (OpenCV only)."""
from __future__ import annotations

import cv2
import numpy as np


class FlowEstimator:
    """DIS optical flow both ways between two grey frames, with a forward-backward check."""

    def __init__(self, preset: int = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM) -> None:
        self._dis = cv2.DISOpticalFlow_create(preset)

    def backward(
        self, cur: np.ndarray, prev: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Flow of ``cur`` into ``prev``, its sampling maps and the FB error (pixels).

        Returns (flow (H, W, 2), map_x, map_y, fb_err), float32: cur(x, y) ~ prev(map_x, map_y).
        """
        h, w = cur.shape
        fb = self._dis.calc(cur, prev, None)  # cur -> prev
        ff = self._dis.calc(prev, cur, None)  # prev -> cur, for the consistency check
        gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        map_x = gx + fb[..., 0]
        map_y = gy + fb[..., 1]
        back = cv2.remap(ff, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        err = np.sqrt(((fb + back) ** 2).sum(axis=2))
        return fb, map_x, map_y, err


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al.'s grey-guide guided filter of every channel of ``src`` (C, H, W).

    Snaps soft probability edges to image edges; ``guide`` is float32 in [0, 1].
    """
    k = (2 * radius + 1, 2 * radius + 1)

    def box(a: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(a, -1, k, borderType=cv2.BORDER_REFLECT)

    mean_i = box(guide)
    var_i = box(guide * guide) - mean_i * mean_i
    out = np.empty_like(src)
    for c in range(src.shape[0]):
        p = src[c]
        mean_p = box(p)
        a = (box(guide * p) - mean_i * mean_p) / (var_i + eps)
        b = mean_p - a * mean_i
        out[c] = box(a) * guide + box(b)
    return out


def fit_affine(flow: np.ndarray, mask: np.ndarray, conf: np.ndarray, max_samples: int = 3000):
    """Robust affine model of ``flow`` (H, W, 2) over ``mask``: (coef (3, 2), spread^2) or None.

    Least squares on confident pixels, refitted once on the inliers. The residual spread tells
    how rigid the motion is: an articulated object gets a large one.
    """
    h, w = mask.shape
    sel = np.flatnonzero(mask.ravel() & (conf.ravel() > 0.5))
    if sel.size < 30:
        return None
    sel = sel[:: max(1, sel.size // max_samples)]  # deterministic subsample
    X = np.stack([sel % w, sel // w, np.ones(sel.size)], 1).astype(np.float64)
    F = flow.reshape(-1, 2)[sel].astype(np.float64)
    coef = np.linalg.lstsq(X, F, rcond=None)[0]
    r = np.linalg.norm(X @ coef - F, axis=1)
    inl = r <= max(1.0, 2.0 * np.median(r))
    if inl.sum() >= 10:
        coef = np.linalg.lstsq(X[inl], F[inl], rcond=None)[0]
        r = np.linalg.norm(X @ coef - F, axis=1)
    return coef.astype(np.float32), float(np.median(r) ** 2) + 0.5


def affine_field(coef: np.ndarray, h: int, w: int) -> np.ndarray:
    """The flow (H, W, 2) of an affine model."""
    xs = np.arange(w, dtype=np.float32)[None, :]
    ys = np.arange(h, dtype=np.float32)[:, None]
    return np.stack([coef[0, c] * xs + coef[1, c] * ys + coef[2, c] for c in range(2)], axis=2)


def motion_loglik(flow: np.ndarray, field: np.ndarray, spread2: float) -> np.ndarray:
    """Gaussian log-likelihood (H, W) of each pixel's flow under a model flow field."""
    d2 = ((flow - field) ** 2).sum(axis=2)
    return -d2 / (2.0 * spread2) - np.log(spread2)

