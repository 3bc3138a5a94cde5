"""Per-image features for drift monitoring, defined once: the training reference set and every
upload are described by exactly these functions."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Image-level features, computed on a fixed-size copy so they do not depend on resolution.
IMAGE_FEATURES = ("brightness", "contrast", "sharpness", "saturation", "colourfulness")
# The model's output is a feature too: a shift in predicted risk is the drift that matters most.
PREDICTION_FEATURES = ("probability_malignant",)
FEATURE_NAMES = IMAGE_FEATURES + PREDICTION_FEATURES
FEATURE_SIZE = 256


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def image_features(image: Image.Image) -> dict[str, float]:
    """Brightness and contrast (mean and std of luminance, 0–255), sharpness (variance of the
    4-neighbour Laplacian of luminance), saturation (mean HSV saturation, 0–1) and colourfulness
    (Hasler and Süsstrunk, 2003)."""
    small = image.convert("RGB").resize((FEATURE_SIZE, FEATURE_SIZE), Image.Resampling.BILINEAR)
    rgb = np.asarray(small, dtype=np.float64)
    luminance = _luminance(rgb)
    laplacian = (
        -4 * luminance[1:-1, 1:-1]
        + luminance[:-2, 1:-1]
        + luminance[2:, 1:-1]
        + luminance[1:-1, :-2]
        + luminance[1:-1, 2:]
    )
    maximum = rgb.max(axis=2)
    minimum = rgb.min(axis=2)
    saturation = np.where(maximum > 0, (maximum - minimum) / np.maximum(maximum, 1e-9), 0.0)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colourfulness = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return {
        "brightness": float(luminance.mean()),
        "contrast": float(luminance.std()),
        "sharpness": float(laplacian.var()),
        "saturation": float(saturation.mean()),
        "colourfulness": float(colourfulness),
    }
