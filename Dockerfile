# GPU image of the Lazy-XMem ML backend: the web process (gunicorn) and the job workers
# (`lazyxmem worker`) run from it. The host needs the NVIDIA driver and the container toolkit.
#
# Checkpoints are fetched at build time into /opt/models (never into the repository):
#   docker build --build-arg XMEM_VARIANT=XMem-s012 --build-arg SAM_TYPE=vit_h -t lazyxmem .
# Empty build args skip a download; then mount checkpoints at run time under MODEL_DIR and point
# XMEM_CHECKPOINT / SAM_CHECKPOINT at them (without any, the embedded no-weights engine runs).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG XMEM_VARIANT=XMem-s012
ARG SAM_TYPE=vit_h

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    PORT=9090 WORKERS=1 THREADS=4 LOG_LEVEL=INFO DEVICE=cuda MODEL_DIR=/models CACHE_DIR=/cache \
    XMEM_CHECKPOINT=${XMEM_VARIANT:+/opt/models/xmem.pth} \
    SAM_CHECKPOINT=${SAM_TYPE:+/opt/models/sam.pth} \
    SAM_TYPE=${SAM_TYPE:-vit_h}

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libgl1 libglib2.0-0 curl \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt pyproject.toml README.md LICENSE ./
# The torch pinned in requirements.txt is the CUDA build (it brings its CUDA libraries).
RUN pip install -r requirements.txt
COPY lazyxmem_core ./lazyxmem_core
COPY backend ./backend
RUN pip install --no-deps . \
 && mkdir -p /opt/models \
 && if [ -n "$XMEM_VARIANT" ]; then \
      lazyxmem weights download xmem --variant "$XMEM_VARIANT" --dir /opt/models \
      && ln -s "/opt/models/$XMEM_VARIANT.pth" /opt/models/xmem.pth; fi \
 && if [ -n "$SAM_TYPE" ]; then \
      lazyxmem weights download sam --type "$SAM_TYPE" --dir /opt/models \
      && ln -s "$(ls /opt/models/sam_${SAM_TYPE}_*.pth)" /opt/models/sam.pth; fi \
 && useradd --create-home --uid 1000 lazyxmem \
 && mkdir -p /models /cache && chown lazyxmem /models /cache

USER lazyxmem
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=120s \
  CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1
# Workers override this with `lazyxmem worker` (see docker/docker-compose.yml).
CMD exec gunicorn --bind "0.0.0.0:${PORT}" --workers "${WORKERS}" --threads "${THREADS}" --timeout 0 backend.wsgi:app
