"""The slide result schema (`xmag.result_schema`) as protobuf messages of `xmag.v1`, and back.

The gRPC face sends `result_message(...)`; `xmag lis-client` turns each answer
back into the schema with `result_document(...)`, so its result files read like
REST's answers. proto3 has no null string: a missing sha256 travels as "".
"""

from __future__ import annotations

from xmag.result_schema import Attention, ClassifyResult, ModelInfo, SlideFacts, StageTimings, TaskPrediction
from xmag.service.grpc_api import classifier_pb2 as pb


def model_message(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(**{name: "" if value is None else value for name, value in info.model_dump().items()})


def result_message(document: ClassifyResult) -> pb.ClassifyResult:
    """A slide result as the protobuf ClassifyResult; attention travels per task, coordinates flat (x0, y0, x1, ...)."""
    message = pb.ClassifyResult(
        result_id=document.result_id,
        slide=pb.SlideFacts(**document.slide.model_dump()),
        model=model_message(document.model),
        timings_s=pb.StageTimings(**document.timings_s.model_dump()),
    )
    for task, prediction in document.predictions.items():
        entry = message.predictions[task]
        entry.label = prediction.label
        entry.probabilities.update(prediction.probabilities)
        if document.attention is not None:
            entry.attention.extend(document.attention.weights[task])
    if document.attention is not None:
        message.tiles.tile_size_level0_px = document.attention.tile_size_level0_px
        message.tiles.level0_xy.extend(value for xy in document.attention.level0_coords for value in xy)
    return message


def result_document(message: pb.ClassifyResult) -> ClassifyResult:
    """A received ClassifyResult as the slide result schema (attention only when the answer carries tiles)."""
    slide = {field: getattr(message.slide, field) for field in SlideFacts.model_fields}
    if not message.slide.HasField("objective_power"):
        slide["objective_power"] = None
    model = {field: getattr(message.model, field) for field in ModelInfo.model_fields}
    for field in ("manifest_sha256", "weights_sha256", "encoder_sha256"):
        model[field] = model[field] or None
    attention = None
    if message.HasField("tiles"):
        flat = list(message.tiles.level0_xy)
        attention = Attention(
            tile_size_level0_px=message.tiles.tile_size_level0_px,
            level0_coords=list(zip(flat[0::2], flat[1::2], strict=True)),
            weights={task: list(prediction.attention) for task, prediction in message.predictions.items()},
        )
    return ClassifyResult(
        result_id=message.result_id,
        slide=SlideFacts(**slide),
        model=ModelInfo(**model),
        predictions={
            task: TaskPrediction(label=prediction.label, probabilities=dict(prediction.probabilities))
            for task, prediction in message.predictions.items()
        },
        attention=attention,
        timings_s=StageTimings(**{field: getattr(message.timings_s, field) for field in StageTimings.model_fields}),
    )
