"""Reading encoder checkpoints in their official formats and loading them strictly.

`vit.VisionTransformer` uses the official parameter names, so most formats
load by name. What differs between them is converted here, once, at load
time, by small pure functions (state dict in, our state dict out):

- "dinov2_hub": files of facebookresearch/dinov2's torch.hub models. They
  carry a `mask_token` (masked-image training only; dropped), call the
  registers `register_tokens` (renamed `reg_token`) and store the position
  embedding for 518 px (37x37 patches + a class entry), which DINOv2 resizes
  on every forward call. We resize it once to the model's grid with exactly
  DINOv2's rule (`resample_dinov2_pos_embed`), so outputs match the official
  model at 224 px.
- "timm": timm-named state dicts (UNI2-h's pytorch_model.bin, timm's
  vit_base_patch14_dinov2 at 224). Keys are ours already; the position
  embedding must already be stored for the model's grid.
- "xmag_release": the official XMAG release, a training checkpoint whose
  student weights sit under `model.` (possibly wrapped in {"state_dict": ...}).
  The rest (distillation heads, teacher) is dropped; the student is
  DINOv2-format.
- "xmag": our own safetensors files, written by `save_encoder_checkpoint`,
  with the ViTConfig in their metadata.

Every load ends in one strict check that names the missing, unexpected and
mis-shaped keys before anything is copied into the model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F

from xmag.errors import CheckpointError
from xmag.models.abmil import GatedABMIL, SlideHeads
from xmag.models.vit import VIT_CONFIGS, VisionTransformer, ViTConfig, get_vit_config

CHECKPOINT_FORMATS = ("dinov2_hub", "timm", "xmag_release", "hf_vit", "xmag")

# Value of the "format" metadata entry in our own safetensors files.
XMAG_ENCODER_FORMAT_TAG = "xmag-encoder"

# Prefix of slide-head tensors in our own checkpoints.
HEADS_PREFIX = "heads."

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
    return _read_checkpoint(Path(path))[0]


def resample_dinov2_pos_embed(
    pos_embed: torch.Tensor, new_grid: int, *, offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """Resize a DINOv2 position embedding (1, 1 + G0*G0, C) to (1, 1 + new_grid**2, C).

    Reproduces the official DINOv2 runtime resize exactly, so it can be done
    once at load time instead of on every forward call:

    - the class entry (row 0) is kept unchanged;
    - the patch entries are a G0 x G0 image with C channels (token index =
      row * G0 + col), resized in fp32 with PyTorch's bicubic (a = -0.75,
      half-pixel centres, align_corners False);
    - with a non-zero `offset` the resize is requested as the scale factor
      (new_grid + offset) / G0, not as an output size. The output still has
      new_grid pixels per side, but PyTorch samples source coordinate
      (i + 0.5) * G0 / (new_grid + offset) - 0.5, which is NOT the same as a
      plain resize to new_grid (the difference changes the outputs by ~0.1);
    - with offset 0 DINOv2 requests the output size, and so do we.

    The hub models without registers use offset 0.1 and antialias False, the
    register models offset 0.0 and antialias True. Like DINOv2, an embedding
    already at new_grid is returned unchanged.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected pos_embed of shape (1, 1 + G*G, C), got {tuple(pos_embed.shape)}")
    num_stored_patches = pos_embed.shape[1] - 1
    old_grid = math.isqrt(num_stored_patches)
    if old_grid * old_grid != num_stored_patches:
        raise ValueError(
            f"pos_embed has {num_stored_patches} patch entries after the class entry, which is not a square grid"
        )
    if old_grid == new_grid:
        return pos_embed
    channels = pos_embed.shape[2]
    class_pos = pos_embed[:, :1]
    patch_pos = pos_embed[:, 1:].float().reshape(1, old_grid, old_grid, channels)
    patch_pos = patch_pos.permute(0, 3, 1, 2)  # (1, C, rows, cols)
    # DINOv2 asks for a scale factor when it has an offset (the sampled positions then
    # differ from a plain resize), and for an output size when the offset is 0.
    scale = (new_grid + offset) / old_grid
    target = {"scale_factor": (scale, scale)} if offset else {"size": (new_grid, new_grid)}
    resized = F.interpolate(patch_pos, mode="bicubic", antialias=antialias, align_corners=False, **target)
    if tuple(resized.shape[-2:]) != (new_grid, new_grid):
        raise ValueError(
            f"resizing a {old_grid}x{old_grid} grid with offset {offset} gave "
            f"{tuple(resized.shape[-2:])}, not {new_grid}x{new_grid}"
        )
    patch_tokens = resized.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, channels)
    return torch.cat([class_pos, patch_tokens.to(pos_embed.dtype)], dim=1)


def convert_dinov2_hub(state_dict: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Official DINOv2 hub state dict -> our state dict for `config`.

    Drops `mask_token`, renames `register_tokens` to `reg_token` and resizes
    `pos_embed` to the config's grid with DINOv2's own rule, whose settings
    depend on whether the checkpoint's model has registers. A pos_embed that
    already fits the grid is kept as it is.
    """
    converted = dict(state_dict)
    # Only used to mask patches during self-supervised training.
    converted.pop("mask_token", None)
    has_registers = "register_tokens" in converted
    if has_registers:
        converted["reg_token"] = converted.pop("register_tokens")
    if "pos_embed" in converted:
        converted["pos_embed"] = _dinov2_pos_embed_for_config(
            converted["pos_embed"], config, has_registers=has_registers
        )
    return converted


def convert_timm(state_dict: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """timm-named state dict -> our state dict: the names are already ours.

    Nothing is resized: a timm pos_embed must already be stored for the
    model's grid (timm resizes with its own rule, which is not DINOv2's), and
    the strict check reports it otherwise. Keys the model lacks (a `head.*`,
    say) are reported as unexpected by that check, not silently dropped.
    `config` is unused; it keeps the signature of the other converters.
    """
    return dict(state_dict)


def convert_xmag_release(checkpoint: Mapping[str, Any], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Official XMAG release checkpoint -> our state dict for `config`.

    Keeps the student's keys (under `model.`, after unwrapping a
    {"state_dict": ...} or flattening a {"model": {...}} layout), drops
    everything else (distillation heads, teacher), then converts the student
    as a DINOv2 hub state dict: resampled if its pos_embed is stored for
    518 px, kept if it already fits the grid.
    """
    flat = _flatten_checkpoint(checkpoint)
    student = {
        key[len(XMAG_RELEASE_STUDENT_PREFIX) :]: value
        for key, value in flat.items()
        if key.startswith(XMAG_RELEASE_STUDENT_PREFIX)
    }
    if not student:
        prefixes = sorted({key.split(".", 1)[0] for key in flat})
        raise CheckpointError(
            f"no key starts with '{XMAG_RELEASE_STUDENT_PREFIX}', so this is not an XMAG release "
            f"checkpoint (top-level names found: {_list_keys(prefixes)}); pass the format it "
            f"really is, one of {CHECKPOINT_FORMATS}"
        )
    return convert_dinov2_hub(student, config)


def convert_xmag(state_dict: Mapping[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Our own checkpoints already hold exactly our keys: nothing to convert."""
    return dict(state_dict)


# Hugging Face ViT (Phikon) per-block names -> ours. transformers 4 wrote the
# first names (Phikon's published file has them); transformers 5 uses the second.
_HF_BLOCK_NAMES = {
    "attention.attention.query": "attn.q",
    "attention.attention.key": "attn.k",
    "attention.attention.value": "attn.v",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.q_proj": "attn.q",
    "attention.k_proj": "attn.k",
    "attention.v_proj": "attn.v",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_TOP_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_BLOCK_PATTERN = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def convert_hf_vit(state_dict: Mapping[str, Any], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Hugging Face ViTModel (Phikon) keys to ours: separate q, k, v fused into qkv; pooler dropped.

    Keys may carry a `vit.` prefix (ViTForImageClassification); unknown keys are
    passed through under their own names, so the strict check reports them.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("vit.")
        if name.startswith("pooler."):  # Phikon's embedding is the class token, not the pooler
            continue
        block = _HF_BLOCK_PATTERN.match(name)
        if name in _HF_TOP_NAMES:
            converted[_HF_TOP_NAMES[name]] = value
        elif block and block.group(2) in _HF_BLOCK_NAMES:
            converted[f"blocks.{block.group(1)}.{_HF_BLOCK_NAMES[block.group(2)]}.{block.group(3)}"] = value
        else:
            converted[key] = value
    for index in range(config.depth):
        for kind in ("weight", "bias"):
            parts = [converted.pop(f"blocks.{index}.attn.{p}.{kind}", None) for p in ("q", "k", "v")]
            if all(part is not None for part in parts):
                converted[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return converted


_CONVERTERS: dict[str, Callable[[Mapping[str, Any], ViTConfig], dict[str, torch.Tensor]]] = {
    "dinov2_hub": convert_dinov2_hub,
    "timm": convert_timm,
    "xmag_release": convert_xmag_release,
    "hf_vit": convert_hf_vit,
    "xmag": convert_xmag,
}


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
        state_dict, metadata = _read_checkpoint(path)
        source = str(path)
        if fmt == "auto" and metadata.get("format") == XMAG_ENCODER_FORMAT_TAG:
            fmt = "xmag"
        if fmt == "xmag" and "vit_config" in metadata:
            _check_stored_config(metadata["vit_config"], model.config, source)
    else:
        state_dict = _flatten_checkpoint(state_dict_or_path)
        source = "the given state dict"
    if fmt == "auto":
        fmt = detect_checkpoint_format(state_dict)
    converted = _CONVERTERS[fmt](state_dict, model.config)
    _check_fits(model, converted, fmt=fmt, source=source)
    model.load_state_dict(converted, strict=True)
    return fmt


def save_encoder_checkpoint(
    model: VisionTransformer,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    heads: SlideHeads | None = None,
) -> None:
    """Write `model` (and optionally its slide heads) as an XMAG checkpoint (safetensors).

    The file holds the model's state dict, each head's under
    `heads.<task>.`, and the metadata entries `format` ("xmag-encoder"),
    `vit_config` (JSON) and, with heads, `heads` (JSON: class names and
    sizes per task), plus the caller's own string entries (provenance, say).
    It is written to a temporary name and renamed, so an interrupted save
    never leaves a half-written checkpoint.
    """
    reserved = {"format", "vit_config", "heads"}
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
    with the dtype the weights were stored in."""
    path = Path(path)
    state_dict, metadata = _read_checkpoint(path)
    if metadata.get("format") != XMAG_ENCODER_FORMAT_TAG or "vit_config" not in metadata:
        raise CheckpointError(
            f"{path} is not an XMAG encoder checkpoint (its metadata has no format "
            f"'{XMAG_ENCODER_FORMAT_TAG}' with a vit_config). For DINOv2, timm or release files, "
            "build a VisionTransformer from a config and use load_vit_weights."
        )
    config = _parse_stored_config(metadata["vit_config"], str(path))
    vit_state = {key: value for key, value in state_dict.items() if not key.startswith(HEADS_PREFIX)}
    head_state = {key[len(HEADS_PREFIX) :]: value for key, value in state_dict.items() if key.startswith(HEADS_PREFIX)}
    # Built on the meta device and then given the loaded tensors: no time or
    # memory is spent on random weights that would be overwritten anyway.
    with torch.device("meta"):
        vit = VisionTransformer(config)
    _check_fits(vit, vit_state, fmt="xmag", source=str(path))
    vit.load_state_dict(vit_state, strict=True, assign=True)
    heads = _build_heads(metadata, head_state, path) if "heads" in metadata else None
    return XmagCheckpoint(vit=vit.eval(), heads=heads, metadata=metadata)


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
    _check_fits(heads.heads, head_state, fmt="xmag heads", source=str(path))
    heads.heads.load_state_dict(head_state, strict=True)
    return heads.eval()


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors checkpoint (provenance, configs), without reading tensors."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:
        raise CheckpointError(f"cannot read the metadata of {path}: {error}") from error


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


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
        return _flatten_checkpoint(tensors, source=str(path)), metadata
    if suffix in _TORCH_PICKLE_SUFFIXES:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(
                f"cannot read PyTorch checkpoint {path}: {error}. Either the file is damaged or "
                "incomplete (copy it again), or it holds Python objects besides tensors, which "
                "are not loaded for safety (re-save just the state dict)."
            ) from error
        return _flatten_checkpoint(checkpoint, source=str(path)), {}
    raise CheckpointError(
        f"unsupported checkpoint file type {path.suffix!r} for {path}; expected .safetensors "
        f"or one of {', '.join(_TORCH_PICKLE_SUFFIXES)}"
    )


def _flatten_checkpoint(checkpoint: Any, source: str = "the given state dict") -> dict[str, torch.Tensor]:
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


def _dinov2_pos_embed_for_config(pos_embed: torch.Tensor, config: ViTConfig, *, has_registers: bool) -> torch.Tensor:
    """A DINOv2-format pos_embed resized, if needed, to the config's grid."""
    if pos_embed.ndim != 3 or pos_embed.shape[1] == config.num_pos_embed_tokens:
        # Already at the grid, or malformed: the strict check reports a wrong shape.
        return pos_embed
    if not config.class_pos_embed:
        raise CheckpointError(
            f"a DINOv2-format pos_embed {tuple(pos_embed.shape)} includes a class-token entry, "
            "but the model's config has class_pos_embed=False; use a config with "
            "class_pos_embed=True for DINOv2 checkpoints"
        )
    # The settings of the official hub constructors (dinov2/hub/backbones.py).
    offset, antialias = (0.0, True) if has_registers else (0.1, False)
    try:
        return resample_dinov2_pos_embed(pos_embed, config.grid_size, offset=offset, antialias=antialias)
    except ValueError as error:
        raise CheckpointError(f"cannot resize the checkpoint's pos_embed: {error}") from error


def _check_fits(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, fmt: str, source: str) -> None:
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
        lines.append(f"  {len(missing)} missing key(s): {_list_keys(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s): {_list_keys(unexpected)}")
    if mismatched:
        shown = _list_keys(mismatched, separator="; ")
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


def _list_keys(keys: list[str], separator: str = ", ") -> str:
    shown = separator.join(keys[:_MAX_KEYS_IN_MESSAGE])
    if len(keys) > _MAX_KEYS_IN_MESSAGE:
        shown += f", ... and {len(keys) - _MAX_KEYS_IN_MESSAGE} more"
    return shown


def _parse_stored_config(config_json: str, source: str) -> ViTConfig:
    try:
        return ViTConfig.from_dict(json.loads(config_json))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"the vit_config stored in {source} is not valid: {error}") from error


# Fields that only shape untrained weights: a mismatch does not matter once weights are loaded.
_INIT_ONLY_CONFIG_FIELDS = frozenset({"layerscale_init"})


def _check_stored_config(config_json: str, model_config: ViTConfig, source: str) -> None:
    """Refuse an XMAG checkpoint saved from another architecture, naming the fields that differ."""
    stored = _parse_stored_config(config_json, source).to_dict()
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
