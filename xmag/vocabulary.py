"""The words the settings, the command line and the runtimes accept, each vocabulary written once.

Each is a `typing.Literal` type, for annotations and pydantic fields, and the
tuple of its words, for checks and messages.
"""

from __future__ import annotations

from typing import Literal, get_args

# The slide readers (xmag/slide/reader.py).
ReaderBackend = Literal["openslide", "cucim"]
READER_BACKENDS: tuple[str, ...] = get_args(ReaderBackend)

# The encoder backends and precisions `select_encoder_runtime` accepts; "auto" lets it measure and choose.
EncoderBackend = Literal["auto", "torch", "onnxruntime", "tensorrt", "triton"]
ENCODER_BACKENDS: tuple[str, ...] = get_args(EncoderBackend)
EncoderPrecision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
ENCODER_PRECISIONS: tuple[str, ...] = get_args(EncoderPrecision)

# The precisions the torch backend runs the encoder in: fp32, or under bf16 or fp16 autocast.
TorchPrecision = Literal["fp32", "bf16", "fp16"]
TORCH_PRECISIONS: tuple[str, ...] = get_args(TorchPrecision)
