"""The slide-path guard: a requested path must resolve, after symlinks, inside an allowed root.

The check uses only `os.path.realpath` and `os.stat`, which never open the
file, so a path outside the roots is refused without its content (or a device,
or a FIFO that would block) ever being touched.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from xmag.errors import SlideNotFoundError
from xmag.service.errors import InvalidRequestError, SlidePathForbiddenError


class SlidePathGuard:
    def __init__(self, roots: Sequence[str | os.PathLike]):
        self.roots = tuple(Path(os.path.realpath(root)) for root in roots)

    def resolve(self, slide_path: str) -> Path:
        """The real path of an allowed slide; raises SlidePathForbiddenError, SlideNotFoundError or InvalidRequestError.

        A relative path is taken relative to the first root.
        """
        if not slide_path or "\x00" in slide_path:
            raise InvalidRequestError("slide_path must be a non-empty path without NUL characters")
        if not self.roots:
            raise SlidePathForbiddenError(
                "This service has no allowed slide roots, so it reads no slides. Start it with --slide-root DIR."
            )
        requested = Path(slide_path)
        if not requested.is_absolute():
            requested = self.roots[0] / requested
        real = Path(os.path.realpath(requested))
        if not any(real == root or real.is_relative_to(root) for root in self.roots):
            raise SlidePathForbiddenError(
                "slide_path is outside the directories this service may read (its allowed slide roots); "
                "symbolic links are followed before the check"
            )
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            raise SlideNotFoundError(f"No slide at {slide_path}: the file does not exist.", slide_path) from None
        except OSError as error:
            raise SlideNotFoundError(f"Cannot access {slide_path}: {error.strerror}.", slide_path) from None
        if not stat.S_ISREG(mode):
            raise SlideNotFoundError(f"{slide_path} is not a regular file (a directory or a device?).", slide_path)
        return real
