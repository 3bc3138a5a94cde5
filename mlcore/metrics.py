"""Classification metrics for a binary malignancy score, in NumPy (no scikit-learn needed)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve via the Mann–Whitney U statistic, ties counted as one half."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative case")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_scores = s[order]
    # average ranks over ties
    unique, first_index, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first_index + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def confusion_at(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, int]:
    y = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores, dtype=np.float64) >= threshold
    return {
        "tp": int((predicted & y).sum()),
        "fp": int((predicted & ~y).sum()),
        "tn": int((~predicted & ~y).sum()),
        "fn": int((~predicted & y).sum()),
    }


def sensitivity_specificity(labels: ArrayLike, scores: ArrayLike, threshold: float) -> tuple[float, float]:
    c = confusion_at(labels, scores, threshold)
    sensitivity = c["tp"] / max(c["tp"] + c["fn"], 1)
    specificity = c["tn"] / max(c["tn"] + c["fp"], 1)
    return sensitivity, specificity


def threshold_for_sensitivity(labels: ArrayLike, scores: ArrayLike, target_sensitivity: float = 0.9) -> float:
    """The most specific threshold whose sensitivity still reaches the target, placed halfway between
    the lowest positive score it must keep and the next lower score.

    A case is called positive when its score is >= the threshold.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError("target sensitivity must lie in (0, 1]")
    y = np.asarray(labels).astype(bool)
    positives = np.sort(np.asarray(scores, dtype=np.float64)[y])[::-1]
    if len(positives) == 0:
        raise ValueError("no positive cases to set a threshold on")
    needed = int(np.ceil(target_sensitivity * len(positives)))
    cut = positives[needed - 1]
    # Halfway to the next lower score of any case: the same calls on these scores, but a score that
    # comes out a rounding error lower on another machine (thread count, batch size) is not flipped.
    lower = np.asarray(scores, dtype=np.float64)
    lower = lower[lower < cut]
    if len(lower):
        cut = (cut + lower.max()) / 2
    return float(np.clip(cut, 0.0, 1.0))


def summarise(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, float | int]:
    sensitivity, specificity = sensitivity_specificity(labels, scores, threshold)
    y = np.asarray(labels).astype(bool)
    accuracy = float(((np.asarray(scores) >= threshold) == y).mean())
    return {
        "auc": roc_auc(labels, scores),
        "accuracy": accuracy,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "threshold": threshold,
        "n": int(len(y)),
        "n_positive": int(y.sum()),
    }


def predictive_values(labels: ArrayLike, scores: ArrayLike, threshold: float) -> tuple[float | None, float | None]:
    """(PPV, NPV); None where no case was called positive (or negative)."""
    c = confusion_at(labels, scores, threshold)
    ppv = c["tp"] / (c["tp"] + c["fp"]) if c["tp"] + c["fp"] else None
    npv = c["tn"] / (c["tn"] + c["fn"]) if c["tn"] + c["fn"] else None
    return ppv, npv


def bootstrap_auc_interval(
    labels: ArrayLike, scores: ArrayLike, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval for the AUC, resampling cases within each class (stratified),
    so every resample has both classes."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    positives, negatives = s[y], s[~y]
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("AUC needs at least one positive and one negative case")
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    for index in range(n_resamples):
        pos = positives[rng.integers(0, len(positives), len(positives))]
        neg = negatives[rng.integers(0, len(negatives), len(negatives))]
        values[index] = _auc_two_samples(pos, neg)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


def _auc_two_samples(positives: np.ndarray, negatives: np.ndarray) -> float:
    combined = np.concatenate([positives, negatives])
    labels = np.concatenate([np.ones(len(positives), bool), np.zeros(len(negatives), bool)])
    return roc_auc(labels, combined)


def expected_calibration_error(labels: ArrayLike, scores: ArrayLike, *, n_bins: int = 15) -> float:
    """ECE of the positive-class probability: the case-weighted mean |observed rate - mean score|
    over equal-width bins of the score."""
    y = np.asarray(labels).astype(np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        raise ValueError("ECE needs at least one case")
    bins = np.minimum((s * n_bins).astype(int), n_bins - 1)
    error = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            error += in_bin.sum() / len(s) * abs(y[in_bin].mean() - s[in_bin].mean())
    return float(error)


def reliability_curve(labels: ArrayLike, scores: ArrayLike, *, n_bins: int = 10) -> list[dict[str, float]]:
    y = np.asarray(labels).astype(np.float64)
    s = np.asarray(scores, dtype=np.float64)
    bins = np.minimum((s * n_bins).astype(int), n_bins - 1)
    return [
        {"mean_score": float(s[bins == b].mean()), "observed": float(y[bins == b].mean()), "n": int((bins == b).sum())}
        for b in range(n_bins)
        if (bins == b).any()
    ]


def softmax(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: ArrayLike, labels: ArrayLike, temperature: float = 1.0) -> float:
    probabilities = softmax(logits, temperature)
    y = np.asarray(labels).astype(int)
    return float(-np.log(np.clip(probabilities[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_temperature(logits: ArrayLike, labels: ArrayLike, *, low: float = 0.05, high: float = 20.0) -> float:
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising the NLL of softmax(logits / T).

    The NLL is unimodal in log T, so a golden-section search on log T finds it without an optimiser.
    """
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc = negative_log_likelihood(logits, labels, np.exp(c))
    fd = negative_log_likelihood(logits, labels, np.exp(d))
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = negative_log_likelihood(logits, labels, np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = negative_log_likelihood(logits, labels, np.exp(d))
    return float(np.exp((a + b) / 2))


def full_report(
    labels: ArrayLike, scores: ArrayLike, threshold: float, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, object]:
    """Everything a clinical-style evaluation table shows, at one operating threshold: summarise()
    plus PPV, NPV, the confusion matrix, ECE and (with bootstrap > 0) a 95% interval for the AUC."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    ppv, npv = predictive_values(y, s, threshold)
    report: dict[str, object] = {
        **summarise(y, s, float(threshold)),
        "ppv": ppv,
        "npv": npv,
        "confusion": confusion_at(y, s, threshold),
        "ece": expected_calibration_error(y, s),
    }
    if bootstrap:
        low, high = bootstrap_auc_interval(y, s, n_resamples=bootstrap, seed=seed)
        report["auc_ci95"] = [low, high]
    return report


# --- several diagnoses ---------------------------------------------------------------------------


def confusion_matrix(labels: ArrayLike, predicted: ArrayLike, n_classes: int) -> np.ndarray:
    """Counts, row = true class, column = predicted class."""
    y, p = np.asarray(labels, dtype=int), np.asarray(predicted, dtype=int)
    return np.bincount(y * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def balanced_accuracy(labels: ArrayLike, predicted: ArrayLike, n_classes: int) -> float:
    """The mean of each class's recall over the classes present (ISIC 2018 task 3's metric)."""
    matrix = confusion_matrix(labels, predicted, n_classes)
    totals = matrix.sum(axis=1)
    present = totals > 0
    return float((np.diag(matrix)[present] / totals[present]).mean())


def multiclass_report(labels: ArrayLike, probabilities: ArrayLike, class_names: tuple[str, ...]) -> dict:
    """Per class: cases, one-vs-rest AUC (None when the class is absent or alone) and recall; overall:
    accuracy, balanced accuracy and the confusion matrix of the most probable class."""
    y = np.asarray(labels, dtype=int)
    p = np.asarray(probabilities, dtype=np.float64)
    n = len(class_names)
    predicted = p.argmax(axis=1)
    matrix = confusion_matrix(y, predicted, n)
    per_class = {}
    for index, name in enumerate(class_names):
        members = y == index
        auc = roc_auc(members, p[:, index]) if 0 < members.sum() < len(y) else None
        recall = float(matrix[index, index] / members.sum()) if members.any() else None
        per_class[name] = {"n": int(members.sum()), "auc": auc, "recall": recall}
    aucs = [c["auc"] for c in per_class.values() if c["auc"] is not None]
    return {
        "classes": list(class_names),
        "per_class": per_class,
        "mean_auc": float(np.mean(aucs)) if aucs else None,
        "accuracy": float((predicted == y).mean()),
        "balanced_accuracy": balanced_accuracy(y, predicted, n),
        "confusion_matrix": matrix.tolist(),
    }
