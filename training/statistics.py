"""The paper's statistics for slide classifiers: metrics, bootstrap intervals, DeLong's and McNemar's paired tests.

The metrics are scikit-learn's; what is ours is small and explained here:

- `bootstrap_intervals`: percentile intervals from resampling slides with replacement (each resample's metrics
  computed from confusion counts and midranks, the same definitions without scikit-learn's per-call cost);
- `delong_test`: DeLong, DeLong & Clarke-Pearson (1988), the nonparametric test for two correlated ROC AUCs measured
  on the same cases, written in numpy after Sun & Xu (2014): midranks give every case's placement value (its
  structural component), whose covariance across cases gives the variance of each AUC and of their difference;
- `mcnemar_test`: McNemar's test on which cases only one of two classifiers gets right.

Every function checks its input and raises ValueError saying what is wrong, rather than failing deep inside numpy
or returning a number computed from misaligned arrays.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import sklearn
from scipy import stats
from sklearn import metrics
from sklearn.exceptions import UndefinedMetricWarning

# Probabilities read back from CSV are rounded; rows this close to 1 are renormalised, others are rejected.
ROW_SUM_TOLERANCE = 1e-3
# Below this many discordant cases McNemar's chi-square approximation is poor; the exact binomial test is used.
MCNEMAR_EXACT_BELOW = 25


def _integer_vector(values, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    if array.dtype.kind not in "biuf" or not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
        raise ValueError(f"{what} must be integer class indices, got {array.dtype} values such as {array[:3]}")
    return array.astype(np.int64)


def _checked_labels_and_probabilities(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int64 in 0..C-1 and probabilities as an (n, C) float array whose rows sum to exactly 1."""
    label_array = _integer_vector(labels, "labels")
    probability_array = np.asarray(probabilities, dtype=np.float64)
    if probability_array.ndim != 2 or probability_array.shape[1] < 2:
        raise ValueError(
            f"probabilities must be an (n, C) array with C >= 2 classes, got shape {probability_array.shape}"
        )
    if probability_array.shape[0] != label_array.size:
        raise ValueError(f"{label_array.size} labels but {probability_array.shape[0]} rows of probabilities")
    class_count = probability_array.shape[1]
    if label_array.min() < 0 or label_array.max() >= class_count:
        raise ValueError(
            f"labels must be class indices in 0..{class_count - 1} (the probabilities' columns), "
            f"got values from {label_array.min()} to {label_array.max()}"
        )
    if not np.all(np.isfinite(probability_array)) or np.any(probability_array < 0):
        raise ValueError("probabilities must be finite and non-negative")
    row_sums = probability_array.sum(axis=1)
    worst = int(np.argmax(np.abs(row_sums - 1)))
    if abs(row_sums[worst] - 1) > ROW_SUM_TOLERANCE:
        raise ValueError(f"probabilities must sum to 1 in every row; row {worst} sums to {row_sums[worst]:.6f}")
    return label_array, probability_array / row_sums[:, None]


def _auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    class_count = probabilities.shape[1]
    # Binary: undefined with one class. Macro one-vs-rest: undefined when any class has no case to rank.
    if np.unique(labels).size < (2 if class_count == 2 else class_count):
        return math.nan
    if class_count == 2:
        return float(metrics.roc_auc_score(labels, probabilities[:, 1]))
    return float(metrics.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, ordinal: bool = False) -> dict[str, float]:
    """The slide-level metrics of one classifier; the prediction is the argmax of the probabilities.

    labels: (n,) class indices 0..C-1; probabilities: (n, C), rows summing to 1 (rows within 1e-3 of 1, as
    read back from a CSV file, are renormalised). Keys:

    - "auc": binary, ROC AUC of class 1's probability; C > 2, one-vs-rest macro AUC. NaN, not an exception,
      when it is undefined: the labels hold only one class (C > 2: when any class has no case);
    - "accuracy"; "balanced_accuracy" (mean recall over the classes present in the labels);
    - "f1": binary, F1 of class 1; C > 2, macro F1 over the classes present in labels or predictions;
    - "weighted_f1": F1 per class weighted by its number of cases;
    - with ordinal=True, "quadratic_kappa": Cohen's kappa with quadratic weights on the class indices.

    F1 and kappa are NaN where they are undefined (no case of class 1 labelled or predicted; no disagreement
    possible).
    """
    label_array, probability_array = _checked_labels_and_probabilities(labels, probabilities)
    class_count = probability_array.shape[1]
    predicted = probability_array.argmax(axis=1)
    # The input is checked above, so scikit-learn's own argument checks (a third of the time) are skipped.
    with warnings.catch_warnings(), sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        # Undefined values come back as NaN, which says so; the warnings would only repeat it.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found in 'y_true' and 'y_pred'")
        result = {
            "auc": _auc(label_array, probability_array),
            "accuracy": float(metrics.accuracy_score(label_array, predicted)),
            "balanced_accuracy": float(metrics.balanced_accuracy_score(label_array, predicted)),
            "f1": float(
                metrics.f1_score(
                    label_array, predicted, average="binary" if class_count == 2 else "macro", zero_division=np.nan
                )
            ),
            "weighted_f1": float(metrics.f1_score(label_array, predicted, average="weighted", zero_division=np.nan)),
        }
        if ordinal:
            # All C labels are passed so that the quadratic weights use class-index distances even if a class is absent.
            result["quadratic_kappa"] = float(
                metrics.cohen_kappa_score(label_array, predicted, labels=list(range(class_count)), weights="quadratic")
            )
    return result


def _rank_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: from the positives' midranks among all cases (ties count 1/2)."""
    positive_count = int(positive.sum())
    negative_count = positive.size - positive_count
    rank_sum = stats.rankdata(scores)[positive].sum()
    return float((rank_sum - positive_count * (positive_count + 1) / 2) / (positive_count * negative_count))


def _resample_metrics(labels: np.ndarray, probabilities: np.ndarray, ordinal: bool) -> dict[str, float]:
    """`classification_metrics` of checked input, from confusion counts and midranks rather than scikit-learn.

    The bootstrap computes the metrics a thousand times per interval, where scikit-learn's per-call checks would
    take nearly all the time (about 20 ms a call, against well under 1 ms here). The definitions, undefined (NaN)
    cases included, are scikit-learn's; the tests check that both agree.
    """
    class_count = probabilities.shape[1]
    predicted = probabilities.argmax(axis=1)
    confusion = np.bincount(labels * class_count + predicted, minlength=class_count**2).reshape(class_count, -1)
    true_counts, predicted_counts, correct = confusion.sum(axis=1), confusion.sum(axis=0), np.diag(confusion)
    present = true_counts > 0
    # F1 = 2 TP / (2 TP + FP + FN); undefined for a class neither labelled nor predicted.
    with np.errstate(invalid="ignore"):
        f1 = 2 * correct / (true_counts + predicted_counts)
    if present.sum() < (2 if class_count == 2 else class_count):
        auc = math.nan
    elif class_count == 2:
        auc = _rank_auc(labels == 1, probabilities[:, 1])
    else:
        auc = float(np.mean([_rank_auc(labels == k, probabilities[:, k]) for k in range(class_count)]))
    result = {
        "auc": auc,
        "accuracy": float(correct.sum() / labels.size),
        "balanced_accuracy": float(np.mean(correct[present] / true_counts[present])),
        "f1": float(f1[1] if class_count == 2 else np.nanmean(f1)),
        "weighted_f1": float(np.sum(f1[present] * true_counts[present]) / labels.size),
    }
    if ordinal:
        grades = np.arange(class_count)
        weights = (grades[:, None] - grades[None, :]) ** 2
        # The disagreement expected by chance, from the marginals; zero when kappa is undefined.
        expected_disagreement = np.sum(weights * np.outer(true_counts, predicted_counts)) / labels.size
        observed_disagreement = np.sum(weights * confusion)
        result["quadratic_kappa"] = (
            float(1 - observed_disagreement / expected_disagreement) if expected_disagreement > 0 else math.nan
        )
    return result


def bootstrap_intervals(
    labels: np.ndarray,
    probabilities: np.ndarray,
    ordinal: bool = False,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every metric of `classification_metrics`, resampling slides.

    Each resample draws n slides with replacement (`numpy.random.default_rng(seed).integers(0, n, size=n)`, one
    draw per resample, so the result is deterministic). A resample in which a metric is undefined (e.g. one class
    only, AUC NaN) is left out of that metric's interval; if fewer than half of the resamples define it, its
    interval is (nan, nan).
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    label_array, probability_array = _checked_labels_and_probabilities(labels, probabilities)
    generator = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in range(resamples):
        rows = generator.integers(0, label_array.size, size=label_array.size)
        for name, value in _resample_metrics(label_array[rows], probability_array[rows], ordinal).items():
            values.setdefault(name, []).append(value)
    tail_percent = 100 * (1 - level) / 2
    intervals = {}
    for name, samples in values.items():
        sample_array = np.asarray(samples)
        if np.count_nonzero(~np.isnan(sample_array)) < resamples / 2:
            intervals[name] = (math.nan, math.nan)
            continue
        low, high = np.nanpercentile(sample_array, [tail_percent, 100 - tail_percent])
        intervals[name] = (float(low), float(high))
    return intervals


@dataclass(frozen=True)
class DeLongResult:
    """DeLong's test of two correlated ROC AUCs; `difference` is auc_a - auc_b, `p_value` two-sided."""

    auc_a: float
    auc_b: float
    difference: float
    standard_error: float
    z: float
    p_value: float


def _binary_labels(labels) -> np.ndarray:
    label_array = _integer_vector(labels, "labels")
    if not np.all((label_array == 0) | (label_array == 1)):
        raise ValueError(f"DeLong's test needs binary labels 0/1, got values {np.unique(label_array)[:5]}")
    positives = int(label_array.sum())
    # The placement values' variances are sample variances: two of each class is the least that defines them.
    if positives < 2 or label_array.size - positives < 2:
        raise ValueError(
            f"DeLong's test needs at least two positive and two negative cases, got {positives} positive and "
            f"{label_array.size - positives} negative"
        )
    return label_array.astype(bool)


def _scores(scores, case_count: int, what: str) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1 or array.size != case_count:
        raise ValueError(f"{what} must be one score per case ({case_count}), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} must be finite")
    return array


def _placements(positive: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and the placement values (structural components) of the positive and the negative cases.

    A positive's placement is the fraction of negatives it outscores, a negative's the fraction of positives that
    outscore it, ties counting 1/2; the AUC is the mean of either. Sun & Xu's midranks give them without the
    m x n comparison matrix: a positive's midrank among all cases minus its midrank among the positives is the
    number of negatives below it (ties halved), and likewise for the negatives.
    """
    positive_count, negative_count = int(positive.sum()), int((~positive).sum())
    all_ranks = stats.rankdata(scores)
    positive_placements = (all_ranks[positive] - stats.rankdata(scores[positive])) / negative_count
    negative_placements = 1 - (all_ranks[~positive] - stats.rankdata(scores[~positive])) / positive_count
    return float(positive_placements.mean()), positive_placements, negative_placements


def _delong_variance(positive_placements: np.ndarray, negative_placements: np.ndarray) -> float:
    return float(
        np.var(positive_placements, ddof=1) / positive_placements.size
        + np.var(negative_placements, ddof=1) / negative_placements.size
    )


def delong_auc_variance(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(ROC AUC, DeLong variance of that AUC) of scores against binary labels (1 positive; higher scores = positive)."""
    positive = _binary_labels(labels)
    auc, positive_placements, negative_placements = _placements(positive, _scores(scores, positive.size, "scores"))
    return auc, _delong_variance(positive_placements, negative_placements)


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DeLongResult:
    """DeLong, DeLong & Clarke-Pearson (1988) test for two correlated ROC AUCs on the same cases, two-sided.

    labels are 0/1 (1 positive, at least two of each), higher scores mean positive; ties count 1/2. The variance
    of auc_a - auc_b is that of the per-case differences of the two placement values, which is the
    Var(A) + Var(B) - 2 Cov(A, B) of the paper computed in one step. When both the difference and its standard
    error are 0 (e.g. identical scores) z is 0 and p is 1; a nonzero difference with zero standard error gives
    z = +-inf and p = 0.
    """
    positive = _binary_labels(labels)
    auc_a, positive_a, negative_a = _placements(positive, _scores(scores_a, positive.size, "scores_a"))
    auc_b, positive_b, negative_b = _placements(positive, _scores(scores_b, positive.size, "scores_b"))
    difference = auc_a - auc_b
    standard_error = math.sqrt(_delong_variance(positive_a - positive_b, negative_a - negative_b))
    if standard_error > 0:
        z = difference / standard_error
    else:
        z = 0.0 if difference == 0 else math.copysign(math.inf, difference)
    return DeLongResult(
        auc_a=auc_a,
        auc_b=auc_b,
        difference=difference,
        standard_error=standard_error,
        z=z,
        p_value=float(2 * stats.norm.sf(abs(z))),
    )


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's test: the discordant counts, the statistic (exact: min of the two counts; else chi-square), p."""

    only_a_correct: int
    only_b_correct: int
    statistic: float
    p_value: float
    exact: bool


def mcnemar_test(labels: np.ndarray, predicted_a: np.ndarray, predicted_b: np.ndarray) -> McNemarResult:
    """McNemar's test on the paired correctness of two classifiers' predictions on the same cases, two-sided.

    Only the cases exactly one classifier gets right count: b (only A right) and c (only B right). Under the null
    hypothesis of equal accuracy each such case is A's with probability 1/2. With b + c < 25 the exact binomial test
    is used (scipy.stats.binomtest, statistic min(b, c)); otherwise the chi-square statistic with continuity
    correction, (|b - c| - 1)^2 / (b + c) on one degree of freedom. No discordant case at all gives p = 1.
    """
    label_array = _integer_vector(labels, "labels")
    predicted_a_array = _integer_vector(predicted_a, "predicted_a")
    predicted_b_array = _integer_vector(predicted_b, "predicted_b")
    if not label_array.size == predicted_a_array.size == predicted_b_array.size:
        raise ValueError(
            f"labels, predicted_a and predicted_b differ in length: "
            f"{label_array.size}, {predicted_a_array.size}, {predicted_b_array.size}"
        )
    a_correct = predicted_a_array == label_array
    b_correct = predicted_b_array == label_array
    only_a = int(np.count_nonzero(a_correct & ~b_correct))
    only_b = int(np.count_nonzero(b_correct & ~a_correct))
    discordant = only_a + only_b
    if discordant == 0:
        return McNemarResult(only_a, only_b, statistic=0.0, p_value=1.0, exact=True)
    if discordant < MCNEMAR_EXACT_BELOW:
        p_value = stats.binomtest(only_a, discordant, p=0.5, alternative="two-sided").pvalue
        return McNemarResult(only_a, only_b, statistic=float(min(only_a, only_b)), p_value=float(p_value), exact=True)
    # The correction shrinks |b - c| towards 0 but not past it, so b = c gives statistic 0 and p = 1.
    statistic = max(abs(only_a - only_b) - 1, 0) ** 2 / discordant
    return McNemarResult(
        only_a, only_b, statistic=float(statistic), p_value=float(stats.chi2.sf(statistic, df=1)), exact=False
    )
