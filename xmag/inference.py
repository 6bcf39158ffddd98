"""Encoder and head runtimes behind one interface each, and the choice of encoder backend by measuring.

The pipeline and the service only see `TileEncoderRuntime.encode(uint8 NHWC)
-> float32 (B, D)` and `SlideHeadsRuntime.predict(features) -> {task:
TaskOutput}`. An encoder runs on one of four backends:

- torch (`TorchTileEncoder`): fp32 or bf16 autocast on the CPU; fp32, fp16
  or bf16 autocast on a CUDA GPU; from the repository's torch weights;
- onnxruntime (`OnnxTileEncoder`): the fp32 ONNX graph on the CPU or on
  onnxruntime's TensorRT/CUDA providers, or the int8 graph on the CPU;
- TensorRT (`TensorRTTileEncoder`): the FP16 `.plan` the export stage builds,
  on the GPU and TensorRT release it was built for;
- Triton (`TritonTileEncoder`): the exported repository served by an NVIDIA
  Triton Inference Server, called over gRPC, so that many service replicas
  can share a pool of GPUs. Only by explicit choice.

How `select_encoder_runtime` chooses, by default: it builds every candidate
this machine can run (with a CUDA GPU: the TensorRT plan if it matches the GPU
and TensorRT, torch fp32/fp16/bf16 on the GPU, onnxruntime fp32 on the GPU
providers, onnxruntime int8 on the CPU; without one: torch fp32 and bf16,
onnxruntime fp32 and, if the export marked it usable, int8, all on the CPU).
Each encodes the same probe, `probe_batch_size` seeded random uint8 tiles:
one untimed warm-up run, whose embeddings are compared with torch fp32 on the
CPU (the reference; the lowest cosine over the tiles counts), then one timed
run, or two when one is too short to time well. A candidate whose cosine is
below MIN_BACKEND_COSINE is rejected however fast it is; among the rest the
highest tiles/s wins (ties go to the earlier in the order above: TensorRT,
torch, onnxruntime). A loser is freed as soon as it loses, so besides the
torch weights (loaded once per device, shared by the torch candidates) at
most two candidates are held at once. Every candidate, including those that
cannot run here and why, is reported in `EncoderSelection.measurements`. An
explicit backend and/or precision narrows the candidates to those and raises
`EncoderBackendUnavailableError` when none can run here or none is correct.

The `triton` backend is never measured against the others: the model the
server names is the only candidate. It still encodes the probe, so a Triton
serving another model (or running this one wrongly) is refused at start by
the same cosine bound, and its tiles/s (over the network) is reported.

A repository exported before it held torch weights has no torch candidates;
its fp32 ONNX graph, which the export verified against torch fp32 (cosine
>= 0.9999), is then the reference. onnxruntime's TensorRT provider, where
installed, builds its engine during the warm-up, which lengthens start-up;
the export stage's plan does not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np
import torch

from xmag.errors import RetryLaterError, XmagError
from xmag.model_repo import (
    Artifact,
    Hardware,
    ModelRepository,
    detect_hardware,
    onnxruntime_gpu_providers,
    plan_runs_on,
)
from xmag.models.abmil import SlideHeads
from xmag.models.checkpoints import load_encoder_checkpoint
from xmag.models.encoder import TileEncoder
from xmag.tensorrt_runtime import (
    TensorRTBatchSizeError,
    TensorRTEngineError,
    TensorRTUnavailableError,
    import_tensorrt,
    load_engine,
    require_cuda_gpu,
    torch_dtype_of,
)

TorchPrecision = Literal["fp32", "bf16", "fp16"]
EncoderBackend = Literal["auto", "torch", "onnxruntime", "tensorrt", "triton"]
EncoderPrecision = Literal["auto", "fp32", "bf16", "fp16", "int8"]

# Every backend must give embeddings at least this close (lowest cosine over the
# probe's tiles) to torch fp32 to be chosen: the bound the export sets for int8.
MIN_BACKEND_COSINE = 0.999

# A timed probe run shorter than this is run a second time and the faster run
# counts: short runs are the ones that timer resolution and noise distort most.
_SHORT_RUN_S = 0.5

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class EncoderBackendUnavailableError(XmagError):
    """The encoder backend or precision asked for cannot run here, or none that can gives correct embeddings."""


class EncoderRemoteError(RetryLaterError):
    """A remote encoder (a Triton Inference Server) failed, timed out or went away during a call.

    The slide fails, not the service: the server may come back, so callers are
    told to retry after `retry_after_s`.
    """

    code = "encoder_unavailable"


@dataclass(frozen=True)
class TaskOutput:
    label: str
    probabilities: dict[str, float]
    attention: np.ndarray  # (N,) float32, sums to 1


class TileEncoderRuntime(Protocol):
    description: str  # e.g. "torch bf16 on cpu", "onnxruntime int8 (CPUExecutionProvider)", "tensorrt fp16 on cuda"
    backend: str  # "torch", "onnxruntime", "tensorrt" or "triton"
    precision: str  # "fp32", "bf16", "fp16" or "int8"
    tile_size_px: int
    embed_dim: int

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 RGB -> (B, D) float32 class-token embeddings."""


class SlideHeadsRuntime(Protocol):
    class_names: dict[str, list[str]]

    def predict(self, features: np.ndarray) -> dict[str, TaskOutput]:
        """One slide's (N, D) tile features -> the result of every task."""


def _task_output(class_names: list[str], probabilities: np.ndarray, attention: np.ndarray) -> TaskOutput:
    return TaskOutput(
        label=class_names[int(np.argmax(probabilities))],
        probabilities={name: float(p) for name, p in zip(class_names, probabilities, strict=False)},
        attention=np.asarray(attention, dtype=np.float32),
    )


def _check_tiles(tiles: np.ndarray, tile_size_px: int) -> None:
    """ValueError unless `tiles` is a (B, S, S, 3) uint8 array: GPU buffers are filled byte for byte."""
    expected = f"uint8 RGB tiles of shape (B, {tile_size_px}, {tile_size_px}, 3) (NHWC)"
    if tiles.dtype != np.uint8:
        raise ValueError(f"expected {expected}, got dtype {tiles.dtype}")
    if tiles.ndim != 4 or tiles.shape[1:] != (tile_size_px, tile_size_px, 3):
        raise ValueError(f"expected {expected}, got shape {tiles.shape}")


class _PinnedStaging:
    """Copies uint8 tiles to the GPU through one reusable page-locked (pinned) host buffer.

    From pinned memory the host-to-device copy runs asynchronously (non_blocking)
    on the current stream, and reusing one buffer saves pinning memory for every
    batch, which costs more than the copy. The buffer grows to the largest batch
    seen. The caller must wait for the stream (both GPU runtimes do, when they
    copy their result back) before the next call overwrites the buffer.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def to_device(self, tiles: np.ndarray, device: torch.device | str) -> torch.Tensor:
        if self._buffer is None or len(self._buffer) < len(tiles) or self._buffer.shape[1:] != tiles.shape[1:]:
            self._buffer = torch.empty(tiles.shape, dtype=torch.uint8, pin_memory=True)
        staged = self._buffer[: len(tiles)]
        staged.numpy()[...] = tiles
        return staged.to(device, non_blocking=True)


class TorchTileEncoder:
    """A TileEncoder run by torch: fp32, or under bf16 or fp16 autocast, on the CPU or a CUDA GPU.

    The encoder is moved to `device` once, here (in place, as `nn.Module.to`
    does). On CUDA the tiles travel as uint8 through pinned memory and are
    normalised on the GPU. fp16 is refused on the CPU, which has no fast fp16
    kernels; use bf16 there.
    """

    backend = "torch"

    def __init__(self, encoder: TileEncoder, precision: TorchPrecision = "fp32", device: str | torch.device = "cpu"):
        device = torch.device(device)
        if precision not in get_args(TorchPrecision):
            raise ValueError(f"precision must be one of {get_args(TorchPrecision)}, got {precision!r}")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("fp16 runs on CUDA GPUs only: CPUs have no fast fp16 kernels; on the CPU use bf16 or fp32")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise EncoderBackendUnavailableError(
                f"torch {torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda or 'none, a CPU-only build'})"
            )
        self.encoder = encoder.eval().to(device)
        self.precision = precision
        self.device = device
        self.tile_size_px = encoder.tile_size_px
        self.embed_dim = encoder.embed_dim
        self.description = f"torch {precision} on {device.type}"
        self._staging = _PinnedStaging() if device.type == "cuda" else None

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        if self._staging is None:
            batch = torch.from_numpy(tiles)
        else:
            _check_tiles(tiles, self.tile_size_px)
            batch = self._staging.to_device(tiles, self.device)
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])
            if self.precision in _AUTOCAST_DTYPES
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            embeddings = self.encoder(batch)
        return embeddings.float().cpu().numpy()


class TorchSlideHeads:
    """SlideHeads run by torch."""

    def __init__(self, heads: SlideHeads):
        self.heads = heads.eval()
        self.class_names = heads.class_names

    def predict(self, features: np.ndarray) -> dict[str, TaskOutput]:
        with torch.inference_mode():
            outputs = self.heads(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        return {
            task: _task_output(self.class_names[task], torch.softmax(logits, -1).numpy(), attention.numpy())
            for task, (logits, attention) in outputs.items()
        }


def _onnx_session(path: Path, providers: tuple[str, ...]):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=list(providers))


class OnnxTileEncoder:
    """An exported encoder (uint8 NHWC in, embedding out) run by onnxruntime on the given providers."""

    backend = "onnxruntime"

    def __init__(
        self,
        onnx_path: Path,
        tile_size_px: int,
        embed_dim: int,
        providers=("CPUExecutionProvider",),
        precision: str = "fp32",
    ):
        self.session = _onnx_session(onnx_path, tuple(providers))
        self.input_name = self.session.get_inputs()[0].name
        self.precision = precision
        self.tile_size_px = tile_size_px
        self.embed_dim = embed_dim
        # The providers the session really uses: onnxruntime drops the ones it cannot start.
        self.description = f"onnxruntime {precision} ({', '.join(self.session.get_providers())})"

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(tiles)})[0]


class TensorRTTileEncoder:
    """A serialised TensorRT 10 engine of the encoder (the export stage's `.plan`), on its own CUDA stream.

    The engine is deserialised once and run through one execution context, so
    an instance serves one thread at a time (the service's encoder stage is one
    thread). Any batch size within the engine's optimisation profile is
    accepted (`min_batch_size` to `max_batch_size`); others raise
    TensorRTBatchSizeError. Torch CUDA tensors are the engine's buffers, and
    tiles travel as uint8 through pinned memory. Without TensorRT or a CUDA GPU
    the constructor raises TensorRTUnavailableError.
    """

    backend = "tensorrt"
    precision = "fp16"  # the export stage builds FP16 engines (normalisation and softmax kept in FP32)

    def __init__(
        self,
        plan_path: str | Path,
        tile_size_px: int,
        embed_dim: int,
        *,
        input_name: str = "tiles",
        output_name: str = "embedding",
    ):
        trt = import_tensorrt()
        require_cuda_gpu()
        engine = load_engine(trt, Path(plan_path))
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        inputs = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        if inputs != [input_name] or output_name not in names:
            raise TensorRTEngineError(
                f"{plan_path} is not a tile encoder engine: it has inputs {inputs} and tensors {names}, "
                f"expected the one input {input_name!r} and the output {output_name!r}"
            )
        if engine.get_tensor_dtype(input_name) != trt.uint8:
            raise TensorRTEngineError(f"{plan_path} takes {engine.get_tensor_dtype(input_name)} tiles, not uint8")
        min_shape, _, max_shape = (tuple(shape) for shape in engine.get_tensor_profile_shape(input_name, 0))
        output_width = tuple(engine.get_tensor_shape(output_name))[-1]
        if max_shape[1:] != (tile_size_px, tile_size_px, 3) or output_width != embed_dim:
            raise TensorRTEngineError(
                f"{plan_path} encodes tiles of shape {max_shape[1:]} into {output_width} values; "
                f"this model's are ({tile_size_px}, {tile_size_px}, 3) into {embed_dim}"
            )
        self.min_batch_size, self.max_batch_size = int(min_shape[0]), int(max_shape[0])
        self.tile_size_px = tile_size_px
        self.embed_dim = embed_dim
        self.description = "tensorrt fp16 on cuda"
        self._engine = engine
        self._context = engine.create_execution_context()
        self._input_name, self._output_name = input_name, output_name
        self._output_dtypes = {
            name: torch_dtype_of(trt, engine.get_tensor_dtype(name)) for name in names if name != input_name
        }
        # Our own stream: TensorRT warns that the default stream costs extra synchronisation.
        self._stream = torch.cuda.Stream()
        self._staging = _PinnedStaging()

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        _check_tiles(tiles, self.tile_size_px)
        if not self.min_batch_size <= len(tiles) <= self.max_batch_size:
            raise TensorRTBatchSizeError(
                f"a batch of {len(tiles)} tiles is outside the TensorRT engine's optimisation profile "
                f"({self.min_batch_size} to {self.max_batch_size} tiles): send smaller batches, or rebuild the "
                "engine with a larger --trt-max-batch"
            )
        # Everything below is queued on our stream; allocations made under it belong to it.
        with torch.cuda.stream(self._stream):
            device_tiles = self._staging.to_device(tiles, "cuda")
            if not self._context.set_input_shape(self._input_name, tuple(device_tiles.shape)):
                raise TensorRTEngineError(f"the engine rejects input shape {tuple(device_tiles.shape)}")
            self._context.set_tensor_address(self._input_name, device_tiles.data_ptr())
            outputs = {}
            for name, dtype in self._output_dtypes.items():
                outputs[name] = torch.empty(tuple(self._context.get_tensor_shape(name)), dtype=dtype, device="cuda")
                self._context.set_tensor_address(name, outputs[name].data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise TensorRTEngineError("TensorRT failed to run the engine; its log above says why")
            # A blocking copy on our stream: it waits for the engine, and for the input copy before it.
            embeddings = outputs[self._output_name].float().cpu()
        return embeddings.numpy()


# Triton's names of the data types of the exported encoder's tensors (export/triton_config.py writes
# TYPE_UINT8 tiles in, TYPE_FP32 embeddings out; model metadata names them without the TYPE_ prefix).
TRITON_TILES_DATATYPE = "UINT8"
TRITON_EMBEDDING_DATATYPE = "FP32"

# gRPC channel options of the Triton client. No message size limit: a batch of 256 tiles is 38 MB (tritonclient's
# own default too, which these replace). A short reconnect backoff: gRPC's grows to 120 s while a server is down,
# and every slide fails at once until the channel reconnects, so a restarted Triton is tried again within 2 s.
_TRITON_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

# How often the readiness wait asks Triton again, and the longest it waits for one answer.
_TRITON_POLL_S = 0.25
_TRITON_PROBE_TIMEOUT_S = 2.0


class TritonTileEncoder:
    """The exported encoder served by an NVIDIA Triton Inference Server, called over gRPC.

    At construction it waits up to `ready_timeout_s` (default: `timeout_s`) for
    the server at `url` ("host:port" of Triton's gRPC endpoint) to be live and
    `model_name` to be ready, then checks the model's tensors are those `xmag export` writes
    (uint8 NHWC tiles in, float32 embeddings out, batched); it raises
    EncoderBackendUnavailableError naming the url and the model otherwise.
    `encode` splits batches larger than the model's max_batch_size into
    requests Triton accepts; a request that fails or takes longer than
    `timeout_s` raises EncoderRemoteError. An instance serves one thread at a
    time (the service's encoder stage is one thread); `close` ends its channel.
    """

    backend = "triton"

    def __init__(
        self,
        url: str,
        model_name: str,
        tile_size_px: int,
        embed_dim: int,
        *,
        precision: str = "fp32",
        input_name: str = "tiles",
        output_name: str = "embedding",
        timeout_s: float = 30.0,
        ready_timeout_s: float | None = None,
    ):
        from tritonclient.grpc import InferenceServerClient

        self.url = url
        self.model_name = model_name
        self.precision = precision
        self.tile_size_px = tile_size_px
        self.embed_dim = embed_dim
        self.input_name = input_name
        self.output_name = output_name
        self.timeout_s = timeout_s
        self.description = f"triton {precision} ({model_name} at {url})"
        self._client = InferenceServerClient(url, channel_args=_TRITON_CHANNEL_ARGS)
        try:
            self._wait_until_ready(timeout_s if ready_timeout_s is None else ready_timeout_s)
            # Not named max_batch_size: the engine would cap its batches at that, and here they are split instead.
            self.triton_max_batch_size = self._check_model_interface()
        except BaseException:
            self._client.close()
            raise

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 RGB -> (B, D) float32, in requests of at most the model's max_batch_size, one after another."""
        _check_tiles(tiles, self.tile_size_px)
        step = self.triton_max_batch_size
        parts = [self._infer(tiles[start : start + step]) for start in range(0, len(tiles), step)]
        if not parts:
            return np.empty((0, self.embed_dim), np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        """Close the gRPC channel; later calls fail."""
        self._client.close()

    def _infer(self, tiles: np.ndarray) -> np.ndarray:
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.utils import InferenceServerException

        request = InferInput(self.input_name, list(tiles.shape), TRITON_TILES_DATATYPE)
        request.set_data_from_numpy(np.ascontiguousarray(tiles))
        try:
            result = self._client.infer(
                self.model_name,
                [request],
                outputs=[InferRequestedOutput(self.output_name)],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as error:
            raise EncoderRemoteError(
                f"Triton at {self.url} did not encode {len(tiles)} tiles with model {self.model_name!r} "
                f"(limit {self.timeout_s:g} s): {error}"
            ) from error
        embeddings = result.as_numpy(self.output_name)
        if embeddings is None or embeddings.shape != (len(tiles), self.embed_dim):
            shape = None if embeddings is None else embeddings.shape
            raise EncoderRemoteError(
                f"Triton at {self.url} answered {len(tiles)} tiles with {self.output_name!r} of shape {shape} "
                f"from model {self.model_name!r}, expected {(len(tiles), self.embed_dim)}"
            )
        return embeddings

    def _wait_until_ready(self, ready_timeout_s: float) -> None:
        """Return once the server is live and the model ready; EncoderBackendUnavailableError at the deadline."""
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + ready_timeout_s
        live, last_error = False, ""
        while True:
            wait_s = max(0.01, min(_TRITON_PROBE_TIMEOUT_S, deadline - time.monotonic()))
            try:
                live = self._client.is_server_live(client_timeout=wait_s)
                if live and self._client.is_model_ready(self.model_name, client_timeout=wait_s):
                    return
            except InferenceServerException as error:
                last_error = str(error)
            if time.monotonic() + _TRITON_POLL_S > deadline:
                break
            time.sleep(_TRITON_POLL_S)
        if not live:
            raise EncoderBackendUnavailableError(
                f"no Triton Inference Server answered at {self.url} within {ready_timeout_s:g} s"
                f"{f' ({last_error})' if last_error else ''}; triton_url must be host:port of Triton's gRPC "
                f"endpoint (8001 by default), and the server must be up"
            )
        raise EncoderBackendUnavailableError(
            f"Triton at {self.url} is live, but model {self.model_name!r} was not ready within "
            f"{ready_timeout_s:g} s: {self._model_state()}"
        )

    def _model_state(self) -> str:
        """What Triton's repository index says of the model, for an error message."""
        from tritonclient.utils import InferenceServerException

        try:
            index = self._client.get_model_repository_index(client_timeout=_TRITON_PROBE_TIMEOUT_S).models
        except InferenceServerException as error:
            return f"its model index could not be read ({error})"
        states = [
            f"{model.state or 'not loaded'}{f' ({model.reason})' if model.reason else ''}"
            for model in index
            if model.name == self.model_name
        ]
        if not states:
            return f"the server has no such model; it has {sorted({model.name for model in index})}"
        return "; ".join(states)

    def _check_model_interface(self) -> int:
        """The model's max_batch_size, once its tensors are those the export writes; EncoderBackendUnavailableError if not."""
        from tritonclient.utils import InferenceServerException

        try:
            metadata = self._client.get_model_metadata(self.model_name, client_timeout=self.timeout_s)
            config = self._client.get_model_config(self.model_name, client_timeout=self.timeout_s).config
        except InferenceServerException as error:
            raise EncoderBackendUnavailableError(
                f"Triton at {self.url} did not describe model {self.model_name!r}: {error}"
            ) from error
        # With batching on, Triton reports the batch dimension as -1 in front of the configured dims.
        expected = (
            [(self.input_name, TRITON_TILES_DATATYPE, [-1, self.tile_size_px, self.tile_size_px, 3])],
            [(self.output_name, TRITON_EMBEDDING_DATATYPE, [-1, self.embed_dim])],
        )
        found = (
            [(tensor.name, tensor.datatype, list(tensor.shape)) for tensor in metadata.inputs],
            [(tensor.name, tensor.datatype, list(tensor.shape)) for tensor in metadata.outputs],
        )
        if found != expected or config.max_batch_size < 1:
            raise EncoderBackendUnavailableError(
                f"model {self.model_name!r} at Triton {self.url} is not this repository's tile encoder: it takes "
                f"{_describe_tensors(found[0])} and gives {_describe_tensors(found[1])} with max_batch_size "
                f"{config.max_batch_size}; `xmag export` writes {_describe_tensors(expected[0])} in, "
                f"{_describe_tensors(expected[1])} out, batched (max_batch_size >= 1)"
            )
        return config.max_batch_size


def _describe_tensors(tensors: list[tuple[str, str, list[int]]]) -> str:
    return ", ".join(f"{name!r} {datatype} {shape}" for name, datatype, shape in tensors) or "nothing"


class OnnxSlideHeads:
    """One exported head per task (features in, probabilities and attention out) run by onnxruntime."""

    def __init__(
        self, head_paths: dict[str, Path], class_names: dict[str, list[str]], providers=("CPUExecutionProvider",)
    ):
        self.sessions = {task: _onnx_session(path, tuple(providers)) for task, path in head_paths.items()}
        self.class_names = class_names

    def predict(self, features: np.ndarray) -> dict[str, TaskOutput]:
        features = np.ascontiguousarray(features, dtype=np.float32)
        results = {}
        for task, session in self.sessions.items():
            probabilities, attention = session.run(["probabilities", "attention"], {"features": features})
            results[task] = _task_output(self.class_names[task], probabilities, attention)
        return results


@dataclass(frozen=True)
class BackendMeasurement:
    """What start-up measured of one encoder candidate, or why it was not measured."""

    description: str
    backend: str
    precision: str
    tiles_per_s: float | None  # None when not measured (cannot run here, or failed)
    min_cosine_vs_torch_fp32: float | None
    chosen: bool
    note: str = ""  # why rejected or not run, e.g. "cosine 0.997 < 0.999" or an error message


@dataclass
class EncoderSelection:
    runtime: TileEncoderRuntime
    measurements: list[BackendMeasurement]


@dataclass(frozen=True)
class TritonEndpoint:
    """Where the `triton` backend finds the encoder: a Triton server's gRPC endpoint and the model's name there."""

    url: str  # "host:port"
    model_name: str | None = None  # None: the repository's fp32 ONNX encoder, by its name in the manifest
    timeout_s: float = 30.0  # for each inference call
    ready_timeout_s: float = 120.0  # for the server to be live with the model ready, at start


@dataclass(frozen=True)
class _Candidate:
    """One way to run the encoder here, or why it cannot run: then `build` is None and `unavailable` says why."""

    backend: str
    precision: str
    device: str  # "cpu" or "cuda"; for triton, the server's "host:port"
    build: Callable[[], TileEncoderRuntime] | None
    unavailable: str = ""

    @property
    def description(self) -> str:
        return f"{self.backend} {self.precision} on {self.device}"


class _RuntimeFactory:
    """Builds encoder runtimes from one repository; its torch weights are read once per device and shared."""

    def __init__(self, repository: ModelRepository):
        self.repository = repository
        self.spec = repository.manifest.encoder
        self.torch_weights = next(
            (a for a in repository.manifest.artifacts if a.role == "encoder" and a.runtime == "torch"), None
        )
        self._torch_encoders: dict[str, TileEncoder] = {}

    def torch(self, precision: TorchPrecision, device: str) -> TorchTileEncoder:
        # Autocast leaves the weights as they are, so every precision on one device shares one module.
        if device not in self._torch_encoders:
            vit = load_encoder_checkpoint(self.repository.path_of(self.torch_weights, ".safetensors"))
            self._torch_encoders[device] = TileEncoder(vit)
        return TorchTileEncoder(self._torch_encoders[device], precision, device)

    def onnx(self, artifact: Artifact, providers: tuple[str, ...]) -> OnnxTileEncoder:
        return OnnxTileEncoder(
            self.repository.path_of(artifact, ".onnx"),
            self.spec.tile_size_px,
            self.spec.embed_dim,
            providers,
            artifact.precision,
        )

    def tensorrt(self, plan: Artifact) -> TensorRTTileEncoder:
        return TensorRTTileEncoder(
            self.repository.path_of(plan, ".plan"),
            self.spec.tile_size_px,
            self.spec.embed_dim,
            input_name=self.spec.input_name,
            output_name=self.spec.output_name,
        )

    def triton(self, endpoint: TritonEndpoint, model_name: str, precision: str) -> TritonTileEncoder:
        return TritonTileEncoder(
            endpoint.url,
            model_name,
            self.spec.tile_size_px,
            self.spec.embed_dim,
            precision=precision,
            input_name=self.spec.input_name,
            output_name=self.spec.output_name,
            timeout_s=endpoint.timeout_s,
            ready_timeout_s=endpoint.ready_timeout_s,
        )


def _tensorrt_plan(encoders: list[Artifact], hardware: Hardware) -> tuple[Artifact | None, str]:
    """The repository's TensorRT plan that runs here, or None and why none does."""
    plans = [a for a in encoders if a.runtime == "tensorrt" and a.usable]
    if not plans:
        return None, "the repository has no usable TensorRT plan (export it with --tensorrt on a GPU of this kind)"
    if hardware.cuda_compute_capability is None:
        return None, "TensorRT plans need a CUDA GPU, and torch sees none"
    try:
        import_tensorrt()
    except TensorRTUnavailableError as error:
        return None, str(error)
    plan = next((a for a in plans if plan_runs_on(a, hardware)), None)
    if plan is None:
        built_for = ", ".join(
            f"compute capability {a.compute_capability} with TensorRT {a.tensorrt_version}" for a in plans
        )
        return None, (
            f"the repository's plans were built for {built_for}; this machine has compute capability "
            f"{hardware.cuda_compute_capability} with TensorRT {hardware.tensorrt_version}"
        )
    return plan, ""


def _int8_unavailable(artifact: Artifact | None, bound: float) -> str:
    if artifact is None:
        return "the repository has no int8 encoder (export it with --int8)"
    if not artifact.usable:
        return (
            f"{artifact.name} was marked unusable at export: its lowest cosine to torch fp32, "
            f"{artifact.parity.min_cosine:.4f}, is below {bound}"
        )
    return ""


def _encoder_candidates(factory: _RuntimeFactory, hardware: Hardware) -> list[_Candidate]:
    """Every (backend, precision) the encoder is offered in, on the device it would use on `hardware`,
    each with its builder or the reason it cannot run here."""
    repository = factory.repository
    encoders = [a for a in repository.manifest.artifacts if a.role == "encoder"]

    def artifact(runtime: str, precision: str) -> Artifact | None:
        return next((a for a in encoders if a.runtime == runtime and a.precision == precision), None)

    gpu = hardware.cuda_compute_capability is not None
    no_torch_weights = (
        "" if factory.torch_weights else f"{repository.root} holds no torch weights (it predates them); export it again"
    )

    def candidate(backend: str, precision: str, device: str, unavailable: str, build: Callable[[], TileEncoderRuntime]):
        return _Candidate(backend, precision, device, None if unavailable else build, unavailable)

    def torch_candidate(precision: TorchPrecision, unavailable: str = "") -> _Candidate:
        device = "cuda" if gpu or precision == "fp16" else "cpu"
        return candidate(
            "torch", precision, device, unavailable or no_torch_weights, lambda: factory.torch(precision, device)
        )

    plan, plan_unavailable = _tensorrt_plan(encoders, hardware)
    no_onnxruntime = "" if hardware.onnxruntime_providers else "onnxruntime is not installed"
    onnx_fp32, onnx_int8 = artifact("onnxruntime", "fp32"), artifact("onnxruntime", "int8")
    gpu_providers = onnxruntime_gpu_providers(hardware)
    fp32_providers = (*gpu_providers, "CPUExecutionProvider")
    # GPUs before Ampere (compute capability 8.0) have no bf16 arithmetic.
    no_bf16 = gpu and int(hardware.cuda_compute_capability.split(".")[0]) < 8
    return [
        candidate("tensorrt", "fp16", "cuda", plan_unavailable, lambda: factory.tensorrt(plan)),
        torch_candidate("fp16", "" if gpu else "fp16 needs a CUDA GPU, and torch sees none; on the CPU use bf16"),
        torch_candidate(
            "bf16", f"this GPU (compute capability {hardware.cuda_compute_capability}) has no bf16" if no_bf16 else ""
        ),
        torch_candidate("fp32"),
        candidate(
            "onnxruntime",
            "fp32",
            "cuda" if gpu_providers else "cpu",
            no_onnxruntime or ("" if onnx_fp32 else "the repository has no fp32 ONNX encoder"),
            lambda: factory.onnx(onnx_fp32, fp32_providers),
        ),
        candidate(
            "onnxruntime",
            "int8",
            "cpu",
            no_onnxruntime or _int8_unavailable(onnx_int8, repository.manifest.int8_min_cosine),
            lambda: factory.onnx(onnx_int8, ("CPUExecutionProvider",)),
        ),
    ]


def _triton_candidate(factory: _RuntimeFactory, endpoint: TritonEndpoint) -> _Candidate:
    """The encoder as Triton serves it. Its precision is the manifest's for an artifact of that name, else unknown."""
    artifacts = factory.repository.manifest.artifacts
    model_name = endpoint.model_name or next(
        (a.name for a in artifacts if a.role == "encoder" and a.runtime == "onnxruntime" and a.precision == "fp32"),
        None,
    )
    if model_name is None:
        return _Candidate(
            "triton",
            "fp32",
            endpoint.url,
            None,
            "the repository has no fp32 ONNX encoder to name the Triton model after; set triton_model",
        )
    artifact = next((a for a in artifacts if a.name == model_name and a.role == "encoder"), None)
    precision = artifact.precision if artifact is not None else "unknown"
    return _Candidate("triton", precision, endpoint.url, lambda: factory.triton(endpoint, model_name, precision))


def _min_cosine(embeddings: np.ndarray, reference: np.ndarray) -> float:
    """The lowest per-tile cosine of two (B, D) arrays; NaN if either holds a non-finite value."""
    if embeddings.shape != reference.shape:
        raise ValueError(f"the runtime returned embeddings of shape {embeddings.shape}, expected {reference.shape}")
    embeddings, reference = embeddings.astype(np.float64), reference.astype(np.float64)
    # The floor keeps an all-zero row from dividing by zero; its cosine is then 0.
    norms = np.maximum(np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1), 1e-30)
    return float(np.min(np.sum(embeddings * reference, axis=1) / norms))


def _measure(runtime: TileEncoderRuntime, probe: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(tiles per second, lowest cosine to the reference) of one runtime on the probe tiles."""
    # The untimed warm-up: first calls pay for kernel selection and allocation, which is not throughput.
    cosine = _min_cosine(np.asarray(runtime.encode(probe)), reference)
    seconds = _time_one_run(runtime, probe)
    if seconds < _SHORT_RUN_S:
        seconds = min(seconds, _time_one_run(runtime, probe))
    return len(probe) / seconds, cosine


def _time_one_run(runtime: TileEncoderRuntime, probe: np.ndarray) -> float:
    start = time.perf_counter()
    runtime.encode(probe)  # returns host memory, so a GPU runtime has finished when it returns
    return time.perf_counter() - start


def _reference_runtime(factory: _RuntimeFactory) -> TileEncoderRuntime:
    """torch fp32 on the CPU, the reference every candidate is compared with.

    A repository exported before it held torch weights has none; its fp32 ONNX
    graph stands in, which the export verified against torch fp32 (cosine >= 0.9999).
    """
    if factory.torch_weights is not None:
        return factory.torch("fp32", "cpu")
    onnx_fp32 = next(
        (
            a
            for a in factory.repository.manifest.artifacts
            if a.role == "encoder" and a.runtime == "onnxruntime" and a.precision == "fp32"
        ),
        None,
    )
    if onnx_fp32 is None:
        raise EncoderBackendUnavailableError(
            f"{factory.repository.root} has neither torch weights nor an fp32 ONNX encoder"
        )
    return factory.onnx(onnx_fp32, ("CPUExecutionProvider",))


def select_encoder_runtime(
    repository: ModelRepository,
    backend: EncoderBackend = "auto",
    precision: EncoderPrecision = "auto",
    *,
    probe_batch_size: int = 4,
    seed: int = 0,
    triton: TritonEndpoint | None = None,
) -> EncoderSelection:
    """The fastest correct encoder runtime for this machine, and what was measured to choose it.

    "auto" (the default) for `backend` and `precision` considers every
    candidate; a named backend and/or precision only those. How candidates
    are measured and chosen is in the module docstring. Raises
    EncoderBackendUnavailableError, naming each candidate's reason, when no
    candidate asked for can run here or none gives embeddings within
    MIN_BACKEND_COSINE of torch fp32. Backend "triton" needs `triton` (where
    the server is); its own errors (unreachable, not ready, another
    interface) are raised as they are.
    """
    if backend not in get_args(EncoderBackend):
        raise ValueError(f"backend must be one of {get_args(EncoderBackend)}, got {backend!r}")
    if precision not in get_args(EncoderPrecision):
        raise ValueError(f"precision must be one of {get_args(EncoderPrecision)}, got {precision!r}")
    if probe_batch_size < 1:
        raise ValueError(f"probe_batch_size must be at least 1, got {probe_batch_size}")
    if backend == "triton" and triton is None:
        raise ValueError("the triton backend needs a TritonEndpoint: the url of Triton's gRPC endpoint")
    factory = _RuntimeFactory(repository)
    offered = (
        [_triton_candidate(factory, triton)] if backend == "triton" else _encoder_candidates(factory, detect_hardware())
    )
    candidates = [c for c in offered if backend in ("auto", c.backend) and precision in ("auto", c.precision)]
    asked = " ".join(word for word in (backend, precision) if word != "auto")  # "" when both are auto
    if not candidates:
        offers = ", ".join(f"{c.backend} {c.precision}" for c in offered)
        raise EncoderBackendUnavailableError(f"no encoder backend runs {asked}; the ones offered are {offers}")
    if not any(c.build for c in candidates):
        raise EncoderBackendUnavailableError(
            f"no {asked + ' ' if asked else ''}encoder can run here: "
            + "; ".join(f"{c.description}: {c.unavailable}" for c in candidates)
        )

    spec = repository.manifest.encoder
    probe = np.random.default_rng(seed).integers(
        0, 256, (probe_batch_size, spec.tile_size_px, spec.tile_size_px, 3), np.uint8
    )
    reference = np.asarray(_reference_runtime(factory).encode(probe))

    measurements: list[BackendMeasurement] = []
    best: TileEncoderRuntime | None = None
    best_index, best_tiles_per_s = -1, 0.0
    for candidate in candidates:
        if candidate.build is None:
            measurements.append(
                BackendMeasurement(
                    candidate.description,
                    candidate.backend,
                    candidate.precision,
                    None,
                    None,
                    False,
                    candidate.unavailable,
                )
            )
            continue
        try:
            runtime = candidate.build()
            tiles_per_s, cosine = _measure(runtime, probe, reference)
        except Exception as error:  # a backend that fails on this machine must not stop the others
            if candidate.backend == "triton":
                raise  # the only candidate; its error names the server and the model, and says what is wrong
            measurements.append(
                BackendMeasurement(
                    candidate.description,
                    candidate.backend,
                    candidate.precision,
                    None,
                    None,
                    False,
                    f"failed: {type(error).__name__}: {error}",
                )
            )
            continue
        # Written so that a NaN cosine (non-finite embeddings) is rejected too.
        correct = cosine >= MIN_BACKEND_COSINE
        note = "" if correct else f"cosine {cosine:.4f} < {MIN_BACKEND_COSINE}"
        if not correct and candidate.backend == "triton":
            note += ": the server's model is not this repository's encoder, or does not run it correctly"
        measurements.append(
            BackendMeasurement(
                runtime.description, candidate.backend, candidate.precision, tiles_per_s, cosine, False, note
            )
        )
        if correct and tiles_per_s > best_tiles_per_s:
            best, best_index, best_tiles_per_s = runtime, len(measurements) - 1, tiles_per_s
        del runtime  # a loser is freed now, not when the loop ends

    if best is None:
        raise EncoderBackendUnavailableError(
            f"no {asked + ' ' if asked else ''}encoder gives correct embeddings here "
            f"(cosine to torch fp32 >= {MIN_BACKEND_COSINE}): "
            + "; ".join(f"{m.description}: {m.note}" for m in measurements)
        )
    measurements[best_index] = dataclasses.replace(measurements[best_index], chosen=True)
    return EncoderSelection(best, measurements)


def heads_from_repository(repository: ModelRepository) -> OnnxSlideHeads:
    """The ONNX heads of every task of a verified repository, run by onnxruntime on the CPU (they are small)."""
    manifest = repository.manifest
    return OnnxSlideHeads(
        {task.name: repository.path_of(manifest.artifact(task.head_artifact), ".onnx") for task in manifest.tasks},
        {task.name: task.class_names for task in manifest.tasks},
    )


def runtimes_from_repository(
    repository: ModelRepository, backend: EncoderBackend = "auto", precision: EncoderPrecision = "auto"
) -> tuple[TileEncoderRuntime, SlideHeadsRuntime]:
    """The encoder chosen by `select_encoder_runtime` and the heads of every task, from a verified repository."""
    return select_encoder_runtime(repository, backend, precision).runtime, heads_from_repository(repository)
