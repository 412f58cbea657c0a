"""DAVIS J & F, robustness R@tau and user-workload figures (see reference/metrics.md).

J and F follow the DAVIS 2017 evaluation toolkit (semi-supervised protocol) rule for rule:

* J = |P & G| / |P | G|, and 1 when the union is empty.
* F is the boundary F-measure: 1-pixel boundary maps (a pixel differs from its right, lower or
  lower-right neighbour; outside neighbours are 0; the last row compares only right, the last
  column only down, the bottom-right pixel is never boundary), each dilated by a disc of radius
  r = ceil(0.008 * sqrt(H^2 + W^2)) (8 px at 854x480); precision = predicted boundary pixels within
  the dilated GT boundary, recall = GT boundary pixels within the dilated predicted boundary;
  empty cases: both empty P=R=1, prediction empty P=1 R=0, GT empty P=0 R=1; F = 2PR/(P+R) or 0.
* GT label 255 (void) is background. The first and the last frame of a sequence are not scored.
* Per object: Mean = nan-mean over frames, Recall = share of frames with value > 0.5,
  Decay = nan-mean of the first minus the last of four bins (toolkit binning, see :func:`decay`).
  Summaries average objects, not sequences; J&F = (J + F) / 2.

Deliberate differences from the toolkit, both only where the toolkit misbehaves:
the toolkit casts the decay bin edges to uint8, which wraps for sequences over 256 scored frames
(we keep plain integers), and it takes the objects as 1..max(label in the first GT frame) while we
take the labels present in any GT frame (sparse GT may introduce an object later); on DAVIS, where
the first frame holds every object, both give the same objects.
"""
from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from .media import read_index_mask

VOID_LABEL = 255
TAUS = (0.1, 0.25, 0.5)
SUMMARY_KEYS = ("J", "F", "J&F", "R@0.1", "R@0.25", "R@0.5",
                "J-Recall", "F-Recall", "J-Decay", "F-Decay")


# ----------------------------------------------------------------------------- per frame

def _check_pair(pred: np.ndarray, gt: np.ndarray, ndims: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}; "
                         "resize the prediction to the GT frame size before scoring")
    if pred.ndim not in ndims:
        raise ValueError(f"masks must have {' or '.join(map(str, ndims))} dimensions, got shape {pred.shape}")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float | np.ndarray:
    """IoU of two bool masks (H, W) -> float, or of two stacks (T, H, W) -> (T,) array.

    An empty union gives 1 (both masks agree that the object is absent).
    """
    pred, gt = _check_pair(pred, gt, (2, 3))
    inter = np.logical_and(pred, gt).sum(axis=(-2, -1))
    union = np.logical_or(pred, gt).sum(axis=(-2, -1))
    j = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(j) if j.ndim == 0 else j


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """1-pixel boundary of a bool mask (H, W), by the toolkit's seg2bmap rule (module docstring)."""
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"boundary_map needs a non-empty 2-D mask, got shape {m.shape}")
    # Zero padding on the right and bottom stands for the outside neighbours.
    p = np.pad(m, ((0, 1), (0, 1)))
    right, down, diag = p[:-1, 1:], p[1:, :-1], p[1:, 1:]
    b = (m ^ right) | (m ^ down) | (m ^ diag)
    # The image's last row and column compare along the border only.
    b[-1, :] = m[-1, :] ^ right[-1, :]
    b[:, -1] = m[:, -1] ^ down[:, -1]
    b[-1, -1] = False
    return b


def boundary_tolerance(shape: tuple[int, int], bound_th: float = 0.008) -> int:
    """Dilation radius in pixels: ceil(bound_th * diagonal), or bound_th itself when >= 1."""
    if bound_th >= 1:
        if bound_th != int(bound_th):
            raise ValueError(f"a pixel tolerance (bound_th >= 1) must be a whole number, got {bound_th}")
        return int(bound_th)
    if bound_th <= 0:
        raise ValueError(f"bound_th must be positive, got {bound_th}")
    h, w = shape[-2:]
    return math.ceil(bound_th * math.sqrt(h * h + w * w))


@lru_cache(maxsize=16)
def _disc(radius: int) -> np.ndarray:
    """uint8 disc kernel: every offset (x, y) with x^2 + y^2 <= r^2 (as skimage.morphology.disk)."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return (x * x + y * y <= radius * radius).astype(np.uint8)


def _dilate(b: np.ndarray, radius: int) -> np.ndarray:
    # cv2's default border adds nothing outside the image, like the toolkit's call.
    return cv2.dilate(np.ascontiguousarray(b).view(np.uint8), _disc(radius)).view(bool)


def boundary_precision_recall(pred: np.ndarray, gt: np.ndarray,
                              bound_th: float = 0.008) -> tuple[float, float]:
    """Boundary precision and recall of a bool mask pair (H, W), with the toolkit's empty cases."""
    pred, gt = _check_pair(pred, gt, (2,))
    r = boundary_tolerance(gt.shape, bound_th)
    pb, gb = boundary_map(pred), boundary_map(gt)
    n_p, n_g = int(np.count_nonzero(pb)), int(np.count_nonzero(gb))
    if n_p == 0 and n_g == 0:
        return 1.0, 1.0
    if n_p == 0:
        return 1.0, 0.0
    if n_g == 0:
        return 0.0, 1.0
    # Dilate only the boundaries' bounding box grown by r: nothing outside it can match, and the
    # dilation's cost follows the area (this makes small objects cheap on large frames).
    rows, cols = np.flatnonzero((pb | gb).any(axis=1)), np.flatnonzero((pb | gb).any(axis=0))
    box = (slice(max(rows[0] - r, 0), rows[-1] + r + 1), slice(max(cols[0] - r, 0), cols[-1] + r + 1))
    pb, gb = pb[box], gb[box]
    precision = np.count_nonzero(pb & _dilate(gb, r)) / n_p
    recall = np.count_nonzero(gb & _dilate(pb, r)) / n_g
    return float(precision), float(recall)


def f_measure(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """Boundary F-measure of a bool mask pair (H, W): 2PR/(P+R), 0 when P+R = 0."""
    p, r = boundary_precision_recall(pred, gt, bound_th)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


# ----------------------------------------------------------------------------- per object

def _nanmean(x: np.ndarray) -> float:
    """nan-mean that returns NaN, without a warning, for empty or all-NaN input."""
    x = np.asarray(x, dtype=float)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


def recall(values: Sequence[float], threshold: float = 0.5) -> float:
    """Share of frames whose value exceeds ``threshold`` (NaN frames count as misses); NaN if none."""
    v = np.asarray(values, dtype=float)
    return float(np.mean(v > threshold)) if v.size else math.nan


def decay(values: Sequence[float]) -> float:
    """Toolkit decay: nan-mean of the first minus the last of four bins over the frames.

    Bin edges ``ids = round(linspace(1, n, 5) + 1e-10) - 1``; bin i is ``values[ids[i]:ids[i+1]+1]``
    (neighbouring bins share their edge frame). NaN for no frames.
    """
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return math.nan
    ids = (np.round(np.linspace(1, v.size, 5) + 1e-10) - 1).astype(int)
    first, last = v[ids[0]:ids[1] + 1], v[ids[3]:ids[4] + 1]
    return _nanmean(first) - _nanmean(last)


def robustness(iou: Sequence[float], tau: float) -> float:
    """R@tau for one object: share of frames with IoU >= tau, NaN IoU counted as a miss."""
    v = np.nan_to_num(np.asarray(iou, dtype=float), nan=0.0)
    return float(np.mean(v >= tau)) if v.size else math.nan


@dataclass(eq=False)
class ObjectScores:
    """Per-frame J and F of one object over its scored frames, and the per-object statistics."""

    J: np.ndarray
    F: np.ndarray
    frames: tuple = ()  # ids of the scored frames (indices or file names), if known

    @property
    def J_mean(self) -> float:
        return _nanmean(self.J)

    @property
    def F_mean(self) -> float:
        return _nanmean(self.F)

    @property
    def J_recall(self) -> float:
        return recall(self.J)

    @property
    def F_recall(self) -> float:
        return recall(self.F)

    @property
    def J_decay(self) -> float:
        return decay(self.J)

    @property
    def F_decay(self) -> float:
        return decay(self.F)

    @property
    def R(self) -> dict[float, float]:
        """R@tau for tau in TAUS, computed on J."""
        return {tau: robustness(self.J, tau) for tau in TAUS}


def _trim(n: int, drop_ends: bool) -> slice:
    if drop_ends and n < 3:
        raise ValueError(f"got {n} frame(s); the first and last frames are not scored, so at least 3 "
                         "are needed (pass drop_ends=False to score every frame)")
    if n == 0:
        raise ValueError("no frames to score")
    return slice(1, n - 1) if drop_ends else slice(0, n)


def score_object(pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray], *,
                 drop_ends: bool = True, bound_th: float = 0.008) -> ObjectScores:
    """J and F per frame of one object (bool masks, one per frame); first/last frames dropped."""
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"{len(pred_masks)} predicted masks for {len(gt_masks)} GT masks; "
                         "give one per frame")
    keep = range(len(gt_masks))[_trim(len(gt_masks), drop_ends)]
    j = np.array([jaccard(pred_masks[t], gt_masks[t]) for t in keep], dtype=float)
    f = np.array([f_measure(pred_masks[t], gt_masks[t], bound_th) for t in keep], dtype=float)
    return ObjectScores(j, f, tuple(keep))


def object_labels(gt_index_masks: Iterable[np.ndarray]) -> list[int]:
    """Object labels present in any GT frame, ascending; 0 and the void label 255 excluded."""
    found: set[int] = set()
    for m in gt_index_masks:
        found.update(int(v) for v in np.unique(m))
    return sorted(found - {0, VOID_LABEL})


def score_sequence(pred_index_masks: Sequence[np.ndarray], gt_index_masks: Sequence[np.ndarray],
                   labels: Sequence[int] | None = None, *, drop_ends: bool = True,
                   frames: Sequence[Hashable] | None = None,
                   bound_th: float = 0.008) -> dict[int, ObjectScores]:
    """Score every object of a sequence of index masks (H, W): ``{label: ObjectScores}``.

    Objects are ``labels`` or, by default, the labels present in any GT frame. GT 255 (void) is
    background. ``frames`` names the frames (default: their indices) in ``ObjectScores.frames``.
    """
    n = len(gt_index_masks)
    if len(pred_index_masks) != n:
        raise ValueError(f"{len(pred_index_masks)} predicted frames for {n} GT frames; give one per frame")
    if frames is not None and len(frames) != n:
        raise ValueError(f"{len(frames)} frame names for {n} frames")
    labels = object_labels(gt_index_masks) if labels is None else [int(v) for v in labels]
    if VOID_LABEL in labels or 0 in labels:
        raise ValueError(f"labels {labels} include 0 or {VOID_LABEL}, which are background/void, not objects")
    keep = range(n)[_trim(n, drop_ends)]
    names = tuple(keep) if frames is None else tuple(frames[t] for t in keep)
    j = np.empty((len(labels), len(keep)))
    f = np.empty_like(j)
    for k, t in enumerate(keep):
        pred, gt = np.asarray(pred_index_masks[t]), np.asarray(gt_index_masks[t])
        if pred.shape != gt.shape or gt.ndim != 2:
            raise ValueError(f"frame {names[k]}: prediction shape {pred.shape} differs from GT shape "
                             f"{gt.shape} (both must be the same (H, W))")
        # Void is never an object label here, so comparing against each label treats it as background.
        for i, lab in enumerate(labels):
            p_obj, g_obj = pred == lab, gt == lab
            j[i, k] = jaccard(p_obj, g_obj)
            f[i, k] = f_measure(p_obj, g_obj, bound_th)
    return {lab: ObjectScores(j[i], f[i], names) for i, lab in enumerate(labels)}


def summarize(objects: Iterable[ObjectScores]) -> dict[str, float]:
    """Averages over objects (not sequences): J, F, J&F, R@0.1/0.25/0.5, J/F-Recall, J/F-Decay.

    Fractions in [0, 1]. Plain means over objects, as the toolkit (NaN propagates); all NaN when
    there is no object.
    """
    objs = list(objects)
    if not objs:
        return {k: math.nan for k in SUMMARY_KEYS}

    def mean(vals: Iterable[float]) -> float:
        return float(np.mean(np.asarray(list(vals), dtype=float)))

    j, f = mean(o.J_mean for o in objs), mean(o.F_mean for o in objs)
    out = {"J": j, "F": f, "J&F": (j + f) / 2}
    for tau in TAUS:
        out[f"R@{tau}"] = mean(robustness(o.J, tau) for o in objs)
    out["J-Recall"] = mean(o.J_recall for o in objs)
    out["F-Recall"] = mean(o.F_recall for o in objs)
    out["J-Decay"] = mean(o.J_decay for o in objs)
    out["F-Decay"] = mean(o.F_decay for o in objs)
    return out


# ----------------------------------------------------------------------------- user workload

def workload(interactions: Mapping[Hashable, Sequence[int]],
             n_frames: Mapping[Hashable, int]) -> dict[str, float]:
    """User workload over objects (keys, e.g. (sequence, label)); see reference/metrics.md.

    ``interactions[o]``: frame index (0-based) of every *user* correction of object o, one entry
    per correction (pseudo-corrections must be left out by the caller); ``n_frames[o]`` = |F_o|.
    Every object of the evaluation must be in ``n_frames``; objects without corrections may be
    absent from ``interactions``.

    * ``N_oI``: total number of corrections (entries, repeats on one frame counted).
    * ``N_dI`` (ACI): per object, the distinct correction frames padded with frames 0 and
      |F_o| - 1 are sorted and split into gaps; with n_j gaps of length j,
      ACI_o = (1/|F_o|) * sum_{i=1..|F_o|} sum_{j<=i} n_j
            = (1/|F_o|) * sum over gaps g of (|F_o| + 1 - len(g)); then the mean over objects.
      (k corrections inside a long video give about k + (k + 2)/|F_o|; none gives 2/|F_o|.)
    * ``dI`` (IDI): mean distance in frames between consecutive distinct correction frames of
      the same object, pooled over objects; NaN when no object has two.
    * ``interaction_rate``: 100 * N_oI / sum of |F_o| (percent).
    """
    if not n_frames:
        raise ValueError("n_frames is empty: give the frame count of every evaluated object")
    unknown = [k for k in interactions if k not in n_frames]
    if unknown:
        raise ValueError(f"objects {unknown[:5]} have interactions but no frame count in n_frames")
    n_oi, acis, dists, total = 0, [], [], 0
    for obj, n in n_frames.items():
        n = int(n)
        if n < 1:
            raise ValueError(f"object {obj!r}: frame count must be >= 1, got {n}")
        frames = np.asarray(list(interactions.get(obj, ())), dtype=int)
        if frames.size and (frames.min() < 0 or frames.max() >= n):
            raise ValueError(f"object {obj!r}: interaction frames {sorted(frames.tolist())} "
                             f"fall outside 0..{n - 1}")
        n_oi += frames.size
        total += n
        gaps = np.diff(np.unique(np.concatenate([[0], frames, [n - 1]])))
        n_j = np.bincount(gaps, minlength=n + 1)  # n_j[j] = number of gaps of length j (j >= 1)
        acis.append(np.cumsum(n_j)[1:n + 1].sum() / n)
        dists.extend(np.diff(np.unique(frames)).tolist())
    return {
        "N_oI": n_oi,
        "N_dI": float(np.mean(acis)),
        "dI": float(np.mean(dists)) if dists else math.nan,
        "interaction_rate": 100.0 * n_oi / total,
    }


# ----------------------------------------------------------------------------- files

def _natural_key(name: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def _mask_files(seq_dir: Path) -> list[Path]:
    """PNG masks of a sequence, directly in it or in its masks/ folder, in natural order."""
    for d in (seq_dir, seq_dir / "masks"):
        files = [p for p in d.glob("*.png") if p.is_file()] if d.is_dir() else []
        if files:
            return sorted(files, key=lambda p: _natural_key(p.name))
    return []


def score_dirs(pred_dir: str | Path, gt_dir: str | Path) -> dict:
    """Score a DAVIS-layout prediction folder against a GT folder (``lazyxmem score``).

    Both folders hold ``<sequence>/*.png`` or ``<sequence>/masks/*.png``. The GT sequences and
    GT frames define what is scored (sparse GT allowed); prediction frames are matched by file
    name, and only the scored ones (all GT frames but the first and the last) must exist.
    Returns the :func:`summarize` keys averaged over all objects of all sequences, plus
    ``"sequences": {name: summary of its objects}``.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not d.is_dir():
            raise ValueError(f"{what} folder {d} does not exist")
    seqs = {p.name: files for p in sorted(gt_dir.iterdir()) if p.is_dir() and (files := _mask_files(p))}
    if not seqs:
        raise ValueError(f"no GT sequences under {gt_dir}: expected {gt_dir}/<sequence>/*.png "
                         f"or {gt_dir}/<sequence>/masks/*.png")
    all_objects: list[ObjectScores] = []
    per_seq: dict[str, dict] = {}
    for seq, gt_files in seqs.items():
        if len(gt_files) < 3:
            raise ValueError(f"sequence {seq!r}: {len(gt_files)} GT frame(s); at least 3 are needed "
                             "since the first and last GT frames are not scored")
        pred_seq = pred_dir / seq
        if not pred_seq.is_dir():
            raise ValueError(f"prediction for sequence {seq!r} is missing: expected folder {pred_seq}")
        pred_files = {p.name: p for p in _mask_files(pred_seq)}
        scored = gt_files[1:-1]
        missing = [g.name for g in scored if g.name not in pred_files]
        if missing:
            raise ValueError(f"sequence {seq!r}: {len(missing)} predicted frame(s) missing in {pred_seq}, "
                             f"e.g. {missing[:5]}")
        gt_masks = [read_index_mask(p) for p in gt_files]
        labels = object_labels(gt_masks)
        gt_scored = gt_masks[1:-1]
        pred_scored = []
        for g, gm in zip(scored, gt_scored):
            pm = read_index_mask(pred_files[g.name])
            if pm.shape != gm.shape:
                raise ValueError(f"sequence {seq!r}, frame {g.name}: prediction is "
                                 f"{pm.shape[1]}x{pm.shape[0]} but GT is {gm.shape[1]}x{gm.shape[0]} "
                                 "(WxH); predict at GT resolution")
            pred_scored.append(pm)
        objs = score_sequence(pred_scored, gt_scored, labels, drop_ends=False,
                              frames=[g.name for g in scored])
        per_seq[seq] = summarize(objs.values())
        all_objects.extend(objs.values())
    if not all_objects:
        raise ValueError(f"no object labels in any GT mask under {gt_dir}")
    out = summarize(all_objects)
    out["sequences"] = per_seq
    return out
