"""A synthetic cohort: patients with slides with and without planted lesions, and its CLAM-style dataset CSV.

For the demo and the training tests: a slide-level task ("lesion" when a
slide has planted lesions, else "normal") whose answer is known tile by tile
from the lesion masks, so a trained head's attention can be checked too.
Slides already written with the same parameters are reused, not rendered
again (their ground-truth JSON is written last, so its presence means the
slide is complete).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmag.synthetic.slide import SyntheticSlide, load_synthetic_slide, make_synthetic_slide

LESION_CLASSES = ("normal", "lesion")  # in logit order: "lesion" is the positive class


@dataclass(frozen=True)
class CohortSlide:
    case_id: str
    slide_id: str
    label: str  # "lesion" or "normal"
    slide: SyntheticSlide


@dataclass(frozen=True)
class SyntheticCohort:
    dataset_csv: Path  # case_id, slide_id, label
    slides_dir: Path
    slides: list[CohortSlide]


def make_lesion_cohort(
    directory: Path,
    patients: int,
    slides_per_patient: int = 2,
    width_px: int = 6_000,
    height_px: int = 4_500,
    base_magnification: float = 10,
    seed: int = 0,
    task: str = "label",
) -> SyntheticCohort:
    """Write `patients` x `slides_per_patient` slides and `dataset.csv`; half the patients have lesions.

    The CSV's label column is `task` (CLAM's `label` by default).
    A lesion patient's slides each carry one to three planted lesions; a
    normal patient's carry none. Slide ids are zero-padded (`p003_s1`), as
    real ids often are.
    """
    if patients < 2 or slides_per_patient < 1:
        raise ValueError(f"a cohort needs at least 2 patients and 1 slide each, got {patients} x {slides_per_patient}")
    slides_dir = directory / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 303])
    lesion_patients = set(rng.permutation(patients)[: patients // 2].tolist())
    cohort = []
    for patient in range(patients):
        has_lesions = patient in lesion_patients
        for number in range(slides_per_patient):
            slide_id = f"p{patient:03d}_s{number}"
            n_lesions = int(rng.integers(1, 4)) if has_lesions else 0
            slide_seed = seed * 10_000 + patient * 10 + number
            parameters = {
                "width_px": width_px,
                "height_px": height_px,
                "base_magnification": float(base_magnification),
                "seed": slide_seed,
                "n_lesions": n_lesions,
            }
            slide = _reused(slides_dir / f"{slide_id}.json", parameters) or make_synthetic_slide(
                slides_dir / f"{slide_id}.svs",
                width_px=width_px,
                height_px=height_px,
                base_magnification=base_magnification,
                seed=slide_seed,
                n_lesions=n_lesions,
            )
            cohort.append(CohortSlide(f"p{patient:03d}", slide_id, LESION_CLASSES[has_lesions], slide))
    dataset_csv = directory / "dataset.csv"
    with dataset_csv.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["case_id", "slide_id", task])
        out.writerows((entry.case_id, entry.slide_id, entry.label) for entry in cohort)
    return SyntheticCohort(dataset_csv, slides_dir, cohort)


def tile_lesion_fractions(slide: SyntheticSlide, level0_coords: np.ndarray, tile_size_level0_px: int) -> np.ndarray:
    """The fraction of each tile (top-left corners in level-0 pixels) inside the planted lesions."""
    mask = slide.read_lesion_mask()
    level0_px_per_mask_px = slide.mask_um_per_px / slide.mpp
    size = max(1, int(round(tile_size_level0_px / level0_px_per_mask_px)))
    fractions = []
    for x, y in np.asarray(level0_coords).reshape(-1, 2):
        left, top = int(round(x / level0_px_per_mask_px)), int(round(y / level0_px_per_mask_px))
        fractions.append(float(mask[top : top + size, left : left + size].mean()))
    return np.asarray(fractions)


def _reused(metadata_path: Path, parameters: dict) -> SyntheticSlide | None:
    if not metadata_path.is_file():
        return None
    try:
        written = json.loads(metadata_path.read_text())
    except ValueError:
        return None
    if any(written.get(key) != value for key, value in parameters.items()):
        return None
    return load_synthetic_slide(metadata_path)
