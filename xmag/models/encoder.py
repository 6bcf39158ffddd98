"""The tile encoder contract: uint8 RGB tiles in, one embedding per tile out.

Every backend (torch, onnxruntime, TensorRT) runs this module or a graph
exported from it, so the ImageNet normalisation lives inside it: tiles travel
to the accelerator as uint8 (4x fewer bytes than float32) and no caller can
forget or duplicate the normalisation.
"""

from __future__ import annotations

import torch
from torch import nn

from xmag.models.vit import VisionTransformer, get_vit_config

# ImageNet statistics on the 0..1 scale, as every encoder we run was trained with.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)


class TileEncoder(nn.Module):
    """Normalises uint8 NHWC RGB tiles and encodes them with a VisionTransformer.

    Input: (B, S, S, 3) uint8 with S the ViT's img_size_px (224).
    Output: the class-token embedding (B, D) after the final norm; with
    `return_patch_tokens=True` also the normed patch tokens (B, N, D).
    The state dict is the ViT's under `vit.`; mean and std are constants
    (non-persistent buffers), so they follow `.to(device)` but are not saved.
    """

    # The buffers registered in __init__; torch's stubs type module attributes as `Tensor | Module`.
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN_RGB).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD_RGB).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        """Width of the output embedding."""
        return self.vit.embed_dim

    @property
    def tile_size_px(self) -> int:
        """Side of the square tiles the encoder accepts."""
        return self.vit.config.img_size_px

    def normalise(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S) in the buffers' dtype."""
        self._check_tiles(tiles)
        images = tiles.permute(0, 3, 1, 2).to(self.pixel_mean.dtype) / 255.0
        return (images - self.pixel_mean) / self.pixel_std

    def forward(
        self, tiles: torch.Tensor, return_patch_tokens: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Class-token embeddings (B, D), or (class tokens, patch tokens (B, N, D)) when asked."""
        features = self.vit.forward_features(self.normalise(tiles))
        if return_patch_tokens:
            return features["x_norm_clstoken"], features["x_norm_patchtokens"]
        return features["x_norm_clstoken"]

    def _check_tiles(self, tiles: torch.Tensor) -> None:
        size = self.tile_size_px
        expected = f"uint8 RGB tiles of shape (B, {size}, {size}, 3) (NHWC)"
        if tiles.dtype != torch.uint8:
            raise ValueError(f"expected {expected}, got dtype {tiles.dtype}")
        if tiles.ndim != 4 or tuple(tiles.shape[1:]) != (size, size, 3):
            raise ValueError(f"expected {expected}, got shape {tuple(tiles.shape)}")


def build_tile_encoder(config_name: str, seed: int | None = None) -> TileEncoder:
    """A TileEncoder with untrained weights for a named config of VIT_CONFIGS, in eval mode.

    With a seed the weights are the same on every call and the global random
    state is left untouched. Load real weights with
    `checkpoints.fitting.load_vit_weights(encoder.vit, ...)`.
    """
    config = get_vit_config(config_name)
    if seed is None:
        return TileEncoder(VisionTransformer(config)).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = VisionTransformer(config)
    return TileEncoder(vit).eval()
