"""`xmag train compare`: two models' held-out predictions on the same slides, compared with paired tests.

Each input is a prediction file of `xmag train heads` (one per task, `predictions_<task>.csv`):

    fold,slide_id,case_id,label,predicted,p_<class 0>,p_<class 1>,...

`label` and `predicted` are class names, the `p_` columns the probabilities in class order (their order in the
header is the class order). Each slide appears once, in the test part of one fold. Because both models scored the
same slides, the comparison is paired: DeLong's test on the ROC AUCs and McNemar's test on which slides only one
model classifies correctly (see `xmag.training.statistics`). Anything that would make the pairing wrong (other
slides, other labels, other classes) is an error naming the files, not a silently smaller comparison.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xmag.training.statistics import (
    DeLongResult,
    McNemarResult,
    classification_metrics,
    delong_test,
    mcnemar_test,
)

REQUIRED_COLUMNS = ("fold", "slide_id", "case_id", "label", "predicted")
PROBABILITY_PREFIX = "p_"
# How far below the row's maximum the probability of the written `predicted` class may be (rounding in the file).
ARGMAX_TOLERANCE = 1e-6
# Slide ids listed in an error message, of however many are wrong.
SHOWN_IDS = 5


@dataclass(frozen=True)
class PredictionTable:
    """One prediction file: per slide (in file order) its ids, label and predicted class (indices), probabilities."""

    path: Path
    slide_ids: list[str]
    case_ids: list[str]
    labels: np.ndarray
    probabilities: np.ndarray
    predicted: np.ndarray
    class_names: list[str]


@dataclass(frozen=True)
class Comparison:
    """Model A against model B on the same slides of one task.

    `delong` holds one paired AUC test per ROC curve: binary, one entry named after the positive class (class 1);
    more classes, one one-vs-rest entry per class, with p-values NOT corrected for multiplicity. `mcnemar` compares
    the argmax predictions, the ones `accuracy` counts.
    """

    task: str
    name_a: str
    name_b: str
    n_slides: int
    class_names: list[str]
    metrics_a: dict[str, float]
    metrics_b: dict[str, float]
    delong: list[tuple[str, DeLongResult]]
    mcnemar: McNemarResult


def _a_few(ids) -> str:
    ordered = sorted(ids)
    shown = ", ".join(ordered[:SHOWN_IDS])
    return shown + (f", ... ({len(ordered) - SHOWN_IDS} more)" if len(ordered) > SHOWN_IDS else "")


def _class_index(name: str, class_names: list[str], path: Path, line: int, column: str) -> int:
    try:
        return class_names.index(name)
    except ValueError:
        raise ValueError(f"{path}, line {line}: {column} {name!r} is not one of the classes {class_names}") from None


def read_predictions(path: Path) -> PredictionTable:
    """Read and check one prediction file; ids stay strings exactly as written (zero-padded ids survive)."""
    path = Path(path)
    with path.open(newline="") as file:
        rows = list(csv.reader(file))
    if not rows:
        raise ValueError(f"{path} is empty: expected a header {','.join(REQUIRED_COLUMNS)},p_<class>,...")
    header = rows[0]
    numbered = [(line, row) for line, row in enumerate(rows[1:], start=2) if row]  # blank lines are not slides
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)}; its header is {','.join(header)}")
    probability_columns = [index for index, column in enumerate(header) if column.startswith(PROBABILITY_PREFIX)]
    class_names = [header[index][len(PROBABILITY_PREFIX) :] for index in probability_columns]
    if len(class_names) < 2:
        raise ValueError(f"{path} needs a p_<class> column per class (at least two), found {len(class_names)}")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"{path} repeats a class among its p_ columns: {class_names}")
    if not numbered:
        raise ValueError(f"{path} holds a header but no predictions")
    column = {name: header.index(name) for name in REQUIRED_COLUMNS}
    labels, predicted, probabilities = [], [], []
    for line, row in numbered:
        if len(row) != len(header):
            raise ValueError(f"{path}, line {line}: {len(row)} fields, the header has {len(header)}")
        labels.append(_class_index(row[column["label"]], class_names, path, line, "label"))
        predicted.append(_class_index(row[column["predicted"]], class_names, path, line, "predicted"))
        try:
            probabilities.append([float(row[index]) for index in probability_columns])
        except ValueError as error:
            raise ValueError(f"{path}, line {line}: a probability is not a number ({error})") from None
    probability_array = np.asarray(probabilities)
    if not np.all(np.isfinite(probability_array)):
        bad_line = numbered[int(np.flatnonzero(~np.isfinite(probability_array).all(axis=1))[0])][0]
        raise ValueError(f"{path}, line {bad_line}: probabilities must be finite numbers (found NaN or inf)")
    slide_ids = [row[column["slide_id"]] for _, row in numbered]
    repeated = [slide for slide, count in Counter(slide_ids).items() if count > 1]
    if repeated:
        raise ValueError(f"{path} lists {len(repeated)} slide(s) more than once: {_a_few(repeated)}")
    predicted_array = np.asarray(predicted)
    # The written prediction must be a most probable class; otherwise the file's columns do not belong together.
    chosen = probability_array[np.arange(len(numbered)), predicted_array]
    disagreeing = np.flatnonzero(chosen < probability_array.max(axis=1) - ARGMAX_TOLERANCE)
    if disagreeing.size:
        raise ValueError(
            f"{path}: the predicted class is not the most probable one on {disagreeing.size} slide(s): "
            f"{_a_few(slide_ids[index] for index in disagreeing)}"
        )
    return PredictionTable(
        path=path,
        slide_ids=slide_ids,
        case_ids=[row[column["case_id"]] for _, row in numbered],
        labels=np.asarray(labels),
        probabilities=probability_array,
        predicted=predicted_array,
        class_names=class_names,
    )


def _task_of(path: Path) -> str:
    return path.stem.removeprefix("predictions_")


def _aligned(table_a: PredictionTable, table_b: PredictionTable) -> np.ndarray:
    """Row of B for each row of A, after checking that both hold the same slides with the same labels."""
    slides_a, slides_b = set(table_a.slide_ids), set(table_b.slide_ids)
    if slides_a != slides_b:
        only_a, only_b = slides_a - slides_b, slides_b - slides_a
        raise ValueError(
            f"{table_a.path} and {table_b.path} do not hold the same slides: "
            f"{len(only_a)} only in {table_a.path}" + (f" ({_a_few(only_a)})" if only_a else "") + ", "
            f"{len(only_b)} only in {table_b.path}" + (f" ({_a_few(only_b)})" if only_b else "")
        )
    row_of_b = {slide: row for row, slide in enumerate(table_b.slide_ids)}
    order = np.asarray([row_of_b[slide] for slide in table_a.slide_ids])
    differing = np.flatnonzero(table_a.labels != table_b.labels[order])
    if differing.size:
        raise ValueError(
            f"{table_a.path} and {table_b.path} label {differing.size} slide(s) differently: "
            f"{_a_few(table_a.slide_ids[row] for row in differing)}"
        )
    return order


def compare_predictions(path_a: Path, path_b: Path, ordinal: bool = False) -> Comparison:
    """Compare model A's and model B's prediction files for one task (ordinal: also quadratic-weighted kappa)."""
    path_a, path_b = Path(path_a), Path(path_b)
    table_a, table_b = read_predictions(path_a), read_predictions(path_b)
    if table_a.class_names != table_b.class_names:
        raise ValueError(
            f"{path_a} and {path_b} have different classes (names or order of the p_ columns): "
            f"{table_a.class_names} and {table_b.class_names}"
        )
    order = _aligned(table_a, table_b)
    labels, probabilities_a, probabilities_b = table_a.labels, table_a.probabilities, table_b.probabilities[order]
    class_names = table_a.class_names
    # Binary: the one ROC curve is class 1's. More classes: one one-vs-rest curve per class.
    curves = [1] if len(class_names) == 2 else list(range(len(class_names)))
    delong = []
    for index in curves:
        try:
            result = delong_test(labels == index, probabilities_a[:, index], probabilities_b[:, index])
        except ValueError as error:
            raise ValueError(f"{path_a} vs {path_b}, class {class_names[index]!r}: {error}") from None
        delong.append((class_names[index], result))
    task_a, task_b = _task_of(path_a), _task_of(path_b)
    return Comparison(
        task=task_a if task_a == task_b else f"{task_a} / {task_b}",
        name_a=str(path_a),
        name_b=str(path_b),
        n_slides=len(labels),
        class_names=class_names,
        metrics_a=classification_metrics(labels, probabilities_a, ordinal),
        metrics_b=classification_metrics(labels, probabilities_b, ordinal),
        delong=delong,
        mcnemar=mcnemar_test(labels, probabilities_a.argmax(axis=1), probabilities_b.argmax(axis=1)),
    )


def _number(value: float, digits: int = 4) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _p(value: float) -> str:
    return "< 0.0001" if value < 1e-4 else f"{value:.4f}"


def comparison_markdown(comparison: Comparison) -> str:
    """The comparison as a Markdown report: the metrics side by side, then DeLong's and McNemar's tests."""
    lines = [
        f"# Comparison: {comparison.task}",
        "",
        f"- A: `{comparison.name_a}`",
        f"- B: `{comparison.name_b}`",
        f"- {comparison.n_slides} slides, classes: {', '.join(comparison.class_names)}",
        "",
        "| metric | A | B | A − B |",
        "|---|---|---|---|",
    ]
    for name, value_a in comparison.metrics_a.items():
        value_b = comparison.metrics_b[name]
        lines.append(f"| {name} | {_number(value_a)} | {_number(value_b)} | {_number(value_a - value_b)} |")
    one_vs_rest = len(comparison.class_names) > 2
    lines += [
        "",
        "## DeLong's test (paired ROC AUC)",
        "",
        "One-vs-rest per class; the p-values are not corrected for multiplicity."
        if one_vs_rest
        else f"ROC curve of {comparison.delong[0][0]!r} (positive class).",
        "",
        "| class | AUC A | AUC B | A − B | SE | z | p (two-sided) |",
        "|---|---|---|---|---|---|---|",
    ]
    for class_name, result in comparison.delong:
        lines.append(
            f"| {class_name} | {_number(result.auc_a)} | {_number(result.auc_b)} | {_number(result.difference)} "
            f"| {_number(result.standard_error)} | {result.z:.3f} | {_p(result.p_value)} |"
        )
    mcnemar = comparison.mcnemar
    method = "exact binomial" if mcnemar.exact else "chi-square, continuity-corrected"
    lines += [
        "",
        "## McNemar's test (paired accuracy)",
        "",
        f"Only A correct: {mcnemar.only_a_correct} slides; only B correct: {mcnemar.only_b_correct} slides; "
        f"{method}: statistic {mcnemar.statistic:.3f}, p = {_p(mcnemar.p_value)} (two-sided).",
    ]
    return "\n".join(lines) + "\n"


def _finite_or_none(value):
    # JSON has no NaN or infinity; undefined values (NaN AUC, infinite z) are written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def comparison_json(comparison: Comparison) -> dict:
    """The comparison as a JSON-ready dict; undefined (NaN) or infinite values are None."""

    def clean(mapping: dict) -> dict:
        return {key: _finite_or_none(value) for key, value in mapping.items()}

    return {
        "task": comparison.task,
        "a": comparison.name_a,
        "b": comparison.name_b,
        "n_slides": comparison.n_slides,
        "class_names": comparison.class_names,
        "metrics_a": clean(comparison.metrics_a),
        "metrics_b": clean(comparison.metrics_b),
        "delong": [{"class": name, **clean(asdict(result))} for name, result in comparison.delong],
        "delong_corrected_for_multiplicity": False,
        "mcnemar": clean(asdict(comparison.mcnemar)),
    }
