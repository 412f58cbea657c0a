"""The Flask app speaking Label Studio 1.23.2's ML backend protocol.

This module only handles HTTP: auth, JSON parsing, error replies. Task translation lives in the
model class; the Lazy logic lives in ``lazyxmem_core``.
"""
from __future__ import annotations

import base64
import hmac
import logging
import os
import time
from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from lazyxmem_core import __version__
from lazyxmem_core.engines import EngineSettings, propagator_name, refiner_name

log = logging.getLogger("lazyxmem.backend")


def _check_auth(user: str, password: str) -> bool:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Basic "):
        return False
    try:
        given_user, _, given_pass = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except Exception:
        return False
    return hmac.compare_digest(given_user, user) & hmac.compare_digest(given_pass, password)


def create_app(settings: EngineSettings | None = None) -> Flask:
    app = Flask(__name__)
    settings = settings or EngineSettings.from_env()
    auth_user, auth_pass = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    started = time.time()
    counters = {"requests": 0, "errors": 0}
    model_version = f"lazyxmem-{__version__}-{propagator_name(settings)}"

    @app.before_request
    def authenticate() -> Any:
        counters["requests"] += 1
        if auth_user and request.path not in ("/health", "/"):
            if not _check_auth(auth_user, auth_pass or ""):
                return jsonify(error="authentication required: wrong or missing basic auth credentials"), 401, {
                    "WWW-Authenticate": 'Basic realm="lazyxmem"'}
        return None

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        counters["errors"] += 1
        return jsonify(error=exc.description), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Any:
        counters["errors"] += 1
        log.exception("unhandled error on %s", request.path)
        return jsonify(error=f"internal error: {type(exc).__name__}: {exc}"), 500

    @app.get("/")
    @app.get("/health")
    def health() -> Any:
        return jsonify(status="UP", model_class="LazyXMem", engine=propagator_name(settings),
                       refiner=refiner_name(settings), version=__version__)

    @app.post("/setup")
    def setup() -> Any:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return jsonify(error="setup expects a JSON object with 'project' and 'schema'"), 400
        return jsonify(model_version=model_version)

    @app.get("/versions")
    def versions() -> Any:
        return jsonify(versions=[model_version], model_dir=os.environ.get("MODEL_DIR", ""))

    @app.get("/metrics")
    def metrics() -> Any:
        return jsonify(uptime_s=round(time.time() - started, 1), **counters)

    return app
