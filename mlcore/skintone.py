"""Skin tone by the individual typology angle (issue 21, item 4). Plain NumPy and Pillow: no Django, no torch.

The individual typology angle (ITA; Chardon et al., 1991) places a skin colour by its CIELAB lightness L* and
its yellow–blue coordinate b*: ITA = arctan((L* − 50) / b*) · 180/π. Lighter skin has a higher angle. The six
bands of Del Bino et al. (2006, 2013) are used by dermatology and by the fairness audits of skin-lesion models
(Kinyanjui et al., 2020; Groh et al., 2021):

| band | ITA |
|---|---|
| very_light | above 55° |
| light | 41° to 55° |
| intermediate | 28° to 41° |
| tan | 10° to 28° |
| brown | −30° to 10° |
| dark | −30° and below |

`measure_skin_tone` reads the ITA of the skin AROUND a lesion: a lesion is darker, lighter or redder than the
skin and would pull the tone towards its own colour (a dark naevus would make light skin "brown").
Fitzpatrick types from a data set's metadata map to the bands by `FITZPATRICK_TO_BAND`, and
`band_from_metadata_or_image` prefers them to the measured tone when both are known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image

from .quality import CLIP_LEVEL, _spread, lesion_mask, skin_mask

# --- sRGB <-> CIELAB (D65) ---------------------------------------------------------------------------------------

# IEC 61966-2-1 linear sRGB -> CIE XYZ, D65 white. The white point is taken as the matrix's row sums (0.95047,
# 1, 1.08883 to five places) so that sRGB white is exactly L* 100, a* 0, b* 0.
_RGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_WHITE = _RGB_TO_XYZ.sum(axis=1)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_DELTA = 6 / 29  # CIE 1976: the cube root's linear segment below DELTA**3


def _linear(encoded: np.ndarray) -> np.ndarray:
    """sRGB's transfer function undone: encoded values in [0, 1] to linear light."""
    return np.where(encoded <= 0.04045, encoded / 12.92, ((encoded + 0.055) / 1.055) ** 2.4)


_LINEAR_8BIT = _linear(np.arange(256) / 255.0)  # a table for 8-bit pixels: one lookup per value, no powers


def srgb_to_lab(rgb: ArrayLike) -> np.ndarray:
    """CIELAB (L*, a*, b*; D65 white) of 8-bit sRGB colours, in an array of shape (..., 3) whose last axis is
    R, G, B on the 0–255 scale (uint8 is looked up in a table; floats are converted exactly)."""
    values = np.asarray(rgb)
    if values.shape[-1:] != (3,):
        raise ValueError(f"srgb_to_lab needs colours on a last axis of 3 (R, G, B), not shape {values.shape}")
    if values.dtype == np.uint8:
        linear = _LINEAR_8BIT[values]
    else:
        linear = _linear(np.clip(values.astype(np.float64) / 255.0, 0.0, 1.0))
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > _DELTA**3, np.cbrt(xyz), xyz / (3 * _DELTA**2) + 4 / 29)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], axis=-1)


def lab_to_srgb(lab: ArrayLike, *, clip: bool = True) -> np.ndarray:
    """The inverse of srgb_to_lab: sRGB on the 0–255 scale (floats, not rounded) of CIELAB colours of shape
    (..., 3). Colours outside the sRGB gamut are clipped to it, channel by channel; with clip=False they are
    not (a channel below 0 or above 255 says the colour is out of gamut)."""
    values = np.asarray(lab, dtype=np.float64)
    fy = (values[..., 0] + 16) / 116
    f = np.stack([fy + values[..., 1] / 500, fy, fy - values[..., 2] / 200], axis=-1)
    xyz = np.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4 / 29)) * _WHITE
    linear = xyz @ _XYZ_TO_RGB.T
    if clip:
        linear = np.clip(linear, 0.0, 1.0)
    magnitude = np.abs(linear)
    encoded = np.sign(linear) * np.where(
        magnitude <= 0.0031308, 12.92 * magnitude, 1.055 * magnitude ** (1 / 2.4) - 0.055
    )
    return encoded * 255.0


# --- the angle and its bands -------------------------------------------------------------------------------------


def ita(lightness: ArrayLike, b: ArrayLike) -> float | np.ndarray:
    """The individual typology angle in degrees, arctan((L* − 50) / b*) · 180/π, of scalars or arrays.

    Computed as arctan2(L* − 50, b*), which equals the formula wherever b* > 0 (all real skin is yellowish)
    and stays defined elsewhere: at b* = 0 it gives ±90° (the formula's limit from the yellow side), and for
    a bluish colour (b* < 0) an angle beyond ±90° whose sign is still that of L* − 50, so a light colour is
    never called dark (the plain formula would flip its sign there). Such colours are not skin; the
    result lies in (−180°, 180°]."""
    angle = np.degrees(np.arctan2(np.asarray(lightness, dtype=np.float64) - 50.0, np.asarray(b, dtype=np.float64)))
    return float(angle) if np.ndim(angle) == 0 else angle


@dataclass(frozen=True)
class Band:
    slug: str
    label: str
    above: float  # the band holds angles above this, up to and including the next lighter band's `above`


# Lightest first. A boundary belongs to the darker band, as in Del Bino et al. (2013): 55° is light, 41°
# intermediate, 28° tan, 10° brown, −30° dark (the "dark < −30°" differs only at exactly −30°).
BANDS = (
    Band("very_light", "Very light", 55.0),
    Band("light", "Light", 41.0),
    Band("intermediate", "Intermediate", 28.0),
    Band("tan", "Tan", 10.0),
    Band("brown", "Brown", -30.0),
    Band("dark", "Dark", -math.inf),
)
BAND_SLUGS = tuple(band.slug for band in BANDS)
BAND_LABELS = {band.slug: band.label for band in BANDS}


def band_of(ita_degrees: float) -> str:
    """The slug of the band an angle falls in (see BANDS: a value on a boundary belongs to the darker band)."""
    value = float(ita_degrees)
    if math.isnan(value):
        raise ValueError("an ITA of NaN has no band: measure the skin tone first, or leave the band unknown")
    for band in BANDS:
        if value > band.above:
            return band.slug
    return BANDS[-1].slug


def skin_colour(ita_degrees: float, *, b: float | None = None, a: float = 10.0) -> np.ndarray:
    """An 8-bit sRGB skin colour (uint8 R, G, B) of a given angle, for synthetic photos and tests. Real skin's
    b* grows a little as it darkens (about 11 on very light, 19 on dark skin): by default b* = 15 − 0.06 · ITA,
    and L* = 50 + b* · tan(ITA) follows. Rounding to 8 bits moves the angle by well under a degree. Angles
    from about −60° to 75° give colours in the sRGB gamut; others raise a ValueError."""
    b = 15.0 - 0.06 * ita_degrees if b is None else b
    if not -90 < ita_degrees < 90 or b <= 0:
        raise ValueError(f"no skin colour has ITA {ita_degrees}° with b* {b}: use an angle in (−90°, 90°), b* > 0")
    lightness = 50.0 + b * math.tan(math.radians(ita_degrees))
    if not 5.0 <= lightness <= 95.0:
        raise ValueError(f"ITA {ita_degrees}° with b* {b:.1f} needs L* {lightness:.1f}, outside skin's 5–95")
    return np.round(lab_to_srgb([lightness, a, b])).astype(np.uint8)


# --- measuring a photo ------------------------------------------------------------------------------------------

THUMBNAIL_SIDE = 64  # the photo is measured at about this shorter side (box means: hairs fade, noise averages)
LESION_MARGIN = 0.05  # the lesion grown by this share of the shorter side: its soft rim is not skin either
MIN_SKIN_FRACTION = 0.10  # below this share of the frame left as skin, the tone is not measured


def _thumbnail(image: Image.Image | ArrayLike) -> np.ndarray:
    """The photo as 8-bit RGB, reduced by box means to a shorter side of THUMBNAIL_SIDE to 2 · THUMBNAIL_SIDE − 1
    (a smaller photo is kept as it is)."""
    if isinstance(image, Image.Image):
        rgb = image if image.mode == "RGB" else image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise ValueError(f"measure_skin_tone needs an RGB image (height x width x 3), not shape {array.shape}")
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array.astype(np.float64)), 0, 255).astype(np.uint8)
        rgb = Image.fromarray(np.ascontiguousarray(array[..., :3]), mode="RGB")
    factor = min(rgb.size) // THUMBNAIL_SIDE
    return np.asarray(rgb.reduce(factor) if factor > 1 else rgb)


def measure_skin_tone(image: Image.Image | ArrayLike) -> dict[str, float | str] | None:
    """The tone of the skin around the lesion: {"ita": degrees, "band": slug, "skin_fraction": share}.

    `image`: a PIL image or an RGB array (height x width x 3, 0–255). A worker that has the photo's feature
    thumbnail (mlcore.drift.feature_thumbnail, 256 x 256) passes that: reducing it is cheap (about 0.3 ms in all).

    Skin is what remains of a THUMBNAIL_SIDE thumbnail once the lesion (mlcore.quality.lesion_mask: the region
    whose colour differs from the frame's edges), grown by LESION_MARGIN, is taken out, and of that only the
    pixels in the skin-colour range (mlcore.quality.skin_mask) that are not blown out: a ruler, a sleeve or
    glare is not skin. `skin_fraction` is that skin's share of the frame.

    The angle is that of the median L* and the median b* of those pixels, rather than the median of each
    pixel's angle: lightness and yellowness are each estimated robustly (hairs, shadows, a lesion's rim are
    a minority on either side of the median), and no single pixel's b* near 0 (a grey hair, a highlight),
    where the angle swings by 180°, counts for more than its colour.

    None when less than MIN_SKIN_FRACTION of the frame is skin: a photo of something else (a document, a solid
    blue), a lesion filling the frame, or a colour cast that leaves no skin-coloured pixel. A tone read from a
    few pixels would be read from whatever they are, so no tone is better than a wrong one."""
    small = _thumbnail(image)
    pixels = small.astype(np.float32)
    grown = lesion_mask(pixels)
    for _ in range(max(1, round(LESION_MARGIN * min(small.shape[:2])))):
        grown = _spread(grown, np.maximum)
    darkest_channel = np.minimum(np.minimum(pixels[..., 0], pixels[..., 1]), pixels[..., 2])
    keep = ~grown & skin_mask(pixels) & (darkest_channel < CLIP_LEVEL)
    fraction = np.count_nonzero(keep) / keep.size
    if fraction < MIN_SKIN_FRACTION:
        return None
    lab = srgb_to_lab(small[keep])
    angle = ita(float(np.median(lab[:, 0])), float(np.median(lab[:, 2])))
    return {"ita": angle, "band": band_of(angle), "skin_fraction": float(fraction)}


# --- Fitzpatrick types from metadata ------------------------------------------------------------------------------

# Fitzpatrick's types (I–VI) rate how skin reacts to the sun, by a person's own account; the ITA measures its
# colour. They are not the same scale: studies that measured both (Del Bino and Bernerd, 2013; Osto et al., 2022)
# find them correlated but far from one to one (people of type III measure from light to tan). This is the
# ordinal mapping the skin-lesion fairness audits use (Kinyanjui et al., 2020; Groh et al., 2021): each type
# to the band in the same place of the order, so that metadata and measured tones can share one column.
FITZPATRICK_TO_BAND = {1: "very_light", 2: "light", 3: "intermediate", 4: "tan", 5: "brown", 6: "dark"}
_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}
_UNKNOWN = {"", "NAN", "NONE", "NULL", "NA", "N/A", "UNKNOWN", "?"}


def fitzpatrick_type(value: object) -> int | None:
    """A Fitzpatrick skin type as an int 1–6 from a metadata value: "I".."VI", "1".."6", 1..6, 3.0 (a CSV
    column with gaps reads as floats), with an optional "type" or "FST" before it, any case. None for a
    missing value (None, NaN, "", "unknown"); a ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        number = float(value)
        if math.isnan(number):
            return None
        if number.is_integer() and 1 <= number <= 6:
            return int(number)
    elif isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        for prefix in ("TYPE", "FST"):
            text = text.removeprefix(prefix)
        if text in _UNKNOWN:
            return None
        if text in _ROMAN:
            return _ROMAN[text]
        if text.isdigit() and 1 <= int(text) <= 6:
            return int(text)
    raise ValueError(f"unknown Fitzpatrick skin type {value!r}: expected I–VI or 1–6, or empty when unknown")


def band_from_fitzpatrick(value: object) -> str | None:
    """The ITA band FITZPATRICK_TO_BAND gives a metadata value, or None when the value is missing."""
    skin_type = fitzpatrick_type(value)
    return None if skin_type is None else FITZPATRICK_TO_BAND[skin_type]


def band_from_metadata_or_image(fitzpatrick: object, measured: dict | float | None) -> dict | None:
    """One photo's skin-tone band: from the metadata's Fitzpatrick type where it has one (a clinician's or the
    patient's rating beats a colour read through a phone's white balance), else from the measured tone.

    `measured`: measure_skin_tone's result, an ITA in degrees, or None. Returns {"band": slug, "source":
    "fitzpatrick" or "ita", "ita": the measured angle or None (kept for drift monitoring either way)}, or None
    when neither is known. An unreadable Fitzpatrick value raises a ValueError (see fitzpatrick_type)."""
    angle = measured.get("ita") if isinstance(measured, dict) else measured
    angle = None if angle is None or math.isnan(float(angle)) else float(angle)
    band = band_from_fitzpatrick(fitzpatrick)
    if band is not None:
        return {"band": band, "source": "fitzpatrick", "ita": angle}
    if angle is not None:
        return {"band": band_of(angle), "source": "ita", "ita": angle}
    return None
