# Images for the VAE service. Targets (the last one, `serve`, is the default):
#
#   docker build -t vae-serving .                                   CPU serving: onnxruntime, no torch, non-root
#   docker build --build-arg RUNTIME=gpu -t vae-serving:gpu .       GPU serving: onnxruntime-gpu on a CUDA base
#   docker build --target train -t vae-serving:train .              training + export (torch CPU build by default)
#
# Both serving images are one `serve` stage on top of a runtime stage (`cpu` or `gpu`: Python and the serving
# dependencies), so what runs the service is written once.
# Dependencies are installed in layers of their own, before any code is copied, so code edits rebuild in
# seconds. pyproject.toml stays the one list of dependencies (docker/requirements.py reads it).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu 1.31 on PyPI (pinned in pyproject.toml's gpu extra) is built for CUDA 13 and cuDNN 9: the
# base must carry the same majors. CUDA 13 needs an NVIDIA driver R580 or newer on the host.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
# The serving runtime: cpu or gpu (a stage below).
ARG RUNTIME=cpu

# ---------------------------------------------------------------- serving dependencies (CPU)
FROM ${PYTHON_IMAGE} AS serve-deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml /src/pyproject.toml
COPY docker/requirements.py /src/docker/requirements.py
# pip and setuptools are not needed to serve. The bytecode stays, compiled so that it is used whatever the
# files' timestamps: without it every start (each worker, each restart) compiles the stack anew, as the
# image's user cannot write it (importing the service: 1.5-1.6 s without, 0.8 s with; with pip gone, +19 MB).
RUN python -m venv /opt/venv \
 && python /src/docker/requirements.py serve > /src/requirements.txt \
 && /opt/venv/bin/pip install --no-compile -r /src/requirements.txt \
 && /opt/venv/bin/pip uninstall -y -q pip setuptools \
 && /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv/lib

# ---------------------------------------------------------------- training + export
FROM ${PYTHON_IMAGE} AS train
# Where torch comes from. PyPI's plain `torch` is the multi-GB CUDA build, so the default is PyTorch's CPU
# index. A CUDA build: --build-arg TORCH_INDEX_URL=<a cuXXX index>. A local wheel: put it in docker/wheels/
# and pass --build-arg TORCH_SPEC=/wheels/<file>.whl --build-arg TORCH_INDEX_URL=
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    MALLOC_MMAP_THRESHOLD_=1048576 VAE_DATA_DIR=/data
COPY docker/wheels/ /wheels/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
COPY pyproject.toml /src/pyproject.toml
COPY docker/requirements.py /src/docker/requirements.py
RUN python /src/docker/requirements.py train > /src/requirements.txt \
 && /opt/venv/bin/pip install -r /src/requirements.txt
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY training/ /app/training/
COPY service/ /app/service/
# Data: Fashion-MNIST's IDX files in /data (mounted; `python -m training download --dest /data` fetches
# and verifies them). Output: mount the host's models/ at /app/models. Any `python -m training` command works:
#   docker run --rm -v "$PWD/models:/app/models" -v "$PWD/data:/data" vae-serving:train train --help
ENTRYPOINT ["python", "-m", "training"]
CMD ["train", "--help"]

# ---------------------------------------------------------------- serving runtimes: Python + dependencies
FROM ${PYTHON_IMAGE} AS cpu
COPY --from=serve-deps /opt/venv /opt/venv
ENV DEVICE=cpu

FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml /src/pyproject.toml
COPY docker/requirements.py /src/docker/requirements.py
RUN python3 -m venv /opt/venv \
 && python3 /src/docker/requirements.py gpu > /src/requirements.txt \
 && /opt/venv/bin/pip install -r /src/requirements.txt \
 && /opt/venv/bin/pip uninstall -y -q pip setuptools \
 && /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv/lib
ENV DEVICE=cuda

# ---------------------------------------------------------------- serving (default target)
# hadolint ignore=DL3006
FROM ${RUNTIME} AS serve
RUN groupadd --system --gid 10001 app && useradd --system --no-log-init --uid 10001 --gid 10001 --create-home app
# MALLOC_MMAP_THRESHOLD_: glibc returns large freed buffers (request bodies, batches) to the OS at once, so
# the resident size stays flat under load instead of growing with the largest request seen.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MALLOC_MMAP_THRESHOLD_=1048576 \
    MODEL_DIR=/app/models HOST=0.0.0.0 PORT=8000
WORKDIR /app
COPY service/ /app/service/
RUN python -m compileall -q --invalidation-mode unchecked-hash /app/service
COPY models/ /app/models/
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/healthz', timeout=2)"]
# uvicorn runs as PID 1 (python -m service calls uvicorn.run in-process) and exits cleanly on SIGTERM.
CMD ["python", "-m", "service"]
