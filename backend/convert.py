"""Label Studio JSON <-> core types. Frames are 1-based and geometry is in percent in Label Studio;
0-based and in pixels in the core. Video frame numbers go through a :class:`~backend.frames.FrameMap`
both ways: Label Studio counts at the config's frameRate, not at the video's own rate."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from lazyxmem_core.errors import LazyXMemError
from lazyxmem_core.review import ReviewSpan
from lazyxmem_core.types import Box, Click, Correction

from .checks import MAX_INDEX, check_brush, number, shown, whole
from .frames import FrameMap
from .labelconfig import AUTO_LABEL, REVIEW_LABEL, LabelConfig


class TaskError(LazyXMemError):
    """A task or region the backend cannot use; the message says what is wrong."""


REVIEW_MARKER = (0.0, 0.0, 3.0, 3.0)  # x, y, width, height (%) of an image item's "Needs review" region
_OWN_ID = re.compile(r"^lazyxmem-(\d+)(?:-\d+)?$")


def object_key(region_id: str) -> str:
    """Regions this backend predicted carry ids ``lazyxmem-<object>[-<frame>]``: one key per object."""
    m = _OWN_ID.match(region_id)
    return f"lazyxmem-{m.group(1)}" if m else region_id


def own_object(region_id: str) -> int | None:
    """The object value of a region this backend predicted (``lazyxmem-<object>[-<frame>]``)."""
    m = _OWN_ID.match(region_id)
    return int(m.group(1)) if m else None


def first_per_object(prompts: list[ObjectPrompt]) -> list[ObjectPrompt]:
    """Keep each object's earliest prompt (an annotation made from a prediction holds every frame)."""
    best: dict[str, ObjectPrompt] = {}
    for p in prompts:
        key = object_key(p.key)
        if key not in best or p.frame < best[key].frame:
            best[key] = p
    return sorted(best.values(), key=lambda p: (p.frame, p.key))


@dataclass
class ObjectPrompt:
    """One object as the annotator gave it: where it starts and what shape it was given there."""

    key: str  # Label Studio region id
    label: str  # the label text, kept on the predictions
    frame: int  # 0-based frame of the first keyframe / item
    box: Box | None = None
    mask: np.ndarray | None = None
    clicks: list[Click] = field(default_factory=list)
    drawn: tuple[float, float, float, float] | None = None  # a video box as drawn: x, y, width, height (%)


def drawn_boxes(prompts: Sequence[ObjectPrompt]) -> dict[tuple[int, int], tuple[float, float, float, float]]:
    """(decoded frame, object value) -> the box the user drew there, for :func:`video_results`'
    ``drawn``; objects are numbered from 1 in the prompts' order, as the session numbers them."""
    return {(p.frame, value): p.drawn for value, p in enumerate(prompts, start=1) if p.drawn is not None}


def pct_box(v: dict, width: int, height: int, where: str) -> Box:
    missing = [k for k in ("x", "y", "width", "height") if k not in v]
    if missing:
        raise TaskError(f"{where}: a box needs numeric x, y, width, height (percent); {', '.join(missing)} missing")
    # NaN passes every range test below (comparisons with NaN are false) and became a full-frame box
    x, y, w, h = (number(v[k], f"{where}: box {k}") for k in ("x", "y", "width", "height"))
    if w <= 0 or h <= 0 or x < -0.5 or y < -0.5 or x + w > 100.5 or y + h > 100.5:
        raise TaskError(f"{where}: box x={x} y={y} width={w} height={h} lies outside the frame (percent, 0..100)")
    x0, y0 = max(0.0, x) * width / 100, max(0.0, y) * height / 100
    x1, y1 = min(100.0, x + w) * width / 100, min(100.0, y + h) * height / 100
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise TaskError(f"{where}: box is smaller than a pixel")
    return Box(x0, y0, x1, y1)


def keyframe_index(k: dict, where: str, frames: FrameMap | None = None) -> int:
    """A keyframe's 0-based decoded frame (Label Studio counts from 1; no frame: the first).
    Without ``frames`` Label Studio frame N is taken as decoded frame N - 1 (the rates agree)."""
    frame = whole(k.get("frame", 1), f"{where}: keyframe frame", 1, MAX_INDEX)
    if frames is None:
        return frame - 1
    if frame > frames.ls_count:
        raise TaskError(f"{where}: keyframe {frame} is outside the video (1..{frames.ls_count} at "
                        f"frameRate {frames.ls_fps:g})")
    return frames.to_video(frame)


def item_index(r: dict, where: str) -> int:
    """A region's item of an image sequence (none: the first)."""
    return whole(r.get("item_index", 0) or 0, f"{where}: item_index", 0, MAX_INDEX)


def label_of(value: dict) -> str:
    for key in ("labels", "brushlabels", "rectanglelabels", "keypointlabels"):
        if value.get(key):
            return str(value[key][0])
    return "Object"


def video_prompts(results: Iterable[dict], cfg: LabelConfig, width: int, height: int, n_frames: int,
                  frames: FrameMap | None = None) -> list[ObjectPrompt]:
    """Objects from VideoRectangle regions: the first enabled keyframe of each is its initial box,
    on the decoded frame ``frames`` maps it to."""
    prompts = []
    for r in results:
        if r.get("type") != "videorectangle" or r.get("from_name") != cfg.output.name:
            continue
        seq = [k for k in (r.get("value") or {}).get("sequence") or [] if k.get("enabled", True)]
        if not seq:
            continue
        where = f"region {shown(r.get('id'))}"
        first = min(seq, key=lambda k: keyframe_index(k, where, frames))
        frame = keyframe_index(first, where, frames)
        if not 0 <= frame < n_frames:
            raise TaskError(f"{where}: keyframe {frame + 1} is outside the video (1..{n_frames})")
        box = pct_box(first, width, height, f"{where} frame {first.get('frame', 1)}")
        drawn = tuple(float(first[k]) for k in ("x", "y", "width", "height"))
        prompts.append(ObjectPrompt(str(r.get("id")), label_of(r.get("value") or {}), frame, box=box, drawn=drawn))
    return prompts


def decode_rle(data: bytes) -> np.ndarray:
    """Label Studio's brush RLE (``label_studio_sdk.converter.brush.decode_rle``'s format and
    results), read from the bytes themselves: the SDK's first turns the RLE into a list of one
    string per bit, 64 bytes of memory per bit (3 GB for a 50 MB RLE) before it reads a run.

    Like the SDK's, a read past the end gives the bits that are there and fails only when none
    are; callers check the header (:func:`backend.checks.check_brush`) before calling this."""
    nbits, pos = len(data) * 8, 0

    def read(size: int) -> int:
        nonlocal pos
        got = min(size, nbits - pos)
        if got <= 0:
            raise ValueError("the RLE ends before its last value")
        start, end = pos >> 3, (pos + got + 7) >> 3
        chunk = int.from_bytes(data[start:end], "big") >> (end * 8 - pos - got)
        pos += size
        return chunk & ((1 << got) - 1)

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if repeat:
            out[i:j] = read(word)
        else:
            out[i:j] = [read(word) for _ in range(j - i)]  # IndexError past num, like the SDK's
        i = j
    return out


def decode_brush(value: dict, width: int, height: int, where: str) -> np.ndarray:
    rle = value.get("rle")
    if not isinstance(rle, list) or not rle:
        raise TaskError(f"{where}: brush region has no RLE")
    check_brush(value, width, height, where)  # a decoder allocates what the header declares: check it first
    try:
        rgba = decode_rle(bytes(rle))
    except Exception as exc:
        raise TaskError(f"{where}: brush RLE cannot be decoded ({shown(exc)})") from None
    return rgba.reshape(height, width, 4)[..., 3] > 127


def image_prompts(results: Iterable[dict], cfg: LabelConfig, sizes: Sequence[tuple[int, int]]) -> list[ObjectPrompt]:
    """Objects from brush masks, rectangles or keypoints on any item of an image sequence.

    Each region (not each label) is an object; a "Needs review" rectangle is not an object.
    """
    names = {c.name for c in cfg.shapes}
    prompts = []
    for r in results:
        if r.get("from_name") not in names:
            continue
        value = r.get("value") or {}
        label = label_of(value)
        if label == REVIEW_LABEL:
            continue
        item = item_index(r, f"region {shown(r.get('id'))}")
        if not 0 <= item < len(sizes):
            raise TaskError(f"region {shown(r.get('id'))}: item_index {item} is outside the sequence "
                            f"(0..{len(sizes) - 1})")
        width, height = sizes[item]
        where = f"region {shown(r.get('id'))} on item {item}"
        kind = r.get("type")
        p = ObjectPrompt(str(r.get("id")), label, item)
        if kind == "brushlabels":
            p.mask = decode_brush(value, width, height, where)
            if not p.mask.any():
                continue
        elif kind == "rectanglelabels":
            p.box = pct_box(value, width, height, where)
        elif kind == "keypointlabels":
            x, y = (number(value.get(k, -1), f"{where}: keypoint {k}") for k in ("x", "y"))
            if not (0 <= x <= 100 and 0 <= y <= 100):
                raise TaskError(f"{where}: keypoint ({x}, {y}) lies outside the frame (percent, 0..100)")
            p.clicks = [Click(min(x * width / 100, width - 1), min(y * height / 100, height - 1),
                              bool(r.get("is_positive", True)))]
        else:
            continue
        prompts.append(p)
    return prompts


# -- core -> Label Studio ---------------------------------------------------------------------
def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """(x, y, width, height) in percent of the mask's bounding box; None when empty."""
    x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
    if w == 0 or h == 0:
        return None
    H, W = mask.shape
    return 100 * x / W, 100 * y / H, 100 * w / W, 100 * h / H


def keyframes(boxes: Sequence[tuple[float, float, float, float] | None], tolerance: float = 0.5) -> list[dict]:
    """VideoRectangle keyframes (1-based) for per-frame boxes (None = object absent).

    A keyframe is emitted only where Label Studio's linear interpolation between keyframes would
    deviate from the box by more than ``tolerance`` percent; the last visible frame before an
    absence gets ``enabled: false`` (Label Studio hides the box after it).
    """
    out: list[dict] = []
    n = len(boxes)
    t = 0
    while t < n:
        if boxes[t] is None:
            t += 1
            continue
        run_end = t  # the visible run [t, run_end]
        while run_end + 1 < n and boxes[run_end + 1] is not None:
            run_end += 1
        a = t
        out.append(keyframe(a, boxes[a], True))
        while a < run_end:
            b = a + 1
            while b + 1 <= run_end and _fits(boxes, a, b + 1, tolerance):
                b += 1
            out.append(keyframe(b, boxes[b], True))
            a = b
        if run_end + 1 < n:  # the object disappears after run_end
            out[-1]["enabled"] = False
        t = run_end + 1
    return out


def _fits(boxes: Sequence, a: int, b: int, tol: float) -> bool:
    A, B = np.asarray(boxes[a]), np.asarray(boxes[b])
    for i in range(a + 1, b):
        interp = A + (B - A) * (i - a) / (b - a)
        if np.abs(interp - np.asarray(boxes[i])).max() > tol:
            return False
    return True


def keyframe(t: int, box: tuple[float, float, float, float], enabled: bool) -> dict:
    x, y, w, h = box
    return {"frame": t + 1, "x": round(x, 4), "y": round(y, 4), "width": round(w, 4), "height": round(h, 4),
            "rotation": 0, "enabled": enabled}


def frame_ranges(frames: Iterable[int]) -> list[dict]:
    """Consecutive 0-based frames merged into 1-based inclusive ranges."""
    ranges: list[dict] = []
    for t in sorted(set(frames)):
        if ranges and ranges[-1]["end"] == t:  # previous end is t-1 in 1-based = t
            ranges[-1]["end"] = t + 1
        else:
            ranges.append({"start": t + 1, "end": t + 1})
    return ranges


def video_results(cfg: LabelConfig, masks: Sequence[np.ndarray], objects: Sequence[tuple[int, str]],
                  spans: Sequence[ReviewSpan], pseudo: Iterable[int], fps: float, tolerance: float = 0.5,
                  frames: FrameMap | None = None,
                  drawn: dict[tuple[int, int], tuple[float, float, float, float]] | None = None) -> list[dict]:
    """VideoRectangle tracks per object, a "Needs review" TimelineLabels region per review span (in
    the spans' order, with its note when the config has a per-region TextArea) and one
    "Auto-corrected" region.

    masks: index masks for every decoded frame (frames before an object's start are simply empty).
    objects: (core label value, label text) pairs.
    frames: how Label Studio numbers the frames (default: at ``fps``, one per decoded frame); each
    Label Studio frame gets the box of the decoded frame it shows, so a track drawn at another
    rate than the video's still sits on the object.
    drawn: (decoded frame, object value) -> the (x, y, width, height) percent box the user drew
    there: the track keeps it on that frame (a mask's bounding box is not the box drawn).
    """
    n = len(masks)
    fmap = frames or FrameMap.identity(fps, n)
    out = []
    boxes_of: dict[int, list] = {value: [] for value, _ in objects}
    for m in masks:  # each frame read once (a session unpacks it per read)
        for value, boxes in boxes_of.items():
            boxes.append(mask_box(m == value))
    for (t, value), box in (drawn or {}).items():
        if value in boxes_of and 0 <= t < n and boxes_of[value][t] is not None:
            boxes_of[value][t] = tuple(float(v) for v in box)
    for value, text in objects:
        seq = keyframes(fmap.resample(boxes_of[value]), tolerance)
        for k in seq:
            k["time"] = round(fmap.time(k["frame"]), 4)
        if not seq:
            continue
        out.append({"id": f"lazyxmem-{value}", "from_name": cfg.output.name, "to_name": cfg.object_tag,
                    "type": "videorectangle", "origin": "prediction",
                    "value": {"framesCount": fmap.ls_count, "duration": round(fmap.duration, 4), "labels": [text],
                              "sequence": seq}})
    names = dict(objects)
    if cfg.review is not None and REVIEW_LABEL in cfg.review.labels:
        for k, span in enumerate(spans):
            # A decoded frame Label Studio never shows (its rate below the video's) is named by
            # the frame it seeks to for it.
            ls_frames = fmap.ls_frames_of(list(range(span.start, span.end + 1))) or [fmap.to_ls(span.start) - 1]
            first, last = min(ls_frames) + 1, max(ls_frames) + 1
            peak = min(max(fmap.to_ls(span.peak), first), last)
            rid = f"lazyxmem-review-{span.label}-{k}"
            out.append({"id": rid, "from_name": cfg.review.name, "to_name": cfg.object_tag, "type": "timelinelabels",
                        "value": {"ranges": [{"start": first, "end": last}], "timelinelabels": [REVIEW_LABEL]}})
            out.extend(review_note(cfg, rid, span, names, "frames", first, last, peak))
    if cfg.review is not None and AUTO_LABEL in cfg.review.labels:
        ranges = frame_ranges(fmap.ls_frames_of(list(pseudo)))
        if ranges:
            out.append({"id": "lazyxmem-auto", "from_name": cfg.review.name, "to_name": cfg.object_tag,
                        "type": "timelinelabels", "value": {"ranges": ranges, "timelinelabels": [AUTO_LABEL]}})
    return out


def review_note(cfg: LabelConfig, region_id: str, span: ReviewSpan, names: Mapping[int, str], unit: str,
                first: int, last: int, peak: int) -> list[dict]:
    """The text under a review region in the Regions panel: which object, which frames (in Label
    Studio's numbering), the one to check first, and whether the controller asked about it (the
    regions come in the spans' order: asked first, then the most uncertain)."""
    if cfg.review_note is None:
        return []
    where = f"{unit} {first}-{last}" if last > first else f"{unit[:-1]} {first}"
    text = f"{names.get(span.label, 'Object')} {span.label}: {where}, check {peak}" + (" (asked)" if span.requested else "")
    return [{"id": region_id, "from_name": cfg.review_note.name, "to_name": cfg.object_tag, "type": "textarea",
             "value": {"text": [text]}}]


def image_results(cfg: LabelConfig, masks: Sequence[np.ndarray], objects: Sequence[tuple[int, str]],
                  review: Iterable[int], pseudo: Iterable[int], spans: Sequence[ReviewSpan] = ()) -> list[dict]:
    """BrushLabels masks per object per item, per-item review choices on the requested items, and a
    "Needs review" marker per review span on its most uncertain item (in the spans' order, with
    its note when the config has a per-region TextArea). The markers come first: the Regions panel
    lists regions in this order, the reviewer's list on top of the per-item masks."""
    markers: list[dict] = []
    if cfg.review_box is not None:
        names = dict(objects)
        for k, span in enumerate(spans):
            t = span.peak
            h, w = masks[t].shape
            # A marker in the frame's corner, not a box around the objects: in Label Studio 1.23.2
            # a region takes the clicks made inside it (it gets selected), so a box over the
            # object would swallow the very clicks that correct it. Listed in the Regions panel,
            # a click on it still jumps to the frame.
            box = REVIEW_MARKER
            rid = f"lazyxmem-review-{span.label}-{k}"
            markers.append({"id": rid, "from_name": cfg.review_box.name, "to_name": cfg.object_tag,
                            "type": "rectanglelabels", "item_index": t, "original_width": w, "original_height": h,
                            "image_rotation": 0,
                            "value": {"x": box[0], "y": box[1], "width": box[2], "height": box[3], "rotation": 0,
                                      "rectanglelabels": [REVIEW_LABEL]}})
            markers.extend({**r, "item_index": t}
                           for r in review_note(cfg, rid, span, names, "items", span.start + 1, span.end + 1, t + 1))
    out = []
    for t, m in enumerate(masks):
        h, w = m.shape
        for value, text in objects:
            obj = m == value
            if not obj.any():
                continue
            out.append({"id": f"lazyxmem-{value}-{t}", "from_name": cfg.output.name, "to_name": cfg.object_tag,
                        "type": "brushlabels", "item_index": t, "original_width": w, "original_height": h,
                        "image_rotation": 0,
                        "value": {"format": "rle", "rle": mask2rle((obj * 255).astype(np.uint8)), "brushlabels": [text]}})
    review, pseudo = sorted(set(review)), sorted(set(pseudo))
    marks = {t: [REVIEW_LABEL] for t in review}
    for t in pseudo:
        marks.setdefault(t, []).append(AUTO_LABEL)
    if cfg.review is not None:
        for t, choices in sorted(marks.items()):
            choices = [c for c in choices if c in cfg.review.labels]
            if choices:
                out.append({"id": f"lazyxmem-mark-{t}", "from_name": cfg.review.name, "to_name": cfg.object_tag,
                            "type": "choices", "item_index": t, "value": {"choices": choices}})
    return markers + out


def interactive_results(cfg: LabelConfig, answers: dict[tuple[int, int], np.ndarray],
                        objects: Sequence[tuple[int, str]], n_frames: int, fps: float,
                        frames: FrameMap | None = None) -> list[dict]:
    """The regions an interactive call answers with: each corrected object's mask on its frame
    (image sequences: a brush on that item; video: a one-keyframe box on the first Label Studio
    frame that shows the decoded frame, see :func:`video_results`)."""
    names = dict(objects)
    out: list[dict] = []
    for (t, value), mask in answers.items():
        single = np.where(mask, value, 0).astype(np.uint8)
        if cfg.mode == "images":
            for r in image_results(cfg, [single], [(value, names[value])], (), ()):
                r["item_index"], r["id"] = t, f"lazyxmem-{value}-{t}"
                out.append(r)
            continue
        box = mask_box(mask)
        if box is not None:
            fmap = frames or FrameMap.identity(fps, n_frames)
            kf = keyframe(fmap.to_ls(t) - 1, box, True)
            kf["time"] = round(fmap.time(kf["frame"]), 4)
            out.append({"id": f"lazyxmem-{value}", "from_name": cfg.output.name, "to_name": cfg.object_tag,
                        "type": "videorectangle",
                        "value": {"framesCount": fmap.ls_count, "labels": [names[value]], "sequence": [kf]}})
    return out


def pct(box: Box, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """A pixel :class:`Box` as Label Studio's percent (x, y, width, height)."""
    h, w = shape
    return 100 * box.x0 / w, 100 * box.y0 / h, 100 * (box.x1 - box.x0) / w, 100 * (box.y1 - box.y0) / h


def as_drawn(results: list[dict], corrections: Mapping[tuple[int, int], Correction], shape: tuple[int, int],
             frames: FrameMap | None = None) -> list[dict]:
    """Video answers keep the box the user drew on that frame (the mask it gives is what enters
    the propagation): a box that came back as the mask's bounding box read as not taken."""
    boxes = {key: c.box for key, c in corrections.items() if c.box is not None and c.mask is None and not c.clicks}
    for r in results:
        own = own_object(str(r.get("id", "")))
        if r.get("type") != "videorectangle" or own is None:
            continue
        for k in r["value"]["sequence"]:
            box = boxes.get((frames.to_video(k["frame"]) if frames is not None else k["frame"] - 1, own))
            if box is not None:
                k.update(zip(("x", "y", "width", "height"), pct(box, shape)))
    return results
