"""One configurable Vision Transformer for every encoder XMAG runs.

The same class builds the XMAG student (DINOv2 ViT-B/14), the UNI2-h teacher
(ViT-H/14 with registers and a packed SwiGLU MLP) and Phikon (ViT-B/16). The
parameter names are exactly those of the official checkpoints (DINOv2 and
timm spell them the same, apart from the register tokens), so a checkpoint
loads by name after the small conversions in `checkpoints/conversion.py`.

The model works at one fixed input size (`img_size_px`, 224 by default): the
position embedding is stored for that grid and never resized at run time, so
an exported graph holds it as a constant. Checkpoints stored for another grid
are resampled once, at load time (`checkpoints.conversion.resample_dinov2_pos_embed`).

Forward pass, top to bottom:

    images (B, 3, 224, 224), already normalised
      -> patch_embed: 14x14 conv, stride 14           (B, 256, D)
      -> + pos_embed on the patch tokens (and on CLS if class_pos_embed)
      -> tokens [CLS, registers, patches]              (B, 1 + R + 256, D)
      -> depth x pre-norm block:
             x = x + ls1(attn(norm1(x)))
             x = x + ls2(mlp(norm2(x)))
      -> norm -> class token (B, D)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MLP_KINDS = ("gelu", "swiglu_packed")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a VisionTransformer: everything needed to rebuild it.

    `mlp_kind` is "gelu" (Linear -> exact GELU -> Linear) or "swiglu_packed"
    (one fc1 whose output halves a|b give SiLU(a) * b, then fc2; timm's
    SwiGLUPacked as UNI2-h uses it). `class_pos_embed` True means the position
    embedding has an entry for the class token (DINOv2); False means it covers
    the patch tokens only (timm's no_embed_class, as UNI2-h).
    `layerscale_init` only matters for untrained weights.
    """

    patch_size_px: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    mlp_kind: str = "gelu"
    layerscale: bool = True
    layerscale_init: float = 1.0
    num_register_tokens: int = 0
    class_pos_embed: bool = True
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    img_size_px: int = 224

    def __post_init__(self) -> None:
        if self.mlp_kind not in MLP_KINDS:
            raise ValueError(f"mlp_kind must be one of {MLP_KINDS}, got {self.mlp_kind!r}")
        if self.img_size_px % self.patch_size_px != 0:
            raise ValueError(
                f"img_size_px ({self.img_size_px}) must be a multiple of patch_size_px ({self.patch_size_px})"
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.mlp_kind == "swiglu_packed" and self.mlp_hidden_dim % 2 != 0:
            raise ValueError(
                f"swiglu_packed needs an even fc1 width, got int({self.embed_dim} * "
                f"{self.mlp_ratio}) = {self.mlp_hidden_dim}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side of the input image."""
        return self.img_size_px // self.patch_size_px

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (grid_size squared)."""
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patch tokens: the class token plus the registers."""
        return 1 + self.num_register_tokens

    @property
    def num_tokens(self) -> int:
        """Length of the token sequence the blocks see."""
        return self.num_prefix_tokens + self.num_patches

    @property
    def num_pos_embed_tokens(self) -> int:
        """Rows of pos_embed: the patches, plus the class token if class_pos_embed."""
        return self.num_patches + (1 if self.class_pos_embed else 0)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        """Output width of fc1. int() truncates as timm and DINOv2 do: 192 * 5.33334 -> 1024."""
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def mlp_fc2_in_dim(self) -> int:
        """Input width of fc2: fc1's width for GELU, half of it for packed SwiGLU."""
        if self.mlp_kind == "swiglu_packed":
            return self.mlp_hidden_dim // 2
        return self.mlp_hidden_dim

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields, for JSON in checkpoint metadata."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        """Inverse of `to_dict`; unknown field names raise ValueError."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)


_DINOV2_VITB14 = ViTConfig(patch_size_px=14, embed_dim=768, depth=12, num_heads=12)
# The UNI2-h teacher (timm recipe). mlp_ratio 5.33334 gives fc1 1536 -> 8192, fc2 4096 -> 1536.
_UNI2H = ViTConfig(
    patch_size_px=14,
    embed_dim=1536,
    depth=24,
    num_heads=24,
    mlp_ratio=5.33334,
    mlp_kind="swiglu_packed",
    layerscale_init=1e-5,
    num_register_tokens=8,
    class_pos_embed=False,
)

VIT_CONFIGS: dict[str, ViTConfig] = {
    # The XMAG student: DINOv2 ViT-B/14 without registers.
    "xmag_vitb14": _DINOV2_VITB14,
    "dinov2_vitb14_reg4": replace(_DINOV2_VITB14, num_register_tokens=4),
    "uni2h": _UNI2H,
    "phikon_vitb16": ViTConfig(
        patch_size_px=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        layerscale=False,
        layer_norm_eps=1e-12,
    ),
    # The same recipes at the small shapes of the reference fixtures, for tests.
    "tiny_dinov2": replace(_DINOV2_VITB14, embed_dim=192, depth=2, num_heads=3),
    "tiny_uni2h": replace(_UNI2H, embed_dim=192, depth=2, num_heads=3),
}


def get_vit_config(name: str) -> ViTConfig:
    """The named configuration from VIT_CONFIGS; ValueError listing the names otherwise."""
    try:
        return VIT_CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown ViT configuration {name!r}; known: {', '.join(sorted(VIT_CONFIGS))}") from None


class PatchEmbed(nn.Module):
    """Cuts the image into non-overlapping patches and projects each to embed_dim."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, config.embed_dim, kernel_size=config.patch_size_px, stride=config.patch_size_px)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # (B, D, grid, grid) -> (B, grid*grid, D), raster order: token index = row * grid + col.
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        # qkv output is laid out [q | k | v], each [head 0 | head 1 | ...].
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
        x = x.transpose(1, 2).reshape(batch, tokens, width)
        return self.proj(x)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT, DINOv2)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class GeluMlp(nn.Module):
    """Linear -> exact (erf) GELU -> Linear."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_hidden_dim)
        self.fc2 = nn.Linear(config.mlp_fc2_in_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PackedSwiGLUMlp(nn.Module):
    """SwiGLU with both branches packed into one fc1: SiLU(first half) * second half -> fc2."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_hidden_dim)
        self.fc2 = nn.Linear(config.mlp_fc2_in_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


def _layer_scale_or_identity(config: ViTConfig) -> nn.Module:
    # Identity has no parameters, so models without LayerScale have no ls keys.
    if config.layerscale:
        return LayerScale(config.embed_dim, config.layerscale_init)
    return nn.Identity()


class Block(nn.Module):
    """Pre-norm transformer block with optional LayerScale on both residual branches."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        # Created in the order of the official state dicts, so ours lists its keys the same way.
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.ls1 = _layer_scale_or_identity(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = GeluMlp(config) if config.mlp_kind == "gelu" else PackedSwiGLUMlp(config)
        self.ls2 = _layer_scale_or_identity(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


class VisionTransformer(nn.Module):
    """ViT encoder with the official DINOv2 / timm parameter names; see the module docstring.

    The registers are `reg_token` (timm's name; DINOv2 files call them
    `register_tokens`, which `checkpoints.conversion.convert_dinov2_hub` renames). There
    is no `mask_token`: it only serves masked-image training.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        width = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        if config.num_register_tokens > 0:
            self.reg_token: nn.Parameter | None = nn.Parameter(torch.zeros(1, config.num_register_tokens, width))
        else:
            self.reg_token = None
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_pos_embed_tokens, width))
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self._init_weights()

    @property
    def embed_dim(self) -> int:
        """Width of every token and of the output embedding."""
        return self.config.embed_dim

    def _init_weights(self) -> None:
        # Only untrained (demo, test) models keep these values; real weights are loaded over them.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.img_size_px
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if images.shape[2] != size or images.shape[3] != size:
            raise ValueError(
                f"expected {size}x{size} px images, got {images.shape[2]}x{images.shape[3]}: "
                f"the position embedding is fixed for a {self.config.grid_size}x"
                f"{self.config.grid_size} patch grid, resize or crop the input first"
            )
        if not images.is_floating_point():
            raise ValueError(f"expected normalised floating-point images, got dtype {images.dtype}")

    def prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch-embed the images and build [CLS, registers, patches] with position terms."""
        self._check_images(images)
        batch = images.shape[0]
        patches = self.patch_embed(images)
        cls = self.cls_token.expand(batch, -1, -1)
        if self.config.class_pos_embed:
            cls = cls + self.pos_embed[:, :1]
            patches = patches + self.pos_embed[:, 1:]
        else:
            patches = patches + self.pos_embed
        # Registers never get a position term, in DINOv2 and in timm alike.
        if self.reg_token is None:
            return torch.cat([cls, patches], dim=1)
        registers = self.reg_token.expand(batch, -1, -1)
        return torch.cat([cls, registers, patches], dim=1)

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """All tokens, with DINOv2's names.

        Returns a dict with `x_prenorm` (B, T, D), the tokens after the last
        block before the final norm, and the normed tokens split by kind:
        `x_norm_clstoken` (B, D), `x_norm_regtokens` (B, R, D) and
        `x_norm_patchtokens` (B, N, D) in raster order.
        """
        x = self.prepare_tokens(images)
        for block in self.blocks:
            x = block(x)
        x_norm = self.norm(x)
        num_prefix = self.config.num_prefix_tokens
        return {
            "x_prenorm": x,
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:num_prefix],
            "x_norm_patchtokens": x_norm[:, num_prefix:],
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The class token after the final norm, (B, D)."""
        return self.forward_features(images)["x_norm_clstoken"]
