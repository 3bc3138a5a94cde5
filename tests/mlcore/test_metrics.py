"""metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from mlcore.metrics import confusion_at, roc_auc, sensitivity_specificity, summarise, threshold_for_sensitivity


def _pairwise_auc(labels, scores) -> float:
    """The definition: the share of (positive, negative) pairs ranked correctly, ties counting one half."""
    labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
    positives, negatives = scores[labels], scores[~labels]
    wins = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    return float(wins / (len(positives) * len(negatives)))


# --- roc_auc ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([1, 0, 0, 1, 0], [0.9, 0.5, 0.5, 0.5, 0.1], 5 / 6),  # one positive ties two negatives: two halves
        ([0, 1], [0.3, 0.3], 0.5),
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),
        ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 1.0),
        ([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1], 0.0),
        ([1, 1, 0, 0, 1, 0], [0.9, 0.4, 0.6, 0.1, 0.5, 0.5], 5.5 / 9),
    ],
)
def test_roc_auc_matches_hand_computed_values(labels, scores, expected):
    assert roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_accepts_boolean_labels_and_numpy_arrays():
    labels = np.array([False, False, True, True])
    assert roc_auc(labels, np.array([0.1, 0.4, 0.35, 0.8], dtype=np.float32)) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_the_pairwise_definition_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 1)  # only 11 distinct values: many ties
    assert roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


def test_roc_auc_depends_only_on_the_ranking():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 50)
    scores = rng.random(50)
    assert roc_auc(labels, scores) == pytest.approx(roc_auc(labels, np.log(scores) * 3 + 7), abs=1e-12)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]], ids=["all-positive", "all-negative"])
def test_roc_auc_raises_value_error_with_one_class(labels):
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc(labels, [0.2, 0.5, 0.9])


# --- threshold_for_sensitivity ----------------------------------------------------------------------------------

LABELS = [1, 1, 1, 1, 0, 0]
SCORES = [0.9, 0.8, 0.3, 0.6, 0.7, 0.2]  # positives from the top: 0.9, 0.8, 0.6, 0.3


@pytest.mark.parametrize(
    ("target", "expected"),
    # halfway between the lowest positive kept (0.9, 0.8, 0.6, 0.3) and the next lower score of any case
    [(0.25, 0.85), (0.5, 0.75), (0.51, 0.45), (0.75, 0.45), (0.9, 0.25), (1.0, 0.25)],
)
def test_threshold_for_sensitivity_matches_hand_computed_thresholds(target, expected):
    threshold = threshold_for_sensitivity(LABELS, SCORES, target)
    assert threshold == pytest.approx(expected)
    assert sensitivity_specificity(LABELS, SCORES, threshold)[0] >= target


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_threshold_for_sensitivity_is_the_highest_threshold_reaching_the_target(seed, target):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 150)
    scores = rng.random(150)
    threshold = threshold_for_sensitivity(labels, scores, target)

    assert sensitivity_specificity(labels, scores, threshold)[0] >= target
    # the same calls as the highest such threshold (the lowest positive score it keeps) ...
    kept = scores[(labels == 1) & (scores >= threshold)].min()
    assert confusion_at(labels, scores, threshold) == confusion_at(labels, scores, kept)
    assert sensitivity_specificity(labels, scores, np.nextafter(kept, 1.0))[0] < target
    # ... and a margin: no score lies within half the gap below it
    assert not np.any((scores < kept) & (scores >= threshold))


def test_threshold_for_sensitivity_keeps_its_promise_at_the_extremes():
    threshold = threshold_for_sensitivity([1, 1, 0], [1.0, 1.0, 0.2], 0.9)
    assert threshold == pytest.approx(0.6)
    assert sensitivity_specificity([1, 1, 0], [1.0, 1.0, 0.2], threshold) == (1.0, 1.0)
    # A positive case scored exactly 0 (float32 softmax underflow) still counts: the threshold drops to 0.
    threshold = threshold_for_sensitivity([1, 1, 0], [0.9, 0.0, 0.5], 1.0)
    assert threshold == 0.0
    assert sensitivity_specificity([1, 1, 0], [0.9, 0.0, 0.5], threshold)[0] == 1.0


@pytest.mark.parametrize("target", [0.0, -0.1, 1.01])
def test_threshold_for_sensitivity_rejects_a_target_outside_zero_to_one(target):
    with pytest.raises(ValueError, match="target sensitivity"):
        threshold_for_sensitivity(LABELS, SCORES, target)


def test_threshold_for_sensitivity_without_positives_raises_value_error():
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_sensitivity([0, 0, 0], [0.1, 0.2, 0.3], 0.9)


# --- confusion_at / sensitivity_specificity / summarise ---------------------------------------------------------

CONFUSION_LABELS = [1, 1, 0, 0, 1, 0]
CONFUSION_SCORES = [0.9, 0.4, 0.6, 0.1, 0.5, 0.5]  # at 0.5: predicted positive = [T, F, T, F, T, T]


def test_confusion_at_counts_a_score_equal_to_the_threshold_as_positive():
    assert confusion_at(CONFUSION_LABELS, CONFUSION_SCORES, 0.5) == {"tp": 2, "fp": 2, "tn": 1, "fn": 1}


def test_confusion_at_a_higher_threshold():
    assert confusion_at(CONFUSION_LABELS, CONFUSION_SCORES, 0.55) == {"tp": 1, "fp": 1, "tn": 2, "fn": 2}


def test_sensitivity_and_specificity_match_hand_computed_values():
    sensitivity, specificity = sensitivity_specificity(CONFUSION_LABELS, CONFUSION_SCORES, 0.5)
    assert sensitivity == pytest.approx(2 / 3)
    assert specificity == pytest.approx(1 / 3)
    assert sensitivity_specificity(CONFUSION_LABELS, CONFUSION_SCORES, 0.0) == (1.0, 0.0)
    assert sensitivity_specificity(CONFUSION_LABELS, CONFUSION_SCORES, 0.95) == (0.0, 1.0)


def test_sensitivity_without_positives_is_zero_rather_than_a_division_error():
    assert sensitivity_specificity([0, 0], [0.2, 0.8], 0.5) == (0.0, 0.5)


def test_summarise_reports_hand_computed_metrics():
    summary = summarise(CONFUSION_LABELS, CONFUSION_SCORES, 0.5)
    assert summary == {
        "auc": pytest.approx(5.5 / 9),
        "accuracy": pytest.approx(0.5),
        "sensitivity": pytest.approx(2 / 3),
        "specificity": pytest.approx(1 / 3),
        "threshold": 0.5,
        "n": 6,
        "n_positive": 3,
    }
