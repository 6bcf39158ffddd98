"""Reading any weight file into a flat state dict, and guessing which format it is in.

`CHECKPOINT_FORMATS` names the formats; `conversion` describes each of them.
Our own files are told apart by the `format` entry of their metadata
(`XMAG_ENCODER_FORMAT_TAG`), as their keys are the same as timm's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import torch

from xmag.errors import CheckpointError

CHECKPOINT_FORMATS = ("dinov2_hub", "timm", "xmag_release", "hf_vit", "xmag")

# Value of the "format" metadata entry in our own safetensors files.
XMAG_ENCODER_FORMAT_TAG = "xmag-encoder"

# Prefix of the student's keys in the official XMAG release checkpoint.
XMAG_RELEASE_STUDENT_PREFIX = "model."

_TORCH_PICKLE_SUFFIXES = (".pth", ".pt", ".bin")

# How many key names an error message lists per kind of problem.
_MAX_KEYS_IN_MESSAGE = 10


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file, on the CPU.

    `.safetensors` files are read with safetensors; `.pth`, `.pt` and `.bin`
    with `torch.load(weights_only=True)`, which refuses to run pickled code.
    A checkpoint wrapped as {"state_dict": {...}} is unwrapped, and nested
    dicts are flattened to dotted key names ({"model": {"x": t}} gives
    "model.x"); non-tensor entries (epoch counters, settings) are dropped.
    Raises CheckpointError if the file is missing, unreadable or holds no tensors.
    """
    return read_checkpoint(Path(path))[0]


def detect_checkpoint_format(state_dict: Mapping[str, Any]) -> str:
    """Guess the format of a flat state dict from its key names.

    Keys under `model.` mean the XMAG release; a `mask_token` or
    `register_tokens` means an official DINOv2 hub file; anything else is
    taken to be timm-named. Our own files are recognised by their metadata
    (see `load_vit_weights`), as their keys are the same as timm's.
    """
    if any(key.startswith(XMAG_RELEASE_STUDENT_PREFIX) for key in state_dict):
        return "xmag_release"
    if "mask_token" in state_dict or "register_tokens" in state_dict:
        return "dinov2_hub"
    if any("embeddings.patch_embeddings." in key for key in state_dict):
        return "hf_vit"
    return "timm"


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (flattened, on the CPU) and string metadata (safetensors only) of a file."""
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file not found: {path}. Check the path (and that the volume holding "
            "the model files is mounted)."
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:
            raise CheckpointError(
                f"cannot read safetensors checkpoint {path}: {error}. The file is damaged or "
                "incomplete (an interrupted copy?); copy it again from its source."
            ) from error
        return flatten_checkpoint(tensors, source=str(path)), metadata
    if suffix in _TORCH_PICKLE_SUFFIXES:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(
                f"cannot read PyTorch checkpoint {path}: {error}. Either the file is damaged or "
                "incomplete (copy it again), or it holds Python objects besides tensors, which "
                "are not loaded for safety (re-save just the state dict)."
            ) from error
        return flatten_checkpoint(checkpoint, source=str(path)), {}
    raise CheckpointError(
        f"unsupported checkpoint file type {path.suffix!r} for {path}; expected .safetensors "
        f"or one of {', '.join(_TORCH_PICKLE_SUFFIXES)}"
    )


def flatten_checkpoint(checkpoint: Any, source: str = "the given state dict") -> dict[str, torch.Tensor]:
    """Unwrap {"state_dict": ...} and flatten nested dicts to dotted key names."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a dict of tensors (a state dict)")
    if isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    flat: dict[str, torch.Tensor] = {}

    def collect(prefix: str, mapping: Mapping[str, Any]) -> None:
        for key, value in mapping.items():
            if isinstance(value, torch.Tensor):
                flat[prefix + str(key)] = value
            elif isinstance(value, Mapping):
                collect(f"{prefix}{key}.", value)

    collect("", checkpoint)
    if not flat:
        raise CheckpointError(f"{source} holds no tensors; is it a model checkpoint?")
    return flat


def list_keys(keys: list[str], separator: str = ", ") -> str:
    shown = separator.join(keys[:_MAX_KEYS_IN_MESSAGE])
    if len(keys) > _MAX_KEYS_IN_MESSAGE:
        shown += f", ... and {len(keys) - _MAX_KEYS_IN_MESSAGE} more"
    return shown
