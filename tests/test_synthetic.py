"""Tests of the synthetic slide generator: format, pyramid, ground truth, physical consistency."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage

from xmag.synthetic.scene import MASK_UM_PER_PX
from xmag.synthetic.slide import SyntheticSlide, make_synthetic_slide

# 4000 x 3000 px at 20x is 2 x 1.5 mm of glass; the 40x twin is 8000 x 6000 px of the same glass.
SLIDE_20X = dict(width_px=4000, height_px=3000, base_magnification=20, seed=7, n_lesions=2)
SLIDE_40X = dict(width_px=8000, height_px=6000, base_magnification=40, seed=7, n_lesions=2)
SMALL = dict(width_px=1024, height_px=768)


@pytest.fixture(scope="module")
def twin_20x(tmp_path_factory) -> SyntheticSlide:
    return make_synthetic_slide(tmp_path_factory.mktemp("s20") / "case.svs", **SLIDE_20X)


@pytest.fixture(scope="module")
def twin_40x(tmp_path_factory) -> SyntheticSlide:
    return make_synthetic_slide(tmp_path_factory.mktemp("s40") / "case.svs", **SLIDE_40X)


def read_level(slide: SyntheticSlide, level: int) -> np.ndarray:
    """A whole pyramid level as RGB int array, through OpenSlide."""
    with openslide.OpenSlide(slide.path) as reader:
        size = reader.level_dimensions[level]
        return np.asarray(reader.read_region((0, 0), level, size).convert("RGB")).astype(int)


def saturation(image: np.ndarray) -> np.ndarray:
    return image.max(axis=-1) - image.min(axis=-1)


@pytest.mark.parametrize("magnification", [20, 40])
def test_detected_as_aperio_with_resolution(twin_20x, twin_40x, magnification):
    slide = twin_20x if magnification == 20 else twin_40x
    assert openslide.OpenSlide.detect_format(slide.path) == "aperio"
    with openslide.OpenSlide(slide.path) as reader:
        properties = reader.properties
        assert float(properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(10 / magnification)
        assert float(properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(10 / magnification)
        assert float(properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == magnification
        assert reader.dimensions == (slide.width_px, slide.height_px)
    assert slide.mpp == pytest.approx(10 / magnification)


@pytest.mark.parametrize(("write_mpp", "write_objective_power"), [(False, True), (True, False), (False, False)])
def test_missing_resolution_metadata(tmp_path, write_mpp, write_objective_power):
    slide = make_synthetic_slide(
        tmp_path / "bare.svs", **SMALL, write_mpp=write_mpp, write_objective_power=write_objective_power
    )
    assert openslide.OpenSlide.detect_format(slide.path) == "aperio"
    with openslide.OpenSlide(slide.path) as reader:
        properties = reader.properties
        assert (openslide.PROPERTY_NAME_MPP_X in properties) == write_mpp
        assert (openslide.PROPERTY_NAME_MPP_Y in properties) == write_mpp
        assert (openslide.PROPERTY_NAME_OBJECTIVE_POWER in properties) == write_objective_power
        reader.read_region((0, 0), 0, (64, 64))  # still a readable slide


def test_pyramid_levels_are_4x_apart(twin_20x):
    with openslide.OpenSlide(twin_20x.path) as reader:
        assert reader.level_dimensions == ((4000, 3000), (1000, 750), (250, 187))
        assert reader.level_downsamples == pytest.approx((1, 4, 16), rel=1e-2)
        assert reader.level_count == len(twin_20x.level_sizes_px)
    assert twin_20x.level_sizes_px == ((4000, 3000), (1000, 750), (250, 187))
    assert twin_20x.level_downsamples == (1, 4, 16)
    # Default pyramid: levels are added until the smallest fits in about two tiles.
    assert min(twin_20x.level_sizes_px[-1]) <= 2 * twin_20x.tile_size_px
    assert min(twin_20x.level_sizes_px[-2]) > 2 * twin_20x.tile_size_px


@pytest.mark.parametrize("levels", [1, 2])
def test_explicit_level_count(tmp_path, levels):
    slide = make_synthetic_slide(tmp_path / "levels.svs", **SMALL, levels=levels, tile_size_px=128)
    with openslide.OpenSlide(slide.path) as reader:
        assert reader.level_count == levels
        assert reader.level_dimensions[-1] == (1024 // 4 ** (levels - 1), 768 // 4 ** (levels - 1))
        assert reader.properties["openslide.level[0].tile-width"] == "128"


def test_invalid_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError):
        make_synthetic_slide(tmp_path / "x.svs", **SMALL, levels=0)
    with pytest.raises(ValueError):
        make_synthetic_slide(tmp_path / "x.svs", **SMALL, levels=8)
    with pytest.raises(ValueError):
        make_synthetic_slide(tmp_path / "x.svs", **SMALL, tissue="none", n_lesions=1)
    with pytest.raises(ValueError):
        make_synthetic_slide(tmp_path / "x.svs", **SMALL, tile_size_px=100)


def test_associated_images_like_a_real_svs(twin_20x, tmp_path):
    with openslide.OpenSlide(twin_20x.path) as reader:
        images = reader.associated_images
        assert set(images) == {"thumbnail", "label", "macro"}
        thumbnail = images["thumbnail"]
        assert max(thumbnail.size) == 1024
        assert thumbnail.size[0] / thumbnail.size[1] == pytest.approx(4000 / 3000, rel=0.01)
        assert images["label"].size == (400, 400)
        assert images["macro"].size[0] > images["macro"].size[1]

    bare = make_synthetic_slide(tmp_path / "bare.svs", **SMALL, associated_images=False)
    with openslide.OpenSlide(bare.path) as reader:
        assert dict(reader.associated_images) == {}


def test_masks_agree_with_pixels(twin_20x):
    # Level 2 of a 20x slide is 8 um/px: its pixel centres are the mask's pixel centres.
    assert 0.5 * 16 == MASK_UM_PER_PX
    image = read_level(twin_20x, 2)
    tissue = twin_20x.read_tissue_mask()
    assert tissue.shape == (188, 250)  # ceil(1500 um / 8), ceil(2000 um / 8)
    tissue = tissue[: image.shape[0], : image.shape[1]]
    assert 0.1 < tissue.mean() < 0.9

    # Away from the outline (JPEG blocks and the 1-px outline ramp), tissue is
    # stained and background is bright, unsaturated glass.
    inside = ndimage.binary_erosion(tissue, iterations=2)
    outside = ~ndimage.binary_dilation(tissue, iterations=2)
    assert np.percentile(saturation(image[inside]), 1) > 30
    assert image[inside].mean() < 215
    assert saturation(image[outside]).mean() < 3
    assert np.percentile(saturation(image[outside]), 99.9) < 25
    assert 235 < image[outside].mean() < 250


def test_lesions_look_different_and_match_their_boxes(twin_20x):
    assert len(twin_20x.lesion_boxes_px) == 2
    lesion = twin_20x.read_lesion_mask()
    tissue = twin_20x.read_tissue_mask()
    assert lesion.any() and not (lesion & ~tissue).any()

    # Every lesion mask pixel lies inside a lesion box (boxes in level-0 px).
    rows, cols = np.nonzero(lesion)
    centres_x = (cols + 0.5) * MASK_UM_PER_PX / twin_20x.mpp
    centres_y = (rows + 0.5) * MASK_UM_PER_PX / twin_20x.mpp
    covered = np.zeros(rows.size, dtype=bool)
    for x, y, width, height in twin_20x.lesion_boxes_px:
        assert width > 0 and height > 0
        covered |= (centres_x >= x) & (centres_x < x + width) & (centres_y >= y) & (centres_y < y + height)
    assert covered.all()

    # At level 1 (2 um/px, one mask pixel = 4 x 4 px): lesions are crowded with dark nuclei.
    image = read_level(twin_20x, 1)
    grow = np.ones((4, 4), dtype=bool)
    lesion_px = np.kron(lesion, grow)[: image.shape[0], : image.shape[1]]
    tissue_px = np.kron(tissue, grow)[: image.shape[0], : image.shape[1]]
    in_lesion = ndimage.binary_erosion(lesion_px, iterations=8)
    normal = ndimage.binary_erosion(tissue_px & ~ndimage.binary_dilation(lesion_px, iterations=8), iterations=8)
    assert in_lesion.sum() > 1000 and normal.sum() > 1000
    red = image[..., 0]
    assert red[in_lesion].mean() < red[normal].mean() - 30
    dark_in_lesion = (red[in_lesion] < 150).mean()
    dark_in_normal = (red[normal] < 150).mean()
    assert dark_in_lesion > 0.2 and dark_in_lesion > 5 * dark_in_normal


def test_same_seed_same_tissue_at_20x_and_40x(twin_20x, twin_40x):
    assert twin_20x.mask_um_per_px == twin_40x.mask_um_per_px
    assert np.array_equal(twin_20x.read_tissue_mask(), twin_40x.read_tissue_mask())
    assert np.array_equal(twin_20x.read_lesion_mask(), twin_40x.read_lesion_mask())
    # Same micrometres, twice the pixels.
    assert [tuple(2 * v for v in box) for box in twin_20x.lesion_boxes_px] == list(twin_40x.lesion_boxes_px)

    # Same pixels too, once both are at 2 um/px: 20x level 1 vs 40x level 1 (1 um/px) halved.
    # Inside tissue they differ only by JPEG and resampling (mean ~5 grey levels);
    # nuclei or textures placed in pixels instead of micrometres give 6.5 to 10+.
    at_20x = read_level(twin_20x, 1)
    at_40x = read_level(twin_40x, 1)
    halved = at_40x.reshape(at_40x.shape[0] // 2, 2, at_40x.shape[1] // 2, 2, 3).mean(axis=(1, 3))
    assert at_20x.shape == halved.shape
    tissue = np.kron(twin_20x.read_tissue_mask(), np.ones((4, 4), dtype=bool))[: at_20x.shape[0], : at_20x.shape[1]]
    difference = np.abs(at_20x - halved)[ndimage.binary_erosion(tissue, iterations=4)]
    assert difference.mean() < 6
    assert np.percentile(difference, 99) < 40


def test_other_seed_other_tissue(twin_20x, tmp_path):
    other = make_synthetic_slide(tmp_path / "other.svs", **{**SLIDE_20X, "seed": 8})
    assert not np.array_equal(other.read_tissue_mask(), twin_20x.read_tissue_mask())


def test_deterministic(tmp_path):
    def digest(slide: SyntheticSlide) -> list[str]:
        files = (slide.path, slide.tissue_mask_path, slide.lesion_mask_path)
        return [hashlib.sha256(path.read_bytes()).hexdigest() for path in files]

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = make_synthetic_slide(tmp_path / "a" / "s.svs", **SMALL, seed=3, n_lesions=1)
    second = make_synthetic_slide(tmp_path / "b" / "s.svs", **SMALL, seed=3, n_lesions=1)
    assert digest(first) == digest(second)
    assert first.lesion_boxes_px == second.lesion_boxes_px


def test_metadata_json_describes_the_slide(twin_20x):
    metadata = json.loads(twin_20x.metadata_path.read_text())
    assert metadata["mask_um_per_px"] == MASK_UM_PER_PX
    assert (metadata["width_px"], metadata["height_px"]) == (4000, 3000)
    assert metadata["mpp"] == 0.5
    assert metadata["base_magnification"] == 20
    assert metadata["seed"] == 7
    assert [tuple(box) for box in metadata["lesion_boxes_px"]] == list(twin_20x.lesion_boxes_px)
    # Mask files are named relative to the JSON, so the folder can move.
    assert (twin_20x.metadata_path.parent / metadata["tissue_mask"]) == twin_20x.tissue_mask_path
    assert (twin_20x.metadata_path.parent / metadata["lesion_mask"]) == twin_20x.lesion_mask_path
    mask = Image.open(twin_20x.tissue_mask_path)
    assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
    assert list(mask.size) == metadata["mask_size_px"]


def test_blank_slide(tmp_path):
    slide = make_synthetic_slide(tmp_path / "blank.svs", **SMALL, tissue="none")
    assert not slide.read_tissue_mask().any()
    assert not slide.read_lesion_mask().any()
    assert slide.lesion_boxes_px == ()
    image = read_level(slide, 0)
    assert saturation(image).max() < 12
    assert 235 < image.mean() < 250


def test_full_tissue(tmp_path):
    slide = make_synthetic_slide(tmp_path / "full.svs", **SMALL, tissue="full")
    assert slide.read_tissue_mask().all()
    assert np.percentile(saturation(read_level(slide, 0)), 1) > 30


def test_grey_background(tmp_path):
    slide = make_synthetic_slide(tmp_path / "grey.svs", **SMALL, tissue="none", background="grey")
    assert 200 < read_level(slide, 0).mean() < 215


def test_faint_tissue_is_pale_but_present(tmp_path, twin_20x):
    faint = make_synthetic_slide(tmp_path / "faint.svs", **{**SLIDE_20X, "faint": True})
    tissue = ndimage.binary_erosion(faint.read_tissue_mask(), iterations=2)[:187, :250]
    glass = ~ndimage.binary_dilation(faint.read_tissue_mask(), iterations=2)[:187, :250]
    faint_image = read_level(faint, 2)
    normal_image = read_level(twin_20x, 2)
    faint_saturation = saturation(faint_image[tissue]).mean()
    assert faint_saturation < 0.5 * saturation(normal_image[tissue]).mean()
    assert faint_saturation > 3 * saturation(faint_image[glass]).mean() + 5
    assert faint_image[tissue].mean() < faint_image[glass].mean() - 8
