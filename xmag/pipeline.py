"""Classify one slide: open, find tissue, tile at 5x, read, encode, run the heads.

Reading and encoding overlap: a background thread decodes batch k+1 while the
encoder works on batch k. The command line runs this with an encoder of its
own; the service's engine runs it once per slide with an encoder that hands
the tiles to its batch scheduler. It knows nothing of HTTP or gRPC.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from xmag.errors import NoTissueError, TooManyTilesError
from xmag.runtimes.protocols import SlideHeadsRuntime, TaskOutput, TileEncoderRuntime
from xmag.slide.reader import open_slide, resolve_mpp
from xmag.slide.tiling import XMAG_5X, TileGrid, TilingSpec, iter_tile_batches, plan_tile_grid
from xmag.slide.tissue import DEFAULT_THUMBNAIL_UM_PER_PX, TissueMask, tissue_mask_for_slide
from xmag.vocabulary import ReaderBackend

Stage = Literal["opened", "planned", "encoded", "heads_done"]


@dataclass(frozen=True)
class SlideEvent:
    """Progress of one slide: opened, tiles planned, k of N tiles encoded (once per batch), heads done."""

    stage: Stage
    tiles_done: int = 0
    tiles_total: int = 0


EventCallback = Callable[[SlideEvent], None]


@dataclass(frozen=True)
class SlideFacts:
    """What the pipeline learned about the slide."""

    width_px: int
    height_px: int
    mpp: float  # microns per level-0 pixel used for tiling
    base_magnification: float  # 10 / mpp
    objective_power: float | None  # as stated by the file
    vendor: str
    reader_backend: str
    read_level: int
    tile_count: int  # tiles in the grid
    tissue_area_mm2: float
    tiles_encoded: int  # tile_count, or fewer when a benchmark encoded a subset (max_tiles_encoded)


@dataclass
class SlideResult:
    facts: SlideFacts
    predictions: dict[str, TaskOutput]
    level0_coords: np.ndarray  # (tile_count, 2) top-left (x, y) in level-0 pixels
    tile_size_level0_px: int
    timings_s: dict[str, float]
    thumbnail: np.ndarray = field(repr=False)  # RGB uint8 at tissue.um_per_px
    tissue: TissueMask = field(repr=False)
    embeddings: np.ndarray = field(repr=False)  # (tile_count, embed_dim) float32


@contextlib.contextmanager
def _prefetch(batches: Iterator, depth: int) -> Iterator[Iterator]:
    """Run `batches` on a background thread, `depth` items ahead; its errors are re-raised to the consumer.

    On leaving the context, even by an exception in the consumer, the thread is
    told to stop and joined, so it never reads from a slide after the slide is closed.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    finished = object()

    def put(item) -> None:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            for item in batches:
                if stop.is_set():
                    return
                put(item)
            put(finished)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(error)

    def consume() -> Iterator:
        while (item := buffer.get()) is not finished:
            if isinstance(item, BaseException):
                raise item
            yield item

    producer = threading.Thread(target=produce, name="xmag-tile-reader", daemon=True)
    producer.start()
    try:
        yield consume()
    finally:
        stop.set()
        producer.join()


@dataclass
class SlideEmbeddings:
    """One slide's tile embeddings, where the tiles are, and how they were made: what the heads and feature files take."""

    facts: SlideFacts
    embeddings: np.ndarray  # (N, D) float32, in grid order; (0, D) when the slide has no tissue
    level0_coords: np.ndarray  # (N, 2) int64 top-left (x, y) in level-0 pixels
    tile_size_level0_px: int
    spec: TilingSpec
    encoder: str  # the runtime that encoded the tiles, e.g. "torch fp32 on cpu"
    timings_s: dict[str, float]  # open, tissue, read, encode
    thumbnail: np.ndarray = field(repr=False)  # RGB uint8 at tissue.um_per_px
    tissue: TissueMask = field(repr=False)
    from_cache: bool = False  # the embeddings came from `cached`, not from the encoder


# Given a slide's planned tile coordinates, stored embeddings for exactly those tiles, or None.
EmbeddingLookup = Callable[[np.ndarray], np.ndarray | None]


def embed_slide(
    slide_path: str,
    encoder: TileEncoderRuntime,
    *,
    spec: TilingSpec = XMAG_5X,
    backend: ReaderBackend = "openslide",
    batch_size: int = 32,
    num_workers: int = 2,
    fallback_mpp: float | None = None,
    max_tiles: int | None = None,
    max_tiles_encoded: int | None = None,
    require_tissue: bool = False,
    cached: EmbeddingLookup | None = None,
    on_event: EventCallback | None = None,
) -> SlideEmbeddings:
    """Open a slide, find its tissue, plan its tile grid and encode every tile; reading overlaps encoding.

    The one embedding path: classification, feature extraction, the service
    and the benchmark all call it. A slide without tissue gives (0, D)
    embeddings, or NoTissueError with `require_tissue`. Raises the core's typed errors
    (SlideNotFoundError, NotASlideError, CorruptSlideError,
    MissingResolutionError, and TooManyTilesError when the grid has more than
    `max_tiles` tiles, before any tile is read). An exception raised by
    `on_event` stops the work (the way to cancel) and propagates.
    `max_tiles_encoded` encodes only the grid's first tiles, for benchmarks
    that measure a subset and extrapolate; the coordinates then cover that
    subset only. `cached`, given the planned coordinates, may return stored
    embeddings of exactly those tiles: then no tile is read or encoded.
    """

    def emit(stage: Stage, tiles_done: int = 0, tiles_total: int = 0) -> None:
        if on_event is not None:
            on_event(SlideEvent(stage, tiles_done, tiles_total))

    if spec.output_px != encoder.tile_size_px:
        raise ValueError(f"the tiling makes {spec.output_px} px tiles but the encoder takes {encoder.tile_size_px} px")
    timings_s: dict[str, float] = {}
    started = time.perf_counter()
    with open_slide(slide_path, backend=backend, num_workers=num_workers) as reader:
        info = reader.info
        mpp = resolve_mpp(info, fallback_mpp, slide_path)
        timings_s["open"] = time.perf_counter() - started
        emit("opened")

        started = time.perf_counter()
        tissue, thumbnail = tissue_mask_for_slide(reader, mpp, DEFAULT_THUMBNAIL_UM_PER_PX)
        grid: TileGrid = plan_tile_grid(info, mpp, tissue, spec)
        timings_s["tissue"] = time.perf_counter() - started
        if require_tissue and len(grid) == 0:
            raise NoTissueError(
                f"No tissue found on {slide_path}: no {spec.tile_size_px} px tile at {spec.target_mpp} µm/px is "
                f"at least {spec.min_tissue_fraction:.0%} tissue (detected tissue area "
                f"{tissue.tissue_area_mm2:.3f} mm²). Check that the slide is not blank or out of focus.",
                slide_path,
            )
        if max_tiles is not None and len(grid) > max_tiles:
            raise TooManyTilesError(
                f"The slide has {len(grid)} tiles at {spec.target_mpp} µm/px, more than this service's cap of "
                f"{max_tiles} tiles per slide (tissue area {tissue.tissue_area_mm2:.1f} mm²). Ask the operator to raise "
                "the cap (--max-tiles-per-slide) if slides this large are expected.",
                slide_path,
                tile_count=len(grid),
                max_tiles=max_tiles,
            )
        full_tile_count = len(grid)
        if max_tiles_encoded is not None and max_tiles_encoded < len(grid):
            grid = dataclasses.replace(grid, level0_coords=grid.level0_coords[:max_tiles_encoded])
        emit("planned", 0, len(grid))

        coords = np.asarray(grid.level0_coords, dtype=np.int64).reshape(-1, 2)
        stored = cached(coords) if cached is not None else None
        if stored is not None:
            embeddings, read_wait_s, encode_s = [stored], 0.0, 0.0
            emit("encoded", len(grid), len(grid))
        else:
            embeddings, read_wait_s, encode_s = _encode_grid(reader, grid, encoder, batch_size, emit)
        # "read" is the time the encoder waited for tiles, i.e. reading not hidden behind encoding.
        timings_s["read"] = read_wait_s
        timings_s["encode"] = encode_s

    facts = SlideFacts(
        width_px=info.width_px,
        height_px=info.height_px,
        mpp=mpp,
        base_magnification=10.0 / mpp,
        objective_power=info.objective_power,
        vendor=info.vendor,
        reader_backend=info.backend,
        read_level=grid.read_level,
        tile_count=full_tile_count,
        tissue_area_mm2=tissue.tissue_area_mm2,
        tiles_encoded=len(grid),
    )
    return SlideEmbeddings(
        facts=facts,
        embeddings=np.concatenate(embeddings).astype(np.float32, copy=False),
        level0_coords=coords,
        tile_size_level0_px=grid.tile_size_level0_px,
        spec=spec,
        encoder=encoder.description,
        timings_s=timings_s,
        thumbnail=thumbnail,
        tissue=tissue,
        from_cache=stored is not None,
    )


def _encode_grid(reader, grid: TileGrid, encoder: TileEncoderRuntime, batch_size: int, emit):
    """Read the grid's tiles on a background thread while encoding; (embeddings per batch, read wait s, encode s)."""
    embeddings = [np.empty((0, encoder.embed_dim), np.float32)]
    tiles_done = 0
    read_wait_s = 0.0
    encode_s = 0.0
    with _prefetch(iter_tile_batches(reader, grid, batch_size), depth=2) as batches:
        while True:
            wait_started = time.perf_counter()
            next_batch = next(batches, None)
            read_wait_s += time.perf_counter() - wait_started
            if next_batch is None:
                break
            tiles, _ = next_batch
            encode_started = time.perf_counter()
            embeddings.append(encoder.encode(tiles))
            encode_s += time.perf_counter() - encode_started
            tiles_done += len(tiles)
            emit("encoded", tiles_done, len(grid))
    return embeddings, read_wait_s, encode_s


def classify_slide(
    slide_path: str,
    encoder: TileEncoderRuntime,
    heads: SlideHeadsRuntime,
    *,
    spec: TilingSpec = XMAG_5X,
    backend: ReaderBackend = "openslide",
    batch_size: int = 32,
    num_workers: int = 2,
    fallback_mpp: float | None = None,
    max_tiles: int | None = None,
    max_tiles_encoded: int | None = None,
    on_event: EventCallback | None = None,
) -> SlideResult:
    """`embed_slide`, then every head on the one set of embeddings.

    Raises what embed_slide raises, and NoTissueError for a slide without
    tissue (before any tile is read).
    """
    embedded = embed_slide(
        slide_path,
        encoder,
        spec=spec,
        backend=backend,
        batch_size=batch_size,
        num_workers=num_workers,
        fallback_mpp=fallback_mpp,
        max_tiles=max_tiles,
        max_tiles_encoded=max_tiles_encoded,
        require_tissue=True,
        on_event=on_event,
    )
    return classify_embeddings(embedded, heads, on_event)


def classify_embeddings(
    embedded: SlideEmbeddings, heads: SlideHeadsRuntime, on_event: EventCallback | None = None
) -> SlideResult:
    """Every head on one slide's embeddings (from `embed_slide`, or a feature file of the same encoder)."""
    started = time.perf_counter()
    predictions = heads.predict(embedded.embeddings)
    timings_s = {**embedded.timings_s, "heads": time.perf_counter() - started}
    tiles = len(embedded.embeddings)
    if on_event is not None:
        on_event(SlideEvent("heads_done", tiles, tiles))
    return SlideResult(
        facts=embedded.facts,
        predictions=predictions,
        level0_coords=embedded.level0_coords,
        tile_size_level0_px=embedded.tile_size_level0_px,
        timings_s=timings_s,
        thumbnail=embedded.thumbnail,
        tissue=embedded.tissue,
        embeddings=embedded.embeddings,
    )
