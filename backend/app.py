"""The Flask app speaking Label Studio 1.23.2's ML backend protocol.

This module only handles HTTP: auth, JSON parsing, error replies. What a request does is the
service's (``backend.service``); the Lazy logic lives in ``lazyxmem_core``.
"""
from __future__ import annotations

import base64
import hmac
import logging
import time
from typing import Any

from flask import Flask, Request, jsonify, request, send_file
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from lazyxmem_core import __version__
from lazyxmem_core.engines import propagator_name, refiner_name
from lazyxmem_core.errors import LazyXMemError

from . import export
from .checks import Malformed, check_regions, check_task, got, safe_message, shown
from .labelconfig import ConfigError, parse_label_config
from .notices import Busy
from .service import Service
from .settings import BackendSettings


log = logging.getLogger("lazyxmem.backend")
WEBHOOK_SECRET_HEADER = "X-Webhook-Secret"


class _BadRequest(ValueError):
    pass


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON: numbers must be finite")


class _StrictJSON(DefaultJSONProvider):
    """JSON as the standard has it, both ways. Python's reads NaN and Infinity (a NaN box became a
    full-frame box) and writes them (a NaN frame rate gave a reply no JSON parser takes); a body
    nested 100k deep made its parser raise RecursionError, a 500, where it is a bad request."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        kwargs.setdefault("parse_constant", _not_json)
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)  # a NaN that got through is a logged 500, never invalid JSON
        return super().dumps(obj, **kwargs)


class _Request(Request):
    def on_json_loading_failed(self, e: ValueError | None) -> Any:
        # Flask's own says only "400 Bad Request"; the reason (never the body) helps the caller.
        raise _BadRequest("request body must be a JSON object" +
                          (f": {e}" if e is not None else " sent as Content-Type: application/json"))


def _task_ids(tasks: list | None = None) -> str:
    """Task ids of the current request, for log lines."""
    if tasks is None:
        body = request.get_json(silent=True)
        tasks = body.get("tasks") if isinstance(body, dict) else None
        if tasks is None and isinstance(body, dict) and isinstance(body.get("task"), dict):
            tasks = [body["task"]]
    tasks = [t for t in tasks or [] if isinstance(t, dict)]
    ids = [shown(t.get("id"), 24) for t in tasks[:20]]  # a log line, not a copy of the body
    more = f" and {len(tasks) - 20} more" if len(tasks) > 20 else ""
    return "task " + ",".join(ids) + more if ids else "(no task)"


def _project_id(body: dict) -> int | None:
    """The project id in /setup's and /predict's ``project`` ("<id>.<created-at>", or the id)."""
    head = str(body.get("project", "")).split(".")[0]
    return int(head) if head.isdigit() and len(head) < 19 else None


def _check_auth(user: str, password: str) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return False
    try:
        given_user, _, given_pass = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except Exception:
        return False
    # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
    return (hmac.compare_digest(given_user.encode(), user.encode())
            & hmac.compare_digest(given_pass.encode(), password.encode()))


def create_app(settings: BackendSettings | None = None) -> Flask:
    app = Flask(__name__)
    app.json = _StrictJSON(app)
    app.request_class = _Request
    model = Service(settings or BackendSettings.from_env())
    app.config["model"] = model
    model.jobs.resume()  # in-process jobs a killed predecessor left queued or running
    max_pixels = model.settings.max_pixels
    # Werkzeug refuses a longer body (413) before reading it: 40 MB bodies used to be parsed,
    # then echoed back in a 422 and in a log line.
    app.config["MAX_CONTENT_LENGTH"] = int(model.settings.max_request_mb * 2**20)
    settings = model.settings.engine
    # The hint is for an `auto` that fell back to the embedded engine, not for SAM 2 (which needs
    # no XMem checkpoint) nor for an embedded engine asked for by name.
    fell_back = settings.engine == "auto" and propagator_name(settings) == "embedded"
    log.info("lazyxmem %s: engine %s, refiner %s%s", __version__, propagator_name(settings), refiner_name(settings),
             " (no XMEM_CHECKPOINT or SAM2_CHECKPOINT: the embedded no-weights engine)" if fell_back else "")
    auth_user, auth_pass = model.settings.basic_auth_user, model.settings.basic_auth_pass
    started = time.time()
    counters = {"requests": 0, "errors": 0}
    model_version = model.model_version

    @app.before_request
    def authenticate() -> Any:
        counters["requests"] += 1
        # Label Studio sends no credentials with webhooks (its webhook has no auth headers), and
        # /health must answer its 1 s probe: these two stay open; everything else needs basic auth.
        if auth_user and request.path not in ("/health", "/", "/webhook"):
            if not _check_auth(auth_user, auth_pass or ""):
                return jsonify(error="authentication required: wrong or missing basic auth credentials"), 401, {
                    "WWW-Authenticate": 'Basic realm="lazyxmem"'}
        return None

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        counters["errors"] += 1
        return jsonify(error=safe_message(exc.description or exc.name)), exc.code

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge) -> Any:
        counters["errors"] += 1
        return jsonify(error=f"request body over {app.config['MAX_CONTENT_LENGTH']} bytes "
                             f"(MAX_REQUEST_MB={model.settings.max_request_mb:g}): not read"), 413

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Any:
        counters["errors"] += 1
        log.exception("unhandled error on %s %s", shown(request.path), _task_ids())
        # The exception's text may quote the request, Label Studio's reply or a path: the log has it.
        return jsonify(error=f"internal error ({type(exc).__name__}): see the backend's log"), 500

    @app.get("/")
    @app.get("/health")
    def health() -> Any:
        return jsonify(status="UP", model_class="LazyXMem", engine=propagator_name(settings),
                       refiner=refiner_name(settings), version=__version__, jobs=model.jobs.counts(),
                       notices_pending=model.notifier.pending)

    @app.post("/setup")
    def setup() -> Any:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return jsonify(error="setup expects a JSON object with 'project' and 'schema'"), 400
        schema = body.get("schema")
        if schema is not None and not isinstance(schema, str):
            raise Malformed(f"'schema' must be a label config (a string), {got(schema)}")
        if schema:
            parse_label_config(schema)  # a config we cannot serve is reported at connection time
        project = _project_id(body)
        if project is None:
            raise Malformed(f"'project' must be Label Studio's '<id>.<created-at>', {got(body.get('project'))}")
        model.projects.add(project, schema or "")  # webhooks are acted on for connected projects only
        model.check_version_soon(project)
        return jsonify(model_version=model_version)

    @app.get("/versions")
    def versions() -> Any:
        return jsonify(versions=[model_version])

    def json_body() -> dict:
        body = request.get_json()
        if not isinstance(body, dict):
            raise _BadRequest("request body must be a JSON object")
        return body

    @app.errorhandler(_BadRequest)
    def bad_request(exc: _BadRequest) -> Any:
        counters["errors"] += 1
        return jsonify(error=str(exc)), 400

    @app.errorhandler(LazyXMemError)  # the request cannot be served as it is
    def client_error(exc: Exception) -> Any:
        counters["errors"] += 1
        message = safe_message(str(exc))  # messages built anywhere may quote a value of the request
        log.warning("%s %s: %s", shown(request.path), _task_ids(), message)
        # A config we cannot serve or a value of the wrong type is a bad request; a task whose
        # content we cannot use is 422.
        return jsonify(error=message), 400 if isinstance(exc, (ConfigError, Malformed)) else 422

    @app.post("/predict")
    def predict() -> Any:
        body = json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            raise _BadRequest("'tasks' must be a non-empty list of task objects")
        for i, task in enumerate(tasks):
            check_task(task, f"tasks[{i}]", max_pixels)
        params = body.get("params") or {}
        if not isinstance(params, dict):
            raise _BadRequest("'params' must be an object")
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise _BadRequest("'params.context' must be an object or null")
        if context and context.get("result") is not None:
            check_regions(context["result"], "params.context.result", max_pixels)
        if body.get("label_config") is not None and not isinstance(body["label_config"], str):
            raise Malformed(f"'label_config' must be a string, {got(body['label_config'])}")
        project = _project_id(body)
        config = body.get("label_config") or (model.projects.config(project) if project is not None else None)
        if not config:
            raise _BadRequest("no label config: send 'label_config' or call /setup for this project first")
        t0 = time.perf_counter()
        results, jobs = model.predict(tasks, config, context)
        if any(results):  # Label Studio stores them under our version once this returns
            model.check_version_soon(project)
        log.info("predict %s: %d task(s) in %.2f s%s", _task_ids(tasks), len(tasks), time.perf_counter() - t0,
                 f", {len(jobs)} queued" if jobs else "")
        # A queued task's entry is [] (Label Studio stores nothing for it); its job posts later.
        return jsonify(results=results, model_version=model_version, **({"jobs": jobs} if jobs else {}))

    secret = model.settings.webhook_secret

    @app.post("/webhook")
    def webhook() -> Any:
        if secret is not None:
            given = request.headers.get(WEBHOOK_SECRET_HEADER) or request.args.get("secret") or ""
            if not hmac.compare_digest(given.encode(), secret.encode()):  # constant time
                log.warning("webhook refused: %s secret from %s", "wrong" if given else "no", request.remote_addr)
                return jsonify(error=f"webhook secret missing or wrong: Label Studio must send the {WEBHOOK_SECRET_HEADER} "
                                     "header (Settings -> Webhooks -> this backend's webhook -> Headers) or the "
                                     "webhook URL must end in ?secret=<WEBHOOK_SECRET>"), 403
        # Only ids are read: the task, its annotation and the config are read back from Label
        # Studio, off this thread (backend.notices).
        try:
            reply, status = model.webhook(json_body())
        except Busy as exc:
            log.warning("webhook refused: %s", exc)
            return jsonify(error=str(exc)), 429
        return jsonify(reply), status

    @app.get("/jobs/<job_id>")
    def job(job_id: str) -> Any:
        job = model.jobs.status(job_id)
        if job is None:
            return jsonify(error=f"no job {shown(job_id)}"), 404
        return jsonify(job)

    @app.delete("/tasks/<int:task_id>/jobs")
    def cancel_jobs(task_id: int) -> Any:
        # Queued jobs are dropped, a running one stops at its next frame and posts nothing.
        return jsonify(canceled=model.jobs.cancel_task(task_id))

    @app.get("/tasks/<int:task_id>/masks")
    def masks(task_id: int) -> Any:
        fmt = request.args.get("format", "coco")
        if fmt not in ("png", "coco"):
            return jsonify(error="format must be png or coco"), 400
        state = model.tasks.held(task_id)
        if state is not None:
            model.adopt_stored(state)
            view, objects = state.view, state.objects  # one consistent snapshot, whatever a job rewrites
        else:
            # Not held here (a restart, an eviction, a worker's task): the latest masks a job stored
            # for the task id, so no Label Studio read is needed to name the entry.
            stored = model.views.latest(task_id, model.model_version)
            if stored is None:
                return jsonify(error=f"task {task_id} has no masks yet: run a prediction first (open the task in "
                                     f"Label Studio, or `lazyxmem ls preannotate --project <id>`)"), 404
            view, objects = stored.view, export.objects_of(stored.prediction, stored.view)
        if fmt == "png":
            return send_file(export.png_zip(view), mimetype="application/zip", as_attachment=True,
                             download_name=f"task-{task_id}-masks.zip")
        return jsonify(export.coco_rle(view, objects))

    @app.get("/metrics")
    def metrics() -> Any:
        return jsonify(uptime_s=round(time.time() - started, 1), **counters)

    return app
