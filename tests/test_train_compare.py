"""`xmag train compare`: two prediction files on the same slides, checked, aligned and compared."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from xmag.training.compare import compare_predictions, comparison_json, comparison_markdown, read_predictions
from xmag.training.statistics import classification_metrics, delong_test, mcnemar_test

CLASSES = ["benign", "tumour"]


def write_predictions(path, slide_ids, labels, probabilities, class_names=CLASSES, header=None):
    """A prediction file as `xmag train heads` writes it (label and predicted as class names)."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            header or ["fold", "slide_id", "case_id", "label", "predicted", *(f"p_{c}" for c in class_names)]
        )
        for index, (slide_id, label, row) in enumerate(zip(slide_ids, labels, probabilities, strict=True)):
            predicted = class_names[int(np.argmax(row))]
            writer.writerow([index % 5, slide_id, f"case-{slide_id}", class_names[label], predicted, *row])
    return path


def _two_models(slides: int = 80, classes: int = 2, seed: int = 0):
    """Labels and two models' probabilities, B more accurate than A, on zero-padded slide ids."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, slides)
    labels[:classes] = np.arange(classes)  # every class present

    def model(signal: float) -> np.ndarray:
        logits = rng.normal(0, 1, (slides, classes)) + signal * np.eye(classes)[labels]
        return np.round(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), 6)

    return [f"{index:03d}" for index in range(slides)], labels, model(0.8), model(2.0)


@pytest.fixture
def binary_files(tmp_path):
    slide_ids, labels, probabilities_a, probabilities_b = _two_models()
    folder_a, folder_b = tmp_path / "model_a", tmp_path / "model_b"
    folder_a.mkdir()
    folder_b.mkdir()
    path_a = write_predictions(folder_a / "predictions_tumour.csv", slide_ids, labels, probabilities_a)
    # B lists the slides in another order: the comparison pairs them by id, not by row.
    reverse = slice(None, None, -1)
    path_b = write_predictions(
        folder_b / "predictions_tumour.csv", slide_ids[reverse], labels[reverse], probabilities_b[reverse]
    )
    return path_a, path_b, labels, probabilities_a, probabilities_b


def test_read_predictions_keeps_ids_as_written(binary_files):
    path_a, _, labels, probabilities_a, _ = binary_files
    table = read_predictions(path_a)
    assert table.slide_ids[:3] == ["000", "001", "002"]
    assert table.case_ids[7] == "case-007"
    assert table.class_names == CLASSES
    np.testing.assert_array_equal(table.labels, labels)
    np.testing.assert_array_equal(table.predicted, probabilities_a.argmax(axis=1))
    np.testing.assert_allclose(table.probabilities, probabilities_a)


def test_compare_binary_equals_the_statistics(binary_files):
    path_a, path_b, labels, probabilities_a, probabilities_b = binary_files
    comparison = compare_predictions(path_a, path_b)
    assert (comparison.task, comparison.n_slides, comparison.class_names) == ("tumour", 80, CLASSES)
    assert comparison.metrics_a == pytest.approx(classification_metrics(labels, probabilities_a))
    assert comparison.metrics_b == pytest.approx(classification_metrics(labels, probabilities_b))
    [(curve, delong)] = comparison.delong
    assert curve == "tumour"
    assert delong == delong_test(labels, probabilities_a[:, 1], probabilities_b[:, 1])
    assert delong.auc_b > delong.auc_a
    predicted_a, predicted_b = probabilities_a.argmax(axis=1), probabilities_b.argmax(axis=1)
    assert comparison.mcnemar == mcnemar_test(labels, predicted_a, predicted_b)
    assert comparison.mcnemar.only_a_correct == np.sum((predicted_a == labels) & (predicted_b != labels))

    report = comparison_markdown(comparison)
    assert "# Comparison: tumour" in report
    assert f"| auc | {comparison.metrics_a['auc']:.4f} | {comparison.metrics_b['auc']:.4f} |" in report
    assert f"{delong.z:.3f}" in report
    as_json = comparison_json(comparison)
    assert json.loads(json.dumps(as_json, allow_nan=False)) == as_json
    assert as_json["delong"][0]["z"] == pytest.approx(delong.z)


def test_compare_multiclass_tests_each_class_one_vs_rest(tmp_path):
    slide_ids, labels, probabilities_a, probabilities_b = _two_models(slides=90, classes=3, seed=2)
    names = ["grade1", "grade2", "grade3"]
    path_a = write_predictions(tmp_path / "a.csv", slide_ids, labels, probabilities_a, names)
    path_b = write_predictions(tmp_path / "b.csv", slide_ids, labels, probabilities_b, names)
    comparison = compare_predictions(path_a, path_b, ordinal=True)
    assert [name for name, _ in comparison.delong] == names
    for index, (_, result) in enumerate(comparison.delong):
        assert result == delong_test(labels == index, probabilities_a[:, index], probabilities_b[:, index])
    assert "quadratic_kappa" in comparison.metrics_a
    assert "not corrected for multiplicity" in comparison_markdown(comparison)


def test_undefined_values_are_null_in_json(binary_files):
    comparison = compare_predictions(*binary_files[:2])
    undefined = replace(
        comparison,
        metrics_a={**comparison.metrics_a, "auc": math.nan},
        delong=[("tumour", replace(comparison.delong[0][1], standard_error=0.0, z=math.inf, p_value=0.0))],
    )
    as_json = comparison_json(undefined)
    assert (as_json["metrics_a"]["auc"], as_json["delong"][0]["z"], as_json["delong"][0]["p_value"]) == (
        None,
        None,
        0.0,
    )
    json.dumps(as_json, allow_nan=False)
    assert "| auc | n/a |" in comparison_markdown(undefined)


def test_a_class_without_two_slides_is_a_named_error(tmp_path):
    slide_ids, labels, probabilities, _ = _two_models(slides=12, classes=3)
    labels[:] = [0, 1] * 6  # class 2 never occurs: its one-vs-rest DeLong test is impossible
    path = write_predictions(tmp_path / "a.csv", slide_ids, labels, probabilities, ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"class 'z'.*at least two positive"):
        compare_predictions(path, path)


def test_different_slides_are_named(binary_files, tmp_path):
    path_a, _, labels, probabilities_a, _ = binary_files
    slide_ids = [f"{index:03d}" for index in range(80)]
    slide_ids[5], slide_ids[6] = "900", "901"
    path_b = write_predictions(tmp_path / "other.csv", slide_ids, labels, probabilities_a)
    with pytest.raises(
        ValueError, match=r"not hold the same slides: 2 only in .*\(005, 006\), 2 only in .*\(900, 901\)"
    ):
        compare_predictions(path_a, path_b)


def test_different_labels_are_named(binary_files, tmp_path):
    path_a, _, labels, probabilities_a, _ = binary_files
    relabelled = labels.copy()
    relabelled[7] = 1 - relabelled[7]
    path_b = write_predictions(tmp_path / "b.csv", [f"{i:03d}" for i in range(80)], relabelled, probabilities_a)
    with pytest.raises(ValueError, match=r"label 1 slide.*: 007"):
        compare_predictions(path_a, path_b)


def test_different_classes_are_an_error(binary_files, tmp_path):
    path_a, _, labels, probabilities_a, _ = binary_files
    path_b = write_predictions(tmp_path / "b.csv", [f"{i:03d}" for i in range(80)], labels, probabilities_a, ["a", "b"])
    with pytest.raises(ValueError, match="different classes"):
        compare_predictions(path_a, path_b)


def _written(tmp_path, text: str):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


HEADER = "fold,slide_id,case_id,label,predicted,p_benign,p_tumour\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        (HEADER, "no predictions"),
        ("fold,slide_id,label,predicted,p_benign,p_tumour\n0,001,benign,benign,0.9,0.1\n", "lacks the column.*case_id"),
        ("fold,slide_id,case_id,label,predicted\n0,001,c,benign,benign\n", "p_<class> column"),
        (HEADER + "0,001,c,benign,benign,0.9,0.1\n1,001,c,benign,benign,0.8,0.2\n", "more than once: 001"),
        (HEADER + "0,001,c,benign,benign,0.9,0.1\n0,002,c,benign,benign,nan,0.1\n", "line 3.*NaN"),
        (HEADER + "0,001,c,benign,benign,0.9,x\n", "line 2.*not a number"),
        (HEADER + "0,001,c,normal,benign,0.9,0.1\n", "label 'normal' is not one of"),
        (HEADER + "0,001,c,benign,tumour,0.9,0.1\n", "not the most probable.*001"),
        (HEADER + "0,001,c,benign,benign,0.9\n", "line 2: 6 fields"),
    ],
)
def test_bad_files_are_named_errors(tmp_path, text, message):
    path = _written(tmp_path, text)
    with pytest.raises(ValueError, match=message) as caught:
        read_predictions(path)
    assert str(path) in str(caught.value)


def _xmag(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xmag.cli", *arguments], capture_output=True, text=True, timeout=300)


def test_command_prints_and_writes_the_report(binary_files, tmp_path):
    path_a, path_b, *_ = binary_files
    out = tmp_path / "report"
    finished = _xmag("train", "compare", str(path_a), str(path_b), "--out", str(out))
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith("# Comparison: tumour")
    assert "DeLong" in finished.stdout and "McNemar" in finished.stdout
    assert (out / "comparison.md").read_text() == finished.stdout
    written = json.loads((out / "comparison.json").read_text())
    assert written == comparison_json(compare_predictions(path_a, path_b))


def test_command_reports_a_missing_file_with_status_2(binary_files, tmp_path):
    path_a, *_ = binary_files
    missing = tmp_path / "no_such_predictions.csv"
    finished = _xmag("train", "compare", str(path_a), str(missing))
    assert finished.returncode == 2
    assert finished.stderr.startswith("error:") and "no_such_predictions.csv" in finished.stderr
    assert "Traceback" not in finished.stderr
