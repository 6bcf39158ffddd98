"""Build TensorRT FP16 engines from the exported ONNX encoder and check them against onnxruntime.

TensorRT needs an NVIDIA GPU, its CUDA runtime and the TensorRT 10 Python
package; development machines and CI have none of them. So `tensorrt` is
imported only inside the functions that use it: where it is missing they raise
`TensorRTUnavailableError`, and the ONNX artifacts stay usable without it. The
import check, engine loading and the errors are the core's
(`xmag.runtimes.tensorrt_backend`), and the parity check runs the engine with the
runtime the service uses (`xmag.runtimes.tensorrt_backend.TensorRTTileEncoder`). The
file-name helpers and `compare_embeddings` are pure and work everywhere.

Engine file names
-----------------
A serialised engine runs only on GPUs of the compute capability it was built for
and only under the TensorRT version that built it, so both are in its name:

    model.sm<major><minor>.trt<X>.<Y>.<Z>.plan     e.g. model.sm90.trt10.8.0.plan

`<major><minor>` is the compute capability with the minor digit last (9.0 ->
"sm90", 8.9 -> "sm89", 12.0 -> "sm120"; CUDA minors are single digits).
`<X>.<Y>.<Z>` is the TensorRT release; the fourth, build component of
`tensorrt.__version__` (10.8.0.43) is dropped because each public release has
one build. `engine_filename` writes such a name and `parse_engine_filename` reads
it back; Triton's `cc_model_filenames` maps "9.0" to it.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from xmag.contract import EMBEDDING_OUTPUT, TILE_SIZE_PX, TILES_INPUT
from xmag.runtimes.tensorrt_backend import (
    TensorRTEngineError,
    TensorRTTileEncoder,
    import_tensorrt,
    require_cuda_gpu,
)

logger = logging.getLogger(__name__)

_ENGINE_FILENAME = re.compile(
    r"model\.sm(?P<major>[1-9][0-9]*)(?P<minor>[0-9])"
    r"\.trt(?P<version>[0-9]+\.[0-9]+\.[0-9]+)\.plan"
)
_TENSORRT_VERSION = re.compile(r"[0-9]+(\.[0-9]+){2,3}")


def engine_filename(compute_capability: tuple[int, int], tensorrt_version: str) -> str:
    """The engine file name for a GPU compute capability and a TensorRT version.

    `engine_filename((9, 0), "10.8.0.43")` is "model.sm90.trt10.8.0.plan"; the
    version may have three or four components (the fourth is dropped).
    """
    if (
        not isinstance(compute_capability, tuple)
        or len(compute_capability) != 2
        or not all(_is_int(part) for part in compute_capability)
    ):
        raise ValueError(f"compute capability must be a (major, minor) tuple of ints, got {compute_capability!r}")
    major, minor = compute_capability
    if major < 1 or not 0 <= minor <= 9:
        raise ValueError(f"compute capability {major}.{minor} is not a CUDA one (major >= 1, minor a single digit)")
    if not isinstance(tensorrt_version, str) or not _TENSORRT_VERSION.fullmatch(tensorrt_version):
        raise ValueError(f"TensorRT version must look like 10.8.0 or 10.8.0.43, got {tensorrt_version!r}")
    # int() drops leading zeros, so the name reads back to the same version string.
    release = ".".join(str(int(part)) for part in tensorrt_version.split(".")[:3])
    return f"model.sm{major}{minor}.trt{release}.plan"


def parse_engine_filename(name: str | os.PathLike) -> tuple[tuple[int, int], str]:
    """((major, minor), "X.Y.Z") from an engine file name or path written by `engine_filename`."""
    filename = Path(name).name
    match = _ENGINE_FILENAME.fullmatch(filename)
    if match is None:
        raise ValueError(
            f"{filename!r} is not an engine file name; expected "
            "model.sm<major><minor>.trt<X.Y.Z>.plan, e.g. model.sm90.trt10.8.0.plan"
        )
    capability = (int(match["major"]), int(match["minor"]))
    return capability, match["version"]


def build_tensorrt_engine(
    onnx_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    min_batch: int = 1,
    opt_batch: int = 64,
    max_batch: int = 256,
    workspace_gib: float = 8.0,
) -> Path:
    """Build an FP16 engine of the ONNX tile encoder for this machine's GPU; return its path.

    The engine accepts `tiles` batches from `min_batch` to `max_batch` and is tuned
    for `opt_batch`. Layers that overflow or lose accuracy in FP16 (normalisation,
    softmax and the reductions, powers and exponentials they are made of) are kept
    in FP32. The file goes to `output_dir` under `engine_filename(...)`.
    """
    trt = import_tensorrt()
    compute_capability = require_cuda_gpu()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    if not (_is_int(min_batch) and _is_int(opt_batch) and _is_int(max_batch)) or not (
        1 <= min_batch <= opt_batch <= max_batch
    ):
        raise ValueError(
            "batch sizes must be integers with 1 <= min_batch <= opt_batch <= max_batch, "
            f"got {min_batch}, {opt_batch}, {max_batch}"
        )
    if not workspace_gib > 0:
        raise ValueError(f"workspace_gib must be positive, got {workspace_gib}")

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # Every TensorRT 10 network is explicit-batch; the EXPLICIT_BATCH flag that
    # TensorRT 8 needed is deprecated and ignored, so no flag is passed.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file (not parse of bytes) also finds weights stored beside the model.
    if not parser.parse_from_file(str(onnx_path)):
        problems = "\n".join(
            "  " + _describe_parser_error(parser.get_error(index)) for index in range(parser.num_errors)
        )
        raise TensorRTEngineError(f"TensorRT cannot parse {onnx_path}:\n{problems}")
    input_names = [network.get_input(index).name for index in range(network.num_inputs)]
    if input_names != [TILES_INPUT]:
        raise TensorRTEngineError(
            f"{onnx_path} must have the single input {TILES_INPUT!r} of the tile encoder, it has {input_names}"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    config.set_flag(trt.BuilderFlag.FP16)
    kept_in_fp32 = _keep_overflow_prone_layers_in_fp32(trt, network)
    # Without a constraints flag TensorRT may ignore the precisions set above and
    # run those layers in FP16 when that is faster. PREFER_PRECISION_CONSTRAINTS
    # honours them where it can and falls back with only a warning; OBEY fails the
    # build instead, so an engine that exists really runs them in FP32.
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    logger.info("layers kept in FP32: %s", dict(kept_in_fp32) or "none")

    profile = builder.create_optimization_profile()
    profile.set_shape(
        TILES_INPUT,
        min=_tiles_shape(min_batch),
        opt=_tiles_shape(opt_batch),
        max=_tiles_shape(max_batch),
    )
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTEngineError(f"TensorRT failed to build an engine from {onnx_path}; its log above says why")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    engine_path = output_dir / engine_filename(compute_capability, trt.__version__)
    # Written beside and renamed into place, so a crash never leaves a truncated
    # plan under the name Triton loads.
    partial_path = engine_path.with_name(engine_path.name + ".partial")
    partial_path.write_bytes(memoryview(serialized))
    os.replace(partial_path, engine_path)
    return engine_path


def check_engine_parity(
    plan_path: str | os.PathLike,
    onnx_path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 7),
    *,
    seed: int = 0,
) -> dict:
    """Run the engine and onnxruntime (CPU) on the same random uint8 tiles and compare.

    Returns {"max_abs_error": float, "min_cosine": float, "batch_sizes": [int]}:
    the worst cases over every tile of every batch size, in the fields of
    `xmag.model_repo.Parity`. An odd batch size (7) catches engines that are only
    right at the sizes they were tuned for.
    """
    require_tensorrt()  # a missing TensorRT is the first thing to say, before any file problem
    import onnxruntime  # Only this check needs it; imported here to keep module import light.

    plan_path, onnx_path = Path(plan_path), Path(onnx_path)
    for path in (plan_path, onnx_path):
        if not path.is_file():
            raise FileNotFoundError(f"file not found: {path}")
    if not batch_sizes or not all(_is_int(size) and size >= 1 for size in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)}")

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    embed_dim = session.get_outputs()[0].shape[-1]
    # The same runner the service uses, so the check covers the code that serves the engine.
    engine = TensorRTTileEncoder(
        plan_path, TILE_SIZE_PX, embed_dim, input_name=TILES_INPUT, output_name=EMBEDDING_OUTPUT
    )
    outside = [size for size in batch_sizes if not engine.min_batch_size <= size <= engine.max_batch_size]
    if outside:
        raise ValueError(
            f"batch sizes {outside} are outside the engine's profile "
            f"({engine.min_batch_size} to {engine.max_batch_size} tiles)"
        )

    rng = np.random.default_rng(seed)
    results = []
    for batch_size in batch_sizes:
        tiles = rng.integers(0, 256, size=_tiles_shape(batch_size), dtype=np.uint8)
        (expected,) = session.run([EMBEDDING_OUTPUT], {TILES_INPUT: tiles})
        results.append(compare_embeddings(engine.encode(tiles), expected))
    return {
        "max_abs_error": max(result["max_abs_error"] for result in results),
        "min_cosine": min(result["min_cosine"] for result in results),
        "batch_sizes": list(batch_sizes),
    }


def compare_embeddings(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """Largest absolute difference and lowest per-row cosine similarity of two (N, D) arrays."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape or actual.ndim != 2:
        raise ValueError(f"expected two (N, D) arrays of the same shape, got {actual.shape} and {expected.shape}")
    # The floor keeps an all-zero row from dividing by zero; its cosine is then 0.
    norms = np.maximum(np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1), 1e-30)
    cosines = np.sum(actual * expected, axis=1) / norms
    return {
        "max_abs_error": float(np.max(np.abs(actual - expected))),
        "min_cosine": float(np.min(cosines)),
    }


def require_tensorrt() -> None:
    """Raise TensorRTUnavailableError unless TensorRT 10 and a CUDA GPU are usable here.

    Callers check this before expensive work that ends in an engine build.
    """
    import_tensorrt()
    require_cuda_gpu()


def _tiles_shape(batch_size: int) -> tuple[int, int, int, int]:
    return (batch_size, TILE_SIZE_PX, TILE_SIZE_PX, 3)


def _describe_parser_error(error) -> str:
    # node() is -1 for errors about the model as a whole.
    where = f"node {error.node()}" if error.node() >= 0 else "model"
    if error.node_name():
        where += f" {error.node_name()!r}"
    if error.node_operator():
        where += f" ({error.node_operator()})"
    return f"{where}: {error.desc()} [{error.code()}]"


def _keep_overflow_prone_layers_in_fp32(trt: ModuleType, network) -> Counter:
    """Pin the layers FP16 cannot carry to FP32; return how many were pinned, by reason.

    FP16 tops out at 65504. A ViT's residual stream holds activations in the
    hundreds and more, so the square inside a LayerNorm's variance overflows to
    inf and the normalised output becomes NaN; small variances and the sums of a
    softmax lose their precision too. ONNX from opset 17 on (we export 18) gives
    TensorRT one normalisation layer per LayerNorm; older exports spell LayerNorm
    (and sometimes softmax) out as ReduceMean, Sub, Pow, Sqrt, Exp and Div, so those
    pieces are pinned as well.
    """
    float_types = {trt.float32, trt.float16}
    reduction_outputs: set[str] = set()
    pinned: Counter = Counter()
    # The ONNX parser adds layers in the graph's topological order, so a
    # reduction is always seen before the layers that consume its output.
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        outputs = [layer.get_output(output) for output in range(layer.num_outputs)]
        reason = _fp32_reason(trt, layer, reduction_outputs)
        if layer.type == trt.LayerType.REDUCE:
            reduction_outputs.update(output.name for output in outputs)
        # Integer layers (shape arithmetic) cannot run in FP32; they are not at risk anyway.
        if reason is None or any(output.dtype not in float_types for output in outputs):
            continue
        layer.precision = trt.float32
        for output in range(layer.num_outputs):
            layer.set_output_type(output, trt.float32)
        if layer.type == trt.LayerType.NORMALIZATION:
            # FP32 is already its default; set explicitly so no default change can undo it.
            layer.compute_precision = trt.float32
        pinned[reason] += 1
    return pinned


def _fp32_reason(trt: ModuleType, layer, reduction_outputs: set[str]) -> str | None:
    """Why `layer` must stay FP32, or None when FP16 is safe for it."""
    if layer.type == trt.LayerType.NORMALIZATION:
        return "normalization"
    if layer.type == trt.LayerType.SOFTMAX:
        return "softmax"
    if layer.type == trt.LayerType.REDUCE:
        return "reduction"
    # The Python bindings hand every layer out as the base ILayer; assigning its
    # concrete class exposes the operation it performs.
    if layer.type == trt.LayerType.ELEMENTWISE:
        layer.__class__ = trt.IElementWiseLayer
        if layer.op == trt.ElementWiseOperation.POW:
            return "power"
        inputs = [layer.get_input(index) for index in range(layer.num_inputs)]
        # Arithmetic on a mean or a sum (variance + eps, x - mean, exp / sum).
        if any(tensor is not None and tensor.name in reduction_outputs for tensor in inputs):
            return "arithmetic on a reduction"
    if layer.type == trt.LayerType.UNARY:
        layer.__class__ = trt.IUnaryLayer
        if layer.op in (trt.UnaryOperation.EXP, trt.UnaryOperation.SQRT):
            return "exp or sqrt"
    return None


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as a batch size is a bug, not a 1.
    return isinstance(value, int) and not isinstance(value, bool)
