"""Synthetic skin lesions whose classes differ the way melanomas differ from benign moles.

The ABCD rule of dermoscopy scores Asymmetry, Border irregularity, Colour variegation and
Diameter. Each generated lesion draws a latent severity (benign ~ Beta(2, 5), malignant ~
Beta(5, 2)) and derives all four from it with noise, so the classes overlap like atypical naevi
and early melanomas do: a model can learn real signal, but not reach a perfect score. Skin tone,
lighting, hairs, position and elongation vary independently of the class, as nuisances.

Skin tone can also be set by its individual typology angle (``skin_ita``): ITA = arctan((L* - 50) / b*)
in CIELAB (D65, sRGB), the angle dermatology uses to band skin from very light to dark. This module holds
the numpy sRGB <-> CIELAB conversion and ``skin_rgb_for_ita``; mlcore.synthetic_classes draws the seven
HAM10000 diagnoses and mlcore.synthetic_sets writes the published data set layouts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .skintone import ita, lab_to_srgb, srgb_to_lab

CLASS_NAMES = ("benign", "malignant")

_SKIN_TONES = np.array(
    [(241, 213, 190), (228, 190, 160), (212, 165, 130), (190, 140, 105), (160, 110, 80), (120, 80, 58)],
    dtype=np.float64,
)
_BENIGN_BROWNS = np.array([(150, 100, 65), (125, 80, 50), (170, 120, 80), (110, 70, 45)], dtype=np.float64)
_MALIGNANT_PALETTE = np.array(
    [(60, 35, 25), (25, 18, 18), (140, 60, 50), (95, 105, 125), (165, 115, 80), (100, 55, 35)],
    dtype=np.float64,
)


def ita_of_rgb(rgb: np.ndarray) -> np.ndarray:
    """The individual typology angle in degrees (mlcore.skintone.ita) of sRGB colours (0-255, last axis 3)."""
    lab = srgb_to_lab(np.asarray(rgb, dtype=np.float64))
    return ita(lab[..., 0], lab[..., 2])


def skin_rgb_for_ita(ita_degrees: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """An sRGB skin colour (3 floats, 0-255) whose ITA is ``ita_degrees``.

    Skin's hue stays in a narrow range: a* about 8-14 (redness) and b* about 14-22 (yellowness), drawn from
    ``rng`` or fixed at 11 and 18 without one. L* = 50 + b* tan(ITA) then gives the angle. L* is kept in
    [20, 90], where the colour is still skin and not black or white, by solving b* instead, and the
    chroma is reduced until the colour is inside the sRGB gamut, so the angle is exact, not clipped away.
    """
    if not -89.0 <= ita_degrees <= 89.0:
        raise ValueError(f"ITA {ita_degrees} is outside [-89, 89] degrees; skin lies between about -60 and 80.")
    a_star, b_star = (11.0, 18.0) if rng is None else (rng.uniform(8.0, 14.0), rng.uniform(14.0, 22.0))
    slope = np.tan(np.radians(ita_degrees))
    for _ in range(60):
        lightness = 50.0 + b_star * slope
        if not 20.0 <= lightness <= 90.0:
            lightness = float(np.clip(lightness, 20.0, 90.0))
            b_star = (lightness - 50.0) / slope
        rgb = lab_to_srgb(np.array([lightness, a_star, b_star]), clip=False)
        if rgb.min() >= 0.0 and rgb.max() <= 255.0:
            return rgb
        a_star, b_star = a_star * 0.9, b_star * 0.9
    raise ValueError(f"no sRGB skin colour found for ITA {ita_degrees}")  # unreachable for [-89, 89]


@dataclass(frozen=True)
class SyntheticLesion:
    image: Image.Image
    mask: np.ndarray  # bool, True inside the lesion
    malignant: bool
    severity: float


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.random((cells, cells)).astype(np.float32)
    field = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(field, dtype=np.float64)
    return (array - array.min()) / max(array.max() - array.min(), 1e-6)


def generate_lesion(
    rng: np.random.Generator, *, malignant: bool, size: int = 128, skin_ita: float | None = None
) -> SyntheticLesion:
    """One lesion. ``skin_ita`` sets the skin colour by its ITA (skin_rgb_for_ita); None draws one of the six
    tones of ``_SKIN_TONES`` as always. The lesion's colours are absolute here, not relative to the skin:
    mlcore.synthetic_classes draws lesions that darken with the skin."""
    severity = float(rng.beta(5, 2) if malignant else rng.beta(2, 5))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # The helpers draw from rng in this order: changing it changes every image of a seed.
    skin = _skin(rng, size, xx, yy, skin_ita)
    distance, edge = _outline(rng, size, severity, xx, yy)
    softness = 0.6 + 2.5 * (1.0 - severity) * rng.uniform(0.5, 1.0)
    alpha = 1.0 / (1.0 + np.exp((distance - edge) / softness))
    mask = distance <= edge
    lesion = _lesion_colours(rng, size, severity, distance, edge)
    pixels = skin * (1 - alpha[:, :, None]) + lesion * alpha[:, :, None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    _draw_hairs(rng, image, size)
    image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.2, 0.7)))
    return SyntheticLesion(image=image, mask=mask, malignant=malignant, severity=severity)


def _skin(
    rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray, skin_ita: float | None = None
) -> np.ndarray:
    """Skin: a tone, a lighting gradient and fine texture, independent of the class."""
    if skin_ita is None:
        tone = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.92, 1.06, size=3)
    else:
        tone = skin_rgb_for_ita(skin_ita, rng)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size
    lighting = 1.0 + rng.uniform(0.05, 0.2) * gradient
    texture = 1.0 + 0.04 * (_smooth_noise(rng, size, size // 4) - 0.5) + rng.normal(0, 0.012, (size, size))
    return tone[None, None, :] * (lighting * texture)[:, :, None]


def _outline(
    rng: np.random.Generator, size: int, severity: float, xx: np.ndarray, yy: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(distance, edge): each pixel's distance from the lesion's centre, and the border's distance in the
    pixel's direction. The diameter grows with severity; so do asymmetry (low harmonics) and border
    irregularity (high harmonics)."""
    radius = size * (0.11 + 0.17 * severity + rng.normal(0, 0.025))
    radius = float(np.clip(radius, size * 0.08, size * 0.38))
    cx = size / 2 + rng.normal(0, size * 0.05)
    cy = size / 2 + rng.normal(0, size * 0.05)
    dx, dy = xx - cx, yy - cy
    theta = np.arctan2(dy, dx)
    elongation = rng.uniform(0.8, 1.2)
    rot = rng.uniform(0, np.pi)
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = -dx * np.sin(rot) + dy * np.cos(rot)
    distance = np.sqrt((u / elongation) ** 2 + (v * elongation) ** 2)
    boundary = np.ones_like(theta)
    for k in (1, 2, 3):
        amplitude = max(0.0, rng.normal(0.02 + 0.16 * severity, 0.03)) / k
        boundary += amplitude * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    for k in range(5, 17):
        amplitude = max(0.0, rng.normal(0.002 + 0.022 * severity, 0.006))
        boundary += amplitude * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return distance, radius * boundary


def _lesion_colours(
    rng: np.random.Generator, size: int, severity: float, distance: np.ndarray, edge: np.ndarray
) -> np.ndarray:
    """Colour: one brown with a gentle radial fall-off when benign; several blotchy colours when not."""
    radial = np.clip(distance / np.maximum(edge, 1e-6), 0, 1)
    base = _BENIGN_BROWNS[rng.integers(len(_BENIGN_BROWNS))] * rng.uniform(0.85, 1.15)
    lesion = base[None, None, :] * (0.9 + 0.2 * radial)[:, :, None]
    n_colours = int(np.clip(round(1 + 4 * severity + rng.normal(0, 0.7)), 1, 5))
    if n_colours > 1:
        chosen = rng.choice(len(_MALIGNANT_PALETTE), size=n_colours - 1, replace=False)
        for index in chosen:
            blotch = _smooth_noise(rng, size, int(rng.integers(3, 7)))
            weight = np.clip((blotch - rng.uniform(0.45, 0.7)) * 4.0, 0, 1) * (0.5 + 0.5 * severity)
            lesion = lesion * (1 - weight[:, :, None]) + _MALIGNANT_PALETTE[index][None, None, :] * weight[:, :, None]
    lesion *= (1.0 + rng.normal(0, 0.03, (size, size)))[:, :, None]
    return lesion


def _draw_hairs(rng: np.random.Generator, image: Image.Image, size: int) -> None:
    """Hairs cross skin and lesion alike."""
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        points = rng.uniform(-0.1 * size, 1.1 * size, size=(3, 2))
        ts = np.linspace(0, 1, 24)[:, None]
        curve = (1 - ts) ** 2 * points[0] + 2 * (1 - ts) * ts * points[1] + ts**2 * points[2]
        shade = int(rng.integers(20, 70))
        draw.line([tuple(p) for p in curve], fill=(shade, shade - 10 if shade > 10 else 0, 0), width=1)


class SyntheticLesions(Sequence[tuple[Image.Image, int]]):
    """A deterministic, balanced, map-style data set: item i is always the same image.

    It needs no torch, but a torch DataLoader can index it directly.
    """

    def __init__(self, count: int, *, size: int = 128, seed: int = 0) -> None:
        self.count = count
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.count

    def lesion(self, index: int) -> SyntheticLesion:
        if not 0 <= index < self.count:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        return generate_lesion(rng, malignant=bool(index % 2), size=self.size)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:  # type: ignore[override]
        lesion = self.lesion(index)
        return lesion.image, int(lesion.malignant)

    def __iter__(self) -> Iterator[tuple[Image.Image, int]]:
        for index in range(self.count):
            yield self[index]

    @property
    def labels(self) -> list[int]:
        return [index % 2 for index in range(self.count)]


def write_image_folder(
    root: str | Path, *, splits: dict[str, int], size: int = 128, seed: int = 0, image_format: str = "JPEG"
) -> Path:
    """Write an ImageFolder tree, e.g. ``splits={"train": 200, "test": 50}`` gives train/{benign,malignant}/..."""
    root = Path(root)
    extension = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[image_format]
    for offset, (split, count) in enumerate(splits.items()):
        data = SyntheticLesions(count, size=size, seed=seed * 1000 + offset)
        for index in range(count):
            image, label = data[index]
            folder = root / split / CLASS_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{split}_{index:05d}.{extension}", format=image_format)
    return root
