"""Every user-caused failure gives its own typed error with a message a user can act on."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_cucim
from PIL import Image
from typer.testing import CliRunner

from xmag.cli import app
from xmag.errors import (
    CorruptSlideError,
    MissingResolutionError,
    NotASlideError,
    NoTissueError,
    SlideNotFoundError,
    SlideReaderUnavailableError,
)
from xmag.models.abmil import SlideHeads
from xmag.models.encoder import build_tile_encoder
from xmag.pipeline import classify_slide
from xmag.runtimes.torch_backend import TorchSlideHeads, TorchTileEncoder
from xmag.slide import reader as reader_module
from xmag.slide.reader import open_slide, resolve_mpp
from xmag.slide.tiling import XMAG_5X, iter_tile_batches, plan_tile_grid
from xmag.slide.tissue import tissue_mask_for_slide
from xmag.synthetic.slide import make_synthetic_slide


@pytest.fixture(scope="module")
def tiny_models():
    encoder = build_tile_encoder("tiny_dinov2", seed=0)
    heads = SlideHeads.from_class_names({"task": ["a", "b"]}, in_dim=encoder.embed_dim).eval()
    return TorchTileEncoder(encoder), TorchSlideHeads(heads)


def _read_every_tile(path, backend):
    with open_slide(path, backend=backend) as reader:
        mpp = resolve_mpp(reader.info)
        tissue, _ = tissue_mask_for_slide(reader, mpp)
        grid = plan_tile_grid(reader.info, mpp, tissue, XMAG_5X)
        for _ in iter_tile_batches(reader, grid, batch_size=8):
            pass
        # Also the finest level everywhere, where a truncation of level 0 shows.
        info = reader.info
        for x in range(0, info.width_px - 512, 512):
            for y in range(0, info.height_px - 512, 512):
                reader.read_region((x, y), 0, (512, 512))


def test_missing_path(tmp_path, backend):
    with pytest.raises(SlideNotFoundError, match="No file at"):
        open_slide(tmp_path / "nowhere.svs", backend=backend)


def test_directory_is_not_a_slide_file(tmp_path, backend):
    with pytest.raises(SlideNotFoundError, match="not a regular file"):
        open_slide(tmp_path, backend=backend)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (b"patient notes, not an image\n" * 100, "not"),
    ],
    ids=["empty", "text"],
)
def test_not_a_slide(tmp_path, backend, content, match):
    path = tmp_path / "slide.svs"
    path.write_bytes(content)
    with pytest.raises(NotASlideError, match=match):
        open_slide(path, backend=backend)


def test_tiff_header_with_garbage_behind_it_is_corrupt(tmp_path, backend):
    path = tmp_path / "slide.svs"
    path.write_bytes(b"II*\x00" + b"\xff" * 4096)
    with pytest.raises(CorruptSlideError, match="damaged TIFF"):
        open_slide(path, backend=backend)


def test_plain_png_is_not_a_slide(tmp_path, backend):
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(path)
    with pytest.raises(NotASlideError):
        open_slide(path, backend=backend)


@pytest.mark.parametrize("kept_fraction", [0.35, 0.9])
def test_truncated_slide_is_corrupt(tmp_path, slide_20x, backend, kept_fraction):
    data = slide_20x.path.read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: int(len(data) * kept_fraction)])
    with pytest.raises(CorruptSlideError, match=r"damaged|truncated"):
        _read_every_tile(path, backend)


def damage_tiles(source, destination, page_index, first_tile=0, keep_bytes=0) -> None:
    """Copy a slide and zero the compressed data of a page's tiles from `first_tile` on,
    all but their first `keep_bytes` bytes; the TIFF structure stays intact."""
    import tifffile

    data = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tiff:
        page = tiff.pages[page_index]
        for index in range(first_tile, len(page.dataoffsets)):
            offset, count = page.dataoffsets[index] + keep_bytes, page.databytecounts[index] - keep_bytes
            data[offset : offset + count] = bytes(count)
    destination.write_bytes(bytes(data))


def test_zeroed_tiles_are_refused_at_open(tmp_path, slide_20x, backend):
    """What an interrupted copy leaves: a file of the right length with zeroed blocks."""
    damaged = tmp_path / "zeroed.svs"
    damage_tiles(slide_20x.path, damaged, page_index=2, first_tile=30)
    with pytest.raises(CorruptSlideError, match="tile 30 of directory 2 is not JPEG data"):
        open_slide(damaged, backend=backend)


def test_undecodable_tile_data_is_corrupt_when_read(tmp_path, slide_20x):
    damaged = tmp_path / "damaged.svs"
    # Page 2 is pyramid level 1 (page 1 is the thumbnail): the level the 5x tiles come from.
    # The JPEG start marker survives, so the file passes the open-time check and fails at decoding.
    damage_tiles(slide_20x.path, damaged, page_index=2, keep_bytes=2)
    with open_slide(damaged) as reader:
        assert reader.info.level_count == 3
        with pytest.raises(CorruptSlideError, match="damaged"):
            reader.read_region((0, 0), 1, (256, 256))


def test_cucim_black_regions_are_checked_through_openslide(tmp_path, slide_20x):
    """cuCIM leaves undecodable tiles unwritten (often black) without raising; black regions are re-read.

    Whether cuCIM's buffer comes back black or stale varies from run to run, so
    this drives the check with a black region directly, on real files.
    """
    require_cucim()
    black = np.zeros((256, 256, 3), np.uint8)
    damaged = tmp_path / "damaged.svs"
    damage_tiles(slide_20x.path, damaged, page_index=2, keep_bytes=2)
    with open_slide(damaged, backend="cucim") as reader:
        with pytest.raises(CorruptSlideError, match="damaged"):
            reader._verified(black, (0, 0), 1)
    with open_slide(slide_20x.path, backend="cucim") as reader:
        real = reader._verified(black, (0, 0), 1)  # healthy data: OpenSlide's pixels replace the black
        np.testing.assert_array_equal(real, reader.read_region((0, 0), 1, (256, 256)))
        assert real.min(axis=2).max() > 0


def test_slide_without_resolution(tmp_path, tiny_models, backend):
    slide = make_synthetic_slide(
        tmp_path / "no_resolution.svs", width_px=4_000, height_px=3_000, write_mpp=False, write_objective_power=False
    )
    with open_slide(slide.path, backend=backend) as reader:
        assert reader.info.mpp is None and reader.info.objective_power is None
        with pytest.raises(MissingResolutionError, match="--mpp"):
            resolve_mpp(reader.info)
        assert resolve_mpp(reader.info, fallback_mpp=0.5) == 0.5
        with pytest.raises(ValueError):
            resolve_mpp(reader.info, fallback_mpp=-1.0)
    encoder, heads = tiny_models
    with pytest.raises(MissingResolutionError):
        classify_slide(str(slide.path), encoder, heads, backend=backend)


def test_objective_power_alone_gives_the_resolution(tmp_path, backend):
    slide = make_synthetic_slide(tmp_path / "power_only.svs", width_px=4_000, height_px=3_000, write_mpp=False)
    with open_slide(slide.path, backend=backend) as reader:
        assert reader.info.mpp is None
        assert resolve_mpp(reader.info) == pytest.approx(0.5)


def test_blank_slide_has_no_tissue(tmp_path, tiny_models, backend):
    slide = make_synthetic_slide(tmp_path / "blank.svs", width_px=6_000, height_px=4_000, tissue="none")
    encoder, heads = tiny_models
    with pytest.raises(NoTissueError, match="No tissue found"):
        classify_slide(str(slide.path), encoder, heads, backend=backend)


def test_cucim_requested_but_missing(monkeypatch, slide_20x):
    monkeypatch.setattr(reader_module, "cucim_available", lambda: False)
    with pytest.raises(SlideReaderUnavailableError, match="cuCIM is not installed"):
        open_slide(slide_20x.path, backend="cucim")


def test_unknown_backend(slide_20x):
    with pytest.raises(ValueError, match="Unknown slide backend"):
        open_slide(slide_20x.path, backend="bioformats")


@pytest.mark.parametrize("command", ["info", "tiles"])
def test_cli_reports_errors_with_exit_status_2(tmp_path, command):
    not_a_slide = tmp_path / "notes.svs"
    not_a_slide.write_text("not a slide")
    result = CliRunner().invoke(app, [command, str(not_a_slide)])
    assert result.exit_code == 2
    assert "error:" in result.output and "not" in result.output
    assert "Traceback" not in result.output
