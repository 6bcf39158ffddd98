"""Prometheus metrics of the service; every name starts with `xmag_`, durations are in seconds.

One `ServiceMetrics` per engine, on its own registry, so two services in one
process (as in the tests) never share counters. The engine records slides,
tiles, stages, batches and queue state; the faces record requests by protocol
and status; GPU utilisation and memory are read through NVML at each scrape.
The Grafana dashboard in deploy/grafana/dashboards/xmag.json reads these names.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)

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
            "xmag_slides",
            "Slides finished or refused, by outcome (ok or the error code).",
            ["outcome"],
            registry=registry,
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
            "xmag_encoder_batch_duration_seconds",
            "Time of one encoder batch.",
            buckets=STAGE_SECONDS_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "xmag_queue_depth", "Slides admitted and waiting for a pipeline slot.", registry=registry
        )
        self.pending_tiles = Gauge("xmag_scheduler_pending_tiles", "Tiles waiting for the encoder.", registry=registry)
        self.inflight = Gauge(
            "xmag_inflight_slides", "Slides being read, encoded or classified now.", registry=registry
        )
        self.requests = Counter(
            "xmag_requests",
            "Requests answered, by protocol, endpoint and status.",
            ["protocol", "endpoint", "status"],
            registry=registry,
        )
        self.model = Info("xmag_model", "The model being served.", registry=registry)
        self.ready = Gauge("xmag_ready", "1 once the model is loaded, verified and warmed up.", registry=registry)
        self.max_batch_size = Gauge(
            "xmag_encoder_max_batch_size",
            "Most tiles the scheduler puts in one encoder batch; batch fill's denominator.",
            registry=registry,
        )
        self.cache_lookups = Counter(
            "xmag_embedding_cache_lookups",
            "Embedding cache lookups by result: hit, miss, or corrupt (an unreadable entry, encoded again).",
            ["result"],
            registry=registry,
        )
        self.cache_evictions = Counter(
            "xmag_embedding_cache_evictions",
            "Embedding cache entries evicted to stay within the size bound.",
            registry=registry,
        )
        self.cache_bytes = Gauge("xmag_embedding_cache_bytes", "Bytes the embedding cache holds.", registry=registry)
        self.gpus = GpuCollector()
        registry.register(self.gpus)

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)


class GpuCollector:
    """Utilisation and memory of the NVIDIA GPUs this process sees, read through NVML at each scrape.

    Without an NVIDIA driver (a CPU box) `xmag_gpu_devices` is 0 and the per-GPU
    families have no samples, so the dashboard's GPU panels say "No data" rather
    than a false zero.
    """

    def __init__(self) -> None:
        self.unavailable_reason = ""
        self._nvml = None
        self._handles: list = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception as error:  # noqa: BLE001 - NVML's errors (no library, no driver) all mean "no GPU metrics"
            self.unavailable_reason = f"{type(error).__name__}: {error}"
            log.info("no GPU metrics: NVML is unavailable (%s)", self.unavailable_reason)

    def describe(self):
        return list(self._families())

    def collect(self):
        devices, utilization, memory_used, memory_total = self._families()
        for index, handle in enumerate(self._handles):
            try:
                name = self._nvml.nvmlDeviceGetName(handle)
                rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except self._nvml.NVMLError:
                continue  # a GPU that stopped answering loses its samples; the scrape goes on
            labels = [str(index), name if isinstance(name, str) else name.decode()]
            utilization.add_metric(labels, rates.gpu / 100)
            memory_used.add_metric(labels, float(memory.used))
            memory_total.add_metric(labels, float(memory.total))
        return [devices, utilization, memory_used, memory_total]

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        gpu_labels = ["gpu", "name"]
        return (
            GaugeMetricFamily(
                "xmag_gpu_devices", "NVIDIA GPUs visible through NVML (0 without a driver).", value=len(self._handles)
            ),
            GaugeMetricFamily(
                "xmag_gpu_utilization_ratio",
                "Fraction of the last sample period in which a kernel ran on the GPU (NVML).",
                labels=gpu_labels,
            ),
            GaugeMetricFamily(
                "xmag_gpu_memory_used_bytes", "GPU memory in use, all processes (NVML).", labels=gpu_labels
            ),
            GaugeMetricFamily("xmag_gpu_memory_total_bytes", "GPU memory in all (NVML).", labels=gpu_labels),
        )
