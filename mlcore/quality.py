"""The photo-quality gate (issue 20): measures of a photo that a clinician can act on, thresholds calibrated
on a model's reference photos, and a verdict with advice in words. Plain NumPy and Pillow: no Django.

Each measure is taken on the photo's feature thumbnail (mlcore.drift.feature_thumbnail, 256 x 256, the
picture the drift features use, so a worker draws it once) and on its size:

| measure | what it catches | fails when |
|---|---|---|
| focus | an out-of-focus or shaken photo | little of the detail is at the finest scale (see `focus`) |
| brightness | too dark, or overexposed | the median luminance is below its low or above its high threshold |
| clipped | glare, blown highlights, overexposure | the share of pixels with a channel at full scale is high |
| skin | not skin (a document, a scene, a solid colour) | few pixels around the lesion (not white) are skin-coloured |
| lesion_size | the lesion too small in the frame | the share of the frame unlike the skin around it is small |
| lesion_offset | the lesion far from the centre | that region's centre is far from the frame's |
| resolution | a photo too small to assess | its shorter side is below the model's input size |

`calibrate` sets each threshold at a quantile of the reference photos' values, moved out by a margin (so
that about `false_refusal` of good photos fail the gate in all); `assess` compares one photo's values
with them. bench/quality_gate.py measures the whole gate on synthetic photos (bench/README.md).
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
    ("clipped", "high"): "glare or overexposed: move out of direct light, turn the flash off, or tilt the camera a "
    "little so the light does not reflect straight back",
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


def _sums(values: np.ndarray, k: int) -> np.ndarray:
    """Sums over k x k blocks of a 2-D array (rows and columns that do not fill a block are left out), in
    its own dtype. For a small k by k strided additions, else by reductions one axis at a time: NumPy's
    reduction over a short axis, or over two strided axes at once, is several times slower."""
    height, width = values.shape[0] // k * k, values.shape[1] // k * k
    values = values[:height, :width]
    if k > 4:
        rows = values.reshape(height // k, k, width).sum(axis=1, dtype=values.dtype)
        return rows.reshape(height // k, width // k, k).sum(axis=2, dtype=values.dtype)
    rows = values[0::k].copy()
    for offset in range(1, k):
        rows += values[offset::k]
    total = rows[:, 0::k].copy()
    for offset in range(1, k):
        total += rows[:, offset::k]
    return total


def _gradient(luminance: np.ndarray) -> np.ndarray:
    """|d/dx| + |d/dy| at each pixel of a float array (forward differences; 0 past the last row and
    column), less the frame's mean slope in each direction: light falling evenly across it is no detail."""
    across = np.diff(luminance, axis=1)
    down = np.diff(luminance, axis=0)
    gradient = np.zeros_like(luminance)
    gradient[:, :-1] = np.abs(across - across.mean())
    gradient[:-1] += np.abs(down - down.mean())
    return gradient


FOCUS_FINE = 2  # the fine scale: 2 x 2 means of the thumbnail (below it, JPEG's blocks and an upscaled photo's
# interpolation say more about the file than about the focus)
FOCUS_SCALE = 4  # the coarse scale, in fine pixels, the fine one is compared with
FOCUS_BLOCK = 16  # fine pixels per block (32 pixels of the 256-pixel thumbnail)
# A block whose mean gradient per fine pixel is below this share of the photo's median luminance has no detail
# to judge focus by: flat skin in a blurred photo, JPEG's noise, a solid colour. Skin in focus has about 1% to
# 2% of its level at this scale (the darkest skin too: the share does not depend on the tone), a photo
# blurred by 4 pixels about 0.4%.
FLAT = 0.006


def focus(luminance: np.ndarray, level: float | None = None) -> float:
    """How much of the detail is at the fine scale: per block, log2 of the mean gradient per pixel of the
    picture reduced FOCUS_FINE times over that of the picture reduced FOCUS_SCALE times more, per pixel of
    the first; and the sharpest quarter of the blocks (a lesion in focus before a soft background
    passes). A smooth picture, the most blurred there is, gives about log2(1/4) = -2; skin in focus about
    0 to 1, noise above. It does not depend on exposure, on the lesion's contrast, or on light falling
    evenly across the frame (the frame's mean slope is taken out of every gradient). Blocks with too
    little detail to judge (FLAT) are left out; with hardly any detail at all the photo is as blurred as
    can be: -2. `luminance`: 8-bit or float; `level`: its median, when known."""
    # 8-bit values summed in 16-bit integers (exact: 4 pixels at most 1020) and the rest in float32: small,
    # fast temporaries
    values = luminance.astype(np.int16) if luminance.dtype == np.uint8 else luminance.astype(np.float32)
    fine_pixels = _sums(values, FOCUS_FINE).astype(np.float32)  # sums of FOCUS_FINE**2 pixels
    fine = _sums(_gradient(fine_pixels), FOCUS_BLOCK) / (FOCUS_BLOCK**2 * FOCUS_FINE**2)
    coarse_pixels = _sums(fine_pixels, FOCUS_SCALE) / (FOCUS_SCALE * FOCUS_FINE) ** 2
    step = FOCUS_BLOCK // FOCUS_SCALE
    coarse = _sums(_gradient(coarse_pixels), step) / step**2 / FOCUS_SCALE  # per fine pixel
    level = float(np.median(luminance)) if level is None else level
    detailed = fine >= FLAT * max(level, 1.0)
    if detailed.sum() < max(1, detailed.size // 16):
        return -2.0
    ratio = np.sort(np.log2(fine[detailed] / np.maximum(coarse[detailed], 1e-6) / FOCUS_SCALE))
    place = 0.75 * (len(ratio) - 1)  # the 75th percentile, interpolated as np.percentile does (and faster)
    low = int(place)
    sharpest = ratio[low] + (ratio[min(low + 1, len(ratio) - 1)] - ratio[low]) * (place - low)
    return float(np.clip(sharpest, -2.0, 4.0))


SKIN_CR_LOW = 127  # Chai and Ngan's 133 left out very light, yellowish skin (Cr 127–132)


def skin_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose colour falls in the usual skin range in YCbCr (Cb 77–127, Cr 127–173; after Chai and
    Ngan, 1999, whose Cr floor of 133 missed very light, yellowish skin), a wide box that holds light to dark skin
    and most lesions on it; grey, white and blue fall outside it (Cb 128 and above)."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cb = 128 - 0.168736 * red - 0.331264 * green + 0.5 * blue
    cr = 128 + 0.5 * red - 0.418688 * green - 0.081312 * blue
    return (cb >= 77) & (cb <= 127) & (cr >= SKIN_CR_LOW) & (cr <= 173)


def _spread(values: np.ndarray, grow) -> np.ndarray:
    """A 3 x 3 minimum (grow=np.minimum) or maximum (np.maximum) filter, edges kept."""
    rows = values.copy()
    grow(rows[1:], values[:-1], out=rows[1:])
    grow(rows[:-1], values[1:], out=rows[:-1])
    out = rows.copy()
    grow(out[:, 1:], rows[:, :-1], out=out[:, 1:])
    grow(out[:, :-1], rows[:, 1:], out=out[:, :-1])
    return out


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold: the cut that best splits the values' histogram into two classes."""
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-9:
        return high
    width = (high - low) / bins
    counts = np.bincount(np.minimum(((values - low) / width).astype(np.intp), bins - 1).ravel(), minlength=bins)
    centres = low + (np.arange(bins) + 0.5) * width
    below = np.cumsum(counts)
    above = below[-1] - below
    mass = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.nan_to_num((mass[-1] * below / below[-1] - mass) ** 2 / (below * above))
    return low + (int(np.argmax(between)) + 1) * width


LESION_CONTRAST = 0.08  # the least colour difference from the skin, relative to its luminance, of a lesion


def lesion_mask(pixels: np.ndarray) -> np.ndarray:
    """The region whose colour differs from the skin around it: darker or lighter, redder or bluer (a
    brown mole on dark skin is often lighter than the skin). The skin's colour is a plane per channel
    through the medians of the frame's four outer tenths (a lesion photo shows skin at its edges; the
    plane follows an even light falling across the frame). Each pixel's distance from it, relative to
    the skin's luminance, is opened (a 3 x 3 minimum, then maximum) to drop hairs, and split by Otsu's
    threshold on its logarithm (a faint lesion with a dark blotch is one region, not two), never below
    LESION_CONTRAST. `pixels`: RGB (height x width x 3) or luminance (height x width)."""
    colour = np.asarray(pixels, dtype=np.float32)
    colour = colour[..., None] if colour.ndim == 2 else colour
    height, width, channels = colour.shape
    band = max(1, min(height, width) // 10)
    top, bottom = np.median(np.stack([colour[:band], colour[-band:]]).reshape(2, -1, channels), axis=1)
    left, right = np.median(np.stack([colour[:, :band], colour[:, -band:]]).reshape(2, -1, channels), axis=1)
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5
    centre = (top + bottom + left + right) / 4
    slope_y, slope_x = (bottom - top) / (1 - band / height), (right - left) / (1 - band / width)
    squared = np.zeros((height, width), dtype=np.float32)
    for channel in range(channels):  # channel by channel: a reduction over an axis of 3 is slow
        skin = centre[channel] + slope_y[channel] * ys[:, None] + slope_x[channel] * xs[None, :]
        squared += (colour[..., channel] - skin) ** 2
    level = float(_luminance(centre) if channels == 3 else centre[0])
    distance = np.sqrt(squared) / max(level, 1.0)
    distance = _spread(_spread(distance, np.minimum), np.maximum)
    logarithm = np.log(distance + 0.02)
    cut = max(float(np.exp(_otsu(logarithm))) - 0.02, LESION_CONTRAST)
    return distance > cut


def _median(histogram) -> float:
    """The median of 8-bit values from their 256-bin histogram (Pillow's, a tenth of the time of a sort)."""
    counts = np.cumsum(histogram)
    return float(np.searchsorted(counts, counts[-1] / 2))


def measure(image: Image.Image, *, full_size: tuple[int, int] | None = None) -> dict[str, float]:
    """The quality measures of one photo (see the module's table). `full_size`: the photo's size before
    any reduction in decoding (width, height); by default the image's own.

    Focus and brightness read every pixel of the thumbnail's grey (Pillow's, the ITU-R 601 luma of
    _luminance), the clipped share half the size (a small glint still counts), skin and the lesion a
    quarter (box means, in Pillow: as good for shares of the frame, sixteen times cheaper, and hairs
    fade): about 1 ms in all."""
    thumbnail = feature_thumbnail(image)
    grey = thumbnail.convert("L")
    half = thumbnail.reduce(2)
    quarter = np.asarray(half.reduce(2), dtype=np.float32)
    half = np.asarray(half)
    blown = np.maximum(np.maximum(half[..., 0], half[..., 1]), half[..., 2]) >= CLIP_LEVEL  # elementwise: faster
    lesion = lesion_mask(quarter)
    # The skin around the lesion, not white: a blue-grey melanoma is not skin-coloured, and must not make
    # its photo "not skin"; nor must blown-out skin, whose colour is gone.
    around = ~lesion & (np.minimum(np.minimum(quarter[..., 0], quarter[..., 1]), quarter[..., 2]) < CLIP_LEVEL)
    count = np.count_nonzero(around)
    skin = np.count_nonzero(skin_mask(quarter) & around) / count if count >= 0.05 * around.size else 0.0
    if lesion.any():
        rows, cols = np.nonzero(lesion)
        height, width = lesion.shape
        offset = float(np.hypot(rows.mean() / height - 0.5, cols.mean() / width - 0.5) / np.hypot(0.5, 0.5))
    else:
        offset = 1.0
    width, height = full_size or image.size
    brightness = _median(grey.histogram())
    return {
        "focus": focus(np.asarray(grey), brightness),
        "brightness": brightness,
        "clipped": float(np.count_nonzero(blown) / blown.size),
        "skin": float(skin),
        "lesion_size": float(np.count_nonzero(lesion) / lesion.size),
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
# Never stricter than these: a high bound's threshold is at least, a low bound's at most, its floor. Skin:
# at least 60% of the pixels around the lesion skin-coloured is enough (the synthetic reference is all skin,
# and its quantile would refuse a photo for a few pixels of a ruler or a sleeve).
FLOORS = {"clipped:high": 0.02, "lesion_offset:high": 0.35, "skin:low": 0.6}
# Shares of the frame whose spread grows with their size (a lesion covers 2% of one good photo and 40% of
# another): their margin is taken on a log scale, a ratio rather than a difference.
RATIO_SCALE = {"lesion_size"}
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
        if name in RATIO_SCALE:
            edge, quartile = np.log(np.maximum(np.quantile(column, [share, 0.25]), 1e-4))
            thresholds[key] = float(np.exp(edge - margin * (quartile - edge)))
            continue
        if direction == "low":
            edge, quartile = np.quantile(column, [share, 0.25])
            thresholds[key] = float(min(edge - margin * (quartile - edge), FLOORS.get(key, np.inf)))
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
