"""Fitting a state dict into a model strictly, with errors that name what does not fit.

Every load ends in one strict check that names the missing, unexpected and
mis-shaped keys before anything is copied into the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from xmag.errors import CheckpointError
from xmag.models.checkpoints.conversion import CONVERTERS
from xmag.models.checkpoints.reading import (
    CHECKPOINT_FORMATS,
    XMAG_ENCODER_FORMAT_TAG,
    detect_checkpoint_format,
    flatten_checkpoint,
    list_keys,
    read_checkpoint,
)
from xmag.models.vit import VIT_CONFIGS, VisionTransformer, ViTConfig


def load_vit_weights(
    model: VisionTransformer,
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike,
    fmt: str = "auto",
) -> str:
    """Load a checkpoint into `model`, converting it from its format first.

    `state_dict_or_path` is a checkpoint file or an in-memory state dict
    (wrapped ones are unwrapped as in `read_state_dict`). `fmt` is one of
    CHECKPOINT_FORMATS, or "auto" to detect it (our own files by their
    metadata, the others by `detect_checkpoint_format`). Before anything is
    copied, the converted keys and shapes must match the model exactly;
    otherwise CheckpointError names the missing, unexpected and mis-shaped
    keys (also in its attributes) and the format it assumed. Returns the
    format used.
    """
    if fmt != "auto" and fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use 'auto' or one of {CHECKPOINT_FORMATS}")
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = Path(state_dict_or_path)
        state_dict, metadata = read_checkpoint(path)
        source = str(path)
        if fmt == "auto" and metadata.get("format") == XMAG_ENCODER_FORMAT_TAG:
            fmt = "xmag"
        if fmt == "xmag" and "vit_config" in metadata:
            _check_stored_config(metadata["vit_config"], model.config, source)
    else:
        state_dict = flatten_checkpoint(state_dict_or_path)
        source = "the given state dict"
    if fmt == "auto":
        fmt = detect_checkpoint_format(state_dict)
    converted = CONVERTERS[fmt](state_dict, model.config)
    check_fits(model, converted, fmt=fmt, source=source)
    model.load_state_dict(converted, strict=True)
    return fmt


def check_fits(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, fmt: str, source: str) -> None:
    """Raise CheckpointError naming every key that does not fit the model."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)}, model {expected[key]}"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != expected[key]
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} (read as format '{fmt}') does not fit {_describe_model(model)}:"]
    if missing:
        lines.append(f"  {len(missing)} missing key(s): {list_keys(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s): {list_keys(unexpected)}")
    if mismatched:
        shown = list_keys(mismatched, separator="; ")
        lines.append(f"  {len(mismatched)} shape mismatch(es): {shown}")
    stored_pos = state_dict.get("pos_embed")
    if (
        stored_pos is not None
        and "pos_embed" in expected
        and stored_pos.ndim == 3
        and stored_pos.shape[2] == expected["pos_embed"][2]
        and stored_pos.shape[1] != expected["pos_embed"][1]
    ):
        # Same width, other token count: the right kind of model stored for another input size.
        lines.append(
            "  pos_embed is stored for another patch grid. timm and XMAG checkpoints must be "
            "stored for the model's input size; official DINOv2 files (518 px) are resized "
            "when loaded with fmt='dinov2_hub'."
        )
    lines.append(
        "Check that the checkpoint and the model configuration are for the same architecture, "
        f"or pass the right fmt (one of {CHECKPOINT_FORMATS}) if '{fmt}' was guessed wrongly."
    )
    raise CheckpointError(
        "\n".join(lines),
        missing_keys=missing,
        unexpected_keys=unexpected,
        mismatched_shapes=mismatched,
    )


def _describe_model(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    if not isinstance(config, ViTConfig):
        return f"the {type(model).__name__} model"
    names = [name for name, known in VIT_CONFIGS.items() if known == config]
    if names:
        return f"the model (ViT configuration '{names[0]}')"
    return (
        f"the model (ViT embed_dim {config.embed_dim}, depth {config.depth}, "
        f"{config.num_register_tokens} registers, {config.mlp_kind} MLP)"
    )


def parse_stored_config(config_json: str, source: str) -> ViTConfig:
    try:
        return ViTConfig.from_dict(json.loads(config_json))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"the vit_config stored in {source} is not valid: {error}") from error


# Fields that only shape untrained weights: a mismatch does not matter once weights are loaded.
_INIT_ONLY_CONFIG_FIELDS = frozenset({"layerscale_init"})


def _check_stored_config(config_json: str, model_config: ViTConfig, source: str) -> None:
    """Refuse an XMAG checkpoint saved from another architecture, naming the fields that differ."""
    stored = parse_stored_config(config_json, source).to_dict()
    wanted = model_config.to_dict()
    differing = [
        f"{name}: checkpoint {stored[name]!r}, model {wanted[name]!r}"
        for name in wanted
        if name not in _INIT_ONLY_CONFIG_FIELDS and stored[name] != wanted[name]
    ]
    if differing:
        raise CheckpointError(
            f"{source} was saved from a different ViT configuration: {'; '.join(differing)}. "
            "Build the model from the checkpoint's own config (load_encoder_checkpoint)."
        )
