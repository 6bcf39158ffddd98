"""`xmag train heads`: cross-validated ABMIL heads on feature files, and the checkpoint that ships them.

    read the dataset CSV and every slide's feature file; check they come from the given encoder
    folds: patient-grouped, label-stratified k-fold (or the user's CLAM splits), written as CLAM split files
    for each task, for each fold: train a head (xmag.training.heads) on train, early-stopped on val;
        predict the held-out test slides on whole bags
    metrics per fold, mean ± sd over folds, and on the pooled held-out predictions, with bootstrap CIs
    the final heads: trained on every labelled slide, early-stopped on a patient-grouped validation fifth
    the checkpoint: the encoder and the final heads, with the encoder's weights sha256 they were trained on

The cross-validated numbers estimate how the final heads do on new patients;
the final heads themselves have no held-out slides left to be graded on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from xmag import __version__
from xmag.loading import EncoderWeights, load_encoder_weights
from xmag.model_repo import sha256_of
from xmag.models.abmil import GatedABMIL, SlideHeads
from xmag.models.checkpoints.xmag_format import save_encoder_checkpoint
from xmag.training.config import HeadsConfig
from xmag.training.dataset import FeatureBags, SlideDataset, read_dataset_csv, read_feature_bags
from xmag.training.heads import EpochLog, TrainedHead, predict_bags, train_head
from xmag.training.reports import FoldPredictions, summarise_task, write_reports
from xmag.training.splits import Fold, final_split, patient_folds, read_clam_splits, write_clam_splits

CHECKPOINT_FILE = "model.safetensors"


@dataclass(frozen=True)
class HeadsRun:
    """Everything `train_heads` needs, as the command line gives it."""

    dataset_csv: Path
    features_dir: Path
    encoder: Path  # the model repository or checkpoint whose encoder made the features
    output_dir: Path
    config: HeadsConfig = field(default_factory=HeadsConfig)
    folds: int = 5
    splits_dir: Path | None = None  # CLAM split files to use instead of our folds
    tasks: list[str] | None = None  # label columns; default all
    class_order: dict[str, list[str]] = field(default_factory=dict)
    ordinal_tasks: list[str] = field(default_factory=list)
    bootstrap_resamples: int = 1000
    encoder_format: str = "auto"
    encoder_config: str = "xmag_vitb14"
    description: str = ""  # provenance description; default: what the run was


@dataclass(frozen=True)
class HeadsProgress:
    """One epoch of one head: where it is in the run."""

    task: str
    fold: str  # "0", "1", ... or "final"
    log: EpochLog
    max_epochs: int


def train_heads(run: HeadsRun, on_epoch: Callable[[HeadsProgress], None] | None = None) -> dict:
    """Cross-validate and train the heads of every task; write the run directory; returns the summary (metrics.json)."""
    dataset = read_dataset_csv(run.dataset_csv, run.tasks, run.class_order, run.ordinal_tasks)
    bags = read_feature_bags(dataset, run.features_dir)
    encoder = load_encoder_weights(run.encoder, run.encoder_format, run.encoder_config)
    features_notice = _check_features_match_encoder(bags, encoder)
    tasks = list(dataset.class_names)
    folds = read_clam_splits(run.splits_dir, dataset) if run.splits_dir else _our_folds(dataset, tasks[0], run)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    write_clam_splits(run.output_dir / "splits", folds, dataset, tasks[0])

    def progress(task: str, fold: str) -> Callable[[EpochLog], None] | None:
        if on_epoch is None:
            return None
        return lambda log: on_epoch(HeadsProgress(task, fold, log, run.config.max_epochs))

    summaries, final_heads, predictions = {}, {}, {}
    for task in tasks:
        predictions[task] = []
        for index, fold in enumerate(folds):
            trained = _train_on(dataset, bags, task, fold, run.config, progress(task, str(index)))
            predictions[task].append(_predict_test(dataset, bags, task, fold, index, trained))
        summaries[task] = summarise_task(
            predictions[task],
            dataset.class_names[task],
            ordinal=task in dataset.ordinal_tasks,
            resamples=run.bootstrap_resamples,
            seed=run.config.seed,
        )
        final_fold = final_split(dataset, task, seed=run.config.seed + 1000)
        final_heads[task] = _train_on(dataset, bags, task, final_fold, run.config, progress(task, "final")).head

    checkpoint = run.output_dir / CHECKPOINT_FILE
    description = run.description or (
        f"ABMIL heads {', '.join(tasks)} trained by xmag train heads on {len(dataset.slides)} slides of "
        f"{run.dataset_csv.name} ({len(folds)}-fold cross-validated), on features of the encoder {encoder.name}"
    )
    save_encoder_checkpoint(
        encoder.vit,
        checkpoint,
        metadata={
            "provenance_kind": encoder.provenance_kind,
            "provenance_description": description,
            "encoder_provenance": encoder.description,
        },
        heads=SlideHeads(final_heads, dataset.class_names),
        heads_encoder_sha256=encoder.sha256,
    )
    summary = {
        "tasks": summaries,
        "encoder": {"name": encoder.name, "weights_sha256": encoder.sha256, "provenance_kind": encoder.provenance_kind},
        "features_notice": features_notice,
        "checkpoint": {"path": CHECKPOINT_FILE, "sha256": sha256_of(checkpoint), "description": description},
        "folds": len(folds),
        "slides": len(dataset.slides),
        "patients": len({slide.case_id for slide in dataset.slides}),
    }
    write_reports(run.output_dir, summary, predictions, dataset.class_names, _config_record(run, dataset, bags))
    return summary


def _check_features_match_encoder(bags: FeatureBags, encoder: EncoderWeights) -> str:
    if bags.embed_dim != encoder.vit.embed_dim:
        raise ValueError(
            f"the features are {bags.embed_dim} wide but the encoder {encoder.name} makes {encoder.vit.embed_dim}: "
            "they were not made by this encoder"
        )
    if bags.encoder_sha256 is None:
        return (
            "The feature files do not record which encoder made them (TRIDENT or CLAM layout); they are taken to "
            f"come from {encoder.name} (weights sha256 {encoder.sha256}), as the command line says."
        )
    if bags.encoder_sha256 != encoder.sha256:
        raise ValueError(
            f"the feature files were made by the encoder with weights sha256 {bags.encoder_sha256}, but the "
            f"encoder given ({encoder.name}) has weights sha256 {encoder.sha256}: heads trained on these features "
            "would not fit it. Give the encoder that made them, or extract the features again with this one."
        )
    return ""


def _our_folds(dataset: SlideDataset, task: str, run: HeadsRun) -> list[Fold]:
    return patient_folds(dataset, task, k=run.folds, seed=run.config.seed)


def _train_on(
    dataset: SlideDataset,
    bags: FeatureBags,
    task: str,
    fold: Fold,
    config: HeadsConfig,
    on_epoch: Callable[[EpochLog], None] | None,
) -> TrainedHead:
    labelled = {slide.slide_id: dataset.label_index(slide, task) for slide in dataset.labelled(task)}
    train = [slide_id for slide_id in fold.train if slide_id in labelled]
    val = [slide_id for slide_id in fold.val if slide_id in labelled]
    if not val:
        raise ValueError(f"task {task!r}: a fold has no labelled validation slides, which early stopping needs")
    missing = sorted(set(dataset.class_names[task]) - {dataset.class_names[task][labelled[s]] for s in train})
    if missing:
        raise ValueError(
            f"task {task!r}: a fold's training part has no slide of class {missing}. The folds are stratified by "
            f"the first task ({next(iter(dataset.class_names))!r}); put the task with the rarest classes first, "
            "or train this task in a run of its own (--task)"
        )
    return train_head(
        [bags.bags[slide_id].features for slide_id in train],
        np.array([labelled[slide_id] for slide_id in train]),
        [bags.bags[slide_id].features for slide_id in val],
        np.array([labelled[slide_id] for slide_id in val]),
        num_classes=len(dataset.class_names[task]),
        config=config,
        on_epoch=on_epoch,
    )


def _predict_test(
    dataset: SlideDataset, bags: FeatureBags, task: str, fold: Fold, index: int, trained: TrainedHead
) -> FoldPredictions:
    slides = {slide.slide_id: slide for slide in dataset.labelled(task)}
    test = [slide_id for slide_id in fold.test if slide_id in slides]
    head: GatedABMIL = trained.head
    return FoldPredictions(
        fold=index,
        slide_ids=test,
        case_ids=[slides[slide_id].case_id for slide_id in test],
        labels=np.array([dataset.label_index(slides[slide_id], task) for slide_id in test], dtype=np.int64),
        probabilities=predict_bags(head, [bags.bags[slide_id].features for slide_id in test])
        if test
        else np.zeros((0, len(dataset.class_names[task]))),
        best_epoch=trained.best_epoch,
        epochs_run=len(trained.history),
        history=[asdict(log) for log in trained.history],
    )


def _config_record(run: HeadsRun, dataset: SlideDataset, bags: FeatureBags) -> dict:
    return {
        "dataset_csv": str(run.dataset_csv),
        "dataset_sha256": sha256_of(run.dataset_csv),
        "features_dir": str(run.features_dir),
        "encoder": str(run.encoder),
        "splits_dir": str(run.splits_dir) if run.splits_dir else None,
        "folds": run.folds,
        "tasks": dataset.class_names,
        "ordinal_tasks": sorted(dataset.ordinal_tasks),
        "bootstrap_resamples": run.bootstrap_resamples,
        "heads": asdict(run.config),
        "class_weighting": "loss (inverse class frequency in each training part)",
        "features_layouts": sorted({bag.layout for bag in bags.bags.values()}),
        "xmag_version": __version__,
    }
