"""mlcore.drift without Django: the per-image features against hand-computed values, the PCA projection
against numpy, Holm's procedure, the outlier placement, and the drift check itself on real synthetic
lesion photos (a same-generator window passes, a brightened one does not), cross-checked with scipy and
with the Evidently report built from it."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from scipy.stats import ks_2samp

from mlcore import drift
from mlcore.data import SyntheticLesions, generate_lesion

SIZE = 128
REFERENCE_N = 300
WINDOW_N = 60


def flat(colour: tuple[int, int, int], size: int = drift.FEATURE_SIZE) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def halves(left: int, right: int) -> Image.Image:
    """A FEATURE_SIZE square, grey level `left` on the left half and `right` on the right half."""
    pixels = np.full((drift.FEATURE_SIZE, drift.FEATURE_SIZE, 3), left, dtype=np.uint8)
    pixels[:, drift.FEATURE_SIZE // 2 :] = right
    return Image.fromarray(pixels, mode="RGB")


# --- the features of one image -------------------------------------------------------------------


def test_two_level_image_has_one_bit_of_entropy_and_hand_computed_moments():
    features = drift.image_features(halves(0, 255))

    assert features["entropy"] == pytest.approx(1.0)
    assert features["brightness"] == pytest.approx(127.5)
    assert features["contrast"] == pytest.approx(127.5)  # half at 0, half at 255: std = 127.5
    assert features["saturation"] == 0.0  # grey pixels
    assert features["colourfulness"] == pytest.approx(0.0, abs=1e-9)
    # The 4-neighbour Laplacian is +255 on the column left of the edge and -255 right of it, zero
    # elsewhere, over the 254 x 254 interior: mean 0, variance 2 * 255^2 / 254.
    assert features["sharpness"] == pytest.approx(2 * 255**2 / 254)


def test_flat_image_has_zero_entropy_contrast_and_sharpness():
    features = drift.image_features(flat((90, 90, 90)))

    assert features["entropy"] == 0.0
    assert math.copysign(1.0, features["entropy"]) == 1.0  # never "-0.0"
    assert features["contrast"] == pytest.approx(0.0, abs=1e-9)
    assert features["sharpness"] == pytest.approx(0.0, abs=1e-9)
    assert features["brightness"] == pytest.approx(90.0)


def test_pure_red_image_saturation_colourfulness_and_luminance():
    features = drift.image_features(flat((255, 0, 0)))

    assert features["saturation"] == pytest.approx(1.0)
    assert features["brightness"] == pytest.approx(0.299 * 255)
    # Hasler-Süsstrunk: rg = 255, yb = 127.5 everywhere, so only the mean term is left.
    assert features["colourfulness"] == pytest.approx(0.3 * math.hypot(255, 127.5))


def test_image_features_do_not_depend_on_resolution():
    small, large = drift.image_features(flat((30, 120, 200), size=40)), drift.image_features(flat((30, 120, 200), 700))
    assert set(small) == set(drift.IMAGE_FEATURES)
    for name in drift.IMAGE_FEATURES:
        assert small[name] == pytest.approx(large[name], abs=1e-9), name


@pytest.mark.parametrize(
    ("values", "bits"),
    [
        ([0, 0, 255, 255], 1.0),
        ([0.4, 0.6, 0.4, 0.6], 1.0),  # rounded to the nearest level: 0 and 1
        ([-7.0, 300.0], 1.0),  # clipped into 0..255
        ([10, 20, 30, 40], 2.0),
        (list(range(256)), 8.0),
        ([42] * 9, 0.0),
        ([0, 0, 0, 1], -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))),
    ],
)
def test_luminance_entropy_by_hand(values, bits):
    assert drift.luminance_entropy(np.array(values, dtype=np.float64)) == pytest.approx(bits)


def test_file_features_width_height_aspect_and_size():
    assert drift.file_features(width=640, height=480, file_size=12345) == {
        "width": 640.0, "height": 480.0, "aspect_ratio": pytest.approx(4 / 3), "file_size": 12345.0,
    }  # fmt: skip
    without_size = drift.file_features(width=300, height=600, file_size=None)
    assert without_size == {"width": 300.0, "height": 600.0, "aspect_ratio": 0.5}
    assert all(isinstance(value, float) for value in without_size.values())


def test_describe_image_has_every_image_and_file_feature():
    image = Image.new("RGB", (300, 200), (200, 150, 120))

    described = drift.describe_image(image, file_size=4321)
    assert list(described) == [*drift.IMAGE_FEATURES, *drift.FILE_FEATURES]
    assert described["width"] == 300.0 and described["height"] == 200.0
    assert described["aspect_ratio"] == pytest.approx(1.5)
    assert described["file_size"] == 4321.0
    assert described["brightness"] == pytest.approx(0.299 * 200 + 0.587 * 150 + 0.114 * 120)

    assert set(drift.describe_image(image)) == set(drift.IMAGE_FEATURES) | {"width", "height", "aspect_ratio"}


def test_columns_turn_missing_and_non_finite_values_into_nan():
    rows = [{"brightness": 1, "contrast": "2.5"}, {"brightness": None, "contrast": float("inf")}, {"contrast": "x"}]
    columns = drift.columns(rows, ["brightness", "contrast"])
    np.testing.assert_array_equal(columns["brightness"], [1.0, np.nan, np.nan])
    np.testing.assert_array_equal(columns["contrast"], [2.5, np.nan, np.nan])
    assert set(drift.columns(rows)) == set(drift.FEATURE_NAMES)


# --- the embedding projection --------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """500 points in 6 dimensions whose variance lies along known orthonormal directions (the columns
    of the returned basis), with standard deviations 5, 3, 2, 0.5, 0.2, 0.1, around an offset."""
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    scales = np.array([5.0, 3.0, 2.0, 0.5, 0.2, 0.1])
    data = (rng.normal(size=(500, 6)) * scales) @ basis.T + np.array([10.0, -4.0, 0.0, 2.0, 7.0, -1.0])
    return data, basis


def test_projection_matches_numpy_eigendecomposition(planted_embeddings):
    data, basis = planted_embeddings
    projection = drift.Projection.fit(data)
    components = np.asarray(projection.components)

    assert components.shape == (drift.EMBEDDING_COMPONENTS, 6)
    np.testing.assert_allclose(components @ components.T, np.eye(drift.EMBEDDING_COMPONENTS), atol=1e-10)
    np.testing.assert_allclose(projection.mean, data.mean(axis=0), atol=1e-12)

    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(data, rowvar=False))
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    ratios = np.asarray(projection.explained_variance_ratio)
    np.testing.assert_allclose(ratios, eigenvalues[:4] / eigenvalues.sum(), rtol=1e-9)
    assert np.all(np.diff(ratios) <= 0) and 0 < ratios.sum() <= 1.0
    assert ratios.sum() == pytest.approx(1 - eigenvalues[4:].sum() / eigenvalues.sum())
    for k in range(4):
        assert abs(components[k] @ eigenvectors[:, k]) == pytest.approx(1.0, abs=1e-9), k
        # and the planted directions are found (sampling noise aside)
        assert abs(components[k] @ basis[:, k]) > 0.98, k

    projected = projection.transform(data)
    np.testing.assert_allclose(projected, (data - data.mean(axis=0)) @ components.T, atol=1e-9)
    np.testing.assert_allclose(projected.var(axis=0, ddof=1), eigenvalues[:4], rtol=1e-9)
    covariance = np.cov(projected, rowvar=False)
    np.testing.assert_allclose(covariance - np.diag(np.diag(covariance)), 0.0, atol=1e-9)  # uncorrelated
    np.testing.assert_allclose(projection.transform(data.mean(axis=0)), 0.0, atol=1e-9)


def test_projection_sign_is_deterministic(planted_embeddings):
    data, _ = planted_embeddings
    projection = drift.Projection.fit(data)
    components = np.asarray(projection.components)
    for row in components:
        assert row[np.abs(row).argmax()] > 0  # the largest loading of each component is positive

    # The same cloud mirrored, or its rows in another order, gives the same components.
    np.testing.assert_allclose(drift.Projection.fit(-data).components, components, atol=1e-9)
    np.testing.assert_allclose(drift.Projection.fit(data[::-1]).components, components, atol=1e-9)


def test_projection_round_trips_through_json(planted_embeddings):
    data, _ = planted_embeddings
    projection = drift.Projection.fit(data)
    restored = drift.Projection.from_dict(json.loads(json.dumps(projection.to_dict())))

    assert restored == projection
    np.testing.assert_array_equal(restored.transform(data[:7]), projection.transform(data[:7]))
    features = restored.features(data[0])
    assert list(features) == list(drift.EMBEDDING_FEATURES)
    np.testing.assert_allclose(list(features.values()), projection.transform(data[0])[0])
    assert drift.Projection.from_dict(None) is None and drift.Projection.from_dict({}) is None


def test_projection_of_fewer_dimensions_than_components():
    data = np.random.default_rng(1).normal(size=(50, 3)) * [3.0, 2.0, 1.0]
    projection = drift.Projection.fit(data)
    assert np.asarray(projection.components).shape == (3, 3)
    assert sum(projection.explained_variance_ratio) == pytest.approx(1.0)
    assert list(projection.features(data[0])) == list(drift.EMBEDDING_FEATURES[:3])


# --- Holm's step-down procedure ------------------------------------------------------------------


def test_holm_stops_at_the_first_non_rejection():
    # Sorted: 0.005 <= 0.05/4, 0.01 <= 0.05/3, 0.03 > 0.05/2: stop. 0.04 <= 0.05 but is never reached.
    thresholds, rejected = drift.holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    assert thresholds == pytest.approx([0.05 / 3, 0.05, 0.05 / 2, 0.05 / 4])
    assert rejected == [True, False, False, True]


def test_holm_names_more_features_than_bonferroni_with_the_same_verdict():
    p_values = [0.001, 0.013, 0.02, 0.5]
    _, rejected = drift.holm(p_values, alpha=0.05)
    assert rejected == [True, True, True, False]  # 0.001 <= .0125, 0.013 <= .0167, 0.02 <= .025, 0.5 > .05
    assert [p <= 0.05 / 4 for p in p_values] == [True, False, False, False]  # Bonferroni names one


@pytest.mark.parametrize(
    ("p_values", "expected"),
    [
        ([], []),
        ([0.05], [True]),  # at the threshold: rejected
        ([0.0500001], [False]),
        ([0.2, 0.3, 0.9], [False, False, False]),
        ([0.0, 0.0, 0.0], [True, True, True]),
    ],
)
def test_holm_edge_cases(p_values, expected):
    assert drift.holm(p_values, alpha=0.05)[1] == expected


# --- where one upload lies in the reference set --------------------------------------------------


def test_outliers_percentiles_and_flags():
    reference = {"brightness": np.arange(1.0, 201.0), "contrast": np.array([5.0] * 10 + [np.nan]),
                 "sharpness": np.array([np.nan, np.nan])}  # fmt: skip

    def place(value: float, feature: str = "brightness") -> dict:
        (row,) = drift.outliers(reference, {feature: value})
        return row

    middle = place(100.0)
    assert middle["percentile"] == pytest.approx(100 * (99 + 100) / 400)  # mid-rank of 100 among 1..200
    assert middle["outlier"] is False and middle["direction"] == ""
    assert middle["reference_median"] == pytest.approx(100.5)
    assert middle["reference_p1"] == pytest.approx(np.percentile(np.arange(1.0, 201.0), 1))
    assert middle["reference_p99"] == pytest.approx(np.percentile(np.arange(1.0, 201.0), 99))

    below, above = place(-3.0), place(1e6)
    assert (below["percentile"], below["outlier"], below["direction"]) == (0.0, True, "low")
    assert (above["percentile"], above["outlier"], above["direction"]) == (100.0, True, "high")
    assert place(2.0)["percentile"] == pytest.approx(0.75) and place(2.0)["outlier"] is False
    assert place(199.0)["percentile"] == pytest.approx(99.25) and place(199.0)["outlier"] is False
    # The reference's own extremes lie in its outer half-percent (mid-rank 0.25 and 99.75 of 200 values).
    assert (place(1.0)["percentile"], place(1.0)["outlier"], place(1.0)["direction"]) == (0.25, True, "low")
    assert (place(200.0)["percentile"], place(200.0)["outlier"]) == (99.75, True)

    tie = place(5.0, "contrast")  # ties count half; the NaN in the reference is ignored
    assert tie["percentile"] == 50.0 and tie["reference_median"] == 5.0 and tie["outlier"] is False

    # No reference values, no value, or a feature without a reference: no row.
    assert drift.outliers(reference, {"sharpness": 1.0, "brightness": None, "entropy": 2.0}) == []
    rows = drift.outliers(reference, {"contrast": 5.0, "brightness": 300.0})
    assert [row["feature"] for row in rows] == ["brightness", "contrast"]  # in FEATURE_NAMES order


def test_outliers_tail_is_configurable():
    reference = {"entropy": np.linspace(0.0, 1.0, 101)}
    assert drift.outliers(reference, {"entropy": 0.03})[0]["outlier"] is False
    assert drift.outliers(reference, {"entropy": 0.03}, tail=5.0)[0]["outlier"] is True


def test_histogram_shares_bins_and_keeps_every_value():
    rng = np.random.default_rng(0)
    reference, current = rng.normal(0, 1, 500), np.append(rng.normal(0.5, 1, 80), [1e9])  # one extreme value
    histogram = drift.histogram(reference, current, bins=12)
    assert len(histogram["edges"]) == 13 and np.all(np.diff(histogram["edges"]) > 0)
    assert sum(histogram["reference"]) == 500 and sum(histogram["current"]) == 81
    assert histogram["edges"][-1] < 10  # the extreme value lands in the last bin, not on the scale
    constant = drift.histogram(np.full(5, 3.0), np.full(4, 3.0), bins=4)
    assert constant["edges"][0] == 2.5 and constant["edges"][-1] == 3.5
    assert sum(constant["reference"]) == 5 and sum(constant["current"]) == 4


# --- the window check on real synthetic photos ---------------------------------------------------


def photo(image: Image.Image) -> dict[str, float]:
    """Described as an upload is: JPEG-encoded, decoded, with its file size."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    decoded.load()
    return drift.describe_image(decoded, file_size=len(buffer.getvalue()))


@pytest.fixture(scope="module")
def lesion_features() -> dict[str, list[dict[str, float]]]:
    """A reference set and a disjoint window from the same generator, and the window brightened x1.3."""
    reference = [photo(image) for image, _ in SyntheticLesions(REFERENCE_N, size=SIZE, seed=41)]
    window_images = [image for image, _ in SyntheticLesions(WINDOW_N, size=SIZE, seed=42)]
    return {
        "reference": reference,
        "window": [photo(image) for image in window_images],
        "brighter": [photo(ImageEnhance.Brightness(image).enhance(1.3)) for image in window_images],
    }


def test_window_from_the_same_generator_is_not_drift(lesion_features):
    check = drift.check_drift(
        drift.columns(lesion_features["reference"]), drift.columns(lesion_features["window"]), drift.DriftConfig()
    )
    assert check.status == "no_drift", check.message
    assert not check.drifted and check.drifted_features == [] and not check.embedding_drifted
    assert check.message.startswith("No drift: none of 10 features")
    assert (check.current_n, check.reference_n) == (WINDOW_N, REFERENCE_N)
    assert [f.feature for f in check.features] == [*drift.IMAGE_FEATURES, *drift.FILE_FEATURES]
    assert check.correction == "holm" and check.method == "ks" and check.alpha == 0.05


def test_brightened_window_is_drift_in_brightness(lesion_features):
    check = drift.check_drift(
        drift.columns(lesion_features["reference"]), drift.columns(lesion_features["brighter"]), drift.DriftConfig()
    )
    assert check.status == "drift"
    assert "brightness" in check.drifted_features
    assert check.message.startswith(f"Drift in {len(check.drifted_features)} of 10 features:")
    assert "brightness" in check.message
    brightness = next(f for f in check.features if f.feature == "brightness")
    assert brightness.current_median > brightness.reference_median * 1.15
    assert brightness.group == "image" and brightness.label == drift.FEATURE_LABELS["brightness"]
    for feature in ("width", "height", "aspect_ratio"):  # the same camera: identical, never drifted
        same = next(f for f in check.features if f.feature == feature)
        assert same.p_value == pytest.approx(1.0) and not same.drifted
    json.dumps(check.to_dict())  # stored as JSON in the report


def test_p_values_equal_scipy_and_thresholds_follow_holm(lesion_features):
    reference, current = drift.columns(lesion_features["reference"]), drift.columns(lesion_features["brighter"])
    check = drift.check_drift(reference, current, drift.DriftConfig(alpha=0.05))

    for feature in check.features:
        expected = ks_2samp(reference[feature.feature], current[feature.feature]).pvalue
        assert feature.p_value == pytest.approx(expected, rel=1e-9, abs=1e-300), feature.feature
        assert feature.test == "ks"
        assert (feature.reference_n, feature.current_n) == (REFERENCE_N, WINDOW_N)
        assert feature.reference_median == pytest.approx(np.median(reference[feature.feature]))
        assert feature.current_median == pytest.approx(np.median(current[feature.feature]))
        assert sum(feature.histogram["reference"]) == REFERENCE_N and sum(feature.histogram["current"]) == WINDOW_N
        assert len(feature.histogram["edges"]) == drift.DriftConfig().bins + 1
    thresholds, rejected = drift.holm([f.p_value for f in check.features], 0.05)
    assert [f.threshold for f in check.features] == pytest.approx(thresholds)
    assert [f.drifted for f in check.features] == rejected
    assert sorted(f.threshold for f in check.features) == pytest.approx([0.05 / k for k in range(10, 0, -1)])


def test_too_small_a_window_is_insufficient_data_with_a_message(lesion_features):
    reference = drift.columns(lesion_features["reference"])
    check = drift.check_drift(reference, drift.columns(lesion_features["brighter"][:20]), drift.DriftConfig())
    assert check.status == "insufficient_data"
    assert check.message == "Too few uploads to judge: 20 in this window, at least 50 are needed."
    assert check.features == [] and not check.drifted and check.current_n == 20

    small_reference = drift.columns(lesion_features["reference"][:10])
    check = drift.check_drift(small_reference, drift.columns(lesion_features["brighter"]), drift.DriftConfig())
    assert check.status == "insufficient_data"
    assert "reference set has only 10 images" in check.message and "at least 30" in check.message


def test_features_missing_from_either_side_are_not_tested(lesion_features):
    reference = drift.columns([{**row, "probability_malignant": 0.3} for row in lesion_features["reference"]])
    # file_size known for only 40 of the 60 uploads: below min_current, so that feature is not tested.
    current_rows = [dict(row) for row in lesion_features["window"]]
    for row in current_rows[:20]:
        del row["file_size"]
    check = drift.check_drift(reference, drift.columns(current_rows), drift.DriftConfig(min_current=50))
    names = [f.feature for f in check.features]
    assert "probability_malignant" not in names and "file_size" not in names
    assert names == [*drift.IMAGE_FEATURES, "width", "height", "aspect_ratio"]
    assert check.current_n == WINDOW_N

    check = drift.check_drift(reference, drift.columns(current_rows), drift.DriftConfig(min_current=30))
    (file_size,) = [f for f in check.features if f.feature == "file_size"]
    assert file_size.current_n == 40


def test_evidently_report_agrees_with_the_check(lesion_features):
    reference, current = lesion_features["reference"], lesion_features["brighter"]
    check = drift.check_drift(drift.columns(reference), drift.columns(current), drift.DriftConfig())
    assert check.drifted

    snapshot = drift.evidently_report(reference, current, check)
    data = json.loads(json.dumps(snapshot.dict()))  # what the service stores
    value_drift = {
        metric["config"]["column"]: metric
        for metric in data["metrics"]
        if metric["config"]["type"].endswith("ValueDrift")
    }
    assert set(value_drift) == {f.feature for f in check.features}
    for feature in check.features:
        metric = value_drift[feature.feature]
        assert metric["value"] == pytest.approx(feature.p_value, rel=1e-9, abs=1e-300), feature.feature
        assert metric["config"]["method"] == "ks"
        # Evidently flags p <= threshold: its thresholds reproduce Holm's verdict column by column.
        assert (metric["value"] <= metric["config"]["threshold"]) == feature.drifted, feature.feature
    (count,) = [m for m in data["metrics"] if m["config"]["type"].endswith("DriftedColumnsCount")]
    assert count["value"]["count"] == len(check.drifted_features)

    html = snapshot.get_html_str(as_iframe=False)
    assert "<html" in html.lower() and len(html) > 10_000


def test_evidently_defaults_are_available_for_the_benchmark(lesion_features):
    reference, brighter = drift.columns(lesion_features["reference"]), drift.columns(lesion_features["brighter"])
    result = drift.evidently_default_check(reference, brighter)
    assert set(result) == {"any_column", "dataset", "drifted"}
    assert result["any_column"] is True and "brightness" in result["drifted"]


def test_a_single_generated_lesion_has_plausible_features():
    lesion = generate_lesion(np.random.default_rng(5), malignant=True, size=SIZE).image
    features = drift.describe_image(lesion, file_size=1000)
    assert 0 < features["brightness"] < 255 and features["contrast"] > 0 and features["sharpness"] > 0
    assert 0 < features["saturation"] < 1 and 0 < features["entropy"] <= 8
    assert (features["width"], features["height"], features["aspect_ratio"]) == (SIZE, SIZE, 1.0)
