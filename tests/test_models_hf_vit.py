"""Phikon's Hugging Face ViT format against transformers' own ViTModel."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from xmag.models.checkpoints.fitting import load_vit_weights
from xmag.models.checkpoints.reading import detect_checkpoint_format
from xmag.models.vit import VisionTransformer, get_vit_config

# transformers 5 names -> the transformers 4 names Phikon's published file uses.
TO_TRANSFORMERS_4 = {
    "layers.": "encoder.layer.",
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def _tiny_phikon_pair():
    hf_config = transformers.ViTConfig(
        hidden_size=192,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
    )
    torch.manual_seed(0)
    reference = transformers.ViTModel(hf_config, add_pooling_layer=True).eval()
    with torch.no_grad():  # a non-trivial draw: LayerNorms and biases away from their init
        for parameter in reference.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    ours = VisionTransformer(dataclasses.replace(get_vit_config("phikon_vitb16"), embed_dim=192, depth=2, num_heads=3))
    return reference, ours


def _to_transformers_4(state_dict):
    renamed = {}
    for key, value in state_dict.items():
        for new, old in TO_TRANSFORMERS_4.items():
            key = key.replace(new, old)
        renamed[key] = value
    return renamed


@pytest.mark.parametrize("naming", ["transformers5", "transformers4", "classification-prefix"])
def test_phikon_format_reproduces_transformers(naming):
    reference, ours = _tiny_phikon_pair()
    state_dict = reference.state_dict()
    if naming != "transformers5":
        state_dict = _to_transformers_4(state_dict)
    if naming == "classification-prefix":
        state_dict = {f"vit.{key}": value for key, value in state_dict.items()}
    assert detect_checkpoint_format(state_dict) == "hf_vit"
    assert load_vit_weights(ours, state_dict) == "hf_vit"
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(pixel_values=images).last_hidden_state
        tokens = ours.forward_features(images)
    assert (tokens["x_norm_clstoken"] - expected[:, 0]).abs().max() < 1e-5
    assert (tokens["x_norm_patchtokens"] - expected[:, 1:]).abs().max() < 1e-5
