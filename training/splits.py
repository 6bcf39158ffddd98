"""Cross-validation splits by patient, and CLAM's split files.

k-fold cross-validation: every slide is in the test part of exactly one fold.
Folds are grouped by `case_id`, so a patient's slides never fall into two
parts of a fold (the slides of one patient look alike, and a model that saw
one of them would be graded on a near copy), and stratified by label, so
every part holds every class where the data allow. Inside each fold the
validation part (early stopping) is carved from the training slides the
same way. (CLAM's own "folds" are repeated random splits whose test sets
overlap: not cross-validation.)

The files are CLAM's, so runs are reproducible and comparable with CLAM's:

    splits_<k>.csv             index, then columns train, val, test listing slide ids (shorter ones padded empty)
    splits_<k>_bool.csv        index slide_id, boolean columns train, val, test
    splits_<k>_descriptor.csv  index class name, the number of slides per part
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from xmag.training.dataset import SlideDataset

PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Fold:
    """One fold's slide ids per part."""

    train: list[str]
    val: list[str]
    test: list[str]

    def part(self, name: str) -> list[str]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def patient_folds(dataset: SlideDataset, task: str, k: int = 5, val_folds: int = 5, seed: int = 0) -> list[Fold]:
    """k folds of all the dataset's slides, grouped by patient and stratified by their label for `task`.

    Slides without a label for `task` form a stratum of their own; each task
    trains on the parts' slides it has labels for. The validation part of each
    fold is one of `val_folds` patient-grouped, stratified parts of its
    training slides (a fifth by default).
    """
    slides = dataset.slides
    cases = sorted({slide.case_id for slide in slides})
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if len(cases) < k * 2:
        raise ValueError(
            f"the dataset has {len(cases)} patients: too few for {k} folds with a validation part each "
            f"(at least {2 * k} needed); use fewer folds"
        )
    slide_ids = np.array([slide.slide_id for slide in slides])
    labels = np.array([dataset.label_index(slide, task) if task in slide.labels else -1 for slide in slides])
    groups = np.array([slide.case_id for slide in slides])
    folds = []
    outer = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold_index, (rest, test) in enumerate(outer.split(slide_ids, labels, groups)):
        train, val = _validation_split(labels[rest], groups[rest], val_folds, seed + 1 + fold_index)
        folds.append(
            Fold(
                train=sorted(slide_ids[rest][train].tolist()),
                val=sorted(slide_ids[rest][val].tolist()),
                test=sorted(slide_ids[test].tolist()),
            )
        )
    for fold in folds:
        check_patient_disjoint(fold, dataset)
    return folds


def final_split(dataset: SlideDataset, task: str, val_folds: int = 5, seed: int = 0) -> Fold:
    """All slides in training but a patient-grouped, stratified validation part (1 / val_folds) for early stopping."""
    slides = dataset.slides
    slide_ids = np.array([slide.slide_id for slide in slides])
    labels = np.array([dataset.label_index(slide, task) if task in slide.labels else -1 for slide in slides])
    train, val = _validation_split(labels, np.array([slide.case_id for slide in slides]), val_folds, seed)
    return Fold(train=sorted(slide_ids[train].tolist()), val=sorted(slide_ids[val].tolist()), test=[])


def _validation_split(
    labels: np.ndarray, groups: np.ndarray, val_folds: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): one of `val_folds` patient-grouped, stratified parts as validation.

    With few patients the parts are fewer (and the validation part larger), so
    that every class can still have a patient on each side.
    """
    # Unlabelled slides (-1) are a stratum, but need no patient on each side.
    patients_per_class = [len(set(groups[labels == label])) for label in np.unique(labels) if label >= 0]
    parts = min(val_folds, *patients_per_class)
    if parts < 2:
        raise ValueError(
            "too few patients for a validation part: a class has only one patient among the training slides "
            "of a fold; use fewer folds or more patients"
        )
    inner = StratifiedGroupKFold(n_splits=parts, shuffle=True, random_state=seed)
    return next(inner.split(labels, labels, groups))


def check_patient_disjoint(fold: Fold, dataset: SlideDataset) -> None:
    """Raise ValueError if a patient's slides are in two parts of the fold, or a slide is in two parts."""
    case_of = {slide.slide_id: slide.case_id for slide in dataset.slides}
    unknown = sorted({slide_id for part in PARTS for slide_id in fold.part(part)} - set(case_of))
    if unknown:
        raise ValueError(f"the split names slides that the dataset CSV does not list: {unknown[:5]}")
    cases = {part: {case_of[slide_id] for slide_id in fold.part(part)} for part in PARTS}
    for first, second in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = sorted(cases[first] & cases[second])
        if shared:
            raise ValueError(
                f"patients {shared[:5]} have slides in both {first} and {second}: the split leaks patients "
                "(split by case_id)"
            )
        overlap = sorted(set(fold.part(first)) & set(fold.part(second)))
        if overlap:
            raise ValueError(f"slides {overlap[:5]} are in both {first} and {second}")


def write_clam_splits(directory: Path, folds: list[Fold], dataset: SlideDataset, task: str) -> list[Path]:
    """Write each fold as CLAM's three split files; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for index, fold in enumerate(folds):
        longest = max(len(fold.part(part)) for part in PARTS)
        path = directory / f"splits_{index}.csv"
        with path.open("w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(["", *PARTS])
            for row in range(longest):
                cells = [fold.part(part)[row] if row < len(fold.part(part)) else "" for part in PARTS]
                out.writerow([row, *cells])
        written.append(path)

        path = directory / f"splits_{index}_bool.csv"
        with path.open("w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(["", *PARTS])
            for part in PARTS:
                for slide_id in fold.part(part):
                    out.writerow([slide_id, *(str(other == part) for other in PARTS)])
        written.append(path)

        path = directory / f"splits_{index}_descriptor.csv"
        label_of = {slide.slide_id: slide.labels.get(task) for slide in dataset.slides}
        with path.open("w", newline="") as handle:
            out = csv.writer(handle)
            out.writerow(["", *PARTS])
            for name in dataset.class_names[task]:
                counts = [sum(label_of[slide_id] == name for slide_id in fold.part(part)) for part in PARTS]
                out.writerow([name, *counts])
        written.append(path)
    return written


def read_clam_splits(directory: Path, dataset: SlideDataset) -> list[Fold]:
    """Read CLAM's `splits_<k>.csv` files (k = 0, 1, ...) as folds; slide ids as strings.

    Raises ValueError for a folder without split files, a file without the
    train/val/test columns, or a split that puts one patient in two parts.
    """
    directory = Path(directory)
    folds = []
    while (path := directory / f"splits_{len(folds)}.csv").is_file():
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if not set(PARTS) <= set(reader.fieldnames or []):
                raise ValueError(
                    f"{path}: CLAM split files have the columns train, val, test; found {reader.fieldnames}"
                )
            rows = list(reader)
        parts = {part: [row[part].strip() for row in rows if (row[part] or "").strip()] for part in PARTS}
        fold = Fold(**parts)
        if not fold.train or not fold.test:
            raise ValueError(f"{path}: a fold needs training and test slides")
        check_patient_disjoint(fold, dataset)
        folds.append(fold)
    if not folds:
        raise ValueError(f"{directory} holds no CLAM split files splits_0.csv, splits_1.csv, ...")
    return folds
