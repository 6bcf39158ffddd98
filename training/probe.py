"""`xmag train probe`: a linear probe on frozen tile embeddings, UNI's evaluation of an encoder.

The recipe, top to bottom:

    read_probe_source     a CSV of labelled tiles on slides, or a folder of labelled images
    class_names_of        the class order (given, or the sorted label names)
    split_probe_tiles     the split column / folders, else a seeded split by slide, stratified by label
    embed_probe_tiles     every slide's tiles checked first, then read as serving reads them, one slide at a time,
                          and encoded in batches
    probe_parts           each part's embeddings and class indices
    fit_linear_probe      L-BFGS logistic regression per C of a grid on standardised train embeddings,
                          the C with the best validation balanced accuracy, that model on the test part
    write_probe_outputs   probe.json, probe.md, predictions.csv

Tiles of a CSV are read through the core's tiler at the encoder's tiling (e.g.
224 px at 2 µm/px for the 5x student): the pyramid level and resize that
`plan_tile_grid` grids get, so the probe measures the embeddings serving
computes. With `spider_context` (the paper's SPIDER protocol) each row is a
20x patch and the probe embeds the encoder's tile centred on the patch's
centre: its 5x context. Near the slide's edge that tile is moved inward until
it touches the edge: it stays inside the slide and still holds the patch,
off-centre (`spider_context_corners`).

Decisions, so that runs compare:

- without a split, the slides are cut into five folds by sklearn's
  StratifiedGroupKFold (seeded; grouped by slide, stratified by tile label):
  fold 0 is test, fold 1 validation, folds 2-4 train, about 60/20/20 of the
  tiles, and no slide's tiles in two parts. Images of a folder without
  train/val/test folders carry no slide, so each image is its own group;
- C (inverse L2 strength) runs over UNI's grid, 45 values log-spaced from
  1e-6 to 1e5; the scaler is fit on the train part only;
- the chosen C has the highest validation balanced accuracy, ties going to
  the lower validation log-loss, then to the smaller C (stronger
  regularisation). The model evaluated on test is the one fit on train with
  that C: not refit on train + val, so the validation part only chooses C.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from xmag.features import EncoderIdentity, tiling_record
from xmag.runtimes.protocols import TileEncoderRuntime
from xmag.slide.listing import SLIDE_SUFFIXES
from xmag.slide.reader import open_slide, resolve_mpp
from xmag.slide.tiling import RESIZE_FILTER, TileGrid, TilingSpec, iter_tile_batches, resize_tile, tile_grid_at
from xmag.training.statistics import classification_metrics
from xmag.vocabulary import ReaderBackend

PROBE_PARTS = ("train", "val", "test")
CSV_COLUMNS = ("slide", "x", "y", "label")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
C_GRID = tuple(float(c) for c in np.logspace(-6, 5, 45))  # UNI's grid of inverse regularisation strengths
MAX_ITER = 1000
SPLIT_FOLDS = 5  # fold 0 test, fold 1 validation, the rest train
SELECTION = "highest validation balanced accuracy; ties: lower validation log-loss, then smaller C"
AUTOMATIC_SPLIT = (
    f"StratifiedGroupKFold({SPLIT_FOLDS} folds, seeded) by slide, stratified by label: fold 0 test, fold 1 val, "
    "the rest train"
)
REFIT = "none: the model fit on train with the chosen C is tested, not one refit on train + val"

ProgressCallback = Callable[[int, int], None]  # (tiles embedded, tiles in all)


@dataclass(frozen=True)
class ProbeTile:
    """One labelled tile: on a slide (`level0_xy` set) or an image file (`level0_xy` None)."""

    source: str  # the slide's path, or the image's
    group: str  # what an automatic split keeps in one part: the slide, or the image itself
    label: str
    split: str | None  # "train", "val" or "test" where the input says
    level0_xy: tuple[int, int] | None = None  # top-left corner in level-0 pixels (SPIDER: of the 20x patch)
    patch_size_level0_px: int | None = None  # SPIDER: the 20x patch's side in level-0 pixels
    line: int = 0  # the CSV line, for messages


@dataclass(frozen=True)
class EmbeddedTiles:
    """Embeddings of probe tiles, in their order, and where each was read."""

    embeddings: np.ndarray  # (N, D) float32
    read_level0_xy: np.ndarray  # (N, 2) int64, the tile read (SPIDER: the centred 5x tile); -1 for images
    resized_images: int  # images not at the encoder's input size, resized with the core's resize_tile


@dataclass(frozen=True)
class ProbePart:
    """One part's embeddings and class indices."""

    embeddings: np.ndarray  # (N, D)
    labels: np.ndarray  # (N,) int64 indices into the class names


@dataclass(frozen=True)
class ProbeResult:
    """The fitted probe: the C chosen on validation and the test part's metrics and probabilities."""

    class_names: list[str]
    ordinal: bool
    c_grid: list[float]
    max_iter: int
    chosen_c: float
    validation_curve: list[dict]  # per C: c, balanced_accuracy, auc, log_loss, converged
    validation_metrics: dict[str, float]
    test_metrics: dict[str, float]
    test_probabilities: np.ndarray  # (N_test, C)


# -- Reading the input -------------------------------------------------------------------------------------------


def read_probe_source(
    source: Path,
    slide_dir: Path | None = None,
    *,
    spider_context: bool = False,
    patch_size_level0_px: int | None = None,
) -> list[ProbeTile]:
    """The labelled tiles of a CSV file (`read_probe_csv`) or of an image folder (`read_image_folder`)."""
    if source.is_dir():
        if spider_context:
            raise ValueError("--spider-context needs a CSV of 20x patches on slides, not an image folder")
        return read_image_folder(source)
    if not source.is_file():
        raise FileNotFoundError(f"no CSV file or image folder at {source}")
    return read_probe_csv(source, slide_dir, spider_context=spider_context, patch_size_level0_px=patch_size_level0_px)


def read_probe_csv(
    csv_path: Path,
    slide_dir: Path | None = None,
    *,
    spider_context: bool = False,
    patch_size_level0_px: int | None = None,
) -> list[ProbeTile]:
    """Tiles of a CSV with columns slide, x, y, label and optionally split (and patch_size_level0 for SPIDER).

    `slide` is a slide file's path (relative ones from the CSV's folder) or a
    slide id, found under `slide_dir` as the id itself or with one of the
    slide suffixes. x, y are the tile's top-left corner in level-0 pixels, or
    with `spider_context` the 20x patch's, whose side is the
    patch_size_level0 column or else `patch_size_level0_px`. Everything is
    read as strings (zero-padded ids stay as they are).
    """
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        rows = [{key.strip(): (value or "").strip() for key, value in row.items() if key} for row in reader]
    if not rows:
        raise ValueError(f"{csv_path} holds no tiles: it needs a header ({', '.join(CSV_COLUMNS)}) and a row per tile")
    missing = [name for name in CSV_COLUMNS if name not in columns]
    if missing:
        raise ValueError(f"{csv_path} lacks the column(s) {', '.join(missing)} (it has {', '.join(columns)})")
    has_patch_column = "patch_size_level0" in columns
    if spider_context and not has_patch_column and patch_size_level0_px is None:
        raise ValueError(
            f"--spider-context needs each 20x patch's side in level-0 pixels: a patch_size_level0 column in "
            f"{csv_path} or --patch-size-level0"
        )
    if patch_size_level0_px is not None and not spider_context:
        raise ValueError("--patch-size-level0 is the side of SPIDER's 20x patches: it needs --spider-context")
    if spider_context and patch_size_level0_px is not None and patch_size_level0_px < 1:
        raise ValueError(f"--patch-size-level0 must be at least 1, got {patch_size_level0_px}")
    has_split = "split" in columns
    slide_paths: dict[str, Path] = {}
    tiles = []
    for line, row in enumerate(rows, start=2):
        name = row["slide"]
        if name not in slide_paths:
            slide_paths[name] = _resolve_slide(name, csv_path, slide_dir, line)
        path = str(slide_paths[name])
        patch_size = None
        if spider_context:
            patch_size = _pixels(row, "patch_size_level0", csv_path, line) if has_patch_column else patch_size_level0_px
            if patch_size is None or patch_size < 1:
                raise ValueError(f"{csv_path} line {line}: patch_size_level0 must be at least 1, got {patch_size}")
        tiles.append(
            ProbeTile(
                source=path,
                group=path,
                label=_label(row["label"], csv_path, line),
                split=_split(row.get("split", ""), csv_path, line) if has_split else None,
                level0_xy=(_pixels(row, "x", csv_path, line), _pixels(row, "y", csv_path, line)),
                patch_size_level0_px=patch_size,
                line=line,
            )
        )
    return tiles


def _resolve_slide(name: str, csv_path: Path, slide_dir: Path | None, line: int) -> Path:
    if not name:
        raise ValueError(f"{csv_path} line {line}: the slide column is empty")
    direct = csv_path.parent / name  # an absolute name stays absolute
    if direct.is_file():
        return direct
    tried = [str(direct)]
    if slide_dir is not None:
        suffixes = sorted(SLIDE_SUFFIXES | {suffix.upper() for suffix in SLIDE_SUFFIXES})
        candidates = [slide_dir / name, *(slide_dir / f"{name}{suffix}" for suffix in suffixes)]
        found: dict[Path, Path] = {}  # by the file itself: .svs and .SVS are one file on a case-blind file system
        for path in candidates:
            if path.is_file():
                found.setdefault(path.resolve(), path)
        if len(found) > 1:
            raise ValueError(
                f"{csv_path} line {line}: slide {name!r} is ambiguous under {slide_dir}: {list(found.values())}"
            )
        if found:
            return next(iter(found.values()))
        tried.append(f"{slide_dir / name}[{'|'.join(sorted(SLIDE_SUFFIXES))}]")
    hint = "" if slide_dir is not None else "; to find slides by id, give --slide-dir"
    raise FileNotFoundError(f"{csv_path} line {line}: unknown slide {name!r}: no file at {' or '.join(tried)}{hint}")


def _pixels(row: dict[str, str], column: str, csv_path: Path, line: int) -> int:
    text = row.get(column, "")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value == int(value)):
        raise ValueError(f"{csv_path} line {line}: {column} must be a whole number of level-0 pixels, got {text!r}")
    return int(value)


def _label(text: str, csv_path: Path, line: int) -> str:
    if not text:
        raise ValueError(f"{csv_path} line {line}: the label is empty")
    return text


def _split(text: str, csv_path: Path, line: int) -> str:
    if text.lower() not in PROBE_PARTS:
        raise ValueError(f"{csv_path} line {line}: split must be one of {', '.join(PROBE_PARTS)}, got {text!r}")
    return text.lower()


def read_image_folder(root: Path) -> list[ProbeTile]:
    """Images as `root/<label>/*` or `root/{train,val,test}/<label>/*` (png, jpg, tif), labels from folder names."""
    folders = sorted(path for path in root.iterdir() if path.is_dir())
    split_folders = [path for path in folders if path.name in PROBE_PARTS]
    if split_folders:
        missing = [part for part in PROBE_PARTS if not (root / part).is_dir()]
        others = [path.name for path in folders if path.name not in PROBE_PARTS]
        if missing or others:
            raise ValueError(
                f"{root} mixes split and label folders: with split folders it needs exactly train, val and test "
                f"(missing: {', '.join(missing) or 'none'}; other folders: {', '.join(others) or 'none'})"
            )
        parts: list[tuple[Path, str | None]] = [(root / part, part) for part in PROBE_PARTS]
    else:
        parts = [(root, None)]
    tiles = []
    for part_dir, split in parts:
        for label_dir in sorted(path for path in part_dir.iterdir() if path.is_dir()):
            for image in sorted(label_dir.iterdir()):
                if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES:
                    tiles.append(ProbeTile(source=str(image), group=str(image), label=label_dir.name, split=split))
    if not tiles:
        raise ValueError(
            f"{root} holds no images: expected {root}/<label>/*.png|jpg|tif or {root}/{{train,val,test}}/<label>/*"
        )
    return tiles


def class_names_of(tiles: Sequence[ProbeTile], classes: Sequence[str] | None = None) -> list[str]:
    """The class order: `classes` as given (the grade order for --ordinal), else the sorted label names.

    Every class needs at least three tiles, one for each of train, val and test.
    """
    counts = Counter(tile.label for tile in tiles)
    if classes:
        names = list(classes)
        if len(set(names)) != len(names):
            raise ValueError(f"--classes names a class twice: {','.join(names)}")
        unknown = sorted(set(counts) - set(names))
        if unknown:
            raise ValueError(f"labels {unknown} are not among --classes {','.join(names)}")
    else:
        names = sorted(counts)
    if len(names) < 2:
        raise ValueError(f"a probe needs at least two classes; the tiles have only {names}")
    scarce = [f"{name!r} ({counts[name]})" for name in names if counts[name] < len(PROBE_PARTS)]
    if scarce:
        raise ValueError(
            f"class(es) {', '.join(scarce)} have fewer than 3 tiles: the probe needs at least one in each of train, "
            "val and test"
        )
    return names


# -- Splitting ---------------------------------------------------------------------------------------------------


def split_probe_tiles(tiles: Sequence[ProbeTile], class_names: Sequence[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices of each part: the input's split where given, else a stratified split by slide (module docstring).

    Raises ValueError when a part lacks a sample of some class.
    """
    labels = np.array([class_names.index(tile.label) for tile in tiles], dtype=np.int64)
    given = [tile.split for tile in tiles]
    if all(split is not None for split in given):
        parts = {part: np.flatnonzero([split == part for split in given]) for part in PROBE_PARTS}
    else:
        groups = np.array([tile.group for tile in tiles])
        group_count = len(set(groups.tolist()))
        if group_count < SPLIT_FOLDS:
            raise ValueError(
                f"the tiles come from {group_count} slide(s): a split by slide needs at least {SPLIT_FOLDS}; "
                "give a split column (train, val, test)"
            )
        folds = StratifiedGroupKFold(n_splits=SPLIT_FOLDS, shuffle=True, random_state=seed)
        fold_rows = [rows for _, rows in folds.split(np.zeros(len(tiles)), labels, groups)]
        parts = {"test": fold_rows[0], "val": fold_rows[1], "train": np.concatenate(fold_rows[2:])}
        parts = {part: np.sort(parts[part]) for part in PROBE_PARTS}
    for part, rows in parts.items():
        check_every_class(part, labels[rows], class_names)
    return parts


def check_every_class(part: str, labels: np.ndarray, class_names: Sequence[str]) -> None:
    """ValueError unless the part has at least one sample of every class."""
    counts = np.bincount(labels, minlength=len(class_names))
    absent = [name for name, count in zip(class_names, counts, strict=True) if count == 0]
    if absent:
        present = ", ".join(f"{name} {count}" for name, count in zip(class_names, counts, strict=True))
        raise ValueError(
            f"the {part} part has no tile of class(es) {', '.join(map(repr, absent))} ({present}); every part needs "
            "every class: give a split column, or tiles of more slides"
        )


def slides_in_several_parts(tiles: Sequence[ProbeTile], parts: dict[str, np.ndarray]) -> list[str]:
    """Slides with tiles in more than one part (a given split may do it; the test then sees near copies)."""
    parts_of: dict[str, set[str]] = {}
    for part, rows in parts.items():
        for row in rows:
            parts_of.setdefault(tiles[row].group, set()).add(part)
    return sorted(group for group, names in parts_of.items() if len(names) > 1)


# -- Embedding ---------------------------------------------------------------------------------------------------


def spider_context_corners(
    patch_level0_xy: np.ndarray,
    patch_size_level0_px: np.ndarray,
    tile_size_level0_px: int,
    slide_size_px: tuple[int, int],
) -> np.ndarray:
    """Top-left corners of the encoder's tiles centred on 20x patches, shifted to stay inside the slide.

    patch_level0_xy (N, 2) are the patches' top-left corners and
    patch_size_level0_px (N,) their sides, all in level-0 pixels. A tile that
    would reach past an edge is moved inward until it touches that edge, so
    it still holds the whole patch (when the patch is smaller than the tile)
    but off-centre: near an edge the context extends further into the slide.
    """
    centres = np.asarray(patch_level0_xy, dtype=np.float64) + np.asarray(patch_size_level0_px, np.float64)[:, None] / 2
    corners = np.floor(centres - tile_size_level0_px / 2 + 0.5).astype(np.int64)
    highest = np.array(slide_size_px, dtype=np.int64) - tile_size_level0_px
    return np.clip(corners, 0, highest).reshape(-1, 2)


def embed_probe_tiles(
    tiles: Sequence[ProbeTile],
    encoder: TileEncoderRuntime,
    spec: TilingSpec,
    *,
    spider_context: bool = False,
    backend: ReaderBackend = "openslide",
    batch_size: int = 32,
    num_workers: int = 2,
    fallback_mpp: float | None = None,
    on_progress: ProgressCallback | None = None,
) -> EmbeddedTiles:
    """Encode every tile: slides' tiles read through the core's tiler at `spec`, or image files.

    Every slide is opened and its tiles checked (inside the slide) before any
    is read; then each slide is opened once more and its tiles read in
    batches. Raises the core's slide errors, ValueError for a tile outside its
    slide, OSError naming an unreadable image.
    """
    if spec.output_px != encoder.tile_size_px:
        raise ValueError(f"the tiling makes {spec.output_px} px tiles but the encoder takes {encoder.tile_size_px} px")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if all(tile.level0_xy is None for tile in tiles):
        return _embed_images(tiles, encoder, batch_size, on_progress)
    plans = plan_slide_reads(tiles, spec, spider_context=spider_context, backend=backend, fallback_mpp=fallback_mpp)
    embeddings = np.zeros((len(tiles), encoder.embed_dim), np.float32)
    read_level0_xy = np.zeros((len(tiles), 2), np.int64)
    done = 0
    for rows, grid in plans:
        read_level0_xy[rows] = grid.level0_coords
        with open_slide(tiles[rows[0]].source, backend=backend, num_workers=num_workers) as reader:
            start = 0
            for batch, _ in iter_tile_batches(reader, grid, batch_size):
                embeddings[rows[start : start + len(batch)]] = encoder.encode(batch)
                start += len(batch)
                done += len(batch)
                if on_progress is not None:
                    on_progress(done, len(tiles))
    return EmbeddedTiles(embeddings, read_level0_xy, resized_images=0)


def plan_slide_reads(
    tiles: Sequence[ProbeTile],
    spec: TilingSpec,
    *,
    spider_context: bool = False,
    backend: ReaderBackend = "openslide",
    fallback_mpp: float | None = None,
) -> list[tuple[np.ndarray, TileGrid]]:
    """Per slide, (its rows among `tiles`, the grid of tiles to read); ValueError for a tile outside its slide."""
    rows_of: dict[str, list[int]] = {}
    for row, tile in enumerate(tiles):
        rows_of.setdefault(tile.source, []).append(row)
    plans = []
    for source, row_list in rows_of.items():
        rows = np.array(row_list, dtype=np.int64)
        with open_slide(source, backend=backend, num_workers=1) as reader:
            info = reader.info
            mpp = resolve_mpp(info, fallback_mpp, source)
        level0_xy = np.array([tiles[row].level0_xy for row in rows], dtype=np.int64).reshape(-1, 2)
        grid = tile_grid_at(info, mpp, level0_xy, spec)
        slide_size_px = (info.width_px, info.height_px)
        if spider_context:
            patch_sizes = np.array([tiles[row].patch_size_level0_px for row in rows], dtype=np.int64)
            _check_inside(tiles, rows, level0_xy, patch_sizes, slide_size_px, "20x patch")
            if grid.tile_size_level0_px > min(slide_size_px):
                raise ValueError(
                    f"{source} ({slide_size_px[0]} x {slide_size_px[1]} px) is smaller than one encoder tile "
                    f"({grid.tile_size_level0_px} level-0 px): no 5x context fits"
                )
            corners = spider_context_corners(level0_xy, patch_sizes, grid.tile_size_level0_px, slide_size_px)
            grid = dataclasses.replace(grid, level0_coords=corners)
        else:
            sizes = np.full(len(rows), grid.tile_size_level0_px)
            _check_inside(tiles, rows, level0_xy, sizes, slide_size_px, f"{grid.tile_size_level0_px} px tile")
        plans.append((rows, grid))
    return plans


def _check_inside(tiles, rows, level0_xy, sizes_px, slide_size_px: tuple[int, int], what: str) -> None:
    outside = (level0_xy < 0).any(axis=1) | (level0_xy + sizes_px[:, None] > np.array(slide_size_px)).any(axis=1)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        tile = tiles[rows[first]]
        raise ValueError(
            f"CSV line {tile.line}: the {what} at x={level0_xy[first, 0]}, y={level0_xy[first, 1]} (level-0 px) "
            f"reaches outside {tile.source} ({slide_size_px[0]} x {slide_size_px[1]} px); {int(outside.sum())} "
            "tile(s) of that slide do"
        )


def _embed_images(
    tiles: Sequence[ProbeTile], encoder: TileEncoderRuntime, batch_size: int, on_progress: ProgressCallback | None
) -> EmbeddedTiles:
    size_px = encoder.tile_size_px
    embeddings = np.zeros((len(tiles), encoder.embed_dim), np.float32)
    resized = 0
    for start in range(0, len(tiles), batch_size):
        batch = []
        for tile in tiles[start : start + batch_size]:
            image = _read_image(tile.source)
            if image.shape[:2] != (size_px, size_px):
                image = resize_tile(image, size_px)
                resized += 1
            batch.append(image)
        embeddings[start : start + len(batch)] = encoder.encode(np.stack(batch))
        if on_progress is not None:
            on_progress(start + len(batch), len(tiles))
    return EmbeddedTiles(embeddings, np.full((len(tiles), 2), -1, np.int64), resized)


def _read_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot read image {path}: {error}") from error


def resized_images_line(embedded: EmbeddedTiles, size_px: int) -> str | None:
    """What to say when some images were not at the encoder's input size, else None."""
    if not embedded.resized_images:
        return None
    return (
        f"{embedded.resized_images} image(s) were not {size_px} x {size_px} px: resized to it ({RESIZE_FILTER}, the "
        "core's resize_tile; non-square ones stretched). Images should already be at the encoder's resolution."
    )


# -- Fitting -----------------------------------------------------------------------------------------------------


def probe_parts(
    embedded: EmbeddedTiles, tiles: Sequence[ProbeTile], class_names: Sequence[str], parts: dict[str, np.ndarray]
) -> dict[str, ProbePart]:
    """Each part's embeddings and class indices, by part name."""
    labels = np.array([class_names.index(tile.label) for tile in tiles], dtype=np.int64)
    return {part: ProbePart(embedded.embeddings[rows], labels[rows]) for part, rows in parts.items()}


def fit_linear_probe(
    train: ProbePart,
    val: ProbePart,
    test: ProbePart,
    class_names: Sequence[str],
    *,
    c_grid: Sequence[float] = C_GRID,
    max_iter: int = MAX_ITER,
    ordinal: bool = False,
) -> ProbeResult:
    """Logistic regression (L-BFGS, L2) on standardised embeddings, C chosen on val, metrics on test.

    The selection and the refit policy are the module docstring's. A fit
    that stops at `max_iter` is kept; the validation curve says which did not
    converge.
    """
    c_values = sorted(float(c) for c in c_grid)
    if not c_values or not all(math.isfinite(c) and c > 0 for c in c_values):
        raise ValueError(f"the C grid must be positive numbers, got {c_values}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    for name, part in (("train", train), ("val", val), ("test", test)):
        check_every_class(name, part.labels, class_names)
    scaler = StandardScaler().fit(train.embeddings)
    train_x, val_x, test_x = (scaler.transform(part.embeddings) for part in (train, val, test))
    classes = list(range(len(class_names)))
    curve: list[dict] = []
    best_model, best_key = None, None
    # Along increasing C each fit starts from the last one's solution (the regularisation path): a converged fit reaches
    # the same optimum as from zero, in far fewer iterations.
    model = LogisticRegression(solver="lbfgs", max_iter=max_iter, warm_start=True)
    for c in c_values:
        model.set_params(C=c)
        # One BLAS thread: on the 2-core development machines threads made a 70 x 192 probe 4-6x and a
        # 20,000 x 768 fit 2x slower (the matrix-vector products are too small to share out).
        with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
            # Large C on separable embeddings runs to max_iter; the curve records it instead.
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(train_x, train.labels)
        probabilities = model.predict_proba(val_x)
        metrics = classification_metrics(val.labels, probabilities, ordinal)
        loss = float(log_loss(val.labels, probabilities, labels=classes))
        curve.append(
            {
                "c": c,
                "balanced_accuracy": metrics["balanced_accuracy"],
                "auc": metrics["auc"],
                "log_loss": loss,
                "converged": bool(np.max(model.n_iter_) < max_iter),
            }
        )
        key = (metrics["balanced_accuracy"], -loss)
        if best_key is None or key > best_key:  # strictly better: a tie keeps the smaller C
            best_model, best_key = copy.deepcopy(model), key
    assert best_model is not None
    validation_probabilities = best_model.predict_proba(val_x)
    test_probabilities = best_model.predict_proba(test_x)
    return ProbeResult(
        class_names=list(class_names),
        ordinal=ordinal,
        c_grid=c_values,
        max_iter=max_iter,
        chosen_c=float(best_model.C),
        validation_curve=curve,
        validation_metrics=classification_metrics(val.labels, validation_probabilities, ordinal),
        test_metrics=classification_metrics(test.labels, test_probabilities, ordinal),
        test_probabilities=test_probabilities,
    )


# -- Writing -----------------------------------------------------------------------------------------------------

METRIC_ORDER = ("auc", "balanced_accuracy", "accuracy", "weighted_f1", "f1", "quadratic_kappa")


def split_counts(tiles: Sequence[ProbeTile], parts: dict[str, np.ndarray], class_names: Sequence[str]) -> dict:
    """Tiles per part and class, and slides (groups) per part."""
    counts: dict = {}
    for part in PROBE_PARTS:
        labels = Counter(tiles[row].label for row in parts[part])
        counts[part] = {
            "tiles": int(len(parts[part])),
            "slides": len({tiles[row].group for row in parts[part]}),
            "per_class": {name: int(labels[name]) for name in class_names},
        }
    return counts


def probe_table(result: ProbeResult, counts: dict) -> str:
    """The tiles per part and class, the chosen C and the metrics, as Markdown tables."""
    names = result.class_names
    lines = ["| part | slides | tiles | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
    for part in PROBE_PARTS:
        per_class = " | ".join(str(counts[part]["per_class"][name]) for name in names)
        lines.append(f"| {part} | {counts[part]['slides']} | {counts[part]['tiles']} | {per_class} |")
    lines += ["", f"C chosen on validation: {result.chosen_c:.3g}", ""]
    lines += ["| metric | validation | test |", "|---|---|---|"]
    for metric in METRIC_ORDER:
        if metric in result.test_metrics:
            lines.append(f"| {metric} | {result.validation_metrics[metric]:.4f} | {result.test_metrics[metric]:.4f} |")
    return "\n".join(lines)


def write_probe_outputs(
    out_dir: Path,
    result: ProbeResult,
    tiles: Sequence[ProbeTile],
    embedded: EmbeddedTiles,
    parts: dict[str, np.ndarray],
    *,
    identity: EncoderIdentity,
    spec: TilingSpec,
    config: dict,
) -> dict[str, Path]:
    """Write probe.json (everything), probe.md (the tables) and predictions.csv (one row per test tile)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = split_counts(tiles, parts, result.class_names)
    record = {
        "config": {
            **config,
            "c_grid": result.c_grid,
            "max_iter": result.max_iter,
            "selection": SELECTION,
            "refit": REFIT,
            "standardisation": "StandardScaler fit on the train part",
            "split": "given" if all(tile.split for tile in tiles) else AUTOMATIC_SPLIT,
        },
        "encoder": dataclasses.asdict(identity),
        "tiling": tiling_record(spec),
        "class_names": result.class_names,
        "ordinal": result.ordinal,
        "counts": counts,
        "slides_in_several_parts": slides_in_several_parts(tiles, parts),
        "resized_images": embedded.resized_images,
        "chosen_c": result.chosen_c,
        "validation_curve": result.validation_curve,
        "validation_metrics": result.validation_metrics,
        "test_metrics": result.test_metrics,
    }
    paths = {
        "json": out_dir / "probe.json",
        "markdown": out_dir / "probe.md",
        "predictions": out_dir / "predictions.csv",
    }
    # NaN (an undefined metric) is written as null: JSON has no NaN.
    paths["json"].write_text(json.dumps(_without_nan(record), indent=2) + "\n")
    paths["markdown"].write_text(_markdown(result, counts, identity, config))
    with paths["predictions"].open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(
            ["source", "x", "y", "read_x", "read_y", "label", "predicted", *(f"p_{n}" for n in result.class_names)]
        )
        for row, probabilities in zip(parts["test"], result.test_probabilities, strict=True):
            tile = tiles[row]
            xy = tile.level0_xy or ("", "")
            read_xy = embedded.read_level0_xy[row] if tile.level0_xy is not None else ("", "")
            predicted = result.class_names[int(np.argmax(probabilities))]
            out.writerow([tile.source, *xy, *read_xy, tile.label, predicted, *(f"{p:.6f}" for p in probabilities)])
    return paths


def _without_nan(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nan(item) for item in value]
    return value


def _markdown(result: ProbeResult, counts: dict, identity: EncoderIdentity, config: dict) -> str:
    source = config.get("source", "")
    lines = [
        "# Linear probe",
        "",
        f"Encoder `{identity.name}` (sha256 `{identity.sha256[:12]}`, {identity.runtime}); tiles from `{source}`"
        + (", 5x context of 20x patches (SPIDER)" if config.get("spider_context") else "")
        + ".",
        "",
        f"L-BFGS logistic regression on standardised embeddings, C over {len(result.c_grid)} values "
        f"{min(result.c_grid):.0e}..{max(result.c_grid):.0e}; chosen by {SELECTION}; refit: {REFIT}.",
        "",
        probe_table(result, counts),
        "",
    ]
    return "\n".join(lines)
