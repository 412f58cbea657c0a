# GPU image of the Lazy-XMem ML backend: the web process (gunicorn) and the job workers
# (`lazyxmem worker`) run from it. The host needs the NVIDIA driver and the container toolkit.
#
# Checkpoints are fetched at build time into /opt/models (never into the repository):
#   docker build --build-arg XMEM_VARIANT=XMem-s012 --build-arg SAM_TYPE=vit_h -t lazyxmem .
#   SAM 2.1 as propagator and refiner: --build-arg SAM2_TYPE=base_plus --build-arg XMEM_VARIANT= --build-arg SAM_TYPE=
#   the paper's refiner:               --build-arg SAM_HQ_TYPE=vit_l
# Empty build args skip a download; then mount checkpoints at run time under MODEL_DIR and point
# XMEM_CHECKPOINT / SAM_CHECKPOINT at them (without any, the embedded no-weights engine runs).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG XMEM_VARIANT=XMem-s012
ARG SAM_TYPE=vit_h
ARG SAM2_TYPE=
ARG SAM_HQ_TYPE=

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    PORT=9090 WORKERS=1 THREADS=4 LOG_LEVEL=INFO DEVICE=cuda MODEL_DIR=/models CACHE_DIR=/cache \
    XMEM_CHECKPOINT=${XMEM_VARIANT:+/opt/models/xmem.pth} \
    SAM_CHECKPOINT=${SAM_TYPE:+/opt/models/sam.pth} \
    SAM_TYPE=${SAM_TYPE:-vit_h} \
    SAM2_CHECKPOINT=${SAM2_TYPE:+/opt/models/sam2.pt} \
    SAM_HQ_CHECKPOINT=${SAM_HQ_TYPE:+/opt/models/sam_hq.pth} \
    SAM_HQ_TYPE=${SAM_HQ_TYPE:-vit_l}

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libgl1 libglib2.0-0 curl \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt requirements-sam2.txt pyproject.toml README.md LICENSE ./
# The torch pinned in requirements.txt is the CUDA build (it brings its CUDA libraries). sam2 is
# built against it, without its optional CUDA extension (hole filling, which we do not use).
RUN pip install -r requirements.txt \
 && SAM2_BUILD_CUDA=0 pip install --no-build-isolation -r requirements-sam2.txt
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
 && if [ -n "$SAM2_TYPE" ]; then \
      lazyxmem weights download sam2 --type "$SAM2_TYPE" --dir /opt/models \
      && ln -s "/opt/models/sam2.1_hiera_${SAM2_TYPE}.pt" /opt/models/sam2.pt; fi \
 && if [ -n "$SAM_HQ_TYPE" ]; then \
      lazyxmem weights download sam-hq --type "$SAM_HQ_TYPE" --dir /opt/models \
      && ln -s "/opt/models/sam_hq_${SAM_HQ_TYPE}.pth" /opt/models/sam_hq.pth; fi \
 && useradd --create-home --uid 1000 lazyxmem \
 && mkdir -p /models /cache && chown lazyxmem /models /cache

USER lazyxmem
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=3s --start-period=120s \
  CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1
# Workers override this with `lazyxmem worker` (see docker/docker-compose.yml).
CMD exec gunicorn --bind "0.0.0.0:${PORT}" --workers "${WORKERS}" --threads "${THREADS}" --timeout 0 backend.wsgi:app
