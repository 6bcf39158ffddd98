"""OpenSlide backend: the default reader, for every format OpenSlide knows."""

from __future__ import annotations

import numpy as np
import openslide
from openslide.lowlevel import OpenSlideError, OpenSlideUnsupportedFormatError

from xmag.errors import CorruptSlideError, NotASlideError
from xmag.slide.reader import SlideInfo, SlideReader


def _rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide marks pixels outside the scanned area transparent; show them as white glass."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    alpha_fraction = alpha.astype(np.float32) / 255.0
    blended = rgb.astype(np.float32) * alpha_fraction + 255.0 * (1.0 - alpha_fraction)
    return np.rint(blended).astype(np.uint8)


def _float_property(properties, key: str) -> float | None:
    try:
        value = float(properties[key])
    except (KeyError, ValueError):
        return None
    return value if value > 0 else None


class OpenSlideReader(SlideReader):
    """Reads slides through OpenSlide (Aperio, Hamamatsu, Leica, MIRAX, generic tiled TIFF, ...)."""

    backend_name = "openslide"

    def __init__(self, path: str, num_workers: int = 2):
        super().__init__(path, num_workers)
        vendor = openslide.OpenSlide.detect_format(path)
        if vendor is None:
            raise NotASlideError(
                f"{path} is not a whole-slide image OpenSlide can read (supported: Aperio .svs, generic tiled "
                "TIFF, Hamamatsu, Leica, MIRAX, Philips, Sakura, Trestle, Ventana, Zeiss, DICOM).",
                path,
            )
        try:
            self._slide = openslide.OpenSlide(path)
            # Decode the smallest level's first tile now, so that a truncated file
            # fails here with a clear message rather than halfway through tiling.
            self._slide.read_region((0, 0), self._slide.level_count - 1, (1, 1))
        except OpenSlideUnsupportedFormatError as error:
            raise NotASlideError(f"{path} is not a supported slide format: {error}", path) from error
        except OpenSlideError as error:
            raise CorruptSlideError(
                f"{path} looks like a {vendor} slide but cannot be decoded ({error}). "
                "The file is probably truncated or damaged; copy it again from the scanner.",
                path,
            ) from error
        properties = self._slide.properties
        self._info = SlideInfo(
            backend=self.backend_name,
            vendor=vendor,
            level_dimensions=tuple((int(width), int(height)) for width, height in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp=_float_property(properties, openslide.PROPERTY_NAME_MPP_X),
            objective_power=_float_property(properties, openslide.PROPERTY_NAME_OBJECTIVE_POWER),
            associated_images=tuple(sorted(self._slide.associated_images.keys())),
            properties=dict(properties),
        )

    @property
    def info(self) -> SlideInfo:
        return self._info

    def read_region(self, level0_xy: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        try:
            region = self._slide.read_region(level0_xy, level, size_px)
        except OpenSlideError as error:
            raise CorruptSlideError(
                f"Reading {self.path} at level {level}, level-0 position {level0_xy} failed ({error}); "
                "the file is damaged or truncated.",
                self.path,
            ) from error
        return _rgba_to_rgb_on_white(np.asarray(region))

    def associated_image(self, name: str) -> np.ndarray:
        image = self._slide.associated_images[name]
        return np.asarray(image.convert("RGB"))

    def close(self) -> None:
        super().close()
        self._slide.close()
