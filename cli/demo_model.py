"""The demo model for commands given no model: its head trained by the training face, exported by the export face."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from xmag.demo import DEMO_WORKDIR


def demo_repository(say: Callable[[str], None], workdir: Path = DEMO_WORKDIR) -> Path:
    """The demo model repository, built (or brought up to date) from the demo chain; cached steps are skipped."""
    from xmag.export.demo import DEMO_REPOSITORY, ensure_demo_repository
    from xmag.training.demo import ensure_demo_checkpoint

    return ensure_demo_repository(DEMO_REPOSITORY, ensure_demo_checkpoint(workdir, say), say)
