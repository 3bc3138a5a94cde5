"""The photo-quality gate's measures on crafted photos, its calibration on reference photos, and its verdict."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from mlcore.data import _SKIN_TONES, generate_lesion
from mlcore.quality import ADVICE, BOUNDS, FALSE_REFUSAL, MARGIN, assess, calibrate, lesion_mask, measure


def good_photos(count: int, *, seed: int = 0, size: int = 256) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [generate_lesion(rng, malignant=bool(index % 2), size=size).image for index in range(count)]


@pytest.fixture(scope="module")
def reference():
    photos = good_photos(60, seed=1)
    return photos, calibrate([measure(photo) for photo in photos])


def failed(photo: Image.Image, thresholds, **kwargs) -> set[str]:
    verdict = assess(measure(photo, **kwargs), thresholds)
    return {f"{check.name}:{check.direction}" for check in verdict.checks if not check.passed}


def test_blur_lowers_focus_step_by_step():
    photo = good_photos(1, seed=2)[0]
    values = [measure(photo.filter(ImageFilter.GaussianBlur(sigma)))["focus"] for sigma in (0, 1, 2, 4)]
    assert values == sorted(values, reverse=True) and values[0] - values[-1] > 1.0
    assert -2 <= values[-1] < -0.5 < 0.5 < values[0]  # -2: a smooth picture, the most blurred there is


def test_focus_does_not_depend_on_exposure_and_tells_noise_and_flat_colour_apart():
    photo = good_photos(1, seed=2)[0]
    values = [measure(ImageEnhance.Brightness(photo).enhance(factor))["focus"] for factor in (0.6, 1.0, 1.3)]
    assert max(values) - min(values) < 0.1
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    assert measure(noise)["focus"] > 1.5 > max(values)
    assert measure(Image.new("RGB", (256, 256), (200, 150, 120)))["focus"] == -2.0  # nothing to focus on


def test_focus_does_not_take_light_falling_across_the_frame_for_blur():
    """A strong even light gradient (x0.6 to x1.2 across the frame) is no blur; blurring the lit photo is."""
    photo = good_photos(1, seed=3)[0]
    ramp = (0.6 + 0.6 * np.arange(256) / 255)[None, :, None]
    lit = Image.fromarray((np.asarray(photo, float) * ramp).clip(0, 255).astype(np.uint8))
    assert abs(measure(lit)["focus"] - measure(photo)["focus"]) < 0.1
    assert measure(lit.filter(ImageFilter.GaussianBlur(4)))["focus"] < measure(lit)["focus"] - 1.0


def test_focus_is_the_sharpest_quarter_of_the_frame():
    """A lesion in focus before a soft background (a shallow depth of field) is in focus."""
    photo = good_photos(1, seed=2)[0]
    soft = photo.filter(ImageFilter.GaussianBlur(4))
    soft.paste(photo.crop((48, 48, 208, 208)), (48, 48))  # the middle two fifths sharp
    assert measure(soft)["focus"] > measure(photo.filter(ImageFilter.GaussianBlur(4)))["focus"] + 0.5


def test_exposure_moves_brightness_and_clipping():
    photo = good_photos(1, seed=3)[0]
    dark, normal, bright = (measure(ImageEnhance.Brightness(photo).enhance(factor)) for factor in (0.3, 1.0, 2.5))
    assert dark["brightness"] < normal["brightness"] < bright["brightness"]
    assert bright["clipped"] > 0.3 > normal["clipped"]


def test_overexposed_dark_skin_is_clipped_though_no_brighter_than_light_skin():
    """Dark skin at 2.5 times the exposure has its red channel blown out everywhere, while its luminance
    stays below light skin's: the clipped share counts a pixel with any channel at full scale."""
    dark = measure(ImageEnhance.Brightness(picture(skin(_SKIN_TONES[-1]))).enhance(2.5))
    light = measure(picture(skin(_SKIN_TONES[0])))
    assert dark["brightness"] < light["brightness"] and dark["clipped"] > 0.9
    assert dark["skin"] > 0.9  # the pixels left are skin: it is overexposed, not "not skin"


def test_skin_share_tells_a_lesion_photo_from_a_document_or_a_solid_colour():
    lesion = measure(good_photos(1, seed=4)[0])["skin"]
    page = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(page).text((20, 100), "Referral letter, page 1", fill="black")
    blue = Image.new("RGB", (256, 256), (40, 80, 200))
    assert lesion > 0.5 and measure(page)["skin"] < 0.05 and measure(blue)["skin"] < 0.05


def test_lesion_size_and_offset_from_the_region_unlike_the_skin():
    photo = good_photos(2, seed=5)[1]
    full = measure(photo)
    canvas = Image.new("RGB", (1024, 1024), photo.resize((1, 1)).getpixel((0, 0)))  # the skin's mean colour
    canvas.paste(photo.resize((128, 128)), (0, 0))  # small, in a corner
    small = measure(canvas)
    assert small["lesion_size"] < full["lesion_size"] / 5
    assert small["lesion_offset"] > full["lesion_offset"] + 0.3


def skin(tone, *, size: int = 256, light: float = 0.0, seed: int = 0) -> np.ndarray:
    """Plain skin of one colour with a fine texture, and an even light falling from left to right."""
    rng = np.random.default_rng(seed)
    across = 1 + light * (np.arange(size) / (size - 1) - 0.5)
    return np.asarray(tone, float)[None, None] * across[None, :, None] * (1 + 0.02 * rng.normal(size=(size, size, 1)))


def picture(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))


def test_a_mole_lighter_than_dark_skin_is_found():
    """A brown mole on dark skin is often lighter than the skin: the mask is the colour unlike the skin."""
    yy, xx = np.mgrid[0:256, 0:256]
    disc = (yy - 128) ** 2 + (xx - 140) ** 2 < 40**2
    pixels = np.where(disc[..., None], np.array([150.0, 100, 65]), skin(_SKIN_TONES[-1]))
    values = measure(picture(pixels))
    assert values["lesion_size"] == pytest.approx(disc.mean(), rel=0.15)
    assert values["lesion_offset"] == pytest.approx(12 / 256 / np.hypot(0.5, 0.5), abs=0.02)
    found = lesion_mask(np.asarray(picture(pixels), dtype=np.float32))
    assert (found & disc).sum() / (found | disc).sum() > 0.9


def test_a_blue_grey_melanoma_does_not_make_its_photo_not_skin(reference):
    """The skin share is of the pixels around the lesion: a large lesion of any colour is still on skin."""
    _, thresholds = reference
    yy, xx = np.mgrid[0:256, 0:256]
    disc = (yy - 128) ** 2 + (xx - 128) ** 2 < 80**2  # 31% of the frame, blue-grey
    pixels = np.where(disc[..., None], np.array([95.0, 105, 125]), skin(_SKIN_TONES[1]))
    values = measure(picture(pixels))
    assert values["skin"] > 0.95 and values["lesion_size"] > 0.25
    assert thresholds["skin:low"] <= 0.6  # never stricter than its floor
    assert "skin:low" not in failed(picture(pixels), thresholds)


def test_neither_light_falling_across_the_skin_nor_hairs_are_a_lesion():
    plain = picture(skin(_SKIN_TONES[2], light=0.3))
    draw = ImageDraw.Draw(plain)
    for k in range(3):
        draw.line([(0, 40 + 70 * k), (255, 90 + 60 * k)], fill=(40, 30, 0), width=1)
    assert measure(plain)["lesion_size"] < 0.005
    assert not lesion_mask(np.zeros((64, 64))).any()  # a flat grey picture: nothing unlike its edges


def test_resolution_is_the_shorter_side_before_decoding_reduced_it():
    photo = good_photos(1, seed=6, size=128)[0]
    assert measure(photo)["resolution"] == 128
    assert measure(photo, full_size=(3000, 2000))["resolution"] == 2000


def test_calibration_refuses_few_good_photos_and_most_damaged_ones(reference):
    _, thresholds = reference
    held_out = good_photos(60, seed=7)
    refused = [photo for photo in held_out if failed(photo, thresholds)]
    # 2% in all on a reference set of 60: on other good photos, some more at most (the rate the product
    # promises is measured on a larger reference set by bench/quality_gate.py).
    assert len(refused) <= 0.10 * len(held_out)
    blurred = sum(bool(failed(photo.filter(ImageFilter.GaussianBlur(4)), thresholds)) for photo in held_out[:20])
    dark = sum(bool(failed(ImageEnhance.Brightness(photo).enhance(0.3), thresholds)) for photo in held_out[:20])
    bright = sum(bool(failed(ImageEnhance.Brightness(photo).enhance(2.5), thresholds)) for photo in held_out[:20])
    assert blurred >= 18 and dark >= 18 and bright >= 18


def test_no_skin_tone_is_refused_as_too_dark_or_not_skin(reference):
    """Fairness: thresholds calibrated on photos of every tone refuse no good photo of the darkest or the
    lightest skin for its brightness or its colour, and such skin well exposed has no measure failed."""
    _, thresholds = reference
    for tone in (_SKIN_TONES[0], _SKIN_TONES[-1]):
        for seed in range(5):
            yy, xx = np.mgrid[0:256, 0:256]
            disc = (yy - 128) ** 2 + (xx - 128) ** 2 < 45**2
            pixels = np.where(disc[..., None], np.array([90.0, 60, 40]), skin(tone, light=0.15, seed=seed))
            assert failed(picture(pixels), thresholds) == set(), tone


def test_a_verdict_names_each_failed_check_with_its_advice(reference):
    photos, thresholds = reference
    verdict = assess(measure(photos[0].filter(ImageFilter.GaussianBlur(4))), thresholds)
    assert not verdict.assessable
    focus = next(check for check in verdict.checks if check.name == "focus")
    assert not focus.passed and focus.value < focus.threshold and focus.advice == ADVICE[("focus", "low")]
    assert verdict.reasons[0].startswith("out of focus")
    assert set(focus.as_dict()) == {"name", "value", "threshold", "direction", "passed", "advice"}


def test_without_thresholds_only_the_resolution_is_judged():
    """A model version registered before the gate has no calibration: nothing but the size is judged."""
    tiny = Image.new("RGB", (64, 64), (200, 150, 120))
    verdict = assess(measure(tiny), {"resolution:low": 224})
    assert not verdict.assessable and [check.name for check in verdict.checks if not check.passed] == ["resolution"]
    assert assess(measure(good_photos(1, seed=8)[0]), {}).assessable


def test_thresholds_are_the_reference_quantiles_moved_out_by_the_margin(reference):
    photos, thresholds = reference
    rows = [measure(photo) for photo in photos]
    share = FALSE_REFUSAL / len(BOUNDS)
    focus = [row["focus"] for row in rows]
    edge, quartile = np.quantile(focus, [share, 0.25])
    assert thresholds["focus:low"] == pytest.approx(edge - MARGIN * (quartile - edge)) and thresholds[
        "focus:low"
    ] < min(focus)
    brightness = [row["brightness"] for row in rows]
    edge, quartile = np.quantile(brightness, [1 - share, 0.75])
    assert thresholds["brightness:high"] == pytest.approx(edge + MARGIN * (edge - quartile))
    assert thresholds["clipped:high"] >= 0.02 and thresholds["resolution:low"] == 224
    assert calibrate(rows, margin=0)["focus:low"] == pytest.approx(np.quantile(focus, share))
    # A share of the frame: the margin is a ratio (on a log scale), never a threshold below zero.
    edge, quartile = np.log(np.quantile([row["lesion_size"] for row in rows], [share, 0.25]))
    assert thresholds["lesion_size:low"] == pytest.approx(np.exp(edge - MARGIN * (quartile - edge)))
    assert 0 < thresholds["lesion_size:low"] < min(row["lesion_size"] for row in rows)


def test_a_lenient_check_refuses_only_what_cannot_be_read_and_off_refuses_nothing(reference):
    photos, thresholds = reference
    blurred = measure(photos[1].filter(ImageFilter.GaussianBlur(4)))
    lenient = assess(blurred, thresholds, mode="lenient")
    assert lenient.assessable and lenient.warnings[0].startswith("out of focus") and not lenient.reasons
    page = Image.new("RGB", (256, 256), (90, 110, 230))
    assert not assess(measure(page), thresholds, mode="lenient").assessable
    off = assess(measure(page), thresholds, mode="off")
    assert off.assessable and off.warnings and not off.reasons
    with pytest.raises(ValueError, match="mode"):
        assess(blurred, thresholds, mode="loose")


def test_calibration_refuses_too_few_photos_or_a_bad_rate():
    rows = [measure(photo) for photo in good_photos(20, seed=9, size=96)]
    with pytest.raises(ValueError, match="at least 20"):
        calibrate(rows[:5])
    with pytest.raises(ValueError, match="false_refusal"):
        calibrate(rows, false_refusal=0.7)


def test_a_heavily_compressed_photo_is_still_measured():
    buffer = io.BytesIO()
    good_photos(1, seed=10)[0].save(buffer, format="JPEG", quality=10)
    values = measure(Image.open(buffer))
    assert set(values) == {"focus", "brightness", "clipped", "skin", "lesion_size", "lesion_offset", "resolution"}
