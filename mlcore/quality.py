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
    mode: str = "strict"

    @property
    def reasons(self) -> list[str]:
        """What to do about each failed check that refuses the photo, in words."""
        return [check.advice for check in self.checks if not check.passed and self._refuses(check)]

    @property
    def warnings(self) -> list[str]:
        """Failed checks that, in this mode, do not refuse the photo."""
        return [check.advice for check in self.checks if not check.passed and not self._refuses(check)]

    def _refuses(self, check: Check) -> bool:
        return self.mode == "strict" or (self.mode == "lenient" and check.name in HARD)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


SKIN_CR_LOW = 129  # Chai and Ngan's 133 left out very light, yellowish skin (Cr 131–132)


def skin_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose colour falls in the usual skin range in YCbCr (Cb 77–127, Cr 129–173; after Chai and
    Ngan, 1999, whose Cr floor of 133 missed very light skin), a wide box that holds light to dark skin
    and most lesions on it; grey, white and blue fall outside it (Cb 128 and above)."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cb = 128 - 0.168736 * red - 0.331264 * green + 0.5 * blue
    cr = 128 + 0.5 * red - 0.418688 * green - 0.081312 * blue
    return (cb >= 77) & (cb <= 127) & (cr >= SKIN_CR_LOW) & (cr <= 173)


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


# The total share of good photos the gate may refuse, spread evenly over the bounds. Each bound's threshold
# is the reference photos' quantile at that share, moved further out by MARGIN times its distance to the
# quartile on the same side: a reference set of a few hundred photos does not know its own tails, and the
# quartile's distance says how quickly the values thin out there (a normal tail from the median and MAD
# would not do: brightness, for one, spreads evenly across skin tones).
FALSE_REFUSAL = 0.02
MARGIN = 0.25
FLOORS = {"clipped:high": 0.02, "lesion_offset:high": 0.35}  # never stricter than these
HARD = {"skin", "resolution"}  # refused even by a lenient check: no risk can be read from such a photo


def calibrate(values: Iterable[Mapping[str, float]], *, false_refusal: float = FALSE_REFUSAL,
              min_resolution: int = 224, margin: float = MARGIN) -> dict[str, float]:  # fmt: skip
    """Thresholds from reference photos' measures, so that about `false_refusal` of good photos fail the
    gate as a whole (see MARGIN). Never stricter than FLOORS. Keys are "name:low" or "name:high"."""
    rows = list(values)
    if len(rows) < 20:
        raise ValueError(f"calibrating the quality gate needs at least 20 reference photos, not {len(rows)}")
    if not 0 < false_refusal < 0.5:
        raise ValueError("false_refusal must be between 0 and 0.5")
    share = false_refusal / len(BOUNDS)
    thresholds = {"resolution:low": float(min_resolution)}
    for name, direction in BOUNDS:
        column = np.asarray([row[name] for row in rows], dtype=np.float64)
        key = f"{name}:{direction}"
        if direction == "low":
            edge, quartile = np.quantile(column, [share, 0.25])
            thresholds[key] = float(edge - margin * (quartile - edge))
        else:
            edge, quartile = np.quantile(column, [1 - share, 0.75])
            thresholds[key] = float(max(edge + margin * (edge - quartile), FLOORS.get(key, -np.inf)))
    return thresholds


MODES = ("strict", "lenient", "off")


def assess(values: Mapping[str, float], thresholds: Mapping[str, float], *, mode: str = "strict") -> Verdict:
    """A photo's measures against the thresholds: each check, and whether the photo can be assessed. A
    bound without a threshold is reported but not judged. `mode`: "strict" refuses on any failed check,
    "lenient" only on the HARD ones (the others become warnings), "off" refuses nothing."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    checks = []
    for name, direction in (*BOUNDS, ("resolution", "low")):
        threshold = thresholds.get(f"{name}:{direction}")
        value = float(values[name])
        passed = threshold is None or (value >= threshold if direction == "low" else value <= threshold)
        checks.append(Check(name=name, value=value, threshold=threshold, direction=direction, passed=passed,
                            advice="" if passed else ADVICE[(name, direction)]))  # fmt: skip
    refusing = [c for c in checks if not c.passed and (mode == "strict" or (mode == "lenient" and c.name in HARD))]
    return Verdict(assessable=not refusing, checks=tuple(checks), mode=mode)
