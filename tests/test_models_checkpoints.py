"""Loading checkpoints by their official key names, and refusing the ones that do not fit."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import safetensors
import torch
import torch.nn.functional as F
from _reference import key_list

from xmag.errors import CheckpointError
from xmag.models import (
    VisionTransformer,
    ViTConfig,
    detect_checkpoint_format,
    get_vit_config,
    load_encoder_checkpoint,
    load_vit_weights,
    read_state_dict,
    resample_dinov2_pos_embed,
    save_encoder_checkpoint,
)


def meta_model(config: ViTConfig) -> VisionTransformer:
    """A full-size model without memory or init cost, for key and shape checks."""
    with torch.device("meta"):
        return VisionTransformer(config)


def meta_state_dict(key_list_file: str) -> dict[str, torch.Tensor]:
    """Tensors with the shapes of a full-size official state dict, on the meta device."""
    return {key: torch.empty(shape, device="meta") for key, shape in key_list(key_list_file)}


def seeded_model(config: ViTConfig, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(config).eval()


def random_images(config: ViTConfig, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, config.img_size_px, config.img_size_px, generator=generator)


TINY_REG4 = dataclasses.replace(get_vit_config("tiny_dinov2"), num_register_tokens=4)


def dinov2_hub_state_dict(model: VisionTransformer, stored_grid: int = 37) -> dict[str, torch.Tensor]:
    """What an official hub file of `model`'s architecture looks like (518 px pos_embed)."""
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    width = model.embed_dim
    state_dict["pos_embed"] = torch.randn(1, 1 + stored_grid**2, width)
    state_dict["mask_token"] = torch.randn(1, width)
    if "reg_token" in state_dict:
        state_dict["register_tokens"] = state_dict.pop("reg_token")
    return state_dict


# ---------------------------------------------------------------- full-size key lists


@pytest.mark.parametrize(
    "key_list_file, config, expected_format",
    [
        ("dinov2_vitb14_keys.json", get_vit_config("xmag_vitb14"), "dinov2_hub"),
        ("dinov2_vitb14_reg4_keys.json", get_vit_config("dinov2_vitb14_reg4"), "dinov2_hub"),
        ("uni2h_keys.json", get_vit_config("uni2h"), "timm"),
        ("timm_vit_base_patch14_dinov2_224_keys.json", get_vit_config("xmag_vitb14"), "timm"),
        (
            "timm_vit_base_patch14_reg4_dinov2_224_keys.json",
            dataclasses.replace(get_vit_config("dinov2_vitb14_reg4"), class_pos_embed=False),
            "timm",
        ),
    ],
)
def test_official_key_lists_load_into_full_size_configs(key_list_file, config, expected_format):
    model = meta_model(config)
    assert load_vit_weights(model, meta_state_dict(key_list_file)) == expected_format
    assert model.pos_embed.shape == (1, config.num_pos_embed_tokens, config.embed_dim)


def test_full_uni2h_has_681m_parameters():
    model = meta_model(get_vit_config("uni2h"))
    assert sum(p.numel() for p in model.parameters()) == 681_394_176
    assert model.blocks[0].mlp.fc1.weight.shape == (8192, 1536)
    assert model.blocks[0].mlp.fc2.weight.shape == (1536, 4096)


def test_model_keys_equal_the_timm_key_lists_in_order():
    for config_name, key_list_file in [
        ("uni2h", "uni2h_keys.json"),
        ("xmag_vitb14", "timm_vit_base_patch14_dinov2_224_keys.json"),
    ]:
        model = meta_model(get_vit_config(config_name))
        ours = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
        assert ours == key_list(key_list_file)


def test_phikon_has_no_layerscale_keys():
    keys = meta_model(get_vit_config("phikon_vitb16")).state_dict().keys()
    assert not [key for key in keys if ".ls" in key]
    assert "pos_embed" in keys and "reg_token" not in keys


# ---------------------------------------------------------------- conversions, real values


def test_dinov2_hub_with_registers_is_renamed_and_resampled():
    source = dinov2_hub_state_dict(seeded_model(TINY_REG4, seed=5))
    model = VisionTransformer(TINY_REG4)
    assert load_vit_weights(model, source) == "dinov2_hub"
    loaded = model.state_dict()
    assert torch.equal(loaded["reg_token"], source["register_tokens"])
    # Register hub models resize with antialias on and offset 0 (an output-size request).
    expected_pos = resample_dinov2_pos_embed(source["pos_embed"], 16, offset=0.0, antialias=True)
    assert torch.equal(loaded["pos_embed"], expected_pos)
    assert torch.equal(loaded["blocks.1.mlp.fc2.weight"], source["blocks.1.mlp.fc2.weight"])


def test_resample_keeps_the_class_entry_and_uses_the_scale_factor():
    pos_embed = torch.randn(1, 1 + 37 * 37, 8)
    resampled = resample_dinov2_pos_embed(pos_embed, 16)
    assert resampled.shape == (1, 257, 8)
    assert torch.equal(resampled[:, 0], pos_embed[:, 0])
    grid = pos_embed[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    by_size = by_size.permute(0, 2, 3, 1).reshape(1, 256, 8)
    assert not torch.allclose(resampled[:, 1:], by_size, atol=1e-3)
    by_size_with_class = torch.cat([pos_embed[:, :1], by_size], dim=1)
    assert torch.equal(resample_dinov2_pos_embed(pos_embed, 16, offset=0.0), by_size_with_class)
    assert resample_dinov2_pos_embed(pos_embed.half(), 16).dtype == torch.float16


def test_resample_leaves_a_matching_grid_alone_and_rejects_non_square():
    pos_embed = torch.randn(1, 257, 8)
    assert resample_dinov2_pos_embed(pos_embed, 16) is pos_embed
    with pytest.raises(ValueError, match="not a square grid"):
        resample_dinov2_pos_embed(torch.randn(1, 1 + 37 * 36, 8), 16)


@pytest.mark.parametrize("layout", ["flat", "state_dict_wrapped", "model_nested"])
def test_xmag_release_layouts(layout):
    student = seeded_model(get_vit_config("tiny_dinov2"), seed=2)
    hub = dinov2_hub_state_dict(student)
    heads = {"global_head.0.weight": torch.randn(4, 4), "local_head.3.bias": torch.randn(4)}
    if layout == "model_nested":
        checkpoint = {"model": hub, **heads, "epoch": 7}
    else:
        checkpoint = {**{f"model.{k}": v for k, v in hub.items()}, **heads}
        if layout == "state_dict_wrapped":
            checkpoint = {"state_dict": checkpoint, "iteration": 30260}
    model = VisionTransformer(get_vit_config("tiny_dinov2"))
    assert load_vit_weights(model, checkpoint) == "xmag_release"
    expected_pos = resample_dinov2_pos_embed(hub["pos_embed"], 16, offset=0.1, antialias=False)
    assert torch.equal(model.pos_embed, expected_pos)
    assert torch.equal(model.blocks[0].attn.qkv.weight, hub["blocks.0.attn.qkv.weight"])


def test_xmag_release_file_with_pos_embed_already_at_224(tmp_path):
    student = seeded_model(get_vit_config("tiny_dinov2"), seed=3)
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in student.state_dict().items()}}
    path = tmp_path / "xmag_release.pth"
    torch.save(checkpoint, path)
    model = VisionTransformer(get_vit_config("tiny_dinov2"))
    assert load_vit_weights(model, path, fmt="xmag_release") == "xmag_release"
    assert torch.equal(model.pos_embed, student.pos_embed)


def test_xmag_release_without_student_keys_is_refused():
    state_dict = {
        "teacher.cls_token": torch.zeros(1, 1, 192),
        "global_head.0.weight": torch.zeros(2, 2),
    }
    model = VisionTransformer(get_vit_config("tiny_dinov2"))
    with pytest.raises(CheckpointError, match=r"model\.") as caught:
        load_vit_weights(model, state_dict, fmt="xmag_release")
    assert "teacher" in str(caught.value)


def test_detect_checkpoint_format():
    assert detect_checkpoint_format({"model.cls_token": 0}) == "xmag_release"
    assert detect_checkpoint_format({"cls_token": 0, "mask_token": 0}) == "dinov2_hub"
    assert detect_checkpoint_format({"cls_token": 0, "register_tokens": 0}) == "dinov2_hub"
    assert detect_checkpoint_format({"cls_token": 0, "reg_token": 0}) == "timm"


# ---------------------------------------------------------------- our own files


def test_xmag_checkpoint_round_trip(tmp_path):
    config = get_vit_config("tiny_uni2h")
    model = seeded_model(config, seed=4)
    path = tmp_path / "encoder.safetensors"
    save_encoder_checkpoint(model, path, metadata={"provenance": "unit test"})
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "xmag-encoder"
    assert metadata["provenance"] == "unit test"

    reloaded = load_encoder_checkpoint(path)
    assert reloaded.config == config
    assert not reloaded.training
    assert all(p.requires_grad for p in reloaded.parameters())
    images = random_images(config)
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))

    into_existing = VisionTransformer(config)
    assert load_vit_weights(into_existing, path) == "xmag"
    with torch.no_grad():
        assert torch.equal(into_existing(images), model(images))


def test_xmag_checkpoint_from_another_config_is_refused(tmp_path):
    path = tmp_path / "encoder.safetensors"
    save_encoder_checkpoint(seeded_model(get_vit_config("tiny_dinov2")), path)
    other = dataclasses.replace(get_vit_config("tiny_dinov2"), layer_norm_eps=1e-12)
    with pytest.raises(CheckpointError, match="layer_norm_eps"):
        load_vit_weights(VisionTransformer(other), path)


def test_reserved_metadata_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_encoder_checkpoint(
            seeded_model(get_vit_config("tiny_dinov2")), tmp_path / "x.safetensors", {"format": "x"}
        )


def test_foreign_safetensors_is_not_an_xmag_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"cls_token": torch.zeros(1, 1, 192)}, str(path))
    with pytest.raises(CheckpointError, match="not an XMAG encoder checkpoint"):
        load_encoder_checkpoint(path)


# ---------------------------------------------------------------- refusals name the problem


@pytest.fixture
def tiny_state_dict():
    model = seeded_model(get_vit_config("tiny_dinov2"))
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_missing_key_is_named(tiny_state_dict):
    del tiny_state_dict["blocks.1.norm1.weight"]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.norm1\.weight") as caught:
        load_vit_weights(VisionTransformer(get_vit_config("tiny_dinov2")), tiny_state_dict)
    assert caught.value.missing_keys == ["blocks.1.norm1.weight"]
    assert "'timm'" in str(caught.value)


def test_unexpected_key_is_named(tiny_state_dict):
    tiny_state_dict["head.weight"] = torch.zeros(2, 192)
    with pytest.raises(CheckpointError, match=r"head\.weight") as caught:
        load_vit_weights(VisionTransformer(get_vit_config("tiny_dinov2")), tiny_state_dict)
    assert caught.value.unexpected_keys == ["head.weight"]


def test_wrong_shape_is_named(tiny_state_dict):
    tiny_state_dict["blocks.0.mlp.fc1.weight"] = torch.zeros(10, 192)
    model = VisionTransformer(get_vit_config("tiny_dinov2"))
    before = model.blocks[0].mlp.fc1.weight.clone()
    expected = r"blocks\.0\.mlp\.fc1\.weight: checkpoint \(10, 192\)"
    with pytest.raises(CheckpointError, match=expected) as caught:
        load_vit_weights(model, tiny_state_dict)
    assert len(caught.value.mismatched_shapes) == 1
    # Nothing was copied into the model before the refusal.
    assert torch.equal(model.blocks[0].mlp.fc1.weight, before)


def test_checkpoint_of_another_model_is_refused_with_its_keys():
    model = meta_model(get_vit_config("xmag_vitb14"))
    with pytest.raises(CheckpointError) as caught:
        load_vit_weights(model, meta_state_dict("uni2h_keys.json"))
    message = str(caught.value)
    assert "reg_token" in message and "xmag_vitb14" in message
    assert "pos_embed: checkpoint (1, 256, 1536), model (1, 257, 768)" in message
    assert "blocks.12.norm1.weight" in caught.value.unexpected_keys
    assert "and" in message and "more" in message  # long lists are cut, with the total count


def test_timm_pos_embed_for_another_grid_is_explained():
    state_dict = dinov2_hub_state_dict(seeded_model(get_vit_config("tiny_dinov2")))
    del state_dict["mask_token"]
    with pytest.raises(CheckpointError, match="fmt='dinov2_hub'"):
        load_vit_weights(VisionTransformer(get_vit_config("tiny_dinov2")), state_dict)


@pytest.mark.parametrize("file_name", ["broken.safetensors", "broken.pth"])
def test_corrupt_file_names_the_path(tmp_path, file_name):
    path = tmp_path / file_name
    path.write_bytes(b"\x00 this is not a checkpoint \xff" * 10)
    with pytest.raises(CheckpointError, match=str(path)):
        read_state_dict(path)


def test_truncated_pth_names_the_path(tmp_path, tiny_state_dict):
    path = tmp_path / "truncated.pth"
    torch.save(tiny_state_dict, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=str(path)):
        load_vit_weights(VisionTransformer(get_vit_config("tiny_dinov2")), path)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "encoder.safetensors"
    with pytest.raises(CheckpointError, match="not found") as caught:
        load_encoder_checkpoint(path)
    assert str(path) in str(caught.value)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint file type"):
        read_state_dict(path)


def test_pickled_objects_are_not_executed(tmp_path):
    path = tmp_path / "with_object.pth"
    checkpoint = {"state_dict": {"cls_token": torch.zeros(1)}, "args": argparse.Namespace(lr=5e-4)}
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="re-save just the state dict"):
        read_state_dict(path)
