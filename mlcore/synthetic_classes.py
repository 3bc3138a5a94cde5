"""Synthetic lesions of the seven HAM10000 diagnoses, photographed several times, on skin of any ITA.

Each diagnosis has its own look, close to the dermoscopic textbook and overlapping the way real ones do:

- nv (naevus): today's benign lesion (mlcore.data): small, round, one even brown.
- mel (melanoma): today's malignant one: ABCD from a latent severity, with black, blue-grey and red blotches.
- bkl (benign keratosis): light tan, sharp-edged ("stuck on"), coarse mottled texture with milia-like dots.
- bcc (basal cell carcinoma): pink and pearly (translucent highlights, a rolled rim), fine red branching vessels.
- akiec (actinic keratosis / Bowen's): red, patchy, ill-defined, rough, with whitish scale.
- df (dermatofibroma): small, firm, a brown ring round a pale centre.
- vasc (vascular lesion): red-purple, well-defined round lobules with paler septa.

Colours are reflectances relative to the skin (a lesion darkens with the skin it is on), so the classes look
alike in every tone up to the camera's 8 bits. **The planted skin-tone gap**: with ``faint_on_dark`` f > 0,
on skin of ITA below 10 degrees (the tan/brown boundary: the brown and dark bands) the malignant diagnoses'
distinguishing features are scaled by (1 - f) towards a benign look: melanoma's severity (size, asymmetry,
border, colour variegation) towards a naevus's, basal cell carcinoma's pink, sheen and vessels and actinic
keratosis's redness and scale towards a plain tan-brown. At f = 1 they are nearly benign-looking there; 0
(the default) plants nothing, and light skin is never touched. How strong, measured once with a throwaway
script: a 4-layer CNN at 64 px, 150 lesions a class to train and 50 to test, skin ITA uniform in [-50, 70],
the same f in training and test: f = 0 gave 85% accuracy on light skin (ITA >= 10) and 88% on dark; f = 0.7
gave 83% and 75%, malignant sensitivity 95% and 88% (single runs: a few points are noise). Training on
light skin only, as a shifted benchmark would, was not measured here.

A lesion is drawn once, from its own seed, on a canvas larger than the photo; each photo of it (its own seed)
rotates, shifts and zooms that canvas and adds its own lighting gradient, exposure, hairs and blur: the same
lesion, shape, colours and diagnosis, seen again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import map_coordinates

from mlcore.data import _draw_hairs, _smooth_noise, ita_of_rgb, skin_rgb_for_ita

DIAGNOSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
MALIGNANT_DIAGNOSES = frozenset({"akiec", "bcc", "mel"})
# HAM10000's class mix (images per class / 10,015).
HAM10000_MIX = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}
HAM10000_MIX = {name: count / 10015 for name, count in HAM10000_MIX.items()}
DARK_ITA = 10.0  # faint_on_dark applies below this ITA: the brown and dark bands

# Reflectances relative to the skin: today's absolute palettes (mlcore.data) over a mid skin tone.
_BROWNS = np.array([(0.71, 0.61, 0.5), (0.59, 0.48, 0.38), (0.8, 0.73, 0.62), (0.52, 0.42, 0.35)])
_MELANOMA_PALETTE = np.array(
    [(0.28, 0.21, 0.19), (0.12, 0.11, 0.14), (0.66, 0.36, 0.38), (0.45, 0.64, 0.96), (0.78, 0.7, 0.62),
     (0.47, 0.33, 0.27)]
)  # fmt: skip
_PLAIN_TAN = np.array([0.78, 0.66, 0.55])  # what faded malignant colours tend to
_CANVAS = 1.65  # canvas side / photo side: room to rotate, shift and zoom out without showing an edge


@dataclass(frozen=True)
class LesionPhoto:
    image: Image.Image
    mask: np.ndarray  # bool, True inside the lesion
    diagnosis: str
    skin_ita: float  # the skin colour's ITA
    photo_ita: float  # the ITA of that colour under this photo's exposure


@dataclass(frozen=True)
class _Canvas:
    """Where a lesion is drawn: pixel coordinates about the centre, and the photo size that scales it."""

    x: np.ndarray
    y: np.ndarray
    size: int
    strength: float  # 1, or 1 - faint_on_dark for a malignant diagnosis on dark skin

    @property
    def side(self) -> int:
        return self.x.shape[0]

    def noise(self, rng: np.random.Generator, cells: int) -> np.ndarray:
        return _smooth_noise(rng, self.side, max(2, cells))


def _outline(
    rng: np.random.Generator, canvas: _Canvas, radius: float, asymmetry: float, irregularity: float, spread=0.2
) -> tuple[np.ndarray, np.ndarray]:
    """(distance, edge) of a blob at the centre: low harmonics make it asymmetric, high ones make the border
    irregular. It is shrunk if needed so that it stays inside any photo of it."""
    elongation, rot = rng.uniform(1 - spread, 1 + spread), rng.uniform(0, np.pi)
    u = canvas.x * np.cos(rot) + canvas.y * np.sin(rot)
    v = -canvas.x * np.sin(rot) + canvas.y * np.cos(rot)
    distance = np.sqrt((u / elongation) ** 2 + (v * elongation) ** 2)
    theta = np.arctan2(canvas.y, canvas.x)
    boundary = np.ones_like(theta)
    for k in (1, 2, 3):
        amplitude = max(0.0, rng.normal(asymmetry, 0.03)) / k
        boundary += amplitude * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    for k in range(5, 17):
        boundary += max(0.0, rng.normal(irregularity, 0.006)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    extent = radius * boundary.max() * max(elongation, 1 / elongation)
    return distance, radius * boundary * min(1.0, 0.34 * canvas.size / extent)


def _blend(distance: np.ndarray, edge: np.ndarray, softness: float) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, mask): a sigmoid edge `softness` pixels wide, and the inside."""
    alpha = 1.0 / (1.0 + np.exp(np.clip((distance - edge) / softness, -50, 50)))
    return alpha, distance <= edge


def _faded(colour: np.ndarray, towards: np.ndarray, strength: float) -> np.ndarray:
    return towards + strength * (np.asarray(colour) - towards)


def _melanocytic(rng: np.random.Generator, canvas: _Canvas, severity: float):
    """nv and mel (mlcore.data's ABCD lesion): size, asymmetry, border and colour variegation grow with severity."""
    size, scale = canvas.size, canvas.size / 96
    radius = float(np.clip(size * (0.11 + 0.17 * severity + rng.normal(0, 0.025)), size * 0.08, size * 0.34))
    distance, edge = _outline(rng, canvas, radius, 0.02 + 0.16 * severity, 0.002 + 0.022 * severity)
    alpha, mask = _blend(distance, edge, scale * (0.6 + 2.5 * (1.0 - severity) * rng.uniform(0.5, 1.0)))
    radial = np.clip(distance / np.maximum(edge, 1e-6), 0, 1)
    lesion = _BROWNS[rng.integers(len(_BROWNS))] * rng.uniform(0.85, 1.15) * (0.9 + 0.2 * radial)[:, :, None]
    n_colours = int(np.clip(round(1 + 4 * severity + rng.normal(0, 0.7)), 1, 5))
    for index in rng.choice(len(_MELANOMA_PALETTE), size=n_colours - 1, replace=False):
        blotch = canvas.noise(rng, int(rng.integers(3, 7)))
        weight = np.clip((blotch - rng.uniform(0.45, 0.7)) * 4.0, 0, 1) * (0.5 + 0.5 * severity)
        lesion = lesion * (1 - weight[:, :, None]) + _MELANOMA_PALETTE[index] * weight[:, :, None]
    return alpha, mask, lesion


def _nv(rng: np.random.Generator, canvas: _Canvas):
    return _melanocytic(rng, canvas, float(rng.beta(2, 5)))


def _mel(rng: np.random.Generator, canvas: _Canvas):
    severity = float(rng.beta(5, 2))
    return _melanocytic(rng, canvas, 0.25 + canvas.strength * (severity - 0.25))  # 0.25: a naevus's typical


def _bkl(rng: np.random.Generator, canvas: _Canvas):
    size, scale = canvas.size, canvas.size / 96
    distance, edge = _outline(rng, canvas, size * rng.uniform(0.12, 0.26), 0.07, 0.01, spread=0.3)
    alpha, mask = _blend(distance, edge, scale * rng.uniform(0.3, 0.6))
    tan = np.array([0.84, 0.74, 0.6]) * rng.uniform(0.78, 1.04)
    mottle = 1.0 + 0.22 * (canvas.noise(rng, size // 3) - 0.5) + 0.1 * (canvas.noise(rng, size // 8) - 0.5)
    lesion = tan * mottle[:, :, None]
    dots = _dots(rng, canvas, int(rng.integers(3, 10)), radius=1.2 * scale)
    lesion = lesion + 0.3 * (dots > 0)[:, :, None] * (1.05 - lesion)  # milia-like cysts: small pale dots
    return alpha, mask, lesion


def _bcc(rng: np.random.Generator, canvas: _Canvas):
    size, scale, strength = canvas.size, canvas.size / 96, canvas.strength
    distance, edge = _outline(rng, canvas, size * rng.uniform(0.1, 0.24), 0.06, 0.006)
    alpha, mask = _blend(distance, edge, scale * rng.uniform(0.8, 1.6))
    radial = np.clip(distance / np.maximum(edge, 1e-6), 0, 1)
    pink = np.array([1.0, 0.8, 0.82]) * rng.uniform(0.95, 1.03)
    lesion = np.broadcast_to(_faded(pink, _PLAIN_TAN, strength), distance.shape + (3,)).copy()
    sheen = np.clip(canvas.noise(rng, 4) - 0.4, 0, 1) * 2 + 0.6 * np.exp(-(((radial - 0.85) / 0.1) ** 2))
    lesion += strength * 0.16 * sheen[:, :, None]  # pearly, translucent, with a rolled rim
    vessels = _vessels(rng, canvas, int(rng.integers(3, 8)), 0.7 * float(np.median(edge)))
    lesion = _faded(lesion, np.array([0.75, 0.22, 0.28]), 1 - 0.85 * strength * vessels[:, :, None])
    return alpha, mask, lesion


def _akiec(rng: np.random.Generator, canvas: _Canvas):
    size, scale, strength = canvas.size, canvas.size / 96, canvas.strength
    distance, edge = _outline(rng, canvas, size * rng.uniform(0.14, 0.28), 0.12, 0.02, spread=0.3)
    alpha, mask = _blend(distance, edge, scale * rng.uniform(2.5, 4.5))  # ill-defined
    patches = canvas.noise(rng, 5)[:, :, None]
    red = np.array([0.93, 0.66, 0.64]) * (1 - patches) + np.array([0.86, 0.54, 0.54]) * patches
    lesion = _faded(red, _PLAIN_TAN, strength)
    rough = 1.0 + strength * 0.16 * (canvas.noise(rng, int(size / 2.5)) - 0.5)
    flakes = np.clip((canvas.noise(rng, size // 2) - 0.6) * 5, 0, 1) * strength
    lesion = lesion * rough[:, :, None] + 0.35 * flakes[:, :, None] * np.array([1.0, 0.97, 0.9])
    return alpha, mask, lesion


def _df(rng: np.random.Generator, canvas: _Canvas):
    size, scale = canvas.size, canvas.size / 96
    distance, edge = _outline(rng, canvas, size * rng.uniform(0.08, 0.14), 0.03, 0.004, spread=0.1)
    alpha, mask = _blend(distance, edge, scale * rng.uniform(1.0, 2.0))
    radial = np.clip(distance / np.maximum(edge, 1e-6), 0, 1)
    ring = np.clip((radial - rng.uniform(0.3, 0.45)) / 0.25, 0, 1)[:, :, None]
    brown = np.array([0.7, 0.58, 0.48]) * rng.uniform(0.85, 1.1)
    network = 1.0 + 0.12 * (canvas.noise(rng, size // 3) - 0.5)
    lesion = np.array([1.06, 1.02, 0.98]) * (1 - ring) + brown * network[:, :, None] * ring
    return alpha, mask, lesion


def _vasc(rng: np.random.Generator, canvas: _Canvas):
    size, scale = canvas.size, canvas.size / 96
    alphas, colours = [], []
    for _ in range(int(rng.integers(2, 7))):
        cx, cy = np.clip(rng.normal(0, 0.06 * size, 2), -0.15 * size, 0.15 * size)
        distance = np.hypot(canvas.x - cx, canvas.y - cy)
        alphas.append(_blend(distance, np.full_like(distance, size * rng.uniform(0.04, 0.09)), 0.45 * scale)[0])
        shade = _faded([0.42, 0.18, 0.42], np.array([0.62, 0.2, 0.38]), rng.uniform(0, 1))
        colours.append(shade * rng.uniform(0.85, 1.1))
    alphas = np.array(alphas)
    order = np.sort(alphas, axis=0)
    lesion = np.array(colours)[np.argmax(alphas, axis=0)]
    septa = order[-2] if len(alphas) > 1 else np.zeros_like(order[-1])
    lesion = lesion + 0.25 * np.clip(septa * 2, 0, 1)[:, :, None] * (1.0 - lesion)  # paler between lobules
    alpha = order[-1]
    return alpha, alpha >= 0.5, lesion


_DRAW: dict[str, Callable] = {
    "akiec": _akiec, "bcc": _bcc, "bkl": _bkl, "df": _df, "mel": _mel, "nv": _nv, "vasc": _vasc
}  # fmt: skip


def _dots(rng: np.random.Generator, canvas: _Canvas, count: int, radius: float) -> np.ndarray:
    """An 8-bit map of `count` small round dots near the centre."""
    layer = Image.new("L", (canvas.side, canvas.side))
    draw = ImageDraw.Draw(layer)
    for cx, cy in rng.normal(canvas.side / 2, 0.08 * canvas.size, (count, 2)):
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    return np.asarray(layer)


def _vessels(rng: np.random.Generator, canvas: _Canvas, count: int, reach: float) -> np.ndarray:
    """Fine branching vessel lines from near the centre outwards, as weights in [0, 1]."""
    layer = Image.new("L", (canvas.side, canvas.side))
    draw = ImageDraw.Draw(layer)
    centre = canvas.side / 2
    for _ in range(count):
        heading = rng.uniform(0, 2 * np.pi)
        point = centre + rng.normal(0, 0.15 * reach, 2)
        steps = [tuple(point)]
        for _ in range(6):
            heading += rng.normal(0, 0.5)
            point = point + reach / 6 * np.array([np.cos(heading), np.sin(heading)])
            steps.append(tuple(point))
        draw.line(steps, fill=255, width=1)
    return np.asarray(layer.filter(ImageFilter.GaussianBlur(0.4)), dtype=np.float64) / 255.0


def draw_lesion(
    rng: np.random.Generator, diagnosis: str, *, size: int, faint_on_dark: float = 0.0, skin_ita: float
) -> tuple[np.ndarray, np.ndarray]:
    """(reflectance, mask) of one lesion on its patch of skin, on a canvas _CANVAS times the photo's side: the
    reflectance (canvas x canvas x 3) multiplies the skin colour; skin texture is in it."""
    if diagnosis not in _DRAW:
        raise ValueError(f"unknown diagnosis {diagnosis!r}: use one of {', '.join(DIAGNOSES)}")
    if not 0.0 <= faint_on_dark <= 1.0:
        raise ValueError(f"faint_on_dark must lie in [0, 1], not {faint_on_dark}")
    side = int(np.ceil(size * _CANVAS))
    y, x = np.mgrid[0:side, 0:side].astype(np.float64) - side / 2
    faint = diagnosis in MALIGNANT_DIAGNOSES and skin_ita < DARK_ITA
    canvas = _Canvas(x, y, size, 1.0 - faint_on_dark if faint else 1.0)
    skin = 1.0 + 0.04 * (canvas.noise(rng, side // 4) - 0.5) + rng.normal(0, 0.012, (side, side))
    alpha, mask, lesion = _DRAW[diagnosis](rng, canvas)
    lesion = lesion * (1.0 + rng.normal(0, 0.03, (side, side)))[:, :, None]
    reflectance = skin[:, :, None] * (1 - alpha[:, :, None]) + lesion * alpha[:, :, None]
    return reflectance, mask


def photograph(
    rng: np.random.Generator, reflectance: np.ndarray, mask: np.ndarray, tone: np.ndarray, size: int
) -> tuple[Image.Image, np.ndarray, float]:
    """(image, mask, exposure): one photo of a drawn lesion, its pose (rotation, shift, zoom), lighting
    gradient, exposure, hairs and blur drawn from rng."""
    angle, zoom = rng.uniform(0, 2 * np.pi), rng.uniform(0.92, 1.08)
    shift = np.clip(rng.normal(0, 0.03 * size, 2), -0.06 * size, 0.06 * size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) - size / 2
    x, y = (x - shift[0]) / zoom, (y - shift[1]) / zoom
    side = reflectance.shape[0]
    rows = side / 2 + x * np.sin(angle) + y * np.cos(angle)
    cols = side / 2 + x * np.cos(angle) - y * np.sin(angle)
    posed = np.stack([map_coordinates(reflectance[:, :, c], [rows, cols], order=1) for c in range(3)], -1)
    photo_mask = map_coordinates(mask.astype(np.uint8), [rows, cols], order=0).astype(bool)
    light_angle = rng.uniform(0, 2 * np.pi)
    gradient = (x * np.cos(light_angle) + y * np.sin(light_angle)) / size
    exposure = float(rng.uniform(0.975, 1.025))  # small: ITA moves ~1 degree per 1% of exposure
    lighting = exposure * (1.0 + rng.uniform(0.05, 0.2) * gradient + rng.normal(0, 0.01, (size, size)))
    pixels = tone * posed * lighting[:, :, None]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    _draw_hairs(rng, image, size)
    image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.2, 0.6)))
    return image, photo_mask, exposure


def photograph_lesion(
    diagnosis: str,
    *,
    lesion_seed: int | Sequence[int],
    photos: int,
    skin_ita: float,
    skin_rgb: np.ndarray | None = None,
    size: int = 128,
    faint_on_dark: float = 0.0,
) -> list[LesionPhoto]:
    """`photos` photos of one lesion, deterministic from ``lesion_seed``: the lesion (shape, colours, skin
    texture) comes from the seed, photo k's pose and light from (seed, k + 1). The skin colour is
    ``skin_rgb`` (a patient's) or, without one, skin_rgb_for_ita(skin_ita) with the seed's hue."""
    seed = [lesion_seed] if isinstance(lesion_seed, int) else list(lesion_seed)
    rng = np.random.default_rng(seed)
    tone = skin_rgb_for_ita(skin_ita, rng) if skin_rgb is None else np.asarray(skin_rgb, dtype=np.float64)
    reflectance, mask = draw_lesion(rng, diagnosis, size=size, faint_on_dark=faint_on_dark, skin_ita=skin_ita)
    result = []
    for index in range(photos):
        image, photo_mask, exposure = photograph(
            np.random.default_rng([*seed, index + 1]), reflectance, mask, tone, size
        )
        photo_ita = float(ita_of_rgb(np.clip(tone * exposure, 0, 255)))
        result.append(LesionPhoto(image, photo_mask, diagnosis, float(skin_ita), photo_ita))
    return result


def generate_diagnosis(
    rng: np.random.Generator, diagnosis: str, *, size: int = 128, skin_ita: float | None = None, faint_on_dark=0.0
) -> LesionPhoto:
    """One photo of one lesion of `diagnosis`, all drawn from rng; without ``skin_ita`` the ITA is drawn
    uniformly from [-50, 70]."""
    ita = float(rng.uniform(-50, 70)) if skin_ita is None else float(skin_ita)
    tone = skin_rgb_for_ita(ita, rng)
    reflectance, mask = draw_lesion(rng, diagnosis, size=size, faint_on_dark=faint_on_dark, skin_ita=ita)
    image, photo_mask, exposure = photograph(rng, reflectance, mask, tone, size)
    return LesionPhoto(image, photo_mask, diagnosis, ita, float(ita_of_rgb(np.clip(tone * exposure, 0, 255))))
