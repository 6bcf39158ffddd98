"""The slide result: one pydantic schema for every place a classification is handed out.

REST answers it (`POST /v1/classify`), gRPC's `ClassifyResult` carries the same
fields, `xmag lis-client` writes gRPC answers in it as JSON, and `xmag
classify` and `xmag demo` write it as `<stem>.result.json`. A result file
therefore reads the same whichever way the slide was classified.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from xmag.pipeline import SlideResult
from xmag.slide.tiling import TilingSpec

ModelKind = Literal["trained", "untrained-demo", "checkpoint"]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


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
    kind: ModelKind = Field(description="'untrained-demo': random weights; the predictions are meaningless.")
    manifest_sha256: str | None = Field(description="sha256 of the model repository's manifest.json.")
    weights_sha256: str | None = Field(description="sha256 of the checkpoint the repository was exported from.")
    encoder_sha256: str | None = Field(
        default=None,
        description="Identity of the encoder's weights (sha256 of its tensors), as feature files and trained heads "
        "record it.",
    )
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
    png_url: str = Field(description="Attention overlaid on the slide thumbnail (image/png).")
    geojson_url: str = Field(description="Tiles with their attention as QuPath detections (application/geo+json).")


class StageTimings(_Schema):
    queue: float = Field(0.0, description="Time waiting for a place in the service; 0 in-process.")
    open: float
    tissue: float
    read: float = Field(description="Time the encoder waited for tiles (reading not hidden behind encoding).")
    encode: float = Field(description="Time in encoder batches (in the service, shared with other slides' tiles).")
    heads: float
    total: float


class ClassifyResult(_Schema):
    result_id: str
    slide: SlideFacts
    model: ModelInfo
    predictions: dict[str, TaskPrediction]
    attention: Attention | None = None
    heatmaps: dict[str, HeatmapLinks] | None = None
    timings_s: StageTimings


def classify_result(
    result: SlideResult,
    model: ModelInfo,
    spec: TilingSpec,
    *,
    result_id: str,
    timings_s: dict[str, float],
    return_attention: bool,
    heatmaps: dict[str, HeatmapLinks] | None = None,
) -> ClassifyResult:
    """The schema of one classified slide; `timings_s` without "total" gets the sum of its stages."""
    facts = result.facts
    tasks = list(result.predictions)
    attention = None
    if return_attention:
        attention = Attention(
            tile_size_level0_px=result.tile_size_level0_px,
            level0_coords=[(int(x), int(y)) for x, y in np.asarray(result.level0_coords).tolist()],
            weights={task: result.predictions[task].attention.tolist() for task in tasks},
        )
    stages = dict(timings_s)
    stages.setdefault("total", sum(stages.values()))
    return ClassifyResult(
        result_id=result_id,
        slide=SlideFacts(
            width_px=facts.width_px,
            height_px=facts.height_px,
            mpp=facts.mpp,
            base_magnification=facts.base_magnification,
            objective_power=facts.objective_power,
            vendor=facts.vendor,
            reader_backend=facts.reader_backend,
            read_level=facts.read_level,
            tile_count=facts.tile_count,
            tile_size_px=spec.tile_size_px,
            target_mpp=spec.target_mpp,
            tissue_area_mm2=facts.tissue_area_mm2,
        ),
        model=model,
        predictions={
            task: TaskPrediction(label=prediction.label, probabilities=prediction.probabilities)
            for task, prediction in result.predictions.items()
        },
        attention=attention,
        heatmaps=heatmaps,
        timings_s=StageTimings(**stages),
    )
