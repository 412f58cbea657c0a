"""The reviewer's ordered list: spans of doubtful frames per object, most uncertain first."""
from __future__ import annotations

import numpy as np

from lazyxmem_core.review import review_spans
from lazyxmem_core.session_view import SessionView
from lazyxmem_core.types import PackedMask


def view(uncertainty: dict[int, list[float | None]], requests: dict[int, tuple[int, ...]] = {},
         anchors: dict[int, tuple[int, ...]] = {}) -> SessionView:
    n = len(next(iter(uncertainty.values())))
    empty = PackedMask.pack(np.zeros((4, 4), np.uint8))
    return SessionView(None, n, (4, 4), tuple(sorted(uncertainty)), (empty,) * n, {},
                       {k: tuple((t, empty) for t in ts) for k, ts in anchors.items()},
                       tuple(sorted({t for ts in requests.values() for t in ts})), (), 0.5,
                       {k: tuple(v) for k, v in uncertainty.items()}, dict(requests))


def test_a_drift_is_one_span_around_its_peak_and_stops_at_the_anchor():
    u = [0.02] * 40
    u[20:31] = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.7, 0.6, 0.5, 0.45, 0.41]  # a slow loss, peak on 25
    spans = review_spans(view({1: u}, anchors={1: (0, 29)}), per_object=1)
    assert len(spans) == 1
    s = spans[0]
    assert (s.label, s.peak, s.uncertainty) == (1, 25, 0.8)
    assert s.start == 21 and s.end == 28, s  # >= 0.4 (half the peak) left of it; stops before anchor 29
    assert not s.requested


def test_requests_always_get_a_span_and_come_first_then_the_most_uncertain():
    u = [0.02] * 60
    u[10] = 0.2   # asked by the controller, but not the most uncertain
    u[40] = 0.9
    u[50] = 0.6
    spans = review_spans(view({1: u}, requests={1: (10,)}), per_object=2)
    assert [s.peak for s in spans] == [10, 40]  # the request, then the most uncertain; 50 is third
    assert [s.requested for s in spans] == [True, False]
    spans = review_spans(view({1: u}, requests={1: (10, 50)}), per_object=2)
    assert [s.peak for s in spans] == [50, 10]  # both requests, most uncertain first, fill the slots
    for s in spans:  # a lone frame becomes a span a timeline can show
        assert s.end - s.start + 1 >= 5 and s.start <= s.peak <= s.end


def test_objects_listed_separately_and_a_certain_object_gets_nothing():
    a = [0.01] * 30
    b = [None] * 5 + [0.5] * 25  # enters on frame 5, doubtful throughout
    spans = review_spans(view({1: a, 2: b}), per_object=3, max_frames=10)
    assert {s.label for s in spans} == {2}
    assert all(s.end - s.start + 1 <= 10 and s.start >= 5 for s in spans)
    covered = [t for s in spans for t in range(s.start, s.end + 1)]
    assert len(covered) == len(set(covered)), "spans of one object never overlap"


def test_spans_survive_the_bytes_a_worker_hands_over():
    u = {1: [0.1, None, 0.7, 0.2], 3: [None, None, 0.3, 0.3]}
    v = view(u, requests={1: (2,)})
    back = SessionView.from_bytes(v.to_bytes())
    assert back.uncertainty == v.uncertainty and back.requests == v.requests
    assert review_spans(back) == review_spans(v)


def test_spans_become_regions_with_their_notes_in_order():
    from pathlib import Path

    from backend import convert
    from backend.labelconfig import parse_label_config
    from lazyxmem_core.review import ReviewSpan

    spans = [ReviewSpan(1, 2, 6, 4, 0.7, True), ReviewSpan(1, 8, 9, 9, 0.3, False)]
    masks = [np.pad(np.ones((2, 2), np.uint8), 1)] * 10  # object 1 on every item
    images = parse_label_config(Path("backend/configs/image_sequence.xml").read_text())
    out = convert.image_results(images, masks, [(1, "Object")], [4], [], spans)
    markers = [r for r in out if r["from_name"] == images.review_box.name]
    notes = {r["id"]: r for r in out if r["type"] == "textarea"}
    assert [m["item_index"] for m in markers] == [4, 9]  # each span's most uncertain item, in the spans' order
    first_brush = next(k for k, r in enumerate(out) if r["type"] == "brushlabels")
    assert all(out.index(m) < first_brush for m in markers), "the reviewer's list tops the Regions panel"
    assert [notes[m["id"]]["value"]["text"][0] for m in markers] == [
        "Object 1: items 3-7, check 5 (asked)", "Object 1: items 9-10, check 10"]
    assert [r["item_index"] for r in out if r["type"] == "choices"] == [4]  # the asked item keeps its choice

    video = parse_label_config(Path("backend/configs/video.xml").read_text())
    out = convert.video_results(video, masks, [(1, "Object")], spans, [7], 25.0)
    regions = [r for r in out if r["type"] == "timelinelabels"]
    assert [(r["value"]["timelinelabels"], r["value"]["ranges"]) for r in regions] == [
        (["Needs review"], [{"start": 3, "end": 7}]), (["Needs review"], [{"start": 9, "end": 10}]),
        (["Auto-corrected"], [{"start": 8, "end": 8}])]
    notes = {r["id"]: r["value"]["text"][0] for r in out if r["type"] == "textarea"}
    assert notes[regions[0]["id"]] == "Object 1: frames 3-7, check 5 (asked)"
    bare = parse_label_config(Path("backend/configs/video.xml").read_text().replace("perRegion=\"true\"", ""))
    assert bare.review_note is None and not [r for r in convert.video_results(bare, masks, [(1, "Object")], spans, [],
                                                                              25.0) if r["type"] == "textarea"]


def test_a_sessions_requests_are_inside_spans_marked_asked():
    from lazyxmem_core.lazy import LazyConfig, LazySession
    from test_failure import FramesOf, Shrinking, scene

    img, mask = scene()
    n = 24
    session = LazySession(Shrinking(img, mask, 40), FramesOf(img, n), {0: mask.astype(np.uint8)},
                          config=LazyConfig(pseudo=False, udu=False, score="combined", tau_f=0.5, tau_u=5.0))
    session.run()
    v = SessionView.from_bytes(session.view().to_bytes())
    assert v.requests[1] == tuple(session.review_frames) and session.review_frames
    assert len(v.uncertainty[1]) == n
    spans = review_spans(v)
    for t in session.review_frames:  # every request is inside a span marked as asked
        assert any(s.requested and s.start <= t <= s.end for s in spans), (t, spans)
    asked = [s.uncertainty for s in spans if s.requested]
    assert spans[:len(asked)] == [s for s in spans if s.requested] and asked == sorted(asked, reverse=True)
    assert all(s.peak != 0 for s in spans), "the given frame is an anchor, never the frame to check"
