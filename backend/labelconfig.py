"""What a Label Studio label config asks for, found by tag type (never by tag name)."""
from __future__ import annotations

from lazyxmem_core.errors import LazyXMemError

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Literal

from .checks import shown

REVIEW_LABEL = "Needs review"
AUTO_LABEL = "Auto-corrected"
MAX_FRAME_RATE = 1000.0
LS_DEFAULT_FRAME_RATE = 24.0  # Label Studio's when <Video> has no frameRate
_DATA_KEY = re.compile(r"^\$\w+$")


class ConfigError(LazyXMemError):
    """The label config cannot be served; the message names what is missing."""


@dataclass(frozen=True)
class ControlTag:
    name: str
    to_name: str
    type: str  # lower-case tag type: videorectangle, brushlabels, ...
    labels: tuple[str, ...] = ()
    per_item: bool = False
    per_region: bool = False


@dataclass(frozen=True)
class LabelConfig:
    mode: Literal["video", "images"]
    object_tag: str  # name of the <Video> or <Image valueList> tag
    value_key: str  # task data key of the video URL or of the frame URL list
    # The rate Label Studio counts frames at when the config fixes it; None when it is read from
    # the task's data (frameRate="$fps"): then the video's own rate, which the task should carry.
    frame_rate: float | None = LS_DEFAULT_FRAME_RATE
    frame_rate_attr: str | None = None  # <Video frameRate> as written, for backend.frames.task_frame_map
    shapes: tuple[ControlTag, ...] = ()  # tags whose regions define objects (rectangles, brushes, keypoints)
    output: ControlTag | None = None  # where predictions go: VideoRectangle or BrushLabels
    labels: ControlTag | None = None  # a <Labels> tag for VideoRectangle regions
    review: ControlTag | None = None  # TimelineLabels (video) or per-item Choices (images)
    review_box: ControlTag | None = None  # RectangleLabels with a "Needs review" label (images)
    clicks: ControlTag | None = None  # KeyPointLabels for interactive clicks
    # A per-region TextArea: the backend's note on each review region (which object, which frames,
    # the frame to check first), shown under the region in the Regions panel.
    review_note: ControlTag | None = None
    extra: dict = field(default_factory=dict)
    xml: str = field(default="", repr=False, compare=False)  # the source, for jobs run elsewhere

    @property
    def object_labels(self) -> tuple[str, ...]:
        src = self.output if self.output is not None and self.output.labels else self.labels
        return src.labels if src else ()


def _labels(tag: ET.Element) -> tuple[str, ...]:
    return tuple(c.get("value", "") for c in tag.iter() if c.tag in ("Label", "Choice") and c.get("value"))


def _note(controls: list[ControlTag]) -> ControlTag | None:
    return next((c for c in controls if c.type == "textarea" and c.per_region), None)


def parse_label_config(xml: str) -> LabelConfig:
    """Find the task mode and the tags it needs; ConfigError names what is missing."""
    if not xml or not xml.strip():
        raise ConfigError("empty label config: the project needs a <Video> or <Image valueList> config")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ConfigError(f"label config is not valid XML: {exc}") from None
    tags = list(root.iter())
    videos = [t for t in tags if t.tag == "Video"]
    images = [t for t in tags if t.tag == "Image" and t.get("valueList")]
    controls = [
        ControlTag(t.get("name", ""), t.get("toName", ""), t.tag.lower(), _labels(t),
                   t.get("perItem", "false").lower() == "true", t.get("perRegion", "false").lower() == "true")
        for t in tags if t.get("toName")
    ]
    if videos:
        video = videos[0]
        name = video.get("name", "")
        mine = [c for c in controls if name in c.to_name.split(",")]
        rect = next((c for c in mine if c.type == "videorectangle"), None)
        if rect is None:
            raise ConfigError(f"the <Video name=\"{name}\"> has no <VideoRectangle toName=\"{name}\">: "
                              "objects are drawn as video rectangles; add one")
        labels = next((c for c in mine if c.type == "labels"), None)
        timeline = next((c for c in mine if c.type == "timelinelabels"), None)
        attr = video.get("frameRate")
        fps: float | None = LS_DEFAULT_FRAME_RATE
        if attr is not None and _DATA_KEY.match(attr.strip()):
            attr, fps = attr.strip(), None  # Label Studio 1.23.2 reads it from the task's data
        elif attr is not None:
            try:
                fps = float(attr)
            except ValueError:
                fps = math.nan
            # "nan" and "inf" parse as floats and would put NaN into every reply's times and durations
            if not 0 < fps <= MAX_FRAME_RATE:
                raise ConfigError(f"<Video frameRate=\"{shown(attr)}\"> must be a number of frames per second "
                                  f"above 0 and at most {MAX_FRAME_RATE}, or $key naming a task data field "
                                  "that holds it (frameRate=\"$fps\")")
        return LabelConfig("video", name, video.get("value", "").lstrip("$"), fps, frame_rate_attr=attr,
                           shapes=(rect,), output=rect, labels=labels, review=timeline,
                           review_note=_note(mine), xml=xml)
    if images:
        image = images[0]
        name = image.get("name", "")
        mine = [c for c in controls if name in c.to_name.split(",")]
        brush = next((c for c in mine if c.type == "brushlabels"), None)
        if brush is None:
            raise ConfigError(f"the <Image name=\"{name}\" valueList> has no <BrushLabels toName=\"{name}\">: "
                              "masks are predicted as brush labels; add one")
        # A RectangleLabels holding only "Needs review" is the backend's review mark, not a tool
        # that starts objects; one that also holds object labels (older configs) is both.
        review_box = next((c for c in mine if c.type == "rectanglelabels" and c.labels == (REVIEW_LABEL,)), None) \
            or next((c for c in mine if c.type == "rectanglelabels" and REVIEW_LABEL in c.labels), None)
        shapes = tuple(c for c in mine if c.type in ("brushlabels", "rectanglelabels", "keypointlabels")
                       and c.labels != (REVIEW_LABEL,))
        review = next((c for c in mine if c.type == "choices" and c.per_item), None)
        clicks = next((c for c in mine if c.type == "keypointlabels"), None)
        return LabelConfig("images", name, image.get("valueList", "").lstrip("$"), shapes=shapes, output=brush,
                           review=review, review_box=review_box, clicks=clicks,
                           review_note=_note(mine), xml=xml)
    raise ConfigError("the label config has neither a <Video> tag nor an <Image valueList=\"$...\"> tag: "
                      "this backend serves video tasks and image-sequence tasks")
