"""The slide classifiers' statistics: DeLong against pROC's published results, McNemar and metrics by hand."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from _reference import reference_path
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from xmag.training.statistics import (
    bootstrap_intervals,
    classification_metrics,
    delong_auc_variance,
    delong_test,
    mcnemar_test,
)


@pytest.fixture(scope="module")
def asah():
    """pROC's aSAH data (tests/reference/asah.csv): outcome Poor as 1, and the three predictors."""
    with reference_path("asah.csv").open() as file:
        rows = list(csv.DictReader(line for line in file if not line.startswith("#")))
    assert len(rows) == 113
    columns = {name: np.array([float(row[name]) for row in rows]) for name in ("wfns", "s100b", "ndka")}
    return np.array([row["outcome"] == "Poor" for row in rows], dtype=int), columns


# pROC's tests/testthat/test-roc.test.R: roc.test(roc1, roc2) with DeLong's method, Z = AUC1 - AUC2 over its SE.
PROC_DELONG = [
    ("wfns", "s100b", 2.20898359144091, 0.0271757822291882),
    ("wfns", "ndka", 2.79777591868904, 0.00514557970691098),
    ("ndka", "s100b", -1.39077002573558, 0.164295175223054),
    ("s100b", "wfns", -2.20898359144091, 0.0271757822291882),  # reversed: the sign flips, p does not
]


@pytest.mark.parametrize(("first", "second", "z", "p_value"), PROC_DELONG)
def test_delong_matches_proc(asah, first, second, z, p_value):
    outcome, predictors = asah
    result = delong_test(outcome, predictors[first], predictors[second])
    assert result.z == pytest.approx(z, abs=1e-6)
    assert result.p_value == pytest.approx(p_value, abs=1e-8)
    assert result.difference == pytest.approx(result.auc_a - result.auc_b)
    assert result.difference / result.standard_error == pytest.approx(result.z)


def test_delong_aucs_are_procs(asah):
    outcome, predictors = asah
    result = delong_test(outcome, predictors["s100b"], predictors["wfns"])
    # pROC prints these AUCs for roc.test(aSAH$outcome, aSAH$s100b, aSAH$wfns).
    assert (round(result.auc_a, 4), round(result.auc_b, 4)) == (0.7314, 0.8237)


def _brute_force_auc_variance(labels, scores):
    """DeLong's variance from the explicit m x n comparison matrix (psi = 1, 1/2, 0), as in the 1988 paper."""
    positives, negatives = scores[labels == 1], scores[labels == 0]
    psi = (positives[:, None] > negatives[None, :]) + 0.5 * (positives[:, None] == negatives[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return psi.mean(), v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size


def test_delong_auc_and_variance(asah):
    outcome, predictors = asah
    rng = np.random.default_rng(3)
    tied_labels = rng.integers(0, 2, 60)
    tied_scores = rng.integers(0, 4, 60).astype(float) + tied_labels  # few distinct values: many ties
    cases = [(outcome, predictors[name]) for name in predictors] + [(tied_labels, tied_scores)]
    for labels, scores in cases:
        auc, variance = delong_auc_variance(labels, scores)
        assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert (auc, variance) == pytest.approx(_brute_force_auc_variance(labels, scores), abs=1e-12)


def test_delong_identical_scores_give_z_zero_and_p_one(asah):
    outcome, predictors = asah
    result = delong_test(outcome, predictors["ndka"], predictors["ndka"].copy())
    assert (result.difference, result.standard_error, result.z, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_delong_difference_without_variance_is_infinitely_significant():
    labels = np.array([0, 0, 0, 1, 1, 1])
    separating, constant = labels.astype(float), np.zeros(6)
    result = delong_test(labels, separating, constant)
    assert (result.auc_a, result.auc_b, result.standard_error) == (1.0, 0.5, 0.0)
    assert (result.z, result.p_value) == (math.inf, 0.0)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1, 2, 1], [0.1, 0.2, 0.3, 0.4], "binary labels"),
        ([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4], "at least two positive and two negative"),
        ([0, 0, 1, 1], [0.1, 0.2, 0.3], "one score per case"),
        ([0, 0, 1, 1], [0.1, np.nan, 0.3, 0.4], "finite"),
        ([], [], "empty"),
        ([0.0, 0.5, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4], "integer"),
    ],
)
def test_delong_rejects_bad_input(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        delong_test(np.array(labels), np.array(scores), np.array(scores))
    with pytest.raises(ValueError, match=message):
        delong_auc_variance(np.array(labels), np.array(scores))


def _predictions_with(only_a: int, only_b: int, both: int = 7, neither: int = 3):
    """Labels and two classifiers' predictions with the given counts of each correctness pattern."""
    labels = np.zeros(only_a + only_b + both + neither, dtype=int)
    a_correct = np.array([True] * only_a + [False] * only_b + [True] * both + [False] * neither)
    b_correct = np.array([False] * only_a + [True] * only_b + [True] * both + [False] * neither)
    return labels, np.where(a_correct, 0, 1), np.where(b_correct, 0, 2)


def test_mcnemar_exact_by_hand():
    result = mcnemar_test(*_predictions_with(only_a=10, only_b=2))
    # Two-sided binomial, n = 12, p = 1/2: 2 P(X <= 2) = 2 (1 + 12 + 66) / 2^12.
    assert (result.only_a_correct, result.only_b_correct, result.exact) == (10, 2, True)
    assert result.p_value == pytest.approx(2 * (1 + 12 + 66) / 4096, rel=1e-12)


def test_mcnemar_chi_square_by_hand():
    result = mcnemar_test(*_predictions_with(only_a=30, only_b=12))
    statistic = (abs(30 - 12) - 1) ** 2 / (30 + 12)
    assert (result.exact, result.statistic) == (False, pytest.approx(statistic))
    # Chi-square on one degree of freedom: P(X > s) = erfc(sqrt(s / 2)).
    assert result.p_value == pytest.approx(math.erfc(math.sqrt(statistic / 2)), rel=1e-9)


def test_mcnemar_edge_cases():
    assert mcnemar_test(*_predictions_with(0, 0)).p_value == 1.0
    assert mcnemar_test(*_predictions_with(20, 20)).p_value == 1.0  # chi-square branch, b = c
    assert mcnemar_test(*_predictions_with(13, 11)).exact  # 24 discordant: still exact
    assert not mcnemar_test(*_predictions_with(13, 12)).exact
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar_test([0, 1, 1], [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="empty"):
        mcnemar_test([], [], [])


def _binary_example(slides: int, seed: int = 0):
    """A realistic binary problem: class 1's probability is a noisy logistic function of the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, slides)
    positive = 1 / (1 + np.exp(-(1.5 * (2 * labels - 1) + rng.normal(0, 1.5, slides))))
    return labels, np.column_stack([1 - positive, positive])


def test_classification_metrics_binary_by_hand():
    labels = np.array([0, 0, 1, 1])
    positive = np.array([0.1, 0.6, 0.4, 0.9])
    result = classification_metrics(labels, np.column_stack([1 - positive, positive]))
    # 3 of the 4 positive-negative pairs are ordered correctly; predictions 0, 1, 0, 1.
    assert result == pytest.approx(
        {"auc": 0.75, "accuracy": 0.5, "balanced_accuracy": 0.5, "f1": 0.5, "weighted_f1": 0.5}
    )


def test_classification_metrics_multiclass_is_one_vs_rest_macro():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 300)
    logits = rng.normal(0, 1, (300, 4)) + 1.2 * np.eye(4)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    result = classification_metrics(labels, probabilities, ordinal=True)
    one_vs_rest = [roc_auc_score(labels == k, probabilities[:, k]) for k in range(4)]
    assert result["auc"] == pytest.approx(np.mean(one_vs_rest))
    predicted = probabilities.argmax(axis=1)
    assert result["accuracy"] == pytest.approx(np.mean(predicted == labels))
    recalls = [np.mean(predicted[labels == k] == k) for k in range(4)]
    assert result["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert result["quadratic_kappa"] == pytest.approx(cohen_kappa_score(labels, predicted, weights="quadratic"))


def test_quadratic_kappa_by_hand():
    # Two grades off by one on 2 of 4 slides, 3 classes: 1 - sum(w O) / sum(w E) with w = (i - j)^2 / 4.
    labels, predicted = np.array([0, 1, 2, 2]), np.array([0, 2, 1, 2])
    result = classification_metrics(labels, np.eye(3)[predicted], ordinal=True)
    observed = np.zeros((3, 3))
    np.add.at(observed, (labels, predicted), 1)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / 4
    weights = (np.subtract.outer(np.arange(3), np.arange(3)) ** 2) / 4
    assert result["quadratic_kappa"] == pytest.approx(1 - (weights * observed).sum() / (weights * expected).sum())
    assert "quadratic_kappa" not in classification_metrics(labels, np.eye(3)[predicted])


def test_auc_of_a_single_class_is_nan():
    labels, probabilities = np.zeros(5, dtype=int), np.full((5, 2), 0.5)
    assert math.isnan(classification_metrics(labels, probabilities)["auc"])
    three_classes = np.full((4, 3), 1 / 3)
    assert math.isnan(classification_metrics(np.array([0, 1, 1, 0]), three_classes)["auc"])  # class 2 absent


@pytest.mark.parametrize(
    ("labels", "probabilities", "message"),
    [
        ([0, 1, 1], [[0.5, 0.5], [0.5, 0.5]], "3 labels but 2 rows"),
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], r"class indices in 0\.\.1"),
        ([0, -1], [[0.5, 0.5], [0.5, 0.5]], r"class indices in 0\.\.1"),
        ([0, 1], [0.5, 0.5], r"\(n, C\)"),
        ([0, 1], [[1.0], [1.0]], r"\(n, C\)"),
        ([0, 1], [[0.5, 0.6], [0.5, 0.5]], "sum to 1"),
        ([0, 1], [[np.nan, 0.5], [0.5, 0.5]], "finite"),
        ([0.0, 0.5], [[0.5, 0.5], [0.5, 0.5]], "integer"),
        (["a", "b"], [[0.5, 0.5], [0.5, 0.5]], "integer"),
        ([], np.zeros((0, 2)), "empty"),
    ],
)
def test_classification_metrics_rejects_bad_input(labels, probabilities, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(np.array(labels), np.array(probabilities))


def test_bootstrap_intervals_contain_the_estimate_and_are_deterministic():
    labels, probabilities = _binary_example(300)
    point = classification_metrics(labels, probabilities)
    intervals = bootstrap_intervals(labels, probabilities, seed=5)
    assert set(intervals) == set(point)
    for name, (low, high) in intervals.items():
        assert low < point[name] < high, name
    assert bootstrap_intervals(labels, probabilities, seed=5) == intervals
    assert bootstrap_intervals(labels, probabilities, seed=6) != intervals


def _agreement_cases():
    rng = np.random.default_rng(11)
    labels, probabilities = _binary_example(30)
    three = rng.dirichlet(np.ones(3), 25)
    yield "binary", labels, probabilities, False
    yield "binary with ties", labels, np.round(probabilities, 1), True
    yield "three grades", rng.integers(0, 3, 25), three, True
    yield "three grades, one rare", np.array([0] * 12 + [1] * 12 + [2]), three, True
    yield "one class only", np.ones(25, dtype=int), three, True
    yield "one class predicted", rng.integers(0, 3, 25), np.tile([0.2, 0.7, 0.1], (25, 1)), True
    yield "perfect", np.arange(25) % 3, np.eye(3)[np.arange(25) % 3], True


@pytest.mark.parametrize(("case", "labels", "probabilities", "ordinal"), list(_agreement_cases()))
def test_bootstrap_resamples_are_scored_as_classification_metrics(case, labels, probabilities, ordinal):
    # One resample per seed: its interval is (v, v) with v the resample's metric, or (nan, nan) where undefined.
    for seed in range(15):
        rows = np.random.default_rng(seed).integers(0, labels.size, size=labels.size)
        expected = classification_metrics(labels[rows], probabilities[rows], ordinal=ordinal)
        intervals = bootstrap_intervals(labels, probabilities, ordinal=ordinal, resamples=1, seed=seed)
        assert set(intervals) == set(expected), case
        for name, value in expected.items():
            assert intervals[name] == pytest.approx((value, value), abs=1e-12, nan_ok=True), (case, seed, name)


def test_bootstrap_intervals_narrow_with_more_slides():
    def auc_width(slides: int) -> float:
        low, high = bootstrap_intervals(*_binary_example(slides, seed=slides), resamples=500)["auc"]
        return high - low

    assert auc_width(1600) < 0.6 * auc_width(100)  # the width shrinks like 1 / sqrt(n): a quarter here


def test_bootstrap_leaves_out_undefined_resamples():
    # One positive slide among 40: about (39/40)^40 = 36% of resamples lack it and have no AUC, the rest do.
    labels = np.zeros(40, dtype=int)
    labels[0] = 1
    probabilities = np.full((40, 2), 0.5)
    intervals = bootstrap_intervals(labels, probabilities, resamples=300)
    assert not math.isnan(intervals["auc"][0])
    assert all(math.isnan(bound) for bound in bootstrap_intervals(labels[1:], probabilities[1:], resamples=20)["auc"])


def test_bootstrap_rejects_bad_settings():
    labels, probabilities = _binary_example(20)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_intervals(labels, probabilities, resamples=0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals(labels, probabilities, level=95)
    with pytest.raises(ValueError, match="labels but"):
        bootstrap_intervals(labels[:-1], probabilities)
