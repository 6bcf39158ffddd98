"""Feature files: one HDF5 file per slide in TRIDENT's layout, our provenance in extra attributes.

What we write, as TRIDENT writes its patch features, so that TRIDENT's and
CLAM's MIL code read our files unchanged:

    features   (N, D) float32   attributes: name, savetodir, encoder
    coords     (N, 2) int64     top-left (x, y) in level-0 pixels; attributes: patch_size,
                                patch_size_level0, level0_magnification, target_magnification,
                                overlap, name, savetodir, level0_width, level0_height

Our additions are attributes of the file (root), all prefixed `xmag_`: the
true `xmag_level0_mpp` and `xmag_target_mpp` (TRIDENT rounds magnifications,
so a 0.263 µm/px scan would read as exactly 40x), the resize filter, the
encoder's name, sha256 and runtime, the tiling spec as JSON and the code version. A
slide without tissue gives (0, D) and (0, 2) with every attribute written.

A file is written under a temporary name in the same directory and renamed
when complete, so a file under its final name is never half-written.

`read_feature_file` reads ours, TRIDENT's (the same datasets, its attributes
only) and CLAM's (`h5_files/*.h5`: int32 coords, no attributes; the tiling is
then whatever the caller says it was) into one `SlideFeatures`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from xmag import __version__
from xmag.errors import XmagError
from xmag.pipeline import SlideEmbeddings
from xmag.result_schema import ModelInfo
from xmag.slide.tiling import RESIZE_FILTER, TilingSpec

FEATURES = "features"
COORDS = "coords"
Layout = Literal["xmag", "trident", "clam"]


class FeatureFileError(XmagError):
    """A feature file cannot be read: not HDF5, truncated, or without `features` and `coords` of matching length."""

    code = "feature_file_error"


@dataclass(frozen=True)
class EncoderIdentity:
    """Which encoder made a file's embeddings: its name, the sha256 of its weights, and the runtime that ran it
    (an int8 graph's embeddings are not an fp32 graph's, so a rerun on another runtime redoes the file)."""

    name: str
    sha256: str
    runtime: str  # e.g. "onnxruntime int8 (CPUExecutionProvider)"

    @classmethod
    def of_model(cls, info: ModelInfo) -> EncoderIdentity:
        """The identity of a loaded model's encoder: `encoder_weights_sha256` of its weights, and its runtime."""
        if not info.encoder_sha256:
            raise ValueError(
                f"the model {info.name} does not record its encoder's weights sha256 (a repository exported before "
                "that was recorded): export it again with xmag export"
            )
        return cls(info.name, info.encoder_sha256, info.encoder)


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's tile embeddings and where the tiles are, from any of the three layouts."""

    slide_id: str
    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64, top-left (x, y) in level-0 pixels
    patch_size_level0: int | None  # tile side in level-0 pixels; None where the file does not say
    layout: Layout
    level0_mpp: float | None = None  # ours only
    target_mpp: float | None = None  # ours only
    encoder: str | None = None
    encoder_sha256: str | None = None  # ours only
    encoder_runtime: str | None = None  # ours only
    tiling: dict | None = None  # ours only: the TilingSpec's fields


def tiling_record(spec: TilingSpec) -> dict:
    """The tiling as recorded in a file, and as compared when a rerun decides whether a file is current."""
    return {
        "target_mpp": spec.target_mpp,
        "tile_size_px": spec.tile_size_px,
        "encoder_input_px": spec.output_px,
        "min_tissue_fraction": spec.min_tissue_fraction,
        "resize_filter": RESIZE_FILTER,
    }


def write_feature_file(path: Path, embedded: SlideEmbeddings, encoder: EncoderIdentity) -> Path:
    """Write one slide's embeddings in TRIDENT's layout plus our attributes; atomically (temporary name, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    facts, spec = embedded.facts, embedded.spec
    slide_id = path.stem
    descriptor, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(descriptor)
    try:
        with h5py.File(partial, "w") as out:
            features = out.create_dataset(FEATURES, data=np.asarray(embedded.embeddings, dtype=np.float32))
            features.attrs.update({"name": slide_id, "savetodir": str(path.parent), "encoder": encoder.name})
            coords = out.create_dataset(COORDS, data=np.asarray(embedded.level0_coords, dtype=np.int64).reshape(-1, 2))
            coords.attrs.update(
                {
                    "patch_size": spec.tile_size_px,
                    "patch_size_level0": embedded.tile_size_level0_px,
                    "level0_magnification": int(round(10.0 / facts.mpp)),
                    "target_magnification": int(round(10.0 / spec.target_mpp)),
                    "overlap": 0,
                    "name": slide_id,
                    "savetodir": str(path.parent),
                    "level0_width": facts.width_px,
                    "level0_height": facts.height_px,
                }
            )
            out.attrs.update(
                {
                    "xmag_level0_mpp": facts.mpp,
                    "xmag_target_mpp": spec.target_mpp,
                    "xmag_resize_filter": RESIZE_FILTER,
                    "xmag_encoder": encoder.name,
                    "xmag_encoder_sha256": encoder.sha256,
                    "xmag_encoder_runtime": encoder.runtime,
                    "xmag_tiling": json.dumps(tiling_record(spec), sort_keys=True),
                    "xmag_code_version": __version__,
                    "xmag_tile_count": len(embedded.embeddings),
                }
            )
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return path


def read_feature_file(path: Path, patch_size_level0: int | None = None) -> SlideFeatures:
    """Read a feature file of our layout, TRIDENT's or CLAM's; `patch_size_level0` fills in what CLAM's omit.

    Raises FeatureFileError for a file that is not HDF5, is truncated, or lacks
    `features` and `coords` of the same length.
    """
    try:
        with h5py.File(path, "r") as source:
            if FEATURES not in source or COORDS not in source:
                raise FeatureFileError(f"{path} has no '{FEATURES}' and '{COORDS}' datasets; it holds {sorted(source)}")
            features = np.asarray(source[FEATURES][()], dtype=np.float32)
            coords = np.asarray(source[COORDS][()]).astype(np.int64, copy=False)
            coords_attrs = dict(source[COORDS].attrs)
            features_attrs = dict(source[FEATURES].attrs)
            ours = dict(source.attrs)
    except OSError as error:
        raise FeatureFileError(f"{path} is not a readable HDF5 feature file: {error}") from error
    features = features.reshape(len(features), -1) if features.ndim != 2 else features
    coords = coords.reshape(-1, 2) if coords.size == 0 else coords
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(features):
        raise FeatureFileError(f"{path}: {len(features)} feature rows but coords of shape {coords.shape}")
    layout: Layout = (
        "xmag" if "xmag_encoder_sha256" in ours else ("trident" if "patch_size_level0" in coords_attrs else "clam")
    )
    stated = coords_attrs.get("patch_size_level0")
    encoder = features_attrs.get("encoder")
    return SlideFeatures(
        slide_id=path.stem,
        features=features,
        coords=coords,
        patch_size_level0=int(stated) if stated is not None else patch_size_level0,
        layout=layout,
        level0_mpp=_float_or_none(ours.get("xmag_level0_mpp")),
        target_mpp=_float_or_none(ours.get("xmag_target_mpp")),
        encoder=str(encoder) if encoder is not None else None,
        encoder_sha256=str(ours["xmag_encoder_sha256"]) if "xmag_encoder_sha256" in ours else None,
        encoder_runtime=str(ours["xmag_encoder_runtime"]) if "xmag_encoder_runtime" in ours else None,
        tiling=json.loads(ours["xmag_tiling"]) if "xmag_tiling" in ours else None,
    )


def is_current(path: Path, encoder: EncoderIdentity, spec: TilingSpec) -> bool:
    """True when `path` is a complete feature file of ours made by this encoder, on this runtime, with this tiling."""
    if not path.is_file():
        return False
    try:
        found = read_feature_file(path)
    except FeatureFileError:
        return False
    made_by = (found.encoder_sha256, found.encoder_runtime, found.tiling)
    return made_by == (encoder.sha256, encoder.runtime, tiling_record(spec))


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)
