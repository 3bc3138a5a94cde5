"""The photo-quality gate's measures on crafted photos, its calibration on reference photos, and its verdict."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from mlcore.data import generate_lesion
from mlcore.quality import ADVICE, BOUNDS, FALSE_REFUSAL, MARGIN, assess, calibrate, measure


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


def test_exposure_moves_brightness_and_clipping():
    photo = good_photos(1, seed=3)[0]
    dark, normal, bright = (measure(ImageEnhance.Brightness(photo).enhance(factor)) for factor in (0.3, 1.0, 2.5))
    assert dark["brightness"] < normal["brightness"] < bright["brightness"]
    assert bright["clipped"] > 0.3 > normal["clipped"]


def test_skin_share_tells_a_lesion_photo_from_a_document_or_a_solid_colour():
    lesion = measure(good_photos(1, seed=4)[0])["skin"]
    page = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(page).text((20, 100), "Referral letter, page 1", fill="black")
    blue = Image.new("RGB", (256, 256), (40, 80, 200))
    assert lesion > 0.5 and measure(page)["skin"] < 0.05 and measure(blue)["skin"] < 0.05


def test_lesion_size_and_offset_from_the_darker_region():
    photo = good_photos(2, seed=5)[1]  # a malignant one: dark enough to tell from the skin
    full = measure(photo)
    canvas = Image.new("RGB", (1024, 1024), photo.resize((1, 1)).getpixel((0, 0)))  # the skin's mean colour
    canvas.paste(photo.resize((128, 128)), (0, 0))  # small, in a corner
    small = measure(canvas)
    assert small["lesion_size"] < full["lesion_size"] / 5
    assert small["lesion_offset"] > full["lesion_offset"] + 0.3


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
