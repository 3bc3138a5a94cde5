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
    """The highest threshold whose sensitivity still reaches the target (the most specific safe cut-off).

    A case is called positive when its score is >= the threshold.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError("target sensitivity must lie in (0, 1]")
    y = np.asarray(labels).astype(bool)
    positives = np.sort(np.asarray(scores, dtype=np.float64)[y])[::-1]
    if len(positives) == 0:
        raise ValueError("no positive cases to set a threshold on")
    needed = int(np.ceil(target_sensitivity * len(positives)))
    return float(np.clip(positives[needed - 1], 0.0, 1.0))


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
