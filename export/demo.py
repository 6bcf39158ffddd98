"""The demo model repository: the demo checkpoint through the same export path as real models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from xmag.demo import DEMO_ENCODER_CONFIG
from xmag.export.repository import ExportOptions, export_model_repository
from xmag.model_repo import MANIFEST_FILE, load_model_repository, sha256_of

# Built on first use (about 740 MiB; ignored by git), not committed.
DEMO_REPOSITORY = Path("model_repo/demo")


def ensure_demo_repository(directory: Path, checkpoint: Path, say: Callable[[str], None] = print) -> Path:
    """Export the demo checkpoint (int8 CPU encoder included) unless `directory` was exported from this very file.

    It goes through `export_model_repository`, so the demo exercises what
    production runs; a repository exported from another checkpoint (an older
    demo, say) is replaced.
    """
    if (directory / MANIFEST_FILE).is_file():
        try:
            exported_from = load_model_repository(directory).manifest.provenance.source_sha256
        except Exception:  # noqa: BLE001 - an unreadable repository is rebuilt, whatever is wrong with it
            exported_from = None
        if exported_from == sha256_of(checkpoint):
            return directory
    say(f"$ xmag export {checkpoint} --repo {directory} --int8 --model-name {DEMO_ENCODER_CONFIG}")
    export_model_repository(checkpoint, directory, ExportOptions(int8=True), model_name=DEMO_ENCODER_CONFIG)
    return directory
