"""A local stand-in for Label Studio's API: serves task media (token required), the tasks,
annotations and projects a test puts in it (``/api/tasks/<id>/`` ...: what the backend reads back
when a webhook names them), records the predictions posted back and lists them, the way
label-studio-sdk calls them."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

TOKEN = "t" * 40


class FakeLabelStudio(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    posted: list[dict] = []
    records: dict[str, dict[int, dict]] = {"tasks": {}, "annotations": {}, "projects": {}, "predictions": {},
                                           "ml": {}}  # ml: the projects' ML backend records
    reads: list[str] = []  # API paths read, in order
    deleted: list[int] = []  # prediction ids deleted
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def _json(self, status: int, obj) -> None:
        out = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self):
        if self.path.startswith("/data/upload/redirect"):  # a media path: Label Studio sends it elsewhere
            self.send_response(302)
            self.send_header("Location", "http://example.invalid/x.avi")
            self.end_headers()
            return
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            self.send_response(401)
            self.end_headers()
            return
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "api" and parts[1] in self.records:
            with self.lock:
                self.reads.append(url.path)
            record = self.records[parts[1]].get(int(parts[2])) if parts[2].isdigit() else None
            if record is None:
                self._json(404, {"detail": "Not found.", "status_code": 404})
            else:
                self._json(200, record)
            return
        if url.path.rstrip("/") == "/api/predictions":
            task = parse_qs(url.query).get("task", [None])[0]
            with self.lock:
                preds = [{"id": i + 1, **p["json"]} for i, p in enumerate(self.posted)
                         if p["path"].startswith("/api/predictions") and (task is None or str(p["json"].get("task")) == task)
                         and i + 1 not in self.deleted]
            self._json(200, preds)
            return
        if url.path.rstrip("/") == "/api/ml":
            project = parse_qs(url.query).get("project", [""])[0]
            self._json(200, [b for b in self.records["ml"].values() if str(b.get("project")) == project])
            return
        if url.path.rstrip("/") == "/api/tasks":  # the SDK's tasks.list(project=...): pages until one is empty
            query = parse_qs(url.query)
            project, page = query.get("project", [""])[0], int(query.get("page", ["1"])[0])
            with self.lock:
                tasks = [t for t in self.records["tasks"].values() if str(t.get("project")) == project]
            self._json(200, {"tasks": tasks if page == 1 else [], "total": len(tasks)})
            return
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def do_DELETE(self):
        parts = urlsplit(self.path).path.strip("/").split("/")
        with self.lock:
            if len(parts) == 3 and parts[:2] == ["api", "predictions"] and parts[2].isdigit():
                self.deleted.append(int(parts[2]))
                self.send_response(204)
            else:
                self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def do_PATCH(self):
        parts = urlsplit(self.path).path.strip("/").split("/")
        data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with self.lock:
            record = self.records["projects"].get(int(parts[2])) if len(parts) == 3 and parts[:2] == [
                "api", "projects"] and parts[2].isdigit() else None
            if record is not None:
                record.update(data)
        if self.headers.get("Authorization") != f"Token {TOKEN}" or record is None:
            self._json(404, {"detail": "Not found."})
        else:
            self._json(200, record)

    def do_POST(self):
        data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with self.lock:
            self.posted.append({"path": self.path, "json": data})
            n = len(self.posted)
        self._json(201, {"id": n, **data})


def serve() -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLabelStudio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def holds(task: dict, project: int = 3, label_config: str | None = None) -> dict:
    """Put ``task`` (and its annotations) into the fake Label Studio, in ``project``."""
    task = {**task, "project": project}
    recs = FakeLabelStudio.records
    recs["tasks"][int(task["id"])] = task
    for ann in task.get("annotations") or []:
        recs["annotations"][int(ann["id"])] = {**ann, "task": int(task["id"])}
    if label_config is not None:
        recs["projects"][project] = {"id": project, "title": f"project {project}", "label_config": label_config}
    return task


def forget_all() -> None:
    for kind in FakeLabelStudio.records.values():
        kind.clear()
    FakeLabelStudio.reads.clear()
    FakeLabelStudio.deleted.clear()
