"""The model repository's manifest: its schema, its verification, and the choice of artifact.

`export/` writes a repository in NVIDIA Triton's layout plus `manifest.json`
and the encoder's torch weights (a safetensors file at the repository root,
where Triton, which loads every subdirectory as a model, does not look); the
service calls `load_model_repository` before it serves anything. Loading
checks every file against its sha256 and refuses a repository that lacks a
file, has a changed one, or whose manifest describes another model.

`choose_encoder_artifact` names the artifact that would run without measuring
anything, by a fixed order: a TensorRT plan for this GPU > ONNX on
onnxruntime's TensorRT or CUDA providers > ONNX on the CPU (int8 if its parity
passed) > the torch weights. The runtime itself is chosen by measuring
(`xmag.inference.select_encoder_runtime`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xmag.errors import XmagError

MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1


class ModelRepositoryError(XmagError):
    """A model repository is missing, incomplete, changed, or not the model asked for."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class FileRecord(_Strict):
    path: str  # relative to the repository root, '/'-separated
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)


class Parity(_Strict):
    """How far an artifact's outputs are from torch fp32 on the same inputs."""

    reference: str = "torch-fp32"
    max_abs_error: float
    min_cosine: float
    batch_sizes: list[int]  # batch sizes (encoder) or tile counts (heads) it was measured at


class Artifact(_Strict):
    # Triton model name, i.e. the directory under the repository root; torch weights are
    # not a Triton model: their file lies at the root, named after the artifact.
    name: str
    role: Literal["encoder", "head"]
    task: str | None = None  # heads only
    runtime: Literal["onnxruntime", "tensorrt", "torch"]
    precision: Literal["fp32", "fp16", "int8"]
    files: list[FileRecord]
    parity: Parity | None = None
    # Whether this artifact may be served: an int8 model whose parity missed the bound is kept for inspection only.
    usable: bool = True
    compute_capability: str | None = None  # TensorRT plans only, e.g. "9.0"
    tensorrt_version: str | None = None


class EncoderSpec(_Strict):
    architecture: str  # a name of xmag.models.vit.VIT_CONFIGS
    vit_config: dict
    embed_dim: int
    tile_size_px: int
    target_mpp: float
    input_name: str = "tiles"
    input_layout: str = "uint8 RGB NHWC"
    output_name: str = "embedding"
    normalisation: dict[str, list[float]]  # {"mean": [...], "std": [...]} on the 0..1 scale, inside the graph


class TaskSpec(_Strict):
    name: str
    class_names: list[str]
    head_artifact: str


class Provenance(_Strict):
    kind: Literal["trained", "untrained-demo"]
    source_checkpoint: str | None = None  # file name only
    source_sha256: str | None = None
    description: str = ""


class Manifest(_Strict):
    schema_version: int = MANIFEST_SCHEMA_VERSION
    model_name: str
    model_version: int = Field(ge=1)
    encoder: EncoderSpec
    tasks: list[TaskSpec]
    artifacts: list[Artifact]
    provenance: Provenance
    exporter_versions: dict[str, str]
    int8_min_cosine: float  # the bound an int8 artifact's parity must meet to be usable

    def artifact(self, name: str) -> Artifact:
        for artifact in self.artifacts:
            if artifact.name == name:
                return artifact
        raise KeyError(name)


@dataclass(frozen=True)
class ModelRepository:
    """A verified repository: the manifest, and where its files are."""

    root: Path
    manifest: Manifest

    def path_of(self, artifact: Artifact, suffix: str) -> Path:
        """The artifact's file whose name ends with `suffix` (e.g. '.onnx', '.plan', '.safetensors')."""
        for record in artifact.files:
            if record.path.endswith(suffix):
                return self.root / record.path
        raise KeyError(f"{artifact.name} has no {suffix} file")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model_repository(root: str | Path, expected_model_name: str | None = None) -> ModelRepository:
    """Read and verify a repository; raise ModelRepositoryError naming what is wrong.

    Every file listed in the manifest must exist under `root` with its
    recorded size and sha256, every artifact must be named for the manifest's
    model, torch weights must lie at the root (Triton would take a directory
    for a model), and, when given, the model must be `expected_model_name`.
    """
    root = Path(root)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ModelRepositoryError(
            f"{root} is not a model repository: it has no {MANIFEST_FILE}. Build one with `xmag export`."
        )
    try:
        manifest = Manifest.model_validate(json.loads(manifest_path.read_text()))
    except (ValueError, ValidationError) as error:
        raise ModelRepositoryError(f"{manifest_path} is not a valid XMAG manifest: {error}") from error
    if manifest.schema_version != MANIFEST_SCHEMA_VERSION:
        raise ModelRepositoryError(
            f"{manifest_path} has schema version {manifest.schema_version}; this XMAG reads {MANIFEST_SCHEMA_VERSION}"
        )
    if expected_model_name is not None and manifest.model_name != expected_model_name:
        raise ModelRepositoryError(
            f"{root} holds model {manifest.model_name!r}, not the expected {expected_model_name!r}"
        )
    for artifact in manifest.artifacts:
        if not artifact.name.startswith(manifest.model_name):
            raise ModelRepositoryError(
                f"{manifest_path} describes model {manifest.model_name!r} but lists artifact {artifact.name!r}: "
                "the manifest belongs to another model"
            )
        if artifact.runtime == "torch" and any("/" in record.path for record in artifact.files):
            raise ModelRepositoryError(
                f"{manifest_path} puts the torch weights {artifact.name!r} in a subdirectory; they belong at the "
                "repository root, because NVIDIA Triton loads every subdirectory as a model"
            )
        for record in artifact.files:
            _verify_file(root, record)
    task_artifacts = {task.head_artifact for task in manifest.tasks}
    known = {artifact.name for artifact in manifest.artifacts}
    if not task_artifacts <= known:
        raise ModelRepositoryError(
            f"{manifest_path} names head artifacts it does not list: {sorted(task_artifacts - known)}"
        )
    return ModelRepository(root=root, manifest=manifest)


def _verify_file(root: Path, record: FileRecord) -> None:
    path = root / record.path
    if not path.is_file():
        raise ModelRepositoryError(f"model repository {root} lacks {record.path}, which its manifest lists")
    size = path.stat().st_size
    if size != record.size_bytes or sha256_of(path) != record.sha256:
        raise ModelRepositoryError(
            f"{record.path} in {root} does not match its manifest (size {size} vs {record.size_bytes} bytes, "
            "or its sha256 differs): the file was changed or belongs to another export. Rebuild the repository."
        )


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


@dataclass(frozen=True)
class EncoderChoice:
    # The torch choice's artifact is the repository's torch weights; None only for a repository
    # exported before they were added, which torch can run only from the source checkpoint.
    artifact: Artifact | None
    runtime: Literal["tensorrt", "onnxruntime", "torch"]
    providers: tuple[str, ...] = ()  # onnxruntime execution providers, in preference order


def choose_encoder_artifact(repository: ModelRepository, hardware: Hardware) -> EncoderChoice:
    """The best usable encoder artifact for `hardware` by the fixed order of the module docstring."""
    encoders = [a for a in repository.manifest.artifacts if a.role == "encoder" and a.usable]
    for artifact in encoders:
        if plan_runs_on(artifact, hardware):
            return EncoderChoice(artifact, "tensorrt")
    onnx_fp32 = [a for a in encoders if a.runtime == "onnxruntime" and a.precision == "fp32"]
    gpu_providers = onnxruntime_gpu_providers(hardware)
    if onnx_fp32 and gpu_providers:
        return EncoderChoice(onnx_fp32[0], "onnxruntime", (*gpu_providers, "CPUExecutionProvider"))
    if "CPUExecutionProvider" in hardware.onnxruntime_providers:
        onnx_cpu = [a for a in encoders if a.runtime == "onnxruntime" and a.precision == "int8"] + onnx_fp32
        if onnx_cpu:
            return EncoderChoice(onnx_cpu[0], "onnxruntime", ("CPUExecutionProvider",))
    torch_weights = [a for a in encoders if a.runtime == "torch"]
    return EncoderChoice(torch_weights[0] if torch_weights else None, "torch")
