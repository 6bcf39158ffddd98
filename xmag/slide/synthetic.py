"""Synthetic whole-slide images with ground truth, for tests and benchmarks.

`make_synthetic_slide` writes a pyramidal, JPEG-tiled TIFF that OpenSlide and
cuCIM both read as an Aperio SVS, and beside it the truth about what it shows:

    slide.svs            the slide (any suffix; readers detect the format by content)
    slide.tissue.png     0/255 tissue mask at `mask_um_per_px`
    slide.lesion.png     0/255 lesion mask at `mask_um_per_px`
    slide.json           sizes, resolution, seed, lesion boxes in level-0 pixels

Everything the slide shows is defined in physical space (micrometres), not in
pixels: the tissue outline is a smooth field on the mask grid, nuclei sit on a
micrometre lattice, stain textures have micrometre texels. A 20x slide of W x H
and a 40x slide of 2W x 2H with the same seed therefore show the same tissue,
the same lesions and the same nuclei, and their masks are identical.

Every pyramid level is rendered procedurally at its own resolution, one tile at
a time while the TIFF is written, so memory stays bounded (the largest arrays
are the mask-resolution fields) whatever the slide size.

TIFF directory layout, as in a real Aperio SVS:

    0           level 0, tiled JPEG, ImageDescription "Aperio Image Library ...|AppMag = ..|MPP = .."
    1           thumbnail, stripped JPEG (OpenSlide names the second directory "thumbnail")
    2 .. L      pyramid levels 1 .. L-1, tiled JPEG, each 4x smaller than the one before
    L+1         label, stripped LZW, ImageDescription line 2 starts with "label"
    L+2         macro, stripped JPEG, ImageDescription line 2 starts with "macro"
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage

__all__ = ["MASK_UM_PER_PX", "SyntheticSlide", "make_synthetic_slide"]

# Ground-truth masks are stored at this fixed resolution whatever the slide's
# magnification, so masks of a 20x and a 40x slide of the same tissue can be compared.
MASK_UM_PER_PX = 8.0

# Aperio pyramids shrink by 4x per level.
PYRAMID_DOWNSAMPLE = 4

# OpenSlide detects the Aperio format by this prefix of the first ImageDescription.
_APERIO_HEADER = "Aperio Image Library v12.0.15"
_THUMBNAIL_MAX_SIDE_PX = 1024
_LABEL_SIZE_PX = (400, 400)  # width, height
_MACRO_SIZE_PX = (1280, 431)  # width, height: a 75 x 25 mm glass slide seen from above

# Rendering is numpy-bound and numpy releases the GIL in its inner loops, so
# threads render tiles in parallel (about 1.8x on two cores); beyond eight the
# GIL-held glue code dominates.
_RENDER_THREADS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))

_BACKGROUND_LEVELS = {"white": 242.0, "grey": 208.0}

# Optical-density colour of one unit of each stain (R, G, B), hand-tuned to look
# like H&E (close to Ruifrok & Johnston's vectors, eosin a little bluer so
# stroma reads pink rather than magenta). Pixels follow Beer-Lambert:
# intensity = background * exp(-(c_H * HEMATOXYLIN_OD + c_E * EOSIN_OD)).
_HEMATOXYLIN_OD = np.array([0.62, 0.74, 0.26], dtype=np.float32)
_EOSIN_OD = np.array([0.06, 0.88, 0.46], dtype=np.float32)
_FAINT_STAIN_SCALE = 0.22  # faint tissue carries this fraction of the normal stain

# Stain textures: a periodic texture with 0.5 um texels (1024 texels = 512 um period),
# plus 2x-coarser mip levels so that coarse pyramid levels see the texture averaged,
# as a scanner would, instead of aliased.
_TEXTURE_UM_PER_TEXEL = 0.5
_TEXTURE_SIZE_TEXELS = 1024


@dataclass(frozen=True)
class _NucleusKind:
    """How one population of nuclei looks; nuclei sit on a jittered lattice of `cell_um`."""

    cell_um: float
    presence: float  # fraction of lattice cells that hold a nucleus
    radius_um: tuple[float, float]  # (min, max), at most cell_um / 2
    hematoxylin: tuple[float, float]  # stain concentration (min, max), varied by chromatin texture
    eosin: float
    hash_stream: int  # keeps the two populations' random draws independent


# Normal tissue: sparse, small, mid-purple nuclei in pink stroma.
_NORMAL_NUCLEI = _NucleusKind(
    cell_um=16.0, presence=0.45, radius_um=(2.4, 3.6), hematoxylin=(0.9, 1.3), eosin=0.15, hash_stream=1
)
# Lesion: crowded, large, dark nuclei in lilac cytoplasm with little stroma.
_LESION_NUCLEI = _NucleusKind(
    cell_um=11.0, presence=0.85, radius_um=(3.0, 4.4), hematoxylin=(1.6, 2.2), eosin=0.1, hash_stream=2
)


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
    if background not in _BACKGROUND_LEVELS:
        raise ValueError(f"background must be 'white' or 'grey', got {background!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if n_lesions < 0 or (n_lesions and tissue == "none"):
        raise ValueError(f"cannot plant {n_lesions} lesions in tissue={tissue!r}")

    slide_path = Path(path)
    slide_path.parent.mkdir(parents=True, exist_ok=True)
    mpp = 10.0 / base_magnification
    level_sizes = _level_sizes(width_px, height_px, tile_size_px, levels)
    geometry = _SlideGeometry(
        width_um=width_px * mpp,
        height_um=height_px * mpp,
        seed=seed,
        tissue=tissue,
        n_lesions=n_lesions,
    )
    renderer = _Renderer(geometry, seed=seed, background_level=_BACKGROUND_LEVELS[background], faint=faint)

    stem = slide_path.with_suffix("")
    tissue_mask_path = stem.with_name(stem.name + ".tissue.png")
    lesion_mask_path = stem.with_name(stem.name + ".lesion.png")
    metadata_path = stem.with_name(stem.name + ".json")
    Image.fromarray(np.where(geometry.tissue_mask, 255, 0).astype(np.uint8)).save(tissue_mask_path)
    Image.fromarray(np.where(geometry.lesion_mask, 255, 0).astype(np.uint8)).save(lesion_mask_path)
    lesion_boxes_px = tuple(_um_box_to_level0_px(box, mpp, width_px, height_px) for box in geometry.lesion_boxes_um)

    _write_aperio_tiff(
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


def _level_sizes(width_px: int, height_px: int, tile_size_px: int, levels: int | None) -> list[tuple[int, int]]:
    """(width, height) of each pyramid level; level k is level 0 floor-divided by 4**k, as Aperio does."""
    if levels is not None and levels < 1:
        raise ValueError(f"levels must be at least 1, got {levels}")
    sizes = [(width_px, height_px)]
    while True:
        if levels is not None and len(sizes) >= levels:
            break
        if levels is None and min(sizes[-1]) <= 2 * tile_size_px:
            break
        downsample = PYRAMID_DOWNSAMPLE ** len(sizes)
        next_size = (width_px // downsample, height_px // downsample)
        if min(next_size) < 1:
            raise ValueError(f"a {width_px} x {height_px} px slide cannot have {levels} levels 4x apart")
        sizes.append(next_size)
    return sizes


def _um_box_to_level0_px(box_um: tuple[float, float, float, float], mpp: float, width_px: int, height_px: int):
    """(x0, y0, x1, y1) in um -> (x, y, width, height) in level-0 px, clipped to the slide."""
    x0, y0, x1, y1 = box_um
    left = max(0, math.floor(x0 / mpp))
    top = max(0, math.floor(y0 / mpp))
    right = min(width_px, math.ceil(x1 / mpp))
    bottom = min(height_px, math.ceil(y1 / mpp))
    return (left, top, right - left, bottom - top)


# --------------------------------------------------------------------------- geometry


class _SlideGeometry:
    """Where tissue and lesions are, as smooth fields on the ground-truth mask grid.

    A field is positive inside its region, and the masks are its sign at the
    mask pixel centres: mask pixel (row, col) covers [col * 8, (col + 1) * 8) um
    horizontally, so its centre is at (col + 0.5) * 8 um. Rendering reads the
    same fields (see `coverage`), so the image shows the tissue the mask records.

    The random layout is drawn in units of the slide's shorter side, so it
    depends on the seed and the physical extent only, not on the magnification.
    """

    def __init__(self, *, width_um: float, height_um: float, seed: int, tissue: str, n_lesions: int):
        mask_cols = max(1, math.ceil(width_um / MASK_UM_PER_PX))
        mask_rows = max(1, math.ceil(height_um / MASK_UM_PER_PX))
        # Mask-pixel centres in units of the shorter side ("s-units").
        short_side_um = min(width_um, height_um)
        s_per_mask_px = MASK_UM_PER_PX / short_side_um
        s_x = ((np.arange(mask_cols, dtype=np.float32) + 0.5) * s_per_mask_px)[None, :]
        s_y = ((np.arange(mask_rows, dtype=np.float32) + 0.5) * s_per_mask_px)[:, None]
        extent_s = (width_um / short_side_um, height_um / short_side_um)

        if tissue == "full":
            self.tissue_field = np.ones((mask_rows, mask_cols), dtype=np.float32)
        elif tissue == "none":
            self.tissue_field = -np.ones((mask_rows, mask_cols), dtype=np.float32)
        else:
            rng = np.random.default_rng([seed, 101])
            self.tissue_field = _tissue_blobs_field(rng, s_x, s_y, extent_s)
        self.tissue_mask = self.tissue_field > 0

        self.lesion_field = np.full((mask_rows, mask_cols), -1.0, dtype=np.float32)
        self.lesion_boxes_um: list[tuple[float, float, float, float]] = []
        if n_lesions:
            rng = np.random.default_rng([seed, 202])
            self._plant_lesions(rng, n_lesions, s_x, s_y)
        self.lesion_mask = self.lesion_field > 0

    def _plant_lesions(self, rng, n_lesions: int, s_x, s_y) -> None:
        """Draw lesion discs with irregular edges deep inside tissue, away from each other."""
        # Lesion centres need only be roughly deep inside tissue, so the depth
        # (distance to glass or slide edge) is measured on every 4th mask pixel:
        # 16x less memory on a large slide.
        step = 4
        coarse_tissue = np.pad(self.tissue_mask[::step, ::step], 1)
        depth = ndimage.distance_transform_edt(coarse_tissue)[1:-1, 1:-1].astype(np.float32)
        for _ in range(n_lesions):
            if depth.max() <= 0:
                raise ValueError(f"no room for {n_lesions} lesions in this tissue; use fewer or a larger slide")
            candidates = np.flatnonzero(depth >= 0.5 * depth.max())
            coarse_row, coarse_col = np.unravel_index(rng.choice(candidates), depth.shape)
            centre_x = float(s_x[0, coarse_col * step])
            centre_y = float(s_y[coarse_row * step, 0])
            radius_s = rng.uniform(0.07, 0.11)
            distance_s = np.hypot(s_x - centre_x, s_y - centre_y)
            # The centre (a tissue pixel) stays inside: the edge noise is at most 0.3.
            field = 1.0 - distance_s / radius_s + 0.3 * _smooth_noise(rng, s_x, s_y, feature_size_s=0.02)
            np.minimum(field, self.tissue_field, out=field)
            inside = field > 0
            rows = np.flatnonzero(inside.any(axis=1))
            cols = np.flatnonzero(inside.any(axis=0))
            self.lesion_boxes_um.append(
                (
                    cols[0] * MASK_UM_PER_PX,
                    rows[0] * MASK_UM_PER_PX,
                    (cols[-1] + 1) * MASK_UM_PER_PX,
                    (rows[-1] + 1) * MASK_UM_PER_PX,
                )
            )
            np.maximum(self.lesion_field, field, out=self.lesion_field)
            # Keep later lesions out of this one and a margin around it.
            depth[distance_s[::step, ::step] < 2.2 * radius_s] = 0

    def coverage(self, x_um: np.ndarray, y_um: np.ndarray, field: np.ndarray, um_per_px: float):
        """How much of each pixel of the grid x_um (columns) x y_um (rows) lies inside `field`.

        Pixels are `um_per_px` wide and centred on the given points. Returns a float32
        array (rows, columns) in [0, 1], or a float32 scalar 0 or 1 when the whole grid
        is on one side (the common case, spared the arithmetic).

        The outline is antialiased, as a scanner's pixels integrate light over
        their area: the field is interpolated bilinearly, its signed distance to
        the outline estimated from its value and gradient, and the coverage
        ramps from 0 to 1 across one pixel. So a level rendered at 8 um/px matches
        one rendered at 4 um/px and averaged 2 x 2, and a pixel is more than half
        covered exactly where the mask (the field's sign) says tissue.
        """
        # Continuous mask-grid coordinates of the pixel centres, and the 2x2 mask
        # pixels around each one.
        col = x_um / MASK_UM_PER_PX - 0.5
        row = y_um / MASK_UM_PER_PX - 0.5
        n_rows, n_cols = field.shape
        col0 = np.clip(np.floor(col).astype(np.int64), 0, max(n_cols - 2, 0))
        row0 = np.clip(np.floor(row).astype(np.int64), 0, max(n_rows - 2, 0))
        col1 = np.minimum(col0 + 1, n_cols - 1)
        row1 = np.minimum(row0 + 1, n_rows - 1)
        # Bilinear interpolation is a convex combination of the corners: when
        # every mask pixel under the grid has one sign, so does the result.
        block = field[row0[0] : row1[-1] + 1, col0[0] : col1[-1] + 1]
        if (block > 0).all():
            return np.float32(1.0)
        if (block <= 0).all():
            return np.float32(0.0)
        fx = np.clip(col - col0, 0.0, 1.0).astype(np.float32)[None, :]
        fy = np.clip(row - row0, 0.0, 1.0).astype(np.float32)[:, None]
        flat = field.reshape(-1)
        top_left = flat.take(row0[:, None] * n_cols + col0[None, :])
        top_right = flat.take(row0[:, None] * n_cols + col1[None, :])
        bottom_left = flat.take(row1[:, None] * n_cols + col0[None, :])
        bottom_right = flat.take(row1[:, None] * n_cols + col1[None, :])
        top = top_left + (top_right - top_left) * fx
        bottom = bottom_left + (bottom_right - bottom_left) * fx
        value = top + (bottom - top) * fy
        # Gradient of the interpolant, per mask pixel.
        slope_x = (top_right - top_left) * (1 - fy) + (bottom_right - bottom_left) * fy
        slope_y = bottom - top
        slope = np.maximum(np.sqrt(slope_x * slope_x + slope_y * slope_y), np.float32(1e-6))
        distance_px = value / slope * np.float32(MASK_UM_PER_PX / um_per_px)
        return np.clip(0.5 + distance_px, 0.0, 1.0)


def _tissue_blobs_field(rng, s_x, s_y, extent_s) -> np.ndarray:
    """A few irregular, overlapping ellipses of tissue with small fat-like holes."""
    width_s, height_s = extent_s
    field = np.full((s_y.size, s_x.size), -np.inf, dtype=np.float32)
    blob_centres = []
    for _ in range(int(rng.integers(2, 5))):
        centre_x = rng.uniform(0.22, 0.78) * width_s
        centre_y = rng.uniform(0.22, 0.78) * height_s
        semi_major, semi_minor = rng.uniform(0.16, 0.34, size=2)
        angle = rng.uniform(0, math.pi)
        cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        dx, dy = s_x - np.float32(centre_x), s_y - np.float32(centre_y)
        along = (dx * cos + dy * sin) / np.float32(semi_major)
        across = (dy * cos - dx * sin) / np.float32(semi_minor)
        np.maximum(field, 1.0 - np.hypot(along, across), out=field)
        blob_centres.append((centre_x, centre_y, min(semi_major, semi_minor)))
    # Irregular edges: coarse lobes plus finer ragging.
    field += 0.35 * _smooth_noise(rng, s_x, s_y, feature_size_s=0.06)
    field += 0.12 * _smooth_noise(rng, s_x, s_y, feature_size_s=0.018)
    # Holes (fat, tears): small discs of glass inside the blobs.
    for _ in range(int(rng.integers(4, 10))):
        centre_x, centre_y, radius_s = blob_centres[int(rng.integers(len(blob_centres)))]
        offset = rng.uniform(0, 0.6 * radius_s)
        direction = rng.uniform(0, 2 * math.pi)
        hole_x = np.float32(centre_x + offset * math.cos(direction))
        hole_y = np.float32(centre_y + offset * math.sin(direction))
        hole_radius_s = np.float32(rng.uniform(0.008, 0.025))
        np.minimum(field, np.hypot(s_x - hole_x, s_y - hole_y) / hole_radius_s - 1.0, out=field)
    return field


def _smooth_noise(rng, s_x, s_y, *, feature_size_s: float, n_waves: int = 48) -> np.ndarray:
    """Smooth random field on the grid s_x (1, cols) x s_y (rows, 1), in [-1, 1], standard deviation ~0.4.

    A sum of plane waves with random directions, wavelengths around
    2 pi * `feature_size_s` and random phases (random Fourier features of a
    Gaussian covariance). Because cos(a + b) = cos a cos b - sin a sin b, the
    whole sum is one (rows, 2n) x (2n, cols) matrix product: fast, and no
    memory beyond the result, even for a 20 x 15 mm slide's mask grid.
    """
    wave_x, wave_y = rng.normal(0.0, 1.0 / feature_size_s, size=(2, n_waves))
    phase = rng.uniform(0.0, 2 * math.pi, size=n_waves)
    along_x = s_x.reshape(-1)[None, :] * wave_x[:, None] + phase[:, None]  # (n, cols)
    along_y = s_y.reshape(-1)[:, None] * wave_y[None, :]  # (rows, n)
    by_column = np.concatenate([np.cos(along_x), np.sin(along_x)]).astype(np.float32)
    by_row = np.concatenate([np.cos(along_y), -np.sin(along_y)], axis=1).astype(np.float32)
    noise = by_row @ by_column  # variance n_waves / 2
    noise *= np.float32(0.4 * math.sqrt(2.0 / n_waves))
    return np.clip(noise, -1.0, 1.0, out=noise)


# --------------------------------------------------------------------------- rendering


class _Renderer:
    """Renders any rectangle of the slide at any resolution, from the geometry alone."""

    def __init__(self, geometry: _SlideGeometry, *, seed: int, background_level: float, faint: bool):
        self.geometry = geometry
        self.seed = seed
        self.background_level = background_level
        self.stain_scale = _FAINT_STAIN_SCALE if faint else 1.0
        # Two texture channels: 0 = collagen fibres (streaky), 1 = fine mottling (chromatin, cytoplasm).
        rng = np.random.default_rng([seed, 303])
        size = _TEXTURE_SIZE_TEXELS
        fibres = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=(1.5, 7.0), mode="wrap")
        mottle = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma=1.0, mode="wrap")
        texture = np.stack([fibres / fibres.std(), mottle / mottle.std()], axis=-1)
        texture = (0.5 + 0.5 * np.tanh(texture)).astype(np.float32)  # squash into (0, 1)
        self.texture_mips = [texture]
        while self.texture_mips[-1].shape[0] > 1:
            finer = self.texture_mips[-1]
            half = finer.shape[0] // 2
            self.texture_mips.append(finer.reshape(half, 2, half, 2, 2).mean(axis=(1, 3)))

    def render(
        self, x0_px: int, y0_px: int, width_px: int, height_px: int, um_per_px: float, noise_key: tuple[int, ...]
    ) -> np.ndarray:
        """RGB uint8 (height_px, width_px, 3) of the rectangle whose top-left pixel is (x0_px, y0_px).

        Pixel coordinates are in a grid of `um_per_px`; pixel i covers
        [i * um_per_px, (i + 1) * um_per_px) um. `noise_key` (non-negative ints)
        seeds the per-pixel sensor noise, so each rectangle is reproducible.
        """
        x_um = ((np.arange(width_px) + x0_px + 0.5) * um_per_px).astype(np.float32)
        y_um = ((np.arange(height_px) + y0_px + 0.5) * um_per_px).astype(np.float32)
        rng = np.random.default_rng([self.seed, 404, *noise_key])
        sensor_noise = rng.integers(-2, 3, size=(height_px, width_px, 3), dtype=np.int8)

        geometry = self.geometry
        tissue = geometry.coverage(x_um, y_um, geometry.tissue_field, um_per_px)
        if not np.any(tissue):
            background = np.full((height_px, width_px, 3), self.background_level, dtype=np.float32)
            return np.clip(background + sensor_noise, 0, 255).astype(np.uint8)

        fibres, mottle = self._texture(x_um, y_um, um_per_px)
        # Stroma: eosin following the fibres, a trace of hematoxylin.
        hematoxylin = 0.05 + 0.06 * mottle
        eosin = 0.35 + 0.5 * fibres
        hematoxylin, eosin = _paint_nuclei(hematoxylin, eosin, _NORMAL_NUCLEI, x_um, y_um, um_per_px, mottle, self.seed)

        lesion = geometry.coverage(x_um, y_um, geometry.lesion_field, um_per_px)
        if np.any(lesion):
            # Lesion: lilac cytoplasm instead of stroma, crowded dark nuclei on top.
            lesion_hematoxylin, lesion_eosin = _paint_nuclei(
                0.3 + 0.1 * mottle, np.float32(0.3), _LESION_NUCLEI, x_um, y_um, um_per_px, mottle, self.seed
            )
            hematoxylin = hematoxylin + lesion * (lesion_hematoxylin - hematoxylin)
            eosin = eosin + lesion * (lesion_eosin - eosin)

        optical_density = hematoxylin[..., None] * (self.stain_scale * _HEMATOXYLIN_OD) + eosin[..., None] * (
            self.stain_scale * _EOSIN_OD
        )
        stained = self.background_level * np.exp(-optical_density)
        # Partly covered pixels at the outline mix tissue and glass light.
        image = self.background_level + np.asarray(tissue)[..., None] * (stained - self.background_level)
        return np.clip(image + sensor_noise, 0, 255).astype(np.uint8)

    def _texture(self, x_um: np.ndarray, y_um: np.ndarray, um_per_px: float) -> tuple[np.ndarray, np.ndarray]:
        """(fibres, mottle) in (0, 1), each (rows, cols), from the mip no finer than the pixels."""
        finest_allowed = math.floor(math.log2(max(um_per_px / _TEXTURE_UM_PER_TEXEL, 1.0)))
        mip = min(finest_allowed, len(self.texture_mips) - 1)
        texture = self.texture_mips[mip]
        texel_um = _TEXTURE_UM_PER_TEXEL * 2**mip
        size = texture.shape[0]
        cols = np.floor(x_um / texel_um).astype(np.int64) % size
        rows = np.floor(y_um / texel_um).astype(np.int64) % size
        # A flat `take` is several times faster than 2-D fancy indexing.
        sampled = texture.reshape(-1, 2).take(rows[:, None] * size + cols[None, :], axis=0)
        return sampled[..., 0], sampled[..., 1]


def _paint_nuclei(hematoxylin, eosin, kind: _NucleusKind, x_um, y_um, um_per_px: float, mottle, seed: int):
    """Blend one population of round nuclei over the given stain concentrations.

    Nuclei sit one per lattice cell (when present), anywhere in the cell, with a
    radius of at most half a cell, so a pixel can only be covered by the nuclei
    of the 2 x 2 cells nearest to it. Each nucleus is drawn with a linear ramp at
    its rim, as wide as a pixel (capped at the smallest radius): at coarse
    levels that keeps the average coverage right instead of aliasing.
    """
    cell = kind.cell_um
    col_first = np.floor(x_um / cell - 0.5).astype(np.int64)  # left cell of each pixel's 2x2
    row_first = np.floor(y_um / cell - 0.5).astype(np.int64)
    cell_cols = np.arange(col_first[0], col_first[-1] + 2)
    cell_rows = np.arange(row_first[0], row_first[-1] + 2)
    grid_cols, grid_rows = np.meshgrid(cell_cols, cell_rows)
    draws = [_cell_random(grid_cols, grid_rows, seed, kind.hash_stream * 8 + i) for i in range(4)]
    radius_min, radius_max = kind.radius_um
    radius = radius_min + (radius_max - radius_min) * draws[2]
    # The centre may sit anywhere that keeps the nucleus inside its cell.
    centre_x = (grid_cols + 0.5) * cell + (draws[0] - 0.5) * (cell - 2 * radius)
    centre_y = (grid_rows + 0.5) * cell + (draws[1] - 0.5) * (cell - 2 * radius)
    rim_um = float(np.clip(um_per_px, 0.5, radius_min))
    # Absent nuclei get a radius that no pixel's ramp reaches.
    radius = np.where(draws[3] < kind.presence, radius, -rim_um)
    # One row per cell: (centre x, centre y, radius), so each neighbour is a single `take`.
    nuclei = np.stack([centre_x, centre_y, radius], axis=-1).reshape(-1, 3).astype(np.float32)

    coverage = np.full((y_um.size, x_um.size), -np.inf, dtype=np.float32)
    for d_row in (0, 1):
        row_offsets = ((row_first - cell_rows[0] + d_row) * cell_cols.size)[:, None]
        for d_col in (0, 1):
            nucleus = nuclei.take(row_offsets + (col_first - cell_cols[0] + d_col)[None, :], axis=0)
            dx = x_um[None, :] - nucleus[..., 0]
            dy = y_um[:, None] - nucleus[..., 1]
            distance = np.sqrt(dx * dx + dy * dy)  # np.hypot is several times slower
            np.maximum(coverage, 0.5 + (nucleus[..., 2] - distance) / rim_um, out=coverage)
    # A ragged rim (+-0.4 um): the mottle texture shifts the edge. At coarse
    # levels the mottle mip is flat and this vanishes, as it should.
    coverage += (mottle - 0.5) * (0.8 / rim_um)
    np.clip(coverage, 0.0, 1.0, out=coverage)

    low, high = kind.hematoxylin
    nucleus_hematoxylin = low + (high - low) * mottle  # chromatin texture
    return (
        hematoxylin + coverage * (nucleus_hematoxylin - hematoxylin),
        eosin + coverage * (kind.eosin - eosin),
    )


def _cell_random(cols: np.ndarray, rows: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """Uniform [0, 1) per lattice cell, a pure function of (cell, seed, stream).

    A hash rather than a random generator, so that any window of the lattice,
    at any magnification and in any order, gets the same values.
    """
    with np.errstate(over="ignore"):
        key = (
            cols.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            ^ rows.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
            ^ np.uint64((seed * 0x165667B19E3779F9 + stream * 0x27D4EB2F165667C5) % 2**64)
        )
        # 64-bit finaliser (xor-shift-multiply rounds) to spread every input bit.
        key ^= key >> np.uint64(31)
        key *= np.uint64(0xBF58476D1CE4E5B9)
        key ^= key >> np.uint64(29)
        key *= np.uint64(0x94D049BB133111EB)
        key ^= key >> np.uint64(32)
    return (key >> np.uint64(40)).astype(np.float32) / np.float32(2**24)


# --------------------------------------------------------------------------- TIFF writing


def _write_aperio_tiff(
    slide_path: Path,
    renderer: _Renderer,
    *,
    level_sizes: list[tuple[int, int]],
    mpp: float,
    base_magnification: float,
    tile_size_px: int,
    jpeg_quality: int,
    write_mpp: bool,
    write_objective_power: bool,
    associated_images: bool,
    seed: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Write the Aperio-style TIFF; directory order as in the module docstring."""
    total_tiles = sum(math.ceil(w / tile_size_px) * math.ceil(h / tile_size_px) for w, h in level_sizes)
    tiles_written = 0

    def counted(tiles: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        nonlocal tiles_written
        for tile_pixels in tiles:
            yield tile_pixels
            tiles_written += 1
            if progress is not None:
                progress(tiles_written, total_tiles)

    width_px, height_px = level_sizes[0]
    tile = tile_size_px
    fields = [f"{width_px}x{height_px} [0,0 {width_px}x{height_px}] ({tile}x{tile}) JPEG/RGB Q={jpeg_quality}"]
    if write_objective_power:
        fields.append(f"AppMag = {base_magnification:g}")
    fields += ["ScanScope ID = XMAG-SYNTHETIC", f"Filename = {slide_path.stem}"]
    if write_mpp:
        fields.append(f"MPP = {mpp:g}")
    fields.append(f"SyntheticSeed = {seed}")
    properties = "|".join(fields[1:])
    level0_description = f"{_APERIO_HEADER}\r\n{fields[0]}|{properties}"

    # YCbCr JPEG without chroma subsampling (4:4:4). OpenSlide and cuCIM decode
    # it to identical pixels (both use libjpeg-turbo; they agree on 4:2:0 too).
    # Full-resolution chroma keeps small purple nuclei purple at every level and
    # halves the JPEG colour bleed at tissue edges, which differs between a
    # 20x level and a 40x level brought to the same scale; the price is ~1/3
    # larger files than 4:2:0.
    jpeg = dict(
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": jpeg_quality},
        subsampling=(1, 1),
        metadata=None,
        software=False,
    )
    # Classic TIFF offsets stop at 4 GiB; decide from the raw size, an upper bound of the JPEG size.
    bigtiff = width_px * height_px * 3 > 2**32 - 2**28
    thumbnail = _thumbnail(renderer, width_px, height_px, mpp) if associated_images else None
    with tifffile.TiffWriter(slide_path, bigtiff=bigtiff) as tiff:
        for level, (level_width, level_height) in enumerate(level_sizes):
            if level == 0:
                description = level0_description
            else:
                description = (
                    f"{_APERIO_HEADER}\r\n{width_px}x{height_px} [0,0 {width_px}x{height_px}] "
                    f"({tile}x{tile}) -> {level_width}x{level_height} JPEG/RGB Q={jpeg_quality}"
                )
            tiff.write(
                counted(
                    _level_tiles(renderer, level, level_width, level_height, tile, mpp * PYRAMID_DOWNSAMPLE**level)
                ),
                shape=(level_height, level_width, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                description=description,
                # Encoding a tile takes ~0.1 ms against ~5 ms to render it; tifffile's
                # own encoding threads would only buffer hundreds of tiles in memory.
                maxworkers=1,
                **jpeg,
            )
            if level == 0 and thumbnail is not None:
                thumb_height, thumb_width = thumbnail.shape[:2]
                tiff.write(
                    thumbnail,
                    description=(
                        f"{_APERIO_HEADER}\r\n{width_px}x{height_px} -> {thumb_width}x{thumb_height} - |{properties}"
                    ),
                    **jpeg,
                )
        if thumbnail is not None:
            label = _label_image(seed)
            tiff.write(
                label,
                photometric="rgb",
                compression="lzw",
                description=f"{_APERIO_HEADER}\r\nlabel {label.shape[1]}x{label.shape[0]}",
                subfiletype=1,
                metadata=None,
                software=False,
            )
            macro = _macro_image(label, thumbnail)
            tiff.write(
                macro,
                description=f"{_APERIO_HEADER}\r\nmacro {macro.shape[1]}x{macro.shape[0]}",
                subfiletype=9,
                **jpeg,
            )


def _level_tiles(
    renderer: _Renderer, level: int, width_px: int, height_px: int, tile: int, um_per_px: float
) -> Iterator[np.ndarray]:
    """The tiles of one level in TIFF order (row-major), rendered a few at a time in threads.

    Edge tiles are rendered whole; the part beyond the level's size is stored
    but never shown by readers.
    """

    def render_tile(row_col: tuple[int, int]) -> np.ndarray:
        tile_row, tile_col = row_col
        noise_key = (1 + level, tile_row, tile_col)
        return renderer.render(tile_col * tile, tile_row * tile, tile, tile, um_per_px, noise_key=noise_key)

    positions = ((row, col) for row in range(math.ceil(height_px / tile)) for col in range(math.ceil(width_px / tile)))
    return _ordered_map(render_tile, positions, threads=_RENDER_THREADS)


def _ordered_map(func: Callable, items: Iterable, *, threads: int) -> Iterator:
    """Like `map`, in threads, keeping at most 2 * threads results in flight (bounded memory)."""
    with ThreadPoolExecutor(threads) as pool:
        in_flight: deque = deque()
        for item in items:
            in_flight.append(pool.submit(func, item))
            if len(in_flight) >= 2 * threads:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def _thumbnail(renderer: _Renderer, width_px: int, height_px: int, mpp: float) -> np.ndarray:
    """The whole slide with its longer side at most 1024 px, rendered directly at that scale."""
    downsample = max(1.0, max(width_px, height_px) / _THUMBNAIL_MAX_SIDE_PX)
    thumb_width = max(1, round(width_px / downsample))
    thumb_height = max(1, round(height_px / downsample))
    # In bands of rows: one render call allocates per-nucleus arrays for every
    # lattice cell it covers, which for the whole slide would be hundreds of MB.
    # Noise keys (0, row) stay clear of the tiles' (1 + level, row, column).
    band_height = 64
    bands = [
        renderer.render(0, top, thumb_width, min(band_height, thumb_height - top), mpp * downsample, noise_key=(0, top))
        for top in range(0, thumb_height, band_height)
    ]
    return np.concatenate(bands)


def _label_image(seed: int) -> np.ndarray:
    """A white paper label with a 2D-barcode-like block pattern and 'text' bars, varied by seed."""
    width, height = _LABEL_SIZE_PX
    rng = np.random.default_rng([seed, 505])
    label = np.full((height, width), 250, dtype=np.uint8)
    modules = rng.random((16, 16)) < 0.5
    modules[:, 0] = modules[-1, :] = True  # the solid "L" finder edge of a Data Matrix
    label[30:222, 30:222] = np.where(np.kron(modules, np.ones((12, 12), dtype=bool)), 20, 250)
    for line in range(4):
        top = 250 + line * 34
        length = int(rng.integers(150, 340))
        label[top : top + 18, 30 : 30 + length] = 40
    return np.repeat(label[..., None], 3, axis=-1)


def _macro_image(label: np.ndarray, thumbnail: np.ndarray) -> np.ndarray:
    """An overview photo of the glass slide: label at the left end, tissue area to its right."""
    width, height = _MACRO_SIZE_PX
    macro = np.full((height, width, 3), 226, dtype=np.uint8)  # glass under the macro camera
    label_side = height - 40
    macro[20 : 20 + label_side, 20 : 20 + label_side] = np.asarray(
        Image.fromarray(label).resize((label_side, label_side), Image.Resampling.BILINEAR)
    )
    area_left, area_width, area_height = label_side + 60, width - label_side - 80, height - 40
    scale = min(area_width / thumbnail.shape[1], area_height / thumbnail.shape[0])
    thumb_width, thumb_height = max(1, int(thumbnail.shape[1] * scale)), max(1, int(thumbnail.shape[0] * scale))
    resized = np.asarray(Image.fromarray(thumbnail).resize((thumb_width, thumb_height), Image.Resampling.BILINEAR))
    top = (height - thumb_height) // 2
    left = area_left + (area_width - thumb_width) // 2
    macro[top : top + thumb_height, left : left + thumb_width] = resized
    return macro
