"""The batch scheduler with a real (tiny) encoder: packing, order, cancellation, failures."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from xmag.models.encoder import build_tile_encoder
from xmag.runtimes.torch_backend import TorchTileEncoder
from xmag.service.scheduler import BatchScheduler, ChunkCancelledError, SchedulerStoppedError


@pytest.fixture(scope="module")
def encoder():
    return TorchTileEncoder(build_tile_encoder("tiny_dinov2", seed=0))


class GatedEncoder:
    """A real encoder behind a gate, recording the size of every batch it ran."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.gate = threading.Event()
        self.batch_sizes: list[int] = []
        self.description, self.tile_size_px, self.embed_dim = (
            encoder.description,
            encoder.tile_size_px,
            encoder.embed_dim,
        )

    def encode(self, tiles):
        self.gate.wait(timeout=30)
        self.batch_sizes.append(len(tiles))
        return self.encoder.encode(tiles)


def random_tiles(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 224, 224, 3), dtype=np.uint8)


def test_chunks_of_concurrent_callers_share_batches_and_get_their_own_rows(encoder):
    gated = GatedEncoder(encoder)
    scheduler = BatchScheduler(gated, max_batch_size=32, max_wait_s=0.5)
    chunks = [random_tiles(8, seed) for seed in range(8)]
    results: dict[int, np.ndarray] = {}
    try:
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, scheduler.encode(chunks[i]))) for i in range(8)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while (
            scheduler.pending_tiles < 64 - 8 and time.monotonic() < deadline
        ):  # the worker holds one batch at the gate
            time.sleep(0.01)
        gated.gate.set()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        scheduler.stop()
    assert sum(gated.batch_sizes) == 64 and max(gated.batch_sizes) == 32
    for i, chunk in enumerate(chunks):
        np.testing.assert_allclose(results[i], encoder.encode(chunk), atol=1e-4)


def test_a_lone_chunk_waits_at_most_max_wait(encoder):
    scheduler = BatchScheduler(encoder, max_batch_size=64, max_wait_s=0.2)
    try:
        started = time.monotonic()
        scheduler.encode(random_tiles(4, 0))
        assert time.monotonic() - started < 5
    finally:
        scheduler.stop()


def test_a_cancelled_chunk_is_withdrawn_before_it_is_encoded(encoder):
    gated = GatedEncoder(encoder)
    scheduler = BatchScheduler(gated, max_batch_size=8, max_wait_s=0)
    cancelled = threading.Event()
    errors = []
    try:
        first = threading.Thread(target=lambda: scheduler.encode(random_tiles(8, 0)))
        first.start()
        time.sleep(0.2)  # the first chunk is at the gate, so the second one waits in the queue
        second = threading.Thread(target=lambda: _capture(errors, scheduler.encode, random_tiles(8, 1), cancelled))
        second.start()
        time.sleep(0.2)
        assert scheduler.pending_tiles == 8
        cancelled.set()
        second.join(timeout=5)
        assert scheduler.pending_tiles == 0
        gated.gate.set()
        first.join(timeout=30)
    finally:
        scheduler.stop()
    assert [type(error) for error in errors] == [ChunkCancelledError]
    assert gated.batch_sizes == [8]  # the withdrawn chunk never reached the encoder


def test_an_encoder_error_reaches_the_callers_and_the_worker_lives_on(encoder):
    class FailsOnce:
        def __init__(self):
            self.failed = False
            self.description, self.tile_size_px, self.embed_dim = "fails once", 224, encoder.embed_dim

        def encode(self, tiles):
            if not self.failed:
                self.failed = True
                raise RuntimeError("device lost")
            return encoder.encode(tiles)

    scheduler = BatchScheduler(FailsOnce(), max_batch_size=8, max_wait_s=0)
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            scheduler.encode(random_tiles(2, 0))
        assert scheduler.encode(random_tiles(2, 0)).shape == (2, encoder.embed_dim)
    finally:
        scheduler.stop()


def test_stopping_fails_waiting_chunks_and_refuses_new_ones(encoder):
    gated = GatedEncoder(encoder)
    scheduler = BatchScheduler(gated, max_batch_size=4, max_wait_s=0)
    errors = []
    first = threading.Thread(target=lambda: scheduler.encode(random_tiles(4, 0)))
    first.start()
    time.sleep(0.2)
    waiting = threading.Thread(target=lambda: _capture(errors, scheduler.encode, random_tiles(4, 1)))
    waiting.start()
    time.sleep(0.2)
    stopper = threading.Thread(target=scheduler.stop)
    stopper.start()
    time.sleep(0.2)
    gated.gate.set()
    for thread in (first, waiting, stopper):
        thread.join(timeout=30)
    assert [type(error) for error in errors] == [SchedulerStoppedError]
    with pytest.raises(SchedulerStoppedError):
        scheduler.encode(random_tiles(1, 0))


def test_a_chunk_larger_than_a_batch_is_refused(encoder):
    scheduler = BatchScheduler(encoder, max_batch_size=4, max_wait_s=0)
    try:
        with pytest.raises(ValueError, match="exceeds the batch size 4"):
            scheduler.encode(random_tiles(5, 0))
    finally:
        scheduler.stop()


def _capture(errors: list, function, *args):
    try:
        function(*args)
    except Exception as error:  # noqa: BLE001 - the test inspects it
        errors.append(error)
