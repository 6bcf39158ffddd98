"""Prometheus metrics of the service; every name starts with `xmag_`, durations are in seconds.

One `ServiceMetrics` per engine, on its own registry, so two services in one
process (as in the tests) never share counters. The engine records slides,
tiles, stages, batches and queue state; the faces record requests by protocol
and status.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.exposition import generate_latest

SLIDE_SECONDS_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
STAGE_SECONDS_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)

# The *_created series double the exposition and no dashboard reads them.
disable_created_metrics()


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.slides = Counter(
            "xmag_slides", "Slides finished, by outcome (ok or the error code).", ["outcome"], registry=registry
        )
        self.tiles = Counter("xmag_tiles_encoded", "Tiles encoded.", registry=registry)
        self.slide_seconds = Histogram(
            "xmag_slide_duration_seconds",
            "Time from admission to result for slides that succeeded, queueing included.",
            buckets=SLIDE_SECONDS_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "xmag_stage_duration_seconds",
            "Time per slide in each stage: queue, open, tissue, read (waiting for tiles), encode, heads.",
            ["stage"],
            buckets=STAGE_SECONDS_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "xmag_encoder_batch_size", "Tiles per encoder batch.", buckets=BATCH_SIZE_BUCKETS, registry=registry
        )
        self.batch_seconds = Histogram(
            "xmag_encoder_batch_duration_seconds", "Time of one encoder batch.", buckets=STAGE_SECONDS_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "xmag_queue_depth", "Slides admitted and waiting for a pipeline slot.", registry=registry
        )
        self.pending_tiles = Gauge(
            "xmag_scheduler_pending_tiles", "Tiles waiting for the encoder.", registry=registry
        )
        self.inflight = Gauge("xmag_inflight_slides", "Slides being read, encoded or classified now.", registry=registry)
        self.requests = Counter(
            "xmag_requests", "Requests answered, by protocol, endpoint and status.", ["protocol", "endpoint", "status"],
            registry=registry,
        )
        self.model = Info("xmag_model", "The model being served.", registry=registry)
        self.ready = Gauge("xmag_ready", "1 once the model is loaded, verified and warmed up.", registry=registry)

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)
