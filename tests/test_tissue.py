"""Tissue detection against the ground-truth masks the generator plants."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xmag.slide.reader import open_slide, resolve_mpp
from xmag.slide.tissue import detect_tissue, otsu_threshold, tissue_mask_for_slide
from xmag.synthetic.slide import make_synthetic_slide


def _ground_truth(slide, shape) -> np.ndarray:
    truth = Image.open(slide.tissue_mask_path).convert("L")
    if truth.size != (shape[1], shape[0]):
        truth = truth.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(truth) > 127


def _detected(slide, backend="openslide"):
    with open_slide(slide.path, backend=backend) as reader:
        tissue, _ = tissue_mask_for_slide(reader, resolve_mpp(reader.info))
    return tissue


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@pytest.mark.parametrize(
    "variant",
    [
        {"seed": 1},
        {"seed": 2, "background": "grey"},
        {"seed": 3, "faint": True},
        {"seed": 4, "faint": True, "background": "grey"},
        {"seed": 5, "n_lesions": 2},
        {"seed": 6, "base_magnification": 40},
    ],
    ids=["white", "grey-background", "faint", "faint-on-grey", "lesions", "40x"],
)
def test_iou_against_planted_tissue(tmp_path, variant):
    magnification = variant.get("base_magnification", 20)
    scale = magnification // 20
    slide = make_synthetic_slide(tmp_path / "slide.svs", width_px=8_000 * scale, height_px=6_000 * scale, **variant)
    tissue = _detected(slide)
    truth = _ground_truth(slide, tissue.mask.shape)
    assert truth.any()
    assert _iou(tissue.mask, truth) >= 0.9


def test_slide_that_is_all_tissue(tmp_path):
    slide = make_synthetic_slide(tmp_path / "full.svs", width_px=6_000, height_px=4_000, tissue="full", seed=8)
    tissue = _detected(slide)
    truth = _ground_truth(slide, tissue.mask.shape)
    assert truth.mean() > 0.99
    assert _iou(tissue.mask, truth) >= 0.9


@pytest.mark.parametrize("background", ["white", "grey"])
def test_blank_slide_has_no_tissue(tmp_path, background):
    slide = make_synthetic_slide(
        tmp_path / "blank.svs", width_px=6_000, height_px=4_000, tissue="none", background=background
    )
    assert not _detected(slide).mask.any()


def test_same_glass_at_20x_and_40x_gives_the_same_mask(slide_20x, slide_40x):
    mask_20x = _detected(slide_20x).mask
    mask_40x = _detected(slide_40x).mask
    assert mask_20x.shape == mask_40x.shape
    assert _iou(mask_20x, mask_40x) >= 0.97


def test_backends_give_the_same_mask(slide_20x, backend):
    reference = _detected(slide_20x, "openslide").mask
    assert _iou(_detected(slide_20x, backend).mask, reference) >= 0.99


def test_faint_tissue_beside_strongly_stained_tissue_is_kept():
    """Otsu on such a slide splits faint from strong; the clamp keeps the faint piece as tissue."""
    rng = np.random.default_rng(0)
    thumbnail = np.clip(rng.normal(242, 2, (300, 600, 3)), 0, 255)
    thumbnail[50:250, 50:250] = rng.normal((200, 110, 170), 4, (200, 200, 3))  # saturation ~0.45
    thumbnail[50:250, 350:550] = rng.normal((238, 206, 222), 2, (200, 200, 3))  # saturation ~0.13
    mask = detect_tissue(thumbnail.astype(np.uint8), um_per_px=8.0)
    assert mask[60:240, 60:240].mean() > 0.99
    assert mask[60:240, 360:540].mean() > 0.99
    assert not mask[:, 270:330].any() and not mask[:30].any()


def test_otsu_splits_two_populations():
    values = np.concatenate([np.full(1000, 0.1), np.full(1000, 0.7)])
    assert 0.1 < otsu_threshold(values) < 0.7


def test_detect_tissue_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        detect_tissue(np.zeros((10, 10), np.uint8), um_per_px=8.0)
