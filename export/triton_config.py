"""Render the `config.pbtxt` of each model XMAG puts in a Triton model repository.

Triton reads a model's configuration as the protobuf text format of its
`inference.ModelConfig` message. We render that text from small typed specs
instead of building protobuf messages, so exporting needs no generated code. The
tests parse every kind rendered here against `proto/triton/model_config.proto`,
which has Triton's field names and numbers, so a wrong name fails there.

Three kinds of model, all with the tensor names defined below:

- ONNX encoder (and its int8 twin on the CPU): uint8 NHWC tiles in, one
  embedding per tile out; Triton's dynamic batcher merges requests.
- TensorRT FP16 encoder: the same interface, one engine file per GPU compute
  capability, picked by Triton through `cc_model_filenames`.
- ABMIL head, one per task: a whole slide's features in, class probabilities and
  per-tile attention out; never batched, since one slide is one request.

Build a spec with `onnx_encoder_config`, `tensorrt_encoder_config` or
`abmil_head_config`, then turn it into text with `render_model_config`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from xmag.contract import (
    EMBEDDING_OUTPUT,
    TILE_SIZE_PX,
    TILES_INPUT,
    TRITON_EMBEDDING_CONFIG_TYPE,
    TRITON_TILES_CONFIG_TYPE,
)

# The encoder's interface is xmag.contract, shared by every backend.
STUDENT_EMBED_DIM = 768

# The slide head's interface.
FEATURES_INPUT = "features"
PROBABILITIES_OUTPUT = "probabilities"
ATTENTION_OUTPUT = "attention"

ONNX_PLATFORM = "onnxruntime_onnx"
TENSORRT_PLATFORM = "tensorrt_plan"
# We render only what `xmag export` produces; any other platform is a typo.
SUPPORTED_PLATFORMS = (ONNX_PLATFORM, TENSORRT_PLATFORM)

INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU")

# Triton's DataType enum names, less TYPE_INVALID.
DATA_TYPES = frozenset(
    {
        "TYPE_BOOL",
        "TYPE_UINT8",
        "TYPE_UINT16",
        "TYPE_UINT32",
        "TYPE_UINT64",
        "TYPE_INT8",
        "TYPE_INT16",
        "TYPE_INT32",
        "TYPE_INT64",
        "TYPE_FP16",
        "TYPE_FP32",
        "TYPE_FP64",
        "TYPE_STRING",
        "TYPE_BF16",
    }
)

# A dimension Triton accepts in any size.
VARIABLE_DIM = -1

DEFAULT_MAX_BATCH_SIZE = 256
# Long enough for a few concurrent requests to arrive and fill a batch, short next
# to the tens of milliseconds a GPU takes to encode a full batch of 256 tiles.
DEFAULT_MAX_QUEUE_DELAY_MICROSECONDS = 2_000

# Names are written between quotes without escaping, and a model's name is also
# its directory in the repository, so we allow only characters that need neither
# escaping nor care in a path.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
# Triton keys cc_model_filenames by the GPU's compute capability, "major.minor".
_COMPUTE_CAPABILITY_KEY = re.compile(r"[0-9]+\.[0-9]+")

_GENERATED_HEADER = "# Written by `xmag export` (export/triton_config.py). Re-export rather than edit by hand."


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model as Triton sees it.

    `data_type` is a Triton DataType name such as "TYPE_FP32". `dims` leave out
    the batch dimension when the model's max_batch_size is above 0; each is
    positive, or -1 for a dimension of any size.
    """

    name: str
    data_type: str
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_safe_name(self.name, "tensor name")
        if self.data_type not in DATA_TYPES:
            raise ValueError(
                f"tensor {self.name!r}: unknown data type {self.data_type!r}; "
                f"use one of Triton's: {', '.join(sorted(DATA_TYPES))}"
            )
        # Accept any sequence (a list from a caller) but store a tuple, so the spec stays frozen.
        object.__setattr__(self, "dims", tuple(self.dims))
        if not self.dims:
            raise ValueError(f"tensor {self.name!r}: dims must name at least one dimension")
        for dim in self.dims:
            if not _is_int(dim) or (dim < 1 and dim != VARIABLE_DIM):
                raise ValueError(
                    f"tensor {self.name!r}: every dim must be a positive integer or "
                    f"{VARIABLE_DIM} (any size), got {list(self.dims)}"
                )


@dataclass(frozen=True)
class DynamicBatching:
    """Triton's dynamic batcher: merge requests up to a preferred size, waiting at most a delay.

    With no preferred sizes Triton sends the largest batch it can form.
    """

    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_microseconds: int

    def __post_init__(self) -> None:
        sizes = tuple(self.preferred_batch_sizes)
        if any(not _is_int(size) or size < 1 for size in sizes):
            raise ValueError(f"preferred batch sizes must be positive integers, got {list(sizes)}")
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"preferred batch sizes must not repeat, got {list(sizes)}")
        # Sorted, so equal configurations render identically.
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(sizes)))
        if not _is_int(self.max_queue_delay_microseconds) or self.max_queue_delay_microseconds < 0:
            raise ValueError(
                f"max_queue_delay_microseconds must be an integer >= 0, got {self.max_queue_delay_microseconds!r}"
            )


@dataclass(frozen=True)
class ModelConfigSpec:
    """Everything `render_model_config` writes into one config.pbtxt.

    `max_batch_size` 0 means Triton does not batch: dims are then the full shapes.
    `cc_model_filenames` maps a compute capability ("9.0") to the model file
    Triton loads on such a GPU.
    """

    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    instance_kind: str = "KIND_GPU"
    instance_count: int = 1
    dynamic_batching: DynamicBatching | None = None
    cc_model_filenames: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_safe_name(self.name, "model name")
        if self.platform not in SUPPORTED_PLATFORMS:
            raise ValueError(
                f"model {self.name!r}: platform {self.platform!r} is not one we export; "
                f"use one of {', '.join(SUPPORTED_PLATFORMS)}"
            )
        if not _is_int(self.max_batch_size) or self.max_batch_size < 0:
            raise ValueError(
                f"model {self.name!r}: max_batch_size must be an integer >= 0 "
                f"(0 = no batching), got {self.max_batch_size!r}"
            )
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        _check_tensors(self.name, "input", self.inputs)
        _check_tensors(self.name, "output", self.outputs)
        self._check_instances()
        self._check_dynamic_batching()
        object.__setattr__(self, "cc_model_filenames", dict(self.cc_model_filenames))
        for capability, filename in self.cc_model_filenames.items():
            if not isinstance(capability, str) or not _COMPUTE_CAPABILITY_KEY.fullmatch(capability):
                raise ValueError(
                    f"model {self.name!r}: cc_model_filenames keys are compute capabilities "
                    f"written 'major.minor' such as '9.0', got {capability!r}"
                )
            _check_safe_name(filename, "model file name")

    def _check_instances(self) -> None:
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(
                f"model {self.name!r}: instance kind must be one of {', '.join(INSTANCE_KINDS)}, "
                f"got {self.instance_kind!r}"
            )
        if self.platform == TENSORRT_PLATFORM and self.instance_kind != "KIND_GPU":
            raise ValueError(
                f"model {self.name!r}: a TensorRT engine runs only on a GPU, so its "
                f"instance kind must be KIND_GPU, got {self.instance_kind}"
            )
        if not _is_int(self.instance_count) or self.instance_count < 1:
            raise ValueError(
                f"model {self.name!r}: instance count must be a positive integer, got {self.instance_count!r}"
            )

    def _check_dynamic_batching(self) -> None:
        if self.dynamic_batching is None:
            return
        if self.max_batch_size == 0:
            raise ValueError(
                f"model {self.name!r}: dynamic batching needs max_batch_size > 0; "
                "a model with max_batch_size 0 is never batched"
            )
        too_large = [size for size in self.dynamic_batching.preferred_batch_sizes if size > self.max_batch_size]
        if too_large:
            raise ValueError(
                f"model {self.name!r}: preferred batch sizes {too_large} exceed max_batch_size {self.max_batch_size}"
            )


def onnx_encoder_config(
    name: str,
    *,
    embed_dim: int = STUDENT_EMBED_DIM,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_microseconds: int = DEFAULT_MAX_QUEUE_DELAY_MICROSECONDS,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
) -> ModelConfigSpec:
    """Spec of an ONNX tile encoder run by onnxruntime.

    That is `<encoder>` on KIND_GPU, or its int8 twin `<encoder>_int8` on KIND_CPU.
    Without `preferred_batch_sizes` Triton aims for full batches of
    `max_batch_size` tiles, the size at which the encoder is cheapest per tile.
    """
    return ModelConfigSpec(
        name=name,
        platform=ONNX_PLATFORM,
        max_batch_size=max_batch_size,
        inputs=(_tiles_input(),),
        outputs=(_embedding_output(embed_dim),),
        instance_kind=instance_kind,
        instance_count=instance_count,
        dynamic_batching=_encoder_batching(max_batch_size, preferred_batch_sizes, max_queue_delay_microseconds),
    )


def tensorrt_encoder_config(
    name: str,
    *,
    cc_model_filenames: Mapping[str, str],
    max_batch_size: int,
    embed_dim: int = STUDENT_EMBED_DIM,
    preferred_batch_sizes: Sequence[int] | None = None,
    max_queue_delay_microseconds: int = DEFAULT_MAX_QUEUE_DELAY_MICROSECONDS,
    instance_count: int = 1,
) -> ModelConfigSpec:
    """Spec of the TensorRT FP16 tile encoder (`<encoder>_trt`).

    `cc_model_filenames` maps each compute capability ("9.0") to the engine built
    for it; `max_batch_size` must be the engines' optimisation-profile maximum,
    since Triton may send batches that large.
    """
    if not cc_model_filenames:
        raise ValueError(f"model {name!r}: a TensorRT encoder needs at least one engine in cc_model_filenames")
    return ModelConfigSpec(
        name=name,
        platform=TENSORRT_PLATFORM,
        max_batch_size=max_batch_size,
        inputs=(_tiles_input(),),
        outputs=(_embedding_output(embed_dim),),
        instance_kind="KIND_GPU",
        instance_count=instance_count,
        dynamic_batching=_encoder_batching(max_batch_size, preferred_batch_sizes, max_queue_delay_microseconds),
        cc_model_filenames=cc_model_filenames,
    )


def abmil_head_config(
    name: str,
    *,
    embed_dim: int,
    num_classes: int,
    instance_kind: str = "KIND_CPU",
    instance_count: int = 1,
) -> ModelConfigSpec:
    """Spec of one task's ABMIL head (`<encoder>_head_<task>`): one slide per request.

    The head runs on the CPU by default: it costs a few MFLOP per slide, and the
    encoder is the only stage that needs the GPU (DESIGN.md).
    """
    if not _is_int(embed_dim) or embed_dim < 1:
        raise ValueError(f"model {name!r}: embed_dim must be a positive integer, got {embed_dim!r}")
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"model {name!r}: num_classes must be a positive integer, got {num_classes!r}")
    return ModelConfigSpec(
        name=name,
        platform=ONNX_PLATFORM,
        max_batch_size=0,
        inputs=(TensorSpec(FEATURES_INPUT, "TYPE_FP32", (VARIABLE_DIM, embed_dim)),),
        outputs=(
            TensorSpec(PROBABILITIES_OUTPUT, "TYPE_FP32", (num_classes,)),
            TensorSpec(ATTENTION_OUTPUT, "TYPE_FP32", (VARIABLE_DIM,)),
        ),
        instance_kind=instance_kind,
        instance_count=instance_count,
    )


def render_model_config(spec: ModelConfigSpec) -> str:
    """The config.pbtxt text for `spec`, in protobuf text format, ending with a newline."""
    lines = [
        _GENERATED_HEADER,
        f'name: "{spec.name}"',
        f'platform: "{spec.platform}"',
        f"max_batch_size: {spec.max_batch_size}",
    ]
    lines += _render_tensors("input", spec.inputs)
    lines += _render_tensors("output", spec.outputs)
    lines += [
        "instance_group [",
        "  {",
        f"    count: {spec.instance_count}",
        f"    kind: {spec.instance_kind}",
        "  }",
        "]",
    ]
    batching = spec.dynamic_batching
    if batching is not None:
        lines.append("dynamic_batching {")
        if batching.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: {_render_list(batching.preferred_batch_sizes)}")
        lines.append(f"  max_queue_delay_microseconds: {batching.max_queue_delay_microseconds}")
        lines.append("}")
    if spec.cc_model_filenames:
        lines.append("cc_model_filenames [")
        entries = [
            f'  {{\n    key: "{capability}"\n    value: "{filename}"\n  }}'
            for capability, filename in sorted(spec.cc_model_filenames.items())
        ]
        lines.append(",\n".join(entries))
        lines.append("]")
    return "\n".join(lines) + "\n"


def _tiles_input() -> TensorSpec:
    return TensorSpec(TILES_INPUT, TRITON_TILES_CONFIG_TYPE, (TILE_SIZE_PX, TILE_SIZE_PX, 3))


def _embedding_output(embed_dim: int) -> TensorSpec:
    return TensorSpec(EMBEDDING_OUTPUT, TRITON_EMBEDDING_CONFIG_TYPE, (embed_dim,))


def _encoder_batching(
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int] | None,
    max_queue_delay_microseconds: int,
) -> DynamicBatching:
    if preferred_batch_sizes is None:
        preferred_batch_sizes = (max_batch_size,)
    return DynamicBatching(tuple(preferred_batch_sizes), max_queue_delay_microseconds)


def _render_tensors(field_name: str, tensors: tuple[TensorSpec, ...]) -> list[str]:
    entries = [
        "  {\n"
        f'    name: "{tensor.name}"\n'
        f"    data_type: {tensor.data_type}\n"
        f"    dims: {_render_list(tensor.dims)}\n"
        "  }"
        for tensor in tensors
    ]
    return [f"{field_name} [", ",\n".join(entries), "]"]


def _render_list(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(value) for value in values) + " ]"


def _check_tensors(model_name: str, kind: str, tensors: tuple[TensorSpec, ...]) -> None:
    if not tensors:
        raise ValueError(f"model {model_name!r}: needs at least one {kind}")
    for tensor in tensors:
        if not isinstance(tensor, TensorSpec):
            raise ValueError(f"model {model_name!r}: each {kind} must be a TensorSpec, got {tensor!r}")
    names = [tensor.name for tensor in tensors]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"model {model_name!r}: {kind} names must be unique, repeated: {repeated}")


def _check_safe_name(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if not _SAFE_NAME.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} may contain only letters, digits, '_', '-' and '.', and may not start with '.' or '-'"
        )


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as a batch size or dim is a bug, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)
