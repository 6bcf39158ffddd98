"""Our own checkpoint file format (XMAG): one safetensors file with the encoder, its slide heads and metadata.

Written by `save_encoder_checkpoint`, read back by `load_xmag_checkpoint`; the
architecture travels in the metadata, so no configuration is needed to load one.
`load_encoder` loads any supported file: ours as they are, the official formats
into a named configuration.

An encoder is known by `encoder_weights_sha256`, a hash of its tensors (not of
a file, so re-saving it with other heads or metadata keeps its identity).
Feature files record it, and heads trained on those features carry it as
`heads_encoder_sha256`: a checkpoint whose heads were trained on another
encoder's features is refused when it is read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from xmag.errors import CheckpointError
from xmag.models.abmil import GatedABMIL, SlideHeads
from xmag.models.checkpoints.fitting import check_fits, load_vit_weights, parse_stored_config
from xmag.models.checkpoints.reading import XMAG_ENCODER_FORMAT_TAG, read_checkpoint
from xmag.models.vit import VisionTransformer, get_vit_config

# Prefix of slide-head tensors in our own checkpoints.
HEADS_PREFIX = "heads."
# Metadata entry: the encoder_weights_sha256 of the encoder whose features the heads were trained on.
HEADS_ENCODER_SHA256 = "heads_encoder_sha256"


def encoder_weights_sha256(model: VisionTransformer) -> str:
    """The identity of an encoder's weights: sha256 over its architecture and every tensor's name, dtype, shape, bytes.

    Independent of the file it came from, so the same weights keep the same
    identity in a repository, a feature file and a checkpoint with heads.
    """
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for key, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_encoder_checkpoint(
    model: VisionTransformer,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    heads: SlideHeads | None = None,
    heads_encoder_sha256: str | None = None,
) -> None:
    """Write `model` (and optionally its slide heads) as an XMAG checkpoint (safetensors).

    The file holds the model's state dict, each head's under
    `heads.<task>.`, and the metadata entries `format` ("xmag-encoder"),
    `vit_config` (JSON) and, with heads, `heads` (JSON: class names and
    sizes per task) and `heads_encoder_sha256` (the encoder whose features
    trained them, when the caller knows it), plus the caller's own string
    entries (provenance, say).
    It is written to a temporary name and renamed, so an interrupted save
    never leaves a half-written checkpoint.
    """
    reserved = {"format", "vit_config", "heads", HEADS_ENCODER_SHA256}
    extra = dict(metadata or {})
    clashing = sorted(reserved & set(extra))
    if clashing:
        raise ValueError(f"metadata keys {clashing} are reserved for the checkpoint format itself")
    not_strings = sorted(key for key, value in extra.items() if not isinstance(value, str))
    if not_strings:
        raise ValueError(f"safetensors metadata values must be strings; not so for {not_strings}")
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    header = {
        **extra,
        "format": XMAG_ENCODER_FORMAT_TAG,
        "vit_config": json.dumps(model.config.to_dict(), sort_keys=True),
    }
    if heads is not None:
        for key, value in heads.heads.state_dict().items():
            tensors[f"{HEADS_PREFIX}{key}"] = value.detach().cpu().contiguous()
        header["heads"] = json.dumps(
            {
                task: {
                    "class_names": heads.class_names[task],
                    "in_dim": head.in_dim,
                    "hidden_dim": head.hidden_dim,
                    "attention_dim": head.attention_dim,
                }
                for task, head in heads.heads.items()
            },
            sort_keys=True,
        )
        if heads_encoder_sha256 is not None:
            header[HEADS_ENCODER_SHA256] = heads_encoder_sha256
    elif heads_encoder_sha256 is not None:
        raise ValueError("heads_encoder_sha256 describes heads, and no heads were given")
    path = Path(path)
    partial_path = path.with_name(path.name + ".partial")
    safetensors.torch.save_file(tensors, str(partial_path), metadata=header)
    os.replace(partial_path, path)


@dataclass(frozen=True)
class XmagCheckpoint:
    """Everything an XMAG checkpoint file holds, read from it once."""

    vit: VisionTransformer
    heads: SlideHeads | None
    metadata: dict[str, str]


def load_xmag_checkpoint(path: str | os.PathLike) -> XmagCheckpoint:
    """Rebuild the encoder, the slide heads (if stored) and the metadata of a file written by
    `save_encoder_checkpoint`; the architecture comes from the metadata. Models are in eval mode,
    with the dtype the weights were stored in.

    Raises CheckpointError when the heads record an encoder other than the one stored with them."""
    path = Path(path)
    state_dict, metadata = read_checkpoint(path)
    if metadata.get("format") != XMAG_ENCODER_FORMAT_TAG or "vit_config" not in metadata:
        raise CheckpointError(
            f"{path} is not an XMAG encoder checkpoint (its metadata has no format "
            f"'{XMAG_ENCODER_FORMAT_TAG}' with a vit_config). For DINOv2, timm or release files, "
            "build a VisionTransformer from a config and use load_vit_weights."
        )
    config = parse_stored_config(metadata["vit_config"], str(path))
    vit_state = {key: value for key, value in state_dict.items() if not key.startswith(HEADS_PREFIX)}
    head_state = {key[len(HEADS_PREFIX) :]: value for key, value in state_dict.items() if key.startswith(HEADS_PREFIX)}
    # Built on the meta device and then given the loaded tensors: no time or
    # memory is spent on random weights that would be overwritten anyway.
    with torch.device("meta"):
        vit = VisionTransformer(config)
    check_fits(vit, vit_state, fmt="xmag", source=str(path))
    vit.load_state_dict(vit_state, strict=True, assign=True)
    heads = _build_heads(metadata, head_state, path) if "heads" in metadata else None
    if heads is not None and HEADS_ENCODER_SHA256 in metadata:
        _check_heads_match_encoder(metadata[HEADS_ENCODER_SHA256], vit, path)
    return XmagCheckpoint(vit=vit.eval(), heads=heads, metadata=metadata)


def _check_heads_match_encoder(heads_encoder_sha256: str, vit: VisionTransformer, path: Path) -> None:
    encoder_sha256 = encoder_weights_sha256(vit)
    if heads_encoder_sha256 != encoder_sha256:
        raise CheckpointError(
            f"{path}: its slide heads were trained on features of the encoder with weights sha256 "
            f"{heads_encoder_sha256}, but the encoder stored with them has weights sha256 {encoder_sha256}. "
            "Heads only make sense on the features of the encoder that trained them: train them again on features "
            "of this encoder (xmag extract, then xmag train heads), or pair them with their own encoder."
        )


def load_encoder_checkpoint(path: str | os.PathLike) -> VisionTransformer:
    """The encoder of an XMAG checkpoint (see `load_xmag_checkpoint`)."""
    return load_xmag_checkpoint(path).vit


def load_slide_heads(path: str | os.PathLike) -> SlideHeads | None:
    """The slide heads stored in an XMAG checkpoint, in eval mode; None if it has none."""
    return load_xmag_checkpoint(path).heads


def _build_heads(metadata: Mapping[str, str], head_state: Mapping[str, torch.Tensor], path: Path) -> SlideHeads:
    try:
        specs = json.loads(metadata["heads"])
        heads = SlideHeads(
            {
                task: GatedABMIL(
                    in_dim=spec["in_dim"],
                    hidden_dim=spec["hidden_dim"],
                    attention_dim=spec["attention_dim"],
                    num_classes=len(spec["class_names"]),
                )
                for task, spec in specs.items()
            },
            {task: spec["class_names"] for task, spec in specs.items()},
        )
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} has an unreadable 'heads' metadata entry: {error}") from error
    check_fits(heads.heads, head_state, fmt="xmag heads", source=str(path))
    heads.heads.load_state_dict(head_state, strict=True)
    return heads.eval()


def load_encoder(path: str | os.PathLike, fmt: str = "auto", config_name: str = "xmag_vitb14") -> VisionTransformer:
    """Any supported checkpoint file as a VisionTransformer in eval mode.

    Our own files carry their architecture in their metadata; the official
    formats (DINOv2 hub, timm, XMAG release) are loaded into the named
    configuration of VIT_CONFIGS.
    """
    path = Path(path)
    if fmt == "xmag" or (fmt == "auto" and is_xmag_checkpoint(path)):
        return load_encoder_checkpoint(path)
    model = VisionTransformer(get_vit_config(config_name))
    load_vit_weights(model, path, fmt)
    return model.eval()


def is_xmag_checkpoint(path: Path) -> bool:
    """True for a safetensors file written by `save_encoder_checkpoint` (reads only its header)."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            return (handle.metadata() or {}).get("format") == XMAG_ENCODER_FORMAT_TAG
    except Exception:  # noqa: BLE001 - unreadable files get their clear error from the full read
        return False
