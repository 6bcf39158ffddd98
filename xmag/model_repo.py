"""The model repository's manifest: its schema and its verification.

`export/` writes a repository in NVIDIA Triton's layout plus `manifest.json`
and the encoder's torch weights (a safetensors file at the repository root,
where Triton, which loads every subdirectory as a model, does not look); the
service calls `load_model_repository` before it serves anything. Loading
checks every file against its sha256 and refuses a repository that lacks a
file, has a changed one, or whose manifest describes another model.

Which of its encoder artifacts runs is chosen by measuring
(`xmag.runtimes.selection.select_encoder_runtime`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xmag.contract import EMBEDDING_OUTPUT, TILES_INPUT, TILES_LAYOUT
from xmag.errors import XmagError

MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1


class ModelRepositoryError(XmagError):
    """A model repository is missing, incomplete, changed, or not the model asked for."""

    code = "model_repository_error"


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
    input_name: str = TILES_INPUT
    input_layout: str = TILES_LAYOUT
    output_name: str = EMBEDDING_OUTPUT
    normalisation: dict[str, list[float]]  # {"mean": [...], "std": [...]} on the 0..1 scale, inside the graph
    # encoder_weights_sha256 of the encoder: what feature files and trained heads record (absent before 0.x exports).
    weights_sha256: str | None = None


class TaskSpec(_Strict):
    name: str
    class_names: list[str]
    head_artifact: str


class Provenance(_Strict):
    kind: Literal["trained", "untrained-demo"]
    source_checkpoint: str | None = None  # file name only
    source_sha256: str | None = None
    description: str = ""
    # Set when the encoder was fine-tuned (xmag train e2e): the name and encoder_weights_sha256 of the encoder it
    # was fine-tuned from, as "<name> (encoder_weights_sha256 <hex>)".
    fine_tuned_from: str | None = None


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
