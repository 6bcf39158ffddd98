"""Feature files: ours read as TRIDENT's and CLAM's loaders read theirs, and theirs load in ours."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from xmag.features import (
    EncoderIdentity,
    FeatureFileError,
    is_current,
    read_feature_file,
    tiling_record,
    write_feature_file,
)
from xmag.models.encoder import build_tile_encoder
from xmag.pipeline import embed_slide
from xmag.runtimes.torch_backend import TorchTileEncoder
from xmag.slide.tiling import XMAG_5X, TilingSpec
from xmag.synthetic.slide import make_synthetic_slide

IDENTITY = EncoderIdentity("tiny_dinov2", "ab" * 32, "torch fp32 on cpu")
TRIDENT_COORDS_ATTRIBUTES = {
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "savetodir",
    "level0_width",
    "level0_height",
}


@pytest.fixture(scope="module")
def encoder():
    return TorchTileEncoder(build_tile_encoder("tiny_dinov2", seed=0))


@pytest.fixture(scope="module")
def embedded(slide_20x, encoder):
    return embed_slide(str(slide_20x.path), encoder, batch_size=8)


def test_our_file_reads_as_trident_and_clam_read_theirs(tmp_path, embedded):
    path = write_feature_file(tmp_path / "glass_20x.h5", embedded, IDENTITY)
    with h5py.File(path, "r") as h5:
        # CLAM's loader: features and coords, nothing else.
        features, coords = h5["features"][:], h5["coords"][:]
        assert features.dtype == np.float32 and features.shape == embedded.embeddings.shape
        assert coords.dtype == np.int64 and coords.shape == (len(features), 2)
        np.testing.assert_array_equal(features, embedded.embeddings)
        np.testing.assert_array_equal(coords, embedded.level0_coords)
        # TRIDENT's attributes, with its names.
        assert set(h5["coords"].attrs) == TRIDENT_COORDS_ATTRIBUTES
        assert set(h5["features"].attrs) == {"name", "savetodir", "encoder"}
        attrs = h5["coords"].attrs
        assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == embedded.tile_size_level0_px == 896
        assert (attrs["level0_magnification"], attrs["target_magnification"], attrs["overlap"]) == (20, 5, 0)
        assert (attrs["level0_width"], attrs["level0_height"]) == (embedded.facts.width_px, embedded.facts.height_px)
        assert attrs["name"] == "glass_20x" and h5["features"].attrs["encoder"] == "tiny_dinov2"
        # Ours, beside theirs.
        assert h5.attrs["xmag_level0_mpp"] == 0.5 and h5.attrs["xmag_target_mpp"] == 2.0
        assert h5.attrs["xmag_encoder_sha256"] == IDENTITY.sha256 and h5.attrs["xmag_resize_filter"] == "bilinear"
    found = read_feature_file(path)
    assert found.layout == "xmag" and found.tiling == tiling_record(XMAG_5X)
    assert is_current(path, IDENTITY, XMAG_5X)
    assert not is_current(path, EncoderIdentity("tiny_dinov2", "cd" * 32, IDENTITY.runtime), XMAG_5X)
    assert not is_current(path, IDENTITY, TilingSpec(target_mpp=1.0, tile_size_px=224))
    assert not list(tmp_path.glob("*.partial"))


def test_a_slide_without_tissue_gives_empty_datasets(tmp_path, encoder):
    blank = make_synthetic_slide(tmp_path / "blank.svs", width_px=2000, height_px=1500, tissue="none", seed=1)
    embedded = embed_slide(str(blank.path), encoder)
    path = write_feature_file(tmp_path / "blank.h5", embedded, IDENTITY)
    found = read_feature_file(path)
    assert found.features.shape == (0, encoder.embed_dim) and found.coords.shape == (0, 2)
    assert found.coords.dtype == np.int64 and is_current(path, IDENTITY, XMAG_5X)


def test_trident_and_clam_layouts_load(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 1536)).astype(np.float32)
    coords = rng.integers(0, 40_000, (5, 2))
    trident = tmp_path / "trident" / "slide-1.h5"
    trident.parent.mkdir()
    with h5py.File(trident, "w") as h5:  # as TRIDENT writes its patch features
        h5.create_dataset("features", data=features).attrs.update(
            {"name": "slide-1", "savetodir": str(trident.parent), "encoder": "uni_v2"}
        )
        h5.create_dataset("coords", data=coords.astype(np.int64)).attrs.update(
            {
                "patch_size": 256,
                "patch_size_level0": 512,
                "level0_magnification": 40,
                "target_magnification": 20,
                "overlap": 0,
                "name": "slide-1",
                "savetodir": "x",
                "level0_width": 40_000,
                "level0_height": 30_000,
            }
        )
    clam = tmp_path / "h5_files" / "TCGA-01.h5"
    clam.parent.mkdir()
    with h5py.File(clam, "w") as h5:  # as CLAM writes: int32 coords, no attributes
        h5.create_dataset("features", data=features)
        h5.create_dataset("coords", data=coords.astype(np.int32))
    from_trident = read_feature_file(trident)
    assert (from_trident.layout, from_trident.patch_size_level0, from_trident.encoder) == ("trident", 512, "uni_v2")
    from_clam = read_feature_file(clam, patch_size_level0=448)
    assert (from_clam.layout, from_clam.patch_size_level0, from_clam.slide_id) == ("clam", 448, "TCGA-01")
    for found in (from_trident, from_clam):
        np.testing.assert_array_equal(found.features, features)
        assert found.coords.dtype == np.int64
        np.testing.assert_array_equal(found.coords, coords)
    assert not is_current(trident, IDENTITY, XMAG_5X)  # not ours: a rerun would redo it


def test_unreadable_files_are_refused_clearly(tmp_path):
    not_hdf5 = tmp_path / "a.h5"
    not_hdf5.write_bytes(b"not an HDF5 file")
    with pytest.raises(FeatureFileError, match="not a readable HDF5"):
        read_feature_file(not_hdf5)
    mismatched = tmp_path / "b.h5"
    with h5py.File(mismatched, "w") as h5:
        h5.create_dataset("features", data=np.zeros((3, 4), np.float32))
        h5.create_dataset("coords", data=np.zeros((2, 2), np.int64))
    with pytest.raises(FeatureFileError, match="3 feature rows"):
        read_feature_file(mismatched)
    assert not is_current(not_hdf5, IDENTITY, XMAG_5X)
