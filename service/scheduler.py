"""The batch scheduler: packs tiles of concurrent slides into full encoder batches.

Each slide's pipeline thread hands its tile batches (chunks) to `encode`, which
blocks until that chunk's embeddings are back. One worker thread owns the
encoder: it takes the oldest chunks, waits up to `max_wait_s` for more to
arrive while the batch is not full, runs one encode of up to `max_batch_size`
tiles, and hands each chunk its rows. So one slide alone gets batches of its
own chunk size, and many slides together fill the encoder — the way Triton's
dynamic batcher works, but in-process.

A chunk is never split across batches, so the chunk size must not exceed the
batch size (the engine checks). A cancelled caller's chunk is withdrawn if the
encoder has not taken it yet.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from xmag.runtimes.protocols import TileEncoderRuntime


class SchedulerStoppedError(RuntimeError):
    """The scheduler was stopped while a chunk was waiting to be encoded."""


class ChunkCancelledError(RuntimeError):
    """The caller's cancel event was set while its chunk waited."""


@dataclass
class _Chunk:
    tiles: np.ndarray
    submitted_at: float
    done: threading.Event = field(default_factory=threading.Event)
    embeddings: np.ndarray | None = None
    error: BaseException | None = None


BatchObserver = Callable[[int, float], None]  # (tiles in the batch, encode seconds)


class BatchScheduler:
    """Dynamic batching in front of one encoder runtime; thread-safe."""

    def __init__(
        self,
        encoder: TileEncoderRuntime,
        max_batch_size: int,
        max_wait_s: float,
        on_batch: BatchObserver | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        self.encoder = encoder
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._pending: collections.deque[_Chunk] = collections.deque()
        self._pending_tiles = 0
        self._condition = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._run, name="xmag-encoder", daemon=True)
        self._worker.start()

    @property
    def pending_tiles(self) -> int:
        """Tiles handed in and not yet taken by the encoder."""
        return self._pending_tiles

    def encode(self, tiles: np.ndarray, cancelled: threading.Event | None = None) -> np.ndarray:
        """Encode one chunk of uint8 NHWC tiles with whatever else is waiting; blocks until done.

        Raises ChunkCancelledError as soon as `cancelled` is set (the chunk is
        withdrawn if still waiting), and the encoder's own exception if the
        batch failed.
        """
        if len(tiles) > self.max_batch_size:
            raise ValueError(f"a chunk of {len(tiles)} tiles exceeds the batch size {self.max_batch_size}")
        chunk = _Chunk(tiles=tiles, submitted_at=time.monotonic())
        with self._condition:
            if self._stopping:
                raise SchedulerStoppedError("the encoder is shutting down")
            self._pending.append(chunk)
            self._pending_tiles += len(tiles)
            self._condition.notify_all()
        while not chunk.done.wait(timeout=0.05):
            if cancelled is not None and cancelled.is_set():
                self._withdraw(chunk)
                raise ChunkCancelledError("cancelled")
        if chunk.error is not None:
            raise chunk.error
        return chunk.embeddings

    def stop(self) -> None:
        """Fail every waiting chunk and stop the worker once its current batch is done."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._worker.join()

    def _withdraw(self, chunk: _Chunk) -> None:
        with self._condition:
            if chunk in self._pending:
                self._pending.remove(chunk)
                self._pending_tiles -= len(chunk.tiles)

    def _take_batch(self) -> list[_Chunk] | None:
        """Wait for work, then for a full batch or the oldest chunk's deadline; None when stopping."""
        with self._condition:
            while not self._pending and not self._stopping:
                self._condition.wait()
            if self._stopping:
                for chunk in self._pending:
                    chunk.error = SchedulerStoppedError("the encoder is shutting down")
                    chunk.done.set()
                self._pending.clear()
                self._pending_tiles = 0
                return None
            deadline = self._pending[0].submitted_at + self.max_wait_s
            while self._pending and self._pending_tiles < self.max_batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            batch, size = [], 0
            while self._pending and size + len(self._pending[0].tiles) <= self.max_batch_size:
                chunk = self._pending.popleft()
                batch.append(chunk)
                size += len(chunk.tiles)
            self._pending_tiles -= size
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            if not batch:  # every waiting chunk was withdrawn while we waited
                continue
            tiles = np.concatenate([chunk.tiles for chunk in batch]) if len(batch) > 1 else batch[0].tiles
            started = time.perf_counter()
            try:
                embeddings = self.encoder.encode(tiles)
            except Exception as error:  # noqa: BLE001 - handed to every caller in the batch; the worker lives on
                for chunk in batch:
                    chunk.error = error
                    chunk.done.set()
                continue
            if self._on_batch is not None:
                self._on_batch(len(tiles), time.perf_counter() - started)
            offset = 0
            for chunk in batch:
                chunk.embeddings = embeddings[offset : offset + len(chunk.tiles)]
                offset += len(chunk.tiles)
                chunk.done.set()


class ScheduledEncoder:
    """One slide's view of the scheduler: a TileEncoderRuntime whose `encode` joins the shared batches."""

    def __init__(self, scheduler: BatchScheduler, cancelled: threading.Event):
        self._scheduler = scheduler
        self._cancelled = cancelled
        encoder = scheduler.encoder
        self.description = encoder.description
        self.tile_size_px = encoder.tile_size_px
        self.embed_dim = encoder.embed_dim

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        return self._scheduler.encode(tiles, self._cancelled)
