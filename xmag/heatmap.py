"""Pictures of a slide: attention heatmaps over its thumbnail, their GeoJSON, and the planned tile grid."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Anchor colours of a dark-to-bright ramp (close to matplotlib's "inferno"),
# interpolated linearly; kept here so the core needs no plotting library.
_RAMP_POSITIONS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_RAMP_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """Map values in 0..1 to RGB uint8, dark (low) to bright yellow (high)."""
    values = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    channels = [np.interp(values, _RAMP_POSITIONS, _RAMP_COLOURS[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def render_attention_heatmap(
    thumbnail_rgb: np.ndarray,
    level0_px_per_thumbnail_px: float,
    level0_coords: np.ndarray,
    tile_size_level0_px: int,
    attention: np.ndarray,
    opacity: float = 0.6,
) -> Image.Image:
    """Overlay attention on the thumbnail: each tile filled with its weight's colour.

    Weights are scaled min-to-max over the slide, so the brightest tile is the
    one the head attended to most; tiles outside the grid keep the plain
    thumbnail.
    """
    level0_coords = np.asarray(level0_coords).reshape(-1, 2)
    attention = np.asarray(attention, dtype=np.float64).reshape(-1)
    if len(attention) != len(level0_coords):
        raise ValueError(f"{len(attention)} attention weights for {len(level0_coords)} tiles")
    canvas = thumbnail_rgb.astype(np.float32).copy()
    if len(attention) == 0:
        return Image.fromarray(thumbnail_rgb)
    span = attention.max() - attention.min()
    scaled = (attention - attention.min()) / span if span > 0 else np.ones_like(attention)
    colours = colour_ramp(scaled).astype(np.float32)
    height, width = canvas.shape[:2]
    for (x, y), colour in zip(level0_coords, colours, strict=False):
        left = int(round(x / level0_px_per_thumbnail_px))
        top = int(round(y / level0_px_per_thumbnail_px))
        right = min(width, int(round((x + tile_size_level0_px) / level0_px_per_thumbnail_px)))
        bottom = min(height, int(round((y + tile_size_level0_px) / level0_px_per_thumbnail_px)))
        canvas[top:bottom, left:right] = (1 - opacity) * canvas[top:bottom, left:right] + opacity * colour
    return Image.fromarray(np.rint(canvas).astype(np.uint8))


def attention_geojson(level0_coords: np.ndarray, tile_size_level0_px: int, attention: np.ndarray, task: str) -> dict:
    """Tiles as a GeoJSON FeatureCollection that QuPath imports (File > Import objects, or drag and drop).

    Each tile is a square detection in level-0 pixel coordinates (QuPath's image
    space) with two measurements: `attention` (the weight; they sum to 1 over the
    slide) and `attention_scaled` (min-max scaled to 0..1 over the slide), which
    QuPath's measurement maps can colour.
    """
    level0_coords = np.asarray(level0_coords).reshape(-1, 2)
    attention = np.asarray(attention, dtype=np.float64).reshape(-1)
    if len(attention) != len(level0_coords):
        raise ValueError(f"{len(attention)} attention weights for {len(level0_coords)} tiles")
    span = float(attention.max() - attention.min()) if len(attention) else 0.0
    scaled = (attention - attention.min()) / span if span > 0 else np.ones_like(attention)
    size = int(tile_size_level0_px)
    features = []
    for index, ((x, y), weight, weight_scaled) in enumerate(
        zip(level0_coords.tolist(), attention, scaled, strict=False)
    ):
        ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
        features.append(
            {
                "type": "Feature",
                "id": f"{task}-tile-{index}",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "name": f"{task} tile {index}",
                    "measurements": {"attention": float(weight), "attention_scaled": float(weight_scaled)},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def render_tile_grid(
    thumbnail_rgb: np.ndarray,
    tissue_mask: np.ndarray,
    level0_px_per_mask_px: float,
    level0_coords: np.ndarray,
    tile_size_level0_px: int,
) -> Image.Image:
    """The thumbnail with the tissue mask tinted green and each planned tile outlined in blue (`xmag tiles --preview`)."""
    canvas = thumbnail_rgb.copy()
    canvas[tissue_mask] = (0.6 * canvas[tissue_mask] + 0.4 * np.array([0, 160, 0])).astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    scale = level0_px_per_mask_px
    for x, y in np.asarray(level0_coords).reshape(-1, 2):
        draw.rectangle(
            [x / scale, y / scale, (x + tile_size_level0_px) / scale - 1, (y + tile_size_level0_px) / scale - 1],
            outline=(0, 0, 255),
        )
    return image
