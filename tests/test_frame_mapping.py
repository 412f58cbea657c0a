"""Label Studio frame numbers and decoded frames are the same frames, at 24, 25, 29.97 and 30 fps,
under a config whose frameRate is the video's and under the shipped frameRate="25".

The videos are real H.264 files (ffmpeg); what the browser shows on a Label Studio frame is taken
from the file's own presentation times (ffprobe), not from the mapping under test: Label Studio
1.23.2 seeks frame N to (N - 1) / frameRate rounded to 2 ms plus 2 ms, and a browser shows the
last frame whose time is not after that.
"""
from __future__ import annotations

import logging
import subprocess

import numpy as np
import pytest

from backend import convert
from backend.frames import FrameMap, ls_frame_rate, ls_seek_time, ls_to_video, task_frame_map, video_to_ls
from backend.labelconfig import ConfigError, parse_label_config
from lazyxmem_core.media import VideoFrames
from lazyxmem_core.review import ReviewSpan
from synthetic import write_h264

W, H, SIDE, STEP, N = 160, 64, 10, 2, 60  # the object moves STEP pixels a frame
CFG = ('<View><Video name="video" value="$video" frameRate="{rate}"/><Labels name="label" toName="video">'
       '<Label value="Object"/></Labels><VideoRectangle name="box" toName="video"/>'
       '<TimelineLabels name="review" toName="video"><Label value="Needs review"/></TimelineLabels></View>')
RATES = [24.0, 25.0, 29.97, 30.0]


def object_x(i: int) -> int:
    return 4 + STEP * i


def frames_bgr() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(N):
        f = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)  # texture: no two frames alike
        f[20:20 + SIDE, object_x(i):object_x(i) + SIDE] = 255
        out.append(f)
    return out


@pytest.fixture(scope="module", params=RATES, ids=lambda r: f"{r:g}fps")
def video(request, tmp_path_factory):
    """(path, decoded frames, presentation times) of an H.264 video at the given rate."""
    path = str(tmp_path_factory.mktemp("fm") / f"v{request.param:g}.mp4")
    write_h264(path, frames_bgr(), fps=request.param)
    pts = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts_time",
                          "-of", "csv=p=0", path], capture_output=True, text=True, check=True).stdout.split()
    decoded = VideoFrames(path)
    assert len(decoded) == len(pts) == N  # every frame written is there, once
    return path, decoded, np.array([float(p.strip(",")) for p in pts])


def shown_by_browser(pts: np.ndarray, ls_frame: int, cfg_fps: float) -> int:
    """The decoded frame a browser shows after Label Studio seeks to its frame ``ls_frame``."""
    return int(np.searchsorted(pts, ls_seek_time(ls_frame, cfg_fps) + 1e-9, side="right") - 1)


def decoded_mask(frame: np.ndarray) -> np.ndarray:
    return frame.min(axis=2) > 180  # the white square, as decoded


def box_at(sequence: list[dict], frame: int) -> tuple[float, ...] | None:
    """The box Label Studio draws on ``frame``: linear between keyframes, shown on a disabled
    keyframe itself and gone after it."""
    keys = ("x", "y", "width", "height")
    before = [k for k in sequence if k["frame"] <= frame]
    if not before:
        return None
    a = before[-1]
    after = [k for k in sequence if k["frame"] > frame]
    if a["frame"] == frame or (a["enabled"] and not after):
        return tuple(a[c] for c in keys)
    if not a["enabled"]:
        return None
    b = after[0]
    s = (frame - a["frame"]) / (b["frame"] - a["frame"])
    return tuple(a[c] + (b[c] - a[c]) * s for c in keys)


@pytest.mark.parametrize("cfg_rate", ["25", "video"])
def test_a_predicted_box_on_each_label_studio_frame_is_on_the_object_the_browser_shows(video, cfg_rate):
    path, decoded, pts = video
    cfg_fps = decoded.fps if cfg_rate == "video" else float(cfg_rate)
    cfg = parse_label_config(CFG.format(rate=f"{cfg_fps:g}" if cfg_rate == "25" else "$fps"))
    fmap = task_frame_map(cfg.frame_rate_attr, {"fps": decoded.fps}, decoded.fps, len(decoded))
    assert fmap.ls_fps == pytest.approx(cfg_fps)
    masks = [decoded_mask(decoded[i]).astype(np.uint8) for i in range(len(decoded))]
    (track,) = convert.video_results(cfg, masks, [(1, "Object")], [], [], decoded.fps, frames=fmap)
    seq = track["value"]["sequence"]
    assert track["value"]["framesCount"] == round(len(decoded) / decoded.fps * cfg_fps + 1e-9) == fmap.ls_count
    lag = []
    for k in range(1, fmap.ls_count + 1):
        shown = shown_by_browser(pts, k, cfg_fps)
        x = box_at(seq, k)[0] * W / 100
        assert abs(x - object_x(shown)) < 1.0, (k, shown, x)
        assert fmap.to_video(k) == shown
        lag.append(shown - (k - 1))
    if cfg_rate == "25" and decoded.fps != 25.0:
        # the same masks numbered one per decoded frame would sit this many frames off the object
        assert max(abs(v) for v in lag) >= 2
    # the times are those of the frames: (N - 1) / frameRate
    assert all(k["time"] == pytest.approx((k["frame"] - 1) / cfg_fps, abs=1e-4) for k in seq)


@pytest.mark.parametrize("cfg_rate", ["25", "video"])
def test_a_keyframe_drawn_on_label_studio_frame_k_lands_on_the_frame_the_user_saw(video, cfg_rate):
    path, decoded, pts = video
    cfg_fps = decoded.fps if cfg_rate == "video" else 25.0
    cfg = parse_label_config(CFG.format(rate=f"{cfg_fps:g}" if cfg_rate == "25" else "$fps"))
    fmap = task_frame_map(cfg.frame_rate_attr, {"fps": decoded.fps}, decoded.fps, len(decoded))
    for k in (1, 7, 20, 41, fmap.ls_count):
        seen = shown_by_browser(pts, k, cfg_fps)
        x = object_x(seen)
        kf = {"frame": k, "x": 100 * x / W, "y": 100 * 20 / H, "width": 100 * SIDE / W, "height": 100 * SIDE / H,
              "rotation": 0, "enabled": True, "time": k / cfg_fps}
        region = {"id": "r1", "from_name": "box", "to_name": "video", "type": "videorectangle",
                  "value": {"sequence": [kf], "labels": ["Object"]}}
        (p,) = convert.video_prompts([region], cfg, W, H, len(decoded), frames=fmap)
        assert p.frame == seen, (k, p.frame, seen)
        assert convert.keyframe_index(kf, "r1", fmap) == seen
        # the box drawn is on the object of that decoded frame
        m = decoded_mask(decoded[p.frame])
        ys, xs = np.nonzero(m)
        assert abs(xs.min() - p.box.x0) <= 1 and abs(xs.max() + 1 - p.box.x1) <= 1


def test_review_spans_and_interactive_boxes_use_the_same_frames(video):
    _, decoded, pts = video
    cfg = parse_label_config(CFG.format(rate="25"))
    fmap = FrameMap(25.0, decoded.fps, len(decoded))
    masks = [decoded_mask(decoded[i]).astype(np.uint8) for i in range(len(decoded))]
    out = convert.video_results(cfg, masks, [(1, "Object")], [ReviewSpan(1, 30, 30, 30, 0.5, True)], [],
                                decoded.fps, frames=fmap)
    (span,) = [r for r in out if r["type"] == "timelinelabels"]
    for rng in span["value"]["ranges"]:
        for k in range(rng["start"], rng["end"] + 1):
            assert shown_by_browser(pts, k, 25.0) == 30
    (answer,) = convert.interactive_results(cfg, {(30, 1): masks[30].astype(bool)}, [(1, "Object")],
                                            len(decoded), decoded.fps, frames=fmap)
    (kf,) = answer["value"]["sequence"]
    assert shown_by_browser(pts, kf["frame"], 25.0) == 30 and kf["frame"] == video_to_ls(30, 25.0, decoded.fps, N)


def test_label_studio_counts_63_frames_for_60_at_24_fps_under_frame_rate_25():
    fmap = FrameMap(25.0, 24.0, 60)
    assert fmap.ls_count == 63 and not fmap.matched
    assert [fmap.to_video(k) for k in range(1, 8)] == [0, 1, 1, 2, 3, 4, 5]  # 25 frames a second show 24
    assert fmap.to_video(63) == 59 and fmap.to_video(1000) == 59
    assert FrameMap.identity(29.97, 100).matched and FrameMap(30.0, 30.0, 10).to_video(10) == 9
    for i in range(60):  # every decoded frame of a slower video has a Label Studio frame
        assert ls_to_video(fmap.to_ls(i), 25.0, 24.0, 60) == i


def test_frame_rate_is_read_the_way_label_studio_reads_it(caplog):
    assert ls_frame_rate("$fps", {"fps": 29.97}) == (29.97, None)
    assert ls_frame_rate("$fps", {"fps": "30"}) == (30.0, None)
    rate, why = ls_frame_rate("$fps", {})
    assert rate == 24.0 and "no data.fps" in why  # Label Studio's fallback, said
    assert ls_frame_rate(None, None) == (24.0, None)
    assert ls_frame_rate("0.5", None) == (2.0, None)  # below 1: its inverse, as Label Studio does
    assert parse_label_config(CFG.format(rate="$fps")).frame_rate is None
    assert parse_label_config(CFG.format(rate="30")).frame_rate == 30.0
    assert parse_label_config(CFG.replace(' frameRate="{rate}"', "")).frame_rate == 24.0
    with pytest.raises(ConfigError, match="frameRate"):
        parse_label_config(CFG.format(rate="fast"))
    with caplog.at_level(logging.WARNING, logger="backend.frames"):
        task_frame_map("$fps", {}, 30.0, 90, task_id=7)
    assert "task 7" in caplog.text and "data.fps" in caplog.text and "90" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="backend.frames"):
        task_frame_map("$fps", {"fps": 30}, 30.0, 90, task_id=8)
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="backend.frames"):
        assert task_frame_map("25", {}, 24.0, None, task_id=9) is None  # a container without a count
    assert "task 9" in caplog.text and "unknown" in caplog.text


def test_a_keyframe_past_the_label_studio_count_is_refused():
    fmap = FrameMap(25.0, 24.0, 60)
    with pytest.raises(convert.TaskError, match=r"outside the video \(1\.\.63"):
        convert.keyframe_index({"frame": 64}, "region r1", fmap)


def test_the_track_keeps_the_drawn_box_on_the_frame_it_was_drawn():
    cfg = parse_label_config(CFG.format(rate="25"))
    masks = [np.zeros((H, W), np.uint8) for _ in range(10)]
    for i, m in enumerate(masks):
        m[20:20 + SIDE, object_x(i):object_x(i) + SIDE] = 1
    kf = {"frame": 4, "x": 1.0, "y": 28.0, "width": 9.5, "height": 20.0, "rotation": 0, "enabled": True}
    region = {"id": "r1", "from_name": "box", "to_name": "video", "type": "videorectangle",
              "value": {"sequence": [kf], "labels": ["Object"]}}
    prompts = convert.video_prompts([region], cfg, W, H, len(masks))
    drawn = convert.drawn_boxes(prompts)
    assert drawn == {(3, 1): (1.0, 28.0, 9.5, 20.0)}
    (track,) = convert.video_results(cfg, masks, [(1, "Object")], [], [], 25.0, drawn=drawn)
    on4 = box_at(track["value"]["sequence"], 4)
    assert on4 == pytest.approx((1.0, 28.0, 9.5, 20.0))  # what the user drew, not the mask's bounding box
    assert box_at(track["value"]["sequence"], 6)[0] == pytest.approx(100 * object_x(5) / W)


def test_the_service_keeps_predictions_and_corrections_on_the_frames_label_studio_shows(video, tmp_path):
    """End to end through the backend (Flask test client, a stand-in Label Studio serving the
    file) under the shipped frameRate="25": the posted track sits on the object of the frame the
    browser shows, and a box drawn on Label Studio frame k corrects that same decoded frame."""
    import threading
    from http.server import ThreadingHTTPServer
    from pathlib import Path

    from backend.app import create_app
    from backend.settings import BackendSettings
    from fake_ls import TOKEN, FakeLabelStudio
    from lazyxmem_core.engines import EngineSettings

    path, decoded, pts = video
    FakeLabelStudio.files["/data/upload/9/fm.mp4"] = Path(path).read_bytes()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeLabelStudio)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        app = create_app(BackendSettings(ls_url=f"http://127.0.0.1:{srv.server_address[1]}", api_key=TOKEN,
                                         cache_dir=str(tmp_path / "cache"),
                                         engine=EngineSettings(engine="embedded", refiner="embedded")))
        client, service = app.test_client(), app.config["model"]
        cfg = CFG.format(rate="25")
        pct = lambda x, y: {"x": 100 * x / W, "y": 100 * y / H, "width": 100 * SIDE / W, "height": 100 * SIDE / H}
        start = {"frame": 1, **pct(object_x(0), 20), "rotation": 0, "enabled": True}
        region = {"id": "r1", "from_name": "box", "to_name": "video", "type": "videorectangle",
                  "value": {"sequence": [start], "labels": ["Object"]}}
        task = {"id": 91, "data": {"video": "/data/upload/9/fm.mp4"}, "annotations": [{"id": 1, "result": [region]}]}
        r = client.post("/predict", json={"tasks": [task], "label_config": cfg})
        assert r.status_code == 200, r.json
        seq = next(x for x in r.json["results"][0]["result"] if x["type"] == "videorectangle")["value"]["sequence"]
        count = FrameMap(25.0, float(decoded.fps), N).ls_count
        off = []
        for k in range(1, count + 1):
            box = box_at(seq, k)
            if box is not None:
                off.append(abs(box[0] * W / 100 - object_x(shown_by_browser(pts, k, 25.0))))
        assert len(off) >= 0.9 * count and np.median(off) <= STEP and np.mean(np.array(off) <= 2 * STEP) > 0.9, off
        # The annotator boxes the object on Label Studio frame k: the correction is the frame shown there.
        k = count - 10
        t = shown_by_browser(pts, k, 25.0)
        kf = {"frame": k, **pct(object_x(t) - 4, 16), "rotation": 0, "enabled": True}  # a looser box than predicted
        kf.update(width=kf["width"] * 1.8, height=kf["height"] * 1.8)
        click = {"id": "lazyxmem-1", "from_name": "box", "to_name": "video", "type": "videorectangle",
                 "value": {"sequence": [kf], "labels": ["Object"]}}
        r = client.post("/predict", json={"tasks": [task], "label_config": cfg, "params": {"context": {"result": [click]}}})
        assert r.status_code == 200, r.json
        answer = r.json["results"][0]["result"][0]["value"]["sequence"]
        # on the first Label Studio frame that shows decoded frame t (k itself, or the one before it
        # when two Label Studio frames show the same picture)
        assert len(answer) == 1 and shown_by_browser(pts, answer[0]["frame"], 25.0) == t, (answer, k, t)
        state = service.tasks.held(91)
        assert {f for f, _ in state.corrections} == {t}, (state.corrections.keys(), t)
    finally:
        srv.shutdown()
