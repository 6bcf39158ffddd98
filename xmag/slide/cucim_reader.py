"""cuCIM backend: the faster reader for TIFF-family slides (SVS, generic tiled TIFF, Philips TIFF).

It runs on the CPU when no GPU is present. Its batched reader decodes on its
own worker threads and yields batches that reuse one buffer, so each batch is
copied before the next is requested.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from cucim import CuImage

from xmag.errors import CorruptSlideError, NotASlideError
from xmag.slide.reader import SlideInfo, SlideReader

_CM_PER_INCH = 2.54


def _positive_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _tiff_resolution_mpp(tiff_metadata: dict) -> float | None:
    """MPP from the standard TIFF resolution tags, when their unit is physical."""
    pixels_per_unit = _positive_float(tiff_metadata.get("x_resolution"))
    unit = str(tiff_metadata.get("resolution_unit", "")).lower()
    if pixels_per_unit is None or unit not in ("centimeter", "inch"):
        return None
    microns_per_unit = 1e4 if unit == "centimeter" else 1e4 * _CM_PER_INCH
    return microns_per_unit / pixels_per_unit


class CuCIMReader(SlideReader):
    """Reads TIFF-family slides through cuCIM."""

    backend_name = "cucim"

    def __init__(self, path: str, num_workers: int = 2):
        super().__init__(path, num_workers)
        try:
            self._image = CuImage(path)
        except (ValueError, RuntimeError) as error:
            raise NotASlideError(f"{path} is not a slide cuCIM can read: {error}", path) from error
        metadata = self._image.metadata
        resolutions = self._image.resolutions
        aperio = metadata.get("aperio", {})
        vendor = "aperio" if aperio else ("philips" if "philips" in metadata else "generic-tiff")
        self._info = SlideInfo(
            backend=self.backend_name,
            vendor=vendor,
            level_dimensions=tuple(tuple(int(v) for v in dims) for dims in resolutions["level_dimensions"]),
            level_downsamples=tuple(float(d) for d in resolutions["level_downsamples"]),
            mpp=_positive_float(aperio.get("MPP")) or _tiff_resolution_mpp(metadata.get("tiff", {})),
            objective_power=_positive_float(aperio.get("AppMag")),
            associated_images=tuple(sorted(self._image.associated_images)),
            properties={f"aperio.{key}": str(value) for key, value in aperio.items()},
        )

    @property
    def info(self) -> SlideInfo:
        return self._info

    def _corrupt(self, error: Exception) -> CorruptSlideError:
        return CorruptSlideError(
            f"Reading {self.path} failed ({error}); the file is damaged or truncated. Copy it again from the scanner.",
            self.path,
        )

    def read_region(self, level0_xy: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        try:
            region = self._image.read_region(location=level0_xy, size=size_px, level=level)
        except (ValueError, RuntimeError) as error:
            raise self._corrupt(error) from error
        return np.ascontiguousarray(np.asarray(region)[..., :3])

    def read_regions(
        self, level0_coords: np.ndarray, level: int, size_px: int, batch_size: int
    ) -> Iterator[np.ndarray]:
        coords = np.asarray(level0_coords, dtype=np.int64).reshape(-1, 2)
        if len(coords) == 0:
            return
        try:
            batches = self._image.read_region(
                [tuple(xy) for xy in coords.tolist()],
                size=(size_px, size_px),
                level=level,
                num_workers=self.num_workers,
                batch_size=batch_size,
            )
            for batch in batches:
                # The iterator reuses its buffer for the next batch: copy now.
                yield np.array(np.asarray(batch)[..., :3], copy=True)
        except (ValueError, RuntimeError) as error:
            raise self._corrupt(error) from error

    def associated_image(self, name: str) -> np.ndarray:
        if name not in self._info.associated_images:
            raise KeyError(name)
        return np.ascontiguousarray(np.asarray(self._image.associated_image(name))[..., :3])

    def close(self) -> None:
        super().close()
        self._image.close()
