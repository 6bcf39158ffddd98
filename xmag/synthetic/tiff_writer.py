"""The Aperio-style pyramidal JPEG TIFF writer of synthetic slides.

TIFF directory layout, as in a real Aperio SVS:

    0           level 0, tiled JPEG, ImageDescription "Aperio Image Library ...|AppMag = ..|MPP = .."
    1           thumbnail, stripped JPEG (OpenSlide names the second directory "thumbnail")
    2 .. L      pyramid levels 1 .. L-1, tiled JPEG, each 4x smaller than the one before
    L+1         label, stripped LZW, ImageDescription line 2 starts with "label"
    L+2         macro, stripped JPEG, ImageDescription line 2 starts with "macro"
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from xmag.synthetic.stain import Renderer

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


def pyramid_level_sizes(width_px: int, height_px: int, tile_size_px: int, levels: int | None) -> list[tuple[int, int]]:
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


def write_aperio_tiff(
    slide_path: Path,
    renderer: Renderer,
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
    renderer: Renderer, level: int, width_px: int, height_px: int, tile: int, um_per_px: float
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


def _thumbnail(renderer: Renderer, width_px: int, height_px: int, mpp: float) -> np.ndarray:
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
