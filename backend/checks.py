"""Checks on what a request carries, made before any work is done for it.

The backend listens on a network port and ``/webhook`` takes no credentials, so every value of a
request may be hostile. What is checked here, cheaply and before anything is fetched, decoded or
allocated:

- types: numbers are finite numbers (never NaN, Infinity, strings or booleans), frames, item
  indexes and ids whole numbers in range, regions objects with the fields they need;
- sizes: a brush RLE's header (the number of values it decodes to) against its region's own
  ``original_width`` x ``original_height`` x 4, and those against ``MAX_PIXELS``; images and video
  frames against ``MAX_PIXELS`` from their file header;
- what an error message or a log line may quote of a value (:func:`shown`, :func:`safe_message`):
  never the body itself, which may be megabytes of control characters.

A wrong type is :class:`Malformed` (400); a size over a limit is :class:`TooLarge` (422).
"""
from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from lazyxmem_core.errors import LazyXMemError, MediaError
from lazyxmem_core.media import video_container

SHOWN_CHARS = 200  # of any one value quoted in a message or a log line
MESSAGE_CHARS = 2000  # of a whole message (a last guard for messages built elsewhere)
MAX_ID = 2**63 - 1  # Label Studio's ids are database integers
MAX_INDEX = 2**31 - 1  # frames and item indexes; any real video is far below
RLE_HEADER_BYTES = 7  # 32 bits of value count, 5 of word size, 4 x 4 of run-length sizes

# C0/C1 controls and the characters that reorder or break lines in a terminal or a log viewer.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Longer than what shown() leaves of a value (its cut text and "..."), so a value shown is not cut twice.
_LONG_TOKEN = re.compile(r"\S{%d,}" % (SHOWN_CHARS + 4))
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60  # reprlib cuts big values without building them whole
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 6, 4
NUMBER_FIELDS = ("x", "y", "width", "height")


class InputError(LazyXMemError):
    """A request value the backend cannot use; the message says which and why (a 422)."""


class Malformed(InputError):
    """A value of the wrong type (NaN, a string for a number, a list for an object): a 400."""


class TooLarge(InputError):
    """A region, image or video larger than the configured limits: refused before decoding."""


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``value`` as a message may quote it: strings as they are, anything else as its repr (cut by
    ``reprlib`` without building it whole), control characters escaped, at most ``limit`` characters."""
    if isinstance(value, str):
        text, total = _escape(value[:limit])[:limit], len(value)
    else:
        text = _escape(_REPR.repr(value))
        total = len(text)
    if total > limit or len(text) > limit:
        return f"{text[:limit]}... ({total} chars)"
    return text


def safe_message(text: str) -> str:
    """A whole message, whoever built it, safe to send back or log: control characters escaped,
    any word longer than ``SHOWN_CHARS`` (a URL, an id) cut, and the whole kept to its start and
    end (where a message says what is wrong and what to do) within ``MESSAGE_CHARS``."""
    text = _escape(str(text))
    text = _LONG_TOKEN.sub(lambda m: m.group()[:SHOWN_CHARS] + f"... ({len(m.group())} chars)", text)
    if len(text) > MESSAGE_CHARS:
        half = MESSAGE_CHARS // 2
        text = f"{text[:half]} ...({len(text) - 2 * half} chars)... {text[-half:]}"
    return text


# -- values ------------------------------------------------------------------------------------
def got(value: Any) -> str:
    """What a message says it got instead: the type and the value (shown)."""
    return f"got {type(value).__name__} {shown(value)}"


def number(value: Any, where: str) -> float:
    """A finite JSON number; booleans, strings, NaN and Infinity are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Malformed(f"{where} must be a finite number, {got(value)}")
    return float(value)


def whole(value: Any, where: str, low: int = 0, high: int = MAX_ID) -> int:
    """A whole number in ``[low, high]`` (``3.0`` is taken: some clients write every number as a float)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Malformed(f"{where} must be a whole number, {got(value)}")
    if not low <= value <= high:
        raise Malformed(f"{where} must be between {low} and {high}, {got(value)}")
    return value


def _optional(obj: dict, key: str, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise Malformed(f"{where}.{key} must be {what}, {got(value)}")
    return value


def _list_of_dicts(obj: dict, key: str, where: str) -> list[dict]:
    items = _optional(obj, key, list, where, "a list")
    for i, item in enumerate(items or []):
        if not isinstance(item, dict):
            raise Malformed(f"{where}.{key}[{i}] must be an object, {got(item)}")
    return items or []


# -- sizes -------------------------------------------------------------------------------------
def check_pixels(width: int, height: int, what: str, max_pixels: int) -> None:
    """Refuse a frame or a region whose declared size is over ``MAX_PIXELS``."""
    if width * height > max_pixels:
        raise TooLarge(f"{what} is {width}x{height} = {width * height} pixels, over MAX_PIXELS={max_pixels}")


def rle_values(rle: Any, where: str) -> int:
    """The number of values a Label Studio brush RLE decodes to, read from its header alone; an
    RLE longer than any encoding of that many values is refused too.

    A decoder allocates what the header declares before it reads a run (a 500 KB region can
    declare 2e9 values), and reads every byte it is given: both are checked here first."""
    if not isinstance(rle, list) or len(rle) < RLE_HEADER_BYTES:
        raise Malformed(f"{where}: a brush RLE must be a list of at least {RLE_HEADER_BYTES} bytes")
    try:
        data = bytes(rle)  # every item an int in 0..255 (a C loop: fast on a long RLE)
    except (TypeError, ValueError):
        raise Malformed(f"{where}: a brush RLE must hold whole numbers 0..255") from None
    head = int.from_bytes(data[:RLE_HEADER_BYTES], "big")  # 56 bits, the header is the first 53
    num, word = head >> 24, ((head >> 19) & 0x1F) + 1
    longest_run = max(((head >> (15 - 4 * k)) & 0xF) + 1 for k in range(4))
    # The most a value can cost: a run of one (repeat bit, size index, its length, the value).
    most = -(-(53 + num * (3 + longest_run + word)) // 8)
    if len(data) > most:
        raise Malformed(f"{where}: brush RLE is {len(data)} bytes, longer than any encoding of the "
                        f"{num} values its header declares (at most {most})")
    return num


def check_brush(value: dict, width: int, height: int, where: str) -> None:
    """A brush RLE must decode to exactly ``width`` x ``height`` RGBA pixels: checked on its header."""
    n = rle_values(value.get("rle"), where)
    if n != width * height * 4:
        raise TooLarge(f"{where}: brush RLE declares {n} values; a {width}x{height} mask has {width * height * 4}"
                       " (width x height x 4)")


# -- regions, annotations, tasks, webhooks -----------------------------------------------------
def check_region(r: Any, where: str, max_pixels: int) -> None:
    """One region as Label Studio writes it: the fields the backend reads have the right types,
    and a brush's size (declared and in its RLE header) is within ``MAX_PIXELS``."""
    if not isinstance(r, dict):
        raise Malformed(f"{where} must be an object, {got(r)}")
    for key in ("type", "from_name", "to_name"):
        _optional(r, key, str, where, "a string")
    if r.get("item_index") is not None:
        whole(r["item_index"], f"{where}.item_index", 0, MAX_INDEX)
    # 0 or absent: not declared (an image that had not loaded when the region was drawn)
    size = [whole(r[k], f"{where}.{k}", 0, MAX_INDEX) if r.get(k) is not None else 0
            for k in ("original_width", "original_height")]
    if all(size):
        check_pixels(size[0], size[1], f"{where}: the region's image", max_pixels)
    value = _optional(r, "value", dict, where, "an object") or {}
    for key in ("labels", "brushlabels", "rectanglelabels", "keypointlabels"):
        _optional(value, key, list, f"{where}.value", "a list")
    for key in NUMBER_FIELDS:
        if key in value:
            number(value[key], f"{where}.value.{key}")
    for i, k in enumerate(_list_of_dicts(value, "sequence", f"{where}.value")):
        at = f"{where}.value.sequence[{i}]"
        if k.get("frame") is not None:
            whole(k["frame"], f"{at}.frame", 1, MAX_INDEX)
        for key in NUMBER_FIELDS:
            if key in k:
                number(k[key], f"{at}.{key}")
    if "rle" in value:
        if all(size):
            check_brush(value, size[0], size[1], where)
            return
        n = rle_values(value["rle"], f"{where}.value.rle")
        if n > 4 * max_pixels:
            raise TooLarge(f"{where}: brush RLE declares {n} values, over 4 x MAX_PIXELS={max_pixels}")


def check_regions(results: Any, where: str, max_pixels: int) -> list[dict]:
    if not isinstance(results, list):
        raise Malformed(f"{where} must be a list of regions, {got(results)}")
    for i, r in enumerate(results):
        check_region(r, f"{where}[{i}]", max_pixels)
    return results


def check_annotation(ann: Any, where: str, max_pixels: int) -> None:
    if not isinstance(ann, dict):
        raise Malformed(f"{where} must be an object, {got(ann)}")
    if ann.get("id") is not None:
        whole(ann["id"], f"{where}.id")
    if ann.get("result") is not None:
        check_regions(ann["result"], f"{where}.result", max_pixels)


def check_task(task: Any, where: str, max_pixels: int) -> None:
    """A task as Label Studio sends it: an id, a data object, annotations and drafts."""
    if not isinstance(task, dict):
        raise Malformed(f"{where} must be an object, {got(task)}")
    if task.get("id") is not None:
        whole(task["id"], f"{where}.id")
    _optional(task, "data", dict, where, "an object")
    for key in ("annotations", "drafts"):
        for i, ann in enumerate(_list_of_dicts(task, key, where)):
            check_annotation(ann, f"{where}.{key}[{i}]", max_pixels)


# -- frames ------------------------------------------------------------------------------------
def image_size(path: str | Path, name: str) -> tuple[int, int]:
    """(width, height) from an image file's header; PIL reads no pixel data for it."""
    try:
        with Image.open(path) as img:
            return img.size
    except Image.DecompressionBombError as exc:  # PIL's own cap (about 179 M pixels), below ours or not
        raise TooLarge(f"image {shown(name)} is too large to decode ({exc})") from None
    except Exception:  # PIL raises many types for files it cannot identify
        raise InputError(f"image {shown(name)} cannot be decoded: its header is not a known image format") from None


def video_size(path: str | Path, name: str) -> tuple[int, int]:
    """(width, height) as a video's container declares them (the codec parameters: no frame decoded)."""
    try:
        return video_container(path)[2]
    except MediaError:
        raise InputError(f"cannot decode video {shown(name)}: OpenCV could not open it (unsupported or damaged file)") from None


def check_frames(paths: Iterable[tuple[str, Path]], video: bool, max_pixels: int) -> None:
    """Every (name, local file) pair within ``MAX_PIXELS``, read from its header."""
    for name, path in paths:
        w, h = video_size(path, name) if video else image_size(path, name)
        check_pixels(w, h, f"{'video' if video else 'image'} {shown(name)}", max_pixels)
