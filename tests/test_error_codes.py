"""Every typed error has its own stable code, and every error a service answer can carry has a status.

The errors are found by importing every module of the installed package, so a
new error class anywhere is checked without being listed here.
"""

from __future__ import annotations

import importlib
import pkgutil
import re

import pytest
from cli_support import xmag_without

from xmag.errors import XmagError
from xmag.service.errors import CLIENT_SIDE_ERRORS, STATUS_BY_ERROR

# Errors of these faces are raised by tools run by hand, never in answer to a service call.
NOT_SERVING_FACES = ("xmag.export", "xmag.benchmarks", "xmag.training", "xmag.cli")


def _every_error_class() -> list[type[XmagError]]:
    for package in ("xmag", "xmag.cli", "xmag.service", "xmag.export", "xmag.training", "xmag.benchmarks"):
        module = importlib.import_module(package)
        for found in pkgutil.walk_packages(module.__path__, f"{package}."):
            if not found.name.endswith("__main__"):  # running it would run the command
                importlib.import_module(found.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    classes = sorted(set(subclasses(XmagError)), key=lambda cls: (cls.__module__, cls.__name__))
    assert len(classes) > 20  # the walk found the package's errors
    return classes


ERRORS = _every_error_class()


@pytest.mark.parametrize("error", ERRORS, ids=lambda cls: cls.__name__)
def test_every_error_has_a_code_of_its_own(error):
    assert "code" in vars(error), f"{error.__module__}.{error.__name__} inherits code {error.code!r}; give it its own"
    assert re.fullmatch(r"[a-z][a-z0-9_]+", error.code), error.code


def test_codes_are_unique():
    by_code: dict[str, list[str]] = {}
    for error in ERRORS:
        by_code.setdefault(error.code, []).append(error.__name__)
    assert {code: names for code, names in by_code.items() if len(names) > 1} == {}


@pytest.mark.parametrize(
    "error",
    [e for e in ERRORS if not e.__module__.startswith(NOT_SERVING_FACES) and e not in CLIENT_SIDE_ERRORS],
    ids=lambda cls: cls.__name__,
)
def test_every_error_a_service_can_raise_has_a_status(error):
    listed = [cls for cls in error.__mro__ if cls in STATUS_BY_ERROR]
    assert listed, f"{error.__name__} is not in service/errors.py's STATUS_BY_ERROR (itself or a base class)"


def test_the_status_table_lists_only_typed_errors():
    assert all(issubclass(error, XmagError) for error in STATUS_BY_ERROR)


def test_the_service_refuses_to_start_without_its_reader_backend(tmp_path):
    completed = xmag_without(
        ["cucim"], "serve", "--reader-backend", "cucim", "--slide-root", str(tmp_path), "--model-repo", str(tmp_path)
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "cuCIM is not installed" in completed.stderr and "Traceback" not in completed.stderr
    assert "serving REST" not in completed.stdout
