"""Typed errors of the engine, beside the core's (`xmag.errors`).

The faces map every class to a status (REST in `service.rest`, gRPC in its
servicer), in one place each; the engine raises them and knows nothing of
either protocol.
"""

from __future__ import annotations

from xmag.errors import XmagError


class SlidePathForbiddenError(XmagError):
    """The slide path resolves, after symlinks, outside every allowed slide root; it was not opened."""

    code = "slide_path_forbidden"


class InvalidRequestError(XmagError):
    """A request parameter is wrong in a way the schema cannot express (e.g. an unknown task)."""

    code = "invalid_request"


class UnknownTaskError(InvalidRequestError):
    code = "unknown_task"


class QueueFullError(XmagError):
    """Too many slides are admitted already; the caller should retry after `retry_after_s`."""

    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(XmagError):
    """The model is still loading or warming up, or the service is shutting down."""

    code = "not_ready"

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SlideTimeoutError(XmagError):
    """A slide did not finish within its time limit; its remaining work was cancelled."""

    code = "timeout"


class SlideCancelledError(XmagError):
    """The caller cancelled the slide (or went away); its remaining work was stopped."""

    code = "cancelled"


class ResultNotFoundError(XmagError):
    """A stored result (heatmap, GeoJSON) is unknown or has expired from the result store."""

    code = "result_not_found"
