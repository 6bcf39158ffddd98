"""config.pbtxt rendering, checked by parsing it as Triton would.

The rendered text is parsed with protobuf's text-format parser against
proto/triton/model_config.proto (Triton's field names and numbers), compiled here
with grpc_tools, and against Triton's full schema as tritonclient ships it. The
parser rejects unknown fields and enum values, so a misspelt field in the
renderer fails these tests.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from grpc_tools import protoc
from tritonclient.grpc import model_config_pb2 as triton_model_config_pb2

from xmag.export.triton_config import (
    DynamicBatching,
    ModelConfigSpec,
    TensorSpec,
    abmil_head_config,
    onnx_encoder_config,
    render_model_config,
    tensorrt_encoder_config,
)

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto" / "triton"


@pytest.fixture(scope="module")
def model_config_pb2(tmp_path_factory):
    """Our Triton model-config subset, compiled by protoc: its message classes and top-level enum values.

    It is loaded into a pool of its own: tritonclient (the `triton` backend) puts Triton's full
    model_config.proto, with the same file and message names, into protobuf's default pool.
    """
    descriptor_set = tmp_path_factory.mktemp("triton_proto") / "model_config.desc"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--descriptor_set_out={descriptor_set}",
            str(PROTO_DIR / "model_config.proto"),
        ]
    )
    assert status == 0, "protoc could not compile proto/triton/model_config.proto"
    pool = descriptor_pool.DescriptorPool()
    for file_proto in descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file:
        pool.Add(file_proto)
    file = pool.FindFileByName("model_config.proto")
    names = {name: message_factory.GetMessageClass(message) for name, message in file.message_types_by_name.items()}
    for enum in file.enum_types_by_name.values():
        names.update({value.name: value.number for value in enum.values})
    return SimpleNamespace(**names)


def parse(pb2, spec: ModelConfigSpec):
    text = render_model_config(spec)
    # Triton's full schema too, as tritonclient ships it: what a real server reads.
    text_format.Parse(text, triton_model_config_pb2.ModelConfig())
    return text_format.Parse(text, pb2.ModelConfig())


def test_onnx_encoder_config_parses_as_triton_reads_it(model_config_pb2):
    pb2 = model_config_pb2
    config = parse(
        pb2,
        onnx_encoder_config("xmag_student", preferred_batch_sizes=[256, 64], max_queue_delay_microseconds=500),
    )

    assert config.name == "xmag_student"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 256
    (tiles,) = config.input
    assert (tiles.name, tiles.data_type, list(tiles.dims)) == (
        "tiles",
        pb2.TYPE_UINT8,
        [224, 224, 3],
    )
    (embedding,) = config.output
    assert (embedding.name, embedding.data_type, list(embedding.dims)) == (
        "embedding",
        pb2.TYPE_FP32,
        [768],
    )
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(config.dynamic_batching.preferred_batch_size) == [64, 256]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    (group,) = config.instance_group
    assert (group.kind, group.count) == (pb2.ModelInstanceGroup.KIND_GPU, 1)
    assert not config.cc_model_filenames


def test_int8_encoder_runs_on_the_cpu_and_batches_to_its_maximum(model_config_pb2):
    pb2 = model_config_pb2
    config = parse(pb2, onnx_encoder_config("xmag_student_int8", max_batch_size=64, instance_kind="KIND_CPU"))

    assert config.name == "xmag_student_int8"
    assert config.max_batch_size == 64
    (group,) = config.instance_group
    assert group.kind == pb2.ModelInstanceGroup.KIND_CPU
    # Without preferred sizes the batcher aims for full batches.
    assert list(config.dynamic_batching.preferred_batch_size) == [64]


def test_tensorrt_encoder_config_maps_compute_capabilities_to_engines(model_config_pb2):
    pb2 = model_config_pb2
    engines = {"9.0": "model.sm90.trt10.8.0.plan", "8.9": "model.sm89.trt10.8.0.plan"}
    config = parse(
        pb2,
        tensorrt_encoder_config("xmag_student_trt", cc_model_filenames=engines, max_batch_size=128, instance_count=2),
    )

    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 128
    assert dict(config.cc_model_filenames) == engines
    assert [tensor.name for tensor in config.input] == ["tiles"]
    assert config.input[0].data_type == pb2.TYPE_UINT8
    assert list(config.output[0].dims) == [768]
    assert list(config.dynamic_batching.preferred_batch_size) == [128]
    (group,) = config.instance_group
    assert (group.kind, group.count) == (pb2.ModelInstanceGroup.KIND_GPU, 2)


def test_abmil_head_config_takes_a_whole_slide_unbatched(model_config_pb2):
    pb2 = model_config_pb2
    config = parse(pb2, abmil_head_config("xmag_student_head_nsclc", embed_dim=768, num_classes=3))

    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 0
    assert config.WhichOneof("scheduling_choice") is None
    (features,) = config.input
    assert (features.name, features.data_type, list(features.dims)) == (
        "features",
        pb2.TYPE_FP32,
        [-1, 768],
    )
    outputs = {output.name: (output.data_type, list(output.dims)) for output in config.output}
    assert outputs == {
        "probabilities": (pb2.TYPE_FP32, [3]),
        "attention": (pb2.TYPE_FP32, [-1]),
    }
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU


@pytest.mark.parametrize(
    "text",
    [
        'name: "m"\nmax_batch_sizes: 4\n',  # misspelt field
        'name: "m"\ninstance_group [ { kind: KIND_TPU } ]\n',  # unknown enum value
        'name: "m"\nsequence_batching { }\n',  # a Triton field our subset leaves out
    ],
    ids=["unknown-field", "unknown-enum-value", "field-outside-subset"],
)
def test_parser_is_strict(model_config_pb2, text):
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text, model_config_pb2.ModelConfig())


def test_field_numbers_match_triton(model_config_pb2):
    # Text format goes by name, so only this guards the numbers (read from
    # triton-inference-server/common r26.07, protobuf/model_config.proto).
    pb2 = model_config_pb2
    expected = {
        (pb2.ModelConfig, "name"): 1,
        (pb2.ModelConfig, "platform"): 2,
        (pb2.ModelConfig, "max_batch_size"): 4,
        (pb2.ModelConfig, "input"): 5,
        (pb2.ModelConfig, "output"): 6,
        (pb2.ModelConfig, "instance_group"): 7,
        (pb2.ModelConfig, "cc_model_filenames"): 9,
        (pb2.ModelConfig, "dynamic_batching"): 11,
        (pb2.ModelConfig, "backend"): 17,
        (pb2.ModelInput, "dims"): 4,
        (pb2.ModelOutput, "dims"): 3,
        (pb2.ModelOutput, "label_filename"): 4,
        (pb2.ModelInstanceGroup, "kind"): 4,
        (pb2.ModelInstanceGroup, "count"): 2,
        (pb2.ModelDynamicBatching, "max_queue_delay_microseconds"): 2,
    }
    actual = {(message, name): message.DESCRIPTOR.fields_by_name[name].number for message, name in expected}
    assert actual == expected


def _tensor(**overrides) -> TensorSpec:
    return TensorSpec(**{"name": "x", "data_type": "TYPE_FP32", "dims": (4,), **overrides})


def _spec(**overrides) -> ModelConfigSpec:
    fields = {
        "name": "m",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 8,
        "inputs": (_tensor(),),
        "outputs": (_tensor(name="y"),),
    }
    return ModelConfigSpec(**{**fields, **overrides})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _tensor(name=""), "non-empty"),
        (lambda: _tensor(name='a"b'), "may contain only"),
        (lambda: _tensor(data_type="TYPE_FLOAT"), "unknown data type"),
        (lambda: _tensor(dims=()), "at least one dimension"),
        (lambda: _tensor(dims=(224, 0)), "positive integer or -1"),
        (lambda: _tensor(dims=(-2,)), "positive integer or -1"),
        (lambda: _tensor(dims=(True,)), "positive integer or -1"),
        (lambda: _spec(name=""), "model name must be a non-empty string"),
        (lambda: _spec(name="../escape"), "may contain only"),
        (lambda: _spec(platform="pytorch_libtorch"), "not one we export"),
        (lambda: _spec(max_batch_size=-1), "max_batch_size must be an integer >= 0"),
        (lambda: _spec(inputs=()), "at least one input"),
        (lambda: _spec(outputs=(_tensor(), _tensor())), "output names must be unique"),
        (lambda: _spec(instance_kind="KIND_TPU"), "instance kind"),
        (lambda: _spec(instance_count=0), "instance count"),
        (lambda: _spec(platform="tensorrt_plan", instance_kind="KIND_CPU"), "only on a GPU"),
        (
            lambda: _spec(max_batch_size=0, dynamic_batching=DynamicBatching((), 100)),
            "needs max_batch_size > 0",
        ),
        (lambda: _spec(cc_model_filenames={"sm90": "e.plan"}), "'major.minor'"),
        (lambda: _spec(cc_model_filenames={"9.0": "../e.plan"}), "may contain only"),
        (lambda: DynamicBatching((64, 64), 100), "must not repeat"),
        (lambda: DynamicBatching((0,), 100), "positive integers"),
        (lambda: DynamicBatching((64,), -1), "max_queue_delay_microseconds"),
        (lambda: onnx_encoder_config("m", preferred_batch_sizes=[512]), "exceed max_batch_size"),
        (
            lambda: tensorrt_encoder_config("m", cc_model_filenames={}, max_batch_size=8),
            "at least one engine",
        ),
        (lambda: abmil_head_config("h", embed_dim=768, num_classes=0), "num_classes"),
        (lambda: abmil_head_config("h", embed_dim=0, num_classes=2), "embed_dim"),
    ],
)
def test_invalid_specs_are_refused_with_a_clear_message(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_subset_agrees_with_tritons_full_schema(model_config_pb2):
    # tritonclient carries Triton's own model_config.proto (its release's): every message, field and
    # enum value of our subset must have upstream's name, number and type there.
    def compare(ours, theirs, path):
        for field in ours.fields:
            upstream = theirs.fields_by_name.get(field.name)
            assert upstream is not None, f"{path}.{field.name} is not in Triton's schema"
            assert (field.number, field.type) == (upstream.number, upstream.type), f"{path}.{field.name}"
        for enum in ours.enum_types:
            upstream_values = {value.name: value.number for value in theirs.enum_types_by_name[enum.name].values}
            assert {value.name: value.number for value in enum.values}.items() <= upstream_values.items(), path
        for nested in ours.nested_types:
            compare(nested, theirs.nested_types_by_name[nested.name], f"{path}.{nested.name}")

    messages = {name: value for name, value in vars(model_config_pb2).items() if isinstance(value, type)}
    assert {"ModelConfig", "ModelInput", "ModelOutput", "ModelInstanceGroup"} <= set(messages)
    for name, message in messages.items():
        compare(message.DESCRIPTOR, triton_model_config_pb2.DESCRIPTOR.message_types_by_name[name], name)
    upstream_types = {value.name: value.number for value in triton_model_config_pb2.DataType.DESCRIPTOR.values}
    assert model_config_pb2.TYPE_UINT8 == upstream_types["TYPE_UINT8"]
    assert model_config_pb2.TYPE_FP32 == upstream_types["TYPE_FP32"]
