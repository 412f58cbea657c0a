"""What a reviewer is pointed at: per object, the stretches of frames the controller asked about
and those its own uncertainty says are most likely wrong, in that order, most uncertain first.

The controller asks about single frames (where a trigger fired); a one-frame mark is a tick a
reviewer can hardly find on a timeline, and the frames after it stay doubtful until the next
human anchor. A :class:`ReviewSpan` is the run of frames around such a frame (or around one of
the object's most uncertain frames) whose uncertainty stays high, with the frame to look at
first. Pure functions of a :class:`SessionView`: the backend only translates them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .session_view import SessionView


@dataclass(frozen=True)
class ReviewSpan:
    label: int  # the object
    start: int  # first frame (0-based, inclusive)
    end: int  # last frame (inclusive)
    peak: int  # the span's most uncertain frame: where to look first
    uncertainty: float  # the object's trigger score on ``peak`` (S or S + F: 0 certain, higher worse)
    requested: bool  # the span holds a frame whose correction the controller asked for


def review_spans(view: SessionView, per_object: int = 3, min_frames: int = 5, max_frames: int = 50,
                 floor: float = 0.05) -> list[ReviewSpan]:
    """Up to ``per_object`` spans per object, objects in label order; each object's spans that
    hold an unanswered request first (every request gets one, even past ``per_object``: the
    controller weighed more than one frame's score to ask), then the others, each group most
    uncertain first.

    A span grows from its seed frame while the uncertainty stays at or above half the seed's
    (and above the object's median: the object's usual level is not a reason to look), never over
    a frame with a human-given mask, to at most ``max_frames``; it is at least ``min_frames`` long
    where the video allows (a readable mark on the timeline), and spans of one object that overlap
    are merged. Frames whose uncertainty is below ``floor`` never seed a span: a certain object
    gets none.
    """
    spans: list[ReviewSpan] = []
    for label in view.labels:
        u = view.uncertainty.get(label, ())
        if not u:
            continue
        values = np.array([np.nan if x is None else float(x) for x in u])
        seen = ~np.isnan(values)
        if not seen.any():
            continue
        anchors = {t for t, _ in view.anchors.get(label, ())}
        median = float(np.median(values[seen]))
        requests = [t for t in view.requests.get(label, ()) if 0 <= t < len(values)]
        taken: list[ReviewSpan] = []

        def covered(t: int) -> bool:
            return any(s.start <= t <= s.end for s in taken)

        def span(lo: int, hi: int, requested: bool) -> ReviewSpan:
            inside = [t for t in range(lo, hi + 1) if seen[t]]
            peak = max(inside, key=lambda t: values[t]) if inside else lo
            return ReviewSpan(label, lo, hi, peak, round(float(values[peak]) if seen[peak] else 0.0, 4),
                              requested or any(lo <= t <= hi for t in requests))

        def add(seed: int, requested: bool) -> None:
            level = max(median, 0.5 * values[seed]) if seen[seed] else np.inf
            lo = hi = seed
            while hi - lo + 1 < max_frames:
                grew = False
                for nxt in (hi + 1, lo - 1):
                    if (0 <= nxt < len(values) and seen[nxt] and values[nxt] >= level and nxt not in anchors
                            and not covered(nxt) and hi - lo + 1 < max_frames):
                        lo, hi, grew = min(lo, nxt), max(hi, nxt), True
                if not grew:
                    break
            while hi - lo + 1 < min_frames and (hi + 1 < len(values) or lo > 0):  # readable on a timeline
                if hi + 1 < len(values):
                    hi += 1
                if hi - lo + 1 < min_frames and lo > 0:
                    lo -= 1
            # Spans of one object that overlap (after padding) are one stretch to review.
            for other in [s for s in taken if s.start <= hi and lo <= s.end]:
                taken.remove(other)
                lo, hi, requested = min(lo, other.start), max(hi, other.end), requested or other.requested
            taken.append(span(lo, hi, requested))

        for t in sorted(requests, key=lambda t: -values[t] if seen[t] else 0.0):
            if not covered(t):
                add(t, True)
        for t in np.argsort(-np.where(seen, values, -np.inf), kind="stable"):
            if len(taken) >= per_object:
                break
            t = int(t)
            if not seen[t] or values[t] < floor:
                break  # the order is descending: the rest are lower, or never seen
            if t not in anchors and not covered(t):
                add(t, False)
        spans.extend(sorted(taken, key=lambda s: (not s.requested, -s.uncertainty)))
    return spans
