"""Turning official weight files into XMAG checkpoints, with their provenance.

Accepted: the XMAG release (student), DINOv2 ViT-B/14 hub files, UNI2-h's
timm `pytorch_model.bin`, Phikon (Hugging Face ViT), and XMAG checkpoints
themselves. The result is one safetensors file holding the encoder (and, when
given, slide heads from another XMAG checkpoint), whose metadata records where
the weights came from: the source file's name and sha256, its format, and
whether the weights are trained.
"""

from __future__ import annotations

from pathlib import Path

from xmag.errors import CheckpointError
from xmag.model_repo import sha256_of
from xmag.models.abmil import SlideHeads
from xmag.models.checkpoints.fitting import load_vit_weights
from xmag.models.checkpoints.reading import detect_checkpoint_format, read_state_dict
from xmag.models.checkpoints.xmag_format import encoder_weights_sha256, save_encoder_checkpoint
from xmag.models.vit import VisionTransformer, get_vit_config

# The architecture each official source is, when the caller does not say.
DEFAULT_ARCHITECTURES = {
    "xmag_release": "xmag_vitb14",
    "dinov2_hub": "xmag_vitb14",
    "timm": "uni2h",
    "hf_vit": "phikon_vitb16",
}


def import_weights(
    source: Path,
    output: Path,
    *,
    fmt: str = "auto",
    architecture: str | None = None,
    heads: SlideHeads | None = None,
    heads_encoder_sha256: str | None = None,
    provenance_kind: str = "trained",
    description: str = "",
) -> str:
    """Convert `source` into an XMAG checkpoint at `output`; returns the format it was read as.

    Raises CheckpointError (naming the keys) when the file does not fit the
    architecture, which is `architecture` or the usual one for the format, and
    when `heads` were trained on features of another encoder (their
    `heads_encoder_sha256` is not this encoder's `encoder_weights_sha256`).
    """
    source = Path(source)
    state_dict = read_state_dict(source)  # read once: UNI2-h's file is 2.7 GB
    if fmt == "auto":
        fmt = detect_checkpoint_format(state_dict)
    model = VisionTransformer(get_vit_config(architecture or DEFAULT_ARCHITECTURES.get(fmt, "xmag_vitb14")))
    used_format = load_vit_weights(model, state_dict, fmt)
    if heads_encoder_sha256 is not None and heads_encoder_sha256 != encoder_weights_sha256(model):
        raise CheckpointError(
            f"the slide heads were trained on features of the encoder with weights sha256 {heads_encoder_sha256}, "
            f"not of {source.name} (weights sha256 {encoder_weights_sha256(model)}): they would not fit it"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    save_encoder_checkpoint(
        model,
        output,
        metadata={
            "provenance_kind": provenance_kind,
            "source_checkpoint": source.name,
            "source_sha256": sha256_of(source),
            "source_format": used_format,
            "provenance_description": description,
        },
        heads=heads,
        heads_encoder_sha256=heads_encoder_sha256 if heads is not None else None,
    )
    return used_format
