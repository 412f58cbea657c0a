"""Reading frames (image folders, video files) and reading/writing index masks (DAVIS palette PNGs)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .errors import MediaError
from .refine_common import FrameCache

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_LABEL = 255  # index PNGs hold 8-bit labels


def davis_palette() -> np.ndarray:
    """The DAVIS / PASCAL VOC colour map (256 x 3 uint8): label k -> bit-interleaved colour."""
    palette = np.zeros((256, 3), np.uint8)
    for label in range(256):
        c, r, g, b = label, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[label] = (r, g, b)
    return palette


class FrameSequence:
    """Indexable, sized sequence of RGB uint8 frames."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]


class ImageFiles(FrameSequence):
    """Frames stored as image files, decoded when read (the last few kept): a long sequence is
    never held in memory whole."""

    def __init__(self, files: Sequence[str | os.PathLike], cache: int = 8) -> None:
        self.files = [Path(f) for f in files]
        if not self.files:
            raise MediaError("no frames given")
        self._cache: FrameCache[np.ndarray] = FrameCache(cache)
        self._shape: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        if index < 0:
            index += len(self)
        return self._cache.get(index, lambda: self._read(index))

    def _read(self, index: int) -> np.ndarray:
        path = self.files[index]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise MediaError(f"cannot decode frame {path}: not a readable image")
        frame = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if self._shape is None:
            self._shape = frame.shape[:2]
        elif frame.shape[:2] != self._shape:
            raise MediaError(
                f"frame {path.name} is {frame.shape[1]}x{frame.shape[0]} but the first frame is "
                f"{self._shape[1]}x{self._shape[0]}: all frames of a video must have one size"
            )
        return frame


class FrameDir(ImageFiles):
    """Frames stored as image files in a folder, ordered by name (00000.jpg, 00001.jpg, ...)."""

    def __init__(self, path: str | os.PathLike, cache: int = 8) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MediaError(f"frames folder {self.path} does not exist: pass a folder of .jpg/.png frames")
        files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)
        if not files:
            raise MediaError(f"no frames in {self.path}: expected files ending in {', '.join(FRAME_EXTENSIONS)}")
        super().__init__(files, cache)

    @property
    def names(self) -> list[str]:
        return [p.stem for p in self.files]


class VideoFrames(FrameSequence):
    """A video file decoded once into a frame store on disk (an anonymous temporary file).

    Random access matters (deferred corrections resume mid-video) and video seeking is not
    frame-exact for every codec, so frames are decoded in order once and kept. Raw (memory-mapped,
    fastest to read) while the video's raw size stays within ``raw_limit_mb``; beyond it each frame
    is kept as a JPEG (quality 95: about a twelfth of the size, a mean error under one grey
    level), since a long HD video's raw frames would fill the disk (1080p: 6 MB a frame).
    """

    def __init__(self, path: str | os.PathLike, max_frames: int | None = None, workdir: str | None = None,
                 raw_limit_mb: float | None = 8192, cache: int = 4) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MediaError(f"video file {self.path} does not exist")
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise MediaError(f"cannot decode video {self.path}: OpenCV could not open it (unsupported or damaged file)")
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or 25.0
        declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        # An anonymous file (unlinked at once): the kernel frees it when the process ends, even on SIGKILL.
        self._tmp = tempfile.TemporaryFile(prefix="lazyxmem-frames-", suffix=".raw", dir=workdir)
        self.compressed = False
        offsets = [0]
        count, shape = 0, None
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                if shape is None:
                    shape = bgr.shape
                    # A container that declares no length may be long: compress to be safe.
                    self.compressed = raw_limit_mb is not None and (
                        declared <= 0 or declared * bgr.nbytes > raw_limit_mb * 2**20)
                elif bgr.shape != shape:
                    raise MediaError(f"video {self.path} changes frame size at frame {count}")
                if self.compressed:
                    encoded, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
                    if not encoded:
                        raise MediaError(f"video {self.path}: frame {count} could not be stored (JPEG encoding failed)")
                    self._tmp.write(buf.tobytes())
                    offsets.append(offsets[-1] + buf.size)
                else:
                    self._tmp.write(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).tobytes())
                count += 1
                if max_frames is not None and count > max_frames:
                    raise MediaError(f"video {self.path} has more than {max_frames} frames (the configured limit)")
        finally:
            cap.release()
        if count == 0 or shape is None:
            raise MediaError(f"cannot decode video {self.path}: no frame could be read (unsupported codec or not a video)")
        self._tmp.flush()
        self._count = count
        self._cache: FrameCache[np.ndarray] = FrameCache(cache)
        if self.compressed:
            self._offsets = np.asarray(offsets, np.int64)
            self._data = np.memmap(self._tmp, dtype=np.uint8, mode="r", shape=(int(self._offsets[-1]),))
        else:
            self._frames = np.memmap(self._tmp, dtype=np.uint8, mode="r", shape=(count, *shape))

    @property
    def stored_bytes(self) -> int:
        """Size of the frame store on disk."""
        return int(self._offsets[-1]) if self.compressed else self._frames.nbytes

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> np.ndarray:
        if not self.compressed:
            return np.asarray(self._frames[index])
        index = int(index) + (self._count if index < 0 else 0)
        if not 0 <= index < self._count:
            raise IndexError(f"frame {index} is outside the video (0..{self._count - 1})")
        return self._cache.get(index, lambda: self._decode(index))

    def _decode(self, index: int) -> np.ndarray:
        bgr = cv2.imdecode(self._data[self._offsets[index]:self._offsets[index + 1]], cv2.IMREAD_COLOR)
        frame = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        frame.flags.writeable = False  # shared by the cache, and read-only like the raw store's frames
        return frame


def video_header(path: str | os.PathLike) -> tuple[int | None, float]:
    """(frame count, fps) as the container declares them, read without decoding; the count is
    None when it declares none. Only an estimate (some containers round or omit it): good enough
    to decide whether a video is too long to propagate inside a request, not to index frames."""
    n, fps, _ = video_container(path)
    return n, fps


def video_container(path: str | os.PathLike) -> tuple[int | None, float, tuple[int, int]]:
    """:func:`video_header` and the frame size (width, height) the codec parameters declare."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise MediaError(f"cannot decode video {Path(path).name}: OpenCV could not open it "
                             "(unsupported or damaged file)")
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or 25.0
        size = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    finally:
        cap.release()
    return (n if n > 0 else None), fps, size


def read_video_frames(path: str | os.PathLike, indices: Sequence[int]) -> dict[int, np.ndarray]:
    """A few frames of a video (RGB), decoded in order up to the last one asked for, without
    storing the rest: what an answer about one frame needs from a video not decoded yet."""
    wanted = {int(t) for t in indices}
    cap = cv2.VideoCapture(str(path))
    out: dict[int, np.ndarray] = {}
    try:
        if not cap.isOpened():
            raise MediaError(f"cannot decode video {path}: OpenCV could not open it (unsupported or damaged file)")
        t, last = 0, max(wanted, default=-1)
        while t <= last:
            if t in wanted:
                ok, bgr = cap.read()
                if not ok:
                    break
                out[t] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            elif not cap.grab():  # skips decoding into an image: about twice as fast
                break
            t += 1
    finally:
        cap.release()
    missing = sorted(wanted - set(out))
    if missing:
        raise MediaError(f"video {path} has no frame {missing[0] + 1}: it ends before")
    return out


class SparseFrames(FrameSequence):
    """A video of ``n`` frames of which only some are at hand (the others raise)."""

    def __init__(self, n: int, frames: dict[int, np.ndarray]) -> None:
        self.n, self.frames = n, frames

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index) + (self.n if index < 0 else 0)
        if index not in self.frames:
            raise IndexError(f"frame {index} was not read")
        return self.frames[index]


class ArrayFrames(FrameSequence):
    """Frames already in memory (tests, the web backend)."""

    def __init__(self, frames: list[np.ndarray] | np.ndarray) -> None:
        if len(frames) == 0:
            raise MediaError("no frames given")
        self._frames = frames

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._frames[index]


def open_frames(frames_dir: str | os.PathLike | None = None, video: str | os.PathLike | None = None,
                max_frames: int | None = None) -> FrameSequence:
    """Frames from a folder or a video file (exactly one of the two)."""
    if (frames_dir is None) == (video is None):
        raise MediaError("give either a frames folder or a video file, not both or neither")
    if frames_dir is not None:
        seq = FrameDir(frames_dir)
        if max_frames is not None and len(seq) > max_frames:
            raise MediaError(f"{frames_dir} has {len(seq)} frames, more than the limit {max_frames}")
        return seq
    return VideoFrames(video, max_frames=max_frames)


def read_index_mask(path: str | os.PathLike) -> np.ndarray:
    """An index mask (H, W) uint8 from a PNG: palette PNGs give their indices; 8-bit grayscale
    masks with values in {0, 255} (DAVIS 2016) give 0/1; other grayscale masks give their values;
    RGB masks are mapped through the DAVIS palette."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"mask file {path} does not exist")
    try:
        img = Image.open(path)
        img.load()
    except Exception as exc:  # PIL raises many types for damaged files
        raise MediaError(f"cannot read mask {path}: {exc}") from None
    if img.mode == "P":
        return np.array(img, dtype=np.uint8)
    if img.mode in ("L", "1"):
        arr = np.array(img.convert("L"), dtype=np.uint8)
        values = np.unique(arr)
        if np.isin(values, (0, 255)).all():
            return (arr == 255).astype(np.uint8)
        return arr
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        arr = np.array(img, dtype=np.int64)
        if arr.max() > MAX_LABEL:
            raise MediaError(
                f"mask {path} has label value {int(arr.max())}; labels must be 1..{MAX_LABEL} "
                "(renumber the objects)")
        return arr.astype(np.uint8)
    if img.mode in ("RGB", "RGBA"):
        rgb = np.array(img.convert("RGB"), dtype=np.uint8)
        code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
        pal = davis_palette().astype(np.int32)
        pal_code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
        uniq, inv = np.unique(code, return_inverse=True)
        out = np.zeros(len(uniq), np.uint8)
        for i, c in enumerate(uniq):
            hits = np.nonzero(pal_code == c)[0]
            if len(hits) == 0:
                raise MediaError(f"mask {path} is RGB with colour #{c:06x} that is not a DAVIS palette colour; save it as a palette or grayscale index PNG")
            out[i] = hits[0]
        return out[inv].reshape(code.shape)
    raise MediaError(f"mask {path} has PNG mode {img.mode}; expected a palette or grayscale index PNG")


def write_index_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Save an index mask as a DAVIS-palette PNG."""
    if mask.max(initial=0) > MAX_LABEL:
        raise MediaError(f"label {int(mask.max())} does not fit an 8-bit index PNG (max {MAX_LABEL})")
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    img.putpalette(davis_palette().ravel().tolist())
    img.save(path)


def check_mask(mask: np.ndarray, frame_shape: tuple[int, ...], where: str) -> np.ndarray:
    """Validate an initial/given index mask against the frame size."""
    if mask.shape != tuple(frame_shape[:2]):
        raise MediaError(
            f"{where} is {mask.shape[1]}x{mask.shape[0]} but the frames are {frame_shape[1]}x{frame_shape[0]}: "
            "the mask must have the frames' size")
    if mask.max(initial=0) > MAX_LABEL:
        raise MediaError(f"{where} has label value {int(mask.max())}; labels must be 1..{MAX_LABEL}")
    return mask
