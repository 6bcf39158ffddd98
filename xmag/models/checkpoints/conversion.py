"""Converting the official checkpoint formats to our state dict.

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
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from xmag.errors import CheckpointError
from xmag.models.checkpoints.reading import (
    CHECKPOINT_FORMATS,
    XMAG_RELEASE_STUDENT_PREFIX,
    flatten_checkpoint,
    list_keys,
)
from xmag.models.vit import ViTConfig


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
    flat = flatten_checkpoint(checkpoint)
    student = {
        key[len(XMAG_RELEASE_STUDENT_PREFIX) :]: value
        for key, value in flat.items()
        if key.startswith(XMAG_RELEASE_STUDENT_PREFIX)
    }
    if not student:
        prefixes = sorted({key.split(".", 1)[0] for key in flat})
        raise CheckpointError(
            f"no key starts with '{XMAG_RELEASE_STUDENT_PREFIX}', so this is not an XMAG release "
            f"checkpoint (top-level names found: {list_keys(prefixes)}); pass the format it "
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
            q, k, v = (converted.pop(f"blocks.{index}.attn.{p}.{kind}", None) for p in ("q", "k", "v"))
            if q is not None and k is not None and v is not None:
                converted[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([q, k, v], dim=0)
    return converted


CONVERTERS: dict[str, Callable[[Mapping[str, Any], ViTConfig], dict[str, torch.Tensor]]] = {
    "dinov2_hub": convert_dinov2_hub,
    "timm": convert_timm,
    "xmag_release": convert_xmag_release,
    "hf_vit": convert_hf_vit,
    "xmag": convert_xmag,
}


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
