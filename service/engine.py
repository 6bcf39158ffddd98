"""The inference engine: admission, the slide pipeline per request, the shared batch scheduler.

Both faces (REST and gRPC) call `Engine.submit` and wait on the job's
future; the engine knows nothing of HTTP or gRPC.

One slide's life:

    submit: ready? → path guard (403 before any open) → tasks known? → admitted, or QueueFullError
    queued  until one of `max_concurrent_slides` pipeline threads is free
    running `xmag.pipeline.classify_slide` with an encoder that joins the shared batches:
            open → tissue → tile grid (tile cap) → tiles read by reader threads → encoded
            in batches packed across slides → every requested head on one set of features
    done    the future holds an EngineResult or a typed error; metrics updated

A job can be cancelled (by its caller, or by its deadline) while queued or
running: its queue place is released at once, and its remaining tiles are
withdrawn from the scheduler at the next chunk.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time

import numpy as np

from xmag.errors import XmagError
from xmag.features import EncoderIdentity
from xmag.pipeline import SlideEmbeddings, SlideEvent, classify_embeddings, embed_slide
from xmag.result_schema import ClassifyResult, HeatmapLinks, classify_result
from xmag.runtimes.protocols import SlideHeadsRuntime, TileEncoderRuntime
from xmag.service.embedding_cache import EmbeddingCache
from xmag.service.errors import NotReadyError, QueueFullError, SlideTimeoutError, UnknownTaskError
from xmag.service.guard import SlidePathGuard
from xmag.service.jobs import EngineResult, EventListener, JobStopped, SlideJob
from xmag.service.metrics import ServiceMetrics
from xmag.service.model import ModelDescription
from xmag.service.scheduler import BatchScheduler, ChunkCancelledError, ScheduledEncoder
from xmag.service.settings import ServiceSettings

log = logging.getLogger("xmag.engine")


class Engine:
    """Runs slides through one encoder and one set of heads, packing tiles of concurrent slides into batches."""

    def __init__(
        self,
        settings: ServiceSettings,
        encoder: TileEncoderRuntime,
        heads: SlideHeadsRuntime,
        model: ModelDescription,
        metrics: ServiceMetrics | None = None,
    ):
        self.settings = settings
        self.heads = heads
        self.model = model
        self.metrics = metrics or ServiceMetrics()
        self.spec = model.spec
        self.guard = SlidePathGuard(settings.slide_roots)
        self.cache = None
        if settings.embedding_cache_dir is not None:
            self.cache = EmbeddingCache(
                settings.embedding_cache_dir,
                settings.embedding_cache_max_bytes,
                EncoderIdentity.of_model(model.info),
                self.spec,
                self.metrics,
            )
        # A TensorRT engine takes batches only up to its optimisation profile's maximum.
        max_batch_size = min(
            settings.max_batch_size, getattr(encoder, "max_batch_size", None) or settings.max_batch_size
        )
        if settings.read_batch_size > max_batch_size:
            raise ValueError(
                f"read_batch_size {settings.read_batch_size} exceeds the {max_batch_size} tiles the encoder "
                f"({encoder.description}) takes at once"
            )
        self.scheduler = BatchScheduler(
            encoder, max_batch_size, settings.max_batch_wait_ms / 1000, on_batch=self._record_batch
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.max_concurrent_slides, thread_name_prefix="xmag-slide"
        )
        self._lock = threading.Lock()
        self._jobs: set[SlideJob] = set()
        self._queued = 0
        self._running = 0
        self._ready = False
        self._closing = False
        self._recent_slide_s: list[float] = []  # for Retry-After estimates
        self.metrics.queue_depth.set_function(lambda: self._queued)
        self.metrics.inflight.set_function(lambda: self._running)
        self.metrics.pending_tiles.set_function(lambda: self.scheduler.pending_tiles)
        self.metrics.max_batch_size.set(max_batch_size)
        self.metrics.model.info(
            {
                "name": model.info.name,
                "version": str(model.info.version),
                "kind": model.info.kind,
                "encoder": model.info.encoder,
                "manifest_sha256": model.info.manifest_sha256 or "",
            }
        )

    def describe(
        self, result: EngineResult, *, return_attention: bool, heatmaps: dict[str, HeatmapLinks] | None = None
    ) -> ClassifyResult:
        """The answer both faces give for a finished slide (gRPC sends the same fields as protobuf)."""
        return classify_result(
            result.slide,
            self.model.info,
            self.spec,
            result_id=result.job_id,
            timings_s=result.timings_s,
            return_attention=return_attention,
            heatmaps=heatmaps,
        )

    @property
    def ready(self) -> bool:
        return self._ready and not self._closing

    def warm_up(self) -> None:
        """One chunk through the scheduler and the heads, so the first slide pays no start-up cost; then ready."""
        tiles = np.zeros((self.settings.read_batch_size, self.spec.tile_size_px, self.spec.tile_size_px, 3), np.uint8)
        # Straight to the encoder, not through the scheduler: warm-up is not traffic and stays out of the metrics.
        features = self.scheduler.encoder.encode(tiles)
        self.heads.predict(features)
        self._ready = True
        self.metrics.ready.set(1)
        log.info("ready: %s v%s on %s", self.model.info.name, self.model.info.version, self.model.info.encoder)

    def submit(
        self,
        slide_path: str,
        tasks: list[str] | None = None,
        *,
        fallback_mpp: float | None = None,
        timeout_s: float | None = None,
        on_event: EventListener | None = None,
    ) -> SlideJob:
        """Admit one slide or raise: NotReadyError, InvalidRequestError/UnknownTaskError,
        SlidePathForbiddenError, SlideNotFoundError, QueueFullError. Nothing is opened here."""
        try:
            return self._admit(slide_path, tasks, fallback_mpp, timeout_s, on_event)
        except XmagError as refusal:
            # Refused slides count among the outcomes, so that the dashboard's errors show 403s and 429s too.
            self._record_outcome(refusal.code)
            raise

    def _admit(self, slide_path, tasks, fallback_mpp, timeout_s, on_event) -> SlideJob:
        if self._closing:
            raise NotReadyError("the service is shutting down")
        if not self._ready:
            raise NotReadyError("the model is still loading or warming up")
        unknown = sorted(set(tasks or ()) - set(self.model.tasks))
        if unknown:
            raise UnknownTaskError(f"unknown task(s) {unknown}; this model has {sorted(self.model.tasks)}")
        real_path = self.guard.resolve(slide_path)
        limit = self.settings.request_timeout_s
        job = SlideJob(
            self._stop,
            real_path,
            list(dict.fromkeys(tasks)) if tasks else list(self.model.tasks),
            fallback_mpp,
            min(timeout_s, limit) if timeout_s else limit,
            on_event,
        )
        with self._lock:
            admitted = self._queued + self._running
            if admitted >= self.settings.max_concurrent_slides + self.settings.max_queued_slides:
                raise QueueFullError(
                    f"{admitted} slides are being processed or waiting, the most this service admits; retry later",
                    retry_after_s=self._retry_after_s(),
                )
            self._queued += 1
            self._jobs.add(job)
        timer = threading.Timer(
            job.timeout_s,
            self._stop,
            (
                job,
                SlideTimeoutError(
                    f"the slide did not finish within {job.timeout_s:g} s; its remaining work was cancelled"
                ),
            ),
        )
        timer.daemon = True
        timer.start()
        job.future.add_done_callback(lambda _: timer.cancel())
        self._pool.submit(self._run, job)
        return job

    def close(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new slides, let admitted ones finish (up to `drain_timeout_s`), cancel the rest, stop
        (and close the encoder, where it has a `close`)."""
        self._closing = True
        self.metrics.ready.set(0)
        with self._lock:
            pending = [job.future for job in self._jobs]
        _, not_done = concurrent.futures.wait(pending, timeout=drain_timeout_s)
        with self._lock:
            unfinished = list(self._jobs)
        for job in unfinished:
            self._stop(job, NotReadyError("the service shut down before the slide finished"))
        self._pool.shutdown(wait=True)
        self.scheduler.stop()
        # A remote encoder (Triton) holds a network channel; in-process runtimes have nothing to close.
        close_encoder = getattr(self.scheduler.encoder, "close", None)
        if close_encoder is not None:
            close_encoder()
        if not_done:
            log.warning("shut down with %d slide(s) unfinished after %.0f s", len(not_done), drain_timeout_s)

    # -- internals ---------------------------------------------------------

    def _stop(self, job: SlideJob, reason: XmagError) -> None:
        with self._lock:
            if job.state == "done" or job.stop_reason is not None:
                return
            job.stop_reason = reason
            job.cancelled.set()
            if job.state != "queued":
                return  # the pipeline thread notices at its next chunk or event and finishes the job
            job.state = "done"
            self._queued -= 1
            self._jobs.discard(job)
        self._record_outcome(reason.code)
        job.future.set_exception(reason)

    def _run(self, job: SlideJob) -> None:
        with self._lock:
            if job.state != "queued":
                return
            job.state = "running"
            self._queued -= 1
            self._running += 1
        queue_s = time.monotonic() - job.admitted_at
        outcome: EngineResult | BaseException
        try:
            slide = classify_embeddings(self._embed(job), self.heads, lambda event: self._on_event(job, event))
            slide = dataclasses.replace(slide, predictions={task: slide.predictions[task] for task in job.tasks})
            total_s = time.monotonic() - job.admitted_at
            outcome = EngineResult(job.id, slide, {"queue": queue_s, **slide.timings_s, "total": total_s})
        except (JobStopped, ChunkCancelledError):
            outcome = job.stop_reason
        except XmagError as error:
            outcome = error
        except Exception as error:  # noqa: BLE001 - one failing slide must not take the service down
            # The message may quote the slide path, so only its type is logged above debug level.
            log.error("slide %s failed with an unexpected %s", job.id, type(error).__name__)
            log.debug("slide %s failure", job.id, exc_info=True)
            outcome = error
        finally:
            with self._lock:
                job.state = "done"
                self._running -= 1
                self._jobs.discard(job)
        self._finish(job, outcome)

    def _embed(self, job: SlideJob) -> SlideEmbeddings:
        """The slide's embeddings: from the embedding cache when it has them, else encoded (and then kept)."""
        embed = functools.partial(
            embed_slide,
            str(job.real_path),
            ScheduledEncoder(self.scheduler, job.cancelled),
            spec=self.spec,
            backend=self.settings.reader_backend,
            batch_size=self.settings.read_batch_size,
            num_workers=self.settings.reader_threads,
            fallback_mpp=job.fallback_mpp,
            max_tiles=self.settings.max_tiles_per_slide,
            require_tissue=True,
            on_event=lambda event: self._on_event(job, event),
        )
        if self.cache is None:
            return embed()
        try:
            key = self.cache.key(job.real_path)
        except OSError:  # gone or unreadable since admission: the pipeline's typed error says which
            return embed()
        with self.cache.claim(key):
            embedded = embed(cached=self.cache.lookup(key))
            if not embedded.from_cache:
                self.cache.store(key, embedded)
        return embedded

    def _on_event(self, job: SlideJob, event: SlideEvent) -> None:
        if job.cancelled.is_set():
            raise JobStopped()
        if job.on_event is not None:
            try:
                job.on_event(event)
            except Exception:  # noqa: BLE001 - a listener's failure must not fail the slide
                log.debug("event listener of slide %s failed", job.id, exc_info=True)

    def _finish(self, job: SlideJob, outcome: EngineResult | BaseException) -> None:
        if isinstance(outcome, EngineResult):
            stages = outcome.timings_s
            self.metrics.slides.labels(outcome="ok").inc()
            self.metrics.slide_seconds.observe(stages["total"])
            for stage, seconds in stages.items():
                if stage != "total":
                    self.metrics.stage_seconds.labels(stage=stage).observe(seconds)
            with self._lock:
                self._recent_slide_s = ([*self._recent_slide_s, stages["total"]])[-20:]
            job.future.set_result(outcome)
        else:
            self._record_outcome(getattr(outcome, "code", "internal"))
            job.future.set_exception(outcome)

    def _record_outcome(self, code: str) -> None:
        self.metrics.slides.labels(outcome=code).inc()

    def _record_batch(self, tile_count: int, seconds: float) -> None:
        self.metrics.batch_size.observe(tile_count)
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.tiles.inc(tile_count)

    def _retry_after_s(self) -> int:
        """About how long until a queue place frees: a recent slide's time, at least 1 s."""
        recent = self._recent_slide_s
        typical = sorted(recent)[len(recent) // 2] if recent else 10.0
        return max(1, int(round(typical)))


class EngineHolder:
    """The engine once loaded, or why it is not (yet); shared by the faces, which start before it is ready."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.failure: str | None = None

    def require(self) -> Engine:
        """The ready engine, or NotReadyError saying why there is none."""
        if self.engine is not None and self.engine.ready:
            return self.engine
        if self.failure:
            raise NotReadyError(f"the model failed to load: {self.failure}", retry_after_s=60)
        raise NotReadyError("the model is still loading or warming up")
