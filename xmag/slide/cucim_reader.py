"""cuCIM backend: the faster reader for TIFF-family slides (SVS, generic tiled TIFF, Philips TIFF).

It runs on the CPU when no GPU is present.

cuCIM does not raise when a tile's compressed data cannot be decoded: it
prints a message and leaves the output unwritten, which is often black and
sometimes stale pixels of other tiles (seen with cuCIM 26.10). Two defences:
`open_slide` refuses files whose JPEG tiles do not start like JPEG (the
zeroed blocks an interrupted copy leaves), and any region with a pure-black
patch, a colour neither stained tissue nor glass takes, is read again through
OpenSlide, which raises CorruptSlideError on damaged data (and otherwise
returns the same pixels, as the backend parity tests show). Damage inside a
JPEG stream that leaves stale pixels can still pass unnoticed with this
backend; OpenSlide, the default, reports it.

Regions are read one by one on the base class's thread pool, not through
cuCIM's batched `read_region(locations, ...)` iterator: on a slide with
damaged tiles that iterator returned plausible pixels of other tiles instead
of black (seen with cuCIM 26.10), which no check can catch. Measured on this
project's 2-core machine, single reads on two threads were about as fast
(1,800-2,100 vs 1,950 regions/s of 224 px).
"""

from __future__ import annotations

import numpy as np
from cucim import CuImage  # type: ignore[attr-defined]  # cucim's __init__.pyi leaves CuImage out of __all__

from xmag.errors import CorruptSlideError, NotASlideError, XmagError
from xmag.slide.openslide_reader import OpenSlideReader
from xmag.slide.reader import SlideInfo, SlideReader

_CM_PER_INCH = 2.54
# Pure-black pixels in one region above which it is re-read through OpenSlide (one JPEG tile row is 256).
_BLACK_PIXELS_TO_VERIFY = 256


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
        self._verifier: OpenSlideReader | None = None
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
            level_dimensions=tuple((int(width), int(height)) for width, height in resolutions["level_dimensions"]),
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
        return self._verified(np.ascontiguousarray(np.asarray(region)[..., :3]), level0_xy, level)

    def _verified(self, region: np.ndarray, level0_xy: tuple[int, int], level: int) -> np.ndarray:
        """The region, or OpenSlide's reading of it where cuCIM may have left undecodable tiles black."""
        if np.count_nonzero(region.max(axis=2) == 0) < _BLACK_PIXELS_TO_VERIFY:
            return region
        if self._verifier is None:
            try:
                self._verifier = OpenSlideReader(self.path, num_workers=1)
            except XmagError as error:
                raise CorruptSlideError(
                    f"cuCIM returned black pixels at level {level}, level-0 position {level0_xy} of {self.path}, "
                    f"which usually means tile data it could not decode, and OpenSlide could not check ({error}).",
                    self.path,
                ) from error
        return self._verifier.read_region(level0_xy, level, (region.shape[1], region.shape[0]))

    def associated_image(self, name: str) -> np.ndarray:
        if name not in self._info.associated_images:
            raise KeyError(name)
        return np.ascontiguousarray(np.asarray(self._image.associated_image(name))[..., :3])

    def close(self) -> None:
        super().close()
        if self._verifier is not None:
            self._verifier.close()
        self._image.close()
