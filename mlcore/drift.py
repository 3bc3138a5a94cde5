"""Drift monitoring, defined once: the features of an image (the training reference set and every
upload are described by exactly these functions) and the statistics that decide whether a window
of uploads still looks like the reference set.

The decision (see bench/README.md for the calibration that chose it):

- each feature is compared with a two-sample Kolmogorov-Smirnov test, computed by Evidently's
  ``ks`` stat test; its p-value accounts for both sample sizes, unlike a distance with a fixed
  threshold (Evidently's default, normed Wasserstein > 0.1, flags pure sampling noise in windows of
  a few hundred uploads);
- the window is "drifted" when any feature is, with the family-wise error rate held at ``alpha``
  (default 5%) across all the features tested: Holm's step-down correction, which decides the
  window exactly as Bonferroni does and names more of the drifted features;
- a window with fewer than ``min_current`` uploads is reported as too small, not guessed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

# Pixel features, computed on a fixed-size copy so they do not depend on resolution.
IMAGE_FEATURES = ("brightness", "contrast", "sharpness", "saturation", "colourfulness", "entropy")
# What the camera and the upload path change: a new device or resolution shows here first.
FILE_FEATURES = ("width", "height", "aspect_ratio", "file_size")
# The model's output is a feature too: a shift in predicted risk is the drift that matters most.
PREDICTION_FEATURES = ("probability_malignant",)
# The model's penultimate layer, projected on the first principal components of the training set.
EMBEDDING_COMPONENTS = 4
EMBEDDING_FEATURES = tuple(f"embedding_{index + 1}" for index in range(EMBEDDING_COMPONENTS))
FEATURE_NAMES = IMAGE_FEATURES + FILE_FEATURES + PREDICTION_FEATURES + EMBEDDING_FEATURES
FEATURE_GROUPS = {
    **dict.fromkeys(IMAGE_FEATURES, "image"),
    **dict.fromkeys(FILE_FEATURES, "file"),
    **dict.fromkeys(PREDICTION_FEATURES, "prediction"),
    **dict.fromkeys(EMBEDDING_FEATURES, "embedding"),
}
FEATURE_LABELS = {
    "brightness": "Brightness (mean luminance, 0-255)",
    "contrast": "Contrast (std of luminance)",
    "sharpness": "Sharpness (variance of the Laplacian)",
    "saturation": "Saturation (mean HSV saturation)",
    "colourfulness": "Colourfulness (Hasler-Süsstrunk)",
    "entropy": "Entropy of luminance (bits)",
    "width": "Width (px)",
    "height": "Height (px)",
    "aspect_ratio": "Aspect ratio (width / height)",
    "file_size": "File size (bytes, as uploaded)",
    "probability_malignant": "Predicted probability of malignancy",
    **{name: f"Embedding component {name.rsplit('_', 1)[1]}" for name in EMBEDDING_FEATURES},
}
FEATURE_SIZE = 256


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=rgb.dtype)


def feature_thumbnail(image: Image.Image) -> Image.Image:
    """The picture the image features are measured on: the photo in RGB at FEATURE_SIZE x FEATURE_SIZE.
    An inference worker draws it in its decode threads, with the rest of a photo's pixel work (on a GPU,
    nvJPEG's batch decode makes it); image_features then takes it as it is: Pillow returns a copy when
    asked for the size an image already has, so the features are the same either way."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.resize((FEATURE_SIZE, FEATURE_SIZE), Image.Resampling.BILINEAR)


def image_features(image: Image.Image) -> dict[str, float]:
    """Brightness and contrast (mean and std of luminance, 0–255), sharpness (variance of the
    4-neighbour Laplacian of luminance), saturation (mean HSV saturation, 0–1), colourfulness
    (Hasler and Süsstrunk, 2003) and entropy (Shannon entropy of the 256-bin luminance histogram,
    in bits, 0–8), measured on the photo's feature_thumbnail."""
    small = feature_thumbnail(image)
    # float32 pixels (half the memory traffic of float64), float64 sums: the same values to ~1e-6.
    rgb = np.asarray(small, dtype=np.float32)
    luminance = _luminance(rgb)
    laplacian = (
        -4 * luminance[1:-1, 1:-1]
        + luminance[:-2, 1:-1]
        + luminance[2:, 1:-1]
        + luminance[1:-1, :-2]
        + luminance[1:-1, 2:]
    )
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maximum = np.maximum(np.maximum(red, green), blue)  # elementwise: a reduction over an axis of 3 is slow
    minimum = np.minimum(np.minimum(red, green), blue)
    saturation = np.where(maximum > 0, (maximum - minimum) / np.maximum(maximum, 1e-9), 0.0)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    f64 = np.float64
    colourfulness = np.sqrt(rg.std(dtype=f64) ** 2 + yb.std(dtype=f64) ** 2) + 0.3 * np.sqrt(
        rg.mean(dtype=f64) ** 2 + yb.mean(dtype=f64) ** 2
    )
    return {
        "brightness": float(luminance.mean(dtype=f64)),
        "contrast": float(luminance.std(dtype=f64)),
        "sharpness": float(laplacian.var(dtype=f64)),
        "saturation": float(saturation.mean(dtype=f64)),
        "colourfulness": float(colourfulness),
        "entropy": luminance_entropy(luminance),
    }


def luminance_entropy(luminance: np.ndarray) -> float:
    counts = np.bincount(np.clip(np.rint(luminance), 0, 255).astype(np.int64).ravel(), minlength=256)
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log2(probabilities)).sum()) + 0.0  # + 0.0: no "-0.0"


def file_features(*, width: int, height: int, file_size: int | None) -> dict[str, float]:
    features = {"width": float(width), "height": float(height), "aspect_ratio": width / height}
    if file_size is not None:
        features["file_size"] = float(file_size)
    return features


def describe_image(image: Image.Image, *, file_size: int | None = None) -> dict[str, float]:
    """Every image-level feature of a decoded image (orientation applied) and its upload size."""
    return {**image_features(image), **file_features(width=image.width, height=image.height, file_size=file_size)}


# --- the embedding projection ---------------------------------------------------------------------


@dataclass
class Projection:
    """PCA of the model's penultimate-layer embeddings, fitted on the training set."""

    mean: list[float]
    components: list[list[float]]  # EMBEDDING_COMPONENTS rows, each of the embedding's length
    explained_variance_ratio: list[float]

    @classmethod
    def fit(cls, embeddings: np.ndarray, components: int = EMBEDDING_COMPONENTS) -> Projection:
        data = np.asarray(embeddings, dtype=np.float64)
        mean = data.mean(axis=0)
        _, singular, vt = np.linalg.svd(data - mean, full_matrices=False)
        variance = singular**2
        k = min(components, vt.shape[0])
        basis = vt[:k]
        # A deterministic sign: the largest loading of each component is positive.
        signs = np.sign(basis[np.arange(k), np.abs(basis).argmax(axis=1)])
        basis = basis * np.where(signs == 0, 1, signs)[:, None]
        ratio = variance[:k] / max(variance.sum(), 1e-12)
        return cls(mean.tolist(), basis.tolist(), ratio.tolist())

    def transform(self, embeddings: np.ndarray) -> np.ndarray:
        data = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
        return (data - np.asarray(self.mean)) @ np.asarray(self.components).T

    def features(self, embedding: np.ndarray) -> dict[str, float]:
        values = self.transform(embedding)[0]
        return {name: float(value) for name, value in zip(EMBEDDING_FEATURES, values, strict=False)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping | None) -> Projection | None:
        if not data:
            return None
        return cls(list(data["mean"]), [list(row) for row in data["components"]],
                   list(data.get("explained_variance_ratio", [])))  # fmt: skip


# --- the window test ------------------------------------------------------------------------------


@dataclass
class DriftConfig:
    alpha: float = 0.05  # family-wise false-alarm rate per window
    min_current: int = 50  # fewer uploads than this: "too few uploads", no verdict
    min_reference: int = 30
    method: str = "ks"  # an Evidently stat test name; must return a p-value
    bins: int = 20


@dataclass
class FeatureDrift:
    feature: str
    group: str
    test: str
    p_value: float
    threshold: float  # the p-value below which this feature counts as drifted (after Holm)
    drifted: bool
    reference_n: int
    current_n: int
    reference_median: float
    current_median: float
    histogram: dict = field(default_factory=dict)  # {"edges": [...], "reference": [...], "current": [...]}

    @property
    def label(self) -> str:
        return FEATURE_LABELS.get(self.feature, self.feature)


@dataclass
class DriftCheck:
    status: str  # "drift", "no_drift" or "insufficient_data"
    message: str
    alpha: float
    method: str
    correction: str
    current_n: int
    reference_n: int
    features: list[FeatureDrift] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return self.status == "drift"

    @property
    def drifted_features(self) -> list[str]:
        return [f.feature for f in self.features if f.drifted]

    @property
    def embedding_drifted(self) -> bool:
        return any(f.drifted for f in self.features if f.group == "embedding")

    def to_dict(self) -> dict:
        return asdict(self)


def columns(rows: Iterable[Mapping[str, float]], names: Sequence[str] = FEATURE_NAMES) -> dict[str, np.ndarray]:
    """Feature rows (dicts) as one float array per feature, NaN where a row lacks the feature."""
    rows = list(rows)
    return {name: np.array([_number(row.get(name)) for row in rows], dtype=np.float64) for name in names}


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


def stat_test(method: str):
    """Evidently's registered stat test `method` for numerical columns (the engine)."""
    from evidently.legacy.calculations.stattests.registry import get_registered_stattest
    from evidently.legacy.core import ColumnType

    return get_registered_stattest(method, ColumnType.Numerical)


def holm(p_values: Sequence[float], alpha: float) -> tuple[list[float], list[bool]]:
    """Holm's step-down procedure: the i-th smallest p-value (from 0) is compared with alpha/(m-i),
    and testing stops at the first that is above its threshold. Returns, per input, its threshold
    and whether it is rejected (drifted)."""
    m = len(p_values)
    thresholds, rejected = [0.0] * m, [False] * m
    stopped = False
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        thresholds[index] = alpha / (m - rank)
        stopped = stopped or p_values[index] > thresholds[index]
        rejected[index] = not stopped
    return thresholds, rejected


def check_drift(
    reference: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray], config: DriftConfig | None = None,
    *, histograms: bool = True,
) -> DriftCheck:  # fmt: skip
    """Compare a window of uploads with the reference set, feature by feature (see the module doc)."""
    import pandas as pd
    from evidently.legacy.core import ColumnType

    config = config or DriftConfig()
    test = stat_test(config.method)
    current_n = max((int(np.isfinite(v).sum()) for v in current.values()), default=0)
    reference_n = max((int(np.isfinite(v).sum()) for v in reference.values()), default=0)
    base = {"alpha": config.alpha, "method": config.method, "correction": "holm", "current_n": current_n,
            "reference_n": reference_n}  # fmt: skip
    if current_n < config.min_current:
        return DriftCheck(status="insufficient_data", message=(
            f"Too few uploads to judge: {current_n} in this window, at least {config.min_current} are needed."
        ), **base)  # fmt: skip
    if reference_n < config.min_reference:
        return DriftCheck(status="insufficient_data", message=(
            f"The reference set has only {reference_n} images; at least {config.min_reference} are needed."
        ), **base)  # fmt: skip

    tested: list[tuple[str, np.ndarray, np.ndarray, float]] = []
    for name in FEATURE_NAMES:
        if name not in reference or name not in current:
            continue
        ref = reference[name][np.isfinite(reference[name])]
        cur = current[name][np.isfinite(current[name])]
        if len(ref) < config.min_reference or len(cur) < config.min_current:
            continue
        result = test(pd.Series(ref), pd.Series(cur), ColumnType.Numerical, config.alpha)
        tested.append((name, ref, cur, float(result.drift_score)))
    thresholds, rejected = holm([p for *_, p in tested], config.alpha)
    features = []
    for (name, ref, cur, p_value), threshold, drifted in zip(tested, thresholds, rejected, strict=True):
        features.append(FeatureDrift(
            feature=name, group=FEATURE_GROUPS[name], test=config.method, p_value=p_value, threshold=threshold,
            drifted=drifted, reference_n=len(ref), current_n=len(cur),
            reference_median=float(np.median(ref)), current_median=float(np.median(cur)),
            histogram=histogram(ref, cur, config.bins) if histograms else {},
        ))  # fmt: skip
    drifted = [f for f in features if f.drifted]
    if drifted:
        names = ", ".join(f.feature for f in drifted)
        message = f"Drift in {len(drifted)} of {len(features)} features: {names}."
    else:
        message = f"No drift: none of {len(features)} features differs at a {config.alpha:.0%} family-wise level."
    return DriftCheck(status="drift" if drifted else "no_drift", message=message, features=features, **base)


def histogram(reference: np.ndarray, current: np.ndarray, bins: int) -> dict:
    """Shared bins over both samples (1st to 99th percentile of their union, so one extreme value
    does not squash the picture); values outside fall in the end bins."""
    both = np.concatenate([reference, current])
    low, high = np.percentile(both, [1, 99])
    if not high > low:
        low, high = float(both.min()) - 0.5, float(both.max()) + 0.5
    edges = np.linspace(low, high, bins + 1)
    return {
        "edges": edges.tolist(),
        "reference": np.histogram(np.clip(reference, low, high), edges)[0].tolist(),
        "current": np.histogram(np.clip(current, low, high), edges)[0].tolist(),
    }


def evidently_default_check(reference: Mapping[str, np.ndarray], current: Mapping[str, np.ndarray]) -> dict:
    """What Evidently decides with its defaults (DataDriftPreset(): per column its default stat test
    and threshold; the data set drifts when at least half the columns do). For the calibration
    benchmark."""
    import pandas as pd
    from evidently.legacy.calculations.stattests.registry import get_stattest
    from evidently.legacy.core import ColumnType

    drifted, tested = [], 0
    for name in FEATURE_NAMES:
        if name not in reference or name not in current:
            continue
        ref = pd.Series(reference[name][np.isfinite(reference[name])])
        cur = pd.Series(current[name][np.isfinite(current[name])])
        if ref.empty or cur.empty:
            continue
        test = get_stattest(ref, cur, ColumnType.Numerical, None)
        tested += 1
        if test(ref, cur, ColumnType.Numerical, None).drifted:
            drifted.append(name)
    return {"any_column": bool(drifted), "dataset": tested > 0 and len(drifted) / tested >= 0.5, "drifted": drifted}


def evidently_report(reference_rows: list[dict], current_rows: list[dict], check: DriftCheck):
    """The full Evidently report for a window, configured as the check was (same test, and each
    column's Holm threshold), for its HTML and its JSON snapshot."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    names = [f.feature for f in check.features]
    definition = DataDefinition(numerical_columns=names)
    reference = Dataset.from_pandas(pd.DataFrame(columns(reference_rows, names)), data_definition=definition)
    current = Dataset.from_pandas(pd.DataFrame(columns(current_rows, names)), data_definition=definition)
    # Evidently marks a column drifted when its p-value is at most its threshold; features that Holm's
    # procedure stopped before are given a threshold just below their p-value, so both agree.
    thresholds = {f.feature: f.threshold if f.drifted else min(f.threshold, f.p_value * 0.999) for f in check.features}
    report = Report([DataDriftPreset(columns=names, method=check.method, per_column_threshold=thresholds)])
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # correlations of constant columns
        return report.run(current, reference)


def outliers(reference: Mapping[str, np.ndarray], values: Mapping[str, float], tail: float = 0.5) -> list[dict]:
    """Where one upload lies in the reference distribution of each feature: its percentile (0-100),
    and a flag when it is outside the central range (below the `tail` or above the 100-`tail`
    percentile; outside the reference's range altogether reads as 0 or 100)."""
    rows = []
    for name in FEATURE_NAMES:
        value = _number(values.get(name))
        ref = reference.get(name)
        if ref is None or math.isnan(value):
            continue
        ref = np.sort(ref[np.isfinite(ref)])
        if len(ref) == 0:
            continue
        below = np.searchsorted(ref, value, side="left")
        not_above = np.searchsorted(ref, value, side="right")
        percentile = 100.0 * (below + not_above) / (2 * len(ref))  # mid-rank: ties count half
        flagged = percentile < tail or percentile > 100 - tail
        rows.append({
            "feature": name, "value": value, "percentile": float(percentile), "outlier": bool(flagged),
            "direction": ("low" if percentile < 50 else "high") if flagged else "",
            "reference_p1": float(np.percentile(ref, 1)), "reference_median": float(np.median(ref)),
            "reference_p99": float(np.percentile(ref, 99)),
        })  # fmt: skip
    return rows
