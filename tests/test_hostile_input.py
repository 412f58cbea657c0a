"""Hostile input through the HTTP API: every bomb refused from its header, fast and without
allocating; every malformed value a 4xx that says what is wrong; no reply or log line that
echoes the body back; no NaN in any reply (issue 17, Deliver 2 and 4).

Reuses test_backend's fake Label Studio and client (imported fixtures)."""
from __future__ import annotations

import base64
import json
import math
import resource
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import replace
from collections.abc import Iterator

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle as sdk_decode_rle, encode_rle, mask2rle

from backend.app import create_app
from backend.convert import decode_rle
from backend.labelconfig import parse_label_config
from fake_ls import FakeLabelStudio, holds
from test_backend import (AUTH, IMAGES_CFG, VIDEO_CFG, H, W, client, connect, fake_ls, images_task,  # noqa: F401
                          notify, video_task)

MB = 2**20


@contextmanager
def peak_rss_growth() -> Iterator[list[float]]:
    """The block's peak resident memory above where it started, in MB (VmRSS sampled every 2 ms:
    a bomb that fills gigabytes for seconds cannot slip between two samples)."""
    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    start, peak, done = rss(), [0], threading.Event()
    high_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out: list[float] = []
    try:
        yield out
    finally:
        done.set()
        thread.join()
        high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # A new process-wide peak was reached in the block, whether or not a sample saw it.
        out.append((max(peak[0], rss(), high if high > high_before else 0) - start) / MB)


def bits(value: int, n: int) -> str:
    return format(value, f"0{n}b")


def rle_bomb(values: int) -> list[int]:
    """A Label Studio RLE declaring ``values`` values, all 255, in runs of 65536 (27 bits each):
    2e9 values take 100 KB."""
    s = bits(values, 32) + bits(7, 5) + bits(15, 4) * 4
    s += ("1" + "00" + bits(65535, 16) + bits(255, 8)) * math.ceil(values / 65536)
    s += "0" * (-len(s) % 8)
    return [int(s[i:i + 8], 2) for i in range(0, len(s), 8)]


def png_bomb(width: int, height: int) -> bytes:
    """A 1-bit PNG of one colour: a few KB on disk, width x height x 3 bytes once OpenCV decodes it."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + 8 pixels a byte
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def post_raw(client, path: str, text: str):
    """A body as a hostile client writes it (NaN, Infinity, any nesting): the test client's
    ``json=`` goes through the app's own, strict, encoder."""
    return client.post(path, headers={**AUTH, "Content-Type": "application/json"}, data=text)


def strict_json(text: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a reply")

    return json.loads(text, parse_constant=refuse)


def brush(task: dict) -> dict:
    return task["annotations"][0]["result"][0]


def timed(call):
    t0 = time.perf_counter()
    r = call()
    return r, time.perf_counter() - t0


# -- bombs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["predict", "webhook"])
def test_an_rle_bomb_is_refused_from_its_header_fast_and_without_allocating(client, fake_ls, route, caplog):
    task = images_task(fake_ls[1])
    brush(task)["value"]["rle"] = rle_bomb(2_000_000_000)  # the region says 96x72: 27648 values
    if route == "predict":
        with peak_rss_growth() as grew:
            r, seconds = timed(lambda: client.post("/predict", headers=AUTH, json={"tasks": [task], "label_config": IMAGES_CFG}))
        assert r.status_code == 422 and "declares 2000000000 values" in r.json["error"], r.json
    else:  # a webhook is read for its ids: the bomb must sit in Label Studio (any of its users can put it there)
        connect(client, 3, IMAGES_CFG)
        holds(task, 3)
        with peak_rss_growth() as grew:
            r, seconds = timed(lambda: notify(client, "ANNOTATION_UPDATED", task=2, annotation=20))
            # Read back and refused in the background (its own time is the notifier's, not the request's).
            assert client.model.notifier.wait_idle(30)
        assert r.status_code == 202
        assert any("declares 2000000000 values" in rec.getMessage() and "task 2" in rec.getMessage()
                   for rec in caplog.records if rec.levelname == "WARNING")
    assert seconds < 2.0 and grew[0] < 200, (seconds, grew)
    assert not client.model.jobs.jobs  # nothing queued to fail later


def test_an_rle_that_fits_its_region_but_not_the_frame_is_refused_before_decoding(client, fake_ls):
    """A region declaring 4000x2500 (MAX_PIXELS exactly) with a header to match, on 96x72 frames."""
    task = images_task(fake_ls[1])
    region = brush(task)
    region.update(original_width=4000, original_height=2500)
    region["value"]["rle"] = rle_bomb(4000 * 2500 * 4)
    with peak_rss_growth() as grew:
        r, seconds = timed(lambda: client.post("/predict", headers=AUTH, json={"tasks": [task], "label_config": IMAGES_CFG}))
    assert seconds < 2.0 and grew[0] < 200, (seconds, grew)
    assert r.status_code == 422 and "a 96x72 mask has 27648" in r.json["error"], r.json


@pytest.mark.parametrize("case, status, message", [
    ("over_max_pixels", 422, "over MAX_PIXELS=10000000"),  # 12000x12000, header to match
    ("no_size_too_many_values", 422, "over 4 x MAX_PIXELS"),  # no original size given
    ("longer_than_its_values", 400, "longer than any encoding"),
    ("not_bytes", 400, "whole numbers 0..255"),
])
def test_brush_rles_are_checked_on_their_header_and_length(client, fake_ls, case, status, message):
    task = images_task(fake_ls[1])
    region = brush(task)
    rle = region["value"]["rle"]
    if case == "over_max_pixels":
        region.update(original_width=12000, original_height=12000)
        rle = rle_bomb(12000 * 12000 * 4)
    elif case == "no_size_too_many_values":
        del region["original_width"], region["original_height"]
        rle = rle_bomb(200_000_000)
    elif case == "longer_than_its_values":
        rle = rle + [0] * 500_000  # decoded bit by bit, a long tail costs time and memory
    elif case == "not_bytes":
        rle = rle[:-1] + [256]
    region["value"]["rle"] = rle
    r = client.post("/predict", headers=AUTH, json={"tasks": [task], "label_config": IMAGES_CFG})
    assert r.status_code == status and message in r.json["error"], r.json


def test_our_rle_decoder_reads_what_label_studio_sdks_reads():
    rng = np.random.default_rng(0)
    for k in range(12):
        h, w = rng.integers(1, 60, 2)
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8) * 255
        values = rng.integers(0, 256, rng.integers(1, 2000)).astype(np.uint8)
        for rle in (mask2rle(mask), encode_rle(values), encode_rle(np.repeat(values, 9))):
            ours, theirs = decode_rle(bytes(rle)), sdk_decode_rle(rle)
            assert ours.dtype == theirs.dtype and ours.tolist() == theirs.tolist(), k


@pytest.fixture(scope="module")
def big_pngs(fake_ls):
    FakeLabelStudio.files["/data/upload/1/16k.png"] = png_bomb(16000, 16000)  # over PIL's own cap
    FakeLabelStudio.files["/data/upload/1/7k.png"] = png_bomb(7000, 6000)  # 42 M pixels: only ours (PIL takes 179 M)
    yield
    for name in ("16k.png", "7k.png"):
        FakeLabelStudio.files.pop(f"/data/upload/1/{name}")


@pytest.mark.parametrize("name, message", [("16k.png", "256000000 pixels"),
                                           ("7k.png", "7000x6000 = 42000000 pixels, over MAX_PIXELS")])
def test_an_image_over_max_pixels_is_refused_from_its_header(client, fake_ls, big_pngs, name, message):
    task = images_task(fake_ls[1])
    task["data"]["frames"] = [f"/data/upload/1/{name}"] * 2
    assert len(FakeLabelStudio.files[f"/data/upload/1/{name}"]) < 100_000
    with peak_rss_growth() as grew:
        r, seconds = timed(lambda: client.post("/predict", headers=AUTH, json={"tasks": [task], "label_config": IMAGES_CFG}))
    assert seconds < 2.0 and grew[0] < 200, (seconds, grew)
    assert r.status_code == 422 and message in r.json["error"] and name in r.json["error"], r.json
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("mode", ["video", "images", "images_interactive"])
def test_frames_over_max_pixels_are_refused_before_decoding(client, fake_ls, mode):
    """MAX_PIXELS below the test media's 96x72: every path that decodes frames refuses them."""
    client.model.settings = replace(client.model.settings, max_pixels=W * H - 1)
    video = fake_ls[1]
    if mode == "video":
        task, cfg, context = video_task(video), VIDEO_CFG, None
    else:
        task, cfg = images_task(video), IMAGES_CFG
        click = {"from_name": "clicks", "to_name": "frames", "type": "keypointlabels", "item_index": 3,
                 "value": {"x": 50, "y": 50, "keypointlabels": ["Object"]}}
        context = {"result": [click]} if mode == "images_interactive" else None
    r = client.post("/predict", headers=AUTH, json={"tasks": [task], "label_config": cfg, "params": {"context": context}})
    assert r.status_code == 422 and f"96x72 = 6912 pixels, over MAX_PIXELS={W * H - 1}" in r.json["error"], r.json
    assert not client.model.jobs.jobs


# -- bodies and what replies quote -------------------------------------------------------------
def test_a_body_over_max_request_mb_gets_a_413_before_it_is_read(client, fake_ls):
    small = create_app(replace(client.model.settings, max_request_mb=1)).test_client()
    task = video_task(fake_ls[1])
    task["data"]["padding"] = "a" * (2 * MB)
    with peak_rss_growth() as grew:
        r = small.post("/predict", headers=AUTH, json={"tasks": [task], "label_config": VIDEO_CFG})
    assert r.status_code == 413 and "MAX_REQUEST_MB=1" in r.json["error"], r.get_data(as_text=True)[:300]
    assert len(r.get_data()) < 300 and grew[0] < 200
    assert small.get("/health").status_code == 200


def test_replies_and_log_lines_never_echo_a_long_value_or_control_characters(client, fake_ls, caplog):
    hostile = "\x1b[2J\r\n" + "a" * 500_000  # clears a terminal, forges a log line, floods both
    box = {"frame": 1, "x": 90, "y": 10, "width": 30, "height": 20, "enabled": True}  # outside: a 422
    task = video_task(fake_ls[1], box=box)
    task["id"] = 9
    brush(task)["id"] = hostile
    r = client.post("/predict", headers=AUTH, json={"tasks": [task], "label_config": VIDEO_CFG})
    assert r.status_code == 422 and "lies outside the frame" in r.json["error"], r.json
    error = r.json["error"]
    assert len(error) < 1000 and "\x1b" not in error and "\n" not in error and "\\x1b" in error
    assert f"({len(hostile)} chars)" in error  # says it was cut
    ignored = client.post("/webhook", json={"action": hostile})
    assert ignored.status_code == 200 and len(ignored.get_data()) < 1000 and "\x1b" not in ignored.json["action"]
    lines = [rec.getMessage() for rec in caplog.records]
    assert lines and all(len(m) < 3000 and "\x1b" not in m and "\n" not in m for m in lines)


def test_an_unexpected_error_is_a_500_without_the_exception_text(client, fake_ls, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("Authorization: Token secret-from-upstream")

    monkeypatch.setattr(client.model, "predict", boom)
    r = client.post("/predict", headers=AUTH, json={"tasks": [video_task(fake_ls[1])], "label_config": VIDEO_CFG})
    assert r.status_code == 500 and "RuntimeError" in r.json["error"] and "secret" not in r.json["error"]


# -- malformed values --------------------------------------------------------------------------
NAN_BOX = '{"frame": 1, "x": NaN, "y": NaN, "width": NaN, "height": NaN, "enabled": true}'


def with_keyframe(video, **changes) -> dict:
    task = video_task(video)
    brush(task)["value"]["sequence"][0].update(changes)
    return task


@pytest.mark.parametrize("case, message", [
    ("nan_box", "NaN is not JSON"),
    ("infinity_frame", "Infinity is not JSON"),
    ("string_frame", "sequence[0].frame must be a whole number, got str 3"),
    ("zero_frame", "sequence[0].frame must be between 1 and"),
    ("bool_x", "sequence[0].x must be a finite number, got bool True"),
    ("string_width", "sequence[0].width must be a finite number, got str 30"),
    ("string_task_id", "tasks[0].id must be a whole number, got str abc"),
    ("float_task_id", "tasks[0].id must be a whole number, got float 1.5"),
    ("huge_task_id", "tasks[0].id must be between 0 and"),
    ("string_item_index", "result[0].item_index must be a whole number, got str x"),
    ("list_annotations", "tasks[0].annotations must be a list, got dict"),
    ("value_list", "result[0].value must be an object, got list"),
    ("labels_number", "value.labels must be a list, got int 5"),
    ("from_name_list", "result[0].from_name must be a string"),
    ("context_result_dict", "params.context.result must be a list of regions"),
    ("label_config_list", "'label_config' must be a string"),
    ("deep_json", "JSON nested too deeply"),
    ("frame_rate_nan", 'frameRate="nan"'),
    ("frame_rate_inf", 'frameRate="inf"'),
    ("frame_rate_zero", 'frameRate="0"'),
])
def test_malformed_values_get_a_400_that_names_them(client, fake_ls, case, message):
    video = fake_ls[1]
    task, cfg, context = video_task(video), VIDEO_CFG, None
    region = brush(task)
    if case == "nan_box":
        text = json.dumps({"tasks": [task], "label_config": cfg}).replace(json.dumps(region["value"]["sequence"][0]), NAN_BOX)
        assert "NaN" in text
    elif case == "deep_json":
        text = "[" * 100_000 + "]" * 100_000
    else:
        if case == "infinity_frame":
            task = with_keyframe(video, frame=math.inf)
        elif case == "string_frame":
            task = with_keyframe(video, frame="3")
        elif case == "zero_frame":
            task = with_keyframe(video, frame=0)
        elif case == "bool_x":
            task = with_keyframe(video, x=True)
        elif case == "string_width":
            task = with_keyframe(video, width="30")
        elif case in ("string_task_id", "float_task_id", "huge_task_id"):
            task["id"] = {"string_task_id": "abc", "float_task_id": 1.5, "huge_task_id": 2**70}[case]
        elif case == "string_item_index":
            region["item_index"] = "x"
        elif case == "list_annotations":
            task["annotations"] = {"id": 1}
        elif case == "value_list":
            region["value"] = [1]
        elif case == "labels_number":
            region["value"]["labels"] = 5
        elif case == "from_name_list":
            region["from_name"] = ["box"]
        elif case == "context_result_dict":
            context = {"result": {"x": 1}}
        elif case == "label_config_list":
            cfg = [cfg]
        elif case.startswith("frame_rate"):
            rate = {"frame_rate_nan": "nan", "frame_rate_inf": "inf", "frame_rate_zero": "0"}[case]
            cfg = cfg.replace('frameRate="25"', f'frameRate="{rate}"')
        # json.dumps writes inf as Infinity, the way a hostile client may
        text = json.dumps({"tasks": [task], "label_config": cfg, "params": {"context": context}})
    r = post_raw(client, "/predict", text)
    assert r.status_code == 400 and message in r.json["error"], (r.status_code, r.get_data(as_text=True)[:300])
    assert "internal error" not in r.json["error"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("case, message", [
    ("annotation_list", "annotation must be an object with an 'id', got list"),
    ("task_string", "task must be an object with an 'id', got str"),
    ("project_list", "project must be an object with an 'id', got list"),
    ("annotation_id_nan", "NaN is not JSON"),
    ("annotation_id_string", "annotation.id must be a whole number, got str"),
    ("task_id_negative", "task.id must be between 1 and"),
    ("tasks_dict", "'tasks' must be a list of tasks, got dict"),
    ("action_number", "'action' must be a string, got int"),
])
def test_malformed_webhooks_get_a_400_that_names_the_value(client, fake_ls, case, message):
    body = {"action": "ANNOTATION_UPDATED", "project": {"id": 3}, "task": {"id": 1}, "annotation": {"id": 5}}
    if case == "annotation_list":
        body["annotation"] = [1]
    elif case == "task_string":
        body["task"] = "1"
    elif case == "project_list":
        body["project"] = [3]
    elif case == "annotation_id_string":
        body["annotation"] = {"id": "5"}
    elif case == "task_id_negative":
        body["task"] = {"id": -1}
    elif case == "tasks_dict":
        body.update(action="TASKS_CREATED", tasks={"id": 1})
    elif case == "action_number":
        body["action"] = 7
    text = json.dumps(body)
    if case == "annotation_id_nan":
        text = text.replace('"id": 5', '"id": NaN')
    r = client.post("/webhook", headers={"Content-Type": "application/json"}, data=text)
    assert r.status_code == 400 and message in r.json["error"], (r.status_code, r.get_data(as_text=True)[:300])


def test_setup_with_a_schema_that_is_not_a_string_is_a_400(client):
    r = client.post("/setup", headers=AUTH, json={"project": "1.0", "schema": ["<View/>"]})
    assert r.status_code == 400 and "'schema' must be a label config" in r.json["error"], r.json


def test_no_nan_in_any_reply(client, fake_ls, monkeypatch):
    """A NaN that got through (here a score) is a logged 500 with a JSON body, never invalid JSON."""
    with client.application.app_context():
        with pytest.raises(ValueError):
            client.application.json.dumps({"score": float("nan")})
    monkeypatch.setattr(client.model, "predict", lambda *a: ([{"result": [], "score": float("nan")}], {}))
    r = client.post("/predict", headers=AUTH, json={"tasks": [video_task(fake_ls[1])], "label_config": VIDEO_CFG})
    assert r.status_code == 500 and strict_json(r.get_data(as_text=True))["error"].startswith("internal error")


# -- objects -----------------------------------------------------------------------------------
def many_objects(video, n: int) -> dict:
    task = video_task(video, task_id=61)
    first = brush(task)
    task["annotations"][0]["result"] = [
        {**first, "id": f"r{i}", "value": {**first["value"], "sequence": [
            {"frame": 1, "x": (i % 20) * 4.5, "y": (i // 20) * 5.5, "width": 4, "height": 5, "enabled": True}]}}
        for i in range(n)]
    return task


def test_more_than_255_objects_is_a_clear_422_never_a_job_that_drops_them(client, fake_ls, caplog):
    task = many_objects(fake_ls[1], 300)
    r = client.post("/predict", headers=AUTH, json={"tasks": [task], "label_config": VIDEO_CFG})
    assert r.status_code == 422 and "300 objects; at most 255" in r.json["error"], r.json
    connect(client, 3, VIDEO_CFG)
    holds(task, 3)
    assert notify(client, "TASKS_CREATED", tasks=[61]).status_code == 202
    assert client.model.notifier.wait_idle()
    assert any("task 61 has 300 objects" in rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING")
    assert not client.model.jobs.jobs
    # 255 is the limit, not past it (checked alone: propagating 255 objects takes minutes)
    client.model.check_objects(61, parse_label_config(VIDEO_CFG), many_objects(fake_ls[1], 255)["annotations"][0]["result"])


def test_webhook_secret_refuses_forged_webhooks(fake_ls, tmp_path):
    """With WEBHOOK_SECRET, a webhook without it (or with another) is a 403 and changes nothing;
    with it (header or query parameter) it is handled as before."""
    from backend.app import create_app
    from backend.settings import BackendSettings
    from lazyxmem_core.engines import EngineSettings
    from test_backend import TOKEN

    url, _ = fake_ls
    app = create_app(BackendSettings(ls_url=url, api_key=TOKEN, cache_dir=str(tmp_path / "cache"),
                                     webhook_secret="s3cret-value",
                                     engine=EngineSettings(engine="embedded", refiner="embedded")))
    c = app.test_client()
    ignored = {"action": "PROJECT_UPDATED"}  # handled without touching anything: only the gate is tested
    for headers, query in [({}, ""), ({"X-Webhook-Secret": "wrong"}, ""), ({}, "?secret=s3cret-valu")]:
        r = c.post("/webhook" + query, json=ignored, headers=headers)
        assert r.status_code == 403 and "X-Webhook-Secret" in r.json["error"], r.json
        assert "s3cret" not in r.get_data(as_text=True)
    assert c.post("/webhook", json=ignored, headers={"X-Webhook-Secret": "s3cret-value"}).json["status"] == "ignored"
    assert c.post("/webhook?secret=s3cret-value", json=ignored).json["status"] == "ignored"
    assert c.get("/health").status_code == 200  # the rest of the server is not behind the secret


# -- forged webhooks ---------------------------------------------------------------------------
def test_forged_webhooks_change_nothing_and_post_nothing(client, fake_ls, caplog):
    """A webhook is a notification: what it carries besides ids is never used, and ids that
    Label Studio does not vouch for (an annotation it does not hold, one of another task, a task
    of another or an unconnected project) do nothing. Nothing from Label Studio's error replies
    reaches the webhook's caller."""
    task = images_task(fake_ls[1])
    connect(client, 3, IMAGES_CFG)
    holds(task, 3)
    r = client.post("/predict", headers=AUTH, json={"tasks": [task], "label_config": IMAGES_CFG})
    assert r.status_code == 200
    before = [m.copy() for m in client.model.tasks.held(2).masks()]
    posts = len(FakeLabelStudio.posted)
    poison = dict(brush(task), item_index=1, value={**brush(task)["value"], "rle": mask2rle(np.full((H, W), 255, np.uint8))})
    other = {"id": 40, "data": {"frames": task["data"]["frames"]}, "annotations": [{"id": 41, "result": [poison]}]}
    holds(other, 3)  # a genuine annotation, of another task
    holds({**other, "id": 50, "annotations": [{"id": 51, "result": [poison]}]}, 4)  # a project never connected
    forged = [
        # the payload's own annotation and task data (a poisoned mask) are ignored: LS holds no annotation 999
        {"action": "ANNOTATION_UPDATED", "project": {"id": 3, "label_config": IMAGES_CFG},
         "task": {**task, "annotations": [{"id": 999, "result": [poison]}]}, "annotation": {"id": 999, "result": [poison]}},
        {"action": "ANNOTATION_UPDATED", "project": {"id": 3}, "task": {"id": 2}, "annotation": {"id": 41}},
        {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "task": {"id": 50}, "annotation": {"id": 51}},
        {"action": "ANNOTATION_CREATED", "project": {"id": 4}, "task": {"id": 50}, "annotation": {"id": 51}},
        {"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": 123456, "data": {"frames": ["http://127.0.0.1:1/x.png"]},
                                                                   "annotations": [{"id": 1, "result": [poison]}]}]},
        {"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": [{"id": 50}]},
    ]
    client.model.notifier.retry_delays = (0.05,)
    for body in forged:
        r = client.post("/webhook", json=body)
        assert r.status_code in (200, 202), r.json
        assert "Not found" not in r.get_data(as_text=True)
    assert client.model.notifier.wait_idle()
    assert not client.model.jobs.jobs
    assert len(FakeLabelStudio.posted) == posts
    assert all((a == b).all() for a, b in zip(before, client.model.tasks.held(2).masks()))
    assert "/api/tasks/123456/" in FakeLabelStudio.reads  # looked up, not believed
    assert not any("x.png" in p for p in FakeLabelStudio.reads)
    warnings = " ".join(rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING")
    assert "answers 404" in warnings and "belongs to task 40" in warnings and "not connected" in warnings


def test_a_webhook_naming_too_many_tasks_is_refused_and_a_flood_is_bounded(client, fake_ls):
    client.model.settings = replace(client.model.settings, max_webhook_tasks=50)
    connect(client, 3, IMAGES_CFG)
    r = notify(client, "TASKS_CREATED", tasks=list(range(1, 52)))
    assert r.status_code == 422 and "51 tasks, over MAX_WEBHOOK_TASKS=50" in r.json["error"], r.json
    client.model.notifier.max_pending = 60
    gate = threading.Event()
    client.model.notifier.handle = lambda notice: gate.wait(10)  # Label Studio answers slowly
    assert notify(client, "TASKS_CREATED", tasks=list(range(1, 41))).status_code == 202
    end = time.time() + 10
    while (client.model.notifier.pending != 40 or not client.model.notifier._busy) and time.time() < end:
        time.sleep(0.01)  # the first is being looked up (and blocks): 39 wait
    # The same 40 again: the 39 waiting coalesce; the one under way is read again (it may have changed since).
    assert notify(client, "TASKS_CREATED", tasks=list(range(1, 41))).json["notices"] == 1
    r = notify(client, "TASKS_CREATED", tasks=list(range(41, 91)))
    assert r.status_code == 429 and "MAX_PENDING_NOTICES=60" in r.json["error"], r.json
    t0 = time.perf_counter()
    assert client.get("/health").status_code == 200 and time.perf_counter() - t0 < 1.0
    gate.set()
    assert client.model.notifier.wait_idle()


@pytest.mark.parametrize("credentials", ["ü:ß", "ann:pw\u00e9", "\u202e:x", "ann"])
def test_non_ascii_or_odd_basic_auth_credentials_get_a_401_not_a_500(client, credentials):
    header = {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}
    r = client.post("/predict", headers=header, json={"tasks": []})
    assert r.status_code == 401 and "basic auth" in r.json["error"], r.json


def test_a_non_ascii_password_works_and_a_user_without_password_is_refused_at_start(tmp_path):
    from backend.settings import BackendSettings
    from lazyxmem_core.engines import EngineSettings
    from lazyxmem_core.errors import LazyXMemError

    engine = EngineSettings(engine="embedded", refiner="embedded")
    app = create_app(BackendSettings(cache_dir=str(tmp_path), basic_auth_user="ännä", basic_auth_pass="pässwörd",
                                     engine=engine))
    good = {"Authorization": "Basic " + base64.b64encode("ännä:pässwörd".encode()).decode()}
    assert app.test_client().get("/versions", headers=good).status_code == 200
    assert app.test_client().get("/versions").status_code == 401
    with pytest.raises(LazyXMemError, match="must be set together"):
        BackendSettings(cache_dir=str(tmp_path), basic_auth_user="ann", engine=engine)


def test_an_interactive_call_naming_many_frames_is_refused_before_refining(client, fake_ls):
    """A context with a box on every frame would be one refiner call each inside the request."""
    video = fake_ls[1]
    task = video_task(video)
    assert client.post("/predict", headers=AUTH, json={"tasks": [task], "label_config": VIDEO_CFG}).status_code == 200
    kfs = [{"frame": f, "x": 5.0 + f, "y": 5.0, "width": 20.0, "height": 20.0, "rotation": 0, "enabled": True}
           for f in range(1, 13)]
    region = {"id": "r1", "from_name": "box", "to_name": "video", "type": "videorectangle",
              "value": {"sequence": kfs, "labels": ["Object"]}}
    r, seconds = timed(lambda: client.post("/predict", headers=AUTH, json={
        "tasks": [task], "label_config": VIDEO_CFG, "params": {"context": {"result": [region]}}}))
    assert r.status_code == 422 and "at most 8 are answered at once" in r.json["error"], r.json
    assert seconds < 2.0 and not client.model.jobs.jobs


def test_a_batch_past_its_budget_queues_the_rest_without_reading_them(client, fake_ls, monkeypatch):
    """A batch /predict reads each video's header (a download) to size its job; once the request's
    SYNC_BUDGET_S is spent the remaining tasks are queued unread, so a batch of many slow videos
    cannot hold a web thread for MEDIA_TIMEOUT_S each."""
    client.model.settings = replace(client.model.settings, sync_budget_s=0.0)
    read = []
    real = client.model.media.declared_frames
    monkeypatch.setattr(client.model.media, "declared_frames", lambda task, cfg: read.append(task["id"]) or real(task, cfg))
    tasks = [video_task(fake_ls[1], task_id=t) for t in (71, 72, 73, 74)]
    r = client.post("/predict", headers=AUTH, json={"tasks": tasks, "label_config": VIDEO_CFG})
    assert r.status_code == 200 and r.json["results"] == [[]] * 4 and sorted(r.json["jobs"]) == ["71", "72", "73", "74"]
    assert read == [71]
