"""Typed errors of the XMAG core.

Every failure a user can cause (a wrong path, a broken file, a slide without
resolution metadata, an incompatible checkpoint) raises one of these, with a
message that says what was wrong and what to do about it. The faces (REST,
gRPC, the command line) map these classes to status codes in one place each;
the core never knows about HTTP or gRPC.
"""

from __future__ import annotations


class XmagError(Exception):
    """Base class of every error the core raises on purpose.

    `code` is a short stable name for the kind of failure: the faces put it in
    error bodies and metric labels, so clients and dashboards need not parse messages.
    """

    code = "error"


class RetryLaterError(XmagError):
    """A failure that passes: the caller should try again after `retry_after_s` seconds.

    The faces say so to the caller (REST's Retry-After header, gRPC's retry-after metadata).
    """

    code = "retry_later"

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SlideError(XmagError):
    """A problem with one slide; `slide_path` names it for the caller (not for logs)."""

    code = "slide_error"

    def __init__(self, message: str, slide_path: str | None = None):
        super().__init__(message)
        self.slide_path = slide_path


class SlideNotFoundError(SlideError):
    """The path does not exist or is not a regular file."""

    code = "slide_not_found"


class NotASlideError(SlideError):
    """The file exists but no slide reader recognises its format."""

    code = "not_a_slide"


class CorruptSlideError(SlideError):
    """The file looks like a slide but cannot be decoded (truncated, damaged tiles)."""

    code = "corrupt_slide"


class MissingResolutionError(SlideError):
    """The slide states neither its microns per pixel nor its objective power."""

    code = "missing_resolution"


class NoTissueError(SlideError):
    """Tissue detection found nothing to tile on the slide."""

    code = "no_tissue"


class TooManyTilesError(SlideError):
    """The slide's tile grid exceeds the configured cap on tiles per slide."""

    code = "too_many_tiles"

    def __init__(self, message: str, slide_path: str | None = None, tile_count: int = 0, max_tiles: int = 0):
        super().__init__(message, slide_path)
        self.tile_count = tile_count
        self.max_tiles = max_tiles


class SlideReaderUnavailableError(XmagError):
    """A reader backend was requested that is not installed."""

    code = "reader_unavailable"


class CheckpointError(XmagError):
    """A checkpoint file cannot be read, or does not fit the model it is loaded into."""

    code = "checkpoint_error"

    def __init__(
        self,
        message: str,
        missing_keys: list[str] | None = None,
        unexpected_keys: list[str] | None = None,
        mismatched_shapes: list[str] | None = None,
    ):
        super().__init__(message)
        self.missing_keys = missing_keys or []
        self.unexpected_keys = unexpected_keys or []
        self.mismatched_shapes = mismatched_shapes or []
