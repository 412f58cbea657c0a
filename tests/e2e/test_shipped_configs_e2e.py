"""The shipped image-sequence config as an annotator sees it in Label Studio 1.23.2 (Chromium).

One task: a red disc on item 0 with the disc painted (brush "Object", as a prediction paints it)
and the backend's "Needs review" marker. Checked in the editor with an interactive backend
connected: the label buttons (one per tool, each saying what it does; no "Needs review" button),
the marker among the regions, the Auto-Detect button being the smart click, and a negative point
placed ON the painted mask: Label Studio gives a click inside a region to the region (it selects
it), so a point on a mask takes Ctrl (Cmd on macOS), which makes it skip region interactions,
plus Alt for a negative point; the README says so.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from backend.convert import REVIEW_MARKER

from ls_harness import add_local_storage, create_project, import_tasks, local_file_url, open_task, register_backend

REPO = Path(__file__).resolve().parents[2]
IMAGES_XML = (REPO / "backend" / "configs" / "image_sequence.xml").read_text()
W, H, CX, CY, R = 320, 240, 150, 120, 50

VISIBLE_LABELS = """() => [...document.querySelectorAll('.lsf-label')]
    .filter(e => e.offsetParent !== null).map(e => e.innerText.split('\\n')[0].trim())"""
REGIONS = """() => window.Htx.annotationStore.selected.regions.map(r => ({type: r.type,
    labels: r.labeling?.selectedLabels?.map(l => l.value) ?? [], negative: r.negative ?? null,
    selected: r.selected, item: r.item_index ?? null, control: r.results?.[0]?.from_name?.name ?? null}))"""
SELECTED_TOOL = """() => { const t = window.Htx.annotationStore.names.get('frames').getToolsManager().findSelectedTool();
    return t ? t.fullName : null; }"""


def test_the_shipped_image_config_in_the_editor(label_studio, backend_server, ls_page):
    ls, page = label_studio, ls_page
    project = create_project(ls, IMAGES_XML, "shipped image config")
    folder = add_local_storage(ls, project.id, "shipped-config")
    register_backend(ls, project.id, backend_server, interactive=True)  # Auto-Annotation needs one
    disc = np.zeros((H, W), np.uint8)
    cv2.circle(disc, (CX, CY), R, 255, -1)
    urls = []
    for i in range(3):
        img = np.full((H, W, 3), (60, 140, 70), np.uint8)
        img[disc > 0] = (40, 40, 220)  # BGR red
        path = folder / f"f{i}.png"
        cv2.imwrite(str(path), img)
        urls.append(local_file_url(ls, path))
    brush = {"id": "lazyxmem-1-0", "from_name": "mask", "to_name": "frames", "type": "brushlabels", "item_index": 0,
             "original_width": W, "original_height": H, "image_rotation": 0,
             "value": {"format": "rle", "rle": mask2rle(disc), "brushlabels": ["Object"]}}
    x, y, w, h = REVIEW_MARKER
    review = {"id": "lazyxmem-review-0", "from_name": "review_box", "to_name": "frames", "type": "rectanglelabels",
              "item_index": 0, "original_width": W, "original_height": H, "image_rotation": 0,
              "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": ["Needs review"]}}
    task_id = import_tasks(ls, project.id, [{"data": {"frames": urls}, "annotations": [{"result": [brush, review]}]}])[0]

    open_task(page, ls, project.id, task_id)
    page.wait_for_function("() => window.Htx.annotationStore.selected.regions.length >= 2")
    assert sorted(page.evaluate(VISIBLE_LABELS)) == sorted(
        ["Object: click (Alt+click: not the object)", "Object: paint", "Object: box"])  # no "Needs review"
    regions = page.evaluate(REGIONS)
    assert any(r["type"] == "rectangleregion" and r["labels"] == ["Needs review"] for r in regions), regions

    # The Auto-Annotation toggle turns the smart tools on; Auto-Detect's first tool is the click.
    page.get_by_text("Auto-Annotation").click()
    page.wait_for_function("() => window.Htx.autoAnnotation === true")
    smart = page.evaluate("() => [...document.querySelectorAll('button.lsf-tool_smart')].map(b => b.getAttribute('aria-label'))")
    assert smart[1:2] == ["key-point-tool"], smart
    page.click("button.lsf-tool_smart")
    assert page.evaluate(SELECTED_TOOL) == "KeyPointTool-dynamic"
    page.click("text=Object: click (Alt+click: not the object)")
    assert page.evaluate(SELECTED_TOOL) == "KeyPointTool-dynamic"

    # Ctrl+Alt+click on the painted disc: a negative point there, the mask not selected.
    stage = page.locator(".lsf-main-view .konvajs-content").first.bounding_box()  # the image, scaled
    px, py = stage["x"] + CX * stage["width"] / W, stage["y"] + CY * stage["height"] / H
    page.keyboard.down("Control")
    page.keyboard.down("Alt")
    page.mouse.click(px, py)
    page.keyboard.up("Alt")
    page.keyboard.up("Control")
    page.wait_for_function("() => window.Htx.annotationStore.selected.regions.some(r => r.type === 'keypointregion')")
    regions = page.evaluate(REGIONS)
    point = next(r for r in regions if r["type"] == "keypointregion")
    assert point["negative"] is True and point["item"] == 0, regions
    assert not next(r for r in regions if r["type"] == "brushregion")["selected"], regions
