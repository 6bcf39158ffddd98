"""A synthetic slide on disk with its ground truth: `make_synthetic_slide` and `SyntheticSlide`."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from xmag.synthetic.scene import MASK_UM_PER_PX, SlideGeometry
from xmag.synthetic.stain import BACKGROUND_LEVELS, Renderer
from xmag.synthetic.tiff_writer import PYRAMID_DOWNSAMPLE, pyramid_level_sizes, write_aperio_tiff

__all__ = ["SyntheticSlide", "load_synthetic_slide", "make_synthetic_slide"]


@dataclass(frozen=True)
class SyntheticSlide:
    """A synthetic slide on disk and the ground truth written beside it.

    Sizes are (width, height) in pixels; `lesion_boxes_px` are (x, y, width, height)
    in level-0 pixels, one per planted lesion, the top-left corner first as
    everywhere in XMAG.
    """

    path: Path
    tissue_mask_path: Path
    lesion_mask_path: Path
    metadata_path: Path
    width_px: int
    height_px: int
    base_magnification: float
    mpp: float
    tile_size_px: int
    level_sizes_px: tuple[tuple[int, int], ...]
    level_downsamples: tuple[int, ...]
    mask_um_per_px: float
    lesion_boxes_px: tuple[tuple[int, int, int, int], ...]
    seed: int

    def read_tissue_mask(self) -> np.ndarray:
        """The tissue mask as a bool array (rows, columns) at `mask_um_per_px`."""
        return np.asarray(Image.open(self.tissue_mask_path)) > 127

    def read_lesion_mask(self) -> np.ndarray:
        """The lesion mask as a bool array (rows, columns) at `mask_um_per_px`."""
        return np.asarray(Image.open(self.lesion_mask_path)) > 127


def make_synthetic_slide(
    path: str | os.PathLike[str],
    *,
    width_px: int,
    height_px: int,
    base_magnification: float = 20,
    levels: int | None = None,
    tile_size_px: int = 256,
    seed: int = 0,
    tissue: Literal["blobs", "full", "none"] = "blobs",
    n_lesions: int = 0,
    background: Literal["white", "grey"] = "white",
    faint: bool = False,
    write_mpp: bool = True,
    write_objective_power: bool = True,
    jpeg_quality: int = 90,
    associated_images: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> SyntheticSlide:
    """Write a synthetic H&E-like Aperio slide at `path` and its ground truth beside it.

    Args:
        path: the slide file to write (e.g. ``.../case.svs``); masks and JSON take its stem.
        width_px, height_px: level-0 size.
        base_magnification: objective power of level 0; mpp = 10 / base_magnification.
        levels: number of pyramid levels (4x apart); None adds levels until the
            smallest one is at most two tiles on its shorter side; 1 gives a single-level slide.
            Level k is floor(size / 4**k) as in Aperio files, so unless width and height
            are multiples of 4**k its downsample is not exactly 4**k (OpenSlide then
            resamples level-k reads by a fraction of a pixel, cuCIM does not).
        tile_size_px: TIFF tile side, a multiple of 16 (TIFF requires it).
        seed: everything drawn at random follows from it; same seed, same tissue.
        tissue: "blobs" (irregular pieces of tissue), "full" (all tissue) or "none" (blank glass).
        n_lesions: number of lesions planted inside the tissue.
        background: "white" (~242) or "grey" (~208, like some scanners).
        faint: pale, low-saturation staining (a hard case for tissue detection).
        write_mpp, write_objective_power: write `MPP` / `AppMag` in the Aperio
            description; without them OpenSlide reports no `openslide.mpp-x` /
            `openslide.objective-power`.
        jpeg_quality: JPEG quality of tiles, thumbnail and macro.
        associated_images: also write thumbnail, label and macro directories.
        progress: called as progress(tiles written, total tiles) while the pyramid is written.

    Returns:
        A `SyntheticSlide` describing what was written.
    """
    if width_px < 1 or height_px < 1:
        raise ValueError(f"slide size must be positive, got {width_px} x {height_px} px")
    if base_magnification <= 0:
        raise ValueError(f"base_magnification must be positive, got {base_magnification}")
    if tile_size_px < 16 or tile_size_px % 16:
        raise ValueError(f"tile_size_px must be a positive multiple of 16, got {tile_size_px}")
    if tissue not in ("blobs", "full", "none"):
        raise ValueError(f"tissue must be 'blobs', 'full' or 'none', got {tissue!r}")
    if background not in BACKGROUND_LEVELS:
        raise ValueError(f"background must be 'white' or 'grey', got {background!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if n_lesions < 0 or (n_lesions and tissue == "none"):
        raise ValueError(f"cannot plant {n_lesions} lesions in tissue={tissue!r}")

    slide_path = Path(path)
    slide_path.parent.mkdir(parents=True, exist_ok=True)
    mpp = 10.0 / base_magnification
    level_sizes = pyramid_level_sizes(width_px, height_px, tile_size_px, levels)
    geometry = SlideGeometry(
        width_um=width_px * mpp,
        height_um=height_px * mpp,
        seed=seed,
        tissue=tissue,
        n_lesions=n_lesions,
    )
    renderer = Renderer(geometry, seed=seed, background_level=BACKGROUND_LEVELS[background], faint=faint)

    stem = slide_path.with_suffix("")
    tissue_mask_path = stem.with_name(stem.name + ".tissue.png")
    lesion_mask_path = stem.with_name(stem.name + ".lesion.png")
    metadata_path = stem.with_name(stem.name + ".json")
    Image.fromarray(np.where(geometry.tissue_mask, 255, 0).astype(np.uint8)).save(tissue_mask_path)
    Image.fromarray(np.where(geometry.lesion_mask, 255, 0).astype(np.uint8)).save(lesion_mask_path)
    lesion_boxes_px = tuple(_um_box_to_level0_px(box, mpp, width_px, height_px) for box in geometry.lesion_boxes_um)

    write_aperio_tiff(
        slide_path,
        renderer,
        level_sizes=level_sizes,
        mpp=mpp,
        base_magnification=base_magnification,
        tile_size_px=tile_size_px,
        jpeg_quality=jpeg_quality,
        write_mpp=write_mpp,
        write_objective_power=write_objective_power,
        associated_images=associated_images,
        seed=seed,
        progress=progress,
    )

    slide = SyntheticSlide(
        path=slide_path,
        tissue_mask_path=tissue_mask_path,
        lesion_mask_path=lesion_mask_path,
        metadata_path=metadata_path,
        width_px=width_px,
        height_px=height_px,
        base_magnification=float(base_magnification),
        mpp=mpp,
        tile_size_px=tile_size_px,
        level_sizes_px=tuple(level_sizes),
        level_downsamples=tuple(PYRAMID_DOWNSAMPLE**level for level in range(len(level_sizes))),
        mask_um_per_px=MASK_UM_PER_PX,
        lesion_boxes_px=lesion_boxes_px,
        seed=seed,
    )
    metadata = {
        "slide": slide_path.name,
        "tissue_mask": tissue_mask_path.name,
        "lesion_mask": lesion_mask_path.name,
        "width_px": width_px,
        "height_px": height_px,
        "mpp": mpp,
        "base_magnification": float(base_magnification),
        "mpp_written": write_mpp,
        "objective_power_written": write_objective_power,
        "tile_size_px": tile_size_px,
        "level_sizes_px": [list(size) for size in slide.level_sizes_px],
        "level_downsamples": list(slide.level_downsamples),
        "mask_um_per_px": MASK_UM_PER_PX,
        "mask_size_px": [geometry.tissue_mask.shape[1], geometry.tissue_mask.shape[0]],
        "seed": seed,
        "tissue": tissue,
        "background": background,
        "faint": faint,
        "n_lesions": n_lesions,
        "lesion_boxes_px": [list(box) for box in lesion_boxes_px],
        "tissue_fraction": float(geometry.tissue_mask.mean()),
    }
    metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")
    return slide


def load_synthetic_slide(metadata_path: str | os.PathLike[str]) -> SyntheticSlide:
    """The SyntheticSlide of a slide written earlier, from the ground-truth JSON beside it (written last)."""
    metadata_path = Path(metadata_path)
    written = json.loads(metadata_path.read_text())
    folder = metadata_path.parent
    slide_path = folder / written["slide"]
    if not slide_path.is_file():
        raise FileNotFoundError(f"{metadata_path} describes {slide_path}, which is not there")
    return SyntheticSlide(
        path=slide_path,
        tissue_mask_path=folder / written["tissue_mask"],
        lesion_mask_path=folder / written["lesion_mask"],
        metadata_path=metadata_path,
        width_px=written["width_px"],
        height_px=written["height_px"],
        base_magnification=written["base_magnification"],
        mpp=written["mpp"],
        tile_size_px=written["tile_size_px"],
        level_sizes_px=tuple(tuple(size) for size in written["level_sizes_px"]),
        level_downsamples=tuple(written["level_downsamples"]),
        mask_um_per_px=written["mask_um_per_px"],
        lesion_boxes_px=tuple(tuple(box) for box in written["lesion_boxes_px"]),
        seed=written["seed"],
    )


def _um_box_to_level0_px(box_um: tuple[float, float, float, float], mpp: float, width_px: int, height_px: int):
    """(x0, y0, x1, y1) in um -> (x, y, width, height) in level-0 px, clipped to the slide."""
    x0, y0, x1, y1 = box_um
    left = max(0, math.floor(x0 / mpp))
    top = max(0, math.floor(y0 / mpp))
    right = min(width_px, math.ceil(x1 / mpp))
    bottom = min(height_px, math.ceil(y1 / mpp))
    return (left, top, right - left, bottom - top)
