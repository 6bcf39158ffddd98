"""TensorRT 10 in the core: importing it, loading an engine file, and the errors both raise.

The export stage builds and checks engines (`export/tensorrt_build.py`) and the
runtime serves them (`xmag.inference.TensorRTTileEncoder`). Both need the same
import check, engine loading and error types, and the core imports nothing
from `export/`, so they live here. TensorRT is imported only inside these
functions: where it (or the GPU it needs) is missing they raise
`TensorRTUnavailableError` with what to install, and nothing else breaks.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from xmag.errors import XmagError

# Engines are built with TensorRT 10's precision API (BuilderFlag.FP16, per-layer
# precision, OBEY_PRECISION_CONSTRAINTS), which TensorRT 11 removed in favour of
# strongly typed networks; and an engine runs only under the TensorRT release
# that built it. So building and running both hold to this major version.
SUPPORTED_TENSORRT_MAJOR = 10

TENSORRT_INSTALL_HINT = (
    "Building, checking or running TensorRT FP16 engines needs an NVIDIA GPU with its "
    "CUDA runtime and the TensorRT 10 Python package: on a GPU machine run "
    '`pip install "tensorrt>=10,<11"` (plain `pip install tensorrt` now brings '
    "TensorRT 11, which this code does not support), or work inside NVIDIA's "
    "TensorRT or Triton Inference Server container. The ONNX artifacts do not need "
    "TensorRT: onnxruntime serves them as they are."
)


class TensorRTUnavailableError(XmagError):
    """TensorRT (or the GPU it needs) is not available on this machine."""


class TensorRTEngineError(XmagError):
    """TensorRT rejected the ONNX model, failed to build it, or cannot run an engine file."""


class TensorRTBatchSizeError(TensorRTEngineError):
    """A batch is outside the engine's optimisation profile (its smallest to largest batch)."""


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, or TensorRTUnavailableError saying what to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as error:
        # OSError: the Python package is there but its CUDA libraries cannot be loaded.
        raise TensorRTUnavailableError(f"TensorRT cannot be imported ({error}). {TENSORRT_INSTALL_HINT}") from error
    major = int(tensorrt.__version__.split(".")[0])
    if major != SUPPORTED_TENSORRT_MAJOR:
        raise TensorRTUnavailableError(
            f"TensorRT {tensorrt.__version__} is installed, but this code uses the "
            f"TensorRT {SUPPORTED_TENSORRT_MAJOR} API. {TENSORRT_INSTALL_HINT}"
        )
    return tensorrt


def require_cuda_gpu() -> tuple[int, int]:
    """The compute capability of the current GPU; TensorRTUnavailableError when torch sees none."""
    if not torch.cuda.is_available():
        raise TensorRTUnavailableError(
            f"TensorRT is installed, but torch {torch.__version__} sees no CUDA GPU "
            f"(torch CUDA build: {torch.version.cuda or 'none, a CPU-only build'}). "
            f"{TENSORRT_INSTALL_HINT}"
        )
    return torch.cuda.get_device_capability()


def load_engine(trt: ModuleType, plan_path: Path):
    """Deserialise an engine file; TensorRTEngineError when this GPU or TensorRT cannot run it."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        major, minor = require_cuda_gpu()
        raise TensorRTEngineError(
            f"TensorRT {trt.__version__} cannot load {plan_path} on this GPU (compute capability "
            f"{major}.{minor}). An engine runs only on the GPU compute capability and TensorRT "
            "version that built it (both are in its file name, model.sm<cc>.trt<version>.plan). "
            "Rebuild the engine here, or run it where it was built."
        )
    return engine


def torch_dtype_of(trt: ModuleType, trt_dtype) -> torch.dtype:
    """The torch dtype of a TensorRT tensor type, for the torch tensors used as engine buffers."""
    dtypes = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int8: torch.int8,
        trt.uint8: torch.uint8,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
    }
    if trt_dtype not in dtypes:
        raise TensorRTEngineError(f"the engine has a tensor of type {trt_dtype}, which has no torch buffer type here")
    return dtypes[trt_dtype]
