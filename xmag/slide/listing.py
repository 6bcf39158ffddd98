"""Finding slide files: by suffix under a folder (recursively), for the commands that take many slides."""

from __future__ import annotations

from pathlib import Path

# The suffixes OpenSlide reads (and cuCIM's TIFF-based ones among them).
SLIDE_SUFFIXES = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif"})


def find_slide_files(folder: Path) -> list[Path]:
    """Slide files under `folder` (recursively), sorted, as paths relative to it; NotADirectoryError if it is none."""
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a directory")
    return sorted(
        path.relative_to(folder)
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in SLIDE_SUFFIXES
    )
