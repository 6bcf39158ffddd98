"""What this machine can run the encoder on: its GPU, TensorRT and onnxruntime's providers.

`detect_hardware` probes them without failing where any is absent;
`plan_runs_on` says whether a repository's TensorRT plan loads here, and
`onnxruntime_gpu_providers` which of onnxruntime's GPU providers can run the ONNX graph.
"""

from __future__ import annotations

from dataclasses import dataclass

from xmag.model_repo import Artifact


@dataclass(frozen=True)
class Hardware:
    """What the runtime can use; `detect_hardware` fills it in."""

    cuda_compute_capability: str | None  # e.g. "9.0"; None without a CUDA GPU
    tensorrt_version: str | None
    onnxruntime_providers: tuple[str, ...]


def detect_hardware() -> Hardware:
    """Probe the GPU, TensorRT and onnxruntime's providers without failing where any is absent."""
    compute_capability = None
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            compute_capability = f"{major}.{minor}"
    except ImportError:
        pass
    try:
        import tensorrt

        tensorrt_version = tensorrt.__version__
    except ImportError:
        tensorrt_version = None
    try:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    except ImportError:
        providers = ()
    return Hardware(compute_capability, tensorrt_version, providers)


def plan_runs_on(plan: Artifact, hardware: Hardware) -> bool:
    """Whether a TensorRT plan loads on `hardware`: the GPU's compute capability and the TensorRT
    release (X.Y.Z; the build number of tensorrt.__version__ is left out, as in engine file names)
    must be the ones that built it."""
    return (
        plan.runtime == "tensorrt"
        and hardware.cuda_compute_capability is not None
        and hardware.cuda_compute_capability == plan.compute_capability
        and hardware.tensorrt_version is not None
        and plan.tensorrt_version is not None
        and hardware.tensorrt_version.split(".")[:3] == plan.tensorrt_version.split(".")[:3]
    )


def onnxruntime_gpu_providers(hardware: Hardware) -> tuple[str, ...]:
    """onnxruntime's GPU execution providers present on `hardware`, in preference order; () without a GPU."""
    if hardware.cuda_compute_capability is None:
        return ()
    return tuple(
        p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in hardware.onnxruntime_providers
    )
