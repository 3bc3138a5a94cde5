"""The pictures of an explanation: the heatmap's colours come from a 256-level palette (the colour
map's own levels), and the overlay is a JPEG that still shows the heatmap and its legend."""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image

from mlcore.heatmap import LEGEND_HEIGHT, heatmap_indexed, heatmap_rgba, normalise, render


def _ramp() -> np.ndarray:
    return np.tile(np.linspace(-1.0, 1.0, 64, dtype=np.float32), (32, 1))  # left: against, right: for


def test_the_palette_heatmap_has_the_colour_maps_colours_and_the_fading_alpha():
    attribution = _ramp()
    rgba = np.asarray(heatmap_rgba(attribution, (64, 32), signed=True)).astype(int)
    values = normalise(attribution, signed=True)
    expected_colour = (colormaps["RdBu_r"]((values + 1) / 2)[..., :3] * 255).astype(int)
    expected_alpha = (np.clip((np.abs(values) - 0.15) / 0.6, 0, 1) * 255).astype(int)
    # One of 256 levels: within one level of the exact colour, and of the exact transparency.
    assert np.abs(rgba[..., :3] - expected_colour).max() <= 8
    assert np.abs(rgba[..., 3] - expected_alpha).max() <= 4
    assert (rgba[:, -1, 0] > rgba[:, -1, 2] + 50).all() and (
        rgba[:, 0, 2] > rgba[:, 0, 0] + 50
    ).all()  # red for, blue against
    assert rgba[:, 32, 3].max() == 0  # no evidence: fully transparent


def test_unsigned_maps_use_their_own_palette_and_opacity_scales_the_alpha():
    attribution = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (8, 1))
    full = np.asarray(heatmap_indexed(attribution, (64, 8), signed=False).convert("RGBA")).astype(int)
    faded = np.asarray(heatmap_indexed(attribution, (64, 8), signed=False, opacity=0.5).convert("RGBA")).astype(int)
    assert np.array_equal(full[..., :3], faded[..., :3])
    assert full[0, -1, 3] == 255 and abs(faded[0, -1, 3] - 127) <= 1
    assert full[0, 0, 3] == 0


def test_the_overlay_is_a_jpeg_with_the_heat_and_the_legend_and_the_heatmap_a_transparent_png():
    photo = Image.new("RGB", (120, 80), (128, 128, 128))
    attribution = np.zeros((32, 32), dtype=np.float32)
    attribution[:, 20:] = 1.0  # the right side pushes towards the class
    overlay, heatmap = render(photo, attribution, signed=True, method_label="Grad-CAM", target_class="malignant")
    overlay_image, heatmap_image = Image.open(io.BytesIO(overlay)), Image.open(io.BytesIO(heatmap))
    assert (overlay_image.format, heatmap_image.format) == ("JPEG", "PNG")
    assert overlay_image.size == (120, 80 + LEGEND_HEIGHT) and heatmap_image.mode == "P"
    pixels = np.asarray(overlay_image.convert("RGB")).astype(int)
    right, left = pixels[40, 110], pixels[40, 10]
    assert right[0] > right[2] + 40  # reddened where the evidence is
    assert abs(int(left[0]) - 128) < 12 and abs(int(left[2]) - 128) < 12  # the photo untouched elsewhere
    assert (pixels[80:] < 100).any()  # the legend's text
    heat = np.asarray(heatmap_image.convert("RGBA"))
    assert heat[:, :40, 3].max() == 0 and heat[:, -10:, 3].min() == 255  # transparent, then painted
