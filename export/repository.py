"""Writing a versioned model repository: torch weights, ONNX (+ int8, + TensorRT) artifacts, Triton configs, manifest.

Layout (NVIDIA Triton's, plus our manifest and the torch weights):

    <repo>/manifest.json
    <repo>/<model>_torch.safetensors          encoder, torch fp32 weights (XMAG checkpoint, no heads)
    <repo>/<model>/config.pbtxt               encoder, ONNX fp32
    <repo>/<model>/<version>/model.onnx
    <repo>/<model>_int8/...                   encoder, ONNX int8 (optional, CPU)
    <repo>/<model>_trt/<version>/model.sm90.trt10.x.plan   (optional, GPU)
    <repo>/<model>_head_<task>/...            one ABMIL head per task

Triton loads every subdirectory of the repository as a model and ignores
files at the root, so the manifest and the torch weights (which Triton does
not serve; the in-process runtimes do) are root files, and the repository
still loads in Triton as it is.

The repository is built in a temporary directory beside the target and
renamed into place at the end, so an interrupted export never leaves a
half-written repository where the service would look.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata as package_metadata
from pathlib import Path

from xmag.contract import TILE_SIZE_PX
from xmag.export import onnx_export, triton_config
from xmag.model_repo import (
    MANIFEST_FILE,
    Artifact,
    EncoderSpec,
    FileRecord,
    Manifest,
    Parity,
    Provenance,
    TaskSpec,
    sha256_of,
)
from xmag.models.checkpoints.xmag_format import (
    encoder_weights_sha256,
    load_xmag_checkpoint,
    save_encoder_checkpoint,
)
from xmag.models.encoder import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, TileEncoder
from xmag.models.vit import VIT_CONFIGS
from xmag.slide.tiling import XMAG_5X


@dataclass(frozen=True)
class ExportOptions:
    version: int = 1
    max_batch_size: int = 256  # Triton's batch limit for the encoder
    preferred_batch_sizes: tuple[int, ...] = (64, 128)
    max_queue_delay_us: int = 2_000
    int8: bool = False  # also write a dynamically quantised int8 encoder for CPUs
    tensorrt: bool = False  # also build a TensorRT FP16 engine for this machine's GPU
    tensorrt_min_batch: int = 1
    tensorrt_opt_batch: int = 64
    tensorrt_max_batch: int = 256
    target_mpp: float = XMAG_5X.target_mpp


def _versions(*packages: str) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = package_metadata.version(package)
        except package_metadata.PackageNotFoundError:
            continue
    return versions


def _file_record(root: Path, path: Path) -> FileRecord:
    return FileRecord(path=path.relative_to(root).as_posix(), sha256=sha256_of(path), size_bytes=path.stat().st_size)


def _file_records(root: Path, directory: Path) -> list[FileRecord]:
    return [_file_record(root, path) for path in sorted(directory.rglob("*")) if path.is_file()]


def export_model_repository(
    checkpoint_path: Path, repo_root: Path, options: ExportOptions = ExportOptions(), model_name: str | None = None
) -> Manifest:
    """Export an XMAG checkpoint (encoder + zero or more heads) into a model repository at `repo_root`.

    The repository holds the encoder's torch weights (artifact `<model>_torch`,
    an XMAG checkpoint without heads, at the root), its ONNX graphs and one
    ONNX graph per head (layout in the module docstring).

    Raises onnx_export.ParityError when an fp32 artifact does not reproduce
    torch; the int8 artifact is recorded either way, marked usable only if it
    meets onnx_export.INT8_MIN_COSINE. An existing repository at `repo_root`
    is replaced only once the new one is complete.
    """
    if options.tensorrt:
        from xmag.export import tensorrt_build

        tensorrt_build.require_tensorrt()  # before minutes of ONNX work, not after
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_xmag_checkpoint(checkpoint_path)  # one read of a file that may be GBs
    vit, heads, checkpoint_metadata = checkpoint.vit, checkpoint.heads, checkpoint.metadata
    encoder = TileEncoder(vit).eval()
    architecture = next((name for name, config in VIT_CONFIGS.items() if config == vit.config), "custom")
    model_name = model_name or architecture
    version = str(options.version)

    repo_root = Path(repo_root)
    repo_root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repo_root.name}.", dir=repo_root.parent))
    try:
        artifacts: list[Artifact] = []

        def add_model(
            name: str,
            role: str,
            task: str | None,
            runtime: str,
            precision: str,
            parity: Parity | None,
            config_text: str,
            usable: bool = True,
            **extra,
        ) -> None:
            (staging / name / "config.pbtxt").write_text(config_text)
            artifacts.append(
                Artifact(
                    name=name,
                    role=role,
                    task=task,
                    runtime=runtime,
                    precision=precision,
                    files=_file_records(staging, staging / name),
                    parity=parity,
                    usable=usable,
                    **extra,
                )
            )

        # The encoder's own weights, for the torch runtimes and as the fp32 reference they are all measured against.
        torch_name = f"{model_name}_torch"
        torch_path = staging / f"{torch_name}.safetensors"
        save_encoder_checkpoint(vit, torch_path)
        artifacts.append(
            Artifact(
                name=torch_name,
                role="encoder",
                runtime="torch",
                precision="fp32",
                files=[_file_record(staging, torch_path)],
            )
        )

        encoder_path = staging / model_name / version / "model.onnx"
        onnx_export.export_encoder(encoder, encoder_path)
        parity = onnx_export.encoder_parity(encoder, encoder_path)
        onnx_export.check_fp32_parity(parity, f"encoder {model_name}")
        add_model(
            model_name,
            "encoder",
            None,
            "onnxruntime",
            "fp32",
            parity,
            _encoder_config(
                model_name, triton_config.ONNX_PLATFORM, options, vit.embed_dim, encoder.tile_size_px, "KIND_GPU"
            ),
        )

        if options.int8:
            int8_name = f"{model_name}_int8"
            int8_path = staging / int8_name / version / "model.onnx"
            onnx_export.quantize_encoder_int8(encoder_path, int8_path)
            int8_parity = onnx_export.encoder_parity(encoder, int8_path, onnx_export.INT8_PARITY_BATCH_SIZES)
            add_model(
                int8_name,
                "encoder",
                None,
                "onnxruntime",
                "int8",
                int8_parity,
                _encoder_config(
                    int8_name, triton_config.ONNX_PLATFORM, options, vit.embed_dim, encoder.tile_size_px, "KIND_CPU"
                ),
                usable=int8_parity.min_cosine >= onnx_export.INT8_MIN_COSINE,
            )

        if options.tensorrt:
            trt_name = f"{model_name}_trt"
            plan_path = tensorrt_build.build_tensorrt_engine(
                encoder_path,
                staging / trt_name / version,
                min_batch=options.tensorrt_min_batch,
                opt_batch=options.tensorrt_opt_batch,
                max_batch=options.tensorrt_max_batch,
            )
            compute_capability, tensorrt_version = tensorrt_build.parse_engine_filename(plan_path.name)
            trt_parity = tensorrt_build.check_engine_parity(plan_path, encoder_path)
            cc_text = f"{compute_capability[0]}.{compute_capability[1]}"
            add_model(
                trt_name,
                "encoder",
                None,
                "tensorrt",
                "fp16",
                Parity(reference="onnxruntime-fp32", **trt_parity),
                _encoder_config(
                    trt_name,
                    triton_config.TENSORRT_PLATFORM,
                    options,
                    vit.embed_dim,
                    encoder.tile_size_px,
                    "KIND_GPU",
                    cc_model_filenames={cc_text: plan_path.name},
                    max_batch=options.tensorrt_max_batch,
                ),
                compute_capability=cc_text,
                tensorrt_version=tensorrt_version,
            )

        tasks = []
        for task, head in heads.heads.items() if heads is not None else []:
            head_name = f"{model_name}_head_{task}"
            head_path = staging / head_name / version / "model.onnx"
            onnx_export.export_head(head, head_path)
            head_parity = onnx_export.head_parity(head, head_path)
            onnx_export.check_fp32_parity(head_parity, f"head {task}")
            add_model(
                head_name,
                "head",
                task,
                "onnxruntime",
                "fp32",
                head_parity,
                triton_config.render_model_config(
                    triton_config.abmil_head_config(head_name, embed_dim=head.in_dim, num_classes=head.num_classes)
                ),
            )
            tasks.append(TaskSpec(name=task, class_names=heads.class_names[task], head_artifact=head_name))

        manifest = Manifest(
            model_name=model_name,
            model_version=options.version,
            encoder=EncoderSpec(
                architecture=architecture,
                vit_config=vit.config.to_dict(),
                embed_dim=vit.embed_dim,
                tile_size_px=encoder.tile_size_px,
                target_mpp=options.target_mpp,
                normalisation={"mean": list(IMAGENET_MEAN_RGB), "std": list(IMAGENET_STD_RGB)},
                weights_sha256=encoder_weights_sha256(vit),
            ),
            tasks=tasks,
            artifacts=artifacts,
            provenance=Provenance(
                kind=checkpoint_metadata.get("provenance_kind", "trained"),
                source_checkpoint=checkpoint_metadata.get("source_checkpoint", checkpoint_path.name),
                source_sha256=checkpoint_metadata.get("source_sha256", sha256_of(checkpoint_path)),
                description=checkpoint_metadata.get("provenance_description", ""),
                fine_tuned_from=checkpoint_metadata.get("fine_tuned_from"),
            ),
            exporter_versions=_versions("xmag", "torch", "onnx", "onnxscript", "onnxruntime", "tensorrt"),
            int8_min_cosine=onnx_export.INT8_MIN_COSINE,
        )
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        _make_readable_by_all(staging)
        if repo_root.exists():
            shutil.rmtree(repo_root)
        staging.rename(repo_root)
        return manifest
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _make_readable_by_all(root: Path) -> None:
    """rwxr-xr-x directories, rw-r--r-- files: mkdtemp's private 0700 would lock out the service's and
    Triton's users (uid 10001, 1000) when the repository is copied into a volume."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _encoder_config(
    name, platform, options: ExportOptions, embed_dim, tile_size_px, kind, cc_model_filenames=None, max_batch=None
):
    if tile_size_px != TILE_SIZE_PX:
        raise ValueError(f"the Triton configs describe {TILE_SIZE_PX} px tiles, the encoder takes {tile_size_px} px")
    if platform == triton_config.TENSORRT_PLATFORM:
        spec = triton_config.tensorrt_encoder_config(
            name,
            cc_model_filenames=cc_model_filenames,
            max_batch_size=max_batch,
            embed_dim=embed_dim,
            preferred_batch_sizes=[size for size in options.preferred_batch_sizes if size <= max_batch],
            max_queue_delay_microseconds=options.max_queue_delay_us,
        )
    else:
        spec = triton_config.onnx_encoder_config(
            name,
            embed_dim=embed_dim,
            max_batch_size=options.max_batch_size,
            preferred_batch_sizes=[size for size in options.preferred_batch_sizes if size <= options.max_batch_size],
            max_queue_delay_microseconds=options.max_queue_delay_us,
            instance_kind=kind,
        )
    return triton_config.render_model_config(spec)
