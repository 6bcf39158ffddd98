# Single-box image. For now it runs the in-process demo (`xmag classify`); the
# service, CUDA base image, TensorRT and health check arrive with issues 4 and 7.
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/xmag
COPY pyproject.toml README.md ./
COPY xmag ./xmag
COPY export ./export
RUN pip install . \
    && useradd --create-home --uid 10001 xmag \
    && mkdir /out && chown xmag /out

USER xmag
VOLUME ["/out"]
ENTRYPOINT ["xmag"]
CMD ["classify", "--out", "/out"]
