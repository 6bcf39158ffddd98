"""The rendering of a synthetic slide as H&E: stain vectors, nuclei, textures."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from xmag.synthetic.scene import SlideGeometry

BACKGROUND_LEVELS = {"white": 242.0, "grey": 208.0}

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


class Renderer:
    """Renders any rectangle of the slide at any resolution, from the geometry alone."""

    def __init__(self, geometry: SlideGeometry, *, seed: int, background_level: float, faint: bool):
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
