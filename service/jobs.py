"""One admitted slide's job: its future, its cancellation flag and its state, and the result it resolves to."""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from xmag.errors import XmagError
from xmag.pipeline import SlideEvent, SlideResult
from xmag.service.errors import SlideCancelledError

EventListener = Callable[[SlideEvent], None]


@dataclass(frozen=True)
class EngineResult:
    job_id: str
    slide: SlideResult  # predictions already narrowed to the requested tasks
    timings_s: dict[str, float]  # queue, open, tissue, read, encode, heads, total


class JobStopped(Exception):
    """Raised inside the pipeline of a job that was cancelled or ran out of time."""


class SlideJob:
    """One admitted slide. `future` resolves to an EngineResult or raises a typed error.

    `stop` is the engine's: it settles the job with a typed error (at once if
    the job is still queued, at the pipeline's next chunk if it is running).
    """

    def __init__(
        self,
        stop: Callable[[SlideJob, XmagError], None],
        real_path: Path,
        tasks: list[str],
        fallback_mpp: float | None,
        timeout_s: float,
        on_event: EventListener | None,
    ):
        self.id = uuid.uuid4().hex
        self.real_path = real_path
        self.tasks = tasks
        self.fallback_mpp = fallback_mpp
        self.timeout_s = timeout_s
        self.on_event = on_event
        self.future: concurrent.futures.Future[EngineResult] = concurrent.futures.Future()
        # Running from the start, so a waiter cancelling its own wait (asyncio.wrap_future does, when its
        # task is cancelled) cannot cancel the job's future: only the engine settles it, through `cancel()`.
        self.future.set_running_or_notify_cancel()
        self.cancelled = threading.Event()  # set on cancel or timeout; the scheduler watches it
        self.admitted_at = time.monotonic()
        self.state: Literal["queued", "running", "done"] = "queued"
        self.stop_reason: XmagError | None = None
        self._stop = stop

    def cancel(self) -> None:
        """Stop the slide: released at once if queued; remaining tiles withdrawn if running."""
        self._stop(self, SlideCancelledError("the slide was cancelled by its caller"))
