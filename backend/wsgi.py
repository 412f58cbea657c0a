"""WSGI entry for gunicorn: ``gunicorn backend.wsgi:app``."""
import logging

from backend.app import create_app
from backend.settings import log_level

logging.basicConfig(level=log_level().upper(),
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()
