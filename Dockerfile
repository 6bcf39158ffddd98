# Single-box CPU image of the service (REST :8000, gRPC :50051) on the demo model (built at first start).
# The CUDA base image with TensorRT, onnxruntime-gpu and cuCIM arrives with issue 7.
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    XMAG_HOST=0.0.0.0 \
    XMAG_PORT=8000 \
    XMAG_SLIDE_ROOTS=/slides

WORKDIR /opt/xmag
COPY pyproject.toml README.md ./
COPY xmag ./xmag
COPY export ./export
COPY service ./service
RUN pip install . \
    && useradd --create-home --uid 10001 xmag \
    && mkdir -p /slides /srv/xmag && chown xmag /srv/xmag

USER xmag
# The demo model repository is built here (model_repo/demo) on the first start.
WORKDIR /srv/xmag
EXPOSE 8000 50051
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["xmag"]
CMD ["serve"]
