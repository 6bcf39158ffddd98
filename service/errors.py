"""Typed errors of the engine, beside the core's (`xmag.errors`), and what each means to a caller.

`STATUS_BY_ERROR` is the one place that decides the status of every typed
error, for both faces: the HTTP status REST answers and the gRPC status code
(by name, so this module needs no gRPC). The engine raises the errors and
knows nothing of either protocol. Every error of the core and of the service
is listed (itself or a base class; tests/test_errors.py fails otherwise),
except `CLIENT_SIDE_ERRORS`, which the service's own clients raise and no
answer carries. docs/errors.md is generated from this table.
"""

from __future__ import annotations

from typing import NamedTuple

from xmag.errors import (
    CheckpointError,
    CorruptSlideError,
    MissingResolutionError,
    NotASlideError,
    NoTissueError,
    RetryLaterError,
    SlideError,
    SlideNotFoundError,
    SlideReaderUnavailableError,
    TooManyTilesError,
    XmagError,
)
from xmag.features import FeatureFileError
from xmag.model_repo import ModelRepositoryError
from xmag.runtimes.protocols import EncoderBackendUnavailableError
from xmag.runtimes.tensorrt_backend import TensorRTEngineError, TensorRTUnavailableError
from xmag.runtimes.triton_backend import EncoderRemoteError


class SlidePathForbiddenError(XmagError):
    """The slide path resolves, after symlinks, outside every allowed slide root; it was not opened."""

    code = "slide_path_forbidden"


class InvalidRequestError(XmagError):
    """A request parameter is wrong in a way the schema cannot express (e.g. an unknown task)."""

    code = "invalid_request"


class UnknownTaskError(InvalidRequestError):
    """A requested task is not one of the model's (GET /v1/models lists them)."""

    code = "unknown_task"


class QueueFullError(RetryLaterError):
    """Too many slides are admitted already; the caller should retry after `retry_after_s`."""

    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, retry_after_s)  # no default: the engine estimates it from recent slides


class NotReadyError(RetryLaterError):
    """The model is still loading or warming up, or the service is shutting down."""

    code = "not_ready"


class SlideTimeoutError(XmagError):
    """A slide did not finish within its time limit; its remaining work was cancelled."""

    code = "timeout"


class SlideCancelledError(XmagError):
    """The caller cancelled the slide (or went away); its remaining work was stopped."""

    code = "cancelled"


class ResultNotFoundError(XmagError):
    """A stored result (heatmap, GeoJSON) is unknown or has expired from the result store."""

    code = "result_not_found"


class DemoError(XmagError):
    """The main job (`xmag demo`) could not start the service or classify the demo slide through it."""

    code = "demo_failed"


class LisClientError(XmagError):
    """`xmag lis-client` could not stream a folder to the service (no slides, or the stream broke)."""

    code = "lis_client_failed"


class CallerStatus(NamedTuple):
    http: int
    grpc: str  # a grpc.StatusCode name


STATUS_BY_ERROR: dict[type[XmagError], CallerStatus] = {
    SlidePathForbiddenError: CallerStatus(403, "PERMISSION_DENIED"),
    SlideNotFoundError: CallerStatus(404, "NOT_FOUND"),
    ResultNotFoundError: CallerStatus(404, "NOT_FOUND"),
    NotASlideError: CallerStatus(415, "INVALID_ARGUMENT"),
    TooManyTilesError: CallerStatus(413, "RESOURCE_EXHAUSTED"),
    CorruptSlideError: CallerStatus(422, "INVALID_ARGUMENT"),
    NoTissueError: CallerStatus(422, "INVALID_ARGUMENT"),
    MissingResolutionError: CallerStatus(422, "INVALID_ARGUMENT"),
    InvalidRequestError: CallerStatus(422, "INVALID_ARGUMENT"),
    QueueFullError: CallerStatus(429, "RESOURCE_EXHAUSTED"),
    SlideCancelledError: CallerStatus(499, "CANCELLED"),  # the caller went away; nobody reads this answer
    NotReadyError: CallerStatus(503, "UNAVAILABLE"),
    EncoderRemoteError: CallerStatus(503, "UNAVAILABLE"),  # the Triton server failed or went away; retry
    SlideTimeoutError: CallerStatus(504, "DEADLINE_EXCEEDED"),
    SlideError: CallerStatus(422, "INVALID_ARGUMENT"),  # any other problem with the slide the caller sent
    RetryLaterError: CallerStatus(503, "UNAVAILABLE"),
    # The service cannot run its model here (its configuration, not the request): /readyz says so too.
    SlideReaderUnavailableError: CallerStatus(503, "UNAVAILABLE"),
    ModelRepositoryError: CallerStatus(503, "UNAVAILABLE"),
    CheckpointError: CallerStatus(503, "UNAVAILABLE"),
    EncoderBackendUnavailableError: CallerStatus(503, "UNAVAILABLE"),
    TensorRTUnavailableError: CallerStatus(503, "UNAVAILABLE"),
    TensorRTEngineError: CallerStatus(503, "UNAVAILABLE"),
    # Feature files are the service's own (its embedding cache ignores and rewrites a bad one); reaching a caller is a bug.
    FeatureFileError: CallerStatus(500, "INTERNAL"),
}
CLIENT_SIDE_ERRORS: tuple[type[XmagError], ...] = (DemoError, LisClientError)
INTERNAL = CallerStatus(500, "INTERNAL")


def status_of(error: BaseException) -> CallerStatus:
    """The status of a typed error (its nearest listed class); INTERNAL for anything unexpected."""
    if isinstance(error, XmagError):
        for cls in type(error).__mro__:
            if cls in STATUS_BY_ERROR:
                return STATUS_BY_ERROR[cls]
    return INTERNAL
