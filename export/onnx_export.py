"""ONNX export of the encoder and the slide heads, with their parity against torch fp32.

The encoder graph takes uint8 RGB NHWC tiles with a dynamic batch and returns
the class-token embedding; normalisation is inside it and the position
embedding is a constant. Each head graph takes one slide's (N, D) features with
a dynamic N and returns class probabilities and the attention weights.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxscript  # noqa: F401 - torch's exporter needs it; imported here so a missing [export] extra shows at once
import torch
from torch import nn

from xmag.contract import EMBEDDING_OUTPUT, TILES_INPUT
from xmag.errors import XmagError
from xmag.export import triton_config
from xmag.model_repo import Parity
from xmag.models.abmil import GatedABMIL
from xmag.models.encoder import TileEncoder

OPSET = 18  # >= 17 for a native LayerNormalization op, which TensorRT maps to its normalisation layer
# The graphs' tensor names are the ones the Triton configs declare: the encoder's are the contract's.
HEAD_INPUT = triton_config.FEATURES_INPUT
HEAD_OUTPUTS = (triton_config.PROBABILITIES_OUTPUT, triton_config.ATTENTION_OUTPUT)
# Bounds for fp32 ONNX against torch fp32. Both run the same fp32 arithmetic
# in a different order; on outputs of magnitude ~1 (after the final
# LayerNorm) the differences measured ~3e-6, so 1e-4 leaves room for other
# CPUs and kernels while still catching any real graph error (a wrong
# position embedding moves outputs by ~0.1).
FP32_MAX_ABS_ERROR = 1e-4
FP32_MIN_COSINE = 0.9999
# Dynamic int8 quantisation changes the arithmetic: it is served only if every
# embedding keeps a cosine of at least this to torch fp32 (see README).
INT8_MIN_COSINE = 0.999
# The int8 graph is judged on more tiles than fp32: its error varies from tile to tile far more (on CPUs
# without VNNI, such as AVX2-only AMD EPYC, a batch of 8 random tiles gave a lowest cosine anywhere from
# 0.9973 to 0.9994 by seed), so a small probe would pass an int8 graph that misses the bound on other tiles.
INT8_PARITY_BATCH_SIZES = (1, 7, 24)


class ParityError(XmagError):
    """An exported artifact does not reproduce torch fp32 within the bounds."""

    code = "parity_error"


class _HeadForExport(nn.Module):
    """A GatedABMIL whose outputs are what a client wants: probabilities, not logits."""

    def __init__(self, head: GatedABMIL):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, attention = self.head(features)
        return torch.softmax(logits, dim=-1), attention


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_names, dynamic_dim_name: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter narrates every step and warns about its own internals (a
    # torchvision it does not need, a deprecation inside torch.export); keep
    # the command's output to what concerns the user.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
        torch.onnx.export(
            module.eval(),
            (example,),
            str(path),
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_shapes=({0: torch.export.Dim(dynamic_dim_name, min=1, max=1 << 20)},),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    onnx.checker.check_model(str(path), full_check=True)


def export_encoder(encoder: TileEncoder, path: Path) -> None:
    """Write the encoder as ONNX (uint8 NHWC `tiles` with a dynamic batch -> `embedding`)."""
    size = encoder.tile_size_px
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    _export(encoder, example, path, TILES_INPUT, [EMBEDDING_OUTPUT], "batch")


def export_head(head: GatedABMIL, path: Path) -> None:
    """Write one head as ONNX (`features` (N, D) with dynamic N -> `probabilities`, `attention`)."""
    example = torch.zeros((3, head.in_dim), dtype=torch.float32)
    _export(_HeadForExport(head), example, path, HEAD_INPUT, HEAD_OUTPUTS, "tiles")


def _compare(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(max abs error, min cosine over rows)."""
    reference = reference.reshape(len(reference), -1).astype(np.float64)
    candidate = candidate.reshape(len(candidate), -1).astype(np.float64)
    cosine = (reference * candidate).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1))
    return float(np.abs(reference - candidate).max()), float(cosine.min())


def encoder_parity(encoder: TileEncoder, onnx_path: Path, batch_sizes=(1, 7), seed: int = 0) -> Parity:
    """Run torch fp32 and onnxruntime (CPU) on the same random tiles; return the worst errors."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst_abs, worst_cosine = 0.0, 1.0
    size = encoder.tile_size_px
    for batch in batch_sizes:
        tiles = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        with torch.inference_mode():
            reference = encoder(torch.from_numpy(tiles)).numpy()
        candidate = session.run(None, {TILES_INPUT: tiles})[0]
        max_abs, min_cosine = _compare(reference, candidate)
        worst_abs, worst_cosine = max(worst_abs, max_abs), min(worst_cosine, min_cosine)
    return Parity(max_abs_error=worst_abs, min_cosine=worst_cosine, batch_sizes=list(batch_sizes))


def head_parity(head: GatedABMIL, onnx_path: Path, tile_counts=(1, 1000), seed: int = 0) -> Parity:
    """Probabilities and attention of torch fp32 and onnxruntime on the same random features."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst_abs, worst_cosine = 0.0, 1.0
    wrapped = _HeadForExport(head).eval()
    for count in tile_counts:
        features = rng.standard_normal((count, head.in_dim)).astype(np.float32)
        with torch.inference_mode():
            references = [output.numpy() for output in wrapped(torch.from_numpy(features))]
        candidates = session.run(list(HEAD_OUTPUTS), {HEAD_INPUT: features})
        for reference, candidate in zip(references, candidates, strict=False):
            max_abs, min_cosine = _compare(reference[None], candidate[None])
            worst_abs, worst_cosine = max(worst_abs, max_abs), min(worst_cosine, min_cosine)
    return Parity(max_abs_error=worst_abs, min_cosine=worst_cosine, batch_sizes=list(tile_counts))


def check_fp32_parity(parity: Parity, what: str) -> None:
    """Raise ParityError when an fp32 artifact misses the bounds above."""
    if parity.max_abs_error > FP32_MAX_ABS_ERROR or parity.min_cosine < FP32_MIN_COSINE:
        raise ParityError(
            f"{what}: ONNX differs from torch fp32 by max abs {parity.max_abs_error:.3g} (bound {FP32_MAX_ABS_ERROR}) "
            f"and min cosine {parity.min_cosine:.6f} (bound {FP32_MIN_COSINE}); the export is wrong"
        )


def quantize_encoder_int8(onnx_path: Path, int8_path: Path) -> None:
    """Dynamic int8 quantisation of the encoder's matrix multiplications, for onnxruntime on the CPU."""
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    # onnxruntime logs a generic "consider pre-processing" hint on the root logger at every call.
    root_logger = logging.getLogger()
    previous_level = root_logger.level
    root_logger.setLevel(logging.ERROR)
    try:
        _quantize(onnx_path, int8_path)
    finally:
        root_logger.setLevel(previous_level)


def _quantize(onnx_path: Path, int8_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel weights keep the error of wide layers (MLP fc1/fc2) down; only MatMul
    # is quantised: the patch-embedding convolution stays fp32, as it sees raw pixels.
    quantize_dynamic(
        str(onnx_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
    )
