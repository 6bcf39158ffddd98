"""The demo model repository: untrained demo weights through the same export path as real models."""

from __future__ import annotations

from pathlib import Path

from xmag.demo import DEMO_ENCODER_CONFIG, DEMO_WEIGHTS_NOTICE, demo_encoder, demo_heads
from xmag.export.repository import ExportOptions, export_model_repository
from xmag.model_repo import MANIFEST_FILE
from xmag.models.checkpoints.xmag_format import save_encoder_checkpoint

# Built on first use (about 740 MiB; ignored by git), not committed.
DEMO_REPOSITORY = Path("model_repo/demo")


def ensure_demo_repository(directory: Path) -> Path:
    """Build the demo model repository (untrained weights, int8 CPU encoder included) unless it is there.

    It goes through the same path as real models: an XMAG checkpoint, then
    `export_model_repository`, so the demo exercises what production runs.
    """
    if (directory / MANIFEST_FILE).is_file():
        return directory
    encoder = demo_encoder()
    checkpoint = directory.with_name(directory.name + ".checkpoint.safetensors")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    save_encoder_checkpoint(
        encoder.vit,
        checkpoint,
        metadata={"provenance_kind": "untrained-demo", "provenance_description": DEMO_WEIGHTS_NOTICE},
        heads=demo_heads(encoder.embed_dim),
    )
    try:
        export_model_repository(checkpoint, directory, ExportOptions(int8=True), model_name=DEMO_ENCODER_CONFIG)
    finally:
        checkpoint.unlink(missing_ok=True)
    return directory
