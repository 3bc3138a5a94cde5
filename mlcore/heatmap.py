"""Attribution maps as pictures: a transparent heatmap, an overlay with a legend, and the raw array."""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter

from .preprocessing import decode_image

DISPLAY_MAX_SIDE = 1024  # overlays are rendered at most this large, whatever the upload's size
LEGEND_HEIGHT = 56


def display_size(width: int, height: int, max_side: int = DISPLAY_MAX_SIDE) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def display_jpeg(data: bytes, max_side: int, *, quality: int = 90, **limits) -> bytes:
    """A photo's bytes as a JPEG for the screen: decoded like the model's input and the heatmaps'
    (upright, colour-managed, transparency over white; a large JPEG at a reduced DCT scale), at most
    max_side on its longer side, from the pixels only (no metadata). `limits` go to decode_image."""

    decoded = decode_image(data, max_side=max_side, **limits)
    picture = decoded.image
    target = display_size(decoded.full_width, decoded.full_height, max_side)
    if picture.size != target:
        picture = picture.resize(target, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def normalise(attribution: np.ndarray, *, signed: bool) -> np.ndarray:
    """Scale to [-1, 1] (signed) or [0, 1] by the 99th percentile of the magnitude, so one extreme
    pixel does not wash out the rest."""
    magnitude = np.abs(attribution) if signed else np.clip(attribution, 0, None)
    scale = float(np.percentile(magnitude, 99)) or float(magnitude.max()) or 1.0
    limits = (-1.0, 1.0) if signed else (0.0, 1.0)
    return np.clip(attribution / scale, *limits)


def heatmap_rgba(attribution: np.ndarray, size: tuple[int, int], *, signed: bool, smooth: bool = False) -> Image.Image:
    """RGBA at `size`: red where the evidence favours the target, blue against (signed methods);
    transparency grows as the evidence fades, so the photo shows through."""
    return heatmap_indexed(attribution, size, signed=signed, smooth=smooth).convert("RGBA")


def heatmap_indexed(
    attribution: np.ndarray, size: tuple[int, int], *, signed: bool, smooth: bool = False, opacity: float = 1.0
) -> Image.Image:
    """heatmap_rgba as a palette image: each pixel is one of the colour map's 256 levels, and the palette
    holds that level's colour and transparency (times `opacity`). The colour map has 256 levels anyway,
    so nothing is lost, and the colours are looked up once per level instead of once per pixel."""
    if smooth:
        # Pixel-level attributions (IG and friends) are speckled; a light blur shows regions. The
        # raw array, unblurred, is stored next to the pictures.
        attribution = gaussian_filter(attribution.astype(np.float32), sigma=max(1.0, attribution.shape[0] / 32))
    resized = np.asarray(
        Image.fromarray(attribution.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    )
    values = normalise(resized, signed=signed)
    levels = np.rint((values + 1) / 2 * 255 if signed else values * 255).astype(np.uint8)
    indexed = Image.fromarray(levels, mode="P")
    indexed.putpalette(_palette(signed, opacity), rawmode="RGBA")
    return indexed


def _palette(signed: bool, opacity: float) -> bytes:
    fractions = np.arange(256) / 255
    colours = colormaps["RdBu_r" if signed else "YlOrRd"](fractions)
    strength = np.abs(fractions * 2 - 1) if signed else fractions
    palette = np.empty((256, 4), dtype=np.uint8)
    palette[:, :3] = (colours[:, :3] * 255).astype(np.uint8)
    # Weak evidence stays transparent: only the upper part of the range is painted.
    palette[:, 3] = (np.clip((strength - 0.15) / 0.6, 0, 1) * opacity * 255).astype(np.uint8)
    return palette.tobytes()


def legend_text(*, method_label: str, target_class: str, signed: bool) -> tuple[str, str]:
    title = f"{method_label} · explaining: {target_class}"
    if signed:
        return title, f"red: pushed towards '{target_class}'    blue: pushed away from it"
    return title, f"red: regions that most drove '{target_class}'"


def _fit_font(draw: ImageDraw.ImageDraw, text: str, width: int) -> ImageFont.ImageFont:
    for size in (13, 12, 11, 10, 9, 8):
        font = ImageFont.load_default(size=size)
        if draw.textlength(text, font=font) <= width:
            return font
    return font


def render(
    image: Image.Image, attribution: np.ndarray, *, signed: bool, method_label: str, target_class: str,
    smooth: bool = False, opacity: float = 0.6,
) -> tuple[bytes, bytes]:  # fmt: skip
    """(overlay JPEG, heatmap PNG). Both are at the image's display size (longest side at most
    DISPLAY_MAX_SIDE); the overlay adds a legend strip of LEGEND_HEIGHT pixels below the photo,
    naming the method and the class explained and saying what red means."""
    size = display_size(*image.size)
    photo = image.convert("RGB").resize(size, Image.Resampling.BILINEAR) if image.size != size else image.convert("RGB")
    indexed = heatmap_indexed(attribution, size, signed=signed, smooth=smooth)
    faded = indexed.copy()
    faded.putpalette(_palette(signed, opacity), rawmode="RGBA")
    composite = Image.alpha_composite(photo.convert("RGBA"), faded.convert("RGBA")).convert("RGB")

    overlay = Image.new("RGB", (size[0], size[1] + LEGEND_HEIGHT), (255, 255, 255))
    overlay.paste(composite, (0, 0))
    draw = ImageDraw.Draw(overlay)
    title, explanation = legend_text(method_label=method_label, target_class=target_class, signed=signed)
    bar_width = max(24, min(120, size[0] // 4))
    ramp = np.linspace(-1, 1, bar_width) if signed else np.linspace(0, 1, bar_width)
    colours = colormaps["RdBu_r"]((ramp + 1) / 2) if signed else colormaps["YlOrRd"](ramp)
    bar = Image.fromarray((np.repeat(colours[None, :, :3], 10, axis=0) * 255).astype(np.uint8), mode="RGB")
    overlay.paste(bar, (6, size[1] + 8))
    title_font = _fit_font(draw, title, size[0] - bar_width - 18)
    draw.text((bar_width + 12, size[1] + 5), title, fill=(20, 20, 20), font=title_font)
    text_font = _fit_font(draw, explanation, size[0] - 12)
    draw.text((6, size[1] + 28), explanation, fill=(60, 60, 60), font=text_font)

    overlay_jpeg, heat_png = io.BytesIO(), io.BytesIO()
    # The overlay is a photograph: JPEG at quality 92 without chroma subsampling (so the legend's text
    # and colours stay sharp) takes about 3 ms and 130 KB for 1024 x 911, against 62 ms and 1.2 MB as a
    # PNG. The heatmap keeps its transparency: a palette PNG (256 colours, each with its alpha), 4.5 ms
    # and 144 KB against 28 ms and 314 KB as an RGBA PNG; it reads back as RGBA with .convert("RGBA").
    overlay.save(overlay_jpeg, format="JPEG", quality=92, subsampling=0)
    indexed.save(heat_png, format="PNG", compress_level=1)
    return overlay_jpeg.getvalue(), heat_png.getvalue()


def upsample_bilinear(cam: np.ndarray, size: int) -> np.ndarray:
    """A 2-D map (a Grad-CAM map at its feature map's size) brought to size x size with bilinear
    interpolation, corners not aligned: what the prediction pass would compute
    (torch.nn.functional.interpolate, mode="bilinear", align_corners=False), in NumPy and without BLAS.
    The render task runs no torch: in a worker process every torch operator belongs on the device thread
    (services.runtime), and one run on another thread slows every later forward pass (bench/README.md)."""
    cam = np.asarray(cam, dtype=np.float32)
    low, high, fraction = _bilinear_taps(cam.shape[0], size)
    rows = cam[low] * (1 - fraction)[:, None] + cam[high] * fraction[:, None]
    low, high, fraction = _bilinear_taps(cam.shape[1], size)
    return (rows[:, low] * (1 - fraction) + rows[:, high] * fraction).astype(np.float32)


def _bilinear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per target pixel: the two source pixels it lies between and the weight of the second, with
    half-pixel centres (positions before the first centre clamp to it)."""
    positions = np.maximum((np.arange(target, dtype=np.float32) + 0.5) * np.float32(source / target) - 0.5, 0)
    low = np.minimum(positions.astype(np.int64), source - 1)
    high = np.minimum(low + 1, source - 1)
    return low, high, (positions - low).astype(np.float32)


def attribution_npy(raw: np.ndarray) -> bytes:
    """The raw attribution as a compact float16 .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, raw.astype(np.float16), allow_pickle=False)
    return buffer.getvalue()
