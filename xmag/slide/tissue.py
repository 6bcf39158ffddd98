"""Tissue detection on a low-resolution thumbnail.

The method follows CLAM and TRIDENT's classical path (HSV saturation, Otsu,
morphology) with three changes that make it hold on slides those defaults
get wrong:

- The Otsu threshold is clamped to a fixed band of saturation. Otsu always
  splits a histogram in two, so on a blank slide it would call scanner noise
  tissue, and on a slide that is all tissue it would cut the tissue in half;
  the band keeps it between "certainly glass" and "certainly stained".
- Hysteresis: pixels above the threshold seed tissue, and connected pixels
  down to the band's floor join them, so faint tissue is kept whole without
  letting isolated noise in.
- Saturation rather than brightness, so grey scanner backgrounds (bright or
  not, but never coloured) are background.

All sizes are physical (µm, mm²) so a 20x and a 40x scan of the same glass
give the same mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from xmag.slide.reader import SlideReader, best_level_for_downsample

# Saturation (0..1) of clean glass after JPEG is below ~0.04; eosin-stained
# stroma is above ~0.2; faint, pale tissue sits near 0.08-0.15. The ceiling is
# kept below faint tissue so that a faint piece still seeds when strongly
# stained tissue on the same slide pulls Otsu's threshold up (to ~0.18).
SATURATION_FLOOR = 0.06
SATURATION_CEILING = 0.10
DEFAULT_THUMBNAIL_UM_PER_PX = 8.0


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask and how its pixels map to the slide."""

    mask: np.ndarray  # (height, width) bool, True = tissue
    um_per_px: float  # microns per mask pixel
    level0_px_per_mask_px: float  # level-0 pixels per mask pixel, on each axis

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def tissue_area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.um_per_px / 1000.0) ** 2


def read_thumbnail(reader: SlideReader, slide_mpp: float, um_per_px: float = DEFAULT_THUMBNAIL_UM_PER_PX) -> np.ndarray:
    """The whole slide as RGB uint8 at `um_per_px`, read from the best level in horizontal strips.

    Strips keep memory bounded on single-level slides, where the best level is
    level 0 (a 40,000 x 30,000 scan would otherwise need 3.6 GB at once).
    """
    info = reader.info
    downsample = um_per_px / slide_mpp
    level = best_level_for_downsample(info, downsample)
    level_width, level_height = info.level_dimensions[level]
    level_downsample = info.level_downsamples[level]
    scale = downsample / level_downsample  # level pixels per thumbnail pixel
    out_width = max(1, int(round(info.width_px / downsample)))
    out_height = max(1, int(round(info.height_px / downsample)))
    rows_per_strip = max(1, int(16_000_000 // max(1.0, level_width * scale)))
    strips = []
    for out_row in range(0, out_height, rows_per_strip):
        out_rows = min(rows_per_strip, out_height - out_row)
        source_top = out_row * scale
        source_bottom = min(level_height, (out_row + out_rows) * scale)
        # Read whole rows with a one-pixel margin, then let PIL resample the exact float box.
        read_top = max(0, int(math.floor(source_top)) - 1)
        read_bottom = min(level_height, int(math.ceil(source_bottom)) + 1)
        strip = reader.read_region(
            (0, int(round(read_top * level_downsample))), level, (level_width, read_bottom - read_top)
        )
        box = (0.0, source_top - read_top, min(level_width, out_width * scale), source_bottom - read_top)
        strips.append(np.asarray(Image.fromarray(strip).resize((out_width, out_rows), Image.Resampling.BOX, box=box)))
    return np.concatenate(strips, axis=0)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in 0..1: (max - min) / max, 0 on black."""
    rgb = rgb.astype(np.float32)
    channel_max = rgb.max(axis=2)
    channel_min = rgb.min(axis=2)
    return np.where(channel_max > 0, (channel_max - channel_min) / np.maximum(channel_max, 1.0), 0.0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in 0..1: values above it form the upper class.

    Returns the upper edge of the last bin of the lower class, the split that
    maximises the between-class variance.
    """
    histogram, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(histogram)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(histogram * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between_variance = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between_variance)) + 1])


def detect_tissue(
    thumbnail_rgb: np.ndarray,
    um_per_px: float,
    *,
    min_tissue_area_mm2: float = 0.02,
    max_hole_area_mm2: float = 0.05,
    closing_radius_um: float = 24.0,
) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail whose pixels are `um_per_px` microns wide.

    Pieces smaller than `min_tissue_area_mm2` (dust, debris) are dropped;
    holes smaller than `max_hole_area_mm2` inside tissue (fat, tears) are filled.
    """
    if thumbnail_rgb.ndim != 3 or thumbnail_rgb.shape[2] != 3 or thumbnail_rgb.size == 0:
        raise ValueError(f"expected an RGB image of shape (height, width, 3), got {thumbnail_rgb.shape}")
    saturation_u8 = np.rint(saturation(thumbnail_rgb) * 255).astype(np.uint8)
    # A 5-pixel median removes JPEG speckle and isolated nuclei-sized noise at thumbnail scale.
    smoothed = np.asarray(Image.fromarray(saturation_u8).filter(ImageFilter.MedianFilter(5)), dtype=np.float32) / 255
    threshold = min(max(otsu_threshold(smoothed), SATURATION_FLOOR), SATURATION_CEILING)
    seeds = smoothed > threshold
    candidates = smoothed > SATURATION_FLOOR
    labels, _ = ndimage.label(candidates)
    seeded_labels = np.unique(labels[seeds])
    mask = np.isin(labels, seeded_labels[seeded_labels > 0])

    pixel_area_mm2 = (um_per_px / 1000.0) ** 2
    radius_px = max(1, int(round(closing_radius_um / um_per_px)))
    disk = _disk(radius_px)
    mask = ndimage.binary_closing(np.pad(mask, radius_px), structure=disk)[radius_px:-radius_px, radius_px:-radius_px]
    mask = _fill_small_holes(mask, max_hole_px=max_hole_area_mm2 / pixel_area_mm2)
    return _drop_small_objects(mask, min_object_px=min_tissue_area_mm2 / pixel_area_mm2)


def tissue_mask_for_slide(
    reader: SlideReader, slide_mpp: float, um_per_px: float = DEFAULT_THUMBNAIL_UM_PER_PX
) -> tuple[TissueMask, np.ndarray]:
    """Read the thumbnail and detect tissue on it; returns the mask and the thumbnail."""
    thumbnail = read_thumbnail(reader, slide_mpp, um_per_px)
    mask = detect_tissue(thumbnail, um_per_px)
    return TissueMask(mask=mask, um_per_px=um_per_px, level0_px_per_mask_px=um_per_px / slide_mpp), thumbnail


def _disk(radius_px: int) -> np.ndarray:
    offsets = np.arange(-radius_px, radius_px + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius_px**2


def _fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    holes = ndimage.binary_fill_holes(mask) & ~mask
    labels, count = ndimage.label(holes)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    small = sizes <= max_hole_px
    small[0] = False
    return mask | small[labels]


def _drop_small_objects(mask: np.ndarray, min_object_px: float) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_object_px
    keep[0] = False
    return keep[labels]
