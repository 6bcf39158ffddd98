"""Tile grids at physical resolutions, read from the best pyramid level."""

from __future__ import annotations

import numpy as np
import pytest

from xmag.slide.reader import open_slide, resolve_mpp
from xmag.slide.tiling import XMAG_5X, TilingSpec, iter_tile_batches, plan_tile_grid, resize_tile
from xmag.slide.tissue import tissue_mask_for_slide
from xmag.synthetic.slide import make_synthetic_slide

TWENTY_X_224 = TilingSpec(target_mpp=0.5, tile_size_px=224)


def _grid(slide, spec, backend="openslide"):
    with open_slide(slide.path, backend=backend) as reader:
        mpp = resolve_mpp(reader.info)
        tissue, _ = tissue_mask_for_slide(reader, mpp)
        return plan_tile_grid(reader.info, mpp, tissue, spec), reader.info


def test_20x_grid_has_16_times_the_tiles_of_the_5x_grid(slide_20x):
    grid_5x, _ = _grid(slide_20x, XMAG_5X)
    grid_20x, _ = _grid(slide_20x, TWENTY_X_224)
    assert len(grid_5x) > 20
    assert len(grid_20x) / len(grid_5x) == pytest.approx(16, rel=0.05)


def test_20x_and_40x_scans_give_the_same_5x_grid(slide_20x, slide_40x):
    grid_20x, _ = _grid(slide_20x, XMAG_5X)
    grid_40x, _ = _grid(slide_40x, XMAG_5X)
    assert grid_20x.tile_size_level0_px == 896 and grid_40x.tile_size_level0_px == 1_792
    microns_20x = {tuple(xy) for xy in (grid_20x.level0_coords * 0.5).tolist()}
    microns_40x = {tuple(xy) for xy in (grid_40x.level0_coords * 0.25).tolist()}
    # Both grids sit on the same physical lattice; only tiles whose true tissue fraction is
    # at the 0.5 cut-off may differ, where JPEG artefacts at the tissue edge tip the balance.
    truth = slide_20x.read_tissue_mask()
    tile_um = 448
    differing = microns_20x ^ microns_40x
    for x_um, y_um in differing:
        cell = truth[int(y_um / slide_20x.mask_um_per_px) :][: int(tile_um / slide_20x.mask_um_per_px)]
        cell = cell[:, int(x_um / slide_20x.mask_um_per_px) :][:, : int(tile_um / slide_20x.mask_um_per_px)]
        assert abs(cell.mean() - XMAG_5X.min_tissue_fraction) < 0.05, (x_um, y_um, cell.mean())
    assert len(differing) <= max(1, 0.02 * len(microns_20x))


def test_read_plan_uses_the_best_level(slide_20x, slide_40x, tmp_path):
    grid, info = _grid(slide_20x, XMAG_5X)
    assert (grid.read_level, grid.read_size_px) == (1, 224)  # 5x is stored: no resize
    grid, info = _grid(slide_40x, XMAG_5X)
    assert (grid.read_level, grid.read_size_px) == (1, 448)  # 10x stored, resized to 5x
    single = make_synthetic_slide(tmp_path / "single.svs", width_px=6_000, height_px=4_000, levels=1, seed=3)
    grid, info = _grid(single, XMAG_5X)
    assert info.level_count == 1
    assert (grid.read_level, grid.read_size_px) == (0, 896)
    assert len(grid) > 0


def test_grid_is_inside_the_slide_and_on_tissue(slide_20x):
    grid, info = _grid(slide_20x, XMAG_5X)
    coords = grid.level0_coords
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    assert (coords >= 0).all()
    assert (coords[:, 0] + grid.tile_size_level0_px <= info.width_px).all()
    assert (coords[:, 1] + grid.tile_size_level0_px <= info.height_px).all()
    assert (coords % grid.tile_size_level0_px == 0).all()
    assert len({tuple(xy) for xy in coords.tolist()}) == len(coords)


def test_batches_are_uint8_nhwc_in_grid_order(slide_40x, backend):
    grid, _ = _grid(slide_40x, XMAG_5X, backend)
    with open_slide(slide_40x.path, backend=backend) as reader:
        batches = list(iter_tile_batches(reader, grid, batch_size=7))
        tiles = np.concatenate([tiles for tiles, _ in batches])
        coords = np.concatenate([coords for _, coords in batches])
        np.testing.assert_array_equal(coords, grid.level0_coords)
        assert tiles.dtype == np.uint8 and tiles.shape == (len(grid), 224, 224, 3)
        for index in (0, len(grid) // 2, len(grid) - 1):
            x, y = grid.level0_coords[index]
            region = reader.read_region((int(x), int(y)), grid.read_level, (grid.read_size_px, grid.read_size_px))
            np.testing.assert_array_equal(tiles[index], resize_tile(region, 224))


def test_same_glass_gives_similar_5x_pixels_at_20x_and_40x(slide_20x, slide_40x):
    grid_20x, _ = _grid(slide_20x, XMAG_5X)
    with open_slide(slide_20x.path) as reader_20x, open_slide(slide_40x.path) as reader_40x:
        grid_40x, _ = _grid(slide_40x, XMAG_5X)
        tiles_20x = next(iter_tile_batches(reader_20x, grid_20x, batch_size=8))[0]
        tiles_40x = next(iter_tile_batches(reader_40x, grid_40x, batch_size=8))[0]
    difference = np.abs(tiles_20x.astype(np.float32) - tiles_40x.astype(np.float32)).mean()
    spread = np.abs(tiles_20x.astype(np.float32) - tiles_20x.mean()).mean()
    assert difference < 0.5 * spread


def test_spec_validation():
    with pytest.raises(ValueError):
        TilingSpec(target_mpp=0, tile_size_px=224)
    with pytest.raises(ValueError):
        TilingSpec(target_mpp=2.0, tile_size_px=0)
    with pytest.raises(ValueError):
        TilingSpec(target_mpp=2.0, tile_size_px=224, min_tissue_fraction=1.5)
