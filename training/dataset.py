"""A slide dataset for training heads: CLAM's dataset CSV, and each slide's bag of tile features.

The CSV is CLAM's: `case_id, slide_id, label`, where `case_id` is the
patient. Every column other than those two is a task with string labels
(`label` is the usual one; `isup_grade, subtype` would be two tasks, each its
own head on the same features). An empty cell leaves that slide out of that
task only. Ids are read as strings, so zero-padded ids survive.

A slide's features are `<features_dir>/<slide_id>.h5`, or CLAM's
`<features_dir>/h5_files/<slide_id>.h5`, in any layout `xmag.features` reads.
Our own files record the encoder that made them; every file must name the
same encoder, and the encoder the heads will be stored with.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from xmag.features import SlideFeatures, read_feature_file

CASE_ID = "case_id"
SLIDE_ID = "slide_id"


@dataclass(frozen=True)
class SlideRecord:
    """One row of the dataset CSV."""

    case_id: str  # the patient: slides of one case never fall into two parts of a split
    slide_id: str
    labels: dict[str, str]  # task -> class name; tasks with an empty cell are absent


@dataclass(frozen=True)
class SlideDataset:
    """The rows of a dataset CSV and the classes of each task, in logit order."""

    slides: list[SlideRecord]
    class_names: dict[str, list[str]]  # task -> class names
    ordinal_tasks: frozenset[str]  # tasks whose classes are ordered grades (quadratic kappa is reported)

    def labelled(self, task: str) -> list[SlideRecord]:
        """The slides that have a label for `task`."""
        return [slide for slide in self.slides if task in slide.labels]

    def label_index(self, slide: SlideRecord, task: str) -> int:
        """The class index of a slide's label for `task`."""
        return self.class_names[task].index(slide.labels[task])


def read_dataset_csv(
    path: Path,
    tasks: list[str] | None = None,
    class_order: dict[str, list[str]] | None = None,
    ordinal_tasks: list[str] | None = None,
) -> SlideDataset:
    """Read a CLAM-style dataset CSV; `tasks` picks label columns (default: all but case_id and slide_id).

    Classes are sorted by name unless `class_order` gives a task's order
    (required for ordinal tasks, whose order is their meaning).
    Raises ValueError for a missing column, a duplicated slide, a task with
    fewer than two classes, or labels outside a given class order.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in reader.fieldnames or []]
        rows = [{key.strip(): (value or "").strip() for key, value in row.items() if key} for row in reader]
    missing = [name for name in (CASE_ID, SLIDE_ID) if name not in columns]
    if missing:
        raise ValueError(f"{path}: the dataset CSV needs the columns case_id, slide_id and a label; missing {missing}")
    label_columns = [name for name in columns if name not in (CASE_ID, SLIDE_ID)]
    tasks = tasks or label_columns
    unknown = [task for task in tasks if task not in label_columns]
    if unknown or not tasks:
        raise ValueError(f"{path}: no label column {unknown or ''}; its label columns are {label_columns}")
    if not rows:
        raise ValueError(f"{path} lists no slides")

    slides, seen = [], set()
    for number, row in enumerate(rows, start=2):
        if not row[SLIDE_ID] or not row[CASE_ID]:
            raise ValueError(f"{path}, line {number}: empty case_id or slide_id")
        if row[SLIDE_ID] in seen:
            raise ValueError(f"{path}, line {number}: slide {row[SLIDE_ID]!r} is listed twice")
        seen.add(row[SLIDE_ID])
        labels = {task: row[task] for task in tasks if row.get(task)}
        slides.append(SlideRecord(row[CASE_ID], row[SLIDE_ID], labels))

    class_order = class_order or {}
    ordinal = frozenset(ordinal_tasks or [])
    class_names = {}
    for task in tasks:
        found = sorted({slide.labels[task] for slide in slides if task in slide.labels})
        if task in class_order:
            outside = sorted(set(found) - set(class_order[task]))
            if outside:
                raise ValueError(f"{path}: task {task!r} has labels {outside} outside the given classes")
            found = list(class_order[task])
        elif task in ordinal:
            raise ValueError(f"task {task!r} is ordinal: give its class order (e.g. --classes {task}=low,mid,high)")
        if len(found) < 2:
            raise ValueError(f"{path}: task {task!r} needs at least two classes, found {found}")
        class_names[task] = found
    return SlideDataset(slides, class_names, ordinal)


def feature_file_of(features_dir: Path, slide_id: str) -> Path | None:
    """Where a slide's feature file is: ours and TRIDENT's `<slide_id>.h5`, or CLAM's `h5_files/<slide_id>.h5`."""
    for candidate in (features_dir / f"{slide_id}.h5", features_dir / "h5_files" / f"{slide_id}.h5"):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class FeatureBags:
    """Every slide's tile features, read once and kept in memory (a slide of 10,000 tiles x 768 is 30 MB)."""

    bags: dict[str, SlideFeatures]  # slide_id -> its features
    embed_dim: int
    encoder_sha256: str | None  # what our files record; None for TRIDENT's and CLAM's, which do not say


def read_feature_bags(dataset: SlideDataset, features_dir: Path) -> FeatureBags:
    """Read the feature file of every slide in the dataset.

    Raises ValueError when files are missing (naming them), hold no tiles,
    differ in width, or were made by different encoders.
    """
    features_dir = Path(features_dir)
    paths = {slide.slide_id: feature_file_of(features_dir, slide.slide_id) for slide in dataset.slides}
    missing = sorted(slide_id for slide_id, path in paths.items() if path is None)
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(paths)} slides have no feature file <slide_id>.h5 in {features_dir} "
            f"(or its h5_files/): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. "
            "Run xmag extract on them first."
        )
    bags = {slide_id: read_feature_file(path) for slide_id, path in paths.items() if path is not None}
    empty = sorted(slide_id for slide_id, bag in bags.items() if len(bag.features) == 0)
    if empty:
        raise ValueError(
            f"{len(empty)} slides have no tiles (no tissue found): {', '.join(empty[:5])}; leave them out of the CSV"
        )
    widths = {bag.features.shape[1] for bag in bags.values()}
    if len(widths) != 1:
        raise ValueError(f"the feature files have different widths {sorted(widths)}: they come from different encoders")
    encoders = {bag.encoder_sha256 for bag in bags.values()}
    if len(encoders) != 1:
        raise ValueError(
            f"the feature files were made by {len(encoders)} different encoders (sha256s "
            f"{sorted(str(sha) for sha in encoders)}); train on features of one encoder"
        )
    return FeatureBags(bags, widths.pop(), encoders.pop())
