"""Synthetic composites from the development sequences: development material that is not DAVIS.

    python bench/composites.py [--data DIR] [--out DIR] [--frames 50]

Each composite pastes the (articulating, real) object of one development sequence, cut out with
its ground-truth mask frame by frame, onto the frames of another sequence (its real background,
camera motion and its own object, which becomes a distractor), along a known path. Each one adds
one of three events, the failures seen on unseen video:

* ``occlusion``: a band of the background's own texture slides across the object for a while;
* ``exit``: the object leaves the frame, stays out some frames and comes back;
* ``zoom``: the object shrinks to half its size and grows back while it moves.

Composites are built within a fold (object and background from the same half of the sequences,
``FOLDS``), so cross-validation keeps them apart. Deterministic; written in DAVIS layout
(``<out>/<name>/frames/*.jpg``, ``masks/*.png``) to a cache folder, never committed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lazyxmem_core.media import FrameDir, read_index_mask, write_index_mask  # noqa: E402

# The two cross-validation folds of the development sequences (alphabetical halves: no choice made
# by looking at results).
FOLDS: tuple[tuple[str, ...], tuple[str, ...]] = (
    ("blackswan", "bmx-trees", "breakdance", "camel", "car-roundabout"),
    ("car-shadow", "cows", "dance-twirl", "dog", "drift-chicane"),
)
EVENTS = ("occlusion", "exit", "zoom")


def default_data() -> Path:
    return Path(os.environ.get("LAZYXMEM_DATA", ROOT.parent / "shared" / "data"))


def _load(seq: Path) -> tuple[list[Path], list[Path]]:
    frames = sorted((seq / "frames").glob("*.jpg"))
    masks = sorted((seq / "masks").glob("*.png"))
    if not frames or len(frames) != len(masks):
        raise SystemExit(f"{seq}: expected as many frames/*.jpg as masks/*.png (a mask on every frame)")
    return frames, masks


def _path(t: int, n: int, w: int, h: int, event: str, size: float) -> tuple[float, float, float]:
    """Centre (x, y) and scale of the pasted object on frame t: a slow sinusoidal sweep."""
    u = t / max(1, n - 1)
    x = 0.25 * w + 0.5 * w * u
    y = 0.55 * h + 0.12 * h * math.sin(2 * math.pi * u)
    scale = 1.0
    if event == "zoom":
        scale = 1.0 - 0.5 * math.sin(math.pi * u)  # 1 -> 0.5 -> 1
    if event == "exit" and 0.35 <= u <= 0.65:
        # Out through the right edge and back: centre beyond the frame by the object's size.
        k = 1.0 - abs(u - 0.5) / 0.15
        x = x + k * (w - x + size)
    return x, y, scale


def compose(obj_seq: Path, bg_seq: Path, event: str, n_frames: int, out: Path) -> None:
    """Write one composite of ``n_frames`` frames to ``out``."""
    of, om = _load(obj_seq)
    bf, _ = _load(bg_seq)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    first = cv2.imread(str(bf[0]))
    h, w = first.shape[:2]
    size = None
    for t in range(n_frames):
        bg = cv2.imread(str(bf[t % len(bf)]))
        if bg.shape[:2] != (h, w):
            raise SystemExit(f"{bg_seq}: frames of different sizes")
        src = cv2.imread(str(of[t % len(of)]))
        m = read_index_mask(om[t % len(om)]) > 0
        canvas, gt = bg.copy(), np.zeros((h, w), np.uint8)
        ys, xs = np.nonzero(m)
        if ys.size:
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            size = size or float(max(y1 - y0, x1 - x0))
            # Objects are cut at most 40 % of the frame high so the path keeps them in view.
            base = min(1.0, 0.4 * h / (y1 - y0), 0.4 * w / (x1 - x0))
            cx, cy, scale = _path(t, n_frames, w, h, event, size * base)
            s = base * scale
            patch = cv2.resize(src[y0:y1, x0:x1], None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
            alpha = cv2.resize(m[y0:y1, x0:x1].astype(np.float32), (patch.shape[1], patch.shape[0]),
                               interpolation=cv2.INTER_AREA)
            alpha = cv2.GaussianBlur(alpha, (3, 3), 0.7)  # a soft cut, like a real boundary
            _paste(canvas, gt, patch, alpha, int(round(cx - patch.shape[1] / 2)), int(round(cy - patch.shape[0] / 2)))
        if event == "occlusion":
            _occlude(canvas, gt, bg, t, n_frames)
        name = f"{t:05d}"
        cv2.imwrite(str(out / "frames" / f"{name}.jpg"), canvas, [cv2.IMWRITE_JPEG_QUALITY, 95])
        write_index_mask(out / "masks" / f"{name}.png", gt)


def _paste(canvas: np.ndarray, gt: np.ndarray, patch: np.ndarray, alpha: np.ndarray, x: int, y: int) -> None:
    h, w = gt.shape
    ph, pw = alpha.shape
    cx0, cy0, cx1, cy1 = max(0, x), max(0, y), min(w, x + pw), min(h, y + ph)
    if cx0 >= cx1 or cy0 >= cy1:
        return  # entirely outside the frame
    a = alpha[cy0 - y:cy1 - y, cx0 - x:cx1 - x, None]
    p = patch[cy0 - y:cy1 - y, cx0 - x:cx1 - x].astype(np.float32)
    region = canvas[cy0:cy1, cx0:cx1].astype(np.float32)
    canvas[cy0:cy1, cx0:cx1] = np.clip(a * p + (1 - a) * region, 0, 255).astype(np.uint8)
    gt[cy0:cy1, cx0:cx1][a[..., 0] >= 0.5] = 1


def _occlude(canvas: np.ndarray, gt: np.ndarray, bg: np.ndarray, t: int, n: int) -> None:
    """A vertical band of background texture (the frame's own left quarter) sweeping right to left
    over the middle of the video: the object is hidden behind it, so the ground truth loses it."""
    h, w = gt.shape
    u = t / max(1, n - 1)
    if not 0.3 <= u <= 0.7:
        return
    band = w // 7
    x = int(w - (u - 0.3) / 0.4 * (w + band))
    x0, x1 = max(0, x), min(w, x + band)
    if x0 < x1:
        canvas[:, x0:x1] = cv2.flip(bg[:, :band], 1)[:, x0 - x:x1 - x]
        gt[:, x0:x1] = 0


def build(data: Path, out: Path, n_frames: int = 50) -> list[Path]:
    """All composites (five per fold), skipping those already written; returns their folders."""
    made = []
    for fold, names in enumerate(FOLDS):
        for i, obj in enumerate(names):
            bg = names[(i + 1) % len(names)]
            event = EVENTS[(i + fold) % len(EVENTS)]
            folder = out / f"f{fold}-{obj}-on-{bg}-{event}"
            if not (folder / "masks" / f"{n_frames - 1:05d}.png").is_file():
                compose(data / "davis2016" / obj, data / "davis2016" / bg, event, n_frames, folder)
            made.append(folder)
    return made


def fold_of(name: str) -> int:
    """The fold a development sequence or composite belongs to."""
    if name.startswith(("f0-", "f1-")):
        return int(name[1])
    for k, names in enumerate(FOLDS):
        if name in names or name.split("-2obj")[0] in names:
            return k
    raise ValueError(f"{name} is in no development fold")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(default_data()), help="the folder holding davis2016/")
    p.add_argument("--out", default=str(ROOT / "runs" / "composites"))
    p.add_argument("--frames", type=int, default=50)
    a = p.parse_args()
    for folder in build(Path(a.data), Path(a.out), a.frames):
        print(folder)


if __name__ == "__main__":
    main()
