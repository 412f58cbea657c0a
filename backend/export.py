"""Per-frame masks of a task for download: a zip of DAVIS-palette PNGs, or COCO RLE JSON."""
from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence

import numpy as np
from PIL import Image

from lazyxmem_core.media import davis_palette
from lazyxmem_core.session_view import SessionView


def png_zip(view: SessionView) -> io.BytesIO:
    buf = io.BytesIO()
    palette = davis_palette().ravel().tolist()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for t, mask in enumerate(view.frame_masks()):
            img = Image.fromarray(mask.astype(np.uint8), mode="P")
            img.putpalette(palette)
            png = io.BytesIO()
            img.save(png, format="PNG")
            z.writestr(f"{t + 1:05d}.png", png.getvalue())  # 1-based, like Label Studio's frames
    buf.seek(0)
    return buf


def rle_encode(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major counts starting with background)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def coco_rle(view: SessionView, objects: Sequence[tuple[int, str]]) -> dict:
    h, w = view.shape
    annotations = []
    for t, mask in enumerate(view.frame_masks()):
        for value, text in objects:
            obj = mask == value
            if obj.any():
                ys, xs = np.nonzero(obj)
                annotations.append({"id": len(annotations) + 1, "image_id": t + 1, "category_id": value,
                                    "segmentation": rle_encode(obj), "area": int(obj.sum()),
                                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                             int(ys.max() - ys.min() + 1)], "iscrowd": 0})
    return {"images": [{"id": t + 1, "frame": t + 1, "width": w, "height": h} for t in range(view.n_frames)],
            "categories": [{"id": v, "name": text} for v, text in objects],
            "annotations": annotations}
