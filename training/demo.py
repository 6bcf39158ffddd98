"""The demo model's head, trained like any other: synthetic slides -> `xmag extract` -> `xmag train heads`.

The main job shows the whole chain on the embedded default. No trained
encoder ships with the code and none can be downloaded, so the encoder is the
student architecture with seeded random weights; the head is then really
trained, on a small cohort of generated slides with and without planted
lesions, and finds them. Every step is cached: slides already written,
feature files made by this encoder, and a heads run on the same dataset and
features are reused; the checkpoint file then stays the same (the same
sha256), so the export stage need not run again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from xmag.demo import DEMO_CLASSES, DEMO_MODEL_NOTICE, DEMO_TASK, demo_encoder
from xmag.features import EncoderIdentity
from xmag.loading import load_checkpoint_model
from xmag.model_repo import sha256_of
from xmag.models.checkpoints.xmag_format import save_encoder_checkpoint
from xmag.synthetic.dataset import make_lesion_cohort
from xmag.training.config import HeadsConfig
from xmag.training.cross_validation import CHECKPOINT_FILE, HeadsRun, train_heads
from xmag.training.extract import extract_features, read_slide_list

# Eight patients, one 20x slide each (4 x 3 mm, ~20 tiles at 5x): about 160 tiles for the ViT-B/14 to encode.
DEMO_COHORT_PATIENTS = 8
DEMO_COHORT_SLIDE_PX = (8_000, 6_000)
DEMO_FOLDS = 4


def ensure_demo_checkpoint(directory: Path, say: Callable[[str], None]) -> Path:
    """The demo checkpoint (untrained encoder + a head trained on synthetic slides) under `directory`; its path."""
    width_px, height_px = DEMO_COHORT_SLIDE_PX
    cohort = make_lesion_cohort(
        directory / "cohort",
        DEMO_COHORT_PATIENTS,
        1,
        width_px,
        height_px,
        base_magnification=20,
        seed=5,
        task=DEMO_TASK,
    )
    say(
        f"demo cohort: {len(cohort.slides)} synthetic 20x slides of {DEMO_COHORT_PATIENTS} patients in {cohort.slides_dir}"
    )
    say(
        f"  ({sum(entry.label == 'lesion' for entry in cohort.slides)} with planted lesions), listed in {cohort.dataset_csv}"
    )

    encoder_path = directory / "encoder.safetensors"
    if not encoder_path.is_file():
        save_encoder_checkpoint(
            demo_encoder().vit,
            encoder_path,
            metadata={"provenance_kind": "untrained-demo", "provenance_description": DEMO_MODEL_NOTICE},
        )
    say(f"demo encoder: {encoder_path} (the ViT-B/14 student architecture, seeded random weights: untrained)")

    features_dir = directory / "features"
    say(
        f"$ xmag extract {cohort.dataset_csv} --slide-dir {cohort.slides_dir} --weights {encoder_path} "
        f"--out {features_dir}"
    )
    model = load_checkpoint_model(encoder_path)
    outcomes = extract_features(
        read_slide_list(cohort.dataset_csv, cohort.slides_dir),
        features_dir,
        model.encoder,
        EncoderIdentity.of_model(model.info),
        model.spec,
        on_outcome=lambda outcome: say(f"  {outcome.slide_id}: {_outcome_text(outcome)}"),
    )
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    if failed:
        raise RuntimeError(f"extracting the demo cohort failed: {failed[0].message}")

    run_dir = directory / "heads"
    if all(outcome.status == "skipped" for outcome in outcomes) and _run_is_current(run_dir, cohort.dataset_csv):
        say(f"demo head: already trained on these features ({run_dir}), reused")
        return run_dir / CHECKPOINT_FILE
    say(
        f"$ xmag train heads {cohort.dataset_csv} --features {features_dir} --encoder {encoder_path} --out {run_dir} "
        f"--folds {DEMO_FOLDS} --classes {DEMO_TASK}={','.join(DEMO_CLASSES)}"
    )
    summary = train_heads(
        HeadsRun(
            dataset_csv=cohort.dataset_csv,
            features_dir=features_dir,
            encoder=encoder_path,
            output_dir=run_dir,
            config=HeadsConfig(),
            folds=DEMO_FOLDS,
            class_order={DEMO_TASK: list(DEMO_CLASSES)},
            description=DEMO_MODEL_NOTICE,
        )
    )
    pooled = summary["tasks"][DEMO_TASK]["pooled"]
    low, high = pooled["ci95"]["auc"]
    say(
        f"  held-out AUC ({DEMO_FOLDS} folds by patient, {pooled['slides']} slides): {pooled['metrics']['auc']:.3f} "
        f"[95% CI {low:.3f}, {high:.3f}]; balanced accuracy {pooled['metrics']['balanced_accuracy']:.3f} "
        f"(metrics in {run_dir / 'metrics.md'})"
    )
    return run_dir / CHECKPOINT_FILE


def _run_is_current(run_dir: Path, dataset_csv: Path) -> bool:
    """A finished heads run (metrics written after the checkpoint) on this very dataset CSV."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (run_dir / CHECKPOINT_FILE).is_file() and config.get("dataset_sha256") == sha256_of(dataset_csv)


def _outcome_text(outcome) -> str:
    if outcome.status == "skipped":
        return "its feature file is current, reused"
    return f"{outcome.tiles} tiles encoded" if outcome.status == "done" else f"{outcome.status}: {outcome.message}"
