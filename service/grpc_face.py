"""The gRPC face: `xmag.v1.SlideClassifier` on grpc.aio, translating protobuf to engine calls.

Status codes come from `service.errors.STATUS_BY_ERROR`, shared with REST,
so a slide fails with the same meaning on either face. Also here: standard
health checking (`grpc.health.v1`, SERVING once the model is ready), server
reflection, the API-key check on `authorization: Bearer <key>` metadata, and
explicit message size limits. A cancelled call, or one whose deadline passes,
cancels its slide in the engine, which releases its queue place and stops its
remaining tiles.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from xmag.errors import RetryLaterError, XmagError
from xmag.pipeline import SlideEvent
from xmag.service.engine import Engine, EngineHolder
from xmag.service.errors import INTERNAL, InvalidRequestError, status_of
from xmag.service.grpc_api import classifier_pb2 as pb
from xmag.service.grpc_api import classifier_pb2_grpc as pb_grpc
from xmag.service.grpc_messages import model_message, result_message
from xmag.service.jobs import EngineResult, SlideJob
from xmag.service.metrics import ServiceMetrics
from xmag.service.settings import ServiceSettings

log = logging.getLogger("xmag.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SlideClassifier"].full_name  # "xmag.v1.SlideClassifier"

_STAGES = {
    "opened": pb.Progress.OPENED,
    "planned": pb.Progress.TILES_PLANNED,
    "encoded": pb.Progress.TILES_ENCODED,
    "heads_done": pb.Progress.HEADS_DONE,
}


def grpc_error_of(error: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(status, XMAG error code, message) of an engine or core error; INTERNAL for anything unexpected."""
    status = status_of(error)
    if status == INTERNAL:
        return grpc.StatusCode.INTERNAL, "internal", "internal error; the server log has the details"
    return grpc.StatusCode[status.grpc], error.code, str(error)


def slide_error(error: BaseException) -> pb.SlideError:
    status, code, message = grpc_error_of(error)
    return pb.SlideError(grpc_code=status.value[0], grpc_status=status.name, code=code, message=message)


class SlideClassifierServicer(pb_grpc.SlideClassifierServicer):
    def __init__(self, holder: EngineHolder, metrics: ServiceMetrics, max_stream_slides: int):
        self.holder = holder
        self.metrics = metrics
        self.max_stream_slides = max_stream_slides  # slides one ClassifyMany stream keeps in the engine at once

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResult:
        with self._counted("Classify") as outcome:
            try:
                engine, job = await self._submit(request, context)
                result = await _wait(job)
                return result_message(engine.describe(result, return_attention=request.return_attention))
            except XmagError as error:
                await self._abort(context, error, outcome)
            except asyncio.CancelledError:
                outcome["status"] = "CANCELLED"
                raise
            except Exception as error:  # noqa: BLE001 - an unexpected failure of one slide is INTERNAL, not a crash
                log.error("Classify failed with an unexpected %s", type(error).__name__)
                await self._abort(context, error, outcome)

    async def ClassifyStream(self, request: pb.ClassifyRequest, context) -> AsyncIterator[pb.ClassifyEvent]:
        with self._counted("ClassifyStream") as outcome:
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[SlideEvent] = asyncio.Queue()

            def on_event(event: SlideEvent) -> None:  # called on the slide's pipeline thread
                loop.call_soon_threadsafe(events.put_nowait, event)

            job: SlideJob | None = None
            finished: asyncio.Future | None = None
            try:
                engine, job = await self._submit(request, context, on_event)
                finished = asyncio.wrap_future(job.future)
                while True:
                    next_event = asyncio.ensure_future(events.get())
                    await asyncio.wait({next_event, finished}, return_when=asyncio.FIRST_COMPLETED)
                    if not next_event.done():
                        next_event.cancel()
                        break
                    yield _progress(next_event.result())
                while not events.empty():
                    yield _progress(events.get_nowait())
                yield pb.ClassifyEvent(
                    result=result_message(engine.describe(finished.result(), return_attention=request.return_attention))
                )
            except XmagError as error:
                await self._abort(context, error, outcome)
            except asyncio.CancelledError:
                outcome["status"] = "CANCELLED"
                if job is not None:
                    job.cancel()
                if finished is not None:
                    finished.cancel()  # nobody will read its outcome now
                raise
            except Exception as error:  # noqa: BLE001
                log.error("ClassifyStream failed with an unexpected %s", type(error).__name__)
                await self._abort(context, error, outcome)

    async def ClassifyMany(self, request_iterator, context) -> AsyncIterator[pb.ClassifyManyResponse]:
        with self._counted("ClassifyMany") as outcome:
            answers: asyncio.Queue = asyncio.Queue()
            window = asyncio.Semaphore(self.max_stream_slides)
            jobs: set[SlideJob] = set()
            end_of_requests = object()

            async def answer(item: pb.ClassifyManyRequest) -> None:
                correlation_id = item.correlation_id
                try:
                    if not item.HasField("request"):
                        raise InvalidRequestError("the item has no request")
                    engine, job = await self._submit(item.request, context)
                    jobs.add(job)
                    try:
                        result = await _wait(job)
                    finally:
                        jobs.discard(job)
                    answers.put_nowait(
                        pb.ClassifyManyResponse(
                            correlation_id=correlation_id,
                            result=result_message(
                                engine.describe(result, return_attention=item.request.return_attention)
                            ),
                        )
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # noqa: BLE001 - one slide's failure is an error item, not the stream's end
                    if not isinstance(error, XmagError):
                        log.error("a ClassifyMany slide failed with an unexpected %s", type(error).__name__)
                    self._count("ClassifyMany.item", grpc_error_of(error)[0].name)
                    answers.put_nowait(pb.ClassifyManyResponse(correlation_id=correlation_id, error=slide_error(error)))
                finally:
                    window.release()

            async def read_requests() -> None:
                # The window is taken before the next request is read, so a client streaming
                # thousands of slides is held back by gRPC flow control instead of filling the queue.
                tasks = set()
                try:
                    async for item in request_iterator:
                        await window.acquire()
                        tasks.add(asyncio.create_task(answer(item)))
                    await asyncio.gather(*tasks)
                finally:
                    for task in tasks:
                        task.cancel()
                    answers.put_nowait(end_of_requests)

            reader = asyncio.create_task(read_requests())
            try:
                while (item := await answers.get()) is not end_of_requests:
                    yield item
                await reader
            except asyncio.CancelledError:
                outcome["status"] = "CANCELLED"
                raise
            finally:
                reader.cancel()
                for job in list(jobs):
                    job.cancel()

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        with self._counted("ListModels") as outcome:
            try:
                engine = self.holder.require()
            except XmagError as error:
                await self._abort(context, error, outcome)
            return pb.ListModelsResponse(
                model=model_message(engine.model.info),
                tasks=[pb.TaskInfo(name=name, class_names=classes) for name, classes in engine.model.tasks.items()],
                tile_size_px=engine.spec.tile_size_px,
                target_mpp=engine.spec.target_mpp,
            )

    # -- translation helpers -----------------------------------------------

    async def _submit(self, request: pb.ClassifyRequest, context, on_event=None) -> tuple[Engine, SlideJob]:
        engine = self.holder.require()
        limits = [request.timeout_s] if request.HasField("timeout_s") else []
        remaining = context.time_remaining()
        if remaining is not None:
            limits.append(remaining)
        if any(limit <= 0 for limit in limits):
            raise InvalidRequestError("timeout_s must be positive")
        if request.HasField("mpp") and not 0.01 < request.mpp <= 100:
            raise InvalidRequestError(f"mpp must be in (0.01, 100] µm/px, got {request.mpp}")
        # The path guard stats the file, which can block on a network share: off the event loop.
        job = await asyncio.to_thread(
            engine.submit,
            request.slide_path,
            list(request.tasks) or None,
            fallback_mpp=request.mpp if request.HasField("mpp") else None,
            timeout_s=min(limits) if limits else None,
            on_event=on_event,
        )
        return engine, job

    async def _abort(self, context, error: BaseException, outcome: dict) -> None:
        status, code, message = grpc_error_of(error)
        outcome["status"] = status.name
        metadata = [("xmag-error-code", code)]
        if isinstance(error, RetryLaterError):
            metadata.append(("retry-after", str(error.retry_after_s)))
        await context.abort(status, message, trailing_metadata=tuple(metadata))

    def _count(self, method: str, status: str) -> None:
        self.metrics.requests.labels("grpc", method, status).inc()

    def _counted(self, method: str):
        servicer = self

        class _Counted:
            def __enter__(self):
                self.outcome = {"status": "OK"}
                return self.outcome

            def __exit__(self, kind, error, traceback):
                if kind is not None and self.outcome["status"] == "OK":
                    self.outcome["status"] = "INTERNAL" if not issubclass(kind, asyncio.CancelledError) else "CANCELLED"
                servicer._count(method, self.outcome["status"])
                return False

        return _Counted()


async def _wait(job: SlideJob) -> EngineResult:
    """The job's result; a cancelled await (call cancelled, deadline passed) cancels the slide."""
    try:
        return await asyncio.wrap_future(job.future)
    except asyncio.CancelledError:
        job.cancel()
        raise


def _progress(event: SlideEvent) -> pb.ClassifyEvent:
    return pb.ClassifyEvent(
        progress=pb.Progress(stage=_STAGES[event.stage], tiles_done=event.tiles_done, tiles_total=event.tiles_total)
    )


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for xmag.v1 calls without a valid `authorization: Bearer <key>`; health and reflection stay open."""

    def __init__(self, api_keys: list[str], metrics: ServiceMetrics):
        self.api_keys = [key.encode() for key in api_keys]
        self.metrics = metrics

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if not self.api_keys or handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        offered = dict(details.invocation_metadata or ()).get("authorization", "")
        token = offered[len("Bearer ") :].encode() if offered.startswith("Bearer ") else b""
        if any([hmac.compare_digest(token, key) for key in self.api_keys]):
            return handler
        self.metrics.requests.labels("grpc", details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED").inc()
        return _refusing_handler(handler)


def _refusing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "a valid API key is required: send metadata 'authorization: Bearer <key>'"

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached; makes this an async generator, as streaming handlers are

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **serializers)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **serializers)


class GrpcFace:
    """The running gRPC server, its health servicer kept in step with the engine's readiness."""

    def __init__(self, server: grpc.aio.Server, port: int, health_servicer, watcher: asyncio.Task):
        self.server = server
        self.port = port
        self._health = health_servicer
        self._watcher = watcher

    async def stop(self, grace_s: float) -> None:
        """Stop taking calls, let running ones finish for up to `grace_s`, then stop."""
        self._watcher.cancel()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)


async def start_grpc_face(holder: EngineHolder, settings: ServiceSettings, metrics: ServiceMetrics) -> GrpcFace:
    """Start the gRPC server on settings.host:settings.grpc_port (0: any free port; see GrpcFace.port)."""
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(settings.api_keys, metrics)],
        options=[
            ("grpc.max_receive_message_length", settings.grpc_max_receive_bytes),
            ("grpc.max_send_message_length", settings.grpc_max_send_bytes),
        ],
    )
    pb_grpc.add_SlideClassifierServicer_to_server(
        SlideClassifierServicer(holder, metrics, settings.max_concurrent_slides), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:  # grpc reports a port in use this way
        raise OSError(
            f"cannot listen for gRPC on {address} (in use?): pass another --grpc-port, or --no-grpc"
        ) from error
    await server.start()
    watcher = asyncio.create_task(_follow_readiness(holder, health_servicer))
    return GrpcFace(server, port, health_servicer, watcher)


async def _follow_readiness(holder: EngineHolder, health_servicer) -> None:
    """Report SERVING exactly while the engine is ready (loading, failed and shutting down are NOT_SERVING)."""
    serving = None
    started = time.monotonic()
    while True:
        ready = holder.engine is not None and holder.engine.ready
        if ready != serving:
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            for service in ("", SERVICE_NAME):
                await health_servicer.set(service, status)
            serving = ready
            log.debug("gRPC health %s after %.1f s", "SERVING" if ready else "NOT_SERVING", time.monotonic() - started)
        await asyncio.sleep(0.2)
