"""One slide-reader interface, a class per backend, one factory.

`open_slide(path)` validates the path and the file's structure, then opens it
with OpenSlide (the default) or cuCIM and returns a `SlideReader`. Every
backend returns the same thing for the same request: RGB uint8 pixels,
coordinates as the top-left corner in level-0 pixels, areas outside the slide
white.

OpenSlide is the default because it raises on every tile it cannot decode.
cuCIM reads faster per core, but where a tile's data is damaged it leaves the
output unwritten, black or holding stale pixels of other tiles (seen with
cuCIM 26.10), without raising; see cucim_reader.py for what is done about it.
"""

from __future__ import annotations

import importlib.util
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import tifffile

from xmag.errors import (
    CorruptSlideError,
    MissingResolutionError,
    NotASlideError,
    SlideNotFoundError,
    SlideReaderUnavailableError,
)
from xmag.vocabulary import READER_BACKENDS, ReaderBackend

# Magic numbers of the TIFF family (classic and BigTIFF, both byte orders).
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_JPEG_COMPRESSIONS = (6, 7)  # TIFF compression codes of old- and new-style JPEG
_JPEG_START_OF_IMAGE = b"\xff\xd8"


@dataclass(frozen=True)
class SlideInfo:
    """What a slide says about itself. Sizes are (width, height) in pixels."""

    backend: str
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None  # microns per level-0 pixel (x); None when the file does not say
    objective_power: float | None
    associated_images: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def width_px(self) -> int:
        return self.level_dimensions[0][0]

    @property
    def height_px(self) -> int:
        return self.level_dimensions[0][1]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)


def resolve_mpp(info: SlideInfo, fallback_mpp: float | None = None, slide_path: str | None = None) -> float:
    """Microns per level-0 pixel: the slide's MPP, else 10 / objective power, else the caller's fallback.

    Raises MissingResolutionError when none of the three is available, because
    tiling at a physical resolution is meaningless without one.
    """
    if info.mpp is not None:
        return info.mpp
    if info.objective_power is not None:
        return 10.0 / info.objective_power
    if fallback_mpp is not None:
        if not (math.isfinite(fallback_mpp) and fallback_mpp > 0):
            raise ValueError(f"fallback_mpp must be a positive number of microns per pixel, got {fallback_mpp!r}")
        return fallback_mpp
    raise MissingResolutionError(
        "The slide states neither its microns per pixel (MPP) nor its objective power, so it cannot be "
        "tiled at a physical resolution. Re-export it from the scanner software with resolution metadata, "
        "or pass the scan resolution explicitly (e.g. --mpp 0.5 for a 20x scan, 0.25 for 40x).",
        slide_path,
    )


def best_level_for_downsample(info: SlideInfo, downsample: float) -> int:
    """The coarsest level that is still at least as fine as `downsample` (never upsample).

    A 1% tolerance absorbs the rounding in real pyramids (a level stored at
    4.0003x counts as 4x).
    """
    best = 0
    for level, level_downsample in enumerate(info.level_downsamples):
        if level_downsample <= downsample * 1.01 and level_downsample > info.level_downsamples[best]:
            best = level
    return best


class SlideReader(ABC):
    """Reads pixels and metadata of one slide. Use as a context manager, or call close()."""

    backend_name: str

    def __init__(self, path: str, num_workers: int = 2):
        self.path = path
        self.num_workers = max(1, num_workers)
        self._pool: ThreadPoolExecutor | None = None

    @property
    @abstractmethod
    def info(self) -> SlideInfo:
        """Slide facts: levels, resolution, vendor, associated images."""

    @abstractmethod
    def read_region(self, level0_xy: tuple[int, int], level: int, size_px: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (height, width, 3) at `level`, top-left corner given in level-0 pixels."""

    @abstractmethod
    def associated_image(self, name: str) -> np.ndarray:
        """RGB uint8 image of an associated image (thumbnail, label, macro); KeyError if absent."""

    def read_regions(
        self, level0_coords: np.ndarray, level: int, size_px: int, batch_size: int
    ) -> Iterator[np.ndarray]:
        """Square regions in batches of (B, size_px, size_px, 3) uint8, in the order of `level0_coords`.

        The default reads on a thread pool (the decoders release the GIL);
        backends with a native batched reader override this.
        """
        pool = self._thread_pool()
        coords = np.asarray(level0_coords, dtype=np.int64).reshape(-1, 2)
        for start in range(0, len(coords), batch_size):
            chunk = coords[start : start + batch_size]
            regions = pool.map(lambda xy: self.read_region((int(xy[0]), int(xy[1])), level, (size_px, size_px)), chunk)
            yield np.stack(list(regions))

    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix=f"xmag-{self.backend_name}")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def cucim_available() -> bool:
    """True when cuCIM can be imported (it reads on the CPU; no GPU needed)."""
    return importlib.util.find_spec("cucim") is not None


def require_reader_backend(backend: str) -> None:
    """SlideReaderUnavailableError unless `backend` can open slides here (the service checks at start)."""
    if backend == "cucim" and not cucim_available():
        raise SlideReaderUnavailableError(
            "The cuCIM backend was requested but cuCIM is not installed. "
            "Install it (pip install --no-deps cucim-cu12, see README) or use backend 'openslide'."
        )


def _check_path(path: str | os.PathLike) -> str:
    slide_path = os.fspath(path)
    if not os.path.exists(slide_path):
        raise SlideNotFoundError(
            f"No file at {slide_path}. Check the path and that the slide store is mounted.", slide_path
        )
    if not os.path.isfile(slide_path):
        raise SlideNotFoundError(
            f"{slide_path} is not a regular file (a directory?). Pass the slide file itself.", slide_path
        )
    if os.path.getsize(slide_path) == 0:
        raise NotASlideError(
            f"{slide_path} is empty (0 bytes); it is not a slide. Was the copy interrupted?", slide_path
        )
    return slide_path


def _is_tiff(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) in _TIFF_MAGICS


def check_tiff_integrity(path: str) -> None:
    """Raise CorruptSlideError when a TIFF's structure is broken, its image data runs past
    the end of the file, or a JPEG tile does not start like a JPEG stream.

    OpenSlide and cuCIM react to a truncated TIFF in different ways (refusing
    it as an unknown format, or opening it with levels silently missing), so
    the check runs once, here, before either backend sees the file. An
    interrupted copy can also leave a file of the right length with zeroed
    blocks; checking the first two bytes of every JPEG tile catches that
    before any tile is decoded. Only directories and two bytes per tile are
    read, not the pixels (about 1 ms per thousand tiles).
    """
    file_size = os.path.getsize(path)

    def corrupt(reason: str) -> CorruptSlideError:
        return CorruptSlideError(
            f"{path} is a damaged TIFF: {reason}. The file is probably truncated (an interrupted copy "
            "or upload); copy it again from the scanner.",
            path,
        )

    try:
        with tifffile.TiffFile(path) as tiff:
            pages = list(tiff.pages)
            if not pages:
                raise corrupt("it has no readable image directory")
            for page in pages:
                data_ends = np.asarray(page.dataoffsets, dtype=np.int64) + np.asarray(
                    page.databytecounts, dtype=np.int64
                )
                if (data_ends > file_size).any():
                    raise corrupt(
                        f"image data of directory {page.index} lies beyond the end of the file ({file_size} bytes)"
                    )
                if page.compression in _JPEG_COMPRESSIONS and page.is_tiled:
                    _check_jpeg_tiles(tiff.filehandle, page, corrupt)
    except tifffile.TiffFileError as error:
        raise corrupt(str(error)) from error


def _check_jpeg_tiles(filehandle, page, corrupt) -> None:
    for tile_index, (offset, byte_count) in enumerate(zip(page.dataoffsets, page.databytecounts, strict=False)):
        if byte_count == 0:  # an empty tile: scanners leave blank areas unwritten
            continue
        filehandle.seek(offset)
        if filehandle.read(2) != _JPEG_START_OF_IMAGE:
            raise corrupt(f"tile {tile_index} of directory {page.index} is not JPEG data (zeroed or overwritten)")


def open_slide(path: str | os.PathLike, backend: ReaderBackend = "openslide", num_workers: int = 2) -> SlideReader:
    """Open a slide with the requested backend (OpenSlide by default; see the module docstring)."""
    slide_path = _check_path(path)
    if _is_tiff(slide_path):
        check_tiff_integrity(slide_path)
    # Imported here so that the core does not load both native libraries when only one is used.
    from xmag.slide.openslide_reader import OpenSlideReader

    if backend == "openslide":
        return OpenSlideReader(slide_path, num_workers)
    if backend == "cucim":
        require_reader_backend(backend)
        from xmag.slide.cucim_reader import CuCIMReader

        return CuCIMReader(slide_path, num_workers)
    raise ValueError(f"Unknown slide backend {backend!r}; choose one of {', '.join(READER_BACKENDS)}.")
