"""The clinical evaluation toolkit against hand-computed values: the metrics table (confusion counts,
sensitivity, specificity, PPV, NPV, ECE, the bootstrap AUC interval), temperature scaling, the
near-duplicate (leakage) detector and the drift features. Nothing here imports Django."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from mlcore.data import SyntheticLesions
from mlcore.drift import FEATURE_SIZE, IMAGE_FEATURES, image_features
from mlcore.leakage import MAX_THUMBNAIL_DIFFERENCE, find_near_duplicates, fingerprint
from mlcore.metrics import (
    bootstrap_auc_interval,
    confusion_at,
    expected_calibration_error,
    fit_temperature,
    full_report,
    negative_log_likelihood,
    predictive_values,
    roc_auc,
    softmax,
)

# Ten cases, four malignant. At threshold 0.5 (a score equal to the threshold counts as positive):
#   malignant 0.9 0.8 0.6 | 0.3         -> TP 3, FN 1
#   benign    0.7 0.5     | 0.4 0.2 0.1 0.05 -> FP 2, TN 4
LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
SCORES = [0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1, 0.05]


# --- the metrics table ------------------------------------------------------------------------------------------


def test_full_report_matches_hand_computed_table():
    report = full_report(LABELS, SCORES, 0.5, bootstrap=200, seed=1)

    assert report["n"] == 10 and report["n_positive"] == 4
    assert report["threshold"] == 0.5
    assert report["confusion"] == {"tp": 3, "fp": 2, "tn": 4, "fn": 1}
    assert report["sensitivity"] == pytest.approx(3 / 4)
    assert report["specificity"] == pytest.approx(4 / 6)
    assert report["ppv"] == pytest.approx(3 / 5)
    assert report["npv"] == pytest.approx(4 / 5)
    assert report["accuracy"] == pytest.approx(7 / 10)
    # Pairs ranked correctly: 0.9 and 0.8 beat all 6 benign, 0.6 beats 5, 0.3 beats 3: 20 of 24.
    assert report["auc"] == pytest.approx(20 / 24)
    # With 15 bins every score here falls in a bin of its own, so the ECE is the mean |label - score|.
    assert report["ece"] == pytest.approx(np.mean(np.abs(np.array(LABELS) - np.array(SCORES))))
    assert report["ece"] == pytest.approx(3.35 / 10)
    low, high = report["auc_ci95"]
    assert 0.0 <= low <= report["auc"] <= high <= 1.0


def test_full_report_without_bootstrap_has_no_interval():
    assert "auc_ci95" not in full_report(LABELS, SCORES, 0.5, bootstrap=0)


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.5, {"tp": 3, "fp": 2, "tn": 4, "fn": 1}),
        (0.6, {"tp": 3, "fp": 1, "tn": 5, "fn": 1}),  # 0.6 is called positive: >= the threshold
        (0.61, {"tp": 2, "fp": 1, "tn": 5, "fn": 2}),
        (0.0, {"tp": 4, "fp": 6, "tn": 0, "fn": 0}),
        (0.95, {"tp": 0, "fp": 0, "tn": 6, "fn": 4}),
    ],
)
def test_confusion_counts_at_thresholds(threshold, expected):
    assert confusion_at(LABELS, SCORES, threshold) == expected


def test_predictive_values_by_hand():
    assert predictive_values(LABELS, SCORES, 0.5) == pytest.approx((3 / 5, 4 / 5))
    assert predictive_values(LABELS, SCORES, 0.6) == pytest.approx((3 / 4, 5 / 6))


def test_predictive_values_are_none_when_nothing_is_called_positive_or_negative():
    ppv, npv = predictive_values(LABELS, SCORES, 0.95)  # nobody called positive
    assert ppv is None and npv == pytest.approx(6 / 10)
    ppv, npv = predictive_values(LABELS, SCORES, 0.0)  # everybody called positive
    assert ppv == pytest.approx(4 / 10) and npv is None
    report = full_report(LABELS, SCORES, 0.95, bootstrap=0)
    assert report["ppv"] is None and report["sensitivity"] == 0.0 and report["specificity"] == 1.0


# --- expected calibration error ---------------------------------------------------------------------------------


def test_ece_with_shared_bins_by_hand():
    """Bin b holds scores in [b/n, (b+1)/n): left-closed, and a score of 1.0 goes in the last bin.

    n_bins=4:  bin 0 {0.0 (y 0)}                 |0 - 0|        = 0      weight 1/6
               bin 1 {0.25 (0), 0.4 (1)}         |0.5 - 0.325|  = 0.175  weight 2/6
               bin 2 {0.5 (0)}                   |0 - 0.5|      = 0.5    weight 1/6
               bin 3 {0.75 (1), 1.0 (1)}         |1 - 0.875|    = 0.125  weight 2/6
    """
    labels = [0, 0, 1, 0, 1, 1]
    scores = [0.0, 0.25, 0.4, 0.5, 0.75, 1.0]
    expected = (0 + 2 * 0.175 + 0.5 + 2 * 0.125) / 6
    assert expected_calibration_error(labels, scores, n_bins=4) == pytest.approx(expected, abs=1e-12)
    # Right-closed bins ((b/n, (b+1)/n]) would give {0.0, 0.25} {0.4, 0.5} {0.75} {1.0}: a different answer.
    right_closed = (2 * 0.125 + 2 * 0.05 + 0.25 + 0) / 6
    assert not math.isclose(expected, right_closed)


def test_ece_default_fifteen_bins_by_hand():
    # 0.10 and 0.12 share bin 1 (observed 1/2, mean 0.11); 0.50 and 0.52 share bin 7 (observed 1/2, mean 0.51);
    # 0.9 is alone in bin 13 and 0.95 alone in bin 14.
    labels = [0, 1, 1, 1, 0, 1]
    scores = [0.10, 0.12, 0.9, 0.95, 0.50, 0.52]
    expected = (2 * 0.39 + 0.1 + 0.05 + 2 * 0.01) / 6
    assert expected_calibration_error(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_ece_is_zero_for_perfectly_calibrated_bins_and_refuses_no_cases():
    # Four cases at 0.25 with one malignant, four at 0.75 with three malignant.
    labels = [1, 0, 0, 0, 1, 1, 1, 0]
    scores = [0.25] * 4 + [0.75] * 4
    assert expected_calibration_error(labels, scores) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0
    assert expected_calibration_error([0, 1], [1.0, 0.0]) == 1.0
    with pytest.raises(ValueError, match="at least one case"):
        expected_calibration_error([], [])


# --- bootstrap interval of the AUC ------------------------------------------------------------------------------


def _separated_scores(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat([1, 0], n_per_class)
    scores = np.concatenate([rng.normal(1.0, 1.0, n_per_class), rng.normal(0.0, 1.0, n_per_class)])
    return labels, scores


def test_bootstrap_interval_contains_the_point_auc_and_narrows_with_more_cases():
    widths = []
    for n in (30, 300):
        labels, scores = _separated_scores(n, seed=5)
        point = roc_auc(labels, scores)
        low, high = bootstrap_auc_interval(labels, scores, n_resamples=500, seed=0)
        assert low < point < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ten times the cases: about a third of the width


def test_bootstrap_interval_is_reproducible_per_seed_and_honours_confidence():
    labels, scores = _separated_scores(40, seed=6)
    first = bootstrap_auc_interval(labels, scores, n_resamples=300, seed=3)
    assert bootstrap_auc_interval(labels, scores, n_resamples=300, seed=3) == first
    assert bootstrap_auc_interval(labels, scores, n_resamples=300, seed=4) != first
    low80, high80 = bootstrap_auc_interval(labels, scores, n_resamples=300, seed=3, confidence=0.80)
    assert first[0] <= low80 <= high80 <= first[1]


def test_bootstrap_interval_of_a_perfect_ranking_is_a_point_and_needs_both_classes():
    assert bootstrap_auc_interval([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_resamples=50) == (1.0, 1.0)
    with pytest.raises(ValueError, match="positive and one negative"):
        bootstrap_auc_interval([1, 1, 1], [0.2, 0.5, 0.9])


# --- softmax, NLL and temperature scaling -----------------------------------------------------------------------


def test_softmax_by_hand():
    assert softmax([[0.0, math.log(3)]]) == pytest.approx(np.array([[0.25, 0.75]]))
    # Dividing the logits by T=2 equals halving them by hand.
    assert softmax([[0.0, 2 * math.log(3)]], temperature=2.0) == pytest.approx(np.array([[0.25, 0.75]]))
    # Large logits do not overflow: only their difference matters.
    e = math.e
    assert softmax([[1000.0, 1001.0]]) == pytest.approx(np.array([[1 / (1 + e), e / (1 + e)]]))
    rows = softmax(np.random.default_rng(0).normal(0, 5, (20, 3)), temperature=0.7)
    assert rows.sum(axis=1) == pytest.approx(np.ones(20))


def test_negative_log_likelihood_by_hand():
    logits = [[0.0, math.log(3)], [math.log(3), 0.0]]
    # P(label) = 0.75 for both cases.
    assert negative_log_likelihood(logits, [1, 0]) == pytest.approx(-math.log(0.75))
    assert negative_log_likelihood(logits, [0, 1]) == pytest.approx(-math.log(0.25))


@pytest.mark.parametrize("true_temperature", [2.5, 0.6])
def test_fit_temperature_recovers_a_known_temperature(true_temperature):
    rng = np.random.default_rng(42)
    logits = rng.normal(0.0, 3.0, size=(20_000, 2))
    probabilities = softmax(logits, true_temperature)
    labels = (rng.random(len(logits)) < probabilities[:, 1]).astype(int)

    fitted = fit_temperature(logits, labels)

    assert fitted == pytest.approx(true_temperature, rel=0.06)
    at_fit = negative_log_likelihood(logits, labels, fitted)
    assert at_fit <= negative_log_likelihood(logits, labels, 1.0)
    assert at_fit <= negative_log_likelihood(logits, labels, true_temperature) + 1e-9
    # It is the minimum: a step either way is no better.
    assert at_fit <= negative_log_likelihood(logits, labels, fitted * 1.05)
    assert at_fit <= negative_log_likelihood(logits, labels, fitted / 1.05)


def test_fit_temperature_for_three_classes():
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 2.0, size=(15_000, 3))
    probabilities = softmax(logits, 1.8)
    labels = np.array([rng.choice(3, p=row) for row in probabilities])
    assert fit_temperature(logits, labels) == pytest.approx(1.8, rel=0.08)


# --- leakage: near-duplicates between test and train ------------------------------------------------------------


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def lesion_sets() -> tuple[list[Image.Image], list[Image.Image]]:
    """300 training and 200 distinct test lesions (different seeds), at the generator's default 128 px."""
    train = [image for image, _ in SyntheticLesions(300, size=128, seed=301)]
    test = [image for image, _ in SyntheticLesions(200, size=128, seed=302)]
    return train, test


def test_no_near_duplicates_among_distinct_lesions(lesion_sets):
    train, test = lesion_sets
    report = find_near_duplicates([fingerprint(i) for i in test], [fingerprint(i) for i in train])
    details = zip(report.test_indices, report.train_indices, report.thumbnail_difference, strict=True)
    assert report.count == 0, list(details)


def test_near_duplicates_finds_exactly_the_planted_copies(lesion_sets):
    train, distinct = lesion_sets
    planted = {  # test copy -> index of its training original
        "exact": (train[3].copy(), 3),
        "resized 2x": (train[17].resize((256, 256), Image.Resampling.BICUBIC), 17),
        "resized 0.5x": (train[42].resize((64, 64), Image.Resampling.LANCZOS), 42),
        "JPEG quality 50": (_jpeg(train[99], 50), 99),
        "resized 2x, then JPEG quality 50": (_jpeg(train[150].resize((256, 256)), 50), 150),
    }
    # Interleave the copies among the distinct test lesions (inserted in ascending order, so no position moves).
    test = list(distinct)
    positions = {}
    for offset, (name, (image, _)) in enumerate(planted.items()):
        position = 10 + 37 * offset
        test.insert(position, image)
        positions[name] = position

    report = find_near_duplicates([fingerprint(i) for i in test], [fingerprint(i) for i in train])

    found = dict(zip(report.test_indices, report.train_indices, strict=True))
    assert found == {positions[name]: original for name, (_, original) in planted.items()}
    assert report.count == len(planted)
    assert all(d <= MAX_THUMBNAIL_DIFFERENCE for d in report.thumbnail_difference)
    assert report.hamming[report.test_indices.index(positions["exact"])] == 0
    assert report.thumbnail_difference[report.test_indices.index(positions["exact"])] == 0.0


def test_near_duplicates_with_no_training_images():
    image = SyntheticLesions(1, size=64, seed=1)[0][0]
    assert find_near_duplicates([fingerprint(image)], []).count == 0


# --- drift features ---------------------------------------------------------------------------------------------


def test_flat_grey_image_features():
    features = image_features(Image.new("RGB", (40, 70), (128, 128, 128)))
    assert set(features) == set(IMAGE_FEATURES)
    assert features["brightness"] == pytest.approx(128.0)
    assert features["contrast"] == pytest.approx(0.0, abs=1e-9)
    assert features["sharpness"] == pytest.approx(0.0, abs=1e-9)
    assert features["saturation"] == 0.0
    assert features["colourfulness"] == pytest.approx(0.0, abs=1e-9)


def test_black_image_has_zero_saturation_not_nan():
    features = image_features(Image.new("RGB", (32, 32), (0, 0, 0)))
    assert features["brightness"] == 0.0 and features["saturation"] == 0.0


def test_pure_red_image_features():
    features = image_features(Image.new("RGB", (50, 50), (255, 0, 0)))
    assert features["saturation"] == pytest.approx(1.0)
    assert features["brightness"] == pytest.approx(0.299 * 255)
    assert features["contrast"] == pytest.approx(0.0, abs=1e-9)
    # Hasler-Süsstrunk: rg = 255, yb = 127.5 everywhere, so only the mean term remains.
    assert features["colourfulness"] == pytest.approx(0.3 * math.hypot(255, 127.5))


def test_one_pixel_checkerboard_features_by_hand():
    """At the feature size no resampling happens. Every interior pixel's four neighbours have the
    opposite value, so the Laplacian is -4*255 on white and +4*255 on black, half each."""
    yy, xx = np.mgrid[0:FEATURE_SIZE, 0:FEATURE_SIZE]
    board = np.where((xx + yy) % 2 == 1, 255, 0).astype(np.uint8)
    features = image_features(Image.fromarray(np.stack([board] * 3, axis=2), mode="RGB"))
    assert features["brightness"] == pytest.approx(127.5)
    assert features["contrast"] == pytest.approx(127.5)
    assert features["sharpness"] == pytest.approx(1020.0**2)
    assert features["saturation"] == 0.0


def test_checkerboard_is_sharper_than_a_flat_or_blurred_image():
    yy, xx = np.mgrid[0:64, 0:64]
    board = Image.fromarray(np.where(((xx // 8) + (yy // 8)) % 2 == 1, 200, 50).astype(np.uint8)).convert("RGB")
    flat = Image.new("RGB", (64, 64), (125, 125, 125))
    blurred = board.resize((16, 16), Image.Resampling.BOX)
    sharpness = {name: image_features(image)["sharpness"] for name, image in [("board", board), ("flat", flat),
                                                                              ("blurred", blurred)]}  # fmt: skip
    assert sharpness["board"] > sharpness["blurred"] > sharpness["flat"] == pytest.approx(0.0, abs=1e-9)


def test_features_do_not_depend_much_on_resolution():
    image = SyntheticLesions(1, size=256, seed=9)[0][0]
    full = image_features(image)
    half = image_features(image.resize((128, 128), Image.Resampling.LANCZOS))
    for name in ("brightness", "saturation", "colourfulness"):
        assert half[name] == pytest.approx(full[name], rel=0.05), name
