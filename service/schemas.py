"""The REST API's schema: pydantic models for requests, responses and errors (OpenAPI comes from these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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


class SlideFacts(_Schema):
    width_px: int
    height_px: int
    mpp: float = Field(description="Microns per level-0 pixel used for tiling.")
    base_magnification: float
    objective_power: float | None
    vendor: str
    reader_backend: str
    read_level: int = Field(description="Pyramid level the tiles were read from.")
    tile_count: int
    tile_size_px: int = Field(description="Tile side in pixels as the encoder sees it.")
    target_mpp: float = Field(description="Microns per pixel of the tiles (2.0 = 5x).")
    tissue_area_mm2: float


class ModelInfo(_Schema):
    name: str
    version: int
    kind: Literal["trained", "untrained-demo", "checkpoint"] = Field(
        description="'untrained-demo': random weights; the predictions are meaningless."
    )
    manifest_sha256: str | None = Field(description="sha256 of the model repository's manifest.json.")
    weights_sha256: str | None = Field(description="sha256 of the checkpoint the repository was exported from.")
    encoder: str = Field(description="The runtime that encodes tiles, e.g. 'onnxruntime int8 (CPUExecutionProvider)'.")
    notice: str = Field(description="Non-empty when the weights are untrained demo weights.")


class TaskPrediction(_Schema):
    label: str
    probabilities: dict[str, float] = Field(description="Probability of every class, by class name.")


class Attention(_Schema):
    tile_size_level0_px: int = Field(description="Tile side in level-0 pixels.")
    level0_coords: list[tuple[int, int]] = Field(description="Top-left (x, y) of each tile in level-0 pixels.")
    weights: dict[str, list[float]] = Field(description="Per task, one weight per tile (summing to 1), in tile order.")


class HeatmapLinks(_Schema):
    png_url: str = Field(description="Attention overlaid on the slide thumbnail (GET, image/png).")
    geojson_url: str = Field(description="Tiles with their attention as QuPath detections (GET, application/geo+json).")


class StageTimings(_Schema):
    queue: float
    open: float
    tissue: float
    read: float = Field(description="Time the encoder waited for tiles (reading not hidden behind encoding).")
    encode: float = Field(description="Time in encoder batches, shared with other slides' tiles.")
    heads: float
    total: float


class ClassifyResponse(_Schema):
    result_id: str
    slide: SlideFacts
    model: ModelInfo
    predictions: dict[str, TaskPrediction]
    attention: Attention | None = None
    heatmaps: dict[str, HeatmapLinks] | None = None
    timings_s: StageTimings


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
