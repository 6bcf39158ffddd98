from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("slide_path", "tasks", "return_attention", "mpp", "timeout_s")
    SLIDE_PATH_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    RETURN_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    slide_path: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    return_attention: bool
    mpp: float
    timeout_s: float
    def __init__(self, slide_path: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., return_attention: _Optional[bool] = ..., mpp: _Optional[float] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class SlideFacts(_message.Message):
    __slots__ = ("width_px", "height_px", "mpp", "base_magnification", "objective_power", "vendor", "reader_backend", "read_level", "tile_count", "tile_size_px", "target_mpp", "tissue_area_mm2")
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    MPP_FIELD_NUMBER: _ClassVar[int]
    BASE_MAGNIFICATION_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_POWER_FIELD_NUMBER: _ClassVar[int]
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    READER_BACKEND_FIELD_NUMBER: _ClassVar[int]
    READ_LEVEL_FIELD_NUMBER: _ClassVar[int]
    TILE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_PX_FIELD_NUMBER: _ClassVar[int]
    TARGET_MPP_FIELD_NUMBER: _ClassVar[int]
    TISSUE_AREA_MM2_FIELD_NUMBER: _ClassVar[int]
    width_px: int
    height_px: int
    mpp: float
    base_magnification: float
    objective_power: float
    vendor: str
    reader_backend: str
    read_level: int
    tile_count: int
    tile_size_px: int
    target_mpp: float
    tissue_area_mm2: float
    def __init__(self, width_px: _Optional[int] = ..., height_px: _Optional[int] = ..., mpp: _Optional[float] = ..., base_magnification: _Optional[float] = ..., objective_power: _Optional[float] = ..., vendor: _Optional[str] = ..., reader_backend: _Optional[str] = ..., read_level: _Optional[int] = ..., tile_count: _Optional[int] = ..., tile_size_px: _Optional[int] = ..., target_mpp: _Optional[float] = ..., tissue_area_mm2: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "kind", "manifest_sha256", "weights_sha256", "encoder", "notice", "encoder_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    kind: str
    manifest_sha256: str
    weights_sha256: str
    encoder: str
    notice: str
    encoder_sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., kind: _Optional[str] = ..., manifest_sha256: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., encoder: _Optional[str] = ..., notice: _Optional[str] = ..., encoder_sha256: _Optional[str] = ...) -> None: ...

class TaskPrediction(_message.Message):
    __slots__ = ("label", "probabilities", "attention")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    label: str
    probabilities: _containers.ScalarMap[str, float]
    attention: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, label: _Optional[str] = ..., probabilities: _Optional[_Mapping[str, float]] = ..., attention: _Optional[_Iterable[float]] = ...) -> None: ...

class TileGrid(_message.Message):
    __slots__ = ("tile_size_level0_px", "level0_xy")
    TILE_SIZE_LEVEL0_PX_FIELD_NUMBER: _ClassVar[int]
    LEVEL0_XY_FIELD_NUMBER: _ClassVar[int]
    tile_size_level0_px: int
    level0_xy: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tile_size_level0_px: _Optional[int] = ..., level0_xy: _Optional[_Iterable[int]] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("queue", "open", "tissue", "read", "encode", "heads", "total")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    TISSUE_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    ENCODE_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    queue: float
    open: float
    tissue: float
    read: float
    encode: float
    heads: float
    total: float
    def __init__(self, queue: _Optional[float] = ..., open: _Optional[float] = ..., tissue: _Optional[float] = ..., read: _Optional[float] = ..., encode: _Optional[float] = ..., heads: _Optional[float] = ..., total: _Optional[float] = ...) -> None: ...

class ClassifyResult(_message.Message):
    __slots__ = ("result_id", "slide", "model", "predictions", "tiles", "timings_s")
    class PredictionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TaskPrediction
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TaskPrediction, _Mapping]] = ...) -> None: ...
    RESULT_ID_FIELD_NUMBER: _ClassVar[int]
    SLIDE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_S_FIELD_NUMBER: _ClassVar[int]
    result_id: str
    slide: SlideFacts
    model: ModelInfo
    predictions: _containers.MessageMap[str, TaskPrediction]
    tiles: TileGrid
    timings_s: StageTimings
    def __init__(self, result_id: _Optional[str] = ..., slide: _Optional[_Union[SlideFacts, _Mapping]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., predictions: _Optional[_Mapping[str, TaskPrediction]] = ..., tiles: _Optional[_Union[TileGrid, _Mapping]] = ..., timings_s: _Optional[_Union[StageTimings, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "tiles_done", "tiles_total")
    class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STAGE_UNSPECIFIED: _ClassVar[Progress.Stage]
        OPENED: _ClassVar[Progress.Stage]
        TILES_PLANNED: _ClassVar[Progress.Stage]
        TILES_ENCODED: _ClassVar[Progress.Stage]
        HEADS_DONE: _ClassVar[Progress.Stage]
    STAGE_UNSPECIFIED: Progress.Stage
    OPENED: Progress.Stage
    TILES_PLANNED: Progress.Stage
    TILES_ENCODED: Progress.Stage
    HEADS_DONE: Progress.Stage
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TILES_DONE_FIELD_NUMBER: _ClassVar[int]
    TILES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    stage: Progress.Stage
    tiles_done: int
    tiles_total: int
    def __init__(self, stage: _Optional[_Union[Progress.Stage, str]] = ..., tiles_done: _Optional[int] = ..., tiles_total: _Optional[int] = ...) -> None: ...

class ClassifyEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: ClassifyResult
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[ClassifyResult, _Mapping]] = ...) -> None: ...

class ClassifyManyRequest(_message.Message):
    __slots__ = ("correlation_id", "request")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    request: ClassifyRequest
    def __init__(self, correlation_id: _Optional[str] = ..., request: _Optional[_Union[ClassifyRequest, _Mapping]] = ...) -> None: ...

class SlideError(_message.Message):
    __slots__ = ("grpc_code", "grpc_status", "code", "message")
    GRPC_CODE_FIELD_NUMBER: _ClassVar[int]
    GRPC_STATUS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    grpc_code: int
    grpc_status: str
    code: str
    message: str
    def __init__(self, grpc_code: _Optional[int] = ..., grpc_status: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ClassifyManyResponse(_message.Message):
    __slots__ = ("correlation_id", "result", "error")
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    correlation_id: str
    result: ClassifyResult
    error: SlideError
    def __init__(self, correlation_id: _Optional[str] = ..., result: _Optional[_Union[ClassifyResult, _Mapping]] = ..., error: _Optional[_Union[SlideError, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("name", "class_names")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("model", "tasks", "tile_size_px", "target_mpp")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_PX_FIELD_NUMBER: _ClassVar[int]
    TARGET_MPP_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    tasks: _containers.RepeatedCompositeFieldContainer[TaskInfo]
    tile_size_px: int
    target_mpp: float
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., tasks: _Optional[_Iterable[_Union[TaskInfo, _Mapping]]] = ..., tile_size_px: _Optional[int] = ..., target_mpp: _Optional[float] = ...) -> None: ...
