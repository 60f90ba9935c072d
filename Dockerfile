# syntax=docker/dockerfile:1.7
# cogserve images. Weights are mounted at run time, never baked in.
#   GPU (default target):  docker build -t cogserve .
#   CPU, embedded tiny model, for laptops and CI:  docker build --target cpu -t cogserve:cpu .
# Where registries are unreachable, point BASE_IMAGE / BUILD_IMAGE at a local CUDA base.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG BUILD_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
ARG CPU_IMAGE=python:3.12-slim-bookworm

# ---- GPU build: a venv with CUDA torch and the [gpu] extra (flash-attn compiles against nvcc)
FROM ${BUILD_IMAGE} AS gpu-build
ARG TORCH_VERSION=2.9.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 MAX_JOBS=8
# NOTE: apt packages follow the base image's pinned release; pinning each one breaks on every base update
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev git build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install "packaging==25.0" "ninja==1.13.0" "wheel==0.45.1" "setuptools==80.9.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY model ./model
COPY kernels ./kernels
# the project itself, its [gpu] and [structured] extras pinned in pyproject.toml
# hadolint ignore=DL3013
RUN pip install --no-build-isolation ".[gpu,structured]"

# ---- GPU runtime
FROM ${BASE_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 cogserve
COPY --from=gpu-build /opt/venv /opt/venv
USER 10001
WORKDIR /home/cogserve
EXPOSE 8000
# the model folder is a read-only mount, e.g. -v /models/cogvlm-chat-hf:/models/cogvlm:ro
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"]
ENTRYPOINT ["cogserve", "serve"]
CMD ["--model", "/models/cogvlm", "--host", "0.0.0.0", "--port", "8000"]

# ---- CPU: CPU torch, the embedded model (trained tiny CogVLM, a few MB)
FROM ${CPU_IMAGE} AS cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
    && pip install "torch==2.9.1" --index-url https://download.pytorch.org/whl/cpu \
    && useradd --create-home --uid 10001 cogserve
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY model ./model
COPY kernels ./kernels
COPY models/cogvlm-tiny-shapes /opt/cogvlm-tiny-shapes
# hadolint ignore=DL3013
RUN pip install ".[structured]"
USER 10001
WORKDIR /home/cogserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"]
ENTRYPOINT ["cogserve", "serve"]
CMD ["--model", "/opt/cogvlm-tiny-shapes", "--served-model-name", "cogvlm-tiny", "--host", "0.0.0.0", "--port", "8000"]
