"""Slide readers on real generated TIFF pyramids: both backends, same facts, same pixels."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_cucim

from xmag.slide.reader import best_level_for_downsample, open_slide, resolve_mpp


def test_facts_of_a_20x_aperio_slide(slide_20x, backend):
    with open_slide(slide_20x.path, backend=backend) as reader:
        info = reader.info
    assert info.backend == backend
    assert info.vendor == "aperio"
    assert info.mpp == pytest.approx(0.5)
    assert info.objective_power == pytest.approx(20)
    assert info.level_dimensions[0] == (9_600, 7_200)
    assert info.level_count >= 3
    for level in range(1, info.level_count):
        assert info.level_downsamples[level] == pytest.approx(4**level, rel=0.01)
    assert {"label", "macro", "thumbnail"} <= set(info.associated_images)
    assert resolve_mpp(info) == pytest.approx(0.5)


def test_facts_of_a_40x_slide(slide_40x, backend):
    with open_slide(slide_40x.path, backend=backend) as reader:
        assert reader.info.mpp == pytest.approx(0.25)
        assert reader.info.objective_power == pytest.approx(40)


def test_backends_agree_on_facts_and_pixels(slide_20x):
    require_cucim()
    rng = np.random.default_rng(0)
    with (
        open_slide(slide_20x.path, backend="openslide") as openslide_reader,
        open_slide(slide_20x.path, backend="cucim") as cucim_reader,
    ):
        a, b = openslide_reader.info, cucim_reader.info
        assert (a.level_dimensions, a.level_downsamples, a.mpp, a.objective_power, a.vendor) == (
            b.level_dimensions,
            b.level_downsamples,
            b.mpp,
            b.objective_power,
            b.vendor,
        )
        for level in range(a.level_count):
            downsample = a.level_downsamples[level]
            level_width, level_height = a.level_dimensions[level]
            size = min(224, level_width, level_height)
            for _ in range(4):
                x = int(rng.integers(0, level_width - size + 1) * downsample)
                y = int(rng.integers(0, level_height - size + 1) * downsample)
                from_openslide = openslide_reader.read_region((x, y), level, (size, size))
                from_cucim = cucim_reader.read_region((x, y), level, (size, size))
                assert from_openslide.dtype == from_cucim.dtype == np.uint8
                assert from_openslide.shape == from_cucim.shape == (size, size, 3)
                np.testing.assert_array_equal(from_openslide, from_cucim, err_msg=f"level {level} at {(x, y)}")
        # The batched path (regions on the reader's thread pool) agrees with single reads and across backends.
        coords = np.array([[0, 0], [896, 448], [4_000, 3_000], [8_000, 6_000], [1_792, 0]])
        batched_openslide = np.concatenate(list(openslide_reader.read_regions(coords, 1, 224, batch_size=2)))
        batched_cucim = np.concatenate(list(cucim_reader.read_regions(coords, 1, 224, batch_size=2)))
        np.testing.assert_array_equal(batched_openslide, batched_cucim)
        single = np.stack([openslide_reader.read_region(tuple(xy), 1, (224, 224)) for xy in coords])
        np.testing.assert_array_equal(batched_openslide, single)


def test_batches_are_copies_not_a_reused_buffer(slide_20x, backend):
    coords = np.array([[0, 0], [2_000, 2_000], [4_000, 3_000], [6_000, 1_000]])
    with open_slide(slide_20x.path, backend=backend) as reader:
        batches = list(reader.read_regions(coords, 0, 64, batch_size=1))
        expected = [reader.read_region(tuple(xy), 0, (64, 64)) for xy in coords]
    for batch, region in zip(batches, expected, strict=False):
        np.testing.assert_array_equal(batch[0], region)


def test_outside_the_slide_is_white(slide_20x, backend):
    with open_slide(slide_20x.path, backend=backend) as reader:
        region = reader.read_region((9_600 - 32, 7_200 - 32), 0, (64, 64))
    assert (region[40:, :] == 255).all() and (region[:, 40:] == 255).all()


def test_associated_images_are_rgb(slide_20x, backend):
    with open_slide(slide_20x.path, backend=backend) as reader:
        for name in reader.info.associated_images:
            image = reader.associated_image(name)
            assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        with pytest.raises(KeyError):
            reader.associated_image("no-such-image")


def test_default_backend_is_openslide(slide_20x):
    with open_slide(slide_20x.path) as reader:
        assert reader.info.backend == "openslide"


def test_best_level_never_upsamples(slide_20x):
    with open_slide(slide_20x.path, backend="openslide") as reader:
        info = reader.info
    assert best_level_for_downsample(info, 1.0) == 0
    assert best_level_for_downsample(info, 3.9) == 0
    assert best_level_for_downsample(info, 4.0) == 1
    assert best_level_for_downsample(info, 8.0) == 1
    assert best_level_for_downsample(info, 16.0) == 2
