"""The service's settings: flags of `xmag serve`, or environment variables `XMAG_<NAME>`.

Flags win over the environment, the environment over the defaults. With no
settings at all the service serves the demo model repository on loopback and
reads slides only from the demo slide directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from xmag.demo import DEMO_WORKDIR
from xmag.vocabulary import EncoderBackend, EncoderPrecision, ReaderBackend

DEMO_SLIDE_ROOT = DEMO_WORKDIR


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="XMAG_", extra="forbid", frozen=True)

    model_repo: Path | None = Field(
        None,
        description="Verified model repository; default: the demo repository, which `xmag serve` builds once "
        "(its head trained on synthetic slides).",
    )
    # Comma-separated in the environment: XMAG_SLIDE_ROOTS=/slides,/archive
    slide_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [DEMO_SLIDE_ROOT],
        description="Directories slides may be read from; a relative slide_path is taken relative to the first.",
    )
    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 for every interface (then set api_keys).")
    port: int = Field(8000, ge=0, le=65535, description="REST port (0: any free port).")
    grpc: bool = Field(True, description="Serve the gRPC API beside REST.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port).")
    grpc_max_receive_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest gRPC request message.")
    grpc_max_send_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest gRPC response (attention of ~20,000 tiles is ~0.5 MB)."
    )

    reader_backend: ReaderBackend = Field(
        "openslide", description="Slide reader: openslide, or cucim (faster per core); checked at start."
    )
    encoder_backend: EncoderBackend = Field(
        "auto", description="auto (the fastest correct one, measured at start), torch, onnxruntime, tensorrt or triton."
    )
    precision: EncoderPrecision = Field(
        "auto", description="auto, fp32, bf16, fp16 or int8 (narrows the backends measured)."
    )
    # Where encoder_backend "triton" sends tiles: many replicas can share a pool of Triton GPUs.
    triton_url: str | None = Field(None, description="host:port of a Triton Inference Server's gRPC endpoint.")
    triton_model: str | None = Field(
        None, description="The encoder's model name in Triton; default: the repository's fp32 ONNX encoder."
    )
    triton_timeout_s: float = Field(30.0, gt=0, le=3600, description="Longest Triton may take to answer one batch.")
    triton_ready_timeout_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="How long Triton may take at start to be live with the model loaded (it may start beside us).",
    )

    max_batch_size: int = Field(64, ge=1, le=4096, description="Most tiles per encoder batch, across slides.")
    read_batch_size: int = Field(16, ge=1, le=4096, description="Tiles a slide reads and hands in at a time.")
    max_batch_wait_ms: float = Field(5.0, ge=0, le=10_000, description="How long a partial batch waits for more tiles.")
    reader_threads: int = Field(2, ge=1, le=64, description="Decoding threads per slide.")
    max_concurrent_slides: int = Field(4, ge=1, le=256, description="Slides read and encoded at the same time.")
    max_queued_slides: int = Field(32, ge=0, le=10_000, description="Slides waiting beyond those; more get 429.")
    max_tiles_per_slide: int = Field(20_000, ge=1, description="Larger slides get 413.")
    request_timeout_s: float = Field(600.0, gt=0, description="Longest a slide may take, queueing included.")
    embedding_cache_dir: Path | None = Field(
        None, description="Keep each classified slide's tile embeddings here, so a repeat request runs only the heads."
    )
    embedding_cache_max_bytes: int = Field(
        10 * 1024**3, ge=0, description="Largest the embedding cache may grow; least recently used entries go first."
    )
    result_cache_size: int = Field(32, ge=0, le=10_000, description="Recent results whose heatmaps can be fetched.")

    # Comma-separated in the environment: XMAG_API_KEYS=key1,key2. Empty: no authentication.
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="Keys a caller must send as 'Authorization: Bearer <key>', at least 16 characters each.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info, warning or error."
    )

    @field_validator("slide_roots", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_are_long_enough(cls, keys: list[str]) -> list[str]:
        short = [key for key in keys if len(key) < 16]
        if short:
            raise ValueError(f"{len(short)} API key(s) are shorter than 16 characters; use long random keys")
        return keys

    @field_validator("triton_url")
    @classmethod
    def _triton_url_is_host_port(cls, url: str | None) -> str | None:
        if url is not None and ("://" in url or ":" not in url):
            raise ValueError(f"triton_url must be host:port of Triton's gRPC endpoint (e.g. triton:8001), got {url!r}")
        return url

    @model_validator(mode="after")
    def _triton_has_a_url(self) -> ServiceSettings:
        if self.encoder_backend == "triton" and not self.triton_url:
            raise ValueError("encoder_backend 'triton' needs triton_url (host:port of Triton's gRPC endpoint)")
        return self

    @model_validator(mode="after")
    def _chunks_fit_batches(self) -> ServiceSettings:
        if self.read_batch_size > self.max_batch_size:
            raise ValueError(
                f"read_batch_size ({self.read_batch_size}) must not exceed max_batch_size ({self.max_batch_size}): "
                "a slide's chunk of tiles is never split across encoder batches"
            )
        return self
