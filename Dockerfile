# GPU image of the Lazy-XMem ML backend. The torch wheel brings its own CUDA runtime libraries;
# the host needs only the NVIDIA driver and the container toolkit (`--gpus all`).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PORT=9090 WORKERS=1 THREADS=4 LOG_LEVEL=INFO MODEL_DIR=/models DEVICE=cuda

RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt pyproject.toml README.md LICENSE ./
RUN pip install -r requirements.txt
COPY lazyxmem_core ./lazyxmem_core
COPY backend ./backend
RUN pip install --no-deps . \
 && useradd --create-home --uid 1000 lazyxmem \
 && mkdir -p /models /cache && chown lazyxmem /models /cache

USER lazyxmem
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s \
  CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1
CMD exec gunicorn --bind "0.0.0.0:${PORT}" --workers "${WORKERS}" --threads "${THREADS}" --timeout 0 backend.wsgi:app
