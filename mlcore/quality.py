"""The photo-quality gate (issue 20): measures of a photo that a clinician can act on, thresholds calibrated
on a model's reference photos, and a verdict with advice in words. Plain NumPy and Pillow: no Django.

Each measure is taken on the photo's feature thumbnail (mlcore.drift.feature_thumbnail, 256 x 256, the
picture the drift features use, so a worker draws it once) and on its size:

| measure | what it catches | fails when |
|---|---|---|
| focus | an out-of-focus or shaken photo | log10 of the Laplacian's variance, per unit of contrast, is low |
| brightness | too dark, or overexposed | the median luminance is below its low or above its high threshold |
| clipped | glare and blown highlights | the share of pixels at full luminance is high |
| skin | not a photo of skin (a document, a scene, a solid colour) | the share of skin-coloured pixels is low |
| lesion_size | the lesion too small in the frame | the darker region's share of the frame is small |
| lesion_offset | the lesion far from the centre | the darker region's centre is far from the frame's |
| resolution | a photo too small to assess | its shorter side is below the model's input size |

`calibrate` sets each threshold at a quantile of the reference photos' values (so that about
`false_refusal` of good photos fail each measure), `assess` compares one photo's values with them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .drift import feature_thumbnail

# (name, the direction that fails: "low" or "high")
BOUNDS = (
    ("focus", "low"),
    ("brightness", "low"),
    ("brightness", "high"),
    ("clipped", "high"),
    ("skin", "low"),
    ("lesion_size", "low"),
    ("lesion_offset", "high"),
)
MEASURES = ("focus", "brightness", "clipped", "skin", "lesion_size", "lesion_offset", "resolution")
ADVICE = {
    ("focus", "low"): "out of focus: hold the camera 10–15 cm away, keep it still and tap the lesion to focus",
    ("brightness", "low"): "too dark: add light or move to a brighter room, without the flash straight on",
    ("brightness", "high"): "overexposed: move out of direct light or turn the flash off",
    ("clipped", "high"): "glare: tilt the camera a little so the light does not reflect straight back",
    ("skin", "low"): "this does not look like a photo of skin: photograph the lesion itself",
    ("lesion_size", "low"): "the lesion is too small in the frame: move closer so it fills about a third of it",
    ("lesion_offset", "high"): "the lesion is not centred: put it in the middle of the frame",
    ("resolution", "low"): "the photo is too small: send the camera's original, not a thumbnail",
}
CLIP_LEVEL = 250.0  # luminance counted as blown out
# Where a measure has no calibration (a model registered before the gate), it is not judged; the
# resolution never needs one: a photo smaller than the model's input cannot be assessed.
FIXED = {("resolution", "low")}


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    threshold: float | None
    direction: str  # "low": fails below the threshold; "high": fails above it
    passed: bool
    advice: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    assessable: bool
    checks: tuple[Check, ...]

    @property
    def reasons(self) -> list[str]:
        """What to do about each failed check, in words."""
        return [check.advice for check in self.checks if not check.passed]


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def skin_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose colour falls in the usual skin range in YCbCr (Cb 77–127, Cr 133–173; Chai and
    Ngan, 1999), a wide box that holds light to dark skin and most lesions on it."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cb = 128 - 0.168736 * red - 0.331264 * green + 0.5 * blue
    cr = 128 + 0.5 * red - 0.418688 * green - 0.081312 * blue
    return (cb >= 77) & (cb <= 127) & (cr >= 133) & (cr <= 173)


LESION_CONTRAST = 15.0  # luminance levels a lesion must be darker than the skin around it


def lesion_mask(luminance: np.ndarray) -> np.ndarray:
    """The region darker than the skin: a pigmented lesion is darker than the skin around it. The skin's
    level is the median of the frame's outer tenth (a lesion photo shows skin at its edges); the lesion
    is what lies below halfway from there to the darkest 5% of the photo. Empty when nothing is darker
    than the skin by LESION_CONTRAST."""
    height, width = luminance.shape
    band = max(1, min(height, width) // 10)
    border = np.concatenate([luminance[:band].ravel(), luminance[-band:].ravel(), luminance[:, :band].ravel(),
                             luminance[:, -band:].ravel()])  # fmt: skip
    skin, darkest = float(np.median(border)), float(np.percentile(luminance, 5))
    if skin - darkest < LESION_CONTRAST:
        return np.zeros(luminance.shape, dtype=bool)
    return luminance < (skin + darkest) / 2


def measure(image: Image.Image, *, full_size: tuple[int, int] | None = None) -> dict[str, float]:
    """The quality measures of one photo (see the module's table). `full_size`: the photo's size before
    any reduction in decoding (width, height); by default the image's own."""
    rgb = np.asarray(feature_thumbnail(image), dtype=np.float32)
    luminance = _luminance(rgb)
    laplacian = (-4 * luminance[1:-1, 1:-1] + luminance[:-2, 1:-1] + luminance[2:, 1:-1] + luminance[1:-1, :-2]
                 + luminance[1:-1, 2:])  # fmt: skip
    contrast = float(luminance.std(dtype=np.float64))
    lesion = lesion_mask(luminance)
    share = float(lesion.mean())
    if lesion.any():
        rows, cols = np.nonzero(lesion)
        height, width = lesion.shape
        offset = float(np.hypot(rows.mean() / height - 0.5, cols.mean() / width - 0.5) / np.hypot(0.5, 0.5))
    else:
        offset = 1.0
    width, height = full_size or image.size
    return {
        "focus": float(np.log10(laplacian.var(dtype=np.float64) / max(contrast, 1.0) ** 2 + 1e-9)),
        "brightness": float(np.median(luminance)),
        "clipped": float((luminance >= CLIP_LEVEL).mean()),
        "skin": float(skin_mask(rgb).mean()),
        "lesion_size": share,
        "lesion_offset": offset,
        "resolution": float(min(width, height)),
    }


# How far beyond the quantile a threshold goes, in units of the quantile's distance to the median. 0 for now:
# the policy (reference set size, rate per bound, margin) is set on bench/quality_gate.py's held-out photos.
MARGIN = 0.0
FLOORS = {"clipped:high": 0.02, "lesion_offset:high": 0.35}  # never stricter than these


def calibrate(values: Iterable[Mapping[str, float]], *, false_refusal: float = 0.01,
              min_resolution: int = 224, margin: float = MARGIN) -> dict[str, float]:  # fmt: skip
    """Thresholds from reference photos' measures: for each bound, the quantile that leaves
    `false_refusal` of them on the failing side, moved `margin` times its distance from the median further
    out (a reference set of a few hundred photos does not know its own tails), and never stricter than
    FLOORS. Keys are "name:low" or "name:high"."""
    rows = list(values)
    if len(rows) < 20:
        raise ValueError(f"calibrating the quality gate needs at least 20 reference photos, not {len(rows)}")
    if not 0 < false_refusal < 0.5:
        raise ValueError("false_refusal must be between 0 and 0.5")
    thresholds = {"resolution:low": float(min_resolution)}
    for name, direction in BOUNDS:
        column = np.asarray([row[name] for row in rows], dtype=np.float64)
        quantile = float(np.quantile(column, false_refusal if direction == "low" else 1 - false_refusal))
        threshold = quantile + margin * (quantile - float(np.median(column)))
        key = f"{name}:{direction}"
        thresholds[key] = max(threshold, FLOORS.get(key, threshold)) if direction == "high" else threshold
    return thresholds


def assess(values: Mapping[str, float], thresholds: Mapping[str, float]) -> Verdict:
    """A photo's measures against the thresholds: each check, and assessable when all pass. A bound
    without a threshold is reported but not judged."""
    checks = []
    for name, direction in (*BOUNDS, ("resolution", "low")):
        threshold = thresholds.get(f"{name}:{direction}")
        value = float(values[name])
        passed = threshold is None or (value >= threshold if direction == "low" else value <= threshold)
        checks.append(Check(name=name, value=value, threshold=threshold, direction=direction, passed=passed,
                            advice="" if passed else ADVICE[(name, direction)]))  # fmt: skip
    return Verdict(assessable=all(check.passed for check in checks), checks=tuple(checks))
