"""`xmag train probe`: a linear probe on real synthetic slides finds the planted lesions, and only from real labels.

Four synthetic 10x slides (1 µm/px): the student's 5x tile (224 px at 2 µm/px)
covers 448 level-0 px there. Tiles on a 224 px stride are labelled from the
ground-truth lesion mask: "lesion" when at least 3/4 of the tile is lesion,
"normal" when none of it is and it is mostly tissue. The encoder is a tiny
random-weight DINOv2, which still tells the lesion texture from normal tissue.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from xmag.cli import app
from xmag.loading import load_checkpoint_model
from xmag.models.checkpoints.xmag_format import save_encoder_checkpoint
from xmag.models.encoder import build_tile_encoder
from xmag.slide.reader import open_slide, resolve_mpp
from xmag.slide.tiling import iter_tile_batches, plan_tile_grid, tile_grid_at
from xmag.slide.tissue import DEFAULT_THUMBNAIL_UM_PER_PX, tissue_mask_for_slide
from xmag.synthetic.slide import make_synthetic_slide
from xmag.training.probe import (
    ProbePart,
    ProbeTile,
    class_names_of,
    embed_probe_tiles,
    fit_linear_probe,
    probe_parts,
    read_image_folder,
    read_probe_csv,
    spider_context_corners,
    split_probe_tiles,
)

SLIDE_SEEDS = (1, 3, 4, 5)  # seeds whose three lesions leave enough lesion and normal tiles
SPLIT_OF_SLIDE = ("train", "train", "val", "test")
SLIDE_WIDTH_PX, SLIDE_HEIGHT_PX = 6_000, 4_500
TILE_SIZE_LEVEL0_PX = 448  # 224 px at 2 µm/px on a 1 µm/px slide
STRIDE_PX = 224
NORMAL_TILES_PER_SLIDE = 20
PATCH_SIZE_LEVEL0_PX = 112  # a 224 px patch at 20x (0.5 µm/px) on a 1 µm/px slide
FAST_C_VALUES = "0.001,0.01,0.1,1"


def _mask_fractions(mask: np.ndarray, level0_px_per_mask_px: float, level0_xy: np.ndarray, size_px: int) -> np.ndarray:
    """The fraction of each level-0 box (top-left corners, side size_px) that the mask covers."""
    side = max(1, int(round(size_px / level0_px_per_mask_px)))
    corners = np.rint(np.asarray(level0_xy) / level0_px_per_mask_px).astype(int)
    return np.array([mask[top : top + side, left : left + side].mean() for left, top in corners])


def _labelled_tiles(slide, rng) -> list[tuple[int, int, str]]:
    level0_px_per_mask_px = slide.mask_um_per_px / slide.mpp
    xs = np.arange(0, slide.width_px - TILE_SIZE_LEVEL0_PX + 1, STRIDE_PX)
    ys = np.arange(0, slide.height_px - TILE_SIZE_LEVEL0_PX + 1, STRIDE_PX)
    level0_xy = np.array([(x, y) for y in ys for x in xs])
    lesion = _mask_fractions(slide.read_lesion_mask(), level0_px_per_mask_px, level0_xy, TILE_SIZE_LEVEL0_PX)
    tissue = _mask_fractions(slide.read_tissue_mask(), level0_px_per_mask_px, level0_xy, TILE_SIZE_LEVEL0_PX)
    lesion_rows = np.flatnonzero(lesion >= 0.75)
    normal_rows = np.flatnonzero((lesion == 0) & (tissue >= 0.8))
    normal_rows = rng.choice(normal_rows, size=min(NORMAL_TILES_PER_SLIDE, len(normal_rows)), replace=False)
    return [(*map(int, level0_xy[row]), "lesion") for row in lesion_rows] + [
        (*map(int, level0_xy[row]), "normal") for row in sorted(normal_rows)
    ]


def _write_csv(path, header, rows) -> None:
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(header)
        out.writerows(rows)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe_slides")
    return [
        make_synthetic_slide(
            folder / f"case-{seed:02d}.svs",
            width_px=SLIDE_WIDTH_PX,
            height_px=SLIDE_HEIGHT_PX,
            base_magnification=10,
            seed=seed,
            n_lesions=3,
        )
        for seed in SLIDE_SEEDS
    ]


@pytest.fixture(scope="module")
def tile_rows(slides):
    """(slide id, x, y, label, split) of every labelled tile: two slides train, one val, one test.

    In a seeded random order, so that tiles paired with the wrong rows' embeddings would not keep a consistent
    label-embedding association.
    """
    rng = np.random.default_rng(0)
    rows = []
    for slide, split in zip(slides, SPLIT_OF_SLIDE, strict=True):
        rows += [(slide.path.stem, x, y, label, split) for x, y, label in _labelled_tiles(slide, rng)]
    return [rows[index] for index in rng.permutation(len(rows))]


@pytest.fixture(scope="module")
def tile_csv(tile_rows, slides):
    path = slides[0].path.parent / "tiles.csv"
    _write_csv(path, ["slide", "x", "y", "label", "split"], tile_rows)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe_ckpt") / "tiny.safetensors"
    save_encoder_checkpoint(build_tile_encoder("tiny_dinov2", seed=0).vit, path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_checkpoint_model(checkpoint)


@pytest.fixture(scope="module")
def embedded(tile_csv, slides, model):
    tiles = read_probe_csv(tile_csv, slides[0].path.parent)
    started = time.perf_counter()
    result = embed_probe_tiles(tiles, model.encoder, model.spec)
    print(f"embedded {len(tiles)} tiles in {time.perf_counter() - started:.1f} s")
    return tiles, result


def _xmag(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xmag.cli", "train", "probe", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
    )


# -- The tiler ---------------------------------------------------------------------------------------------------


def test_tile_grid_at_reads_as_a_planned_grid(slides, model):
    with open_slide(slides[0].path) as reader:
        tissue, _ = tissue_mask_for_slide(reader, slides[0].mpp, DEFAULT_THUMBNAIL_UM_PER_PX)
        planned = plan_tile_grid(reader.info, slides[0].mpp, tissue, model.spec)
        given = tile_grid_at(reader.info, slides[0].mpp, planned.level0_coords, model.spec)
        np.testing.assert_array_equal(given.level0_coords, planned.level0_coords)
        assert (given.read_level, given.read_size_px, given.tile_size_level0_px, given.grid_shape) == (
            planned.read_level,
            planned.read_size_px,
            planned.tile_size_level0_px,
            planned.grid_shape,
        )
        assert given.tile_size_level0_px == TILE_SIZE_LEVEL0_PX
        first_given = next(iter_tile_batches(reader, given, 4))[0]
        first_planned = next(iter_tile_batches(reader, planned, 4))[0]
    np.testing.assert_array_equal(first_given, first_planned)


# -- The probe ---------------------------------------------------------------------------------------------------


def test_each_embedding_is_its_own_tiles(embedded, model):
    tiles, result = embedded
    for row in (0, len(tiles) // 2, len(tiles) - 1):
        with open_slide(tiles[row].source) as reader:
            grid = tile_grid_at(reader.info, resolve_mpp(reader.info), np.array([tiles[row].level0_xy]), model.spec)
            pixels = next(iter_tile_batches(reader, grid, 1))[0]
        np.testing.assert_allclose(result.embeddings[row], model.encoder.encode(pixels)[0], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(result.read_level0_xy[row], tiles[row].level0_xy)


def test_the_probe_finds_the_lesions(embedded):
    tiles, result = embedded
    class_names = class_names_of(tiles)
    parts = split_probe_tiles(tiles, class_names)
    assert {part: {tiles[row].group for row in rows} for part, rows in parts.items()}["test"] == {
        tile.source for tile in tiles if tile.split == "test"
    }
    by_part = probe_parts(result, tiles, class_names, parts)
    probe = fit_linear_probe(by_part["train"], by_part["val"], by_part["test"], class_names)
    print(f"probe: C {probe.chosen_c:.3g}, test {probe.test_metrics}, test tiles {len(parts['test'])}")
    # Random-weight embeddings separate the synthetic lesion texture almost perfectly (1.0 here); a probe fit on
    # misaligned labels or tiles read elsewhere falls to chance, far below these bounds.
    assert probe.test_metrics["auc"] >= 0.9
    assert probe.test_metrics["balanced_accuracy"] >= 0.8
    assert len(probe.validation_curve) == 45 and probe.chosen_c in probe.c_grid
    assert probe.test_probabilities.shape == (len(parts["test"]), 2)


def test_shuffled_labels_stay_near_chance(embedded):
    tiles, result = embedded
    class_names = class_names_of(tiles)
    parts = split_probe_tiles(tiles, class_names)
    labels = np.array([class_names.index(tile.label) for tile in tiles])
    coarse_c_grid = (1e-4, 1e-2, 1.0, 1e2)  # so that twenty probes stay quick; the grid does not matter under the null
    aucs = []
    for seed in range(20):
        shuffled = np.random.default_rng(seed).permutation(labels)
        train, val, test = (
            ProbePart(result.embeddings[parts[p]], shuffled[parts[p]]) for p in ("train", "val", "test")
        )
        aucs.append(fit_linear_probe(train, val, test, class_names, c_grid=coarse_c_grid).test_metrics["auc"])
    print(f"shuffled-label control: test AUROC mean {np.mean(aucs):.3f}, range {min(aucs):.3f}..{max(aucs):.3f}")
    # Labels permuted over all tiles are independent of the embeddings, so each test AUROC follows the null: mean
    # 0.5; its sd, measured over 30 permutations, is 0.11 (overlapping neighbours make it wider than the
    # Mann-Whitney 0.1 for 35 independent tiles). The mean of twenty has sd 0.025: 0.1 is four of those.
    # A real probe scores 1.0 here.
    assert abs(np.mean(aucs) - 0.5) <= 0.1
    assert max(aucs) < 0.85


def test_the_command_end_to_end(tile_rows, slides, checkpoint, tmp_path):
    # Every second tile (the SPIDER test below takes the others), slides named by id and found under --slide-dir.
    csv_path = tmp_path / "tiles.csv"
    _write_csv(csv_path, ["slide", "x", "y", "label", "split"], tile_rows[1::2])
    out = tmp_path / "probe"
    completed = _xmag(
        str(csv_path), "--slide-dir", str(slides[0].path.parent), "--weights", str(checkpoint), "--out", str(out)
    )
    assert completed.returncode == 0, completed.stderr
    print(completed.stdout)
    assert "| test |" in completed.stdout and "auc" in completed.stdout
    record = json.loads((out / "probe.json").read_text())
    assert record["class_names"] == ["lesion", "normal"]
    assert record["config"]["split"] == "given"
    assert record["encoder"]["sha256"] and record["encoder"]["runtime"].startswith("torch")
    assert record["tiling"]["target_mpp"] == 2.0 and record["tiling"]["tile_size_px"] == 224
    assert record["counts"]["test"]["slides"] == 1 and record["chosen_c"] in record["config"]["c_grid"]
    assert record["test_metrics"]["auc"] >= 0.9
    with (out / "predictions.csv").open() as handle:
        predictions = list(csv.DictReader(handle))
    assert len(predictions) == record["counts"]["test"]["tiles"]
    assert {row["label"] for row in predictions} == {"lesion", "normal"}
    assert all(abs(float(row["p_lesion"]) + float(row["p_normal"]) - 1) < 1e-5 for row in predictions)
    assert all(row["x"] == row["read_x"] and row["y"] == row["read_y"] for row in predictions)
    assert "| metric | validation | test |" in (out / "probe.md").read_text()


# -- SPIDER: the 5x context of 20x patches ---------------------------------------------------------------------


def test_spider_context_corners_centre_the_tile_and_stay_inside():
    slide_size_px = (SLIDE_WIDTH_PX, SLIDE_HEIGHT_PX)
    patches = np.array([[1000, 2000], [10, 20], [5_950, 4_440], [1001, 3000], [0, 4_388]])
    sizes = np.array([112, 112, 50, 113, 112])
    corners = spider_context_corners(patches, sizes, TILE_SIZE_LEVEL0_PX, slide_size_px)
    expected = [
        [1000 + 56 - 224, 2000 + 56 - 224],  # centred: (centre - half the tile)
        [0, 0],  # would start at (-158, -148): moved inside, touching the top-left corner
        [6000 - 448, 4500 - 448],  # would reach past the right and bottom edges
        [834, 2833],  # centre (1057.5, 3056.5) minus 224 rounds half up: 833.5 -> 834, 2832.5 -> 2833
        [0, 4500 - 448],
    ]
    np.testing.assert_array_equal(corners, expected)
    # Inside the slide, and the patch still inside its context tile.
    assert (corners >= 0).all() and (corners + TILE_SIZE_LEVEL0_PX <= np.array(slide_size_px)).all()
    assert (patches >= corners).all() and (patches + sizes[:, None] <= corners + TILE_SIZE_LEVEL0_PX).all()


def test_spider_reads_the_centred_tile(slides, model, tmp_path):
    slide = slides[0]
    patches = [(2000, 2000), (30, 40), (SLIDE_WIDTH_PX - PATCH_SIZE_LEVEL0_PX, 2500)]
    spider = [ProbeTile(str(slide.path), str(slide.path), "a", "train", xy, PATCH_SIZE_LEVEL0_PX) for xy in patches]
    context = embed_probe_tiles(spider, model.encoder, model.spec, spider_context=True)
    expected_xy = [(2000 + 56 - 224, 2000 + 56 - 224), (0, 0), (SLIDE_WIDTH_PX - 448, 2500 + 56 - 224)]
    np.testing.assert_array_equal(context.read_level0_xy, expected_xy)
    # The same pixels as plain tiles at those corners: the same embeddings.
    plain = [ProbeTile(str(slide.path), str(slide.path), "a", "train", xy) for xy in expected_xy]
    np.testing.assert_allclose(
        context.embeddings, embed_probe_tiles(plain, model.encoder, model.spec).embeddings, rtol=0, atol=1e-5
    )


def test_spider_end_to_end(tile_rows, slides, checkpoint, tmp_path):
    # A 20x patch at the centre of every second labelled tile: its 5x context is that tile. (In-process: the
    # subprocess of the test above already covers the console script.)
    offset = TILE_SIZE_LEVEL0_PX // 2 - PATCH_SIZE_LEVEL0_PX // 2
    rows = [
        (str(slides[0].path.parent / f"{s}.svs"), x + offset, y + offset, label, split)
        for s, x, y, label, split in tile_rows[::2]
    ]
    csv_path = tmp_path / "patches.csv"
    _write_csv(csv_path, ["slide", "x", "y", "label", "split"], rows)
    out = tmp_path / "spider"
    arguments = ["--patch-size-level0", str(PATCH_SIZE_LEVEL0_PX), "--weights", str(checkpoint), "--out", str(out)]
    result = CliRunner().invoke(
        app, ["train", "probe", str(csv_path), "--spider-context", *arguments, "--c-values", FAST_C_VALUES]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "probe.json").read_text())
    print(f"SPIDER probe: test {record['test_metrics']}")
    assert record["config"]["spider_context"] is True and record["config"]["c_grid"] == [0.001, 0.01, 0.1, 1.0]
    assert record["test_metrics"]["auc"] >= 0.9
    with (out / "predictions.csv").open() as handle:
        predictions = list(csv.DictReader(handle))
    assert all(int(row["read_x"]) == int(row["x"]) - offset for row in predictions)


# -- Splits and image folders ------------------------------------------------------------------------------------


def test_the_automatic_split_keeps_slides_whole_and_is_seeded():
    tiles = [
        ProbeTile(f"slide-{slide}", f"slide-{slide}", label, None, (index, 0))
        for slide in range(10)
        for index, label in enumerate(["a"] * 6 + ["b"] * (2 + slide % 3))
    ]
    parts = split_probe_tiles(tiles, ["a", "b"], seed=3)
    groups = {part: {tiles[row].group for row in rows} for part, rows in parts.items()}
    assert [len(groups[part]) for part in ("train", "val", "test")] == [6, 2, 2]  # 60/20/20 of the slides
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(len(tiles)))
    again = split_probe_tiles(tiles, ["a", "b"], seed=3)
    assert all((parts[part] == again[part]).all() for part in parts)
    other = split_probe_tiles(tiles, ["a", "b"], seed=4)
    assert any(set(parts[part].tolist()) != set(other[part].tolist()) for part in parts)


@pytest.fixture(scope="module")
def tile_images(embedded, model):
    """RGB tiles as the tiler reads them: (label, pixels) of every third labelled tile."""
    tiles, _ = embedded
    chosen = tiles[::3]
    images = []
    for tile in chosen:
        with open_slide(tile.source) as reader:
            grid = tile_grid_at(reader.info, resolve_mpp(reader.info), np.array([tile.level0_xy]), model.spec)
            images.append((tile.label, next(iter_tile_batches(reader, grid, 1))[0][0]))
    return images


def test_an_image_folder(tile_images, checkpoint, tmp_path):
    root = tmp_path / "images"
    for index, (label, pixels) in enumerate(tile_images):
        (root / label).mkdir(parents=True, exist_ok=True)
        # One image at 256 px: resized to the encoder's 224, and said so.
        image = Image.fromarray(pixels).resize((256, 256)) if index == 0 else Image.fromarray(pixels)
        image.save(root / label / f"tile-{index:03d}.png")
    (root / "lesion" / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "probe"
    result = CliRunner().invoke(app, ["train", "probe", str(root), "--weights", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 image(s) were not 224 x 224 px: resized" in result.output
    record = json.loads((out / "probe.json").read_text())
    print(f"image-folder probe ({len(tile_images)} images, split by image): test {record['test_metrics']}")
    assert record["config"]["split"].startswith("StratifiedGroupKFold") and record["resized_images"] == 1
    assert sum(record["counts"][part]["tiles"] for part in ("train", "val", "test")) == len(tile_images)
    assert record["test_metrics"]["auc"] >= 0.9


def test_an_image_folder_with_split_folders(tmp_path):
    for part in ("train", "val", "test"):
        for label in ("b", "a"):
            (tmp_path / part / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / part / label / "one.jpg")
    tiles = read_image_folder(tmp_path)
    assert [(tile.split, tile.label) for tile in tiles] == [(p, c) for p in ("train", "val", "test") for c in "ab"]
    (tmp_path / "extra").mkdir()
    with pytest.raises(ValueError, match="mixes split and label folders"):
        read_image_folder(tmp_path)


def test_csv_ids_stay_strings_and_spider_sizes_come_from_the_column(slides, tmp_path):
    (tmp_path / "007.svs").symlink_to(slides[0].path)
    csv_path = tmp_path / "patches.csv"
    _write_csv(csv_path, ["slide", "x", "y", "label", "patch_size_level0"], [("007", 10, 20, "01", 224)])
    (tile,) = read_probe_csv(csv_path, tmp_path, spider_context=True)
    assert (tile.source, tile.label, tile.level0_xy, tile.patch_size_level0_px) == (
        str(tmp_path / "007.svs"),
        "01",
        (10, 20),
        224,
    )


# -- Bad input: a message and exit status 2, never a traceback ------------------------------------------------


def _bad_csvs(tile_rows) -> dict[str, tuple[list, list, str]]:
    header = ["slide", "x", "y", "label", "split"]
    rows = [list(row) for row in tile_rows]
    one_sample = [*rows, [rows[0][0], 0, 0, "mitosis", "train"]]
    outside = [*rows[:-1], [rows[-1][0], SLIDE_WIDTH_PX - 100, 0, rows[-1][3], rows[-1][4]]]
    no_val_lesion = [row for row in rows if not (row[4] == "val" and row[3] == "lesion")]
    return {
        "empty": ([], [], "holds no tiles"),
        "missing columns": (["slide", "x", "label"], [row[:2] + row[3:4] for row in rows], "lacks the column(s) y"),
        "unknown slide": (header, [["case-99", 0, 0, "normal", "train"], *rows], "unknown slide 'case-99'"),
        "outside the slide": (header, outside, f"x={SLIDE_WIDTH_PX - 100}, y=0 (level-0 px) reaches outside"),
        "one sample": (header, one_sample, "'mitosis' (1) have fewer than 3 tiles"),
        "a part without a class": (header, no_val_lesion, "the val part has no tile of class(es) 'lesion'"),
        "too few slides to split": (header[:4], [row[:4] for row in rows], "a split by slide needs at least 5"),
        "not a number": (header, [[rows[0][0], "ten", 0, "normal", "train"], *rows], "x must be a whole number"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "missing columns",
        "unknown slide",
        "outside the slide",
        "one sample",
        "a part without a class",
        "too few slides to split",
        "not a number",
    ],
)
def test_bad_csv_input(case, tile_rows, slides, checkpoint, tmp_path):
    header, rows, message = _bad_csvs(tile_rows)[case]
    csv_path = tmp_path / "tiles.csv"
    if header:
        _write_csv(csv_path, header, rows)
    else:
        csv_path.write_text("")
    arguments = [str(csv_path), "--slide-dir", str(slides[0].path.parent), "--weights", str(checkpoint)]
    result = CliRunner().invoke(app, ["train", "probe", *arguments, "--out", str(tmp_path / "out"), "--c-values", "1"])
    print(result.output)
    assert result.exit_code == 2
    assert "error:" in result.output and message in result.output
    assert "Traceback" not in result.output


def test_bad_image_and_spider_input(checkpoint, tmp_path):
    root = tmp_path / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(5):
            Image.new("RGB", (224, 224), (index * 40, 0, 0)).save(root / label / f"{index}.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    arguments = ["--weights", str(checkpoint), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, ["train", "probe", str(root), *arguments])
    assert result.exit_code == 2 and f"cannot read image {root / 'b' / 'broken.png'}" in result.output
    assert "Traceback" not in result.output

    csv_path = tmp_path / "patches.csv"
    _write_csv(csv_path, ["slide", "x", "y", "label"], [("x.svs", 0, 0, "a")])
    result = CliRunner().invoke(app, ["train", "probe", str(csv_path), "--spider-context", *arguments])
    assert result.exit_code == 2 and "a patch_size_level0 column" in result.output
    result = CliRunner().invoke(app, ["train", "probe", str(tmp_path / "nothing.csv"), *arguments])
    assert result.exit_code == 2 and "no CSV file or image folder at" in result.output


def test_three_graded_classes_in_the_given_order():
    # Three Gaussian clusters along one axis, one grade each: a real fit, with the class order of --classes.
    rng = np.random.default_rng(0)
    grades = np.repeat([0, 1, 2], 30)
    embeddings = rng.normal(size=(90, 8)) + 3.0 * grades[:, None] * np.eye(8)[0]
    rows = rng.permutation(90)
    parts = [ProbePart(embeddings[r], grades[r]) for r in (rows[:50], rows[50:70], rows[70:])]
    probe = fit_linear_probe(*parts, ["low", "mid", "high"], c_grid=(0.01, 1.0), ordinal=True)
    print(f"graded probe: test {probe.test_metrics}")
    assert probe.test_metrics["auc"] >= 0.9 and probe.test_metrics["quadratic_kappa"] >= 0.8
    assert probe.test_probabilities.shape == (20, 3)
    tiles = [ProbeTile("s", "s", name, None) for name in ["mid", "high", "low"] * 3]
    assert class_names_of(tiles, ["low", "mid", "high"]) == ["low", "mid", "high"]
    assert class_names_of(tiles) == ["high", "low", "mid"]
    with pytest.raises(ValueError, match=r"labels \['mid'\] are not among --classes low,high"):
        class_names_of(tiles, ["low", "high"])
