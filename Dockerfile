# XMAG service images, two flavours of one file:
#   docker build -t xmag:gpu .                          # default: NVIDIA GPU (TensorRT, onnxruntime-gpu, cuCIM)
#   docker build --build-arg FLAVOUR=cpu -t xmag:cpu .  # CPU only (torch CPU, onnxruntime)
# Both run `xmag serve`: REST on :8000, gRPC on :50051, slides read-only from /slides, model
# repositories in the volume /models (see deploy/README.md).
#
# Base images are pinned by tag. Pin them by digest as well (FROM image:tag@sha256:...) when
# you mirror them: this file was written where no image registry could be reached.
#
# The demo model repository is built at first start, not baked in: `xmag serve` without
# XMAG_MODEL_REPO exports it (~30 s) into model_repo/demo, which the link below places in the
# /models volume, so it is built once per volume. Baking it in would add ~740 MB of untrained
# weights to every image, including those that only ever serve a real repository.

# The flavour picks the base stage (cpu-base or gpu-base) the runtime stage at the end starts from.
ARG FLAVOUR=gpu

# ---- builder: the project's wheel (pure Python: one wheel serves both flavours) ----
FROM python:3.11.13-slim-bookworm AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY xmag ./xmag
COPY cli ./cli
COPY service ./service
COPY export ./export
COPY training ./training
COPY benchmarks ./benchmarks
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- cpu-base: python:3.11-slim, torch CPU, onnxruntime, cuCIM reading on the CPU ----
FROM python:3.11.13-slim-bookworm AS cpu-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=builder /wheels /tmp/wheels
# The wheel with its [serve,export,train] extras: the service, and the training face and export stage that
# build the demo repository at first start (its head trained on synthetic slides).
# torch's CPU build from PyTorch's CPU index (PyPI's Linux torch brings ~3 GB of CUDA libraries);
# it satisfies the wheel's torch==2.13.0 in the same resolve. cuCIM without its declared CUDA
# dependencies, as the Makefile installs it: it reads slides on the CPU, about twice OpenSlide's rate.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        "torch==2.13.0+cpu" "$(echo /tmp/wheels/xmag-*.whl)[serve,export,train]" "click>=8" "lazy-loader>=0.4" "scikit-image>=0.22" \
    && pip install --no-cache-dir --no-deps "cucim-cu12==26.10.0" \
    && rm -rf /tmp/wheels

# ---- gpu-base: CUDA 12.6 + cuDNN 9 runtime, torch cu126, TensorRT 10, onnxruntime-gpu, cuCIM ----
# CUDA 12.6 because it is the only CUDA 12 build of torch 2.13 (cu126). The system CUDA and
# cuDNN libraries of this base serve onnxruntime-gpu; torch and TensorRT bring their own.
# nvidia-ml-py (GPU metrics on /metrics) comes with the wheel, in both targets.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS gpu-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Ubuntu's archive replaces package versions with security fixes, so exact pins would break rebuilds;
# the base image's tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY --from=builder /wheels /tmp/wheels
# The wheel with its [serve,export,train] extras: the service, and the training face and export stage that
# build the demo repository at first start (its head trained on synthetic slides).
# torch==2.13.0+cu126 from PyTorch's index (PyPI's torch 2.13 is a CUDA 13 build).
# TensorRT 10.7 is the release in nvcr.io/nvidia/tritonserver:24.12-py3 (deploy/k8s/triton-pool):
# an engine runs only under the TensorRT that built it, so plans exported in this image load there.
# onnxruntime-gpu 1.26.0 is the last on PyPI built for CUDA 12 (1.27 on need CUDA 13). It replaces
# the wheel's onnxruntime (CPU): both install the same `onnxruntime` module.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cu126 \
        "torch==2.13.0+cu126" "$(echo /tmp/wheels/xmag-*.whl)[serve,export,train]" "tensorrt-cu12==10.7.0" "cucim-cu12==26.10.0" \
    && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir --no-deps "onnxruntime-gpu==1.26.0" \
    && rm -rf /tmp/wheels

# ---- runtime (the image): the service on the base of FLAVOUR, as a non-root user ----
FROM ${FLAVOUR}-base AS runtime
ENV XMAG_HOST=0.0.0.0 \
    XMAG_SLIDE_ROOTS=/slides
RUN useradd --uid 10001 --user-group --create-home xmag \
    && mkdir -p /slides /models /srv/xmag \
    && chown xmag:xmag /models /srv/xmag \
    && ln -s /models /srv/xmag/model_repo
WORKDIR /srv/xmag
USER 10001:10001
EXPOSE 8000 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('XMAG_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["xmag"]
CMD ["serve"]
