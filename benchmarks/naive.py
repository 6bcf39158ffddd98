"""The naive reference pipeline: what typical research code does.

OpenSlide `read_region` per tile, each converted and resized with PIL on the
calling thread; torch fp32 in eager mode; one batch after another with no
overlap between reading and encoding. Tissue detection and the tile grid are
ours, so the comparison isolates reading and encoding.
"""

from __future__ import annotations

import time

import numpy as np
import openslide
from PIL import Image

from xmag.slide.reader import open_slide, resolve_mpp
from xmag.slide.tiling import TilingSpec, plan_tile_grid
from xmag.slide.tissue import tissue_mask_for_slide


def naive_classify(slide_path: str, encoder, heads, spec: TilingSpec, batch_size: int, max_tiles: int | None) -> dict:
    """Classify one slide the naive way; returns tile counts and stage timings like the pipeline's."""
    timings = {}
    started = time.perf_counter()
    with open_slide(slide_path) as reader:
        mpp = resolve_mpp(reader.info, None, slide_path)
        timings["open"] = time.perf_counter() - started
        started = time.perf_counter()
        tissue, _ = tissue_mask_for_slide(reader, mpp)
        grid = plan_tile_grid(reader.info, mpp, tissue, spec)
        timings["tissue"] = time.perf_counter() - started
    coords = grid.level0_coords[:max_tiles] if max_tiles else grid.level0_coords
    slide = openslide.OpenSlide(slide_path)
    read_s = encode_s = 0.0
    features = []
    try:
        for start in range(0, len(coords), batch_size):
            started = time.perf_counter()
            tiles = np.stack(
                [
                    np.asarray(
                        slide.read_region((int(x), int(y)), grid.read_level, (grid.read_size_px, grid.read_size_px))
                        .convert("RGB")
                        .resize((spec.output_px, spec.output_px), Image.Resampling.BILINEAR)
                    )
                    for x, y in coords[start : start + batch_size]
                ]
            )
            read_s += time.perf_counter() - started
            started = time.perf_counter()
            features.append(encoder.encode(tiles))
            encode_s += time.perf_counter() - started
    finally:
        slide.close()
    timings["read"], timings["encode"] = read_s, encode_s
    started = time.perf_counter()
    heads.predict(np.concatenate(features))
    timings["heads"] = time.perf_counter() - started
    return {"tile_count": len(grid), "tiles_encoded": len(coords), "timings_s": timings}
