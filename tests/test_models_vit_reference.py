"""Our ViT against outputs of the official DINOv2 code and of timm (shared/reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _reference import load_fixture

from xmag.models import (
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    TileEncoder,
    VisionTransformer,
    get_vit_config,
    load_vit_weights,
)

# The README measured ~2e-6 for an independent fp32 re-implementation.
ATOL = 1e-5


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def dinov2_fixture():
    return load_fixture("dinov2_small_official.safetensors")


@pytest.fixture(scope="module")
def uni2h_fixture():
    return load_fixture("uni2h_small_timm.safetensors")


def dinov2_outputs(state_dict, images, fmt="dinov2_hub"):
    model = VisionTransformer(get_vit_config("tiny_dinov2")).eval()
    load_vit_weights(model, state_dict, fmt=fmt)
    with torch.no_grad():
        return model.forward_features(images)


def test_dinov2_official_outputs_match(dinov2_fixture):
    state_dict, tensors = dinov2_fixture
    assert state_dict["pos_embed"].shape[1] == 1370, "fixture should store the 518 px grid"
    ours = dinov2_outputs(state_dict, tensors["input"])
    for name in ("x_prenorm", "x_norm_clstoken", "x_norm_patchtokens"):
        error = max_abs(ours[name], tensors[f"out.{name}"])
        print(f"dinov2_small_official {name}: max abs {error:.2e}")
        assert error <= ATOL, f"{name} differs from the official DINOv2 output by {error:.2e}"


def test_dinov2_format_is_detected_automatically(dinov2_fixture):
    state_dict, tensors = dinov2_fixture
    ours = dinov2_outputs(state_dict, tensors["input"], fmt="auto")
    assert max_abs(ours["x_norm_clstoken"], tensors["out.x_norm_clstoken"]) <= ATOL


def test_plain_output_size_resize_would_fail_the_check(dinov2_fixture):
    """The reference discriminates: resizing to 16x16 by output size is measurably wrong."""
    state_dict, tensors = dinov2_fixture
    naive = dict(state_dict)
    naive.pop("mask_token")
    pos_embed = naive["pos_embed"]
    grid = pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    resized_tokens = resized.permute(0, 2, 3, 1).reshape(1, 256, -1)
    naive["pos_embed"] = torch.cat([pos_embed[:, :1], resized_tokens], dim=1)
    ours = dinov2_outputs(naive, tensors["input"], fmt="timm")
    error = max_abs(ours["x_norm_patchtokens"], tensors["out.x_norm_patchtokens"])
    assert error > 1e-3, f"an output-size resize should be off by ~0.1, was only {error:.2e}"


def test_uni2h_timm_outputs_match(uni2h_fixture):
    state_dict, tensors = uni2h_fixture
    model = VisionTransformer(get_vit_config("tiny_uni2h")).eval()
    assert load_vit_weights(model, state_dict) == "timm"
    with torch.no_grad():
        features = model.forward_features(tensors["input"])
        pooled = model(tensors["input"])
    all_tokens = torch.cat(
        [
            features["x_norm_clstoken"][:, None],
            features["x_norm_regtokens"],
            features["x_norm_patchtokens"],
        ],
        dim=1,
    )
    assert features["x_norm_regtokens"].shape == (2, 8, 192)
    tokens_error = max_abs(all_tokens, tensors["out.forward_features"])
    pooled_error = max_abs(pooled, tensors["out.forward"])
    print(f"uni2h_small_timm forward_features: {tokens_error:.2e}, forward: {pooled_error:.2e}")
    assert tokens_error <= ATOL
    assert pooled_error <= ATOL


def test_tile_encoder_equals_vit_on_normalised_input(uni2h_fixture):
    state_dict, _ = uni2h_fixture
    vit = VisionTransformer(get_vit_config("tiny_uni2h")).eval()
    load_vit_weights(vit, state_dict)
    encoder = TileEncoder(vit).eval()
    generator = torch.Generator().manual_seed(3)
    tiles = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=generator)
    mean = torch.tensor(IMAGENET_MEAN_RGB).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_RGB).view(1, 3, 1, 1)
    images = (tiles.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    with torch.no_grad():
        expected = vit.forward_features(images)
        cls, patches = encoder(tiles, return_patch_tokens=True)
        cls_only = encoder(tiles)
    assert max_abs(cls, expected["x_norm_clstoken"]) <= 1e-6
    assert max_abs(patches, expected["x_norm_patchtokens"]) <= 1e-6
    assert torch.equal(cls, cls_only)
