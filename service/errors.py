"""Typed errors of the engine, beside the core's (`xmag.errors`), and what each means to a caller.

`STATUS_BY_ERROR` is the one place that decides the status of every typed
error, for both faces: the HTTP status REST answers and the gRPC status code
(by name, so this module needs no gRPC). The engine raises the errors and
knows nothing of either protocol.
"""

from __future__ import annotations

from typing import NamedTuple

from xmag.errors import (
    CorruptSlideError,
    MissingResolutionError,
    NotASlideError,
    NoTissueError,
    RetryLaterError,
    SlideNotFoundError,
    TooManyTilesError,
    XmagError,
)
from xmag.inference import EncoderRemoteError


class SlidePathForbiddenError(XmagError):
    """The slide path resolves, after symlinks, outside every allowed slide root; it was not opened."""

    code = "slide_path_forbidden"


class InvalidRequestError(XmagError):
    """A request parameter is wrong in a way the schema cannot express (e.g. an unknown task)."""

    code = "invalid_request"


class UnknownTaskError(InvalidRequestError):
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
}
INTERNAL = CallerStatus(500, "INTERNAL")


def status_of(error: BaseException) -> CallerStatus:
    """The status of a typed error (its nearest listed class); INTERNAL for anything unexpected."""
    if isinstance(error, XmagError):
        for cls in type(error).__mro__:
            if cls in STATUS_BY_ERROR:
                return STATUS_BY_ERROR[cls]
    return INTERNAL
