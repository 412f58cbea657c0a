"""Label Studio 1.23.2's frame numbers against backend.frames, in the real player (Chromium).

A 24 fps H.264 video whose frame i is one flat colour coding i (red: i % 8, blue: i // 8, in steps
of 32: wide enough to survive YUV and back): on each Label Studio frame the player's canvas says
which decoded frame it shows. Under frameRate="25" (the shipped video config)
Label Studio counts 63 frames for 60 and shows the decoded frame FrameMap.to_video says; under
frameRate="$fps" with the task's data.fps = 24 it is one frame per frame.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.frames import FrameMap
from ls_harness import add_local_storage, create_project, import_tasks, local_file_url, open_task
from synthetic import write_h264

REPO = Path(__file__).resolve().parents[2]
VIDEO_XML = (REPO / "backend" / "configs" / "video.xml").read_text()
N, FPS, STEP = 60, 24.0, 32

# After the seek the canvas is read until the player has finished seeking and the pixel has held
# for three reads in a row (a fixed 400 ms wait read a frame before the redraw once on a loaded
# machine: the last frame, 58 for 59); whatever it then holds is what the test checks.
SHOWN = """async (k) => {
    const v = window.Htx.annotationStore.selected.names.get('video');
    v.setFrame(k);
    const c = document.querySelector('.lsf-video-canvas canvas');
    const el = document.querySelector('video');
    const read = () => Array.from(c.getContext('2d')
        .getImageData(Math.floor(c.width / 2), Math.floor(c.height / 2), 1, 1).data.slice(0, 3));
    await new Promise(r => setTimeout(r, 400));  // the seek, then the canvas redraw
    let last = read(), same = 0;
    for (let i = 0; i < 40 && same < 3; i++) {
        await new Promise(r => setTimeout(r, 100));
        const now = read();
        same = (!el || !el.seeking) && now.join() === last.join() ? same + 1 : 0;
        last = now;
    }
    return last;
}"""


@pytest.fixture(scope="module")
def video_file(label_studio, tmp_path_factory) -> Path:
    frames = [np.full((96, 160, 3), (16 + STEP * (i // 8), 128, 16 + STEP * (i % 8)), np.uint8)  # BGR
              for i in range(N)]
    return Path(write_h264(str(tmp_path_factory.mktemp("fr") / "colour24.mp4"), frames, fps=FPS))


@pytest.mark.parametrize("rate, data", [("25", {}), ("$fps", {"fps": FPS})], ids=["frameRate25", "frameRate-fps"])
def test_label_studio_shows_the_decoded_frame_the_mapping_says(label_studio, ls_page, video_file, rate, data):
    ls, page = label_studio, ls_page
    config = VIDEO_XML.replace('frameRate="25"', f'frameRate="{rate}"')
    project = create_project(ls, config, f"frame numbers {rate}")
    folder = add_local_storage(ls, project.id, f"frames-{rate.strip('$')}")
    target = folder / video_file.name
    target.write_bytes(video_file.read_bytes())
    task_id = import_tasks(ls, project.id, [{"data": {"video": local_file_url(ls, target), **data}}])[0]
    open_task(page, ls, project.id, task_id)
    page.wait_for_function("() => window.Htx.annotationStore.selected.names.get('video').length > 1")
    fmap = FrameMap(float(rate) if rate != "$fps" else FPS, FPS, N)
    assert page.evaluate("() => window.Htx.annotationStore.selected.names.get('video').length") == fmap.ls_count
    for k in (2, 3, 4, 13, 25, 26, 27, 40, fmap.ls_count - 1, fmap.ls_count, 1):
        r, _, b = page.evaluate(SHOWN, k)
        shown = 8 * int(round((b - 16) / STEP)) + int(round((r - 16) / STEP))
        assert shown == fmap.to_video(k), (k, (r, b), shown, fmap.to_video(k))
