"""Tiling a slide at a physical resolution.

A grid is planned in level-0 pixels from the slide's MPP, the target MPP and
the tile size, keeping tiles that are mostly tissue. Tiles are then read from
the coarsest pyramid level that is at least as fine as the target and resized
to the tile size, so the same glass gives the same grid whether it was scanned
at 20x or 40x, and whether or not the target resolution is a stored level.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from xmag.slide.reader import SlideInfo, SlideReader, best_level_for_downsample
from xmag.slide.tissue import TissueMask


@dataclass(frozen=True)
class TilingSpec:
    """Where and how big tiles are, in physical terms."""

    target_mpp: float  # microns per pixel of the tiles the encoder sees
    tile_size_px: int  # tile side at target_mpp
    # A tile is kept when at least this fraction of its area is tissue. One half
    # keeps the grid an unbiased cover of the tissue at any tile size.
    min_tissue_fraction: float = 0.5
    # The side the encoder takes, when it differs from tile_size_px (UNI2-h as the paper ran it: 256 px tiles
    # shown to a 224 px model). Tiles are resized once, from the pyramid level read, straight to this size.
    encoder_input_px: int | None = None

    @property
    def output_px(self) -> int:
        """Side of the tiles handed to the encoder."""
        return self.encoder_input_px or self.tile_size_px

    def __post_init__(self):
        if not self.target_mpp > 0:
            raise ValueError(f"target_mpp must be positive, got {self.target_mpp}")
        if self.tile_size_px < 1:
            raise ValueError(f"tile_size_px must be at least 1, got {self.tile_size_px}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError(f"min_tissue_fraction must be within 0..1, got {self.min_tissue_fraction}")
        if self.encoder_input_px is not None and self.encoder_input_px < 1:
            raise ValueError(f"encoder_input_px must be at least 1, got {self.encoder_input_px}")


# The filter every tile is resized with, from the pyramid level read to the encoder's size; feature files record it.
RESIZE_FILTER = "bilinear"
_RESAMPLING = {"bilinear": Image.Resampling.BILINEAR}

XMAG_5X = TilingSpec(target_mpp=2.0, tile_size_px=224)  # the XMAG student: 5x, 224 px (448 µm)
UNI2H_20X = TilingSpec(target_mpp=0.5, tile_size_px=256, encoder_input_px=224)  # UNI2-h as the paper ran it
PHIKON_20X = TilingSpec(target_mpp=0.5, tile_size_px=256, encoder_input_px=224)  # Phikon as the paper ran it


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one slide: top-left corners in level-0 pixels, and how to read them."""

    level0_coords: np.ndarray  # (N, 2) int64, (x, y) of each tile's top-left corner, row-major order
    tile_size_level0_px: int  # tile side in level-0 pixels
    spec: TilingSpec
    slide_mpp: float
    read_level: int  # pyramid level the pixels come from
    read_size_px: int  # tile side at read_level, resized to spec.output_px
    grid_shape: tuple[int, int]  # (columns, rows) of the full grid before tissue selection

    def __len__(self) -> int:
        return len(self.level0_coords)


def plan_tile_grid(info: SlideInfo, slide_mpp: float, tissue: TissueMask, spec: TilingSpec) -> TileGrid:
    """All non-overlapping tiles that lie fully inside the slide and are mostly tissue."""
    tile_size_level0_px = max(1, int(round(spec.tile_size_px * spec.target_mpp / slide_mpp)))
    columns = info.width_px // tile_size_level0_px
    rows = info.height_px // tile_size_level0_px
    tissue_fraction = _tile_tissue_fractions(tissue, tile_size_level0_px, columns, rows)
    keep_rows, keep_columns = np.nonzero(tissue_fraction >= max(spec.min_tissue_fraction, 1e-9))
    level0_coords = np.stack([keep_columns, keep_rows], axis=1).astype(np.int64) * tile_size_level0_px

    target_downsample = spec.target_mpp / slide_mpp
    read_level = best_level_for_downsample(info, target_downsample)
    read_size_px = max(1, int(round(tile_size_level0_px / info.level_downsamples[read_level])))
    return TileGrid(
        level0_coords=level0_coords.reshape(-1, 2),
        tile_size_level0_px=tile_size_level0_px,
        spec=spec,
        slide_mpp=slide_mpp,
        read_level=read_level,
        read_size_px=read_size_px,
        grid_shape=(int(columns), int(rows)),
    )


def tile_grid_at(info: SlideInfo, slide_mpp: float, level0_coords: np.ndarray, spec: TilingSpec) -> TileGrid:
    """Tiles of `spec` at the given level-0 top-left corners, read as `plan_tile_grid`'s are (level, size, resize).

    For tiles chosen elsewhere (a labelled tile list, a linear probe's patches)
    that must look exactly like the tiles serving reads. The corners are not
    checked: a tile reaching past the slide's edge reads white there, as every
    read does.
    """
    tile_size_level0_px = max(1, int(round(spec.tile_size_px * spec.target_mpp / slide_mpp)))
    read_level = best_level_for_downsample(info, spec.target_mpp / slide_mpp)
    return TileGrid(
        level0_coords=np.asarray(level0_coords, dtype=np.int64).reshape(-1, 2),
        tile_size_level0_px=tile_size_level0_px,
        spec=spec,
        slide_mpp=slide_mpp,
        read_level=read_level,
        read_size_px=max(1, int(round(tile_size_level0_px / info.level_downsamples[read_level]))),
        grid_shape=(info.width_px // tile_size_level0_px, info.height_px // tile_size_level0_px),
    )


def _tile_tissue_fractions(tissue: TissueMask, tile_size_level0_px: int, columns: int, rows: int) -> np.ndarray:
    """Fraction of tissue under each grid cell, shape (rows, columns), from a summed-area table of the mask."""
    if columns == 0 or rows == 0:
        return np.zeros((rows, columns))
    mask = tissue.mask.astype(np.float64)
    summed = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1))
    summed[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    # Cell edges in mask pixels, rounded: each edge is shared by its two neighbours, so no pixel is counted twice.
    scale = tile_size_level0_px / tissue.level0_px_per_mask_px
    x_edges = np.clip(np.rint(np.arange(columns + 1) * scale).astype(int), 0, mask.shape[1])
    y_edges = np.clip(np.rint(np.arange(rows + 1) * scale).astype(int), 0, mask.shape[0])
    tissue_px = (
        summed[np.ix_(y_edges[1:], x_edges[1:])]
        - summed[np.ix_(y_edges[:-1], x_edges[1:])]
        - summed[np.ix_(y_edges[1:], x_edges[:-1])]
        + summed[np.ix_(y_edges[:-1], x_edges[:-1])]
    )
    cell_px = np.outer(np.diff(y_edges), np.diff(x_edges))
    return np.divide(tissue_px, cell_px, out=np.zeros_like(tissue_px), where=cell_px > 0)


def iter_tile_batches(reader: SlideReader, grid: TileGrid, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tiles, level0_coords): uint8 RGB NHWC batches at the encoder's input size, in grid order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    tile_size_px = grid.spec.output_px
    regions = reader.read_regions(grid.level0_coords, grid.read_level, grid.read_size_px, batch_size)
    for start, batch in zip(range(0, len(grid), batch_size), regions, strict=False):
        coords = grid.level0_coords[start : start + len(batch)]
        if grid.read_size_px != tile_size_px:
            batch = np.stack([resize_tile(region, tile_size_px) for region in batch])
        yield batch, coords


def resize_tile(region: np.ndarray, tile_size_px: int) -> np.ndarray:
    """Square RGB uint8 region to tile_size_px; antialiased when shrinking (PIL's filters widen their support)."""
    return np.asarray(Image.fromarray(region).resize((tile_size_px, tile_size_px), _RESAMPLING[RESIZE_FILTER]))
