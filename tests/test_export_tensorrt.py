"""TensorRT build path: engine file names, and a clear refusal where TensorRT is missing.

The build and the parity check themselves need an NVIDIA GPU with TensorRT, which
development machines and CI lack; here we check what works everywhere.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import numpy as np
import pytest

import xmag.export.tensorrt_build as tensorrt_build
from xmag.errors import XmagError
from xmag.export.tensorrt_build import (
    build_tensorrt_engine,
    check_engine_parity,
    compare_embeddings,
    engine_filename,
    parse_engine_filename,
    require_tensorrt,
)
from xmag.runtimes.tensorrt_backend import TensorRTUnavailableError

# Public functions that work without TensorRT; every other one needs it.
PURE_FUNCTIONS = {"engine_filename", "parse_engine_filename", "compare_embeddings"}
TENSORRT_FUNCTIONS = {"build_tensorrt_engine", "check_engine_parity", "require_tensorrt"}


@pytest.mark.parametrize(
    "capability, version, filename, release",
    [
        ((9, 0), "10.8.0", "model.sm90.trt10.8.0.plan", "10.8.0"),
        ((8, 9), "10.8.0.43", "model.sm89.trt10.8.0.plan", "10.8.0"),
        ((12, 0), "10.13.2.6", "model.sm120.trt10.13.2.plan", "10.13.2"),
        ((8, 0), "10.08.0", "model.sm80.trt10.8.0.plan", "10.8.0"),
    ],
)
def test_engine_filename_round_trip(capability, version, filename, release):
    assert engine_filename(capability, version) == filename
    assert parse_engine_filename(filename) == (capability, release)
    path = Path("repo/xmag_student_trt/1") / filename
    assert parse_engine_filename(path) == (capability, release)


@pytest.mark.parametrize(
    "capability, version",
    [
        ((9, 10), "10.8.0"),  # CUDA minors are single digits
        ((0, 5), "10.8.0"),
        ([9, 0], "10.8.0"),
        ((9, 0), "10.8"),
        ((9, 0), "10.8.0.43.1"),
        ((9, 0), "ten"),
    ],
)
def test_engine_filename_refuses_what_it_could_not_read_back(capability, version):
    with pytest.raises(ValueError):
        engine_filename(capability, version)


@pytest.mark.parametrize(
    "name",
    [
        "model.onnx",
        "model.plan",
        "model.sm9.trt10.8.0.plan",
        "model.sm90.trt10.8.plan",
        "engine.sm90.trt10.8.0.plan",
        "model.sm90.trt10.8.0.plan.partial",
    ],
)
def test_parse_engine_filename_refuses_other_names(name):
    with pytest.raises(ValueError, match="not an engine file name"):
        parse_engine_filename(name)


def test_compare_embeddings():
    rows = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    same = compare_embeddings(rows, rows)
    assert same == {"max_abs_error": 0.0, "min_cosine": pytest.approx(1.0)}

    # A scaled row points the same way (cosine 1) but is off by its length.
    result = compare_embeddings(rows * [[2.0], [1.0]], rows)
    assert result["min_cosine"] == pytest.approx(1.0)
    assert result["max_abs_error"] == pytest.approx(3.0)

    orthogonal = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    assert compare_embeddings(orthogonal, rows)["min_cosine"] == pytest.approx(0.0)

    with pytest.raises(ValueError, match="same shape"):
        compare_embeddings(rows, rows[:1])


def test_every_public_function_is_classified():
    # A new public function must be added to one of the sets, and so to the test below.
    public = {
        name
        for name, function in inspect.getmembers(tensorrt_build, inspect.isfunction)
        if function.__module__ == tensorrt_build.__name__ and not name.startswith("_")
    }
    assert public == PURE_FUNCTIONS | TENSORRT_FUNCTIONS


@pytest.mark.parametrize(
    "call",
    [
        lambda tmp_path: build_tensorrt_engine(tmp_path / "encoder.onnx", tmp_path / "engines"),
        lambda tmp_path: check_engine_parity(tmp_path / "model.plan", tmp_path / "encoder.onnx"),
        lambda tmp_path: require_tensorrt(),
    ],
    ids=["build_tensorrt_engine", "check_engine_parity", "require_tensorrt"],
)
def test_tensorrt_functions_refuse_clearly_without_tensorrt(call, tmp_path):
    if importlib.util.find_spec("tensorrt"):
        pytest.skip(
            "TensorRT is installed: the refusal path cannot be tested here; "
            "the build path needs a GPU run, which CI does not have"
        )
    assert issubclass(TensorRTUnavailableError, XmagError)
    with pytest.raises(TensorRTUnavailableError) as caught:
        call(tmp_path)

    message = str(caught.value)
    assert "TensorRT cannot be imported" in message
    assert "NVIDIA GPU with its CUDA runtime" in message
    assert 'pip install "tensorrt>=10,<11"' in message
    assert "container" in message
    assert "The ONNX artifacts do not need TensorRT" in message
