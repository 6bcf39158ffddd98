"""Gated-attention MIL heads: attention is a distribution over tiles, pooling ignores tile order."""

from __future__ import annotations

import pytest
import torch

from xmag.models import GatedABMIL, SlideHeads
from xmag.runtimes.torch_backend import TorchSlideHeads


def features(num_tiles: int = 50, dim: int = 768, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_tiles, dim, generator=torch.Generator().manual_seed(seed))


def seeded_head(seed: int = 0, **kwargs) -> GatedABMIL:
    torch.manual_seed(seed)
    return GatedABMIL(**kwargs).eval()


def test_attention_is_a_distribution_over_tiles():
    logits, attention = seeded_head()(features(50))
    assert logits.shape == (2,)
    assert attention.shape == (50,)
    assert (attention >= 0).all()
    assert attention.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert attention.std() > 0, "random tiles should not all get the same weight"


def test_single_tile_gets_all_the_attention():
    _, attention = seeded_head()(features(1))
    assert attention.tolist() == [1.0]


def test_permuting_tiles_permutes_attention_and_keeps_logits():
    head = seeded_head(num_classes=3)
    bag = features(40)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    logits, attention = head(bag)
    permuted_logits, permuted_attention = head(bag[order])
    torch.testing.assert_close(permuted_attention, attention[order])
    torch.testing.assert_close(permuted_logits, logits)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(0, 768), "empty"),
        (torch.zeros(10, 512), r"\(N, 768\)"),
        (torch.zeros(2, 10, 768), r"\(N, 768\)"),
    ],
)
def test_bad_bags_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        seeded_head()(bad)


def test_one_feature_tensor_feeds_every_head():
    subtype = seeded_head(seed=1, num_classes=2)
    grade = seeded_head(seed=2, num_classes=3)
    heads = SlideHeads(
        {"nsclc": subtype, "isup": grade},
        {"nsclc": ["LUAD", "LUSC"], "isup": ["low", "mid", "high"]},
    ).eval()
    bag = features(30)
    outputs = heads(bag)
    for task, head in [("nsclc", subtype), ("isup", grade)]:
        expected_logits, expected_attention = head(bag)
        torch.testing.assert_close(outputs[task][0], expected_logits)
        torch.testing.assert_close(outputs[task][1], expected_attention)
    assert not torch.allclose(outputs["nsclc"][1], outputs["isup"][1])

    # Probabilities by class name, label and attention, as the pipeline gets them.
    predictions = TorchSlideHeads(heads).predict(bag.numpy())
    isup = predictions["isup"]
    assert set(isup.probabilities) == {"low", "mid", "high"}
    assert sum(isup.probabilities.values()) == pytest.approx(1.0)
    assert isup.label == max(isup.probabilities, key=isup.probabilities.get)
    torch.testing.assert_close(torch.from_numpy(isup.attention), outputs["isup"][1])


def test_from_class_names_sizes_each_head():
    heads = SlideHeads.from_class_names({"rcc": ["ccRCC", "pRCC", "chRCC"], "brca": ["low", "high"]}, in_dim=64)
    logits = {task: out[0].shape for task, out in heads(features(5, dim=64)).items()}
    assert logits == {"rcc": (3,), "brca": (2,)}


def test_class_names_must_match_the_heads():
    with pytest.raises(ValueError, match="3 class names"):
        SlideHeads({"rcc": GatedABMIL(num_classes=2)}, {"rcc": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="same tasks"):
        SlideHeads({"rcc": GatedABMIL()}, {"nsclc": ["a", "b"]})
    with pytest.raises(ValueError, match="same feature width"):
        SlideHeads(
            {"a": GatedABMIL(in_dim=768), "b": GatedABMIL(in_dim=1536)},
            {"a": ["x", "y"], "b": ["x", "y"]},
        )
    with pytest.raises(ValueError, match="empty"):
        SlideHeads.from_class_names({"rcc": ["a", "b"]})(torch.zeros(0, 768))
