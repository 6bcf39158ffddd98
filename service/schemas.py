"""The REST API's schema: pydantic models for requests, responses and errors (OpenAPI comes from these).

The slide result itself is `xmag.result_schema.ClassifyResult`, shared with gRPC and the result files.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from xmag.result_schema import ClassifyResult, ModelInfo

# The answer of POST /v1/classify is the one slide result schema of the core, also written as result files.
ClassifyResponse = ClassifyResult


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ClassifyRequest(_Schema):
    slide_path: str = Field(
        min_length=1,
        max_length=4096,
        description="Path of the slide as the server sees it; must lie inside an allowed slide root. "
        "A relative path is taken relative to the first root.",
        examples=["/slides/case-0001.svs"],
    )
    tasks: list[str] | None = Field(
        None, min_length=1, max_length=64, description="Tasks to run (see GET /v1/models); default: every task."
    )
    return_attention: bool = Field(False, description="Include tile coordinates and attention weights.")
    heatmap: bool = Field(
        False, description="Keep the result so its heatmap PNG and GeoJSON can be fetched from the returned URLs."
    )
    mpp: float | None = Field(
        None,
        gt=0.01,
        le=100,
        description="Microns per pixel to assume when the slide states neither MPP nor objective power.",
    )
    timeout_s: float | None = Field(
        None, gt=0, le=86_400, description="Give up after this many seconds (capped by the server's own limit)."
    )


class ErrorDetail(_Schema):
    code: str = Field(description="Stable machine-readable kind, e.g. slide_not_found, corrupt_slide, queue_full.")
    message: str


class ErrorResponse(_Schema):
    error: ErrorDetail


class TaskInfo(_Schema):
    name: str
    class_names: list[str]


class BackendMeasurement(_Schema):
    description: str
    backend: str
    precision: str
    tiles_per_s: float | None
    min_cosine_vs_torch_fp32: float | None
    chosen: bool
    note: str = ""


class ModelsResponse(_Schema):
    model: ModelInfo
    tasks: list[TaskInfo]
    tile_size_px: int
    target_mpp: float
    backend_measurements: list[BackendMeasurement] = Field(
        description="What the encoder backends measured at start-up (empty when one was chosen explicitly)."
    )


class HealthResponse(_Schema):
    status: Literal["ok", "ready", "not ready"]
    detail: str = ""
