"""The tile encoder contract: uint8 NHWC tiles in, (B, D) embeddings out, clear errors otherwise."""

from __future__ import annotations

import pytest
import torch

from xmag.models import TileEncoder, VisionTransformer, build_tile_encoder, get_vit_config


@pytest.fixture(scope="module")
def encoder() -> TileEncoder:
    return build_tile_encoder("tiny_dinov2", seed=0)


def tiles(batch: int = 2, size: int = 224) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)


def test_output_shapes(encoder):
    assert encoder.embed_dim == 192
    with torch.no_grad():
        cls = encoder(tiles(3))
        cls_again, patches = encoder(tiles(3), return_patch_tokens=True)
    assert cls.shape == (3, 192)
    assert patches.shape == (3, 256, 192)
    assert torch.equal(cls, cls_again)


def test_normalisation_is_not_saved_with_the_weights(encoder):
    keys = set(encoder.state_dict())
    assert keys == {f"vit.{key}" for key in encoder.vit.state_dict()}


def test_seeded_factory_is_deterministic_and_keeps_the_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = build_tile_encoder("tiny_uni2h", seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    second = build_tile_encoder("tiny_uni2h", seed=7)
    other = build_tile_encoder("tiny_uni2h", seed=8)
    assert torch.equal(first.vit.pos_embed, second.vit.pos_embed)
    assert not torch.equal(first.vit.pos_embed, other.vit.pos_embed)
    with torch.no_grad():
        assert torch.equal(first(tiles()), second(tiles()))


def test_unknown_config_lists_the_names():
    with pytest.raises(ValueError, match="xmag_vitb14"):
        build_tile_encoder("vit_gigantic")


@pytest.mark.parametrize(
    "bad_tiles, message",
    [
        (tiles().float(), "dtype torch.float32"),
        (tiles().permute(0, 3, 1, 2).contiguous(), r"shape \(2, 3, 224, 224\)"),
        (tiles(size=256), r"shape \(2, 256, 256, 3\)"),
        (tiles()[0], r"shape \(224, 224, 3\)"),
    ],
)
def test_wrong_input_is_refused(encoder, bad_tiles, message):
    with pytest.raises(ValueError, match=message) as caught:
        encoder(bad_tiles)
    assert "uint8 RGB tiles of shape (B, 224, 224, 3)" in str(caught.value)


def test_vit_refuses_other_image_sizes():
    vit = VisionTransformer(get_vit_config("tiny_dinov2"))
    with pytest.raises(ValueError, match="224x224"):
        vit(torch.zeros(1, 3, 518, 518))
    with pytest.raises(ValueError, match="floating-point"):
        vit(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
