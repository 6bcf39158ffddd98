"""What a heads run leaves behind: per-fold and pooled metrics (JSON, markdown), ROC curves, per-slide predictions.

config.json               the run's settings, the dataset's sha256, library versions
metrics.json, metrics.md  per task: each fold's test metrics with 95% bootstrap CIs, mean ± sd over folds,
                          and the pooled held-out predictions (every slide once) with CIs
predictions_<task>.csv    fold, slide_id, case_id, label, predicted, p_<class>... (what `xmag train compare` reads)
roc_<task>.png            ROC curves: each fold and the pooled predictions (one-vs-rest per class beyond two)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xmag.training.statistics import bootstrap_intervals, classification_metrics


@dataclass(frozen=True)
class FoldPredictions:
    """One fold's held-out predictions for one task."""

    fold: int
    slide_ids: list[str]
    case_ids: list[str]
    labels: np.ndarray  # (n,) class indices
    probabilities: np.ndarray  # (n, C)
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)


def summarise_task(
    folds: list[FoldPredictions], class_names: list[str], ordinal: bool, resamples: int, seed: int
) -> dict:
    """Metrics of each fold with bootstrap CIs, their mean and sd over folds, and the pooled predictions' metrics."""
    per_fold = []
    for fold in folds:
        entry: dict = {
            "fold": fold.fold,
            "test_slides": len(fold.slide_ids),
            "best_epoch": fold.best_epoch,
            "epochs_run": fold.epochs_run,
        }
        if fold.slide_ids:
            entry["metrics"] = classification_metrics(fold.labels, fold.probabilities, ordinal=ordinal)
            entry["ci95"] = bootstrap_intervals(
                fold.labels, fold.probabilities, ordinal=ordinal, resamples=resamples, seed=seed
            )
        entry["history"] = fold.history
        per_fold.append(entry)
    graded = [entry["metrics"] for entry in per_fold if "metrics" in entry]
    names = list(graded[0]) if graded else []
    labels = np.concatenate([fold.labels for fold in folds])
    probabilities = np.concatenate([fold.probabilities for fold in folds])
    return {
        "class_names": class_names,
        "ordinal": ordinal,
        "folds": per_fold,
        "mean": {name: _finite_mean([m[name] for m in graded]) for name in names},
        "sd": {name: _finite_sd([m[name] for m in graded]) for name in names} if len(graded) > 1 else {},
        "pooled": {
            "slides": len(labels),
            "metrics": classification_metrics(labels, probabilities, ordinal=ordinal),
            "ci95": bootstrap_intervals(labels, probabilities, ordinal=ordinal, resamples=resamples, seed=seed),
        },
    }


def write_reports(
    directory: Path,
    summary: dict,
    predictions: dict[str, list[FoldPredictions]],
    class_names: dict[str, list[str]],
    config: dict,
) -> list[Path]:
    """Write the run directory's reports (module docstring); returns the files written."""
    written = [_write_json(directory / "config.json", config), _write_json(directory / "metrics.json", summary)]
    markdown = directory / "metrics.md"
    markdown.write_text(metrics_markdown(summary))
    written.append(markdown)
    for task, folds in predictions.items():
        written.append(write_predictions_csv(directory / f"predictions_{task}.csv", folds, class_names[task]))
        written.append(plot_roc(directory / f"roc_{task}.png", folds, class_names[task], task))
    return written


def write_predictions_csv(path: Path, folds: list[FoldPredictions], class_names: list[str]) -> Path:
    """One row per held-out slide: fold, slide_id, case_id, label, predicted, then p_<class> in class order."""
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["fold", "slide_id", "case_id", "label", "predicted", *(f"p_{name}" for name in class_names)])
        for fold in folds:
            for slide_id, case_id, label, row in zip(
                fold.slide_ids, fold.case_ids, fold.labels, fold.probabilities, strict=True
            ):
                predicted = class_names[int(np.argmax(row))]
                out.writerow([fold.fold, slide_id, case_id, class_names[label], predicted, *(f"{p:.6f}" for p in row)])
    return path


def plot_roc(path: Path, folds: list[FoldPredictions], class_names: list[str], task: str) -> Path:
    """ROC curves of each fold (thin) and of the pooled predictions (thick); one-vs-rest per class beyond two."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    positives = [1] if len(class_names) == 2 else list(range(len(class_names)))
    figure, axes = plt.subplots(1, len(positives), figsize=(4.5 * len(positives), 4.5), squeeze=False)
    labels = np.concatenate([fold.labels for fold in folds])
    probabilities = np.concatenate([fold.probabilities for fold in folds])
    for axis, positive in zip(axes[0], positives, strict=True):
        for fold in folds:
            truth = fold.labels == positive
            if truth.any() and not truth.all():
                fpr, tpr, _ = roc_curve(truth, fold.probabilities[:, positive])
                axis.plot(fpr, tpr, linewidth=0.8, alpha=0.6, label=f"fold {fold.fold}")
        truth = labels == positive
        if truth.any() and not truth.all():
            fpr, tpr, _ = roc_curve(truth, probabilities[:, positive])
            auc = roc_auc_score(truth, probabilities[:, positive])
            axis.plot(fpr, tpr, linewidth=2.2, color="black", label=f"pooled (AUC {auc:.3f})")
        axis.plot([0, 1], [0, 1], linestyle=":", color="grey")
        axis.set(
            xlabel="false positive rate",
            ylabel="true positive rate",
            title=f"{task}: {class_names[positive]}" + ("" if len(class_names) == 2 else " vs rest"),
        )
        axis.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def metrics_markdown(summary: dict) -> str:
    """The run's metrics as markdown tables: one row per fold, mean ± sd, pooled, each with its 95% CI."""
    lines = [
        "# Slide heads: held-out metrics",
        "",
        f"{summary['slides']} slides of {summary['patients']} patients; "
        f"{summary['folds']} {'fold' if summary['folds'] == 1 else 'folds'} by patient. "
        f"Encoder {summary['encoder']['name']} (weights sha256 `{summary['encoder']['weights_sha256'][:16]}…`).",
    ]
    if summary.get("features_notice"):
        lines += ["", summary["features_notice"]]
    for task, result in summary["tasks"].items():
        names = list(result["pooled"]["metrics"])
        lines += ["", f"## {task} ({', '.join(result['class_names'])})", ""]
        lines += ["| part | slides | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for fold in result["folds"]:
            if "metrics" in fold:
                cells = [_with_ci(fold["metrics"][n], fold["ci95"][n]) for n in names]
                lines.append(f"| fold {fold['fold']} | {fold['test_slides']} | " + " | ".join(cells) + " |")
        if result["sd"]:
            cells = [f"{result['mean'][n]:.3f} ± {result['sd'][n]:.3f}".replace("nan", "n/a") for n in names]
            lines.append("| mean ± sd | | " + " | ".join(cells) + " |")
        pooled = result["pooled"]
        cells = [_with_ci(pooled["metrics"][n], pooled["ci95"][n]) for n in names]
        lines.append(f"| pooled | {pooled['slides']} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: value [95% bootstrap CI]. Checkpoint: " + summary["checkpoint"]["path"], ""]
    return "\n".join(lines)


def _with_ci(value: float, interval) -> str:
    low, high = interval
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if math.isnan(low) else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _finite_mean(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else math.nan


def _finite_sd(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def _write_json(path: Path, document: dict) -> Path:
    # NaN is not JSON: undefined metrics (one class in a part) are written as null.
    path.write_text(json.dumps(_without_nan(document), indent=2) + "\n")
    return path


def _without_nan(value):
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
