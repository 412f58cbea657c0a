"""The lazyxmem command and media handling on generated data, including every bad input it must
reject with a clear message (exit status 2, no traceback)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from lazyxmem_core.cli import main
from lazyxmem_core.errors import MediaError
from lazyxmem_core.media import (FrameDir, ImageFiles, VideoFrames, davis_palette, read_index_mask,
                                 video_header, write_index_mask)
from synthetic import make_video


def write_frames(folder: Path, frames) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return folder


def test_index_mask_round_trip_and_formats(tmp_path):
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:6] = 1
    m[6:9, 1:4] = 7
    write_index_mask(tmp_path / "p.png", m)
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert (read_index_mask(tmp_path / "p.png") == m).all()
    Image.fromarray((m > 0).astype(np.uint8) * 255, mode="L").save(tmp_path / "g.png")
    assert (read_index_mask(tmp_path / "g.png") == (m > 0)).all()  # DAVIS-2016 style 0/255
    Image.fromarray(davis_palette()[m]).save(tmp_path / "rgb.png")
    assert (read_index_mask(tmp_path / "rgb.png") == m).all()
    cv2.imwrite(str(tmp_path / "big.png"), m.astype(np.uint16) * 100)  # 16-bit PNG
    with pytest.raises(MediaError, match="label value 700"):
        read_index_mask(tmp_path / "big.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(MediaError, match="cannot read mask"):
        read_index_mask(tmp_path / "bad.png")


def write_avi(path: Path, frames) -> Path:
    """An MJPG AVI (OpenCV writes it everywhere) of RGB frames."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_video_file_is_decoded_with_random_access(tmp_path):
    video = make_video(n_frames=6, size=(64, 80))
    path = write_avi(tmp_path / "v.avi", video.frames)
    assert video_header(path) == (6, 10.0)  # count and rate as declared, read without decoding
    frames = VideoFrames(path)
    assert len(frames) == 6 and frames[3].shape == (64, 80, 3)
    assert np.abs(frames[5].astype(int) - video.frames[5]).mean() < 12  # lossy codec, same picture
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(MediaError, match="cannot decode video"):
        VideoFrames(tmp_path / "broken.mp4")
    with pytest.raises(MediaError, match="cannot decode video"):
        video_header(tmp_path / "broken.mp4")


def test_a_long_video_is_kept_jpeg_compressed_on_disk(tmp_path):
    video = make_video(n_frames=8, size=(96, 128))
    path = write_avi(tmp_path / "v.avi", video.frames)
    raw = VideoFrames(path)  # 8 x 36 KB: under the default limit
    small = VideoFrames(path, raw_limit_mb=0.1)  # 288 KB raw: over it
    assert not raw.compressed and small.compressed
    assert small.stored_bytes * 3 < raw.stored_bytes == 8 * 96 * 128 * 3
    assert len(small) == 8
    for t in (5, 0, -1, 5):  # random access, from the cache too
        f = small[t]
        assert f.shape == (96, 128, 3) and f.dtype == np.uint8 and not f.flags.writeable
        # Quality 95: the same picture (this noise texture is JPEG's worst case; DAVIS frames: 0.2-0.5).
        assert np.abs(f.astype(int) - raw[t]).mean() < 4.0 < np.abs(f.astype(int) - raw[t - 1]).mean()
    with pytest.raises(IndexError, match="outside the video"):
        small[8]


def test_image_files_decode_on_read_and_keep_only_a_few(tmp_path):
    video = make_video(n_frames=12, size=(40, 48))
    folder = write_frames(tmp_path / "frames", video.frames)
    frames = ImageFiles(sorted(folder.iterdir()), cache=3)
    assert len(frames) == 12
    for t in range(12):
        assert np.abs(frames[t].astype(int) - video.frames[t]).mean() < 12
        assert len(frames._cache) <= 3
    cv2.imwrite(str(folder / "99999.png"), np.zeros((10, 10, 3), np.uint8))
    odd = ImageFiles(sorted(folder.iterdir()))
    assert odd[0].shape == (40, 48, 3)
    with pytest.raises(MediaError, match="all frames of a video must have one size"):
        odd[12]


def test_frame_dir_errors(tmp_path):
    with pytest.raises(MediaError, match="does not exist"):
        FrameDir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MediaError, match="no frames"):
        FrameDir(tmp_path / "empty")


@pytest.fixture
def clip(tmp_path):
    video = make_video(n_frames=10, size=(72, 96), radius=14)
    frames = write_frames(tmp_path / "frames", video.frames)
    write_index_mask(tmp_path / "first.png", video.masks[0])
    return tmp_path, frames, video


def test_propagate_writes_masks_report_and_probs(clip):
    tmp, frames, video = clip
    out = tmp / "out"
    rc = main(["propagate", "--frames", str(frames), "--mask", str(tmp / "first.png"), "--out", str(out),
               "--engine", "embedded", "--refiner", "embedded", "--save-probs", str(tmp / "p.npz")])
    assert rc == 0
    masks = sorted(out.glob("*.png"))
    assert [p.stem for p in masks] == [f"{i:05d}" for i in range(10)]
    last = read_index_mask(masks[-1])
    inter = ((last == 1) & (video.masks[-1] == 1)).sum()
    union = ((last == 1) | (video.masks[-1] == 1)).sum()
    assert inter / union > 0.6
    report = json.loads((out / "report.json").read_text())
    assert len(report["frames"]) == 10 and "review_frames" in report
    f3 = report["frames"][3]["objects"]["1"]
    assert {"S", "dS", "decision", "clicks", "area"} <= set(f3)
    probs = np.load(tmp / "p.npz")
    assert sorted(probs.files, key=lambda k: int(k[6:]))[0] == "prob_t0" and len(probs.files) == 10
    p = probs["prob_t4"]
    assert p.dtype == np.float32 and p.shape == (2, 72, 96) and np.allclose(p.sum(0), 1, atol=1e-4)


def test_propagate_masks_dir_adds_an_object_later(clip):
    tmp, frames, video = clip
    masks = tmp / "given"
    masks.mkdir()
    write_index_mask(masks / "00000.png", video.masks[0])
    later = np.zeros_like(video.masks[0])
    later[5:20, 5:25] = 2
    write_index_mask(masks / "00004.png", later)
    out = tmp / "out2"
    assert main(["propagate", "--frames", str(frames), "--masks", str(masks), "--out", str(out),
                 "--engine", "embedded", "--no-lazy"]) == 0
    assert 2 not in np.unique(read_index_mask(out / "00003.png"))
    assert 2 in np.unique(read_index_mask(out / "00005.png"))


@pytest.mark.parametrize("case, message", [
    ("missing_frames", "does not exist"),
    ("missing_mask", "does not exist"),
    ("size", "must have the frames' size"),
    ("empty", "initial mask is empty"),
    ("label300", "label value 300"),
    ("bad_video", "cannot decode video"),
    ("mask_frame", "outside the video"),
])
def test_propagate_bad_inputs_give_clear_errors(clip, capsys, case, message):
    tmp, frames, video = clip
    mask = tmp / "first.png"
    args = ["--frames", str(frames)]
    extra: list[str] = []
    if case == "missing_frames":
        args = ["--frames", str(tmp / "nowhere")]
    elif case == "missing_mask":
        mask = tmp / "nomask.png"
    elif case == "size":
        write_index_mask(tmp / "small.png", np.ones((10, 10), np.uint8))
        mask = tmp / "small.png"
    elif case == "empty":
        write_index_mask(tmp / "zero.png", np.zeros((72, 96), np.uint8))
        mask = tmp / "zero.png"
    elif case == "label300":
        cv2.imwrite(str(tmp / "wide.png"), np.full((72, 96), 300, np.uint16))
        mask = tmp / "wide.png"
    elif case == "bad_video":
        (tmp / "x.mp4").write_bytes(b"garbage" * 100)
        args = ["--video", str(tmp / "x.mp4")]
    elif case == "mask_frame":
        extra = ["--mask-frame", "99"]
    rc = main(["propagate", *args, "--mask", str(mask), "--out", str(tmp / "o"), "--engine", "embedded", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err


def test_unknown_xmem_checkpoint_is_a_clear_error(clip, capsys):
    tmp, frames, _ = clip
    rc = main(["propagate", "--frames", str(frames), "--mask", str(tmp / "first.png"), "--out", str(tmp / "o"),
               "--engine", "xmem"])
    assert rc == 2 and "checkpoint" in capsys.readouterr().err


def test_score_command_prints_and_writes_json(tmp_path, capsys):
    gt, pred = tmp_path / "gt" / "seq", tmp_path / "pred" / "seq"
    gt.mkdir(parents=True)
    pred.mkdir(parents=True)
    for t in range(4):
        g = np.zeros((40, 40), np.uint8)
        g[10:30, 10:30] = 1
        p = np.zeros((40, 40), np.uint8)
        p[10:30, 10:20] = 1  # half of the object: J = 0.5 on every frame
        write_index_mask(gt / f"{t:05d}.png", g)
        write_index_mask(pred / f"{t:05d}.png", p)
    assert main(["score", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--json", str(tmp_path / "s.json")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["J"] == pytest.approx(0.5)
    assert {"J", "F", "J&F", "R@0.1", "R@0.25", "R@0.5", "sequences"} <= set(result)
    assert result["R@0.5"] == 1.0 and result["sequences"]["seq"]["J"] == pytest.approx(0.5)
    assert "seq" in capsys.readouterr().out
    assert main(["score", "--pred", str(tmp_path / "nope"), "--gt", str(tmp_path / "gt")]) == 2

