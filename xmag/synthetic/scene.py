"""The geometry of a synthetic slide: where tissue and lesions are, and the ground-truth masks.

Defined in physical space (micrometres) on the mask grid, whatever the slide's magnification.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# Ground-truth masks are stored at this fixed resolution whatever the slide's
# magnification, so masks of a 20x and a 40x slide of the same tissue can be compared.
MASK_UM_PER_PX = 8.0


class SlideGeometry:
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
