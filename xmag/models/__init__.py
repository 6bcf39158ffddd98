"""Model definitions (ViT encoders, ABMIL slide heads) and checkpoint loading."""

from xmag.models.abmil import GatedABMIL, SlideHeads
from xmag.models.checkpoints.conversion import (
    convert_dinov2_hub,
    convert_timm,
    convert_xmag,
    convert_xmag_release,
    resample_dinov2_pos_embed,
)
from xmag.models.checkpoints.fitting import load_vit_weights
from xmag.models.checkpoints.reading import CHECKPOINT_FORMATS, detect_checkpoint_format, read_state_dict
from xmag.models.checkpoints.xmag_format import (
    XmagCheckpoint,
    is_xmag_checkpoint,
    load_encoder_checkpoint,
    load_slide_heads,
    load_xmag_checkpoint,
    save_encoder_checkpoint,
)
from xmag.models.encoder import (
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    TileEncoder,
    build_tile_encoder,
)
from xmag.models.vit import VIT_CONFIGS, VisionTransformer, ViTConfig, get_vit_config

__all__ = [
    "CHECKPOINT_FORMATS",
    "IMAGENET_MEAN_RGB",
    "IMAGENET_STD_RGB",
    "VIT_CONFIGS",
    "GatedABMIL",
    "SlideHeads",
    "TileEncoder",
    "ViTConfig",
    "VisionTransformer",
    "XmagCheckpoint",
    "build_tile_encoder",
    "convert_dinov2_hub",
    "convert_timm",
    "convert_xmag",
    "convert_xmag_release",
    "detect_checkpoint_format",
    "get_vit_config",
    "is_xmag_checkpoint",
    "load_encoder_checkpoint",
    "load_slide_heads",
    "load_vit_weights",
    "load_xmag_checkpoint",
    "read_state_dict",
    "resample_dinov2_pos_embed",
    "save_encoder_checkpoint",
]
