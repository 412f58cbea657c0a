"""Edits: what a task, an interactive context or an annotation says, as core corrections.

Pure functions of Label Studio JSON and the task's current masks: they hold no state and call
no engine. A correction keeps what the user gave (clicks, a box, a painted mask); turning it into
a mask is the core's job (``lazyxmem_core.session_view.correction_mask``), one way for everyone.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from lazyxmem_core.types import Click, Correction

from . import convert
from .checks import shown
from .convert import ObjectPrompt, TaskError, keyframe_index, object_key
from .frames import FrameMap
from .labelconfig import REVIEW_LABEL, LabelConfig

Corrections = dict[tuple[int, int], Correction]  # (0-based frame, object value) -> correction


def initial_regions(task: dict) -> list[dict]:
    """The regions of the task's latest annotation (or draft) of the user's own: where its objects
    are defined. An annotation made from a prediction (``parent_prediction``) is the model's work
    edited, not where the objects start; it counts only when there is no other."""
    anns = [a for a in (task.get("annotations") or []) if isinstance(a, dict) and not a.get("was_cancelled")]
    anns += [d for d in task.get("drafts") or [] if isinstance(d, dict)]
    anns = [a for a in anns if not a.get("parent_prediction")] or anns
    if not anns:
        return []
    latest = max(anns, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0))
    return latest.get("result") or []


def start_regions(results: list[dict]) -> list[dict]:
    """Where each object starts: a video region's first enabled keyframe, an image region as it
    is. Keyframes added later (corrections on the user's own annotation) do not move the start."""
    out = []
    for r in results:
        seq = (r.get("value") or {}).get("sequence") if isinstance(r, dict) and r.get("type") == "videorectangle" else None
        if isinstance(seq, list):
            first = min((k for k in seq if isinstance(k, dict) and k.get("enabled", True)),
                        key=lambda k: k.get("frame") or 0, default=None)
            r = {**r, "value": {**r["value"], "sequence": [first] if first else []}}
        out.append(r)
    return out


def start_digest(task: dict) -> str:
    """What a session is built from: the task's media and where its objects start."""
    what = {"data": task.get("data") or {}, "regions": start_regions(initial_regions(task))}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def moved_start(start: list[dict], results: list[dict]) -> bool:
    """Whether ``results`` move where one of the ``start`` regions starts (the same region id,
    another first keyframe or item)."""
    ids = {str(r.get("id")) for r in start if isinstance(r, dict)}
    again = [r for r in start_regions(results) if isinstance(r, dict) and str(r.get("id")) in ids]
    return bool(edited_since(start_regions(start), again))


def _same_keyframe(a: dict, b: dict) -> bool:
    return bool(a.get("enabled", True)) == bool(b.get("enabled", True)) and all(
        isinstance(a.get(k), (int, float)) and isinstance(b.get(k), (int, float)) and abs(a[k] - b[k]) < 1e-4
        for k in ("x", "y", "width", "height"))


def edited_since(parent: list[dict], results: list[dict]) -> list[dict]:
    """What the annotator changed in an annotation made from the prediction ``parent``: keyframes
    and brush masks equal to the prediction's (same region id, same frame or item) are left out,
    so a copy of an older prediction brings only its edits, never its stale frames."""
    by_id = {str(r.get("id")): r for r in parent if isinstance(r, dict)}
    out = []
    for r in results:
        before = by_id.get(str(r.get("id"))) if isinstance(r, dict) else None
        if before is None or before.get("type") != r.get("type"):
            out.append(r)
            continue
        if r.get("type") == "videorectangle":
            old = {k.get("frame"): k for k in (before.get("value") or {}).get("sequence") or [] if isinstance(k, dict)}
            seq = [k for k in (r.get("value") or {}).get("sequence") or []
                   if not (isinstance(k, dict) and k.get("frame") in old and _same_keyframe(k, old[k.get("frame")]))]
            if seq:
                out.append({**r, "value": {**r["value"], "sequence": seq}})
        elif r.get("item_index") != before.get("item_index") or r.get("value") != before.get("value"):
            out.append(r)
    return out


def initial_prompts(results: list[dict], cfg: LabelConfig, size: tuple[int, int], n_frames: int,
                    frames: FrameMap | None = None) -> list[ObjectPrompt]:
    """Each object's first region: where its track starts. ``size`` is (width, height);
    ``frames``: how Label Studio's frame numbers map to the decoded frames (video)."""
    w, h = size
    if cfg.mode == "video":
        return convert.first_per_object(convert.video_prompts(results, cfg, w, h, n_frames, frames))
    return convert.first_per_object(convert.image_prompts(results, cfg, [(w, h)] * n_frames))


def object_count(cfg: LabelConfig, results: list[dict]) -> int:
    """How many objects the regions define, counted the way :func:`initial_prompts` keeps them
    (one per region id, ``lazyxmem-<object>-<frame>`` ids one per object) but without decoding a
    mask or reading a frame: a task with too many is refused before anything is fetched or queued.
    An upper bound: a brush that turns out empty is no object."""
    keys = set()
    names = {c.name for c in cfg.shapes}
    for r in results:
        value = r.get("value") or {}
        if r.get("from_name") not in names:
            continue
        if cfg.mode == "video":
            if r.get("type") != "videorectangle" or not any(k.get("enabled", True) for k in value.get("sequence") or []):
                continue
        elif r.get("type") not in ("brushlabels", "rectanglelabels", "keypointlabels") or \
                convert.label_of(value) == REVIEW_LABEL:
            continue
        keys.add(object_key(str(r.get("id"))))
    return len(keys)


def frames_named(cfg: LabelConfig, results: list[dict], first_only: bool = False,
                 frames: FrameMap | None = None) -> set[int]:
    """The 0-based frames that regions are drawn on (``first_only``: each region's first), read
    without the frames themselves."""
    out: set[int] = set()
    for r in results:
        if not isinstance(r, dict):
            continue
        if cfg.mode == "images":
            if r.get("type") in ("brushlabels", "rectanglelabels", "keypointlabels"):
                out.add(convert.item_index(r, f"region {shown(r.get('id'))}"))
            continue
        if r.get("type") != "videorectangle":
            continue
        where = f"region {shown(r.get('id'))}"
        seq = [keyframe_index(k, where, frames) for k in (r.get("value") or {}).get("sequence") or []
               if k.get("enabled", True)]
        if seq:
            out.update([min(seq)] if first_only else seq)
    return out


def object_for(objects: Sequence[tuple[int, str]], mask: np.ndarray, label: str | None,
               point: tuple[float, float] | None) -> int:
    """The object a click or box refers to: by label text when unambiguous, else by position on
    the frame's index ``mask``."""
    candidates = [v for v, text in objects if label is not None and text == label] or [v for v, _ in objects]
    if len(candidates) == 1 or point is None:
        return candidates[0]
    x, y = int(point[0]), int(point[1])
    if mask[y, x] in candidates:
        return int(mask[y, x])
    dists = []
    for v in candidates:
        ys, xs = np.nonzero(mask == v)
        dists.append(np.min((xs - x) ** 2 + (ys - y) ** 2) if len(xs) else np.inf)
    return candidates[int(np.argmin(dists))]


Drawn = dict[tuple[int, int], tuple[float, ...]]  # (frame, object) -> the percent box a track shows there as drawn


def interactive_corrections(cfg: LabelConfig, objects: Sequence[tuple[int, str]], masks: Sequence[np.ndarray],
                            results: list[dict], drawn: Drawn | None = None,
                            frames: FrameMap | None = None) -> Corrections:
    """An interactive context (keypoints, a box, a brush on one frame) -> corrections."""
    if cfg.mode != "images":
        return video_box_edits(cfg, objects, masks, results, drawn=drawn, frames=frames)
    h, w = masks[0].shape
    out: Corrections = {}
    clicks: dict[tuple[int, int], list[Click]] = {}
    for p in convert.image_prompts(results, cfg, [(w, h)] * len(masks)):
        point = (p.clicks[0].x, p.clicks[0].y) if p.clicks else (
            ((p.box.x0 + p.box.x1) / 2, (p.box.y0 + p.box.y1) / 2) if p.box else None)
        value = object_for(objects, masks[p.frame], p.label, point)
        if p.mask is not None:
            out[(p.frame, value)] = Correction(mask=p.mask)
        elif p.box is not None:
            out[(p.frame, value)] = Correction(box=p.box, clicks=tuple(clicks.get((p.frame, value), ())))
        else:
            clicks.setdefault((p.frame, value), []).extend(p.clicks)
    for key, cl in clicks.items():
        prev = out.get(key)
        out[key] = Correction(clicks=tuple(cl), box=prev.box if prev else None)
    return out


def video_box_edits(cfg: LabelConfig, objects: Sequence[tuple[int, str]], masks: Sequence[np.ndarray],
                    results: list[dict], tolerance: float = 1.0, drawn: Drawn | None = None,
                    frames: FrameMap | None = None) -> Corrections:
    """Keyframes whose box differs from the predicted track by more than ``tolerance`` percent.
    ``drawn``: boxes the track shows as drawn (starts, earlier corrections) instead of its mask's."""
    out: Corrections = {}
    n = len(masks)
    for r in results:
        if r.get("type") != "videorectangle":
            continue
        value_d = r.get("value") or {}
        text = convert.label_of(value_d)
        seq = [k for k in value_d.get("sequence") or [] if k.get("enabled", True)]
        rid = str(r.get("id", ""))
        for k in seq:
            t = keyframe_index(k, f"region {shown(rid)}", frames)
            if not 0 <= t < n:
                raise TaskError(f"region {shown(rid)}: keyframe {t + 1} is outside the video (1..{n})")
            mask = masks[t]
            h, w = mask.shape
            box = convert.pct_box(k, w, h, f"region {shown(rid)} frame {t + 1}")
            own = convert.own_object(rid)
            value = own if own in {v for v, _ in objects} else object_for(
                objects, mask, text, ((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2))
            predicted = (drawn or {}).get((t, value)) or convert.mask_box(mask == value)
            given = (k["x"], k["y"], k["width"], k["height"])
            if predicted is None or max(abs(float(a) - b) for a, b in zip(given, predicted)) > tolerance:
                out[(t, value)] = Correction(box=box)
    return out


def image_edits(cfg: LabelConfig, objects: Sequence[tuple[int, str]], masks: Sequence[np.ndarray],
                results: list[dict], min_iou: float = 0.97) -> Corrections:
    """Brush masks that differ from the predicted mask of their object on that item."""
    h, w = masks[0].shape
    out: Corrections = {}
    for p in convert.image_prompts(results, cfg, [(w, h)] * len(masks)):
        if p.mask is None:
            continue
        candidates = [v for v, text in objects if text == p.label] or [v for v, _ in objects]
        predicted = masks[p.frame]
        ious = []
        for v in candidates:
            pred = predicted == v
            union = (pred | p.mask).sum()
            ious.append((pred & p.mask).sum() / union if union else 1.0)
        best = int(np.argmax(ious))
        if ious[best] < min_iou:
            out[(p.frame, candidates[best])] = Correction(mask=p.mask)
    return out


def annotation_corrections(cfg: LabelConfig, objects: Sequence[tuple[int, str]], masks: Sequence[np.ndarray],
                           annotation: dict, drawn: Drawn | None = None,
                           frames: FrameMap | None = None) -> Corrections:
    """The frames where a submitted annotation differs from the prediction."""
    results = annotation.get("result") or []
    if cfg.mode == "images":
        return image_edits(cfg, objects, masks, results)
    return video_box_edits(cfg, objects, masks, results, drawn=drawn, frames=frames)


def same_correction(a: Correction | None, b: Correction) -> bool:
    if a is None or (a.mask is None) != (b.mask is None) or a.clicks != b.clicks or a.box != b.box:
        return False
    return a.mask is None or np.array_equal(np.asarray(a.mask, bool), np.asarray(b.mask, bool))
