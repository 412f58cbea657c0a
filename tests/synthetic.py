"""Small synthetic videos with ground truth, generated in the tests (no data files needed).

Textured objects move over a textured background; options add an occluder, a look-alike
distractor crossing the target, a sudden appearance change, and an object leaving the frame and
coming back.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def texture(h: int, w: int, base: tuple[int, int, int], seed: int, scale: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, (h // scale + 2, w // scale + 2, 3)).astype(np.float32)
    noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)[:h, :w]
    return np.clip(np.asarray(base, np.float32) + 18 * noise, 0, 255).astype(np.uint8)


@dataclass
class Video:
    frames: list[np.ndarray]
    masks: list[np.ndarray]  # index masks, uint8

    @property
    def shape(self) -> tuple[int, int]:
        return self.frames[0].shape[:2]


def make_video(
    n_frames: int = 24,
    size: tuple[int, int] = (120, 160),  # (H, W)
    n_objects: int = 1,
    radius: int = 18,
    occluder: bool = False,
    distractor: bool = False,
    appearance_change_at: int | None = None,
    leave_and_return: bool = False,
    seed: int = 0,
) -> Video:
    h, w = size
    bg = texture(h, w, (70, 110, 60), seed)
    colours = [(200, 60, 50), (50, 70, 200), (220, 200, 40), (160, 40, 180)]
    skins = [texture(h, w, colours[k % 4], seed + 10 + k, scale=4) for k in range(n_objects)]
    frames, masks = [], []
    for t in range(n_frames):
        img = bg.copy()
        mask = np.zeros((h, w), np.uint8)
        for k in range(n_objects):
            cy = int(h * (0.3 + 0.4 * k / max(1, n_objects - 1))) if n_objects > 1 else h // 2
            cx = int(radius + 4 + (w - 2 * radius - 8) * t / max(1, n_frames - 1))
            if k % 2:
                cx = w - cx
            if leave_and_return and k == 0:
                # out of the frame to the right in the middle third, back afterwards
                third = n_frames // 3
                if third <= t < 2 * third:
                    cx = w + 3 * radius
            obj = np.zeros((h, w), np.uint8)
            cv2.circle(obj, (cx, cy), radius, 1, -1)
            skin = skins[k]
            if appearance_change_at is not None and t >= appearance_change_at and k == 0:
                skin = 255 - skin
            img[obj > 0] = skin[obj > 0]
            mask[obj > 0] = k + 1
        if distractor:
            dx = int(w - radius - 4 - (w - 2 * radius - 8) * t / max(1, n_frames - 1))
            d = np.zeros((h, w), np.uint8)
            cv2.circle(d, (dx, h // 2 + radius // 2), radius, 1, -1)
            img[d > 0] = skins[0][d > 0]
            mask[d > 0] = 0
        if occluder:
            x0 = w // 2 - 10
            img[:, x0:x0 + 20] = (30, 30, 30)
            mask[:, x0:x0 + 20] = 0
        frames.append(img)
        masks.append(mask)
    return Video(frames, masks)


def _check_frames(frames: list[np.ndarray], fps: float) -> tuple[int, int]:
    if not frames:
        raise ValueError("no frames to write: pass a non-empty list of HxWx3 uint8 BGR images")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    h, w = frames[0].shape[:2]
    for i, f in enumerate(frames):
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3 or f.shape[:2] != (h, w):
            raise ValueError(f"frame {i} is {f.dtype} {f.shape}; every frame must be uint8 ({h}, {w}, 3) BGR")
    return h, w


def write_webm(path: str, frames: list[np.ndarray], fps: float = 25.0) -> str:
    """Write BGR frames as a VP8 WebM, a codec Label Studio's web player plays.

    (OpenCV's default ``mp4v`` does not play there, and its wheels cannot write H.264.) OpenCV
    logs a harmless "tag 'VP80' is not supported" line and then writes a valid VP8 stream.
    """
    h, w = _check_frames(frames, fps)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"VP80"), float(fps), (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write VP8 WebM to {path}: its FFmpeg backend lacks libvpx")
    try:
        for f in frames:
            writer.write(f)
    finally:
        writer.release()
    return str(path)


def write_h264(path: str, frames: list[np.ndarray], fps: float = 25.0) -> str:
    """Write BGR frames as an H.264 mp4 through the system ffmpeg (browser-playable)."""
    import shutil
    import subprocess

    h, w = _check_frames(frames, fps)
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("ffmpeg is not installed: `apt-get install ffmpeg` (make test does it)")
    # yuv420p needs even sizes; pad by one pixel rather than fail on odd test frames.
    cmd = [ffmpeg, "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24",
           "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(path)]
    data = b"".join(np.ascontiguousarray(f).tobytes() for f in frames)
    done = subprocess.run(cmd, input=data, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({done.returncode}): {done.stderr.decode(errors='replace')[-500:]}")
    return str(path)


def make_jump_video(n_frames: int, size: tuple[int, int] = (240, 320), radius: int = 26,
                    jump_at: int | None = None, margin: int = 6, seed: int = 5) -> Video:
    """A blue textured disc crossing a green textured background from left to right, that jumps
    from the upper third to the lower third of the frame at ``jump_at`` (never: ``None``).

    The jump is what an annotator's correction is for: a tracker that follows local motion
    loses the disc there, and a box or a mask given after the jump must bring it back. Masks are
    index masks (1 = the disc). ``size`` = (H, W); ``margin``: pixels between the disc and the
    left and right edges at its first and last frame (an editor may crop the edges a little).
    """
    if n_frames < 2:
        raise ValueError(f"n_frames must be at least 2 for a moving disc, got {n_frames}")
    h, w = size
    if not (4 <= radius <= 0.28 * h and 2 * (radius + margin) < w and margin >= 0):
        # both rows (0.35 h, 0.72 h) must hold the disc, and it must have room to move
        raise ValueError(f"radius {radius} with margin {margin} does not fit a {w}x{h} frame: use a radius "
                         f"of 4..{int(0.28 * h)} and radius + margin below {w // 2}")
    bg = texture(h, w, (70, 110, 60), seed)
    skin = texture(h, w, (200, 60, 50), seed + 10, scale=4)
    frames, masks = [], []
    for t in range(n_frames):
        cx = int(radius + margin + (w - 2 * (radius + margin)) * t / (n_frames - 1))
        cy = int(h * 0.35) if jump_at is None or t < jump_at else int(h * 0.72)
        mask = np.zeros((h, w), np.uint8)
        cv2.circle(mask, (cx, cy), radius, 1, -1)
        img = bg.copy()
        img[mask > 0] = skin[mask > 0]
        frames.append(img)
        masks.append(mask)
    return Video(frames, masks)
