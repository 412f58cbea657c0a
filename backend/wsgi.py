"""WSGI entry for gunicorn: ``gunicorn backend.wsgi:app``."""
import logging
import os

from backend.app import create_app

logging.basicConfig(level=(os.environ.get("LOG_LEVEL") or "INFO").upper(),
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()
