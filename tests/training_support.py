"""A trained lesion head for the tests: a synthetic cohort, its feature files and `xmag train heads` on them.

One session-scoped run (tests/conftest.py) serves the training tests and the
service tests, which export its checkpoint and serve it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmag.features import EncoderIdentity
from xmag.loading import load_checkpoint_model
from xmag.models.checkpoints.xmag_format import save_encoder_checkpoint
from xmag.models.encoder import build_tile_encoder
from xmag.synthetic.dataset import LESION_CLASSES, SyntheticCohort, make_lesion_cohort
from xmag.training.config import HeadsConfig
from xmag.training.cross_validation import CHECKPOINT_FILE, HeadsRun, train_heads
from xmag.training.extract import extract_features, read_slide_list

LESION_TASK = "lesion"
COHORT_PATIENTS = 10  # 20 slides; 3 folds leave 6-7 patients to train on, 1-2 to validate on
COHORT_FOLDS = 3


@dataclass(frozen=True)
class LesionRun:
    """A cohort, the tiny encoder that made its feature files, and a heads run on them."""

    cohort: SyntheticCohort
    encoder_checkpoint: Path
    features_dir: Path
    run_dir: Path
    summary: dict

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE


def make_cohort_features(directory: Path) -> tuple[SyntheticCohort, Path, Path]:
    """The cohort (5x scans: a quarter of the pixels of 10x for the same tissue), a tiny encoder, its features."""
    cohort = make_lesion_cohort(
        directory / "cohort", COHORT_PATIENTS, 2, 3_000, 2_250, base_magnification=5, task=LESION_TASK
    )
    encoder_checkpoint = directory / "tiny_encoder.safetensors"
    save_encoder_checkpoint(build_tile_encoder("tiny_dinov2", seed=0).vit, encoder_checkpoint)
    model = load_checkpoint_model(encoder_checkpoint)
    features_dir = directory / "features"
    outcomes = extract_features(
        read_slide_list(cohort.dataset_csv, cohort.slides_dir),
        features_dir,
        model.encoder,
        EncoderIdentity.of_model(model.info),
        model.spec,
    )
    assert all(outcome.status == "done" for outcome in outcomes), outcomes
    return cohort, encoder_checkpoint, features_dir


def train_lesion_heads(
    directory: Path, cohort: SyntheticCohort, encoder_checkpoint: Path, features_dir: Path, dataset_csv: Path
) -> LesionRun:
    """`xmag train heads` (the library call the command makes) on the cohort's features."""
    run_dir = directory / "run"
    summary = train_heads(
        HeadsRun(
            dataset_csv=dataset_csv,
            features_dir=features_dir,
            encoder=encoder_checkpoint,
            output_dir=run_dir,
            config=HeadsConfig(max_epochs=40, seed=0),
            folds=COHORT_FOLDS,
            class_order={LESION_TASK: list(LESION_CLASSES)},
        )
    )
    return LesionRun(cohort, encoder_checkpoint, features_dir, run_dir, summary)


def shuffled_dataset_csv(cohort: SyntheticCohort, path: Path, seed: int = 1) -> Path:
    """The cohort's CSV with labels permuted across patients (a patient's slides keep one label): the control."""
    with cohort.dataset_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    cases = sorted({row["case_id"] for row in rows})
    label_of_case = {row["case_id"]: row[LESION_TASK] for row in rows}
    permuted = np.random.default_rng(seed).permutation([label_of_case[case] for case in cases])
    shuffled = dict(zip(cases, permuted, strict=True))
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["case_id", "slide_id", LESION_TASK])
        out.writerows((row["case_id"], row["slide_id"], shuffled[row["case_id"]]) for row in rows)
    return path
