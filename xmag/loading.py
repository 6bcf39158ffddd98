"""A model ready to classify in-process: its encoder and heads runtimes, and the ModelInfo that describes them.

`xmag classify` loads either a verified model repository (the encoder backend
chosen by measuring, as the service does) or a checkpoint run in torch. The
service's engine describes its repository with `repository_model_info` too, so
every answer names its model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xmag.demo import DEMO_HEADS_NOTICE, DEMO_WEIGHTS_NOTICE, demo_heads
from xmag.model_repo import MANIFEST_FILE, ModelRepository, load_model_repository, sha256_of
from xmag.models.checkpoints.xmag_format import (
    encoder_weights_sha256,
    is_xmag_checkpoint,
    load_encoder,
    load_encoder_checkpoint,
    load_xmag_checkpoint,
)
from xmag.models.encoder import TileEncoder
from xmag.models.vit import VisionTransformer
from xmag.result_schema import ModelInfo
from xmag.runtimes.protocols import SlideHeadsRuntime, TileEncoderRuntime
from xmag.runtimes.selection import runtimes_from_repository
from xmag.runtimes.torch_backend import TorchSlideHeads, TorchTileEncoder
from xmag.slide.tiling import PHIKON_20X, UNI2H_20X, XMAG_5X, TilingSpec
from xmag.vocabulary import EncoderBackend, EncoderPrecision, TorchPrecision


@dataclass(frozen=True)
class LoadedModel:
    encoder: TileEncoderRuntime
    heads: SlideHeadsRuntime
    info: ModelInfo
    spec: TilingSpec  # the tiling the encoder was trained for


def repository_model_info(repository: ModelRepository, encoder_description: str) -> ModelInfo:
    """What callers are told about a repository's model, run by the named encoder runtime."""
    manifest = repository.manifest
    kind = manifest.provenance.kind
    return ModelInfo(
        name=manifest.model_name,
        version=manifest.model_version,
        kind=kind,
        manifest_sha256=sha256_of(repository.root / MANIFEST_FILE),
        weights_sha256=manifest.provenance.source_sha256,
        encoder_sha256=manifest.encoder.weights_sha256,
        encoder=encoder_description,
        # The provenance says what a demo model is (untrained throughout, or a head trained on synthetic slides).
        notice=(manifest.provenance.description or DEMO_WEIGHTS_NOTICE) if kind == "untrained-demo" else "",
    )


def repository_tiling(repository: ModelRepository) -> TilingSpec:
    """The tiling a repository's encoder takes (its tile size at its resolution)."""
    encoder = repository.manifest.encoder
    return TilingSpec(target_mpp=encoder.target_mpp, tile_size_px=encoder.tile_size_px)


def load_repository_model(
    model_repo: Path, backend: EncoderBackend = "auto", precision: EncoderPrecision = "auto"
) -> LoadedModel:
    """A verified repository's heads and the fastest correct encoder backend on this machine (or the one asked for)."""
    repository = load_model_repository(model_repo)
    encoder, heads = runtimes_from_repository(repository, backend, precision)
    return LoadedModel(
        encoder, heads, repository_model_info(repository, encoder.description), repository_tiling(repository)
    )


def load_checkpoint_model(
    weights: Path, weights_format: str = "auto", encoder_config: str = "xmag_vitb14", precision: TorchPrecision = "fp32"
) -> LoadedModel:
    """A checkpoint run in torch on the CPU: its encoder, and its heads where it stores any.

    Without stored heads an untrained demo head stands in, and the ModelInfo's
    notice says its predictions are meaningless.
    """
    if weights_format in ("auto", "xmag") and is_xmag_checkpoint(weights):
        checkpoint = load_xmag_checkpoint(weights)  # encoder and heads from one read
        vit, stored_heads = checkpoint.vit, checkpoint.heads
        architecture = ""  # an XMAG checkpoint carries its own architecture, unnamed: the student's tiling
    else:
        vit, stored_heads = load_encoder(weights, weights_format, encoder_config), None
        architecture = encoder_config
    encoder = TorchTileEncoder(TileEncoder(vit), precision)
    heads = TorchSlideHeads(stored_heads if stored_heads is not None else demo_heads(encoder.embed_dim))
    info = ModelInfo(
        name=weights.name,
        version=0,
        kind="checkpoint",
        manifest_sha256=None,
        weights_sha256=sha256_of(weights),
        encoder_sha256=encoder_weights_sha256(vit),
        encoder=encoder.description,
        notice="" if stored_heads is not None else DEMO_HEADS_NOTICE,
    )
    return LoadedModel(encoder, heads, info, tiling_of_architecture(architecture))


def tiling_of_architecture(architecture: str) -> TilingSpec:
    """The tiling an architecture was trained for: the 20x models as the paper ran them, else the student's 5x.

    A checkpoint states no tiling, so a 20x model (`--encoder-config uni2h` or
    `phikon_vitb16`) is known by its architecture's name.
    """
    # tiny_uni2h is the UNI2-h recipe at test size (the benchmark's quick mode and the tests run it).
    return {"uni2h": UNI2H_20X, "tiny_uni2h": UNI2H_20X, "phikon_vitb16": PHIKON_20X}.get(architecture, XMAG_5X)


@dataclass(frozen=True)
class EncoderWeights:
    """An encoder's torch weights with what training records about them."""

    vit: VisionTransformer  # eval mode, on the CPU
    name: str
    sha256: str  # encoder_weights_sha256: what feature files and trained heads record
    provenance_kind: str  # "trained" or "untrained-demo"
    description: str
    spec: TilingSpec  # the tiling the encoder takes


def load_encoder_weights(
    source: Path, weights_format: str = "auto", encoder_config: str = "xmag_vitb14"
) -> EncoderWeights:
    """The torch encoder of a verified model repository (a folder) or of a checkpoint file, for training on top of it."""
    source = Path(source)
    if source.is_dir():
        repository = load_model_repository(source)
        manifest = repository.manifest
        torch_weights = next(
            (a for a in manifest.artifacts if a.role == "encoder" and a.runtime == "torch" and a.usable), None
        )
        if torch_weights is None:
            raise ValueError(f"{source} holds no torch encoder weights (exported before they were kept): export again")
        vit = load_encoder_checkpoint(repository.path_of(torch_weights, ".safetensors"))
        return EncoderWeights(
            vit,
            manifest.model_name,
            encoder_weights_sha256(vit),
            manifest.provenance.kind,
            manifest.provenance.description,
            repository_tiling(repository),
        )
    if weights_format in ("auto", "xmag") and is_xmag_checkpoint(source):
        checkpoint = load_xmag_checkpoint(source)
        vit, kind = checkpoint.vit, checkpoint.metadata.get("provenance_kind", "trained")
        description, architecture = checkpoint.metadata.get("provenance_description", ""), ""
    else:
        vit, kind, description = load_encoder(source, weights_format, encoder_config), "trained", ""
        architecture = encoder_config
    return EncoderWeights(
        vit, source.stem, encoder_weights_sha256(vit), kind, description, tiling_of_architecture(architecture)
    )
