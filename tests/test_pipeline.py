"""The in-process pipeline and the `xmag` command, end to end on generated slides."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_errors import damage_tiles
from typer.testing import CliRunner

from xmag.cli import app
from xmag.errors import CorruptSlideError, TooManyTilesError
from xmag.heatmap import render_attention_heatmap
from xmag.model_repo import sha256_of
from xmag.models.abmil import SlideHeads
from xmag.models.checkpoints.xmag_format import save_encoder_checkpoint
from xmag.models.encoder import build_tile_encoder
from xmag.pipeline import classify_slide
from xmag.result_schema import ClassifyResult
from xmag.runtimes.torch_backend import TorchSlideHeads, TorchTileEncoder
from xmag.slide.reader import open_slide
from xmag.slide.tiling import XMAG_5X, TilingSpec, iter_tile_batches, plan_tile_grid


@pytest.fixture(scope="module")
def tiny_models():
    encoder = build_tile_encoder("tiny_dinov2", seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        heads = SlideHeads.from_class_names(
            {"tumour": ["benign", "malignant"], "grade": ["1", "2", "3"]}, in_dim=encoder.embed_dim
        ).eval()
    return TorchTileEncoder(encoder), TorchSlideHeads(heads)


def test_one_encode_feeds_every_head(slide_20x, tiny_models, backend):
    encoder, heads = tiny_models
    seen = []
    result = classify_slide(str(slide_20x.path), encoder, heads, backend=backend, batch_size=5, on_event=seen.append)
    tile_count = result.facts.tile_count
    assert tile_count == len(result.level0_coords) == len(result.embeddings) > 0
    assert set(result.predictions) == {"tumour", "grade"}
    for prediction in result.predictions.values():
        assert prediction.attention.shape == (tile_count,)
        assert prediction.attention.sum() == pytest.approx(1.0, abs=1e-5)
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert prediction.label == max(prediction.probabilities, key=prediction.probabilities.get)
    stages = [event.stage for event in seen]
    assert stages[:2] == ["opened", "planned"] and stages[-1] == "heads_done"
    encoded = [event.tiles_done for event in seen if event.stage == "encoded"]
    assert encoded == sorted(encoded) and encoded[-1] == tile_count and len(encoded) == -(-tile_count // 5)
    assert all(event.tiles_total == tile_count for event in seen[1:])
    assert set(result.timings_s) == {"open", "tissue", "read", "encode", "heads"}
    assert result.facts.mpp == pytest.approx(0.5) and result.facts.base_magnification == pytest.approx(20)
    assert result.facts.reader_backend == backend and result.facts.read_level == 1

    # The overlapped reader did not reorder or drop tiles: encoding the grid directly gives the same embeddings.
    with open_slide(slide_20x.path, backend="openslide") as reader:
        grid = plan_tile_grid(reader.info, 0.5, result.tissue, XMAG_5X)
        direct = np.concatenate([encoder.encode(tiles) for tiles, _ in iter_tile_batches(reader, grid, 16)])
    np.testing.assert_allclose(result.embeddings, direct, atol=1e-4)
    expected = heads.predict(direct)
    for task in heads.class_names:
        np.testing.assert_allclose(result.predictions[task].attention, expected[task].attention, atol=1e-5)


def test_a_reader_error_midway_surfaces_and_stops(tmp_path, slide_20x, tiny_models):
    damaged = tmp_path / "damaged.svs"
    damage_tiles(slide_20x.path, damaged, page_index=2, first_tile=40, keep_bytes=2)  # lower half of level 1
    encoder, heads = tiny_models
    with pytest.raises(CorruptSlideError):
        classify_slide(str(damaged), encoder, heads, batch_size=4)


def test_cancelling_through_an_event_stops_the_reader(slide_20x, tiny_models):
    class Cancelled(Exception):
        pass

    def cancel_after_first_batch(event):
        if event.stage == "encoded":
            raise Cancelled

    encoder, heads = tiny_models
    try:
        classify_slide(str(slide_20x.path), encoder, heads, batch_size=4, on_event=cancel_after_first_batch)
    except Cancelled:
        # Checked while the exception (and the pipeline's frames) are still alive:
        # the reader thread must be gone already, not merely collected later.
        still_reading = [thread for thread in threading.enumerate() if thread.name == "xmag-tile-reader"]
    else:
        pytest.fail("the pipeline did not stop when the event callback raised")
    assert not still_reading


def test_a_slide_over_the_tile_cap_is_refused_before_reading(slide_20x, tiny_models):
    encoder, heads = tiny_models
    seen = []
    with pytest.raises(TooManyTilesError, match="more than this service's cap of 10 tiles") as raised:
        classify_slide(str(slide_20x.path), encoder, heads, max_tiles=10, on_event=seen.append)
    assert raised.value.max_tiles == 10 and raised.value.tile_count > 10
    assert [event.stage for event in seen] == ["opened"]


def test_tiling_must_match_the_encoder(slide_20x, tiny_models):
    encoder, heads = tiny_models
    with pytest.raises(ValueError, match="256 px tiles but the encoder takes 224 px"):
        classify_slide(str(slide_20x.path), encoder, heads, spec=TilingSpec(target_mpp=0.5, tile_size_px=256))


def test_heatmap_is_brightest_at_the_highest_attention(slide_20x, tiny_models):
    encoder, heads = tiny_models
    result = classify_slide(str(slide_20x.path), encoder, heads, backend="openslide")
    attention = result.predictions["tumour"].attention
    scale = result.tissue.level0_px_per_mask_px
    image = np.asarray(
        render_attention_heatmap(result.thumbnail, scale, result.level0_coords, result.tile_size_level0_px, attention)
    )
    assert image.shape == result.thumbnail.shape

    def tile_brightness(index):
        x, y = (result.level0_coords[index] / scale).astype(int)
        side = int(result.tile_size_level0_px / scale)
        return image[y : y + side, x : x + side].astype(float).mean()

    assert tile_brightness(int(attention.argmax())) > tile_brightness(int(attention.argmin()))


def test_cli_classify_with_an_xmag_checkpoint(tmp_path, slide_20x):
    encoder = build_tile_encoder("tiny_dinov2", seed=3)
    checkpoint = tmp_path / "tiny.safetensors"
    save_encoder_checkpoint(encoder.vit, checkpoint)
    result = CliRunner().invoke(
        app, ["classify", str(slide_20x.path), "--weights", str(checkpoint), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "UNTRAINED DEMO HEADS" in result.output
    # The result file is the one slide result schema that REST answers and the service's result files use.
    saved = ClassifyResult.model_validate_json((tmp_path / "out" / "glass_20x.result.json").read_text())
    assert saved.model.kind == "checkpoint" and saved.model.weights_sha256 == sha256_of(checkpoint)
    assert saved.attention is not None and len(saved.attention.level0_coords) == saved.slide.tile_count
    heatmap = Image.open(tmp_path / "out" / "glass_20x.lesion.heatmap.png")
    assert heatmap.size[0] > 100
    assert saved.heatmaps is not None
    geojson = json.loads(Path(saved.heatmaps["lesion"].geojson_url.removeprefix("file://")).read_text())
    assert len(geojson["features"]) == saved.slide.tile_count
